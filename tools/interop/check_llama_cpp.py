"""Check 4: GGUF files we export, run by llama.cpp (llama-cpp-python built from source).

* for every family (llama, llama with the Llama 3.1 rope, mistral, qwen2, qwen3, gemma2,
  gemma3, phi3, phi3 with LongRoPE) a tiny random model exported as f32: llama.cpp's logits
  equal our `lora-qat logits` over 24 tokens (longer than the tiny sliding windows of 4);
* the same with a PEFT LoRA merged (`export-gguf --adapter`) and as a separate llama.cpp LoRA
  adapter (`export-gguf --adapter --lora`, applied by llama.cpp over the f32 base);
  an architecture llama.cpp does not load is reported as its error (status FAIL, note says);
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
# Gemma: ggml's CPU GELU reads a table of f16 values (GGML_GELU_FP16), ~1e-3 off the exact
# tanh-GELU at every position (sliding windows or not); the other families use SiLU.
TOL_GELU = 3e-3
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


def longrope_factors(head_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    half = head_dim // 2
    short = (1.0 + 0.5 * torch.rand(half, generator=gen)).tolist()
    long = (1.0 + 4.0 * torch.rand(half, generator=gen)).tolist()
    return short, long


def family_cases():
    """(label, tiny.py family, config overrides) of every family llama.cpp is checked on."""
    short, long = longrope_factors(16, SEED)
    return [
        ("llama", "llama", {}),
        ("llama3 rope", "llama", {"rope_parameters": {
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
        ("mistral", "mistral", {}),  # window 4: refused (llama.cpp's llama has no window)
        ("mistral window >= context", "mistral", {"sliding_window": 64}),
        ("qwen2", "qwen2", {}),
        ("qwen3", "qwen3", {}),
        ("gemma2", "gemma2", {"tie_word_embeddings": True}),  # llama.cpp has no gemma2 `output`
        ("gemma3", "gemma3", {}),
        ("phi3", "phi3", {}),
        ("phi3 sliding window", "phi3", {"sliding_window": 4}),  # refused: llama.cpp's phi3 attends to all
        ("phi3 longrope", "phi3", {"max_position_embeddings": 64, "original_max_position_embeddings": 16,
                                   "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                                       "short_factor": short, "long_factor": long}}),
    ]


def tiny_checks():
    for label, family, overrides in family_cases():
        d = workdir("llama_cpp/" + label.replace(" ", "_"))
        model = tiny_model(family, SEED, hidden_size=64, intermediate_size=128, vocab_size=96, **overrides)
        model.save_pretrained(d / "base")
        byte_level_tokenizer(96, d / "base")
        add_lora(model, family, SEED + 1).save_pretrained(d / "adapter")
        ids = torch.randint(0, 96, (24,), generator=torch.Generator().manual_seed(SEED)).numpy()
        cases = [
            (f"tiny {label} f32 GGUF", "base.gguf", [], None, False),
            (f"tiny {label} + LoRA merged GGUF", "merged.gguf", ["--adapter", d / "adapter"], d / "adapter", False),
            (f"tiny {label} + GGUF LoRA (--lora)", "lora.gguf", ["--adapter", d / "adapter", "--lora"], d / "adapter", True),
        ]
        for check, name, extra, adapter, is_lora in cases:
            done = export("--model", d / "base", "--out", d / name, "--type", "f32", *extra)
            if done is not True:
                row(check, 0, None, TOL, "REFUSED", done[:160])
                continue
            gguf, lora = (d / "base.gguf", d / name) if is_lora else (d / name, None)
            tol = TOL_GELU if family.startswith("gemma") else TOL
            try:
                compare(check, gguf, d / "base", ids, d, adapter=adapter, lora=lora, tol=tol)
            except Exception as e:  # llama.cpp refusing the file: report its words
                row(check, 0, None, tol, "FAIL", f"llama.cpp: {type(e).__name__}: {e}"[:200])


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
