"""benchmarks/structured.py with a tiny batch on the CPU: it runs every workload, keeps each request to
its length, and compiles the distinct schemas it reports."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "structured.py"


def test_a_tiny_batch_is_measured(tmp_path):
    out = tmp_path / "structured.json"
    # smollm2-135m: random weights with the built-in tokenizer's vocabulary (49,152 tokens)
    command = [sys.executable, str(SCRIPT), "--model", "smollm2-135m", "--load-format", "dummy", "--batch-size", "3",
               "--output-len", "6", "--num-schemas", "2", "--num-iters", "1", "--output-json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    rows = {row["workload"]: row for row in figures["rows"]}
    assert list(rows) == ["unconstrained", "json schema", "json schema, unbounded strings"]
    for row in rows.values():
        assert row["requests"] == 3 and row["output_tokens"] == 18 and row["all_ran_to_output_len"]
    assert rows["unconstrained"]["vs_unconstrained"] == 1.0
    assert figures["num_schemas"] == 2 and figures["cache_misses"] == 2 and figures["cache_hits"] == 2
    assert figures["compile_fresh_p50_ms"] > figures["compile_cached_p50_ms"] > 0
