"""Server memory per held idle stream, and where it goes: ``python -m bench.mem_idle``.

The benchmark's ``idle`` scenario says *how much* a held stream costs the
server (RSS of a separate process, seen from outside); this says *where*. It
serves the benchmark's own ``/fanout`` app (``bench/targets/_pywsgi.py``, with
the same adapter, middleware, server and Hub as the target) in this process,
opens N client connections from this same process (gevent sockets), reads
each up to its hello chunk, leaves them all idle, and compares before with
after:

* ``tracemalloc`` snapshots, split into the server's side and the client's
  (an allocation made with this module on the stack is the client's), then
  grouped by owner (wsgi_detach, the bench app, gevent, the rest) and by
  source line;
* RSS growth (psutil), from a run without tracemalloc, which costs memory of
  its own. Unlike the benchmark's figure it includes the client sockets;
* the objects the garbage collector tracks, counted by type.

Each target runs in fresh child processes (one for RSS and the census, one
for tracemalloc), after a warm-up of 20 streams opened and closed, as in the
benchmark. Figures are per stream; nothing is asserted: a benchmark is not a
test. Every wait is bounded and every client socket is closed at the end.

    python -m bench.mem_idle                      # wsgi_detach and queue_body, 500 streams
    python -m bench.mem_idle --streams 1000 --top 40 --targets wsgi_detach
    BENCH_BEFORE=/tmp/b python -m bench.mem_idle --targets wsgi_detach,wsgi_detach_before
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import site
import subprocess
import sys
import sysconfig
import tracemalloc
from typing import Any

import gevent
from gevent import socket

from bench import producer, system, wire

TARGETS = ("wsgi_detach", "queue_body", "wsgi_detach_before")
#: Streams opened and closed before the baseline, as the benchmark's idle
#: scenario does: first requests load code and grow pools once per process.
WARMUP = 20
#: Seconds to wait after the last stream is up: the disconnect watch
#: registers a socket with epoll only after ``WATCH_DELAY`` (0.1 s).
SETTLE = 0.5
#: Frames kept per allocation: deep enough to reach this module's client
#: code from inside gevent's socket calls (more makes every allocation slower).
FRAMES = 12
#: Seconds the server may take to see every client leave before it is stopped.
TEARDOWN = 10.0
#: Where allocations come from that are the measurement's own (the first
#: snapshot's traces are made while tracing, by tracemalloc.py).
NOT_SERVED = frozenset({tracemalloc.__file__, "<unknown>"})
REQUEST = wire.request("/fanout")
#: How the first chunk ends on the wire (chunked: ``6\r\nhello\n\r\n``).
HELLO_END = producer.HELLO + b"\r\n"
#: Who a source file belongs to, by a folder on its path.
OWNERS = (("wsgi_detach", "wsgi_detach"), ("bench", "bench app"), ("gevent", "gevent"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- child: one measurement


def start_server(target: str) -> Any:
    """The target's /fanout server, listening on 127.0.0.1 (ephemeral port) and started."""
    from bench.targets import _pywsgi, detach

    if target == "queue_body":
        from gevent import pywsgi

        from bench.targets import queue_body

        app = _pywsgi.App(queue_body.Adapter())
        server = pywsgi.WSGIServer(detach.listener(), app, log=None)
    else:
        import wsgi_detach

        app = _pywsgi.App(detach.Adapter({}, middleware=True, hub=True))
        middleware = wsgi_detach.DetachMiddleware(app)
        server = wsgi_detach.DetachServer(detach.listener(), middleware, log=None)
    server.start()
    return server


def open_streams(port: int, n: int, timeout: float) -> list[socket.socket]:
    """``n`` client connections, each read up to its hello chunk; closed again on failure."""
    socks: list[socket.socket] = []
    try:
        with gevent.Timeout(timeout, TimeoutError(f"{n} streams not up in {timeout}s")):
            for _ in range(n):
                sock = socket.create_connection(("127.0.0.1", port))
                socks.append(sock)
                sock.sendall(REQUEST)
                seen = b""
                while not seen.endswith(HELLO_END):
                    data = sock.recv(4096)
                    if not data:
                        raise ConnectionError("the server closed a stream before its hello")
                    seen += data
    except BaseException:
        close_all(socks)
        raise
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def wait_all_closed(server: Any) -> None:
    """Give the server up to ``TEARDOWN`` seconds to see the clients leave, so that
    stopping it cuts off no stream (the queues of Bottle's queue-as-body pattern never
    notice: pywsgi kills them)."""
    middleware = getattr(server, "middleware", None)
    if middleware is None:
        return
    with gevent.Timeout(TEARDOWN, False):
        while middleware.stats().open:
            gevent.sleep(0.05)


def measure(target: str, mode: str, n: int, top: int) -> dict[str, Any]:
    """Open ``n`` idle streams on a fresh server; what they added, per ``mode``."""
    system.raise_nofile()
    if mode == "trace":
        tracemalloc.start(FRAMES)
    server = start_server(target)
    try:
        port = server.server_port
        close_all(open_streams(port, WARMUP, 30))
        gevent.sleep(0.2)
        before = sample(mode)
        socks = open_streams(port, n, 30 + n / 100)
        try:
            gevent.sleep(SETTLE)
            after = sample(mode)
        finally:
            close_all(socks)
            tracemalloc.stop()  # it slows the server down several-fold
            wait_all_closed(server)
    finally:
        server.stop(timeout=1)
    if mode == "trace":
        return {"target": target, **traced(before, after, n, top)}
    return {
        "target": target,
        "rss_per_stream": (after["rss"] - before["rss"]) / n,
        "census": census_diff(before["census"], after["census"], n),
    }


def sample(mode: str) -> Any:
    """A tracemalloc snapshot (``trace``), or RSS and a census of gc-tracked objects."""
    gc.collect()
    if mode == "trace":
        return tracemalloc.take_snapshot()
    import psutil

    rss = psutil.Process().memory_info().rss  # before the census, which allocates
    objects = gc.get_objects()
    counts = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in objects)
    del objects
    return {"rss": rss, "census": counts}


def census_diff(
    before: collections.Counter[str], after: collections.Counter[str], n: int
) -> list[tuple[str, float]]:
    """Objects of each type (gc-tracked only) added per stream, most first."""
    grown = after - before
    return [(name, count / n) for name, count in grown.most_common() if count >= n / 2]


def traced(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, n: int, top: int
) -> dict[str, Any]:
    """Bytes and blocks the streams added, client and server side, the server's by line.

    An allocation is the client's when this module is anywhere on its stack:
    the server runs in greenlets of its own, whose stacks start in gevent.
    Each is filed under the line that made it, the last frame.
    """
    sizes: collections.Counter[tuple[str, str, int]] = collections.Counter()
    blocks: collections.Counter[tuple[str, str, int]] = collections.Counter()
    for snapshot, sign in ((after, 1), (before, -1)):
        for trace in snapshot.traces:
            frames = trace.traceback  # tracemalloc.Filter(all_frames=True) is far slower
            latest = frames[-1]
            if latest.filename in NOT_SERVED:
                continue
            side = "client" if any(f.filename == __file__ for f in frames) else "server"
            key = (side, latest.filename, latest.lineno)
            sizes[key] += sign * trace.size
            blocks[key] += sign
    out: dict[str, Any] = {}
    for side in ("client", "server"):
        out[f"{side}_per_stream"] = sum(v for k, v in sizes.items() if k[0] == side) / n
        out[f"{side}_blocks_per_stream"] = sum(v for k, v in blocks.items() if k[0] == side) / n
    owners: collections.Counter[str] = collections.Counter()
    for (side, filename, _), size in sizes.items():
        if side == "server":
            owners[owner(filename)] += size
    out["owners"] = [(name, size / n) for name, size in owners.most_common()]
    lines = sorted((k for k in sizes if k[0] == "server"), key=sizes.__getitem__, reverse=True)
    out["lines"] = [(where(k[1], k[2]), sizes[k] / n, blocks[k] / n) for k in lines[:top]]
    return out


def owner(filename: str) -> str:
    """Who wrote the code at ``filename``: see ``OWNERS``."""
    folders = filename.replace(os.sep, "/").split("/")[:-1]
    for folder, label in OWNERS:
        if folder in folders:
            return label
    return "python and the rest"


def where(filename: str, lineno: int) -> str:
    """``file:line``, the file relative to where it was installed or checked out."""
    bases = [ROOT, os.environ.get("BENCH_BEFORE", ""), sysconfig.get_paths()["stdlib"]]
    bases += site.getsitepackages()
    name = filename
    for base in filter(None, bases):
        relative = os.path.relpath(filename, base)
        if not relative.startswith("..") and len(relative) < len(name):
            name = relative
    return f"{name}:{lineno}"


# ---------------------------------------------------------------- parent: the table


def run_child(target: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.mem_idle", "--child", target, mode]
    command += ["--streams", str(args.streams), "--top", str(args.top)]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=120 + args.streams / 50
    )
    if done.returncode != 0:
        raise SystemExit(f"{target} ({mode}) failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"{args.streams} idle /fanout streams per target (warm-up: {WARMUP}); per stream:")
    print(
        f"{'target':<22}{'RSS KiB':>9}{'server KiB':>12}{'client KiB':>12}"
        f"{'server blocks':>15}   (RSS includes the client; the rest is tracemalloc)"
    )
    for target, r in results.items():
        print(
            f"{target:<22}{r['rss_per_stream'] / 1024:>9.2f}{r['server_per_stream'] / 1024:>12.2f}"
            f"{r['client_per_stream'] / 1024:>12.2f}{r['server_blocks_per_stream']:>15.1f}"
        )
    for target, r in results.items():
        print(f"\n== {target}: server side by owner, bytes per stream")
        for name, size in r["owners"]:
            print(f"  {size:>9.0f}  {name}")
        print(f"== {target}: top {args.top} server-side lines (bytes, blocks per stream)")
        for place, size, blocks in r["lines"]:
            print(f"  {size:>9.0f} {blocks:>6.2f}  {place}")
        print(f"== {target}: gc-tracked objects per stream, by type")
        for name, count in r["census"]:
            print(f"  {count:>6.2f}  {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mem_idle", description=__doc__)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--top", type=int, default=25, help="server-side lines to show")
    parser.add_argument("--targets", default="wsgi_detach,queue_body", help=", ".join(TARGETS))
    parser.add_argument("--child", nargs=2, metavar=("TARGET", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        target, mode = args.child
        if target.endswith("_before"):
            sys.path.insert(0, os.environ["BENCH_BEFORE"])
        print(json.dumps(measure(target, mode, args.streams, args.top)))
        return 0
    results: dict[str, dict[str, Any]] = {}
    for target in args.targets.split(","):
        if target not in TARGETS:
            parser.error(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
        if target.endswith("_before") and not os.environ.get("BENCH_BEFORE"):
            parser.error(f"{target}: set BENCH_BEFORE to a directory holding the older package")
        results[target] = {**run_child(target, "rss", args), **run_child(target, "trace", args)}
    report(results, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
