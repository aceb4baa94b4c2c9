"""benchmarks/tensor_parallel.py on the CPU (gloo) with tiny workloads: each size runs in its own process and
the table compares them figure by figure."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tensor_parallel.py"


@pytest.mark.slow
def test_two_sizes_side_by_side(tmp_path):
    command = [sys.executable, str(SCRIPT), "--models", "tiny-llama", "--tp-sizes", "1", "2", "--smoke",
               "--device", "cpu", "--dtype", "float32", "--output-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ERROR" not in done.stderr, done.stderr[-3000:]   # e.g. a worker's normal exit taken for a death
    record = json.loads((tmp_path / "tp-tiny-llama.json").read_text())
    rows = {row["metric"]: row for row in record["summary"]}
    for metric in ("single decode tok/s", "batch output tok/s"):
        row = rows[metric]
        assert row["TP=1"] > 0 and row["TP=2"] > 0
        assert row["TP=2 / TP=1"] == pytest.approx(row["TP=2"] / row["TP=1"])
    assert set(record["results"]) == {"1", "2"} and all("error" not in r for r in record["results"].values())
