"""What TCP_NODELAY buys on gevent.pywsgi: N sequential small chunked responses on one
keep-alive connection, with DetachHandler's TCP_NODELAY and without it.

Run: python -m bench.mw_nodelay [N]   (from the repository root)
Prints the median and p90 per response and the total for both configurations.
"""

from __future__ import annotations

import statistics
import sys

from tests.client import keepalive_timings
from tests.servers import ServerProcess


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    for kind in ("detach-server", "detach-server-delay"):
        with ServerProcess(kind, "tests.mw_apps:app") as server:
            keepalive_timings(server.port, "/gen", 5)  # warm up
            timings = keepalive_timings(server.port, "/gen", count)
        label = "TCP_NODELAY on " if kind == "detach-server" else "TCP_NODELAY off"
        p90 = statistics.quantiles(timings, n=10)[-1]
        print(
            f"{label}: {count} responses in {sum(timings):.2f}s, "
            f"median {statistics.median(timings) * 1000:.2f} ms, p90 {p90 * 1000:.2f} ms"
        )


if __name__ == "__main__":
    main()
