"""`blockfit calibrate` under torchrun measures the all-reduce between its processes (gloo on CPU here) and puts
the bus bandwidth into the hardware profile; with one process there is nothing to measure."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from runtime.calibrate import measure_collective
from runtime.dist import World

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = r"""
import json, sys
from runtime.calibrate import measure_collective
from runtime.dist import from_env
print(json.dumps(measure_collective(from_env(), "cpu", [1 << 16, 1 << 20], 2)))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_measures_nothing():
    assert measure_collective(World(), "cpu", [1 << 20], 2) is None


def test_two_gloo_processes_agree_on_a_positive_bus_bandwidth():
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=ROOT)
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    got = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert got[0] == got[1]                 # the slowest rank's time, so every rank reports the same figure
    g = got[0]
    assert g["backend"] == "gloo" and g["world"] == 2 and g["local_world"] == 2
    assert set(g["bus_gbps"]) == {str(1 << 16), str(1 << 20)}
    assert all(0 < v < 1e4 for v in g["bus_gbps"].values())
    # wire bytes per CPU second: positive and below a TB/s (no core copies that fast); a size whose calls took
    # less CPU time than the clock resolves is left out, never reported as infinite
    assert set(g["cpu_gbps"]) <= {str(1 << 16), str(1 << 20)}
    assert all(0 < v < 1e3 for v in g["cpu_gbps"].values())
