"""docs/devices.md's two-process command (several hosts) on the loopback address: it matches one
process, resumes after both are killed, and a process killed alone stops the other with one line.
(Apart from tests/test_run.py so that pytest-xdist runs the two files side by side.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from _runs import ENV, SMALL
from _runs import load as _load


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(out: str, port: int, extra: list[str]) -> list[subprocess.Popen]:
    """docs/devices.md's commands (several hosts), both on the loopback address."""
    procs = []
    for i in (0, 1):
        env = {**ENV, "JAX_NUM_CPU_DEVICES": "2", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen([sys.executable, "-m", "sae_jax.cli", *SMALL, *extra, "--distributed",
                                       "--out", out], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.slow
def test_two_processes_on_loopback_match_one_process_and_resume(tmp_path):
    args = ["--steps", "400", "--checkpoint-every", "100", "--check-every", "100"]
    one = str(tmp_path / "one")
    r = subprocess.run([sys.executable, "-m", "sae_jax.cli", *SMALL, *args, "--out", one],
                       capture_output=True, text=True, timeout=600, env={**ENV, "JAX_NUM_CPU_DEVICES": "1"})
    assert r.returncode == 0, r.stderr
    two = str(tmp_path / "two")
    procs = _two_processes(two, _port(), args)
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert "wrote" in outs[0][0] and "wrote" not in outs[1][0]  # process 0 alone writes
    (ra, da), (rb, db) = _load(one), _load(two)
    for k in da:
        np.testing.assert_allclose(da[k], db[k], atol=1e-4, err_msg=k)
    for ca, cb in zip(ra["cells"], rb["cells"]):
        for key in ("mmcs", "recon_loss", "l0", "fvu"):
            assert ca[key] == pytest.approx(cb[key], rel=1e-4, abs=1e-6), key
        assert ca["dead"] == cb["dead"]
    assert {k: ra["suggested"][k] for k in ("ratio", "l1", "cell")} == \
           {k: rb["suggested"][k] for k in ("ratio", "l1", "cell")}

    # Killed both mid-run, then --resume on both continues to the same result.
    killed = str(tmp_path / "killed")
    long = ["--steps", "600", "--checkpoint-every", "100", "--check-every", "100"]
    procs = _two_processes(killed, _port(), long)
    ckpts = os.path.join(killed, "checkpoints", "grid")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.isdir(ckpts) and "300" in os.listdir(ckpts)):
        time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not os.path.exists(os.path.join(killed, "results.json"))
    procs = _two_processes(killed, _port(), [*long, "--resume"])
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert _load(killed)[0]["config"]["steps"] == 600


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])  # 0 hosts the coordination service
def test_killing_one_process_stops_the_other_with_one_line(tmp_path, victim):
    out = str(tmp_path / "run")
    procs = _two_processes(out, _port(), ["--steps", "20000", "--checkpoint-every", "100",
                                          "--check-every", "100"])
    ckpts = os.path.join(out, "checkpoints", "grid")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.isdir(ckpts) and "200" in os.listdir(ckpts)):
        time.sleep(0.2)
    procs[victim].send_signal(signal.SIGKILL)
    t0 = time.time()
    survivor = procs[1 - victim]
    _, err = survivor.communicate(timeout=150)
    assert survivor.returncode == 1 and time.time() - t0 < 120
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "another process" in lines[0], err[-3000:]

