"""benchmarks/grammar_masks.py with a tiny batch: it runs, walks only allowed tokens and writes its figures."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "grammar_masks.py"


def test_a_tiny_batch_is_measured(tmp_path):
    out = tmp_path / "masks.json"
    command = [sys.executable, str(SCRIPT), "--rows", "3", "--steps", "4", "--peer", "none", "--output-json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["workload"] for row in rows] == ["json schema", "json schema, unbounded strings"]
    for row in rows:
        assert row["library"].startswith("ondo (llguidance") and row["fill_ms"] > 0 and row["accept_ms"] > 0
        assert row["vs_ondo"] == 1.0


def test_thread_and_lane_counts_are_swept_and_restored(tmp_path):
    out = tmp_path / "masks.json"
    command = [sys.executable, str(SCRIPT), "--rows", "4", "--steps", "3", "--peer", "none", "--threads", "1,2",
               "--lanes", "1,2", "--output-json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["threads"], row["lanes"]) for row in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)] * 2
    assert all(row["fill_ms"] > 0 for row in rows) and rows[0]["vs_ondo"] == 1.0
