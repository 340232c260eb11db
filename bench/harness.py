"""One measurement: a fresh target server, a client job, server samples between.

The server and the client run as separate processes pinned to different
cores. The orchestrator samples the server's CPU time and RSS (psutil)
when the client says it is ready and again when it reports, so CPU
figures cover exactly the measured phase.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil

from bench import system
from bench.procs import Child, ChildError

SERVER_START_TIMEOUT = 30.0
#: Shortest measured phase for which the foreign-load share is computed.
MIN_WINDOW = 0.5


def placement() -> tuple[int | None, int | None]:
    """(server core, client core): the first two usable cores, or no pinning."""
    cores = system.cores()
    if len(cores) < 2:
        return None, None
    return cores[0], cores[1]


class Server:
    """A running target server: its port, PID, self-description and psutil handle."""

    def __init__(self, child: Child, ready: dict[str, Any]) -> None:
        self.child = child
        self.port: int = ready["port"]
        self.info: dict[str, Any] = ready["info"]
        self.ps = psutil.Process(child.pid)

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)


@contextmanager
def server(target: str) -> Iterator[Server]:
    """Start ``target``'s server, yield it once it listens, stop it by PID."""
    core, _ = placement()
    args = [target] + ([] if core is None else ["--cpu", str(core)])
    child = Child("bench.server", args)
    try:
        yield Server(child, child.read_json(SERVER_START_TIMEOUT))
    finally:
        child.stop()


def busy_s() -> float:
    """The whole machine's user + system CPU-seconds so far."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system)


def busy_share(seconds: float) -> float:
    """Share of the machine's CPU that was busy over the next ``seconds``."""
    before = busy_s()
    time.sleep(seconds)
    return min(1.0, (busy_s() - before) / (seconds * (len(system.cores()) or 1)))


class Sample:
    """Server CPU and RSS at the client's ready point and at its result."""

    def __init__(self) -> None:
        self.cpu_ready = self.cpu_done = 0.0
        self.client_cpu = 0.0  # the client's CPU-seconds over the measured phase
        self.wall = 0.0  # seconds of the measured phase
        self.busy = 0.0  # whole machine's user+system CPU-seconds over the phase

    @property
    def foreign_share(self) -> float:
        """Share of the machine's CPU that neither server nor client used.

        Other processes (someone's test suite, a build) steal cores from a
        pinned benchmark; this is how a result says it was disturbed.
        Kernel softirq time is excluded from ``busy``: loopback traffic puts
        our own work there.
        """
        if self.wall < MIN_WINDOW:
            return 0.0  # psutil's 10 ms clock ticks make shorter windows meaningless
        cores = len(system.cores()) or 1
        foreign = self.busy - (self.cpu_done - self.cpu_ready) - self.client_cpu
        return max(0.0, foreign) / max(1e-9, self.wall * cores)
        self.rss_before = self.rss_ready = self.rss_done = 0


def run_client(
    srv: Server, job: dict[str, Any], timeout: float, settle: float = 0.0
) -> tuple[dict[str, Any], Sample]:
    """Run one client job against ``srv``; return its result and the server samples.

    ``settle`` seconds pass between the client's ready and the samples, for
    RSS to reflect connections the server accepted a moment ago.
    """
    _, core = placement()
    sample = Sample()
    sample.rss_before = srv.rss()
    args = [json.dumps({**job, "port": srv.port, "timeout": timeout})]
    if core is not None:
        args += ["--cpu", str(core)]
    client = Child("bench.client", args, stdin=True)
    try:
        ready = client.read_json(timeout)
        if ready.get("event") != "ready":
            raise ChildError(f"client: {ready.get('error', ready)}")
        if settle:
            time.sleep(settle)
        cps = psutil.Process(client.pid)
        sample.rss_ready = srv.rss()
        sample.cpu_ready = srv.cpu_s()
        client_t = cps.cpu_times()
        machine_t, wall_t = busy_s(), time.monotonic()
        client.send("go")
        result = client.read_json(timeout * 2)
        sample.cpu_done = srv.cpu_s()
        client_u = cps.cpu_times()
        sample.busy, sample.wall = busy_s() - machine_t, time.monotonic() - wall_t
        sample.client_cpu = client_u.user + client_u.system - client_t.user - client_t.system
        sample.rss_done = srv.rss()
        if result.get("event") != "result":
            raise ChildError(f"client: {result.get('error', result)}{client.tail()}")
        client.wait(10)
        result.pop("event")
        return result, sample
    finally:
        client.stop()
