"""Developer tool (never run by the build or tests): random ggml blocks of every block type
and their dequantization by gguf-py (a port of ggml's dequantize_row_*), written to
random_blocks.safetensors beside this file. The random bytes cover every code and scale bit
pattern; the f16 scale fields are overwritten with finite values so no NaN/inf appears.

    /work/interop-venv/bin/python make_random_blocks.py
"""
import os
import numpy as np
from gguf import quants, GGMLQuantizationType as T
from safetensors.numpy import save_file

rng = np.random.default_rng(20261201)
# (type, block values, block bytes, byte offsets of the f16 scale fields)
LAYOUTS = {
    "q4_0": (T.Q4_0, 32, 18, [0]),
    "q4_1": (T.Q4_1, 32, 20, [0, 2]),
    "q5_0": (T.Q5_0, 32, 22, [0]),
    "q5_1": (T.Q5_1, 32, 24, [0, 2]),
    "q8_0": (T.Q8_0, 32, 34, [0]),
    "q2_k": (T.Q2_K, 256, 84, [80, 82]),
    "q3_k": (T.Q3_K, 256, 110, [108]),
    "q4_k": (T.Q4_K, 256, 144, [0, 2]),
    "q5_k": (T.Q5_K, 256, 176, [0, 2]),
    "q6_k": (T.Q6_K, 256, 210, [208]),
}
N_VALUES = 1024
out = {}
for name, (ty, bv, bb, scale_at) in LAYOUTS.items():
    nb = N_VALUES // bv
    blocks = rng.integers(0, 256, size=(nb, bb), dtype=np.uint8)
    for at in scale_at:
        # Signed scales of magnitude 2^-14 .. 2^2 (normal f16), the last block subnormal.
        mag = np.exp2(rng.uniform(-14, 2, size=nb)) * rng.choice([-1, 1], size=nb)
        mag[-1] = 3e-6
        blocks[:, at:at + 2] = mag.astype(np.float16).view(np.uint8).reshape(nb, 2)
    flat = blocks.reshape(-1)
    out[f"{name}.blocks"] = flat.copy()
    out[f"{name}.dequant"] = quants.dequantize(flat, ty).astype(np.float32).reshape(-1)
for name, ty, dt in [("f16", T.F16, np.float16), ("bf16", T.BF16, None)]:
    bits = rng.integers(0, 1 << 16, size=N_VALUES, dtype=np.uint16)
    # No NaN/inf: clear exponent-all-ones patterns.
    exp_mask = 0x7C00 if name == "f16" else 0x7F80
    bits[(bits & exp_mask) == exp_mask] &= ~np.uint16(0x4000)
    raw = bits.view(np.uint8)
    out[f"{name}.blocks"] = raw.copy()
    out[f"{name}.dequant"] = quants.dequantize(raw, ty).astype(np.float32).reshape(-1)
here = os.path.dirname(os.path.abspath(__file__))
save_file(out, os.path.join(here, "random_blocks.safetensors"),
          metadata={"source": "random blocks, dequantized by gguf-py " + __import__("gguf").__version__ if hasattr(__import__("gguf"), "__version__") else "random blocks, dequantized by gguf-py"})
print({k: v.shape for k, v in out.items()})
