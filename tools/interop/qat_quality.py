"""Quality of quantized GGUF files as llama.cpp measures it (`llama-perplexity
--kl-divergence`): every file and a full-precision reference GGUF run by llama.cpp
(llama-cpp-python, f32 KV cache, 2 threads) over the same held-out text, cut into chunks of
`--ctx` tokens of which the second half is scored (llama.cpp's `first = n_ctx/2`). Prints a
markdown table: mean and 99th-percentile KL(reference ‖ file) per token, top-1 agreement, and
both perplexities. A developer tool for the README's PTQ-vs-QAT table (issue 13), not a check:

    $INTEROP_VENV/bin/python qat_quality.py --reference ref-f32.gguf --text heldout.txt \\
        --llama-quantize q4_0 ptq-q4_0.gguf qat-q4_0.gguf

`--llama-quantize TYPE` (q4_0, q4_1, q5_0, q5_1, q8_0) first has llama.cpp quantize the reference
itself (`llama_model_quantize`, what `llama-quantize ref.gguf out.gguf Q4_0` does, type mix
included) to `<reference>-llama-<type>.gguf` and adds that file to the table: the baseline our
PTQ file must equal.
"""

LLAMA_FTYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9}


def llama_quantize(reference, ty):
    import ctypes
    import os

    import llama_cpp

    out = os.path.splitext(reference)[0] + f"-llama-{ty}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[ty]
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(reference.encode(), out.encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama_model_quantize({reference}, {ty}) failed with {rc}")
    return out

import argparse
import sys

import numpy as np


def chunk_logits(path, chunks, ctx):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_threads=2, logits_all=True,
                type_k=0, type_v=0, flash_attn=False, verbose=False)
    out = []
    for ids in chunks:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[:ctx], dtype=np.float64))
    llm.close()
    return out


def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--llama-quantize", choices=sorted(LLAMA_FTYPES), action="append",
                    default=[], metavar="TYPE")
    ap.add_argument("files", nargs="*")
    args = ap.parse_args()
    args.files = [llama_quantize(args.reference, t) for t in args.llama_quantize] + args.files
    if not args.files:
        sys.exit("no file to measure: give files or --llama-quantize TYPE")
    from llama_cpp import Llama

    tok = Llama(model_path=args.reference, vocab_only=True, verbose=False)
    text = open(args.text, encoding="utf-8").read()
    ids = tok.tokenize(text.encode("utf-8"), add_bos=False)
    n = len(ids) // args.ctx
    if n == 0:
        sys.exit(f"{args.text}: {len(ids)} tokens, fewer than --ctx {args.ctx}")
    chunks = [ids[i * args.ctx:(i + 1) * args.ctx] for i in range(n)]
    first = args.ctx // 2
    ref = [log_softmax(l) for l in chunk_logits(args.reference, chunks, args.ctx)]

    def nll(logp, chunk):
        # Position t predicts token t + 1.
        return [-logp[t, chunk[t + 1]] for t in range(first, args.ctx - 1)]

    ref_nll = [v for lp, c in zip(ref, chunks) for v in nll(lp, c)]
    print(f"{n} chunks of {args.ctx} tokens, {len(ref_nll)} scored ({args.text})\n")
    print("| file | mean KLD | KLD p99 | top-1 agreement | PPL(Q) | PPL(ref) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for path in args.files:
        q = [log_softmax(l) for l in chunk_logits(path, chunks, args.ctx)]
        klds, same, q_nll = [], 0, []
        for lr, lq, c in zip(ref, q, chunks):
            pr = np.exp(lr[first:args.ctx - 1])
            klds.extend((pr * (lr[first:args.ctx - 1] - lq[first:args.ctx - 1])).sum(axis=-1))
            same += int((lr[first:args.ctx - 1].argmax(-1) == lq[first:args.ctx - 1].argmax(-1)).sum())
            q_nll.extend(nll(lq, c))
        klds = np.array(klds)
        print(f"| {path} | {klds.mean():.4f} | {np.percentile(klds, 99):.4f} | "
              f"{100.0 * same / len(klds):.1f}% | {np.exp(np.mean(q_nll)):.2f} | "
              f"{np.exp(np.mean(ref_nll)):.2f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
