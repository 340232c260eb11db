"""``python -m bench.scaleout --smoke`` runs end to end and writes the JSON it promises.

No timing is asserted (see tests/test_bench_smoke.py for why); what is
asserted is what must hold at any speed: nothing lost or doubled, and one
receiving connection per serving process in the broker's setup against one
per client in the peer design.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis_server import require_redis
from tests.servers import CHILD_ENV, ROOT


@pytest.mark.timeout(240)
def test_smoke_run(tmp_path: Path) -> None:
    require_redis()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scaleout", "--smoke", "--results-dir", str(tmp_path)],
        cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=230, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "scaleout-latest.json").read_text())
    for mode in ("inprocess", "redis", "peer"):
        for label in ("10 streams", "2 x large"):
            run = results[f"{mode} / {label}"]
            assert run["lost"] == 0 and run["duplicates"] == 0, (mode, label, run)
            assert run["p99_ms"] is not None
    assert results["redis / 2 x large"]["receiving_connections"] == 2
    peer = results["peer / 2 x large"]
    assert peer["receiving_connections"] == peer["streams"]
    rates = results["publish"]
    assert rates["end_to_end_lost"] == 0 and rates["end_to_end_duplicates"] == 0
    assert rates["sequential_per_s"] > 0 and rates["pipelined_per_s"] > 0
