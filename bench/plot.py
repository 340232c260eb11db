"""Render a results JSON to a PNG: ``python -m bench.plot [results.json] [out.png]``.

Two panels answer the two questions people ask first: how fan-out latency
grows with the number of held streams (p99 against C, one line per
target, log-log), and how fast one stream goes (chunks/s per target for
each chunk size). Defaults: ``bench/results/latest.json`` to
``bench/results/bench.png``. Uses matplotlib's Agg backend: no display.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _fanout_series(results: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for case, targets in results.get("fanout", {}).items():
        if not case.startswith("C="):
            continue
        c = int(case[2:])
        for target, entry in targets.items():
            p99 = entry.get("median", {}).get("p99_ms")
            if p99 is not None:
                series.setdefault(target, []).append((c, p99))
    return {t: sorted(points) for t, points in series.items()}


def render(source: Path, out: Path) -> Path:
    """Draw ``source`` (a results JSON) into ``out``; return ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(source.read_text())
    results = doc["results"]
    meta = doc.get("meta", {})
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))

    for target, points in sorted(_fanout_series(results).items()):
        xs, ys = zip(*points)
        style = "--" if target in ("queue_body", "raw_limit") else "-"
        left.plot(xs, ys, style, marker="o", label=target)
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("held streams C")
    left.set_ylabel("p99 delivery latency (ms)")
    left.set_title("fan-out: one broadcast every 100 ms")
    left.grid(True, which="both", alpha=0.3)
    if left.lines:
        left.legend(fontsize=8)

    cases = [c for c in results.get("throughput", {}) if not c.startswith("*")]
    targets = sorted({t for c in cases for t in results["throughput"][c]})
    width = 0.8 / max(1, len(cases))
    for i, case in enumerate(cases):
        values = [
            results["throughput"][case].get(t, {}).get("median", {}).get("chunks_per_s", 0) / 1000
            for t in targets
        ]
        right.bar([x + i * width for x in range(len(targets))], values, width, label=case)
    right.set_xticks([x + width * (len(cases) - 1) / 2 for x in range(len(targets))])
    right.set_xticklabels(targets, rotation=30, ha="right", fontsize=8)
    right.set_ylabel("thousand chunks/s (one stream)")
    right.set_title("throughput")
    right.grid(True, axis="y", alpha=0.3)
    if cases:
        right.legend(fontsize=8)

    machine = meta.get("machine", {})
    fig.suptitle(
        f"wsgi_detach bench ({meta.get('profile', '?')}, {meta.get('repeats', '?')} repeat(s), "
        f"medians) on {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
        f"Python {machine.get('python', '?')}",
        fontsize=10,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    source = Path(args[0]) if args else RESULTS / "latest.json"
    out = Path(args[1]) if len(args) > 1 else source.parent / "bench.png"
    print(render(source, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
