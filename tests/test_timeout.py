"""The per-test timeout (pyproject's [tool.pytest.ini_options] timeout) turns a deadlock into a failure."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_deadlocked_test_is_killed_and_fails(tmp_path):
    """A test that waits on a future nothing will ever resolve (as an op whose dependency never runs would) is
    stopped by the suite's timeout: pytest exits non-zero and reports the timeout, long before the wait would end."""
    (tmp_path / "test_stuck.py").write_text(textwrap.dedent("""
        from concurrent.futures import Future

        def test_waits_forever():
            Future().result(timeout=600)
    """))
    # the repository's own ini options, with the limit lowered so this check is quick
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
                           os.path.join(REPO, "pyproject.toml"), "--rootdir", str(tmp_path), "-o", "timeout=3",
                           str(tmp_path / "test_stuck.py")], capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Timeout" in out and "test_waits_forever" in out, out[-2000:]
    assert took < 60


def test_the_suite_has_a_per_test_timeout():
    import tomllib
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        opts = tomllib.load(f)["tool"]["pytest"]["ini_options"]
    assert 0 < int(opts["timeout"]) <= 300 and opts["timeout_method"] in ("thread", "signal")
