"""The registry of architectures: every record is consistent, the CLI and the grid's
specification take their choices from it, and a record registered by a test alone flows through
validation, the grid and `archs.encode` / `archs.loss` (adding an architecture touches its module,
the registry and tests only)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import architectures, archs, cli, export, grid, sae, toy
from sae_jax.architectures.base import Architecture, pre_acts, sum_over_latents
from sae_jax.errors import UsageError

SAELENS_ARCHITECTURES = {"standard", "topk", "jumprelu", "gated", "batchtopk"}  # SAELens 6's


def test_names_are_the_registry_in_order_and_distinct():
    assert architectures.names() == tuple(r.name for r in architectures.REGISTRY)
    assert len(set(architectures.names())) == len(architectures.REGISTRY)
    assert architectures.names()[0] == architectures.DEFAULT == archs.RELU_L1.name
    assert archs.ARCHS == architectures.names()


def test_an_unknown_name_is_a_clear_error():
    with pytest.raises(UsageError, match="unknown architecture 'gated'.*relu_l1, topk, batchtopk, jumprelu") as e:
        architectures.get("gated")
    assert e.value.field == "arch"
    with pytest.raises(UsageError, match="distinct values of relu_l1, topk, batchtopk, jumprelu"):
        grid.GridSpec.from_ratios((0.1,), (1,), 8, archs=("gated",))


@pytest.mark.parametrize("record", architectures.REGISTRY, ids=architectures.names())
def test_every_record_is_consistent(record):
    assert hash(record) == hash(dataclasses.replace(record))  # static: it can sit in jit's static args
    assert record.coeff in ("l1", "l0", "none")
    assert record.sparsity_key == {"l1": "l1", "l0": "l0_coeff"}.get(record.coeff, "k")
    assert record.uses_k == (record.coeff == "none")  # every registered one has one sparsity setting
    assert record.sparsity_name and record.sparsity_label
    assert record.title == ("" if record.name == architectures.DEFAULT else f"{record.name}: ")
    assert record.penalty_per_latent == (record.coeff != "none")
    assert 0 <= record.default_aux_k_coeff < 1
    assert dict(record.options).keys() == {k for k, _ in record.options}  # declared once each
    assert record.saelens_arch in SAELENS_ARCHITECTURES and record.dl_class
    if record.saelens_arch == "jumprelu":
        assert record.has_threshold  # SAELens's JumpReLU needs the threshold tensor


@pytest.mark.parametrize("record", architectures.REGISTRY, ids=architectures.names())
def test_every_record_has_its_export_targets(record):
    """SAELens's cfg and tensors and dictionary_learning's state dict, from one cell's weights."""
    rng = np.random.default_rng(0)
    m, d = 8, 6
    w = {"W_enc": rng.normal(size=(m, d)).astype(np.float32), "b_enc": rng.normal(size=m).astype(np.float32),
         "D_unit": rng.normal(size=(m, d)).astype(np.float32), "b_dec": rng.normal(size=d).astype(np.float32)}
    if record.has_threshold:
        w["threshold"] = np.full(m, 0.5, np.float32)
    arch = archs.Arch(record.name, 2 if record.uses_k else 0)
    cfg, tensors = export._saelens(w, arch, {})
    assert cfg["architecture"] == record.saelens_arch and ("threshold" in tensors) == record.has_threshold
    state = record.dictionary_learning(w, arch)
    assert state and all(isinstance(v, np.ndarray) for v in state.values())


def test_the_cli_takes_its_architectures_from_the_registry():
    parser = cli.build_parser()
    for name in architectures.names():
        args = parser.parse_args(["toy", "--arch", name])
        assert args.arch == (name,)
    with pytest.raises(SystemExit):
        parser.parse_args(["toy", "--arch", "gated"])
    arch_help = next(a.help for a in parser._subparsers._group_actions[0].choices["toy"]._actions
                     if "--arch" in a.option_strings)
    assert all(n in arch_help for n in architectures.names())


# ---------------------------------------------------------------------- a record of the test's own
@dataclasses.dataclass(frozen=True)
class Scaled(Architecture):
    """c = s ReLU(p) on each sample's k largest p_j, s = sum(widths) (a static option);
    S = alpha * L1(c): it reads alpha and takes k, the two ways a record declares a setting."""

    def encode(self, params, x_BxD, arch):
        pre = pre_acts(params, x_BxD)
        keep = pre >= jax.lax.top_k(pre, arch.k)[0][..., -1:]
        return jnp.where(keep, jax.nn.relu(pre), 0.0) * sum(self.option(arch, "widths"))

    def train_codes(self, params, x_BxD, coeff, arch, convention, eps):
        c = self.encode(params, x_BxD, arch)
        zero = jnp.zeros((), jnp.float32)
        return c, pre_acts(params, x_BxD), coeff * sum_over_latents(c, convention), zero


SCALED = Scaled(name="scaled", sparsity_key="l1", sparsity_name="alpha", sparsity_label="alpha",
                title="scaled: ", coeff="l1", uses_k=True, options=(("widths", (0.5, 0.5)),))


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(architectures, "REGISTRY", architectures.REGISTRY + (SCALED,))
    return SCALED


def test_a_registered_record_flows_through_validation_encode_and_loss(registered, tiny_world):
    spec = grid.GridSpec.from_ratios((0.1, 0.3), (1,), 16, archs=("relu_l1", "scaled"), k=(2, 3),
                                     arch_options=[("scaled", "widths", (1.0, 2.0))])
    groups = spec.groups()
    assert [a for a, _ in groups] == [archs.Arch("relu_l1"), archs.Arch("scaled", 2, (("widths", (1.0, 2.0)),)),
                                      archs.Arch("scaled", 3, (("widths", (1.0, 2.0)),))]
    cells = [c for c in spec.cells() if c.arch == "scaled"]
    assert [(c.k, c.coeff, c.sparsity) for c in cells] == [(2, 0.1, 0.1), (2, 0.3, 0.3), (3, 0.1, 0.1), (3, 0.3, 0.3)]
    assert spec.to_dict()["arch_options"] == [("scaled", "widths", (1.0, 2.0))]
    assert "arch_options" not in grid.GridSpec.from_ratios((0.1,), (1,), 16).to_dict()

    p = sae.init(jax.random.PRNGKey(0), 16, 16)
    x = tiny_world.features_HxD[:8]
    arch = cells[0].arch_spec
    relu = jax.nn.relu(np.asarray(archs.pre_acts(p, x)))
    c = np.asarray(archs.encode(p, x, arch))
    assert ((c > 0).sum(axis=1) <= 2).all()
    np.testing.assert_allclose(c[c > 0], 3.0 * relu[c > 0], rtol=1e-6)  # widths 1 + 2 reached the codes
    total, (aux, _) = archs.loss(p, x, jnp.float32(0.1), arch)
    default, _ = archs.loss(p, x, jnp.float32(0.1), archs.Arch("scaled", 2))  # widths 0.5 + 0.5
    assert float(total) != float(default)
    np.testing.assert_allclose(float(total), float(aux.mse) + 0.1 * float(aux.l1), rtol=1e-5)


def test_a_registered_record_trains_in_a_grid_and_exports_its_options(registered, tmp_path):
    spec = grid.GridSpec.from_ratios((0.1,), (1,), 16, archs=("scaled",), k=(2,),
                                     arch_options=[("scaled", "widths", (0.25, 1.0))])
    world = toy.make_world(jax.random.PRNGKey(0), toy.ToyConfig(d=8, features=16, mean_active=2))
    cfg = grid.TrainConfig(batch_size=16)
    state = grid.init_grid(jax.random.PRNGKey(1), spec, 8, cfg)
    state = grid.train(state, cfg, 3, world=world, progress=False)
    arch = archs.Arch("scaled", 2, (("widths", (0.25, 1.0)),))
    assert int(state.step) == 3 and state.groups[0].arch == arch
    assert not bool(state.groups[0].diverged.any())
    export.write_weights(tmp_path, state, spec)
    assert export.cell_arch(tmp_path, 0) == arch  # the same static architecture, options included


def test_a_registered_records_options_reach_the_cli_and_are_checked(registered):
    args = cli.build_parser().parse_args(["toy", "--arch", "scaled", "--k", "2", "--l1", "0.1",
                                          "--arch-option", "scaled.widths=0.25,1"])
    assert args.arch_option == [("scaled", "widths", (0.25, 1.0))]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["toy", "--arch-option", "scaled.depth=2"])
    with pytest.raises(UsageError, match="scaled has no option 'depth'"):
        grid.GridSpec.from_ratios((0.1,), (1,), 8, archs=("scaled",), k=(2,), arch_options=[("scaled", "depth", 2)])
    with pytest.raises(UsageError, match="does not include scaled"):
        grid.GridSpec.from_ratios((0.1,), (1,), 8, arch_options=[("scaled", "widths", (1.0,))])
