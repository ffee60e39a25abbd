"""`sae-jax harvest --model minilm`: the stored rows are MiniLM's activations of the real tokens only."""

import numpy as np
import pytest

from sae_jax import cli, harvest
from sae_jax.activations import open_store
from sae_jax.models import minilm

CORPUS = (
    "Sparse autoencoders learn an overcomplete dictionary.\n\n"
    "Each activation vector is written as a sparse, non-negative combination of dictionary atoms, "
    "and an L1 penalty keeps the combination sparse.\n\n\n"
    "Short.\n\n"
    "Dead latents never fire."
)


def test_sequences_cut_paragraphs_into_cls_piece_sep():
    seqs = harvest.minilm_sequences(CORPUS, context_len=12)
    assert all(s[0] == 101 and s[-1] == 102 and 3 <= len(s) <= 12 for s in seqs)
    paragraphs = minilm.encode_plain([p.strip() for p in CORPUS.split("\n\n") if p.strip()])
    assert len(paragraphs) == 4
    assert [t for s in seqs for t in s[1:-1]] == [t for ids in paragraphs for t in ids]
    assert len(seqs) == sum(-(-len(ids) // 10) for ids in paragraphs)  # pieces never span paragraphs


def test_pack_keeps_corpus_order_in_next_fit_rows():
    seqs = [[101, 5, 102], [101, 6, 7, 102], [101, 8, 9, 10, 11, 102], [101, 102]]
    ids, seg = harvest.pack(seqs, context_len=8)
    assert ids.shape == seg.shape == (2, 8)
    assert list(seg[0]) == [1, 1, 1, 2, 2, 2, 2, 0] and list(seg[1]) == [1] * 6 + [2, 2]
    assert [t for t in ids[seg > 0]] == [t for s in seqs for t in s]


def test_packed_sequences_get_the_activations_they_get_alone():
    params, cfg = minilm.load()
    a, b = minilm.tokenize(["Packed tokens attend within their own sentence."])[0][0], [101, 7592, 102]
    ids, seg = harvest.pack([list(a), b], context_len=len(a) + len(b) + 2)
    packed = minilm.forward(params, ids, seg > 0, cfg, seg)["last_hidden"][0]
    alone = [minilm.forward(params, np.array([s]), np.ones((1, len(s))), cfg)["last_hidden"][0] for s in (a, b)]
    np.testing.assert_allclose(packed[: len(a) + len(b)], np.concatenate(alone), rtol=1e-4, atol=1e-4)


def test_cli_harvest_stores_real_tokens_only(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    out = tmp_path / "store"
    assert cli.main(["harvest", "--model", "minilm", "--layer", "2", "--corpus", str(corpus), "--out", str(out),
                     "--context-len", "12", "--batch-size", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "layer 2" in printed
    store = open_store(out)
    seqs = harvest.minilm_sequences(CORPUS, context_len=12)
    assert (store.n, store.d) == (sum(map(len, seqs)), 1536)
    assert store.source["model"] == minilm.MODEL_NAME and store.source["hook_name"] == "encoder.layer.2.intermediate"

    params, cfg = minilm.load()
    expected = []
    for s in seqs:  # each sequence alone, no padding at all
        acts = minilm.forward(params, np.array([s]), np.ones((1, len(s)), np.int32), cfg)["mlp_2"]
        expected.append(np.asarray(acts[0]))
    np.testing.assert_allclose(store.read(), np.concatenate(expected), rtol=2**-10, atol=1e-3)


def test_max_tokens_cuts_exactly_and_bad_flags_exit_2(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    args = ["harvest", "--model", "minilm", "--corpus", str(corpus), "--context-len", "12", "--no-progress"]
    assert cli.main([*args, "--out", str(tmp_path / "a"), "--max-tokens", "20"]) == 0
    assert open_store(tmp_path / "a").n == 20
    capsys.readouterr()
    assert cli.main([*args, "--out", str(tmp_path / "b"), "--layer", "6"]) == 2
    assert cli.main([*args, "--out", str(tmp_path / "b"), "--context-len", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "out of range" in err[0] and "--context-len" in err[1]


@pytest.mark.parametrize("layer", [0, 5])
def test_harvest_forward_is_jitted_once_per_layer(layer):
    params, cfg = minilm.load()
    ids = np.zeros((2, 8), np.int32)
    acts = harvest._jit_minilm_layer(params, ids, np.ones_like(ids), cfg, layer)
    assert acts.shape == (16, 1536) and acts.dtype == np.float16
