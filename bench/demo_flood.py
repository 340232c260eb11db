"""The demo chat's memory under a flood of rooms and messages, as a client can cause it.

Starts ``python -m wsgi_detach demo`` on a free port, reads its RSS, posts
``--rooms`` rooms with ``--messages`` messages of ``--size`` characters each
(4-byte characters: the costliest a post can hold) over one keep-alive
connection, then reads its RSS again. The chat charges every room and kept
message against a cap (32 MiB by default), so the growth stays near that cap
however long the flood goes on.

    python -m bench.demo_flood --rooms 3000 --messages 1 --size 10
    python -m bench.demo_flood --rooms 200 --messages 200 --size 2000
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import re
import subprocess
import sys
import time


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=200)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--size", type=int, default=2000, help="characters per message")
    args = parser.parse_args()
    with subprocess.Popen(
        [sys.executable, "-m", "wsgi_detach", "demo", "--port", "0", "--no-access-log"],
        stdout=subprocess.PIPE, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            port = int(re.search(r":(\d+) ", proc.stdout.readline()).group(1))  # type: ignore[union-attr]
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            before = rss_kib(proc.pid)
            body = json.dumps({"nick": "flood", "text": "\U0001f600" * args.size},
                              ensure_ascii=False).encode()
            statuses: collections.Counter[int] = collections.Counter()
            started = time.monotonic()
            for room in range(args.rooms):
                for _ in range(args.messages):
                    conn.request("POST", f"/api/rooms/flood{room}/messages", body,
                                 {"Content-Type": "application/json"})
                    response = conn.getresponse()
                    response.read()
                    statuses[response.status] += 1
            elapsed = time.monotonic() - started
            after = rss_kib(proc.pid)
            print(f"{sum(statuses.values())} posts in {elapsed:.1f} s, statuses {dict(statuses)}")
            print(f"RSS {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB "
                  f"(+{(after - before) / 1024:.1f} MiB; the cap is 32 MiB)")
        finally:
            proc.terminate()


if __name__ == "__main__":
    main()
