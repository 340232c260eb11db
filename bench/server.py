"""Start one target server: ``python -m bench.server NAME [--cpu N]``.

It prints one JSON line ``{"port": ..., "pid": ..., "info": {...}}`` on
stdout once it accepts connections, then serves until it is killed by
PID. stdout carries nothing else; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from bench import system
from bench.targets import TARGETS


def announce(port: int, info: dict[str, object]) -> None:
    line = {"port": port, "pid": os.getpid(), "info": info}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.server")
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--cpu", type=int, default=None, help="pin to this core")
    args = parser.parse_args(argv)
    system.raise_nofile()
    system.pin(args.cpu)
    target = TARGETS[args.target]
    if args.target.endswith("_before"):
        before = os.environ.get("BENCH_BEFORE")
        if not before:
            sys.exit(f"{args.target}: set BENCH_BEFORE to a directory holding the older "
                     f"wsgi_detach package (e.g. git archive main wsgi_detach | tar -x -C DIR)")
        sys.path.insert(0, before)
    serve = target.load()
    _gc_stats_if_asked(args.target)
    _profile_if_asked(args.target)
    serve(announce, **dict(target.options))  # type: ignore[operator]


#: What SIGTERM writes before the server exits (BENCH_PROFILE, BENCH_GC).
_AT_EXIT: list[Callable[[], None]] = []


def _on_sigterm(dump: Callable[[], None]) -> None:
    import signal

    if not _AT_EXIT:

        def exit_after_dumps(_signum: int, _frame: object) -> None:
            for each in _AT_EXIT:
                each()
            os._exit(0)

        signal.signal(signal.SIGTERM, exit_after_dumps)
    _AT_EXIT.append(dump)


def _profile_if_asked(target: str) -> None:
    """With ``BENCH_PROFILE=DIR``, cProfile the server; SIGTERM writes DIR/<target>-<pid>.prof.

    cProfile slows the server several-fold: use it to see where the time goes,
    never for the figures.
    """
    directory = os.environ.get("BENCH_PROFILE")
    if not directory:
        return
    import cProfile

    profile = cProfile.Profile()

    def dump() -> None:
        profile.disable()
        profile.dump_stats(os.path.join(directory, f"{target}-{os.getpid()}.prof"))

    _on_sigterm(dump)
    profile.enable()


def _gc_stats_if_asked(target: str) -> None:
    """With ``BENCH_GC=DIR``, count the server's garbage collections and the time they take.

    SIGTERM writes DIR/<target>-<pid>.gc.json: per generation, collections,
    objects collected and seconds spent, in all and while a publish loop ran
    (``while_publishing``: the pauses a fan-out's deliveries wait behind);
    and the objects tracked at the end. Cheap enough (a callback per
    collection) to leave the figures usable.
    """
    directory = os.environ.get("BENCH_GC")
    if not directory:
        return
    import gc
    import time

    from bench.producer import PUBLISHING

    def zero() -> dict[int, dict[str, float]]:
        return {gen: {"collections": 0, "collected": 0, "seconds": 0.0} for gen in range(3)}

    stats, publishing = zero(), zero()
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = time.perf_counter() - started[0]
        for table in (stats, publishing) if PUBLISHING[0] else (stats,):
            entry = table[info["generation"]]
            entry["collections"] += 1
            entry["collected"] += info["collected"]
            entry["seconds"] += took

    def dump() -> None:
        gc.callbacks.remove(callback)
        report = {"generations": stats, "while_publishing": publishing,
                  "tracked": len(gc.get_objects()), "thresholds": gc.get_threshold()}
        with open(os.path.join(directory, f"{target}-{os.getpid()}.gc.json"), "w") as out:
            json.dump(report, out)

    gc.callbacks.append(callback)
    _on_sigterm(dump)


if __name__ == "__main__":
    main()
