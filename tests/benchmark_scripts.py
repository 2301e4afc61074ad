"""Load a script of benchmarks/ as a module, for the tests of its pure parts (the scripts are not a package)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(filename: str, *, benchmarks_on_path: bool = False):
    """``benchmarks/<filename>`` as a fresh module; ``benchmarks_on_path``: for scripts that import their siblings."""
    if benchmarks_on_path:
        sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"{Path(filename).stem}_under_test", BENCHMARKS / filename)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        if benchmarks_on_path:
            sys.path.remove(str(BENCHMARKS))
