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
    serve = target.load()
    serve(announce, **dict(target.options))  # type: ignore[operator]


if __name__ == "__main__":
    main()
