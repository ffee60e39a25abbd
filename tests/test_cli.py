"""The `sae-jax` command as a user meets it: outputs, determinism, resume after kill -9, and
one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sae_jax import cli, recipes

TINY = ["toy", "--d", "16", "--features", "32", "--mean-active", "3", "--l1", "0.1,1",
        "--ratios", "0.5,1", "--batch-size", "64", "--eval-samples", "512", "--no-progress",
        "--check-every", "100", "--recipe", "fast", "--resample-every", "50",
        "--resample-dead-window", "50"]  # resampling on, and often


def sae_jax(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sae_jax.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def load(out) -> tuple[dict, dict]:
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    with np.load(os.path.join(out, "dictionaries.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    return res, arrays


METRICS = ("mmcs", "dead", "recon_loss", "l1_loss", "l0", "fvu", "ssll", "mmcs_with_larger",
           "diverged", "n_resampled", "steps_to_0.95", "steps_to_0.99")


def same_run(a: str, b: str) -> None:
    """Bit-identical dictionaries and identical per-cell metrics (timings aside)."""
    ra, da = load(a)
    rb, db = load(b)
    assert sorted(da) == sorted(db)
    for k in da:
        np.testing.assert_array_equal(da[k], db[k], err_msg=k)
    for ca, cb in zip(ra["cells"], rb["cells"]):
        assert {k: ca[k] for k in METRICS} == {k: cb[k] for k in METRICS}
    assert ra["suggested"] == rb["suggested"]


def test_toy_writes_every_output(tmp_path):
    out = tmp_path / "run"
    assert cli.main([*TINY, "--steps", "300", "--out", str(out)]) == 0
    res, arrays = load(out)
    cells = res["cells"]
    assert len(cells) == 4 and res["config"]["world"]["d"] == 16
    for key in ("l1", "ratio", "dict_size", "seed", "mmcs", "dead", "recon_loss", "l1_loss", "l0", "fvu"):
        assert all(key in c for c in cells), key
    assert arrays["ground_truth"].shape == (32, 16)
    for c in cells:
        dec = arrays[f"decoder_{c['index']}"]
        assert dec.shape == (c["dict_size"], 16)
        np.testing.assert_allclose(np.linalg.norm(dec, axis=1), 1.0, atol=1e-5)
    s = res["suggested"]
    assert s["cell"] is None or 0 <= s["cell"] < len(cells)
    assert res["ground_truth_optimum"]["mmcs"] == max(c["mmcs"] for c in cells)
    assert (out / "figures" / "fig03_mmcs_heatmap.png").stat().st_size > 1000
    report = (out / "REPORT.md").read_text()
    assert "fig03_mmcs_heatmap.png" in report and "ground-truth optimum" in report


def test_toy_grid_of_architectures_reports_each_one(tmp_path, capsys):
    """--arch/--k/--l0: one run holds relu_l1, topk and jumprelu cells; results.json says which
    architecture and sparsity setting each cell has, and each architecture gets its own
    suggestion, figures and row in REPORT.md."""
    out = tmp_path / "run"
    assert cli.main([*TINY, "--arch", "relu_l1,topk,jumprelu", "--k", "2,3", "--l0", "0.1,0.3",
                     "--steps", "100", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    res, arrays = load(out)
    cells = res["cells"]
    assert [(c["arch"], c["k"], c["l0_coeff"], c["l1"]) for c in cells if c["ratio"] == 1] == [
        ("relu_l1", None, None, 0.1), ("relu_l1", None, None, 1.0), ("topk", 2, None, 0.0),
        ("topk", 3, None, 0.0), ("jumprelu", None, 0.1, 0.0), ("jumprelu", None, 0.3, 0.0)]
    assert len(arrays) == len(cells) + 1
    assert set(res["by_arch"]) == {"relu_l1", "topk", "jumprelu"}
    assert res["suggested"] == res["by_arch"]["relu_l1"]["suggested"]
    topk = res["by_arch"]["topk"]
    assert topk["suggested"]["arch"] == "topk" and topk["suggested"]["k"] in (2, 3, None)
    assert topk["ground_truth_optimum"]["mmcs"] == max(c["mmcs"] for c in cells if c["arch"] == "topk")
    assert all(c["l0"] <= c["k"] + 1e-6 for c in cells if c["arch"] == "topk")
    for sub in ("", "topk/", "jumprelu/"):
        assert (out / "figures" / f"{sub}fig03_mmcs_heatmap.png").stat().st_size > 1000
    report = (out / "REPORT.md").read_text()
    assert "Architectures side by side" in report and "| topk |" in report and "| jumprelu |" in report
    assert "topk: best MMCS" in stdout and "jumprelu: best MMCS" in stdout


def test_world_axis_with_architectures_prints_each_ones_selection(tmp_path, capsys):
    """A world axis and a grid whose first architecture is not relu_l1: one summary line pair
    per (world value, architecture), each naming its own sparsity setting."""
    out = tmp_path / "w"
    code = cli.main(["toy", "--d", "8", "--features", "16", "--mean-active", "2", "--arch", "topk,relu_l1",
                     "--k", "2", "--l1", "0.01", "--ratios", "0.5,1", "--steps", "20", "--batch-size", "32",
                     "--world-axis", "noise", "--world-values", "0,0.05", "--eval-samples", "256",
                     "--no-progress", "--check-every", "0", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    for v in ("noise 0", "noise 0.05"):
        assert f"{v}: topk: best MMCS" in printed and f"{v}: relu_l1: best MMCS" in printed
    assert ", k 2" in printed and ", alpha 0.01" in printed


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical(tmp_path):
    args = [*TINY, "--steps", "1200", "--checkpoint-every", "100", "--no-figures"]
    ref = sae_jax(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sae_jax.cli", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = out / "checkpoints" / "grid"
    deadline = time.time() + 240
    rng = np.random.default_rng(int(time.time()))
    target = int(rng.integers(2, 9)) * 100  # kill somewhere in the middle of the run
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p) for p in os.listdir(ckpts) if p.isdigit()] if ckpts.exists() else []
        if steps and max(steps) >= target:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    time.sleep(float(rng.uniform(0, 0.3)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists()

    r = sae_jax(*args, "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    same_run(tmp_path / "ref", out)
    assert any(c["n_resampled"] for c in load(out)[0]["cells"])  # resampling was exercised


def test_resume_refuses_different_arguments(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main([*TINY, "--steps", "100", "--out", out, "--no-figures"]) == 0
    capsys.readouterr()
    assert cli.main([*TINY, "--steps", "100", "--out", out, "--no-figures", "--resume", "--lr", "0.002"]) == 2
    err = capsys.readouterr().err
    assert "different arguments" in err and "lr" in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args, needle", [
    (["--l1", "-0.1"], "--l1"),
    (["--l1", "nan"], "--l1"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--ratios", "0"], "--ratios"),
    (["--ratios", "1,-2"], "--ratios"),
    (["--mean-active", "100", "--features", "32"], "--mean-active"),
    (["--d", "0"], "--d"),
    (["--steps", "0"], "--steps"),
    (["--seeds", "0"], "--seeds"),
    (["--batch-size", "0"], "--batch-size"),
    (["--l1", "abc"], "--l1"),
    (["--resume"], "--resume"),
    (["--recipe", "fast", "--resample-pool", "500"], "--resample-pool"),
    (["--recipe", "fast", "--resample-worst", "200"], "--resample-worst"),
    (["--arch", "relu,topk"], "--arch"),
    (["--arch", "topk"], "--k"),
    (["--arch", "topk", "--k", "2.5"], "--k"),
    (["--arch", "topk", "--k", "40"], "--k"),
    (["--arch", "jumprelu"], "--l0"),
    (["--arch", "jumprelu", "--l0", "-1"], "--l0"),
    (["--aux-k-coeff", "-1"], "--aux-k-coeff"),
    (["--jumprelu-bandwidth", "0"], "--jumprelu-bandwidth"),
    (["--k", "3"], "--k"),
    (["--l0", "0.1"], "--l0"),
])
def test_bad_arguments_one_line_exit_2(tmp_path, capsys, args, needle):
    base = ["toy", "--d", "16", "--features", "32", "--mean-active", "3", "--l1", "0.1",
            "--ratios", "1", "--steps", "10", "--out", str(tmp_path / "o"), "--no-progress"]
    try:
        code = cli.main([*base, *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "o" / "results.json").exists()


def test_fast_recipe_resolves_to_its_values_and_flags_override_them():
    cfg = recipes.train_config("fast", 8000)
    assert (cfg.lr, cfg.b2, cfg.batch_size, cfg.tied_init) == (5e-3, 0.99, 64, True)
    assert (cfg.resample.every, cfg.resample.pool_size, cfg.resample.n_worst) == (100, 100, 16)
    assert (cfg.resample.until, cfg.lr_decay_steps) == (6000, 8000)  # 75% and 100% of the steps
    assert recipes.derived_from_steps("fast") == ("resample_until", "lr_decay_steps")
    # the CLI maps flags onto the same fields: explicit flags win over the recipe
    args = cli.build_parser().parse_args(
        ["toy", "--recipe", "fast", "--steps", "8000", "--batch-size", "128", "--no-tied-init",
         "--resample-until", "0", "--lr-decay-steps", "0", "--adam-b2", "0.9"])
    overrides = cli._train_overrides(args)
    cfg = recipes.train_config("fast", 8000, overrides)
    assert (cfg.batch_size, cfg.tied_init, cfg.resample.until, cfg.lr_decay_steps, cfg.b2) == (128, False, 0, 0, 0.9)
    assert recipes.derived_from_steps("fast", overrides) == ()
    report = recipes.train_config(None, 8000, preset=recipes.PRESETS["small"])
    assert (report.lr, report.b2, report.resample.every, report.tied_init) == (1e-3, 0.999, 0, False)
    assert report.l1_warmup == 1000  # the small preset's addition to the report recipe
    assert recipes.train_config("report", 8000, preset=recipes.PRESETS["small"]).l1_warmup == 0


def test_bad_argument_in_a_real_process_has_no_traceback(tmp_path):
    r = sae_jax("toy", "--l1", "-1", "--out", str(tmp_path / "o"), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["sae-jax: error: --l1 values must be finite and >= 0, got -1.0"]


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert cli.main(["toy", "--steps", "10", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and len(err.strip().splitlines()) == 1, err


def test_grid_rejects_bad_activations(tmp_path, capsys):
    nan = np.ones((64, 8), np.float32)
    nan[17, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "flat.npy", np.ones(64, np.float32))
    for name, needle in (("nan.npy", "NaN"), ("flat.npy", "shape"), ("missing.npy", "does not exist")):
        code = cli.main(["grid", "--activations", str(tmp_path / name), "--l1", "0.1", "--ratios", "1",
                         "--steps", "5", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2, err
        assert needle in err and len(err.strip().splitlines()) == 1, err


def test_every_training_flag_comes_from_a_dataclass_field_and_has_help():
    """The training and run options' flags are generated from TrainConfig, ResampleConfig and
    RunOptions (one definition per knob); each has help text, and the flags users know keep
    their names."""
    import dataclasses

    from sae_jax import config, resample, run

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        actions = [a for a in p._actions if a.option_strings and a.dest != "help"]
        assert all(a.help for a in actions), (name, [a.option_strings for a in actions if not a.help])
        if name not in ("toy", "grid"):
            continue
        flags = {s for a in actions for s in a.option_strings}
        assert {"--l1", "--adam-b1", "--adam-b2", "--resample-every", "--dedup-threshold", "--no-figures",
                "--no-progress", "--tied-init", "--no-tied-init", "--decoder-bias", "--steps", "--seed"} <= flags
    train, opts = cli._knob_flags()
    knobbed = {f.name for f in train + opts}
    for cls, rename in ((config.TrainConfig, lambda n: n), (run.RunOptions, lambda n: n),
                        (resample.ResampleConfig, {v: k for k, v in resample.FIELDS.items()}.__getitem__)):
        for f in dataclasses.fields(cls):
            meta = f.metadata.get("knob")
            assert meta is not None, f"{cls.__name__}.{f.name} is not a knob"
            assert (rename(f.name) in knobbed) == meta["cli"], f.name
    assert cli.flag("b1") == "--adam-b1" and cli.flag("resample_every") == "--resample-every"
    assert cli.flag("progress") == "--no-progress" and cli.flag("l1_coeff") == "--l1"
