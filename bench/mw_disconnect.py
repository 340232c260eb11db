"""How fast an idle detached stream's departed client is noticed, per server.

For each server that exposes the connection, opens ``/idle`` streams of
tests/mw_apps.py, leaves each (FIN, then RST), and reports the time from the
client's close to the server-side ``on_close`` (both clocks are this host's).

Run: python -m bench.mw_disconnect [ROUNDS]   (from the repository root)
"""

from __future__ import annotations

import statistics
import sys
import time

from tests.client import Stream, event_times, events, wait_until
from tests.servers import ServerProcess

SERVERS = ("detach-server", "gunicorn-gevent", "gunicorn-gthread", "waitress")


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    for kind in SERVERS:
        with ServerProcess(kind, "tests.mw_apps:app") as server:
            for how in ("close", "reset"):
                latencies = []
                for i in range(rounds):
                    key = f"{how}{i}"
                    stream = Stream(server.port, f"/idle?key={key}")
                    if not wait_until(lambda key=key: events(server.port, key) == ["opened"]):
                        raise RuntimeError(f"{kind}: the stream never opened")
                    left = time.time()
                    stream.reset() if how == "reset" else stream.close()
                    if not wait_until(lambda key=key: len(events(server.port, key)) == 2, 5):
                        raise RuntimeError(f"{kind}: the departure was not noticed within 5 s")
                    latencies.append(event_times(server.port, key)["outcome disconnected"] - left)
                print(
                    f"{kind:17} {how:5}: median {statistics.median(latencies) * 1000:6.1f} ms, "
                    f"max {max(latencies) * 1000:6.1f} ms over {rounds}"
                )


if __name__ == "__main__":
    main()
