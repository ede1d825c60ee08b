"""Check 1: NF4/FP4 with double quantization against bitsandbytes' `quantize_4bit`.

Random shapes and blocksizes 32..4096 (some tensors with more than 256 blocks, so the nested
absmax quantization has several blocks of its own). For each quant type, our
`lora-qat quantize --double-quant` and bitsandbytes must give the same packed codes, the same
8-bit absmax codes, nested absmax and offset, and the same dequantized tensor.

The reference dequantization is `code[c] * (code2[absmax_code] * absmax2 + offset)` computed
from bitsandbytes' own state: its CPU `dequantize_4bit` (0.50.2 without the `kernels` package)
returns values that do not decode its own codes, so it is not used.
"""

import json

import numpy as np
import torch
import bitsandbytes.functional as F
from safetensors.numpy import load_file, save_file

from common import SEED, Refused, log, max_abs, ours, row, workdir

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
CASES_PER_BLOCKSIZE = 3


def random_tensor(gen, blocksize, big):
    """A random 2-D tensor; `big` ones have more than 256 blocks."""
    if big:
        rows = int(torch.randint(257 * blocksize // 512 + 1, 257 * blocksize // 256 + 64, (1,), generator=gen))
        cols = 512
    else:
        rows = int(torch.randint(1, 97, (1,), generator=gen))
        cols = int(torch.randint(1, 301, (1,), generator=gen))
    kind = int(torch.randint(0, 3, (1,), generator=gen))
    x = torch.randn(rows, cols, generator=gen)
    if kind == 1:  # heavy tails, as real weights have outliers
        x = x * torch.exp(torch.randn(rows, cols, generator=gen))
    elif kind == 2:  # a small scale with some exact zeros
        x = 0.01 * x * (torch.rand(rows, cols, generator=gen) > 0.2)
    return x.float()


def reference(x, blocksize, quant_type):
    packed, state = F.quantize_4bit(x, blocksize=blocksize, compress_statistics=True, quant_type=quant_type)
    s2 = state.state2
    codes2 = state.absmax.numpy().astype(np.int64)
    nested_blocks = np.repeat(np.arange(s2.absmax.numel()), s2.blocksize)[: codes2.size]
    absmax = s2.code.numpy()[codes2] * s2.absmax.numpy()[nested_blocks] + float(state.offset)
    flat = packed.numpy().reshape(-1)
    codes = np.stack([flat >> 4, flat & 15], axis=1).reshape(-1)[: x.numel()].astype(np.int64)
    blocks = np.arange(x.numel()) // blocksize
    dequant = state.code.numpy()[codes] * absmax.astype(np.float32)[blocks]
    return {
        "packed": flat,
        "absmax_codes": state.absmax.numpy(),
        "nested_absmax": s2.absmax.numpy(),
        "offset": float(state.offset),
        "dequant": dequant.astype(np.float32),
    }


def ours_decoded(out, name, n, blocksize):
    packed = out[name].reshape(-1)
    state = json.loads(bytes(out[f"{name}.quant_state.bitsandbytes__{QT}"]).decode())
    codes2 = out[f"{name}.absmax"].astype(np.int64)
    nested = out[f"{name}.nested_absmax"]
    nb2 = state.get("nested_blocksize", 256)
    nested_blocks = np.repeat(np.arange(nested.size), nb2)[: codes2.size]
    offset = float(state["nested_offset"])
    absmax = out[f"{name}.nested_quant_map"][codes2] * nested[nested_blocks] + offset
    codes = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:n].astype(np.int64)
    dequant = out[f"{name}.quant_map"][codes] * absmax.astype(np.float32)[np.arange(n) // blocksize]
    return {
        "packed": packed,
        "absmax_codes": out[f"{name}.absmax"],
        "nested_absmax": nested,
        "offset": offset,
        "dequant": dequant.astype(np.float32),
    }


def check(quant_type):
    global QT
    QT = quant_type
    gen = torch.Generator().manual_seed(SEED)
    d = workdir("bnb4")
    stats = dict(tensors=0, blocks=0, big=0, packed_bad=0, bytes=0, codes_bad=0, codes=0)
    errs = dict(nested=0.0, offset=0.0, dequant=0.0)
    refused = None
    for bs in BLOCKSIZES:
        inputs = {}
        for i in range(CASES_PER_BLOCKSIZE):
            big = i == CASES_PER_BLOCKSIZE - 1 and bs <= 1024  # > 256 blocks, kept small in bytes
            inputs[f"t{i}.weight"] = random_tensor(gen, bs, big)
        src, dst = d / f"in_{quant_type}_{bs}.safetensors", d / f"out_{quant_type}_{bs}.safetensors"
        save_file({k: v.numpy() for k, v in inputs.items()}, str(src))
        try:
            ours("quantize", "--method", quant_type, "--blocksize", bs, "--double-quant", src, dst)
        except Refused as e:
            refused = f"blocksize {bs}: {e}"
            continue
        out = load_file(str(dst))
        for name, x in inputs.items():
            ref, got = reference(x, bs, quant_type), ours_decoded(out, name, x.numel(), bs)
            nblocks = ref["absmax_codes"].size
            stats["tensors"] += 1
            stats["blocks"] += nblocks
            stats["big"] += nblocks > 256
            stats["bytes"] += ref["packed"].size
            stats["packed_bad"] += int(np.sum(ref["packed"] != got["packed"]))
            stats["codes"] += nblocks
            bad = int(np.sum(ref["absmax_codes"] != got["absmax_codes"]))
            stats["codes_bad"] += bad
            if bad:
                log(f"{quant_type} {tuple(x.shape)} bs={bs}: {bad}/{nblocks} absmax codes differ")
            errs["nested"] = max(errs["nested"], max_abs(ref["nested_absmax"], got["nested_absmax"]))
            errs["offset"] = max(errs["offset"], abs(ref["offset"] - got["offset"]))
            errs["dequant"] = max(errs["dequant"], max_abs(ref["dequant"], got["dequant"]))
    t = stats["tensors"]
    if refused and t == 0:
        row(f"{quant_type} double quant vs bnb", 0, None, None, "REFUSED", refused)
        return
    note = f"{t} tensors, {stats['big']} with >256 blocks, blocksizes 32..4096"
    if refused:
        note += f"; refused {refused}"
    row(f"{quant_type} packed codes", t, stats["packed_bad"], 0,
        note=f"{stats['packed_bad']}/{stats['bytes']} bytes differ; {note}")
    row(f"{quant_type} absmax codes (8-bit)", t, stats["codes_bad"], 0,
        note=f"{stats['codes_bad']}/{stats['codes']} codes differ (err = count)")
    row(f"{quant_type} nested absmax + offset", t, max(errs["nested"], errs["offset"]), 1e-6)
    row(f"{quant_type} dequantized", t, errs["dequant"], 1e-6)


if __name__ == "__main__":
    for qt in ["nf4", "fp4"]:
        check(qt)
