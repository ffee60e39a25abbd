"""Byte LM: corpus formats, tokenizer, entropy, schedule, learning, model files, and the CLI."""

import argparse
import json
import math
import shutil

import jax
import numpy as np
import pytest

from sae_jax import cli_lm, lm
from sae_jax.activations import open_store
from sae_jax.errors import UsageError
from sae_jax.transformer import TransformerConfig

TINY = TransformerConfig(n_layers=2, d_model=32, n_heads=2, d_mlp=64, context_len=16)


def test_corpus_formats(tmp_path):
    (tmp_path / "one.txt").write_text("héllo wörld", encoding="utf-8")
    assert lm.load_corpus(tmp_path / "one.txt") == "héllo wörld"

    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "b.txt").write_text("second")
    (docs / "a.txt").write_text("first")
    (docs / "sub" / "c.txt").write_text("third")
    (docs / "skip.md").write_text("not text")
    assert lm.load_corpus(docs) == "first\n\nsecond\n\nthird"

    rows = [{"text": "alpha", "id": 1}, {"text": "beta"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert lm.load_corpus(tmp_path / "c.jsonl") == "alpha\n\nbeta"
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "gamma"}))
    assert lm.load_corpus(tmp_path / "d.jsonl", text_field="body") == "gamma"


def test_bad_corpora_raise_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        lm.load_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no .txt files"):
        lm.load_corpus(tmp_path / "empty")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(UsageError, match="bad.jsonl:2"):
        lm.load_corpus(tmp_path / "bad.jsonl")
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(UsageError, match="empty"):
        lm.load_corpus(tmp_path / "blank.txt")


def test_default_corpus_is_bundled_python_documentation():
    text = lm.load_corpus(None)
    assert len(text.encode()) > 300_000
    assert "The \"if\" statement is used for conditional execution" in text


def test_byte_tokenizer_and_unigram_entropy():
    text = "naïve café ✓"
    tokens = lm.encode(text)
    assert tokens.dtype == np.uint8 and len(tokens) == len(text.encode("utf-8"))
    assert lm.decode(tokens) == text
    assert lm.unigram_entropy(np.array([0, 1, 2, 3] * 5)) == pytest.approx(math.log(4))
    assert lm.unigram_entropy(np.array([7] * 9)) == 0.0


def test_schedule_warms_up_over_one_percent_then_cosine():
    tcfg = lm.LMTrainConfig(steps=1000, lr=1e-3, min_lr_frac=0.1)
    sched = lm.lr_schedule(tcfg)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(5e-4)
    assert float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(505)) == pytest.approx(0.55e-3, rel=1e-3)
    assert float(sched(1000)) == pytest.approx(1e-4)


def test_weight_decay_spares_biases_and_layernorm():
    tcfg = lm.LMTrainConfig(steps=10, lr=1e-2, weight_decay=0.5)
    state = lm.init_state(jax.random.key(0), TINY, tcfg)
    zero = jax.tree.map(np.zeros_like, state.params)
    update = jax.jit(lm.make_optimizer(tcfg).update)
    _, opt_state = update(zero, state.opt_state, state.params)  # step 0 has learning rate 0
    updates, _ = update(zero, opt_state, state.params)
    moved = jax.tree.map(lambda u: bool(np.any(np.asarray(u) != 0)), updates)
    assert not any(jax.tree.leaves(moved["ln_f"])) and not moved["block_0"]["mlp_in"]["bias"]
    assert moved["block_0"]["mlp_in"]["kernel"] and moved["wte"]["embedding"]


def test_loss_falls_well_below_unigram_entropy_on_a_tiny_corpus():
    text = "the quick brown fox jumps over the lazy dog. " * 60
    tokens = lm.encode(text)
    tcfg = lm.LMTrainConfig(steps=150, batch_size=16, lr=3e-3, val_fraction=0.1)
    params, info = lm.train_lm(tokens, TINY, tcfg, progress=False)
    h = lm.unigram_entropy(tokens)
    assert info["unigram_entropy"] == pytest.approx(h)
    assert info["loss_history"][0] > h  # starts near ln 256
    assert info["final_train_loss"] < 0.5 * h
    assert info["val_loss"] < 0.5 * h
    # the run is a pure function of its config
    _, again = lm.train_lm(tokens, TINY, lm.LMTrainConfig(steps=3, batch_size=16, lr=3e-3), progress=False)
    _, again2 = lm.train_lm(tokens, TINY, lm.LMTrainConfig(steps=3, batch_size=16, lr=3e-3), progress=False)
    assert again["loss_history"] == again2["loss_history"]


def test_model_files_round_trip(tmp_path):
    params = lm.init_state(jax.random.key(1), TINY, lm.LMTrainConfig()).params
    lm.save_model(tmp_path / "m", params, TINY, {"note": 1})
    loaded, cfg = lm.load_model(tmp_path / "m")
    assert cfg == TINY
    assert jax.tree.all(jax.tree.map(np.array_equal, params, loaded))
    with pytest.raises(UsageError, match="not a trained model"):
        lm.load_model(tmp_path)


def _cli(*argv):
    parser = argparse.ArgumentParser(prog="sae-jax")
    cli_lm.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_train_then_harvest(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefgh " * 200)
    tiny = ["--layers", "2", "--d-model", "32", "--heads", "2", "--d-mlp", "64", "--context-len", "16"]
    assert _cli("train-lm", "--corpus", str(corpus), "--out", str(tmp_path / "m"), "--steps", "5",
                "--batch-size", "4", "--no-progress", *tiny) == 0
    info = json.loads((tmp_path / "m" / "train_info.json").read_text())
    assert info["steps"] == 5 and info["corpus"] == str(corpus)
    assert "unigram entropy" in capsys.readouterr().out
    assert _cli("harvest", "--model", str(tmp_path / "m"), "--layer", "1", "--out", str(tmp_path / "s"),
                "--max-tokens", "100", "--no-progress") == 0
    store = open_store(tmp_path / "s")
    assert (store.n, store.d) == (100, 64) and store.source["corpus"] == str(corpus)

    with pytest.raises(UsageError, match="already exists"):
        _cli("harvest", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "s"), "--no-progress")
    with pytest.raises(UsageError, match="--layer 2 is out of range"):
        _cli("harvest", "--model", str(tmp_path / "m"), "--layer", "2", "--out", str(tmp_path / "t"))
    with pytest.raises(UsageError, match="--max-tokens must be positive"):
        _cli("harvest", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "t"), "--max-tokens", "0")
    with pytest.raises(UsageError, match="not a trained model"):
        _cli("harvest", "--model", str(tmp_path), "--out", str(tmp_path / "t"))


def test_cli_train_lm_bad_input(tmp_path):
    out = str(tmp_path / "m")
    with pytest.raises(UsageError, match="corpus not found"):
        _cli("train-lm", "--corpus", str(tmp_path / "nope.txt"), "--out", out)
    with pytest.raises(UsageError, match="--steps must be positive"):
        _cli("train-lm", "--out", out, "--steps", "0")
    with pytest.raises(UsageError, match="divisible"):
        _cli("train-lm", "--out", out, "--d-model", "30", "--heads", "4")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="`out` .* is not writable"):
        _cli("train-lm", "--out", str(tmp_path / "file" / "sub"), "--steps", "1")


def test_train_lm_resumes_from_a_checkpoint_to_the_same_parameters(tmp_path):
    tokens = lm.encode("the quick brown fox jumps over the lazy dog. " * 40)
    cfg = TransformerConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64, context_len=16)
    tcfg = lm.LMTrainConfig(steps=12, batch_size=4)
    run_config = {"steps": 12}
    ref, _ = lm.train_lm(tokens, cfg, tcfg, progress=False)
    ckpts = tmp_path / "ckpt"
    lm.train_lm(tokens, cfg, tcfg, progress=False, checkpoint_dir=ckpts, checkpoint_every=4,
                run_config=run_config)
    shutil.rmtree(ckpts / "12")  # as if killed after step 8 was saved
    resumed, info = lm.train_lm(tokens, cfg, tcfg, progress=False, checkpoint_dir=ckpts,
                                checkpoint_every=4, resume=True, run_config=run_config)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(info["loss_history"]) == 12
    with pytest.raises(UsageError, match="different arguments"):
        lm.train_lm(tokens, cfg, tcfg, progress=False, checkpoint_dir=ckpts, checkpoint_every=4,
                    resume=True, run_config={"steps": 13})
