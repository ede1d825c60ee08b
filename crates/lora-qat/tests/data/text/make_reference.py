"""Developer tool (not run by the build or tests): writes reference.json, the renderings and
token ids the text tests compare against, with transformers' own apply_chat_template and
tokenizer.

    /work/interop-venv/bin/python make_reference.py SMOLLM2_HF_DIR GGUF_FILE

SMOLLM2_HF_DIR: SmolLM2-135M-Instruct as transformers loads it from the GGUF file
(AutoTokenizer.from_pretrained(dir, gguf_file=...) then save_pretrained).
"""
import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

here = Path(__file__).parent
hf_dir, gguf = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(hf_dir)
gguf_tok = AutoTokenizer.from_pretrained(str(Path(gguf).parent), gguf_file=Path(gguf).name)

conversations = {
    "single": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [
        {"role": "system", "content": "  You answer in one word.  "},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome"},
    ],
    "multi": [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Say « ça va » in English.\nThanks"},
        {"role": "assistant", "content": "It means \"how are you\"."},
    ],
}
tool_conversation = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}]},
    {"role": "tool", "content": "{\"temp\": 21.5}"},
    {"role": "assistant", "content": "It is 21.5 °C."},
]
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

renders = []
for name in ["smollm2", "qwen25_style", "llama31_style", "smollm2_generation"]:
    src = (here / "templates" / f"{name}.jinja").read_text()
    cases = list(conversations.items())
    if name != "smollm2" and name != "smollm2_generation":
        cases.append(("tool", tool_conversation))
    for conv_name, msgs in cases:
        for agp in [False, True]:
            kwargs = {"date_string": "26 Jul 2024"} if name == "llama31_style" else {}
            for with_tools in ([False, True] if conv_name == "tool" else [False]):
                text = tok.apply_chat_template(msgs, chat_template=src, tokenize=False,
                                               add_generation_prompt=agp,
                                               tools=tools if with_tools else None, **kwargs)
                renders.append({"template": name, "conversation": conv_name, "add_generation_prompt": agp,
                                "tools": with_tools, "text": text})

masks = []
for conv_name, msgs in conversations.items():
    src = (here / "templates" / "smollm2_generation.jinja").read_text()
    out = tok.apply_chat_template(msgs, chat_template=src, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    masks.append({"conversation": conv_name, "input_ids": list(out["input_ids"]),
                  "assistant_masks": list(out["assistant_masks"])})

strings = ["Hello world", "What is the capital of France?", "  leading spaces and\ttabs\n\nnewlines",
           "<|im_start|>user\nHi<|im_end|>\n", "Ünïcödé — ça va? 日本語 🤗", "don't you're I'LL",
           "a  b   c", ""]
tokenized = [{"text": s, "ids": gguf_tok(s, add_special_tokens=True)["input_ids"],
              "hf_dir_ids": tok(s)["input_ids"]} for s in strings]
decoded = [{"ids": t["ids"], "text": gguf_tok.decode(t["ids"])} for t in tokenized]

json.dump({"conversations": conversations, "tool_conversation": tool_conversation, "tools": tools,
           "renders": renders, "assistant_masks": masks, "tokenized": tokenized, "decoded": decoded},
          open(here / "reference.json", "w"), ensure_ascii=False, indent=1)
print(len(renders), "renders,", len(masks), "masks,", len(tokenized), "strings")
