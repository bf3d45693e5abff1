"""The core imports no TensorFlow and no Keras: the search, the rules' dimension tables, the analytic
cost model, memory, volume and the planner's arithmetic (reading a Keras model aside)."""

import pathlib
import subprocess
import sys

CORE = ["keras_lwp", "keras_lwp.layout_search", "keras_lwp.relayout_path", "keras_lwp.config", "keras_lwp.mesh",
        "keras_lwp.layers", "keras_lwp.cost.model", "keras_lwp.cost.comm", "keras_lwp.cost.memory",
        "keras_lwp.cost.volume", "keras_lwp.planner", "keras_lwp.strategy"]


def test_the_core_imports_without_tensorflow():
    code = "; ".join([f"import {name}" for name in CORE] + [
        "import sys",
        "loaded = sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)",
        "print(','.join(loaded))",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing the core loaded {result.stdout.strip()}"


def test_this_tier_runs_without_tensorflow():
    """The fast tier (python -m pytest tests/pure) runs its tests without ever importing TensorFlow."""
    root = pathlib.Path(__file__).parents[2]
    code = ("import sys, pytest; "  # -n 0: in this process, not in xdist workers the check could not see
            "code = pytest.main(['-q', '-n', '0', '-p', 'no:cacheprovider', 'tests/pure', "
            "'--ignore=tests/pure/test_imports.py']); "
            "print('LOADED' if 'tensorflow' in sys.modules else 'CLEAN'); sys.exit(int(code))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stdout[-2000:]
    assert result.stdout.strip().endswith("CLEAN"), "the pure tier imported TensorFlow"
