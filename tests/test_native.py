"""The native CPU kernels (sae_jax.native): each equals its XLA formulation, under vmap with
shared and per-cell operands; top-k keeps lax.top_k's order and tie rule; bad indices are
clipped (gathers) or dropped (scatter); a TopK grid trains to the same state through either
kernel set; with SAE_JAX_NATIVE=0 everything runs on XLA's kernels (the build's fallbacks:
tests/test_native_build.py)."""

import importlib.util
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import grid, native, sae, sparse, sparse_unit

KEY = jax.random.PRNGKey(0)
pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU kernels (CI runs on the CPU)")


@pytest.fixture(autouse=True, scope="module")
def built():
    assert native.available(), native.status()


def _rand(shape, seed):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


@pytest.mark.parametrize("m,k", [(512, 16), (37, 1), (37, 37), (4096, 128)])
def test_topk_equals_lax_top_k_under_nested_vmap(m, k):
    pre = _rand((2, 3, 24, m), 1)
    f = jax.jit(jax.vmap(jax.vmap(lambda p: native.topk(p, k))))
    _same_selection(f(pre), jax.lax.top_k(pre, k))


def _same_selection(got, ref):
    """The same (value, index) pairs per row, in any order (the native kernel does not sort)."""
    order = lambda v, i: (np.take_along_axis(np.asarray(v), np.argsort(i, -1), -1), np.sort(i, -1))
    (v, i), (v_ref, i_ref) = order(*got), order(*ref)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_array_equal(v, v_ref)


@pytest.mark.parametrize("m,k", [(300, 40), (4096, 16)], ids=["full selection", "sampled threshold"])
def test_topk_ties_keep_the_lower_index_first(m, k):
    pre = jnp.round(_rand((64, m), 2) * 2) / 2  # many equal values, ties at the threshold
    pre = pre.at[:, 10].set(9.0).at[:, 250].set(9.0)  # a tie at the top, too
    _same_selection(native.topk(pre, k), jax.lax.top_k(pre, k))


@pytest.mark.parametrize("k", [1, 16, 128])
def test_topk_is_exact_on_rows_that_defeat_its_sample_and_its_pivots(k):
    """Rows whose strided sample holds their largest entries (the sampled threshold admits fewer
    than k: the kernel must fall back to the whole row), and sorted rows (the selection's pivots
    at the ends)."""
    m = 4096
    pre = _rand((6, m), 4)
    stride = m // (4 * k)
    pre = pre.at[0, ::stride].add(100.0)  # the sample is the row's top
    pre = pre.at[1].set(jnp.arange(m, dtype=jnp.float32)).at[2].set(-jnp.arange(m, dtype=jnp.float32))
    pre = pre.at[3].set(jnp.sort(pre[3])).at[4].set(jnp.sort(pre[4])[::-1])
    _same_selection(native.topk(pre, k), jax.lax.top_k(pre, k))


def test_topk_puts_nan_first_wherever_it_falls():
    """A NaN (a diverging cell) ranks above +inf, as in lax.top_k, also where the sampled
    threshold does not see it."""
    pre = _rand((8, 4096), 3)
    for col in (0, 1, 2049, 4095):
        bad = pre.at[:, col].set(jnp.nan)
        v, i = native.topk(bad, 16)
        v_ref, i_ref = jax.lax.top_k(bad, 16)
        np.testing.assert_array_equal(np.sort(i, -1), np.sort(i_ref, -1))
        assert int(i_ref[0, 0]) == col and np.all(np.isnan(v[i == col]))


def _gathered(table, idx):
    return jnp.take(table, jnp.clip(idx, 0, table.shape[0] - 1), axis=0)  # (N, J, D)


@pytest.mark.parametrize("d", [33, 300], ids=["d 33", "d 300 (register path and a tail)"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-cell table", "shared table"])
def test_gather_sum_and_dots_equal_their_definitions(shared, d):
    c, n, j, s = 3, 40, 7, 90
    w, r = _rand((c, n, j), 3), _rand((c, n, d), 4)
    idx = jax.random.randint(KEY, (c, n, j), -5, s + 5)  # some out of range: clipped
    tables = _rand((c, s, d), 5)
    table_of = (lambda i: tables[0]) if shared else (lambda i: tables[i])
    in_axes = (0, None, 0) if shared else (0, 0, 0)
    out = jax.jit(jax.vmap(native.gather_sum, in_axes=in_axes))(w, tables[0] if shared else tables, idx)
    dots = jax.jit(jax.vmap(lambda r, t, i: native.dots(r, t, i), in_axes=in_axes))(
        r, tables[0] if shared else tables, idx)
    for q in range(c):
        g = _gathered(table_of(q), idx[q])
        np.testing.assert_allclose(out[q], jnp.einsum("nj,njd->nd", w[q], g), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dots[q], jnp.einsum("nd,njd->nj", r[q], g), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [33, 300], ids=["d 33", "d 300 (register path and a tail)"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("path", ["by row", "by table row"])
def test_decode_err_equals_gather_then_error_then_dots(dtype, d, path, monkeypatch):
    """The fused kernel: e = gather - t, r = e . T[i], sq = |e|^2, equal to the unfused
    kernels' (gather_sum, then dots on e) and to their definitions, with a shared target; row by
    row (small tables) and walking the table in blocks of rows (tables over the cache size)."""
    if path == "by table row":
        monkeypatch.setenv("SAE_JAX_NATIVE_TABLE_CACHE_BYTES", "1")
    c, n, j, s = 3, 40, 7, 90
    w, t = _rand((c, n, j), 3), _rand((n, d), 4)
    idx = jax.random.randint(KEY, (c, n, j), -5, s + 5)  # some out of range: clipped
    tables = _rand((c, s, d), 5).astype(dtype)
    e, r, sq = jax.jit(jax.vmap(native.decode_err, in_axes=(0, 0, 0, None)))(w, tables, idx, t)
    assert e.shape == (c, n, d) and r.shape == (c, n, j) and sq.shape == (c, n)
    assert all(a.dtype == jnp.float32 for a in (e, r, sq))
    for q in range(c):
        g = _gathered(tables[q].astype(jnp.float32), idx[q])
        e_ref = jnp.einsum("nj,njd->nd", w[q], g) - t
        np.testing.assert_allclose(e[q], native.gather_sum(w[q], tables[q], idx[q]) - t, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(e[q], e_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r[q], jnp.einsum("nd,njd->nj", e_ref, g), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(sq[q], jnp.sum(e_ref ** 2, -1), rtol=1e-5)
    if dtype == "bfloat16":
        assert "sae_decode_err_bf16" in jax.jit(native.decode_err).lower(w[0], tables[0], idx[0], t).as_text()


def test_bfloat16_rows_give_the_float32_kernels_result_on_the_rounded_rows():
    """The bfloat16 kernels widen each row element to float32 as they read it: the same sums as
    the float32 kernels on the rounded rows (d 300: the 256-wide register path and a tail)."""
    c, n, j, s, d = 2, 48, 9, 70, 300
    w, r, t = _rand((c, n, j), 3), _rand((c, n, d), 4), _rand((c, s, d), 5)
    idx = jax.random.randint(KEY, (c, n, j), 0, s)
    bf = lambda a: a.astype(jnp.bfloat16)
    up = lambda a: bf(a).astype(jnp.float32)
    calls = {"gather": (lambda t, i: native.gather_sum(w, t, i), (t,)),
             "dots": (lambda r, t, i: native.dots(r, t, i), (r, t)),
             "scatter": (lambda r, i: native.scatter(w, r, i, s), (r,))}
    for name, (f, rows) in calls.items():
        got = jax.jit(f)(*[bf(a) for a in rows], idx)
        want = jax.jit(f)(*[up(a) for a in rows], idx)
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(got)), name
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)
        text = jax.jit(f).lower(*[bf(a) for a in rows], idx).as_text()
        assert f"sae_{'gather_sum' if name == 'gather' else name}_bf16" in text, name


@pytest.mark.parametrize("d", [17, 300], ids=["d 17", "d 300 (register path and a tail)"])
def test_scatter_sums_rows_per_target_and_drops_out_of_range(d):
    c, n, j, L = 2, 50, 6, 20
    w, rows = _rand((c, n, j), 6), _rand((n, d), 7)
    idx = jax.random.randint(KEY, (c, n, j), -3, L + 3)
    out, col = jax.jit(jax.vmap(lambda w, i: native.scatter(w, rows, i, L)))(w, idx)
    for q in range(c):
        ref = jnp.zeros((L + 6, d)).at[idx[q] + 3].add(w[q][..., None] * rows[:, None, :])[3:L + 3]
        ref_col = jnp.zeros(L + 6).at[idx[q] + 3].add(w[q])[3:L + 3]
        np.testing.assert_allclose(out[q], ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(col[q], ref_col, rtol=1e-5, atol=1e-5)


def test_scatter_does_not_depend_on_the_thread_count():
    """Each target row sums its entries in (n, j) order, whatever the threads (1 or 7 over the
    1000 target rows) and row blocks: bit-identical."""
    code = ("import os, sys, numpy as np, jax; from sae_jax import native;"
            "w = jax.random.normal(jax.random.PRNGKey(0), (512, 32));"
            "r = jax.random.normal(jax.random.PRNGKey(1), (512, 300));"
            "i = jax.random.randint(jax.random.PRNGKey(2), (512, 32), 0, 1000);"
            "np.save(sys.argv[1], np.asarray(native.scatter(w, r, i, 1000)[0]))")
    outs = []
    for threads, path in (("1", "a"), ("7", "b")):
        env = dict(__import__("os").environ, SAE_JAX_NATIVE_THREADS=threads)
        subprocess.run([sys.executable, "-c", code, f"/tmp/_sae_native_{path}.npy"], check=True, env=env)
        outs.append(np.load(f"/tmp/_sae_native_{path}.npy"))
    np.testing.assert_array_equal(*outs)


def test_topk_grid_trains_to_the_same_state_through_either_kernel_set():
    spec = grid.GridSpec((0.0,), (64,), archs=("topk",), k=(2, 4))
    cfg = grid.TrainConfig(batch_size=64, aux_k_coeff=0.0, sparse_decoder="on")
    state = grid.init_grid(jax.random.PRNGKey(0), spec, 16, cfg)
    xs = jax.random.normal(jax.random.PRNGKey(1), (20, 64, 16))
    outs = {}
    for flag in (True, False):
        with sparse.kernels(flag):
            step = jax.jit(grid.run_batches_chunk, static_argnums=2)
            assert ("sae_topk" in step.lower(state, xs, cfg).as_text()) == flag
            outs[flag] = step(state, xs, cfg)
    for a, b in zip(jax.tree.leaves(outs[True]), jax.tree.leaves(outs[False])):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                   rtol=2e-4, atol=2e-5)


def test_on_cpu_traces_only_the_kernel_that_runs():
    """On a CPU-only jax the native kernel alone is traced (no platform switch carrying the XLA
    fallback); XLA's where the kernels are off or the input too large for them."""
    if not native.cpu_only():
        pytest.skip("jax has a backend besides the CPU here")
    native_fn, xla_fn = (lambda x: x + 1), (lambda x: x - 1)
    assert native.on_cpu(native_fn, xla_fn) is native_fn
    assert native.on_cpu(native_fn, xla_fn, native.MAX_ENTRIES + 1) is xla_fn
    with sparse.kernels(False):
        assert native.on_cpu(native_fn, xla_fn) is xla_fn
    w, x = jax.random.normal(jax.random.PRNGKey(1), (16, 4)), jax.random.normal(jax.random.PRNGKey(0), (8, 4))
    jaxpr = str(jax.make_jaxpr(lambda w, x: sparse.topk_codes(w, jnp.zeros(16), x, 3))(w, x))
    assert "sae_topk" in jaxpr and "platform_index" not in jaxpr


def test_disabled_by_environment_runs_the_xla_kernels():
    code = ("from sae_jax import native, sparse; import jax;"
            "x = jax.random.normal(jax.random.PRNGKey(0), (8, 4)); "
            "w = jax.random.normal(jax.random.PRNGKey(1), (16, 4));"
            "v, i = sparse.topk_codes(w, jax.numpy.zeros(16), x, 3);"
            "print(native.status(), v.shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(__import__("os").environ, SAE_JAX_NATIVE="0"))
    assert out.stdout.strip() == "disabled by SAE_JAX_NATIVE=0 (8, 3)"
    assert "native CPU kernels" not in out.stderr  # turned off on purpose: nothing to say


def test_mismatched_shapes_are_an_error_not_a_crash():
    """A kernel called with inconsistent shapes reports it through XLA (no out-of-bounds read)."""
    with pytest.raises(Exception, match="sae_gather_sum: shapes"):
        jax.block_until_ready(native.gather_sum(jnp.ones((4, 3)), jnp.ones((5, 8)), jnp.zeros((4, 2), jnp.int32)))
    with pytest.raises(Exception, match="sae_topk: shapes"):  # a bias of the wrong width
        jax.block_until_ready(native.topk(jnp.ones((4, 16)), 2, jnp.ones((1, 8))))


def test_unit_rows_equal_sae_unit_rows_and_its_gradient_on_either_kernel_set():
    """sparse_unit.unit_rows (native on the CPU, one pass each way) equals sae.unit_rows and autodiff's
    gradient of it to float tolerance, under vmap, with a row of 1e30s (the norm does not
    overflow); a zero row gets 0 atoms and the finite gradient g / eps (autodiff: NaN)."""
    w = _rand((3, 50, 37), 0) * 3
    w = w.at[0, 5].set(0.0).at[1, 7].multiply(1e30)
    g = _rand(w.shape, 1)
    ref_a = jax.vmap(sae.unit_rows)(w)
    ref_g = jax.grad(lambda w: jnp.sum(sae.unit_rows(w) * g))(w)
    finite = np.isfinite(np.asarray(ref_g))
    assert (~finite).sum() == 37  # the zero row's
    for native_on in (True, False):
        with sparse.kernels(native_on):
            a = jax.jit(jax.vmap(sparse_unit.unit_rows))(w)
            dw = jax.jit(jax.grad(lambda w: jnp.sum(sparse_unit.unit_rows(w) * g)))(w)
        np.testing.assert_allclose(a, ref_a, atol=2e-7)
        rows = finite.all(axis=-1)  # every row but the zero one
        scale = np.max(np.abs(np.asarray(ref_g)[rows]), axis=-1, keepdims=True)
        np.testing.assert_allclose(np.asarray(dw)[rows] / scale, np.asarray(ref_g)[rows] / scale, atol=1e-6)
        np.testing.assert_array_equal(a[0, 5], 0.0)
        np.testing.assert_allclose(dw[0, 5], g[0, 5] / sparse_unit.UNIT_EPS, rtol=1e-6)


@pytest.mark.skipif(__import__("platform").machine() != "x86_64", reason="an x86-64 baseline build")
def test_a_build_without_vector_extensions_gives_this_builds_results(tmp_path):
    """The kernels built for baseline x86-64 (no AVX: the portable 16-lane arrays) give this
    machine's build's results: Adam's step and the selections bit for bit, the rest to float32 rounding."""
    import os

    script = pathlib.Path(__file__).parent / "scripts" / "native_outputs.py"
    env = dict(os.environ, SAE_JAX_NATIVE_ARCH="x86-64", SAE_JAX_NATIVE_CACHE=str(tmp_path / "cache"))
    subprocess.run([sys.executable, str(script), str(tmp_path / "base.npz")], check=True, env=env, timeout=600)
    base = np.load(tmp_path / "base.npz")
    spec = importlib.util.spec_from_file_location("native_outputs", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    here = mod.outputs()
    assert set(here) == set(base.files)
    for name, val in here.items():
        if name.startswith(("adam", "topk", "batch_topk")):
            np.testing.assert_array_equal(base[name], val, err_msg=name)
        else:
            np.testing.assert_allclose(base[name], val, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("p", [7, 40, 300], ids=["p 7 (tail only)", "p 40", "p 300"])
@pytest.mark.parametrize("d", [33, 300], ids=["d 33", "d 300 (register path and a tail)"])
def test_sparse_rows_equal_the_dense_product_and_count_nan_as_nonzero(p, d):
    """sparse_rows(v, T) = v @ T for rows of any sparsity (none, a few, all nonzero), vmapped
    over cells; a NaN entry is a nonzero (it reaches the output as the GEMM's would)."""
    c, n = 2, 24
    v = _rand((c, n, p), 6)
    keep = jax.random.uniform(jax.random.PRNGKey(7), (c, n, p)) < jnp.linspace(0.0, 1.0, n)[:, None]
    v = jnp.where(keep, v, 0.0)
    table = _rand((c, p, d), 8)
    out = jax.jit(jax.vmap(native.sparse_rows))(v, table)
    np.testing.assert_allclose(out, jnp.einsum("cnp,cpd->cnd", v, table), rtol=1e-5, atol=1e-5)
    shared = jax.jit(jax.vmap(native.sparse_rows, in_axes=(0, None)))(v, table[0])
    np.testing.assert_allclose(shared[1], v[1] @ table[0], rtol=1e-5, atol=1e-5)
    nan = native.sparse_rows(v[0].at[3, p - 1].set(jnp.nan), table[0])
    assert np.isnan(nan[3]).all() and np.isfinite(np.delete(np.asarray(nan), 3, axis=0)).all()
