"""Check 5: our ggml block quantizers against llama.cpp's (gguf-py's `gguf.quants.quantize`,
the numpy port of ggml's `quantize_row_*_ref` that llama.cpp's converter uses).

A tiny random Llama (rows of whole 32-value blocks) is exported by `lora-qat export-gguf` once
as f32 and once per type; every 2-D tensor of the typed file must be byte-identical to gguf-py
quantizing the same tensor of the f32 file (Q/K rows are already permuted in both).
Types our `export-gguf --type` does not offer are REFUSED.
"""

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFReader
from gguf.quants import quantize

from common import SEED, Refused, byte_level_tokenizer, ours, row, workdir
from tiny import tiny_model

TYPES = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0,
         "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1}


def tensors(path):
    return {t.name: t for t in GGUFReader(str(path)).tensors}


def export(model_dir, out, gguf_type):
    ours("export-gguf", "--model", model_dir, "--out", out, "--type", gguf_type)
    return tensors(out)


if __name__ == "__main__":
    d = workdir("ggml")
    model = tiny_model("llama", SEED, hidden_size=64, intermediate_size=128, vocab_size=96)
    model.save_pretrained(d / "model")
    byte_level_tokenizer(96, d / "model")
    f32 = export(d / "model", d / "f32.gguf", "f32")
    for name, qtype in TYPES.items():
        try:
            typed = export(d / "model", d / f"{name}.gguf", name)
        except Refused as e:
            row(f"ggml {name} blocks vs gguf-py", 0, None, 0, "REFUSED", str(e)[:160])
            continue
        compared = differing = 0
        other = []
        for tname, t in typed.items():
            if len(t.shape) != 2:
                continue
            if t.tensor_type != qtype:
                other.append(f"{tname}:{t.tensor_type.name}")
                continue
            source = np.asarray(f32[tname].data, dtype=np.float32)
            theirs = quantize(source, qtype).view(np.uint8).reshape(-1)
            mine = np.asarray(t.data).view(np.uint8).reshape(-1)
            compared += 1
            differing += int(theirs.size != mine.size or np.any(theirs != mine))
        note = f"{compared} tensors byte-compared; err = tensors differing"
        if other:
            note += f"; {len(other)} stored as another type, e.g. {other[0]}"
        status = "FAIL" if compared == 0 else None
        row(f"ggml {name} blocks vs gguf-py", compared, differing, 0, status, note)
