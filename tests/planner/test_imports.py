"""What planning a catalog model imports: a third of the plan command's time was imports it did not need.

OR-Tools' cp_model imports pandas at its top for helpers the planner never calls (planner.ilp._cp_model keeps it
out), and catalog models ship their profiles so that no torch is needed. Each check runs in a fresh interpreter.
"""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_a_plan_imports_neither_pandas_nor_torch():
    out = _run(
        "import sys\n"
        "from tools.cli import plan_main\n"
        "sys.argv = ['plan', '--model', '1b', '--gpu', 'rtx4090', '--vram', '24', '--json']\n"
        "import contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        plan_main()\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, e.code\n"
        "print(sorted(m for m in ('pandas', 'torch', 'transformers', 'ortools.sat.python.cp_model')"
        " if m in sys.modules))\n")
    assert out == "['ortools.sat.python.cp_model']"   # the solver ran, and nothing else heavy came with it


def test_pandas_imported_after_the_solver_is_the_real_one():
    """The stand-in that served cp_model's import is gone from sys.modules: pandas works for whoever needs it."""
    out = _run(
        "from planner import ilp\n"
        "cp_model = ilp._cp_model()\n"
        "import sys\n"
        "assert 'pandas' not in sys.modules\n"
        "import pandas\n"
        "print(pandas.DataFrame({'a': [1, 2]})['a'].sum(), cp_model.CpModel().new_int_var(0, 3, 'x').name)\n")
    assert out == "3 x"


def test_the_solver_module_is_the_same_with_pandas_loaded_first():
    out = _run(
        "import pandas\n"
        "from planner import ilp\n"
        "from ortools.sat.python import cp_model\n"
        "print(ilp._cp_model() is cp_model, cp_model.pd is pandas)\n")
    assert out == "True True"
