"""Checkpointer: exact round trips, retention, damaged steps, sharded restore."""

import glob
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sae_jax._fingerprint import fingerprints as _fingerprints
from sae_jax.checkpoint import Checkpointer, CheckpointError, metadata_mismatches, resume
from sae_jax.errors import UsageError


@flax.struct.dataclass
class Group:
    params: dict
    opt_state: optax.OptState
    steps_since_fired_CxM: jax.Array  # int32 counters


@flax.struct.dataclass
class GridState:
    groups: tuple
    key: jax.Array  # raw uint32[2] key, as the grid trainer uses
    step: jax.Array


def _noise(rng, x):
    if jnp.issubdtype(x.dtype, jnp.integer):
        return rng.integers(1, 1000, x.shape).astype(x.dtype)
    return rng.standard_normal(x.shape).astype(x.dtype)


def make_state(seed: int, sizes=(64, 256), cells=4, d=32) -> GridState:
    """A grid-like state whose values all depend on ``seed`` (NumPy: nothing to compile)."""
    rng = np.random.default_rng(seed)
    groups = []
    for m in sizes:
        params = {
            "W_enc_CxDxM": rng.standard_normal((cells, d, m), np.float32),
            "b_enc_CxM": np.full((cells, m), 0.1 * seed, np.float32),
        }
        adam = optax.adam(1e-3).init(params)
        # Non-trivial moments and count, so the round trip is not one of zeros.
        adam = jax.tree.map(lambda x: _noise(rng, x), adam)
        counters = rng.integers(0, 1000, (cells, m), dtype=np.int32)
        groups.append(Group(params, adam, counters))
    state = GridState(tuple(groups), key=jax.random.PRNGKey(seed), step=np.int32(100 * seed))
    return jax.tree.map(jnp.asarray, state)


ABSTRACT = jax.eval_shape(lambda: make_state(0))


def bits(x) -> tuple:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return ("key", str(x.dtype), bits(jax.random.key_data(x)))
    a = np.asarray(x)
    return (a.dtype.str, a.shape, a.tobytes())


def assert_identical(got, want):
    """Same pytree types and structure, and every leaf the same dtype, shape and bytes."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert bits(g) == bits(w), jax.tree_util.keystr(path)


def save_steps(directory, steps, max_to_keep=3):
    with Checkpointer(directory, max_to_keep=max_to_keep) as ckpt:
        for s in steps:
            ckpt.save(s, make_state(s), {"step": s, "grid": {"l1": [0.1, 0.2]}})


# ----------------------------------------------------------------------------- round trip


def test_round_trip_restores_types_and_bits(tmp_path):
    state = make_state(1)
    meta = {"grid": {"l1": [1e-3, 3e-3], "sizes": [64, 256]}, "steps": 5000, "lr": 1e-3}
    with Checkpointer(tmp_path / "ck") as ckpt:
        ckpt.save(7, state, meta)
        ckpt.wait()
        got, got_meta, step = ckpt.restore(ABSTRACT)
    assert step == 7 and got_meta == meta
    assert type(got) is GridState and type(got.groups) is tuple
    assert all(type(g) is Group for g in got.groups)
    adam = got.groups[0].opt_state[0]
    assert type(adam) is type(state.groups[0].opt_state[0])  # optax ScaleByAdamState
    assert got.key.dtype == jnp.uint32 and got.step.dtype == jnp.int32
    assert_identical(got, state)


def test_typed_prng_key_round_trip(tmp_path):
    state = {"key": jax.random.split(jax.random.key(3), 4), "x": jnp.arange(5.0)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {})
        got, _, _ = ckpt.restore(jax.eval_shape(lambda: state))
    assert jnp.issubdtype(got["key"].dtype, jax.dtypes.prng_key)
    assert_identical(got, state)


def test_every_dtype_round_trips_and_any_changed_word_is_noticed(tmp_path):
    rng = np.random.default_rng(0)
    x = np.linspace(-1.0, 1.0, 64)
    state = {
        "bf16": jnp.asarray(x, jnp.bfloat16), "f16": jnp.asarray(x, jnp.float16),
        "f32": jnp.asarray(x, jnp.float32), "i8": jnp.asarray(x * 50, jnp.int8),
        "u8": jnp.asarray(np.abs(x) * 50, jnp.uint8), "bool": jnp.asarray(np.arange(64) % 2 > 0),
        "u32": jnp.asarray(rng.integers(0, 2**32, 64, dtype=np.uint32)),
    }
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match=r"empty array \['empty'\]"):
            ckpt.save(1, {**state, "empty": jnp.zeros((0, 3))}, {})
        ckpt.save(1, state, {})
        got, _, _ = ckpt.restore(jax.eval_shape(lambda: state))
    assert_identical(got, state)
    changed, swapped = [], []
    for leaf in state.values():
        a = np.array(leaf)
        assert a[3] != a[4]
        c = a.copy()
        c[3] = a[4]
        changed.append(jnp.asarray(c))
        c[4] = a[3]
        swapped.append(jnp.asarray(c))
    base = _fingerprints(list(state.values()))
    for name, b, c, s in zip(state, base, _fingerprints(changed), _fingerprints(swapped)):
        assert len({b, c, s}) == 3, name


def test_relative_directory_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Checkpointer("runs/ck") as ckpt:
        assert ckpt.directory == str(tmp_path / "runs" / "ck")
        assert os.path.isdir(ckpt.directory)


def test_keeps_last_n(tmp_path):
    save_steps(tmp_path, range(1, 6), max_to_keep=2)
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.all_steps() == [4, 5]
        assert ckpt.latest_step() == 5
    assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["4", "5"]


# ----------------------------------------------------------------------------- damage


def data_files(step_dir):
    """Tensorstore's chunk files of a step, largest last."""
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    return sorted(files, key=os.path.getsize)


def truncate(step_dir):
    big = data_files(step_dir)[-1]
    os.truncate(big, os.path.getsize(big) // 2)


def zero(step_dir):
    big = data_files(step_dir)[-1]
    with open(big, "r+b") as f:
        f.write(bytes(os.path.getsize(big)))


def flip_byte(step_dir):
    """One changed byte inside a chunk of random floats: tensorstore reads it happily."""
    big = data_files(step_dir)[-1]
    with open(big, "r+b") as f:
        f.seek(os.path.getsize(big) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))


def remove_state(step_dir):
    shutil.rmtree(os.path.join(step_dir, "state"))


def remove_metadata(step_dir):
    shutil.rmtree(os.path.join(step_dir, "metadata"))


def remove_manifest(step_dir):
    os.remove(os.path.join(step_dir, "manifest", "metadata"))


def garble_metadata(step_dir):
    with open(os.path.join(step_dir, "metadata", "metadata"), "w") as f:
        f.write('{"step": 3, "gri')


def interrupted_save(step_dir):
    """What a kill -9 during the save leaves: Orbax's tmp dir, never renamed."""
    os.rename(step_dir, step_dir + ".orbax-checkpoint-tmp")


DAMAGES = {
    "truncated file": (truncate, "cannot read its arrays"),
    "zeroed file": (zero, "cannot read its arrays"),
    "flipped byte": (flip_byte, "does not match its saved checksum"),
    "no state dir": (remove_state, "item directory 'state' is missing"),
    "no metadata dir": (remove_metadata, "item directory 'metadata' is missing"),
    "no manifest": (remove_manifest, "manifest is unreadable"),
    "garbled metadata": (garble_metadata, "metadata is unreadable"),
    "leftover tmp dir": (interrupted_save, None),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_newest_step_falls_back_to_previous(tmp_path, caplog, damage):
    corrupt, message = DAMAGES[damage]
    save_steps(tmp_path, [1, 2, 3])
    corrupt(str(tmp_path / "3"))
    with caplog.at_level(logging.WARNING, logger="sae_jax.checkpoint"):
        with Checkpointer(tmp_path) as ckpt:
            got, meta, step = ckpt.restore(ABSTRACT)
    assert step == 2 and meta["step"] == 2
    assert_identical(got, make_state(2))
    if message is not None:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "\n" not in warnings[0], warnings
        assert "step 3" in warnings[0] and message in warnings[0], warnings[0]


@pytest.mark.parametrize("damage", ["no state dir", "no manifest", "leftover tmp dir"])
def test_latest_step_skips_incomplete_steps(tmp_path, damage):
    save_steps(tmp_path, [1, 2, 3])
    DAMAGES[damage][0](str(tmp_path / "3"))
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 2


def test_resumed_run_replaces_the_damaged_step(tmp_path):
    save_steps(tmp_path, [1, 2, 3])
    zero(str(tmp_path / "3"))
    with Checkpointer(tmp_path) as ckpt:
        _, _, step = ckpt.restore(ABSTRACT)
        assert step == 2
        ckpt.save(3, make_state(33), {"step": 3})
        ckpt.wait()
        got, _, step = ckpt.restore(ABSTRACT)
    assert step == 3
    assert_identical(got, make_state(33))


def test_nothing_usable_raises_checkpoint_error(tmp_path):
    save_steps(tmp_path, [1, 2])
    zero(str(tmp_path / "1"))
    remove_state(str(tmp_path / "2"))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError) as err:
            ckpt.restore(ABSTRACT)
    msg = str(err.value)
    assert "no usable checkpoint" in msg and str(tmp_path) in msg and "\n" not in msg
    assert "step 1" in msg and "step 2" in msg
    assert isinstance(err.value, UsageError)


def test_empty_directory_and_missing_step_raise(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(CheckpointError, match="no checkpoint in"):
            ckpt.restore(ABSTRACT)
        ckpt.save(1, make_state(1), {})
        with pytest.raises(CheckpointError, match="no checkpoint for step 5"):
            ckpt.restore(ABSTRACT, step=5)


def test_explicit_damaged_step_raises_instead_of_falling_back(tmp_path):
    save_steps(tmp_path, [1, 2])
    flip_byte(str(tmp_path / "2"))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match="step 2 .* is unusable: array .* checksum"):
            ckpt.restore(ABSTRACT, step=2)
        _, _, step = ckpt.restore(ABSTRACT, step=1)
    assert step == 1


def test_state_of_another_shape_is_an_error_not_damage(tmp_path, caplog):
    save_steps(tmp_path, [1, 2])
    other = jax.eval_shape(lambda: make_state(0, sizes=(64, 512)))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match=r"does not fit .*W_enc_CxDxM.*\[4, 32, 256\]"):
            ckpt.restore(other)
    assert not caplog.records or all(r.levelno < logging.WARNING for r in caplog.records)


# ----------------------------------------------------------------------------- edges


def test_bad_arguments(tmp_path):
    with pytest.raises(UsageError, match="max_to_keep"):
        Checkpointer(tmp_path, max_to_keep=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="cannot create checkpoint directory"):
        Checkpointer(tmp_path / "file" / "ck")
    with Checkpointer(tmp_path / "ck") as ckpt:
        with pytest.raises(TypeError, match="JSON"):
            ckpt.save(1, make_state(1), {"bad": object()})


def test_metadata_mismatches():
    saved = json.loads(json.dumps({"grid": {"l1": (0.1, 0.2), "sizes": [64]}, "steps": 10}))
    same = {"grid": {"l1": (0.1, 0.2), "sizes": (64,)}, "steps": 10}
    assert metadata_mismatches(saved, same) == []
    current = {"grid": {"l1": [0.1, 0.3], "sizes": [64]}, "steps": 20, "lr": 0.01}
    assert metadata_mismatches(saved, current) == [
        "grid.l1: the checkpoint has [0.1, 0.2], this run has [0.1, 0.3]",
        "lr: the checkpoint has nothing, this run has 0.01",
        "steps: the checkpoint has 10, this run has 20",
    ]
    assert metadata_mismatches(saved, current, keys=["grid"]) == [
        "grid.l1: the checkpoint has [0.1, 0.2], this run has [0.1, 0.3]"
    ]


# ----------------------------------------------------------------------------- sharding

_SHARDED_SCRIPT = textwrap.dedent(
    """
    import sys, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from sae_jax.checkpoint import Checkpointer

    mode, directory = sys.argv[1], sys.argv[2]
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("grid",))
    cells, repl = NamedSharding(mesh, P("grid")), NamedSharding(mesh, P())

    def make():
        w = np.random.default_rng(0).standard_normal((8, 16, 32), np.float32)
        return {"W_CxDxM": jnp.asarray(w),
                "fired_CxM": jnp.arange(8 * 32, dtype=jnp.int32).reshape(8, 32),
                "key": jax.random.PRNGKey(0), "typed_key": jax.random.key(5),
                "step": jnp.int32(9)}

    shard_of = {"W_CxDxM": cells, "fired_CxM": cells, "key": repl, "typed_key": repl, "step": repl}
    want = make()
    if mode == "save":
        state = {k: jax.device_put(v, shard_of[k]) for k, v in want.items()}
        assert len(state["W_CxDxM"].sharding.device_set) == n
        with Checkpointer(directory) as ckpt:
            ckpt.save(1, state, {"devices": n})
    else:
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shard_of[k])
                    for k, v in jax.eval_shape(make).items()}
        with Checkpointer(directory) as ckpt:
            got, meta, step = ckpt.restore(abstract)
        for k, v in got.items():
            assert v.sharding == shard_of[k], (k, v.sharding)
            a, b = v, want[k]
            if k == "typed_key":
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            assert np.array_equal(np.asarray(a), np.asarray(b)), k
        print("restored", meta, "onto", n, "devices")
    """
)


def _run_on_devices(n, *args):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(n), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT, *args],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_sharded_grid_restores_onto_another_device_count(tmp_path):
    """Saved from 4 devices, restored onto 2 with the target's shardings.

    The checksums written on 4 shards are verified on 2, so they do not depend on sharding.
    """
    _run_on_devices(4, "save", str(tmp_path))
    out = _run_on_devices(2, "restore", str(tmp_path))
    assert "restored {'devices': 4} onto 2 devices" in out


# ----------------------------------------------------------------------------- kill -9

_SAVE_FOREVER = textwrap.dedent(
    """
    import sys, jax.numpy as jnp
    from sae_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(sys.argv[1], max_to_keep=2)
    for step in range(1, 10_000):
        ckpt.save(step, {"x": jnp.full((4_000_000,), step, jnp.int32)}, {"step": step})
    """
)


def test_kill_9_during_saves_leaves_a_usable_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER, str(tmp_path)],
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "2").is_dir() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 0.3))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    abstract = {"x": jax.ShapeDtypeStruct((4_000_000,), jnp.int32)}
    with Checkpointer(tmp_path) as ckpt:
        got, meta, step = ckpt.restore(abstract)
    assert step >= 1 and meta == {"step": step}
    assert np.all(np.asarray(got["x"]) == step)


# ----------------------------------------------------------------------------- the grid's state


def test_grid_state_round_trip_through_resume_continues_identically(tmp_path, tiny_world):
    """The real GridState (resampling pool, Adam moments, counters, data key) saved mid-run and
    restored by checkpoint.resume into a fresh init trains on exactly as the original."""
    from sae_jax import grid, resample

    spec = grid.GridSpec(l1_coeff=(0.1, 1.0), dict_sizes=(16, 32))
    cfg = grid.TrainConfig(batch_size=32, lr=1e-2, resample=resample.ResampleConfig(every=20))
    fresh = grid.init_grid(jax.random.PRNGKey(3), spec, tiny_world.d, cfg)
    mid = grid.train(fresh, cfg, 50, world=tiny_world, chunk=25, progress=False)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(50, mid, {"run_config": {"steps": 50}})
    with Checkpointer(tmp_path) as ckpt:
        restored, meta, step = resume(ckpt, fresh, {"steps": 80}, may_grow=("steps",))
        with pytest.raises(CheckpointError, match="different arguments"):
            resume(ckpt, fresh, {"steps": 40}, may_grow=("steps",))  # only growth is allowed
    assert step == 50 and type(restored) is grid.GridState
    assert type(restored.groups[0]) is grid.GroupState and int(restored.step) == 50
    for a, b in zip(jax.tree.leaves(mid), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.any(np.asarray(restored.groups[0].pool_x) != 0)
    ends = [grid.train(s, cfg, 80, world=tiny_world, chunk=30, progress=False) for s in (mid, restored)]
    for a, b in zip(*(jax.tree.leaves(e) for e in ends)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@flax.struct.dataclass
class _Before:
    w: jax.Array
    opt: optax.ScaleByAdamState


@flax.struct.dataclass
class _After:  # a field added since, None by default (as GroupState.world_index was)
    w: jax.Array
    opt: optax.ScaleByAdamState
    index: jax.Array | None = None


def test_a_checkpoint_from_before_a_new_none_field_still_restores(tmp_path):
    """The same leaves under a tree with one more None field: restored by key path, bit for bit
    (a run checkpointed by an older sae_jax resumes)."""
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
    old = (_Before(w, optax.scale_by_adam().init(w)),)
    with Checkpointer(tmp_path / "ck") as ckpt:
        ckpt.save(5, old, {"steps": 5})
        ckpt.wait()
        got, meta, step = ckpt.restore(jax.eval_shape(lambda: (_After(w, optax.scale_by_adam().init(w)),)))
    assert step == 5 and meta == {"steps": 5} and type(got[0]) is _After and got[0].index is None
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(old)):
        np.testing.assert_array_equal(a, b)
