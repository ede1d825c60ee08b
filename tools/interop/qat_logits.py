"""A trained LoRA-QAT run, as llama.cpp runs its GGUF export: logits of the run itself
(`lora-qat logits --model BASE --adapter RUN/adapter`, the fake-quantized forward training
used), of our reading of the exported file (`lora-qat logits --model QAT.gguf`) and of
llama.cpp over that file (llama-cpp-python, f32 KV cache, 2 threads), on the same tokens.
With `--ptq FILE` the same pair (ours vs llama.cpp) over a PTQ file of the same type shows how
far llama.cpp's own arithmetic (Q8 activations in its quantized products) moves the logits
when the weights are equal. A developer tool for issue 13's "runs in llama.cpp with the logits
our model gives", not a check with a tolerance:

    LORA_QAT_BIN=../../target/release/lora-qat $INTEROP_VENV/bin/python qat_logits.py \\
        --base smollm2-hf --adapter q4_0/adapter --gguf qat-q4_0.gguf --text MPL-2.0.txt \\
        [--ptq ptq-q4_0.gguf] [--tokens 128]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np

from common import our_logits, write_tokens


def llama_logits(path, ids):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=max(64, len(ids)), n_batch=max(64, len(ids)),
                n_threads=2, logits_all=True, type_k=0, type_v=0, flash_attn=False, verbose=False)
    llm.eval(list(map(int, ids)))
    out = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    return out


def compare(name, a, b):
    diff = np.abs(a - b)
    top1 = int((a.argmax(-1) == b.argmax(-1)).sum())
    print(f"| {name} | {diff.max():.3g} | {diff.mean():.3g} | {top1}/{len(a)} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--ptq")
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    from llama_cpp import Llama

    tok = Llama(model_path=args.gguf, vocab_only=True, verbose=False)
    ids = tok.tokenize(open(args.text, encoding="utf-8").read().encode(), add_bos=False)
    ids = ids[: args.tokens]
    work = Path(tempfile.mkdtemp(prefix="qat_logits_"))
    write_tokens(work / "tokens.safetensors", np.array([ids]))

    def ours(model, adapter=None, tag="x"):
        out = our_logits(model, work / "tokens.safetensors", work / f"{tag}.safetensors", adapter)
        return np.asarray(out["logits"], dtype=np.float64)[0]

    run = ours(args.base, args.adapter, "run")
    file_ours = ours(args.gguf, None, "file")
    file_llama = llama_logits(args.gguf, ids)
    print(f"{len(ids)} tokens of {args.text}; logits range ±{np.abs(run).max():.1f}\n")
    print("| pair | max abs | mean abs | same top-1 |")
    print("| --- | --- | --- | --- |")
    compare("the run (fake quant) vs our reading of its GGUF", run, file_ours)
    compare("the run vs llama.cpp over its GGUF", run, file_llama)
    compare("ours vs llama.cpp, same QAT GGUF", file_ours, file_llama)
    if args.ptq:
        compare("ours vs llama.cpp, same PTQ GGUF", ours(args.ptq, None, "ptq"),
                llama_logits(args.ptq, ids))


if __name__ == "__main__":
    main()
