"""`python make_hf_dir.py MODEL.gguf OUT_DIR`: a transformers f32 directory of a GGUF model
(weights dequantized by transformers' own GGUF loader, with the tokenizer), for the tests and
checks that compare a real model against a Hugging Face checkpoint."""

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
# The weights are dequantized f32 now: drop the GGUF quantizer so the model saves as plain f32.
model.hf_quantizer = None
model.is_quantized = False
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(out)
tokenizer.save_pretrained(out)
print(out)
