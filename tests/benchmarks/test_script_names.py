"""A benchmark runs as `python benchmarks/NAME.py`, which puts benchmarks/ first on sys.path: a module there
named like an installed one hides it from every library in the process (transformers 5.25 imports the hub
`kernels` package, which a benchmarks/kernels.py once hid, failing every benchmark that loads a model)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_no_benchmark_module_hides_an_installed_one():
    names = sorted(p.stem for p in BENCHMARKS.iterdir()
                   if (p.suffix == ".py" or p.is_dir()) and not p.name.startswith(("_", ".")))
    assert "latency" in names and "peers" in names
    # -I: this interpreter's installed modules and standard library, not the checkout's folders
    found = subprocess.run([sys.executable, "-I", "-c", "import importlib.util, sys\n"
                            "print([n for n in sys.argv[1:] if importlib.util.find_spec(n) is not None])", *names],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert found == "[]", f"benchmarks/ modules named like installed modules: {found}"
