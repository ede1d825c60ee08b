"""Developer tool (not run by the build or tests): cuts SmolLM2's byte-level BPE tokenizer
down to the tokens and merges that the texts of reference.json (and a few extra strings)
use, keeping their ids, so CI tests tokenize exactly as the full tokenizer does without
committing 3.5 MB. Also records ids of the extra strings under llama.cpp's `smollm`
pre-tokenizer (digits split one by one before the GPT-2 split), computed with the
`tokenizers` library over the full vocabulary.

    /work/interop-venv/bin/python make_small_tokenizer.py SMOLLM2_HF_DIR

Why the cut is exact: BPE applies, in each word, the lowest-ranked applicable merge; keeping
every merge the full tokenizer applied to the words of these texts (in their original order)
leaves that choice unchanged at every step.
"""
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, pre_tokenizers

here = Path(__file__).parent
full = json.load(open(Path(sys.argv[1]) / "tokenizer.json"))
ref = json.load(open(here / "reference.json"))
extra = ["In 2024, 1234567 people paid $3.50 each.", "Version 3.10.2 of x86_64"]
texts = [r["text"] for r in ref["renders"]] + [t["text"] for t in ref["tokenized"]] + extra
for c in list(ref["conversations"].values()) + [ref["tool_conversation"]]:
    texts += [m["content"] for m in c]
texts += ["Paris", " Paris", "The capital of France is Paris."]

vocab = full["model"]["vocab"]
merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in full["model"]["merges"]]
rank = {m: i for i, m in enumerate(merges)}
plain = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
smollm = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
used = set()
keep_tokens = set()
for text in texts:
    for pre in (plain, smollm):
        for word, _ in pre.pre_tokenize_str(text):
            symbols = list(word)
            keep_tokens.update(symbols)
            while len(symbols) > 1:
                pairs = [(rank.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
                best, i = min(pairs)
                if best == 1 << 30:
                    break
                used.add(best)
                symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
                keep_tokens.add(symbols[i])
alphabet = pre_tokenizers.ByteLevel.alphabet()
keep_tokens.update(alphabet)
for t in full["added_tokens"]:
    keep_tokens.add(t["content"])
small = dict(full)
small["model"] = dict(full["model"])
small["model"]["vocab"] = {t: i for t, i in vocab.items() if t in keep_tokens}
small["model"]["merges"] = [list(merges[i]) for i in sorted(used)]
json.dump(small, open(here / "smollm2_small" / "tokenizer.json", "w"), ensure_ascii=False)

full_tok = Tokenizer.from_file(str(Path(sys.argv[1]) / "tokenizer.json"))
small_tok = Tokenizer.from_file(str(here / "smollm2_small" / "tokenizer.json"))
for text in texts:
    assert full_tok.encode(text).ids == small_tok.encode(text).ids, text
full_tok.pre_tokenizer = smollm
digits = [{"text": s, "ids": full_tok.encode(s).ids} for s in extra + [t["text"] for t in ref["tokenized"]]]
json.dump({"smollm_pre_tokenizer": digits}, open(here / "smollm_pre_tokenizer.json", "w"),
          ensure_ascii=False, indent=1)
print(len(small["model"]["vocab"]), "tokens,", len(small["model"]["merges"]), "merges")
