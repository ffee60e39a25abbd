"""The grid sharded over simulated CPU devices (a subprocess with JAX_NUM_CPU_DEVICES=8)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # one subprocess compiles and trains the grid on 1, 2 and 8 devices

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "sharded_grid.py"


@pytest.fixture(scope="module")
def findings():
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_1_2_8_devices_give_the_same_dictionaries(findings):
    ref = findings["params"]["1"]
    for n in ("2", "8"):
        for i, (a, b) in enumerate(zip(findings["params"][n], ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, err_msg=f"{n} devices, cell {i}")


def test_padding_never_shows_in_results(findings):
    assert findings["padded_cells"] == {"1": [3, 3, 1, 1, 1, 1], "2": [4, 4, 2, 2, 2, 2], "8": [8] * 6}
    ref = findings["cells"]["1"]
    for n in ("2", "8"):
        cells = findings["cells"][n]
        assert [c["index"] for c in cells] == list(range(10))
        for a, b in zip(ref, cells):
            assert (a["l1"], a["dict_size"], a["dead"], a["n_resampled"]) == (b["l1"], b["dict_size"], b["dead"], b["n_resampled"])
            assert abs(a["mmcs"] - b["mmcs"]) < 1e-4


def test_cells_are_sharded_and_the_step_has_no_collectives(findings):
    assert findings["shardings"]["8"] == ["P('grid',)"] * 6
    for n, found in findings["collectives"].items():
        assert found == [], f"{n} devices: {found}"
