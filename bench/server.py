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
    _profile_if_asked(args.target)
    serve(announce, **dict(target.options))  # type: ignore[operator]


def _profile_if_asked(target: str) -> None:
    """With ``BENCH_PROFILE=DIR``, cProfile the server; SIGTERM writes DIR/<target>-<pid>.prof.

    cProfile slows the server several-fold: use it to see where the time goes,
    never for the figures.
    """
    directory = os.environ.get("BENCH_PROFILE")
    if not directory:
        return
    import cProfile
    import signal

    profile = cProfile.Profile()

    def dump(_signum: int, _frame: object) -> None:
        profile.disable()
        profile.dump_stats(os.path.join(directory, f"{target}-{os.getpid()}.prof"))
        os._exit(0)

    signal.signal(signal.SIGTERM, dump)
    profile.enable()


if __name__ == "__main__":
    main()
