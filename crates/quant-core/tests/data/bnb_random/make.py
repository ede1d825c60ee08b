"""Developer tool (never run by the build or tests): regenerates the random bitsandbytes cases
of `tests/nf4_bnb_random.rs` with the interop venv:

    /work/interop-venv/bin/python crates/quant-core/tests/data/bnb_random/make.py

Each case is one safetensors file: `input` f32 [rows, cols] (normal values times a per-row
log-normal scale, so block absmaxes spread over decades as in real weights), and what
`bitsandbytes.functional.quantize_4bit(..., compress_statistics=True)` returned on the CPU:
`packed` u8, `absmax_codes` u8 (the double-quantized absmax), `absmax2` f32, `offset` f32[1].
metadata: blocksize, quant_type, seed, bitsandbytes and torch versions.
"""
import os

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
from safetensors.torch import save_file

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
# (rows, cols, blocksize, quant_type, seed): blocksizes 32..4096, several with > 256 blocks
# (more than one nested block), short last blocks, and the 96x80 at blocksize 64.
CASES = [
    (96, 80, 64, "nf4", 16),
    (20, 512, 32, "nf4", 1),
    (33, 130, 128, "nf4", 2),
    (64, 300, 64, "fp4", 3),
    (24, 1024, 256, "nf4", 4),
    (8, 2048, 512, "fp4", 5),
    (3, 3000, 1024, "nf4", 6),
    (2, 4096, 2048, "nf4", 7),
    (2, 5000, 4096, "fp4", 8),
    (130, 70, 32, "nf4", 9),
]

for rows, cols, bs, qt, seed in CASES:
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(rows, 1, generator=g) * 1.5) * 0.02
    x = (torch.randn(rows, cols, generator=g) * scale).contiguous()
    packed, state = F.quantize_4bit(x, blocksize=bs, compress_statistics=True, quant_type=qt)
    name = f"r{rows}x{cols}_b{bs}_{qt}"
    save_file(
        {
            "input": x,
            "packed": packed.reshape(-1).contiguous(),
            "absmax_codes": state.absmax.reshape(-1).contiguous(),
            "absmax2": state.state2.absmax.reshape(-1).float().contiguous(),
            "offset": state.offset.reshape(1).float(),
        },
        os.path.join(HERE, name + ".safetensors"),
        metadata={
            "blocksize": str(bs),
            "quant_type": qt,
            "seed": str(seed),
            "bitsandbytes": bnb.__version__,
            "torch": torch.__version__,
        },
    )
    print(name, x.numel() // bs + (x.numel() % bs > 0), "blocks")
