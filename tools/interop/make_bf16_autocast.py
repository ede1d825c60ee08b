"""Reference outputs of PyTorch's CPU bf16 autocast for `--compute-dtype bf16`.

Writes crates/lm/tests/data/llama/bf16_autocast.safetensors (checked by
crates/lm/tests/bf16.rs): the tiny Llama of crates/lm/tests/data/llama/base with the PEFT LoRA
of adapter_lora (r=4, alpha=8, B non-zero), run on io.safetensors' `input_ids` / `labels`
inside `torch.autocast("cpu", dtype=torch.bfloat16)` — every linear and matmul with bf16
operands, f32 master weights, the loss in f32 — and differentiated for the LoRA tensors:

* `logits` f32[2, 8, 64] (autocast's lm_head output is bf16; stored widened to f32),
* `loss` f32[1] (transformers' mean shifted cross-entropy),
* `grad.<PEFT key>` f32 for every `lora_A` / `lora_B` tensor (keys as in the adapter file).

and the same three under `emulated_` / `emulated_grad.`: the f32 model with every product
(`F.linear`, eager attention's two matmuls, forward and backward) given bf16-rounded operands
and f32 sums and outputs — the arithmetic `--compute-dtype bf16` promises, built from torch
independently of our kernels, so that our bf16 path can be held to f32-summation accuracy.

Run from the repository root with the interop venv (a developer tool; tests never run it):
    /work/interop-venv/bin/python tools/interop/make_bf16_autocast.py
"""

from pathlib import Path

import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file, save_file

DATA = Path("crates/lm/tests/data/llama")
OUT = DATA / "bf16_autocast.safetensors"


def rounded(t):
    """Round to bf16 (nearest even), back in f32."""
    return t.to(torch.bfloat16).to(torch.float32)


class RoundedMatmul(torch.autograd.Function):
    """`scale·(r(a) @ r(b))`, backward `scale·(r(g) @ r(b)ᵀ)`, `scale·(r(a)ᵀ @ r(g))`."""

    @staticmethod
    def forward(ctx, a, b, scale):
        ra, rb = rounded(a), rounded(b)
        ctx.save_for_backward(ra, rb)
        ctx.scale = scale
        return scale * (ra @ rb)

    @staticmethod
    def backward(ctx, g):
        ra, rb = ctx.saved_tensors
        rg = rounded(g)
        return ctx.scale * (rg @ rb.transpose(-1, -2)), ctx.scale * (ra.transpose(-1, -2) @ rg), None


def rounded_linear(x, weight, bias=None):
    y = RoundedMatmul.apply(x, weight.t(), 1.0)
    return y if bias is None else y + bias


def rounded_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0,
                            **kwargs):
    from transformers.models.llama.modeling_llama import repeat_kv

    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    weights = RoundedMatmul.apply(query, key_states.transpose(2, 3), scaling)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32)
    out = RoundedMatmul.apply(weights, value_states, 1.0)
    return out.transpose(1, 2).contiguous(), weights


def run(io, emulate):
    base = transformers.LlamaForCausalLM.from_pretrained(
        DATA / "base", dtype=torch.float32, attn_implementation="eager"
    )
    model = PeftModel.from_pretrained(base, DATA / "adapter_lora", is_trainable=True)
    model.train()  # the adapter has no dropout: train mode only enables gradients
    if emulate:
        import transformers.models.llama.modeling_llama as llama

        linear, attention = torch.nn.functional.linear, llama.eager_attention_forward
        torch.nn.functional.linear = rounded_linear
        llama.eager_attention_forward = rounded_eager_attention
        try:
            out = model(input_ids=io["input_ids"], labels=io["labels"])
            out.loss.backward()
        finally:
            torch.nn.functional.linear, llama.eager_attention_forward = linear, attention
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=io["input_ids"], labels=io["labels"])
        out.loss.float().backward()
    prefix = "emulated_" if emulate else ""
    tensors = {
        f"{prefix}logits": out.logits.detach().float().contiguous(),
        f"{prefix}loss": out.loss.detach().float().reshape(1),
    }
    for name, p in model.named_parameters():
        if "lora_" in name:
            key = name.replace(".default", "")
            tensors[f"{prefix}grad.{key}"] = p.grad.detach().float().contiguous()
    return tensors


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    io = load_file(DATA / "io.safetensors")
    tensors = run(io, emulate=False)
    emulated = run(io, emulate=True)
    tensors.update(emulated)
    diff = (emulated["emulated_logits"] - tensors["logits"]).abs().max().item()
    print(f"emulated vs autocast logits: max |diff| {diff:.3e}")
    f32 = io["lora_logits"]
    diff = (tensors["logits"] - f32).abs().max().item()
    print(f"autocast vs f32 logits: max |diff| {diff:.3e} (max |logit| {f32.abs().max():.3f})")
    print(f"loss autocast {tensors['loss'].item():.6f} vs f32 {io['lora_loss'].item():.6f}")
    save_file(tensors, OUT, metadata={"torch": torch.__version__,
                                      "transformers": transformers.__version__})
    print(f"wrote {OUT} ({len(tensors)} tensors)")


if __name__ == "__main__":
    main()
