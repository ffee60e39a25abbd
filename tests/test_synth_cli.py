"""`sae-jax synth`: a grid on a SynthSAEBench world (the committed 391-feature, 40-dimension
SAELens model), scored per cell with SynthSAEBench's metrics."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sae_jax import cli, export, results, run_synth, synth_eval

MODEL = os.path.join(os.path.dirname(__file__), "fixtures", "synth_small_saelens", "model")
EVAL = 6000
GRID = ["synth", "--model", MODEL, "--arch", "relu_l1,topk", "--l1", "1", "--k", "5", "--ratios", "0.5",
        "--lr", "3e-3", "--batch-size", "512", "--eval-samples", str(EVAL), "--checkpoint-every", "200",
        "--no-progress", "--no-figures"]


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "run")
    assert cli.main(GRID + ["--steps", "600", "--out", out]) == 0
    return out, results.load(out)


@pytest.mark.slow
def test_every_cell_has_synthsaebench_metrics(synth_run):
    out, res = synth_run
    assert res["config"]["kind"] == "synth" and res["config"]["model"] == os.path.abspath(MODEL)
    assert res["config"]["eval_samples"] == EVAL and res["config"]["train"]["decoder_bias"] == "mean"
    assert [c["arch"] for c in res["cells"]] == ["relu_l1", "topk"]
    for c in res["cells"]:
        assert set(synth_eval.METRICS) <= set(c), c
        assert c["dict_size"] == round(0.5 * 391) and "dead" in c and "mmcs" in c
        assert 0 <= c["dead_latents"] <= c["dict_size"] and 0 < c["mcc"] <= 1
    assert abs(res["cells"][1]["l0"] - 5) < 1e-6  # TopK's codes: exactly k nonzero
    report = open(os.path.join(out, "REPORT.md")).read()
    assert "## SynthSAEBench metrics" in report and "| 1 | topk | k 5 |" in report


@pytest.mark.slow
def test_metrics_equal_synth_eval_on_the_exported_cells(synth_run):
    out, res = synth_run
    world = run_synth.SynthData.open(model=MODEL).world
    truth = np.load(os.path.join(out, "dictionaries.npz"))["ground_truth"]
    np.testing.assert_array_equal(truth, np.asarray(world.features_FxD))
    for c in res["cells"]:
        _, encode, decode = export.load_cell(out, c["index"])
        decoder = export.read_cell(out, c["index"])["D_unit"]
        want = synth_eval.evaluate(encode, decode, decoder, truth, run_synth.eval_batches(world, 0, EVAL))
        for k, v in want.items():
            assert c[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (c["arch"], k)


@pytest.mark.slow
def test_export_writes_a_saelens_sae_of_a_synth_cell(synth_run, tmp_path):
    out, res = synth_run
    assert cli.main(["export", out, "--cell", "1", "--format", "saelens", "--out", str(tmp_path / "e")]) == 0
    cfg = json.loads((tmp_path / "e" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["k"], cfg["d_sae"], cfg["d_in"]) == ("topk", 5, res["cells"][1]["dict_size"], 40)
    assert cfg["apply_b_dec_to_input"]  # the synth recipe trains a decoder bias


@pytest.mark.slow
def test_topk_recovers_features_well_above_a_random_dictionary(synth_run):
    _, res = synth_run
    topk = res["cells"][1]
    truth = np.asarray(run_synth.SynthData.open(model=MODEL).world.features_FxD)
    random = synth_eval.mcc(np.random.default_rng(0).normal(size=(topk["dict_size"], 40)), truth)
    assert topk["mcc"] > random + 0.1, (topk["mcc"], random)
    assert topk["f1"] > 0.2


@pytest.mark.slow
def test_resume_extends_a_shorter_run_to_the_same_weights(synth_run, tmp_path, capsys):
    out, res = synth_run
    short = str(tmp_path / "short")
    assert cli.main(GRID + ["--steps", "200", "--out", short]) == 0
    capsys.readouterr()
    changed = [a if a != "relu_l1,topk" else "topk" for a in GRID]
    assert cli.main(changed + ["--steps", "600", "--out", short, "--resume"]) == 2  # another grid: refused
    assert "arch" in capsys.readouterr().err  # names what differs
    assert cli.main(GRID + ["--steps", "600", "--out", short, "--resume"]) == 0
    extended = results.load(short)
    for a, b in zip(res["cells"], extended["cells"]):
        for k in ("mcc", "f1", "explained_variance", "l0", "dead_latents"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    for i in range(len(res["cells"])):
        w, v = export.read_cell(out, i), export.read_cell(short, i)
        np.testing.assert_allclose(w["D"], v["D"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("argv, says", [
    (["--model", "/no/such/dir"], "--model /no/such/dir: no such directory"),
    (["--model", os.path.dirname(MODEL)], "is not a model saved by SAELens's SyntheticModel.save"),
    (["--preset", "synth-1m"], "--preset: unknown preset 'synth-1m'"),
    ([], "give exactly one of --model"),
    (["--model", MODEL, "--preset", "synth-small"], "give exactly one of --model"),
    (["--model", MODEL, "--world-seed", "3"], "--world-seed draws a preset"),
])
def test_bad_worlds_are_one_line_errors(argv, says, tmp_path, capsys):
    code = cli.main(["synth", *argv, "--arch", "topk", "--k", "4", "--steps", "2", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and says in err, err


def test_relu_l1_needs_l1(tmp_path, capsys):
    assert cli.main(["synth", "--model", MODEL, "--steps", "2", "--out", str(tmp_path)]) == 2
    assert "--l1 is required" in capsys.readouterr().err


def test_synth_recipe_is_synthsaebench_training():
    from sae_jax import recipes

    cfg = recipes.train_config("synth", 100)
    assert (cfg.lr, cfg.batch_size, cfg.b1, cfg.b2, cfg.decoder_bias) == (3e-4, 1024, 0.9, 0.999, "mean")
    assert cfg.resample.every == 0  # TopK / BatchTopK keep AuxK for dead latents
    assert json.dumps(cfg.to_dict())
