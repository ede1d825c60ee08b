"""Reference data for the per-family adapter tests (crates/lm/tests/family_adapters.rs).

For every family directory `crates/lm/tests/data/arch/<family>/` (a tiny transformers model in
`base/` and the token batch in `io.safetensors`), PEFT makes an rsLoRA adapter (r=8, alpha=16,
`use_rslora`) and a DoRA adapter (r=4, alpha=8, `use_dora`) on every projection the family has
(Phi-3: the fused `qkv_proj` and `gate_up_proj`), with non-zero B (init_lora_weights=False, B
scaled up: B_SCALE) and, for DoRA, a magnitude moved off its initial row norms so it matters. It writes
`adapter_rslora/` and `adapter_dora/` (as PEFT saves them, plus `grads.safetensors`: the gradient
of the loss for every adapter tensor, PEFT's in-memory names without `.default`) and
`adapters_io.safetensors` with `rslora_logits`, `rslora_loss`, `dora_logits`, `dora_loss`.

Run from the repository root with the interop venv (a developer tool; tests never run it):
    /work/interop-venv/bin/python tools/interop/make_family_adapters.py [--families a,b]
Deterministic: every draw comes from torch.manual_seed(SEED + family index).
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.numpy import load_file, save_file

from tiny import target_modules

DATA = Path("crates/lm/tests/data/arch")
FAMILIES = ["llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"]
SEED = 1100

VARIANTS = {
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, use_dora=True),
}
# How much B is scaled up from PEFT's small init_lora_weights=False draw: enough to move the
# logits, not so much that f32 rounding dominates the smallest gradients (rsLoRA's scale
# alpha/sqrt(r) = 5.7 is already 2.8x LoRA's alpha/r).
B_SCALE = {"rslora": 4.0, "dora": 10.0}


def load_base(family):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        DATA / family / "base", dtype=torch.float32, attn_implementation="eager"
    )
    return model.float().eval()


def make_adapter(family, variant, seed):
    torch.manual_seed(seed)
    model = load_base(family)
    config = LoraConfig(
        target_modules=target_modules(family),
        init_lora_weights=False,
        lora_dropout=0.0,
        **VARIANTS[variant],
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(B_SCALE[variant])
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.2 * torch.randn_like(p))
    return peft_model.eval()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args()
    for i, family in enumerate(args.families.split(",")):
        d = DATA / family
        io = load_file(str(d / "io.safetensors"))
        ids = torch.from_numpy(io["input_ids"].astype(np.int64))
        labels = torch.from_numpy(io["labels"].astype(np.int64))
        out_io = {}
        for j, variant in enumerate(VARIANTS):
            peft_model = make_adapter(family, variant, SEED + 10 * i + j)
            peft_model.zero_grad()
            out = peft_model(ids, labels=labels)
            out.loss.backward()
            grads = {
                name.replace(".default", ""): p.grad.detach().numpy().copy()
                for name, p in peft_model.named_parameters()
                if p.requires_grad
            }
            adapter_dir = d / f"adapter_{variant}"
            peft_model.save_pretrained(adapter_dir)
            # A relative base path, so the file does not name this machine.
            cfg_path = adapter_dir / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = "../base"
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            save_file(grads, str(adapter_dir / "grads.safetensors"))
            out_io[f"{variant}_logits"] = out.logits.detach().numpy().copy()
            out_io[f"{variant}_loss"] = np.array([float(out.loss)], dtype=np.float32)
            (adapter_dir / "README.md").unlink(missing_ok=True)
            print(f"{family} {variant}: loss {float(out.loss):.6f}, {len(grads)} gradients")
        save_file(out_io, str(d / "adapters_io.safetensors"))


if __name__ == "__main__":
    main()
