"""Tiny random models of every family, made by transformers from a seed, and PEFT adapters on
them (init_lora_weights=False, so B is non-zero and the adapter changes the logits)."""

import torch
import transformers
from peft import LoraConfig, get_peft_model

from common import perturb_

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# Per family: (config class, model class, extra config, norms stored as w with scale 1 + w).
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, False),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, False),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}, False),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}, False),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 4,
         "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
        True,
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 4,
         "layer_types": ["sliding_attention", "full_attention"]},
        True,
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}, False),
}

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3_PROJECTIONS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def tiny_model(family, seed, **overrides):
    """A seeded random model of `family` in f32 with eager attention."""
    config_cls, model_cls, extra, gemma_norms = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    perturb_(model, gemma_norms=gemma_norms, seed=seed)
    return model


def target_modules(family):
    return PHI3_PROJECTIONS if family == "phi3" else PROJECTIONS


def add_lora(model, family, seed, r=4, alpha=8, **extra):
    """Wrap `model` in a PEFT LoRA with random non-zero A and B."""
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules(family),
                        init_lora_weights=False, lora_dropout=0.0, **extra)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # PEFT's init_lora_weights=False B is small; make it matter
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(10.0)
    return peft_model.eval()
