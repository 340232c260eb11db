"""The orchestrator behind ``python -m bench``: options, the run loop, output.

Method: for each repeat, each scenario, every target in turn; the target
order rotates by one each repeat (round-robin), so slow drift of the
machine (thermal, page cache, other tenants) spreads over all targets
instead of landing on whichever ran last. Reported values are medians of
the repeats.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import harness, report, scenarios, system
from bench.targets import DEFAULT, TARGETS, unavailable

RESULTS = Path(__file__).resolve().parent / "results"
#: Share of the machine's CPU used by others just before the run above
#: which the run warns that it is not alone.
LOADED = 0.05


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_const",
        const="quick",
        dest="profile",
        help="small counts, 1 repeat: under 3 minutes",
    )
    size.add_argument(
        "--smoke",
        action="store_const",
        const="smoke",
        dest="profile",
        help="tiny sizes (seconds): for the test suite, not for numbers",
    )
    p.set_defaults(profile="full")
    p.add_argument(
        "--only",
        default=",".join(scenarios.ORDER),
        help=f"comma-separated scenarios (default all: {','.join(scenarios.ORDER)})",
    )
    p.add_argument(
        "--targets",
        default=",".join(DEFAULT),
        help=f"comma-separated targets (default {','.join(DEFAULT)}; all: {','.join(TARGETS)})",
    )
    p.add_argument("--repeats", type=int, default=None, help="override the profile's repeats")
    p.add_argument(
        "--retry-disturbed",
        type=int,
        default=0,
        metavar="N",
        help="re-take a measurement up to N times while other processes took over "
        f"{report.DISTURBED * 100:.0f}%% of the CPU during it; the least disturbed attempt is kept",
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--plot", action="store_true", help="also render bench.png")
    p.add_argument("--list", action="store_true", help="list targets and scenarios, then exit")
    return p.parse_args(argv)


def split(value: str, allowed: list[str] | tuple[str, ...], what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (known: {', '.join(allowed)})")
    return names


def rotate(items: list[str], k: int) -> list[str]:
    if not items:
        return items
    k %= len(items)
    return items[k:] + items[:k]


def disturbed(cases: dict[str, dict[str, Any]]) -> float:
    """The worst share of CPU other processes took during any case of a measurement."""
    return max((float(m.get("foreign_cpu_share", 0.0)) for m in cases.values()), default=0.0)


def measure(
    scenario: str, target: str, profile: scenarios.Profile, retries: int
) -> dict[str, dict[str, Any]]:
    """One measurement, re-taken up to ``retries`` times while other load disturbed it.

    Keeps the least disturbed attempt; a failure is returned as the case ``*``.
    """
    best: dict[str, dict[str, Any]] | None = None
    for attempt in range(retries + 1):
        try:
            cases = scenarios.MEASURE[scenario](target, profile)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            return {"*": {"error": f"{type(exc).__name__}: {exc}"[:2000]}}
        for metrics in cases.values():
            metrics["attempt"] = attempt + 1
        if best is None or disturbed(cases) < disturbed(best):
            best = cases
        if disturbed(best) <= report.DISTURBED:
            break
    assert best is not None
    return best


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for t in TARGETS.values():
            print(f"{t.name:<20} {','.join(sorted(t.scenarios)):<40} {t.summary}")
        return 0
    profile = scenarios.PROFILES[args.profile]
    repeats = args.repeats or profile.repeats
    wanted = split(args.only, scenarios.ORDER, "scenario")
    targets = split(args.targets, list(TARGETS), "target")
    skipped = {t: why for t in targets if (why := unavailable(t))}
    runnable = [t for t in targets if t not in skipped]
    system.raise_nofile()

    machine = system.machine()
    server_core, client_core = harness.placement()
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores; server on core {server_core}, "
        f"client on core {client_core}"
    )
    print(
        f"python {machine['python']}; "
        + ", ".join(f"{k} {v}" for k, v in machine["packages"].items() if v)
    )  # type: ignore[union-attr]
    print(
        f"profile {profile.name}, {repeats} repeat(s); scenarios {','.join(wanted)}; "
        f"targets {','.join(runnable)}"
    )
    for t, why in skipped.items():
        print(f"skipping {t}: {why}")

    load_before = os.getloadavg()
    others = harness.busy_share(1.0)
    if others > LOADED:
        print(
            f"warning: other processes used {others:.0%} of the CPU in the second before the "
            "run; rows they disturbed are marked '!'"
        )
    raw: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    t_start = time.monotonic()
    for rep in range(repeats):
        for scenario in [s for s in scenarios.ORDER if s in wanted]:
            players = [t for t in runnable if scenario in TARGETS[t].scenarios]
            for target in rotate(players, rep):
                t0 = time.monotonic()
                cases = measure(scenario, target, profile, args.retry_disturbed)
                for case, metrics in cases.items():
                    raw.setdefault(scenario, {}).setdefault(case, {}).setdefault(target, []).append(
                        metrics
                    )
                print(
                    f"  [{rep + 1}/{repeats}] {scenario:<10} {target:<18} "
                    f"{time.monotonic() - t0:5.1f}s  other load {disturbed(cases):4.0%}"
                    + ("  ERROR" if "*" in cases else ""),
                    flush=True,
                )

    results = report.summarise(raw)
    order = [t for t in TARGETS if t in runnable]
    print(report.table(results, order))
    doc = {
        "meta": {
            "machine": machine,
            "profile": profile.name,
            "repeats": repeats,
            "scenarios": wanted,
            "targets": runnable,
            "skipped": skipped,
            "placement": {"server_core": server_core, "client_core": client_core},
            "loadavg_before": load_before,
            "foreign_cpu_share_before": others,
            "loadavg_after": os.getloadavg(),
            "started_utc": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - (time.monotonic() - t_start))
            ),
            "duration_s": round(time.monotonic() - t_start, 1),
            "profile_sizes": profile.__dict__,
        },
        "results": results,
    }
    path = report.write(doc, args.results_dir)
    print(f"\nwrote {path} and {args.results_dir / 'latest.json'} ({doc['meta']['duration_s']} s)")
    if args.plot:
        from bench import plot

        print(
            f"plot: {plot.render(args.results_dir / 'latest.json', args.results_dir / 'bench.png')}"
        )
    return 0
