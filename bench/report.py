"""Turn collected runs into medians, a printed table, and JSON files.

Every table carries ratios against ``queue_body`` (what people do today)
and ``raw_limit`` (what this stack can do at all), because absolute
numbers move from machine to machine while ratios mostly do not.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from bench import stats
from bench.targets import FANOUT, IDLE, LONGPOLL, THROUGHPUT, XTHREAD

REFERENCES = ("queue_body", "raw_limit")

#: Above this share of the machine's CPU used by other processes during a
#: measurement, its row is flagged: on 2 cores that is a stolen core-tenth.
DISTURBED = 0.05

#: Columns per scenario: (metric key, header, format).
COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    THROUGHPUT: [
        ("chunks_per_s", "chunks/s", "{:,.0f}"),
        ("mb_per_s", "MB/s", "{:,.1f}"),
        ("cpu_s_per_mb", "CPU-s/MB", "{:.3g}"),
        ("wire_chunks", "writes", "{:,.0f}"),
        ("tail_ms", "tail ms", "{:.1f}"),
    ],
    FANOUT: [
        ("p50_ms", "p50 ms", "{:.1f}"),
        ("p99_ms", "p99 ms", "{:.1f}"),
        ("max_ms", "max ms", "{:.1f}"),
        ("lost", "lost", "{:.0f}"),
        ("server_us_per_msg", "srv us/msg", "{:.1f}"),
    ],
    IDLE: [
        ("kib_per_stream", "KiB/stream", "{:.1f}"),
        ("connected", "streams", "{:.0f}"),
        ("rss_after_mib", "RSS MiB", "{:.0f}"),
    ],
    LONGPOLL: [
        ("polls_per_s", "polls/s", "{:,.0f}"),
        ("p50_ms", "p50 ms", "{:.1f}"),
        ("p99_ms", "p99 ms", "{:.1f}"),
        ("server_us_per_poll", "srv us/poll", "{:.0f}"),
        ("errors", "errors", "{:.0f}"),
    ],
    XTHREAD: [
        ("chunks_per_s", "chunks/s", "{:,.0f}"),
        ("p50_ms", "p50 ms", "{:.2f}"),
        ("p99_ms", "p99 ms", "{:.2f}"),
        ("lost", "lost", "{:.0f}"),
    ],
}


def headline(scenario: str, case: str) -> tuple[str, bool]:
    """(metric the ratios are taken on, whether higher is better)."""
    if scenario == XTHREAD and case != "rate":
        return "p99_ms", False
    return {
        THROUGHPUT: ("chunks_per_s", True),
        FANOUT: ("p99_ms", False),
        IDLE: ("kib_per_stream", False),
        LONGPOLL: ("polls_per_s", True),
        XTHREAD: ("chunks_per_s", True),
    }[scenario]


def summarise(raw: dict[str, dict[str, dict[str, list[dict[str, Any]]]]]) -> dict[str, Any]:
    """``raw[scenario][case][target] = [run, ...]`` → same shape with runs and medians."""
    out: dict[str, Any] = {}
    for scenario, cases in raw.items():
        out[scenario] = {}
        for case, targets in cases.items():
            out[scenario][case] = {}
            for target, runs in targets.items():
                good = [r for r in runs if "error" not in r]
                entry: dict[str, Any] = {"runs": runs, "median": stats.median_metrics(good)}
                if len(good) < len(runs):
                    entry["failed_runs"] = len(runs) - len(good)
                servers = [r["server"] for r in good if "server" in r]
                if servers:
                    entry["server"] = servers[0]
                out[scenario][case][target] = entry
    return out


def ratio(value: float | None, ref: float | None) -> str:
    if value is None or ref is None or ref == 0 or math.isnan(value) or math.isnan(ref):
        return "-"
    return f"{value / ref:.2f}x"


def table(results: dict[str, Any], order: list[str]) -> str:
    """The human-readable table: one block per (scenario, case)."""
    lines: list[str] = []
    for scenario, cases in results.items():
        for case, targets in cases.items():
            key, higher = headline(scenario, case)
            better = "higher" if higher else "lower"
            lines.append(f"\n== {scenario} {case}  (ratios on {key}, {better} is better)")
            cols = COLUMNS[scenario]
            header = f"{'target':<24}" + "".join(f"{h:>12}" for _, h, _ in cols)
            header += "".join(f"{'/' + r:>12}" for r in REFERENCES)
            lines.append(header)
            refs = {r: targets.get(r, {}).get("median", {}).get(key) for r in REFERENCES}
            for target in [t for t in order if t in targets]:
                entry = targets[target]
                med = entry["median"]
                if not med:
                    errors = [r.get("error", "") for r in entry["runs"]]
                    lines.append(f"{target:<24}  FAILED: {errors[0][:90] if errors else '?'}")
                    continue
                row = f"{target:<24}"
                for metric, _, fmt in cols:
                    value = med.get(metric)
                    row += f"{fmt.format(value) if value is not None else '-':>12}"
                row += "".join(f"{ratio(med.get(key), refs[r]):>12}" for r in REFERENCES)
                if entry.get("failed_runs"):
                    row += f"  ({entry['failed_runs']} failed)"
                foreign = med.get("foreign_cpu_share", 0.0)
                if foreign > DISTURBED:
                    row += f"  !{foreign:.0%} other load"
                lines.append(row)
    return "\n".join(lines)


def write(doc: dict[str, Any], results_dir: Path) -> Path:
    """Write a timestamped JSON file and ``latest.json``; return the former."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = results_dir / f"bench-{stamp}.json"
    text = json.dumps(doc, indent=1, sort_keys=False, default=str)
    path.write_text(text)
    (results_dir / "latest.json").write_text(text)
    return path
