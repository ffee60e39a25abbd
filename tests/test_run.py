"""The run layer: early errors close what they opened, extending a run with --resume, the
appendix grid and the package's layout (the two-process command: tests/test_distributed.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from _runs import ENV, SMALL
from _runs import load as _load

from sae_jax import checkpoint, cli, recipes


@pytest.mark.parametrize("second", [
    [],  # no checkpoint at all
    ["--lr", "0.002"],  # different arguments
    ["--steps", "50"],  # the checkpoint is past --steps
])
def test_every_early_resume_error_closes_the_checkpointer(tmp_path, monkeypatch, capsys, second):
    opened, closed = [], []
    real_init, real_close = checkpoint.Checkpointer.__init__, checkpoint.Checkpointer.close
    monkeypatch.setattr(checkpoint.Checkpointer, "__init__",
                        lambda self, *a, **k: (opened.append(self), real_init(self, *a, **k))[1])
    monkeypatch.setattr(checkpoint.Checkpointer, "close",
                        lambda self: (closed.append(self), real_close(self))[1])
    base = [*SMALL[:9], "--no-progress", "--no-figures", "--steps", "100", "--checkpoint-every", "100",
            "--out", str(tmp_path)]
    if second:
        assert cli.main(base) == 0
    assert cli.main([*base, "--resume", *second]) == 2
    assert "--resume" in capsys.readouterr().err
    assert opened and all(c in closed for c in opened)


@pytest.mark.slow
def test_refused_resume_prints_exactly_one_line(tmp_path):
    """The stray 'cannot schedule new futures after shutdown' traceback came about one run in
    seven, from Orbax's temporary-directory cleanup thread outliving the refused run."""
    tiny = ["toy", "--d", "8", "--features", "16", "--l1", "0.1", "--ratios", "1", "--steps", "100",
            "--no-progress", "--no-figures"]
    assert _run(*tiny, "--checkpoint-every", "100", "--out", str(tmp_path / "done")).returncode == 0
    runs = [(str(tmp_path / f"none{i}"), []) for i in range(4)] + \
           [(str(tmp_path / "done"), ["--lr", "0.01"]) for _ in range(4)]
    procs = [subprocess.Popen([sys.executable, "-m", "sae_jax.cli", *tiny, "--resume", *extra, "--out", out],
                              stderr=subprocess.PIPE, text=True, env=ENV) for out, extra in runs]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sae-jax: error: --resume"), err


def _run(*args):
    return subprocess.run([sys.executable, "-m", "sae_jax.cli", *args], capture_output=True, text=True,
                          timeout=600, env=ENV)


@pytest.mark.slow
def test_extending_a_run_equals_the_longer_run(tmp_path, capsys):
    """1,000 steps then --resume --steps 2,000 equals 2,000 steps: the small preset's L1 warm-up,
    and a fast recipe whose step-dependent schedules are given explicitly. (In this process:
    the one-line error of a real process is tests/test_cli.py's and the test below's.)"""
    tiny = ["toy", "--d", "8", "--features", "16", "--mean-active", "2", "--l1", "0.1,1", "--ratios", "1",
            "--batch-size", "32", "--no-progress", "--no-figures", "--eval-samples", "256",
            "--check-every", "500", "--checkpoint-every", "500"]
    for name, extra in (("report", ["--l1-warmup", "500"]),
                        ("fast", ["--recipe", "fast", "--batch-size", "32", "--lr-decay-steps", "2000",
                                  "--resample-until", "1500"])):
        full, ext = str(tmp_path / f"{name}_full"), str(tmp_path / f"{name}_ext")
        assert cli.main([*tiny, *extra, "--steps", "2000", "--out", full]) == 0
        assert cli.main([*tiny, *extra, "--steps", "1000", "--out", ext]) == 0
        assert cli.main([*tiny, *extra, "--steps", "2000", "--out", ext, "--resume"]) == 0
        (ra, da), (rb, db) = _load(full), _load(ext)
        for k in da:
            np.testing.assert_array_equal(da[k], db[k], err_msg=f"{name} {k}")
        assert [c["mmcs"] for c in ra["cells"]] == [c["mmcs"] for c in rb["cells"]]
        assert rb["config"]["steps"] == 2000
    # The fast recipe's own schedules follow --steps: extending it is refused, naming them.
    out = str(tmp_path / "fast_derived")
    assert cli.main([*tiny, "--recipe", "fast", "--steps", "1000", "--out", out]) == 0
    capsys.readouterr()
    assert cli.main([*tiny, "--recipe", "fast", "--steps", "2000", "--out", out, "--resume"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "--resample-until" in err and "--lr-decay-steps" in err, err


def test_appendix_grid_writes_its_cells_figure_and_report(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["toy", "--d", "8", "--features", "16", "--mean-active", "2", "--l1", "0.1,1",
                     "--ratios", "1", "--appendix", "--steps", "100", "--batch-size", "32",
                     "--eval-samples", "256", "--no-progress", "--checkpoint-every", "0", "--out", str(out)])
    assert code == 0
    res, _ = _load(out)
    dn = res["denoising"]
    noise = list(recipes.PRESETS["small"].denoise_noise)
    assert res["config"]["denoise_noise"] == noise
    assert dn["world"]["correlated"] is False and dn["world"]["decay"] == 1.0
    assert sorted((c["l1"], c["noise"]) for c in dn["cells"]) == sorted((a, n) for a in (0.1, 1.0) for n in noise)
    assert all(c["dict_size"] == 16 and c["mmcs"] is not None for c in dn["cells"])
    assert (out / "figures" / "appendix_denoising.png").stat().st_size > 1000
    assert "appendix_denoising.png" in (out / "REPORT.md").read_text()


def test_no_library_module_imports_the_cli():
    """The run layer sits below the command: no sae_jax module imports the CLI (import cycles and
    module lengths: tests/test_house.py)."""
    import ast
    import pathlib

    root = pathlib.Path(cli.__file__).parent
    for path in root.rglob("*.py"):
        if path.stem.startswith("cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "sae_jax":
                assert not [a.name for a in node.names if a.name.startswith("cli")], path
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sae_jax.cli"):
                pytest.fail(f"{path} imports {node.module}")
