"""Every native kernel on fixed inputs, its outputs saved to the .npz file named by argv[1]: run
under different builds of the library ($SAE_JAX_NATIVE_ARCH) by tests/test_native.py."""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import native


def outputs() -> dict[str, np.ndarray]:
    assert native.available(), native.status()
    r = lambda shape, seed: jax.random.normal(jax.random.PRNGKey(seed), shape)
    n, m, d, k = 48, 300, 40, 7  # widths off the 16-lane vectors: every tail runs
    pre, bias, table, x = r((2, n, m), 0), r((1, m), 1), r((2, m, d), 2), r((2, n, d), 3)
    v, i = native.topk(pre, k, bias)
    order = jnp.argsort(i, axis=-1)  # the kernel's order is unspecified: compare sorted
    out = {"topk_v": jnp.take_along_axis(v, order, -1), "topk_i": jnp.take_along_axis(i, order, -1)}
    w = jnp.maximum(v, 0.0)
    out["gather_sum"] = native.gather_sum(w, table, i)
    out["dots"] = native.dots(x, table, i)
    out["decode_err"] = jnp.concatenate([a.reshape(2, -1) for a in native.decode_err(w, table, i, x)], -1)
    out["scatter"], out["scatter_col"] = native.scatter(w, x, i, m)
    out["scatter_bf16"] = native.scatter(w, x.astype(jnp.bfloat16), i, m)[0]
    scale = 1.0 / native.row_norms(table, 1e-8)[..., 0]
    out["decode_err_scaled"] = jnp.concatenate(
        [a.reshape(2, -1) for a in native.decode_err(w, table, i, x, scale)], -1)
    out["scatter_unit"] = native.scatter(w, x, i, m, unit=(table, native.row_norms(table, 1e-8), 1e-8))[0]
    a, nrm = native.unit_rows(table * 1e20, 1e-8)
    out["unit_rows"], out["unit_rows_n"] = a, nrm / 1e20
    out["unit_rows_vjp"] = native.unit_rows_vjp(table, native.unit_rows(table, 1e-8)[1], x[:, :1] + table, 1e-8)
    pre_b = pre.transpose(1, 0, 2).at[3, 1, 17].set(jnp.nan)  # (n, 2, m): two cells' batch
    bv, bi, bs, bt = native.batch_topk(pre_b, bias[0] + r((2, m), 8), 5 * n, 8)
    out.update(batch_topk_v=bv, batch_topk_i=bi, batch_topk_s=bs, batch_topk_t=bt)
    p, g, mu, nu = r((1000,), 4), r((1000,), 5), r((1000,), 6) * 0.1, jnp.abs(r((1000,), 7)) * 0.01
    coef = jnp.array([0.9, 0.1, 0.999, 0.001, 1 / (1 - 0.9 ** 3), 1 / (1 - 0.999 ** 3), 1e-8, 0.0, 1e-3], jnp.float32)
    out["adam_check"] = native.adam_check(p, g, mu, nu, coef)
    out["adam_apply"] = jnp.stack(native.adam_apply(p, g, mu, nu, coef, jnp.zeros((1,), jnp.float32)))
    bits = jax.random.bits(jax.random.PRNGKey(9), (n, 50), jnp.uint32)
    u = lambda shape, seed: jax.random.uniform(jax.random.PRNGKey(seed), shape)  # noqa: E731
    k_s, b, g = 37, 3, 5
    par = lambda k, seed: jnp.stack([1.0 + 0.5 * r((k,), seed), 0.5 * u((k,), seed + 1), u((k,), seed + 2),  # noqa: E731
                                     1.0 + 0.3 * r((k,), seed + 3), jnp.abs(r((k,), seed + 4))])
    out["synth_solo"] = native.synth_solo(r((n, k_s), 10), bits, par(k_s, 11), 3, True)
    out["synth_solo_indep"] = native.synth_solo(jnp.zeros((1, 1)), bits, par(k_s, 11), 3, False)
    quad = jnp.array([[0.78867513, 0.21132487], [0.5, 0.5]], jnp.float32)  # 1 - t and w, 2-point Gauss-Legendre
    gate = jnp.where(u((n, g), 16) < 0.7, 1.0 + u((n, g), 17), 0.0)
    out["synth_groups"] = native.synth_groups(r((n, 4), 18), r((b * g, 4), 19), bits, par(b * g, 20), quad, gate,
                                              40, True, b)
    out["synth_groups_indep"] = native.synth_groups(jnp.zeros((1, 1)), jnp.zeros((1, 1)), bits, par(b * g, 20), quad,
                                                    gate, 40, False, b)
    return {name: np.asarray(val, np.float32) for name, val in out.items()}


if __name__ == "__main__":
    np.savez(sys.argv[1], **outputs())
