"""Adam's step with the grid's divergence rule; on the CPU, two native passes per parameter.

For a cell's parameter p with gradient g, moments (m, v) and step count t - 1 (optax.scale_by_adam,
then the learning rate lr):

    m' = (1 - b1) g + b1 m,    v' = (1 - b2) g^2 + b2 v
    u  = (m' / (1 - b1^t)) / (sqrt(v' / (1 - b2^t) + eps_root) + eps),    p' = p - lr u

The cell takes (p', m', v', t) only if its loss, every g and every p' of every parameter are
finite and it had not diverged before; otherwise it keeps (p, m, v, t - 1) and is marked diverged.

XLA:CPU runs this as one fusion per moment, per finite check and per select: about 20 passes over
each parameter's memory, a quarter of a small TopK step. On the CPU, with the native kernels in
use (`sae_jax.native.in_use`), `step` makes two: one that checks (`native.adam_check`)
and one that writes p', m', v' over p, m, v (`native.adam_apply`), with the same float32
operations rounded as XLA:CPU rounds optax's (its reciprocals and fmas), so the results are
bit-identical there (tests/test_adam.py).
Elsewhere, and for optimizer states other than optax's Adam over float32 parameters, it runs
optax.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sae_jax import native

Array = jax.Array
F32 = jnp.float32


def all_finite(tree: Any) -> Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def step(params: Any, grads: Any, opt: Any, lr: Array, ok: Array, diverged: Array, b1: float,
         b2: float, eps: float) -> tuple[Any, Any, Array]:
    """(params, opt, diverged) after one step of optax.scale_by_adam(b1, b2, eps) (state `opt`) at
    learning rate lr, with the module's divergence rule; ok: whether the loss is finite."""
    adam = optax.scale_by_adam(b1, b2, eps)
    if not _native_fits(params, opt):
        return _xla(params, grads, opt, adam, lr, ok, diverged)
    return native.on_cpu(lambda *a: _native(*a, b1=b1, b2=b2, eps=eps),
                         lambda p, g, o, lr_, ok_, d: _xla(p, g, o, adam, lr_, ok_, d))(
        params, grads, opt, lr, ok, diverged)


def _native_fits(params: Any, opt: Any) -> bool:
    return (native.in_use() and isinstance(opt, optax.ScaleByAdamState)
            and all(x.dtype == F32 for x in jax.tree.leaves((params, opt.mu, opt.nu))))


def _xla(params, grads, opt, adam, lr, ok, diverged):
    updates, new_opt = adam.update(grads, opt)
    new = jax.tree.map(lambda p, u: p - lr * u, params, updates)
    diverged = diverged | ~(ok & all_finite(grads) & all_finite(new))
    keep = lambda n, o: jnp.where(diverged, o, n)
    return jax.tree.map(keep, new, params), jax.tree.map(keep, new_opt, opt), diverged


def _native(params, grads, opt, lr, ok, diverged, *, b1, b2, eps):
    count = optax.safe_increment(opt.count)
    f = lambda x: jnp.asarray(x, F32)
    # the constants as optax and XLA form them: 1 - b (a Python float, rounded to float32 where it
    # meets the moment), and the reciprocal of 1 - b^t (XLA divides by a scalar that way)
    coef = jnp.stack([f(b1), f(1 - b1), f(b2), f(1 - b2), f(1 / (1 - b1 ** count)),
                      f(1 / (1 - b2 ** count)), f(eps), f(0.0), f(lr)])
    tree = jax.tree.structure(params)
    ops = [tree.flatten_up_to(t) for t in (params, grads, opt.mu, opt.nu)]
    checks = [native.adam_check(p, g, m, v, coef)[0] for p, g, m, v in zip(*ops)]
    diverged = diverged | ~(ok & jnp.all(jnp.stack(checks) > 0))
    keep = diverged.astype(F32)[None]
    outs = [native.adam_apply(p, g, m, v, coef, keep) for p, g, m, v in zip(*ops)]
    back = lambda i: tree.unflatten([o[i] for o in outs])
    new_opt = opt._replace(count=jnp.where(diverged, opt.count, count), mu=back(1), nu=back(2))
    return back(0), new_opt, diverged
