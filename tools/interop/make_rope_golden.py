"""Reference rotary embeddings of transformers for the rope types the families publish.

Writes crates/lm/tests/data/rope/cases.json (checked by crates/lm/tests/rope_golden.rs): for
each case a config.json-style dict (Llama or Phi-3 model_type, tiny sizes), the sequence length
of the forward, transformers' inverse frequencies and attention factor
(`ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len)`) and the cos/sin its rotary embedding
module computes for positions 0 .. seq_len-1 (first half of head_dim; the second repeats it).

Run from the repository root with the interop venv (a developer tool; tests never run it):
    /work/interop-venv/bin/python tools/interop/make_rope_golden.py
"""

import copy
import json
from pathlib import Path

import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

OUT = Path("crates/lm/tests/data/rope/cases.json")

BASE = dict(
    vocab_size=16,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
HALF = 8  # head_dim 16
SHORT = [1.0 + 0.25 * i for i in range(HALF)]
LONG = [2.0 + 0.5 * i for i in range(HALF)]

# (name, model_type, extra config keys, rope_parameters, seq_len)
CASES = [
    ("yarn defaults", "llama", {}, {"rope_type": "yarn", "factor": 4.0,
                                     "original_max_position_embeddings": 16}, 40),
    ("yarn betas, no truncation", "llama", {},
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
      "beta_fast": 8.0, "beta_slow": 2.0, "truncate": False}, 40),
    ("yarn mscale / mscale_all_dim", "llama", {},
     {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8,
      "mscale": 1.0, "mscale_all_dim": 0.5}, 33),
    ("yarn explicit attention_factor", "llama", {},
     {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32,
      "attention_factor": 1.25}, 20),
    ("yarn large theta (qwen-style)", "llama", {},
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
      "rope_theta": 1000000.0}, 40),
    ("yarn, original length at the top level", "llama",
     {"original_max_position_embeddings": 8},
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, 40),
    ("longrope phi3, short", "phi3", {"original_max_position_embeddings": 16},
     {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG}, 12),
    ("longrope phi3, long", "phi3", {"original_max_position_embeddings": 16},
     {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG}, 40),
    ("longrope explicit factor", "phi3", {"original_max_position_embeddings": 16},
     {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "factor": 2.0}, 40),
    ("longrope explicit attention_factor", "phi3", {"original_max_position_embeddings": 16},
     {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
      "attention_factor": 1.1}, 40),
    ("llama3", "llama", {},
     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16}, 30),
    ("dynamic, within", "llama", {}, {"rope_type": "dynamic", "factor": 2.0}, 30),
    ("dynamic, beyond", "llama", {"max_position_embeddings": 16},
     {"rope_type": "dynamic", "factor": 2.0}, 40),
    ("linear", "llama", {}, {"rope_type": "linear", "factor": 4.0}, 20),
]

CLASSES = {
    "llama": ("LlamaConfig", "LlamaRotaryEmbedding", "llama"),
    "phi3": ("Phi3Config", "Phi3RotaryEmbedding", "phi3"),
}


def case(name, model_type, extra, rope, seq_len):
    config_cls, rotary_cls, module = CLASSES[model_type]
    rope = {"rope_theta": 10000.0, **rope}
    fields = {**BASE, **extra, "rope_parameters": dict(rope)}
    # transformers standardizes its rope dict in place: the committed config is the input.
    config = getattr(transformers, config_cls)(**copy.deepcopy(fields))
    rope_type = config.rope_parameters["rope_type"]
    inv_freq, attention = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len)
    modeling = getattr(transformers.models, module)
    rotary = getattr(getattr(modeling, f"modeling_{module}"), rotary_cls)(config)
    x = torch.zeros(1, seq_len, 16)
    positions = torch.arange(seq_len).unsqueeze(0)
    with torch.no_grad():
        cos, sin = rotary(x, positions)
    cfg = {**fields, "model_type": model_type, "head_dim": 16,
           "architectures": ["LlamaForCausalLM" if model_type == "llama" else "Phi3ForCausalLM"]}
    return {
        "name": name,
        "config": cfg,
        "seq_len": seq_len,
        "inv_freq": [float(v) for v in inv_freq],
        "attention_factor": float(attention),
        "cos": cos[0, :, :HALF].tolist(),
        "sin": sin[0, :, :HALF].tolist(),
    }


def main():
    cases = [case(*c) for c in CASES]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    meta = {"transformers": transformers.__version__, "torch": torch.__version__}
    OUT.write_text(json.dumps({"made_with": meta, "cases": cases}) + "\n")
    for c in cases:
        print(f"{c['name']}: attention {c['attention_factor']:.6f}, inv_freq[1] {c['inv_freq'][1]:.6g}")


if __name__ == "__main__":
    main()
