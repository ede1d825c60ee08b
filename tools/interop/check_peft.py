"""Check 2: PEFT LoRA adapters both ways, for adapter files stored in f32, f16 and bf16.

* peft -> ours: PEFT makes a LoRA on a tiny random Llama; its adapter_model.safetensors is
  stored in the dtype (as published adapters are); PEFT loads it back (`PeftModel.
  from_pretrained`, f32 compute) and its logits are the reference for `lora-qat logits
  --adapter`.
* ours -> peft: `lora-qat train` (a few steps of LoRA on random tokens) saves an adapter
  (`--save-dtype` for f16/bf16 when this build has it); PEFT loads it over the same base and
  must give our `logits --adapter`.
"""

import json

import numpy as np
import torch
from peft import PeftModel
from safetensors.torch import load_file as load_torch, save_file as save_torch

from common import SEED, Refused, max_abs, our_logits, ours, ours_help, random_tokens, row, workdir, write_tokens
from tiny import add_lora, tiny_model

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
TOL = 1e-4  # absolute, logits of magnitude ~3, f32 compute on both sides


def store_as(adapter_dir, dtype):
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_torch(str(path))
    save_torch({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(path))


def peft_logits(base_dir, adapter_dir, ids):
    base = tiny_model("llama", SEED)  # same seed as the saved base
    base.load_state_dict(load_torch(str(base_dir / "model.safetensors")), strict=False)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy()


def setup():
    d = workdir("peft")
    base = tiny_model("llama", SEED)
    base.save_pretrained(d / "base")
    gen = torch.Generator().manual_seed(SEED + 1)
    ids, labels = random_tokens(gen, base.config.vocab_size)
    write_tokens(d / "tokens.safetensors", ids)
    with open(d / "train.jsonl", "w") as f:
        for _ in range(8):
            seq = torch.randint(0, base.config.vocab_size, (12,), generator=gen).tolist()
            f.write(json.dumps({"input_ids": seq}) + "\n")
    return d, ids


def peft_to_ours(d, ids, name, dtype):
    adapter = d / f"peft_adapter_{name}"
    peft_model = add_lora(tiny_model("llama", SEED), "llama", SEED + 2)
    peft_model.save_pretrained(adapter)
    store_as(adapter, dtype)
    reference = peft_logits(d / "base", adapter, ids)
    try:
        got = our_logits(d / "base", d / "tokens.safetensors", d / f"logits_{name}.safetensors", adapter)
    except Refused as e:
        row(f"PEFT {name} adapter -> our logits", 1, None, TOL, "REFUSED", str(e)[:160])
        return
    row(f"PEFT {name} adapter -> our logits", 1, max_abs(reference, got["logits"]), TOL)


def ours_to_peft(d, ids, name):
    out = d / f"ours_{name}"
    args = ["train", "--model", d / "base", "--data", d / "train.jsonl", "--out", out,
            "--rank", 4, "--max-steps", 3, "--batch-size", 4, "--lr", 0.05, "--seed", SEED, "--quiet"]
    if name != "f32":
        if "--save-dtype" not in ours_help("train"):
            row(f"our {name} adapter -> PEFT logits", 0, None, TOL, "REFUSED",
                "this build of `lora-qat train` has no --save-dtype")
            return
        args += ["--save-dtype", name]
    try:
        ours(*args)
        got = our_logits(d / "base", d / "tokens.safetensors", d / f"ours_logits_{name}.safetensors", out / "adapter")
    except Refused as e:
        row(f"our {name} adapter -> PEFT logits", 1, None, TOL, "REFUSED", str(e)[:160])
        return
    stored = {str(v.dtype) for v in load_torch(str(out / "adapter" / "adapter_model.safetensors")).values()}
    reference = peft_logits(d / "base", out / "adapter", ids)
    row(f"our {name} adapter -> PEFT logits", 1, max_abs(reference, got["logits"]), TOL,
        note=f"stored as {','.join(sorted(stored))}")


if __name__ == "__main__":
    d, ids = setup()
    for name, dtype in DTYPES.items():
        peft_to_ours(d, ids, name, dtype)
    for name in DTYPES:
        ours_to_peft(d, ids, name)
