"""The scenarios, their sizes per profile, and how one of them is measured.

A scenario function measures one target once (one repeat) and returns
``{case: metrics}``, e.g. ``{"64B": {...}, "16KiB": {...}}``. Each starts
its own server, so no measurement inherits another's heap or sockets.

Profiles: ``full`` (the figures to publish), ``quick`` (under 3 minutes for
all targets), ``smoke`` (seconds; what the test suite runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench import harness
from bench.targets import BURST, FANOUT, IDLE, LONGPOLL, THROUGHPUT, XTHREAD

ORDER = (THROUGHPUT, FANOUT, IDLE, LONGPOLL, BURST, XTHREAD)


@dataclass(frozen=True)
class Profile:
    name: str
    repeats: int
    throughput: tuple[tuple[int, int], ...]  # (chunk size, chunk count)
    fanout_c: tuple[int, ...]
    fanout_n: int
    idle_c: tuple[int, ...]
    longpoll_window_s: float
    longpoll_warmup_s: float
    # 200 pollers answered every 10 ms: at most 20 000 polls/s, which the
    # fastest targets reach, so there the rate ties them and only the server
    # CPU per poll tells them apart. 800 pollers (80 000 polls/s) saturate
    # every target's one core: the rate itself is the comparison.
    longpoll_pollers: tuple[int, ...] = (200, 800)
    xthread_rate_n: int = 100_000
    xthread_wake_n: int = 200
    xthread_sleep_ms: float = 5.0
    fanout_interval_ms: int = 100  # one broadcast every 100 ms
    longpoll_interval_ms: int = 10  # one message every 10 ms
    notes: tuple[str, ...] = field(default=())


PROFILES = {
    "full": Profile(
        "full", 3, ((64, 200_000), (16384, 20_000)), (100, 1000, 5000), 50, (1000, 5000), 5.0, 1.0
    ),
    "quick": Profile(
        "quick",
        1,
        ((64, 50_000), (16384, 5_000)),
        (100, 1000, 5000),
        10,
        (1000,),
        2.0,
        0.5,
        xthread_rate_n=20_000,
        xthread_wake_n=50,
    ),
    "smoke": Profile(
        "smoke",
        1,
        ((64, 2_000),),
        (20,),
        3,
        (50,),
        0.5,
        0.2,
        longpoll_pollers=(20,),
        xthread_rate_n=500,
        xthread_wake_n=5,
        xthread_sleep_ms=2.0,
    ),
}


def disturbance(s: harness.Sample) -> dict[str, float]:
    """The client's CPU and the share of the machine other processes used."""
    return {"client_cpu_s": s.client_cpu, "foreign_cpu_share": s.foreign_share}


def size_label(size: int) -> str:
    return f"{size // 1024}KiB" if size >= 1024 and size % 1024 == 0 else f"{size}B"


def throughput(target: str, p: Profile) -> dict[str, dict[str, Any]]:
    out = {}
    with harness.server(target) as srv:
        for size, n in p.throughput:
            res, s = harness.run_client(srv, {"kind": "throughput", "n": n, "size": size}, 60)
            cpu = s.cpu_done - s.cpu_ready
            out[size_label(size)] = {
                **res,
                "server_cpu_s": cpu,
                "cpu_s_per_mb": cpu / res["payload_mb"],
                "server": srv.info,
                **disturbance(s),
            }
    return out


def fanout(target: str, p: Profile) -> dict[str, dict[str, Any]]:
    out = {}
    with harness.server(target) as srv:
        for c in p.fanout_c:
            job = {"kind": "fanout", "c": c, "n": p.fanout_n, "interval_ms": p.fanout_interval_ms}
            res, s = harness.run_client(srv, job, 60 + c / 100)
            cpu = s.cpu_done - s.cpu_ready
            out[f"C={c}"] = {
                **res,
                "server_cpu_s": cpu,
                "server_us_per_msg": cpu / max(1, res["received"]) * 1e6,
                "server_rss_mib": s.rss_ready / 2**20,
                "server": srv.info,
                **disturbance(s),
            }
    return out


def idle(target: str, p: Profile) -> dict[str, dict[str, Any]]:
    out = {}
    for c in p.idle_c:
        with harness.server(target) as srv:
            # Warm up first: the first requests load code paths and grow
            # pools once per process, which is not a per-stream cost.
            harness.run_client(srv, {"kind": "idle", "c": 20}, 30)
            time.sleep(0.2)
            res, s = harness.run_client(srv, {"kind": "idle", "c": c}, 60 + c / 100, settle=0.5)
            grown = s.rss_ready - s.rss_before
            out[f"C={c}"] = {
                **res,
                "rss_before_mib": s.rss_before / 2**20,
                "rss_after_mib": s.rss_ready / 2**20,
                "kib_per_stream": grown / 1024 / max(1, res["connected"]),
                "server": srv.info,
                **disturbance(s),
            }
    return out


def longpoll(target: str, p: Profile, path: str = "/poll") -> dict[str, dict[str, Any]]:
    out = {}
    for pollers in p.longpoll_pollers:
        job = {
            "kind": "longpoll",
            "path": path,
            "pollers": pollers,
            "window_s": p.longpoll_window_s,
            "warmup_s": p.longpoll_warmup_s,
            "interval_ms": p.longpoll_interval_ms,
        }
        with harness.server(target) as srv:
            res, s = harness.run_client(srv, job, 60)
            out[f"P={pollers}"] = {
                **res,
                "ceiling_per_s": pollers * 1000 / p.longpoll_interval_ms,
                "server_cpu_s": s.cpu_done - s.cpu_ready,
                "server_us_per_poll": (s.cpu_done - s.cpu_ready) / max(1, res["polls_total"]) * 1e6,
                "server": srv.info,
                **disturbance(s),
            }
    return out


def burst(target: str, p: Profile) -> dict[str, dict[str, Any]]:
    """Long-polling through each target's hub, answered as JSON (``/lpoll``).

    Every publish answers every pending poll at once: for ``wsgi_detach`` the
    docs' way (``long_poll(hub, ...)`` behind ``DetachMiddleware`` on
    ``DetachServer``, ``hub.publish`` per message), for the peers their
    framework's JSON response to an awaited message.
    """
    return longpoll(target, p, "/lpoll")


def xthread(target: str, p: Profile) -> dict[str, dict[str, Any]]:
    out = {}
    with harness.server(target) as srv:
        for case, n, sleep_ms in (
            ("rate", p.xthread_rate_n, 0.0),
            ("wake-up", p.xthread_wake_n, p.xthread_sleep_ms),
        ):
            res, s = harness.run_client(srv, {"kind": "xthread", "n": n, "sleep_ms": sleep_ms}, 60)
            out[case] = {
                **res,
                "sleep_ms": sleep_ms,
                "server_cpu_s": s.cpu_done - s.cpu_ready,
                "server": srv.info,
                **disturbance(s),
            }
    return out


MEASURE: dict[str, Callable[[str, Profile], dict[str, dict[str, Any]]]] = {
    THROUGHPUT: throughput,
    FANOUT: fanout,
    IDLE: idle,
    LONGPOLL: longpoll,
    BURST: burst,
    XTHREAD: xthread,
}
