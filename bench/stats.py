"""Summaries: percentiles of one run, medians across repeats."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100.0 * len(sorted_values) + 0.5)))
    return float(sorted_values[rank - 1])


def latency_summary(ns: Iterable[int]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds of latencies given in nanoseconds."""
    values = sorted(ns)
    ms = [v / 1e6 for v in values]
    return {
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": ms[-1] if ms else float("nan"),
        "samples": len(ms),
    }


def median_metrics(runs: list[dict[str, object]]) -> dict[str, float]:
    """Median of every numeric metric over repeats (a key missing in a run is skipped)."""
    keys = {k for run in runs for k, v in run.items() if isinstance(v, (int, float))}
    out: dict[str, float] = {}
    for key in sorted(keys):
        values = [float(run[key]) for run in runs if isinstance(run.get(key), (int, float))]  # type: ignore[arg-type]
        out[key] = statistics.median(values)
    return out
