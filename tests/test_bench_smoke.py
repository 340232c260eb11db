"""The benchmark harness runs end to end at smoke size and writes the JSON it promises.

It runs ``python -m bench --smoke`` in a subprocess on three targets (ours,
the queue-body baseline, the raw limit) and checks the shape of the
results and that no message was lost. It asserts no timing: numbers from
a shared CI machine mean nothing, and a benchmark test that fails on a slow
day teaches people to ignore it.
"""

from __future__ import annotations

import json
import re
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
    assert set(results) == {"throughput", "fanout", "idle", "longpoll", "burst", "xthread"}
    expected_metrics = {
        "throughput": {"chunks_per_s", "mb_per_s", "cpu_s_per_mb"},
        "fanout": {"p50_ms", "p99_ms", "max_ms", "lost"},
        "idle": {"kib_per_stream"},
        "longpoll": {"polls_per_s"},
        "burst": {"polls_per_s", "p99_ms"},
        "xthread": {"chunks_per_s", "p50_ms", "p99_ms", "lost"},
    }
    for scenario, cases in results.items():
        assert cases and "*" not in cases, (scenario, cases.get("*"))
        for case, per_target in cases.items():
            players = {
                "xthread": {"wsgi_detach", "queue_body"},
                # Only targets with a hub answer JSON long-polls.
                "burst": set(TARGETS) - {"queue_body"},
            }.get(scenario, set(TARGETS))
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


@pytest.mark.timeout(120)
def test_fanout_cpu_prints_cpu_per_delivery_with_every_message_delivered() -> None:
    """``python -m bench.fanout_cpu`` at a tiny size: one figure, and it checked delivery."""
    out = run_module("bench.fanout_cpu", "--streams", "20", "--messages", "3",
                     "--interval", "0.02", "--repeats", "1")
    assert re.fullmatch(r"now: \d+\.\d\d us of CPU per delivery \(C=20, N=3; runs: .*\)\n", out)


@pytest.mark.timeout(120)
def test_poll_objects_counts_what_a_waiting_poll_holds_and_the_collections() -> None:
    """``python -m bench.poll_objects`` at a tiny size: a count by type, then the busy phase;
    one object more per waiting poll (``--extra 1``) shows in the count."""
    def count(out: str) -> float:
        found = re.search(r"now: (\d+\.\d\d) tracked objects per waiting poll \(20 waiting\)", out)
        assert found, out
        return float(found[1])

    out = run_module("bench.poll_objects", "--polls", "20", "--seconds", "0.3")
    assert re.search(r"^now: \d+ polls in 0.3 s, .* us per poll$", out, re.MULTILINE), out
    more = run_module("bench.poll_objects", "--polls", "20", "--seconds", "0.3", "--extra", "1")
    assert count(more) - count(out) == pytest.approx(1.0, abs=0.1)
