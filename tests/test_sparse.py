"""The sparse TopK / BatchTopK codes and decoder: forward values and gradients (w.r.t. W_e, b_e
and D through the unit-norm rows) equal autodiff of the dense formulation, one cell and under
vmap over cells; selected negative pre-activations give zero codes and no gradient. Every test
runs twice: through the native CPU kernels (sae_jax.native) and through XLA's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import native, sae, sparse, sparse_coo, sparse_unit
from sae_jax.errors import UsageError

C, B, D, M, K = 3, 12, 8, 32, 4


@pytest.fixture(autouse=True, scope="module", params=["native", "xla"])
def kernels(request):
    """Each test once per kernel set; the native one must have built (g++ is on every CI
    machine: a failure to build is a failure here, not a skip)."""
    if request.param == "native":
        assert native.available(), native.status()
    with sparse.kernels(request.param == "native"):
        yield request.param


def _params(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    p = jax.vmap(lambda key: sae.init(key, D, M))(jax.random.split(k[0], C))
    # negative biases: some selected pre-activations are negative
    bias = 0.3 * jax.random.normal(k[1], (C, M)) - 0.8
    return p._replace(b_enc_M=bias,
                      D_MxD=p.D_MxD * jax.random.uniform(k[2], (C, M, 1), minval=0.3, maxval=3.0))


def _x(seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (B, D))


def _dense_codes(p, x, k, batch_top):
    """c = ReLU(pre) on the selected entries, 0 elsewhere; the selection held constant."""
    pre = x @ p.W_enc_MxD.T + p.b_enc_M
    ref = jax.lax.stop_gradient(pre)
    if batch_top:
        keep = ref >= jax.lax.top_k(ref.reshape(-1), k * x.shape[0])[0][-1]
    else:
        keep = ref >= jax.lax.top_k(ref, k)[0][:, -1:]
    return jnp.where(keep, jax.nn.relu(pre), 0.0)


def _loss(x_hat, c_sum, x):
    """MSE plus a term on the codes, so that d/dc has a part not through x^."""
    return jnp.mean(jnp.square(x - x_hat)) + 0.01 * c_sum


def dense_loss(p, x, k, batch_top):
    c = _dense_codes(p, x, k, batch_top)
    return _loss(c @ sae.unit_rows(p.D_MxD), jnp.sum(c ** 2), x)


def sparse_loss(p, x, k, batch_top, dtype="float32"):
    """batch_top: False (TopK) or "rows" (BatchTopK's row layout)."""
    if batch_top == "rows":
        c = sparse_coo.batchtopk_rows(p.W_enc_MxD, p.b_enc_M, x, k, dtype)
        x_hat = sparse_coo.decode_rows(sae.unit_rows(p.D_MxD), c.vals_RxJ, c.latent_RxJ, c.sample_R,
                                       x.shape[0], dtype)
        return _loss(x_hat, jnp.sum(c.vals_RxJ ** 2), x)
    vals, idx = sparse.topk_codes(p.W_enc_MxD, p.b_enc_M, x, k, dtype)
    return _loss(sparse.decode(sae.unit_rows(p.D_MxD), vals, idx, dtype), jnp.sum(vals ** 2), x)


def _close(a, b, rtol):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(b))))


LAYOUTS = pytest.mark.parametrize("batch_top", [False, "rows"], ids=["topk", "batchtopk_rows"])


@LAYOUTS
def test_loss_and_gradients_equal_dense_under_vmap(batch_top):
    p, x = _params(), _x()
    grad = lambda f: jax.jit(jax.vmap(jax.value_and_grad(f), in_axes=(0, None, None, None)),
                             static_argnums=(2, 3))
    ref_l, ref_g = grad(dense_loss)(p, x, K, batch_top)
    loss, g = grad(sparse_loss)(p, x, K, batch_top)
    _close(loss, ref_l, 1e-5)
    for name, a, b in zip(sae.SAEParams._fields[:3], g, ref_g):
        assert float(jnp.max(jnp.abs(b))) > 0, name
        _close(a, b, 1e-4)


def test_many_cells_take_the_batched_kernels(monkeypatch):
    """Past MAX_UNROLLED_CELLS cells the kernels run batched: the same gradients."""
    p, x = _params(), _x()
    g = lambda: jax.jit(jax.vmap(jax.grad(sparse_loss), in_axes=(0, None, None, None)),
                        static_argnums=(2, 3))(p, x, K, False)
    unrolled = g()
    monkeypatch.setattr(sparse, "MAX_UNROLLED_CELLS", 1)
    for a, b in zip(g()[:3], unrolled[:3]):
        _close(a, b, 1e-6)


def test_topk_codes_and_decode_forward():
    p = jax.tree.map(lambda a: a[0], _params())
    x = _x()
    vals, idx = sparse.topk_codes(p.W_enc_MxD, p.b_enc_M, x, K)
    c = _dense_codes(p, x, K, False)
    assert vals.shape == idx.shape == (B, K) and idx.dtype == jnp.int32
    _close(np.sort(vals, 1), np.sort(np.take_along_axis(c, idx, 1), 1), 1e-6)
    assert np.count_nonzero(c) == np.count_nonzero(vals) < B * K  # some selected are negative
    atoms = sae.unit_rows(p.D_MxD)
    _close(sparse.decode(atoms, vals, idx), c @ atoms, 1e-5)


@LAYOUTS
def test_all_negative_pre_activations_give_zero_codes_and_no_encoder_gradient(batch_top):
    p, x = jax.tree.map(lambda a: a[0], _params()), _x()
    p = p._replace(b_enc_M=p.b_enc_M - 100.0)
    g = jax.grad(sparse_loss)(p, x, K, batch_top)
    assert not np.any(g.W_enc_MxD) and not np.any(g.b_enc_M) and not np.any(g.D_MxD)
    assert float(sparse_loss(p, x, K, batch_top)) == pytest.approx(float(jnp.mean(x ** 2)))


def test_tied_latents_select_exactly_k():
    """Two latents with the same encoder row tie everywhere; TopK still keeps k per sample (the
    lower index first) and the decoder uses exactly those."""
    p, x = jax.tree.map(lambda a: a[0], _params()), _x()
    pre = x @ p.W_enc_MxD.T + p.b_enc_M
    j = int(jnp.argsort(pre[0])[-K])  # sample 0's k-th latent: duplicate it into latent `dup`
    dup = M - 1 if j != M - 1 else 0
    p = p._replace(W_enc_MxD=p.W_enc_MxD.at[dup].set(p.W_enc_MxD[j]),
                   b_enc_M=p.b_enc_M.at[dup].set(p.b_enc_M[j]))
    vals, idx = sparse.topk_codes(p.W_enc_MxD, p.b_enc_M, x, K)
    assert idx.shape == (B, K) and all(len(set(r)) == K for r in np.asarray(idx).tolist())
    assert min(j, dup) in np.asarray(idx[0]) and max(j, dup) not in np.asarray(idx[0])
    c = jnp.zeros((B, M)).at[jnp.arange(B)[:, None], idx].set(vals)
    atoms = sae.unit_rows(p.D_MxD)
    _close(sparse.decode(atoms, vals, idx), c @ atoms, 1e-5)


def _rows_entries(v, i, s, m):
    """{flat index: value} of a row layout's filled slots, and the samples of its filled rows."""
    v, i, s = map(np.asarray, (v, i, s))
    filled = v != 0
    flat = (s[:, None] * m + i)[filled]
    return dict(zip(flat.tolist(), v[filled].tolist())), s[filled.any(1)]


@pytest.mark.parametrize("case", ["gaussian", "ties", "sample_misses", "bias_nan_odd_width"])
def test_batchtopk_row_layout_holds_the_batch_top_by_sample(case):
    """The row layout (native kernel on the CPU, else XLA's) holds exactly the N = k B largest
    entries of the batch (ties: the lower flat index, as lax.top_k), each sample's in consecutive
    rows, samples in order, latents increasing; the threshold is the N-th largest. "sample_misses":
    the native kernel's sampled threshold sees only large entries and must fall back to them all.
    "bias_nan_odd_width": a per-latent bias added, a width off the 16-lane vectors, and a NaN
    (selected first, as lax.top_k orders it)."""
    b, m, k = {"sample_misses": (1024, 64, 3), "bias_nan_odd_width": (40, 300, 3)}.get(case, (24, 64, 3))
    n, slots = k * b, sparse_coo.row_slots(k)
    pre = np.random.default_rng(0).standard_normal((b, m)).astype(np.float32) + 3.0
    bias = np.zeros(m, np.float32)
    if case == "bias_nan_odd_width":
        bias = np.random.default_rng(1).standard_normal(m).astype(np.float32)
        pre[7, 123] = np.nan
    if case == "ties":
        pre[5] = pre[9] = np.sort(pre.ravel())[-n]  # 128 entries equal to the threshold
    if case == "sample_misses":
        pre[:] = np.linspace(1.0, 2.0, b * m, dtype=np.float32).reshape(b, m)
        pre[::2] += 10.0  # the kernel's threshold reads 2^15 entries: every other sample here
    run = native.on_cpu(lambda p: tuple(a[0] for a in native.batch_topk(p[:, None], jnp.asarray(bias)[None], n, slots)),
                      lambda p: sparse_coo._xla_rows(p + bias, n, slots), pre.size)
    v, i, s, t = jax.jit(run)(jnp.asarray(pre))
    assert v.shape == i.shape == (native.batch_topk_rows(n, b, slots), slots)
    top, flat = jax.lax.top_k(jnp.asarray(pre + bias).reshape(-1), n)
    entries, row_samples = _rows_entries(v, i, s, m)
    nan_free = lambda d: {key: (-1.0 if np.isnan(val) else val) for key, val in d.items()}  # NaN != NaN
    assert nan_free(entries) == nan_free(dict(zip(np.asarray(flat).tolist(), np.asarray(top).tolist())))
    assert np.all(np.diff(row_samples) >= 0) and float(t[0]) == float(top[-1])
    if case == "bias_nan_odd_width":
        assert 7 * m + 123 in entries and np.isnan(top[0])
    counts = np.bincount(np.asarray(list(entries)) // m, minlength=b)
    assert counts.min() != counts.max()  # samples hold different numbers of entries
    v, i, s = map(np.asarray, (v, i, s))
    for sample in range(b):
        lat = i[s == sample][v[s == sample] != 0]
        assert len(lat) == counts[sample] and np.all(np.diff(lat) > 0), sample
        assert np.count_nonzero((s == sample) & (v[:, 0] != 0)) == -(-counts[sample] // slots)


@LAYOUTS
def test_bfloat16_gradients_near_float32(batch_top):
    p, x = jax.tree.map(lambda a: a[0], _params()), _x()
    g32 = jax.grad(sparse_loss)(p, x, K, batch_top)
    g16 = jax.grad(sparse_loss)(p, x, K, batch_top, "bfloat16")
    for name, a, b in zip(sae.SAEParams._fields[:3], g16, g32):
        assert a.dtype == jnp.float32, name
        rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        assert rel < 2e-2, (name, rel)


def test_bfloat16_decode_reads_rounded_rows_and_keeps_float32_gradients():
    """decode in bfloat16 = decode of the bfloat16-rounded atoms; its VJP = the float32 VJP with
    the atoms and dL/dx^ rounded; every output and cotangent float32."""
    p = jax.tree.map(lambda a: a[0], _params())
    atoms = sae.unit_rows(p.D_MxD)
    vals, idx = sparse.topk_codes(p.W_enc_MxD, p.b_enc_M, _x(), K)
    g = jax.random.normal(jax.random.PRNGKey(7), (B, D))
    up = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)
    out16, vjp16 = jax.vjp(lambda a, v: sparse.decode(a, v, idx, "bfloat16"), atoms, vals)
    out32, vjp32 = jax.vjp(lambda a, v: sparse.decode(a, v, idx), up(atoms), vals)
    np.testing.assert_allclose(out16, out32, rtol=1e-6, atol=1e-7)
    for a, b in zip(vjp16(g), vjp32(up(g))):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert float(jnp.max(jnp.abs(out16 - sparse.decode(atoms, vals, idx)))) > 0  # it did round


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_sq_err_equals_the_squared_error_of_decode_with_its_vjp(dtype):
    """decode_sq_err (one fused pass on the CPU's native kernels) = |t - decode(...)|^2 per
    sample, with the VJP w.r.t. the atoms, the codes and the target of that composition, under
    vmap over cells; in bfloat16 within the rounding of dL/dx^ that decode's VJP applies."""
    p = _params()
    atoms = jax.vmap(sae.unit_rows)(p.D_MxD)
    vals, idx = jax.vmap(lambda w, b: sparse.topk_codes(w, b, _x(), K))(p.W_enc_MxD, p.b_enc_M)
    t = _x(5)
    g = jax.random.uniform(jax.random.PRNGKey(8), (C, B), minval=0.5, maxval=2.0)
    fused = lambda a, v, i, t: sparse.decode_sq_err(a, v, i, t, dtype)
    unfused = lambda a, v, i, t: jnp.sum(jnp.square(t - sparse.decode(a, v, i, dtype)), -1)
    outs = {}
    for name, f in (("fused", fused), ("unfused", unfused)):
        def one(a, v, i, t, g, f=f):
            out, vjp = jax.vjp(lambda a, v, t: f(a, v, i, t), a, v, t)
            return out, vjp(g)
        outs[name] = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None, 0)))(atoms, vals, idx, t, g)
    (sq, grads), (sq_ref, grads_ref) = outs["fused"], outs["unfused"]
    _close(sq, sq_ref, 1e-5)
    for name, a, b in zip(("atoms", "vals", "target"), grads, grads_ref):
        assert a.dtype == b.dtype and float(jnp.max(jnp.abs(b))) > 0, name
        _close(a, b, 1e-4 if dtype == "float32" else 2e-2)


@LAYOUTS
def test_input_gradient_equals_dense(batch_top):
    p, x = jax.tree.map(lambda a: a[0], _params()), _x()
    ref = jax.grad(dense_loss, argnums=1)(p, x, K, batch_top)
    _close(jax.grad(sparse_loss, argnums=1)(p, x, K, batch_top), ref, 1e-4)


def test_bad_compute_dtype_or_k_is_a_usage_error():
    p = jax.tree.map(lambda a: a[0], _params())
    with pytest.raises(UsageError, match="`compute_dtype` must be one of"):
        sparse.topk_codes(p.W_enc_MxD, p.b_enc_M, _x(), K, "float16")
    for bad in (0, M + 1):
        with pytest.raises(UsageError, match=r"`k` must be an integer in \[1, 32\]"):
            sparse_coo.batchtopk_rows(p.W_enc_MxD, p.b_enc_M, _x(), bad)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_sq_err_unit_equals_decode_sq_err_of_the_unit_rows(dtype):
    """decode_sq_err_unit(D, ...) (on the native kernels: codes scaled by 1/|D_i|, the unit-norm
    VJP done by the scatter) = decode_sq_err(unit_rows(D), ...), values and gradients w.r.t. D,
    the codes and the target, under vmap over cells with rows of norms 0.3 to 3; in bfloat16
    within the rounding of the rows the kernels read (D there, the unit rows in the composition)."""
    p = _params()
    vals, idx = jax.vmap(lambda w, b: sparse.topk_codes(w, b, _x(), K))(p.W_enc_MxD, p.b_enc_M)
    t = _x(5)
    g = jax.random.uniform(jax.random.PRNGKey(8), (C, B), minval=0.5, maxval=2.0)
    outs = {}
    for name, f in (("unit", lambda d, v, i, t: sparse_unit.decode_sq_err_unit(d, v, i, t, dtype)),
                    ("composed", lambda d, v, i, t: sparse.decode_sq_err(sparse_unit.unit_rows(d), v, i, t, dtype))):
        def one(d, v, i, t, g, f=f):
            out, vjp = jax.vjp(lambda d, v, t: f(d, v, i, t), d, v, t)
            return out, vjp(g)
        outs[name] = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None, 0)))(p.D_MxD, vals, idx, t, g)
    (sq, grads), (sq_ref, grads_ref) = outs["unit"], outs["composed"]
    _close(sq, sq_ref, 1e-5 if dtype == "float32" else 1e-2)
    for name, a, b in zip(("D", "vals", "target"), grads, grads_ref):
        assert a.dtype == b.dtype and float(jnp.max(jnp.abs(b))) > 0, name
        _close(a, b, 1e-4 if dtype == "float32" else 3e-2)
