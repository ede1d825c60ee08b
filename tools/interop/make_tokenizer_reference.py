"""Reference token ids for the GGUF tokenizer test (issue 12): a fuzz-ish corpus (digits, spaces,
unicode, code, chat markup) tokenized by transformers from the SmolLM2 tokenizer directory
(`$SMOLLM2_HF`, default /work/models/smollm2-hf). Writes
crates/lora-qat/tests/data/gguf_tokenizer/smollm2_ids.json (texts and ids only, no vocabulary).

Run: /work/interop-venv/bin/python tools/interop/make_tokenizer_reference.py
"""

import json
import os
import random
from pathlib import Path

from transformers import AutoTokenizer


def corpus():
    fixed = [
        "Hello world, how are you today?",
        "1234567890 12 345 6789 3.14159 -42 +7 1e10 0x1F",
        "In 2024, 1,000,000 people paid $19.99 each (about 19990000 dollars).",
        "  leading spaces and\nnew lines\ttabs   trailing   ",
        "\n\n\n  \t \r\n mixed\r\nline endings\r",
        "Ünïcödé façade — naïve café; 日本語のテキスト; emoji 🙂🚀 and Ω≈ç√∫",
        "def f(x):\n    return x**2 + 3*x - 1  # comment\n\nprint(f(10))",
        "for (int i = 0; i < 100; ++i) { sum += a[i] * b[i]; }",
        "<|im_start|>user\nWhat is 17 * 23?<|im_end|>\n<|im_start|>assistant\n",
        "don't won't it's we're they've I'm you'll he'd DON'T IT'S",
        "https://example.com/path?query=1&x=2#frag  user@mail.org",
        "a1b2c3 x86_64 v1.2.3 COVID-19 H2O 3D 4K 1st 2nd 3rd",
        "ÀÉÎÕÜ àéîõü ß ñ ç ø å æ œ — “quotes” ‘single’ «guillemets»",
        "Привет, мир! Γειά σου Κόσμε! مرحبا بالعالم שלום עולם",
        "    indented\n        more\n\ttab",
        "",
        " ",
        "1",
        "999999999999",
    ]
    rng = random.Random(12)
    alphabet = list("abcXYZ0123456789 \n\t.,;:!?'\"()[]{}<>-+=*/\\_#@$%^&|~`") + ["é", "日", "🙂", "ß", "  "]
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(40)]
    return fixed + fuzz


def main():
    src = Path(os.environ.get("SMOLLM2_HF", "/work/models/smollm2-hf"))
    tok = AutoTokenizer.from_pretrained(src)
    cases = [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in corpus()]
    out = Path("crates/lora-qat/tests/data/gguf_tokenizer/smollm2_ids.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"source": "transformers AutoTokenizer, SmolLM2-135M-Instruct",
                               "add_special_tokens": False, "cases": cases}, ensure_ascii=False, indent=0))
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
