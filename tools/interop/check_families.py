"""Check 3: logits, loss and adapter gradients of every model family against transformers+PEFT.

For each family a tiny random model (seeded, f32, eager attention; Gemma's sliding window and
soft-capping, Qwen's biases and q/k norms, Phi-3's fused projections all active) and a PEFT LoRA
with non-zero B on every projection. Ours: `lora-qat logits --adapter` and `lora-qat grads`.
A family our binary does not load yet is REFUSED (the row passes once it lands).
"""

import numpy as np
import torch
from safetensors.numpy import load_file

from common import SEED, Refused, log, max_abs, our_logits, ours, random_tokens, row, workdir, write_tokens
from tiny import FAMILIES, add_lora, tiny_model

LOGITS_TOL = 1e-4  # absolute, on logits of magnitude ~3
GRAD_TOL = 1e-4  # relative to the largest |gradient| of the adapter


def reference(peft_model, ids, labels):
    peft_model.zero_grad()
    out = peft_model(torch.from_numpy(ids), labels=torch.from_numpy(labels))
    out.loss.backward()
    grads = {
        name.replace(".default", ""): p.grad.detach().numpy()
        for name, p in peft_model.named_parameters()
        if p.requires_grad
    }
    return out.logits.detach().numpy(), float(out.loss), grads


def check(family, seed):
    d = workdir(f"families/{family}")
    model = tiny_model(family, seed)
    model.save_pretrained(d / "base")
    peft_model = add_lora(model, family, seed + 1)
    peft_model.save_pretrained(d / "adapter")
    gen = torch.Generator().manual_seed(seed + 2)
    ids, labels = random_tokens(gen, model.config.vocab_size)
    write_tokens(d / "tokens.safetensors", ids, labels)
    logits, loss, grads = reference(peft_model, ids, labels)
    try:
        got = our_logits(d / "base", d / "tokens.safetensors", d / "logits.safetensors", d / "adapter")
    except Refused as e:
        row(f"{family} logits + LoRA", 1, None, LOGITS_TOL, "REFUSED", str(e)[:160])
        return
    err = max(max_abs(logits, got["logits"]), abs(loss - float(got["loss"][0])))
    row(f"{family} logits + LoRA", 1, err, LOGITS_TOL, note="logits and loss, abs")
    try:
        ours("grads", "--model", d / "base", "--adapter", d / "adapter",
             "--tokens", d / "tokens.safetensors", "--out", d / "grads.safetensors")
    except Refused as e:
        row(f"{family} adapter gradients", 1, None, GRAD_TOL, "REFUSED", str(e)[:160])
        return
    ours_grads = load_file(str(d / "grads.safetensors"))
    missing = sorted(set(grads) - set(ours_grads))
    scale = max(float(np.max(np.abs(g))) for g in grads.values())
    rel = max(max_abs(g, ours_grads[k]) for k, g in grads.items() if k in ours_grads) / scale
    if missing:
        log(f"{family}: gradients missing for {missing[:3]}")
        row(f"{family} adapter gradients", len(grads), rel, GRAD_TOL, "FAIL",
            f"{len(missing)} tensors missing, e.g. {missing[0]}")
    else:
        row(f"{family} adapter gradients", len(grads), rel, GRAD_TOL,
            note="tensors; max abs error / max |grad|")


if __name__ == "__main__":
    for i, family in enumerate(FAMILIES):
        check(family, SEED + 10 * i)
