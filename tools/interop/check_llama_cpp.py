"""Check 4: GGUF files we export, run by llama.cpp (llama-cpp-python built from source).

* a tiny random Llama exported as f32: llama.cpp's logits equal our `lora-qat logits`;
* the same with a PEFT LoRA merged (`export-gguf --adapter`) and as a separate llama.cpp LoRA
  adapter (`export-gguf --adapter --lora`, applied by llama.cpp over the f32 base);
* SmolLM2-135M (the HF f32 directory of `cargo xtask real-model`, `$LORA_QAT_REAL_MODEL_HF`)
  exported as f32, when that directory exists.

llama.cpp runs with an f32 KV cache (its default f16 cache alone costs ~1e-3) on 2 threads.
"""

import os
from pathlib import Path

import numpy as np
import torch

from common import SEED, Refused, byte_level_tokenizer, log, max_abs, our_logits, ours, row, workdir, write_tokens
from tiny import add_lora, tiny_model

TOL = 1e-3  # absolute, f32 export
GGML_TYPE_F32 = 0


def llama_cpp_logits(model_path, ids, lora_path=None):
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), lora_path=None if lora_path is None else str(lora_path),
                n_ctx=max(64, len(ids)), n_batch=max(64, len(ids)), n_threads=2, logits_all=True,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False, verbose=False)
    llm.eval(list(map(int, ids)))
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return logits


def compare(check, gguf, model_dir, ids, d, adapter=None, lora=None, tol=TOL):
    write_tokens(d / "tokens.safetensors", ids[None, :])
    try:
        ours_out = our_logits(model_dir, d / "tokens.safetensors", d / "ours.safetensors", adapter)
    except Refused as e:
        row(check, 1, None, tol, "REFUSED", str(e)[:160])
        return
    theirs = llama_cpp_logits(gguf, ids, lora)
    scale = float(np.max(np.abs(theirs)))
    row(check, 1, max_abs(ours_out["logits"][0], theirs), tol,
        note=f"{len(ids)} tokens, max |logit| {scale:.1f}")


def export(*args):
    try:
        ours("export-gguf", *args)
        return True
    except Refused as e:
        return str(e)


def tiny_checks():
    d = workdir("llama_cpp/tiny")
    model = tiny_model("llama", SEED, hidden_size=64, intermediate_size=128, vocab_size=96)
    model.save_pretrained(d / "base")
    byte_level_tokenizer(96, d / "base")
    add_lora(model, "llama", SEED + 1).save_pretrained(d / "adapter")
    ids = torch.randint(0, 96, (24,), generator=torch.Generator().manual_seed(SEED)).numpy()
    cases = [
        ("tiny llama f32 GGUF", "base.gguf", [], None, False),
        ("tiny llama + LoRA merged GGUF", "merged.gguf", ["--adapter", d / "adapter"], d / "adapter", False),
        ("tiny llama + GGUF LoRA (--lora)", "lora.gguf", ["--adapter", d / "adapter", "--lora"], d / "adapter", True),
    ]
    for check, name, extra, adapter, is_lora in cases:
        done = export("--model", d / "base", "--out", d / name, "--type", "f32", *extra)
        if done is not True:
            row(check, 0, None, TOL, "REFUSED", done[:160])
            continue
        gguf, lora = (d / "base.gguf", d / name) if is_lora else (d / name, None)
        compare(check, gguf, d / "base", ids, d, adapter=adapter, lora=lora)


def smollm2_check():
    hf = Path(os.environ.get("LORA_QAT_REAL_MODEL_HF", "target/real-model/smollm2-hf"))
    if not (hf / "config.json").is_file():
        row("SmolLM2-135M f32 GGUF", 0, None, TOL, "SKIP", f"no {hf} (run `cargo xtask real-model`)")
        return
    d = workdir("llama_cpp/smollm2")
    gguf = d / "smollm2-f32.gguf"
    if not gguf.is_file():
        done = export("--model", hf, "--out", gguf, "--type", "f32")
        if done is not True:
            row("SmolLM2-135M f32 GGUF", 0, None, TOL, "REFUSED", done[:160])
            return
    # "The capital of France is" and a few more ids, as SmolLM2's tokenizer gives them.
    ids = np.array([1, 504, 3575, 282, 4649, 314, 260, 1345, 30, 198, 5248, 28, 9047, 253, 2], dtype=np.int64)
    compare("SmolLM2-135M f32 GGUF", gguf, hf, ids, d)


if __name__ == "__main__":
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        row("llama.cpp checks", 0, None, None, "SKIP", f"llama-cpp-python not installed: {e}")
        raise SystemExit(0)
    tiny_checks()
    smollm2_check()
    log("llama.cpp checks done")
