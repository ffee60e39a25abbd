"""A world axis in the grid: one toy-world knob (noise, jitter or correlation strength) swept
across the grid in the same compiled step; each cell equals the same world trained alone."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from sae_jax import cli, grid, toy
from sae_jax.errors import UsageError

KEY = jax.random.PRNGKey(3)
CFG = toy.ToyConfig(d=8, features=12, mean_active=2.0, corr_strength=0.5)
TRAIN = grid.TrainConfig(batch_size=32, lr=1e-2)
STEPS = 40
AXES = {"noise": (0.0, 0.2), "jitter": (0.0, 0.3), "corr_strength": (0.0, 0.7)}


def _spec(**kw):
    return grid.GridSpec(l1_coeff=(0.03, 0.3), dict_sizes=(6, 12), **kw)


def _train(world, spec, cfg=TRAIN):
    state = grid.init_grid(KEY, spec, CFG.d, cfg)
    return grid.train(state, cfg, STEPS, world=world, chunk=STEPS, progress=False)


@pytest.mark.parametrize("axis", sorted(AXES))
def test_each_value_batch_is_the_world_sampled_alone_from_the_same_numbers(axis):
    values = AXES[axis]
    worlds = toy.axis_worlds(KEY, CFG, axis, values)
    xs = toy.sample_inputs(jax.random.PRNGKey(9), worlds, 64)
    assert xs.shape == (len(values), 64, CFG.d)
    for v, x in zip(values, xs):
        alone = toy.make_world(KEY, dataclasses.replace(CFG, **{axis: v}))
        np.testing.assert_array_equal(np.asarray(x), np.asarray(toy.sample(jax.random.PRNGKey(9), alone, 64)[0]))
    # the values share their features, and the knob changes the batch
    np.testing.assert_array_equal(np.asarray(worlds[0].features_HxD), np.asarray(worlds[-1].features_HxD))
    assert not np.allclose(np.asarray(xs[0]), np.asarray(xs[-1]))


@pytest.mark.parametrize("axis, fused", [("noise", False), ("jitter", False), ("corr_strength", False),
                                         ("corr_strength", True)])
def test_cell_of_an_axis_grid_equals_its_world_trained_alone(axis, fused):
    values = AXES[axis]
    cfg = dataclasses.replace(TRAIN, fused_step=fused)
    spec = _spec(world_axis=axis, world_values=values)
    full = _train(toy.axis_worlds(KEY, CFG, axis, values), spec, cfg)
    assert len(spec.cells()) == 4 * len(values)
    # noise and jitter are static in a world (each value alone compiles anew): the knob's value only
    for v in values if axis == "corr_strength" else values[1:]:
        alone_world = toy.make_world(KEY, dataclasses.replace(CFG, **{axis: v}))
        alone = _train(alone_world, _spec(), cfg)
        for cell in (c for c in spec.cells() if c.world_value == v):
            twin = next(c for c in _spec().cells() if (c.l1_coeff, c.dict_size) == (cell.l1_coeff, cell.dict_size))
            a, b = grid.cell_params(full, cell), grid.cell_params(alone, twin)
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5, err_msg=str(cell))
            np.testing.assert_array_equal(np.asarray(grid.cell_field(full, cell, "since_fired")),
                                          np.asarray(grid.cell_field(alone, twin, "since_fired")))


def test_cells_order_the_world_value_inside_alpha_and_outside_seed():
    spec = grid.GridSpec(l1_coeff=(0.1, 1.0), dict_sizes=(4,), seeds=(0, 1), world_axis="jitter",
                         world_values=(0.0, 0.2))
    assert [(c.l1_coeff, c.world_value, c.seed) for c in spec.cells()[:4]] == [
        (0.1, 0.0, 0), (0.1, 0.0, 1), (0.1, 0.2, 0), (0.1, 0.2, 1)]
    assert all(c.world_value is None for c in _spec().cells())


@pytest.mark.parametrize("kw, needle", [
    (dict(world_axis="decay", world_values=(0.9,)), "`world_axis` must be one of noise, jitter, corr_strength"),
    (dict(world_axis="jitter"), "`world_values` needs at least one value"),
    (dict(world_values=(0.1,)), "`world_axis` must be one of"),
    (dict(world_axis="noise", world_values=(0.1, 0.1)), "distinct finite"),
    (dict(world_axis="noise", world_values=(0.1,), noise=(0.0, 0.1)), "denoising"),
])
def test_bad_axis_specs_raise_usage_errors_naming_the_field(kw, needle):
    with pytest.raises(UsageError, match=needle):
        _spec(**kw).validate()


def test_out_of_range_values_name_the_axis():
    with pytest.raises(UsageError, match=r"`world_values`: corr_strength must be in \[0, 1\], got 1.5"):
        toy.axis_worlds(KEY, CFG, "corr_strength", (0.5, 1.5))
    with pytest.raises(UsageError, match="correlated world"):
        toy.axis_worlds(KEY, dataclasses.replace(CFG, correlated=False), "corr_strength", (0.5,))


BASE = ["toy", "--d", "8", "--features", "12", "--mean-active", "2", "--l1", "0.1,1", "--ratios", "1,2",
        "--steps", "20", "--no-progress", "--checkpoint-every", "0", "--check-every", "0", "--no-figures"]


@pytest.mark.parametrize("args, needle", [
    (["--world-axis", "decay", "--world-values", "0.9"], "--world-axis must be one of"),
    (["--world-axis", "jitter"], "--world-values needs at least one value"),
    (["--world-values", "0.1"], "--world-axis must be one of"),
    (["--world-axis", "noise", "--world-values", "0,-1"], "--world-values: noise must be >= 0"),
    (["--world-axis", "noise", "--world-values", "x"], "--world-values"),
])
def test_bad_axis_flags_one_line_exit_2(tmp_path, capsys, args, needle):
    try:
        code = cli.main([*BASE, "--out", str(tmp_path / "o"), *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "o" / "results.json").exists()


def test_results_record_each_cells_world_value_and_a_selection_per_value(tmp_path):
    out = tmp_path / "o"
    assert cli.main([*BASE, "--out", str(out), "--world-axis", "jitter", "--world-values", "0,0.2"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [c["world_value"] for c in res["cells"]] == [0.0, 0.2] * 4
    assert res["config"]["grid"]["world_axis"] == "jitter"
    assert [b["world_value"] for b in res["by_world_value"]] == [0.0, 0.2]
    for b in res["by_world_value"]:
        assert b["suggested"]["ratio"] in (1.0, 2.0)
        assert {res["cells"][b["ground_truth_optimum"]["cell"]]["world_value"]} == {b["world_value"]}
