"""The benchmark harness runs end to end at smoke size and writes the JSON it promises.

It runs ``python -m bench --smoke`` in a subprocess on three targets (ours,
the queue-body baseline, the raw limit) and checks the shape of the
results and that no message was lost. It asserts no timing: numbers from
a shared CI machine mean nothing, and a benchmark test that fails on a slow
day teaches people to ignore it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["wsgi_detach", "queue_body", "raw_limit"]


def run_module(*args: str) -> str:
    """``python -m ARGS`` from the repository root, inside the tests' timeout; its stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.timeout(120)
def test_smoke_run_writes_expected_json(tmp_path: Path) -> None:
    stdout = run_module(
        "bench", "--smoke", "--targets", ",".join(TARGETS), "--results-dir", str(tmp_path)
    )
    assert "/queue_body" in stdout and "/raw_limit" in stdout  # ratio columns
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert len(list(tmp_path.glob("bench-*.json"))) == 1

    meta = latest["meta"]
    for key in ("machine", "profile", "repeats", "targets", "placement", "duration_s"):
        assert key in meta, key
    assert meta["profile"] == "smoke"
    assert {"cpu", "cores", "python", "packages"} <= set(meta["machine"])
    assert meta["targets"] == TARGETS, meta.get("skipped")

    results = latest["results"]
    assert set(results) == {"throughput", "fanout", "idle", "longpoll", "xthread"}
    expected_metrics = {
        "throughput": {"chunks_per_s", "mb_per_s", "cpu_s_per_mb"},
        "fanout": {"p50_ms", "p99_ms", "max_ms", "lost"},
        "idle": {"kib_per_stream"},
        "longpoll": {"polls_per_s"},
        "xthread": {"chunks_per_s", "p50_ms", "p99_ms", "lost"},
    }
    for scenario, cases in results.items():
        assert cases and "*" not in cases, (scenario, cases.get("*"))
        for case, per_target in cases.items():
            players = {"wsgi_detach", "queue_body"} if scenario == "xthread" else set(TARGETS)
            assert set(per_target) == players, (scenario, case)
            for target, entry in per_target.items():
                assert "failed_runs" not in entry, (scenario, case, target, entry["runs"])
                assert expected_metrics[scenario] <= set(entry["median"]), (scenario, target)

    for per_target in [*results["fanout"].values(), *results["xthread"].values()]:
        for target, entry in per_target.items():
            assert entry["median"]["lost"] == 0, (target, entry["runs"])


@pytest.mark.timeout(120)
def test_mem_idle_prints_bytes_per_stream_and_where_they_go() -> None:
    """``python -m bench.mem_idle`` at a tiny size: its table, owners and lines."""
    out = run_module("bench.mem_idle", "--streams", "20", "--top", "5")
    assert "RSS KiB" in out and "server KiB" in out
    for target in ("wsgi_detach", "queue_body"):
        assert f"== {target}: server side by owner" in out
        assert f"== {target}: top 5 server-side lines" in out
    assert "wsgi_detach/_" in out  # some of our own lines made the wsgi_detach top 5
