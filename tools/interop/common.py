"""Shared helpers of the interop checks: running the `lora-qat` binary, tiny seeded models,
and the one output format every check prints.

Every check prints one JSON object per table row on stdout (anything else goes to stderr):
    {"check": str, "cases": int, "max_err": float|null, "tol": float|null,
     "status": "PASS"|"FAIL"|"REFUSED", "note": str}
REFUSED means our side answered with an error for an input it does not support yet (a
feature another issue adds); the reference side worked. `cargo xtask interop` reads the rows.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

BIN = os.environ.get("LORA_QAT_BIN", "target/release/lora-qat")
WORK = Path(os.environ.get("INTEROP_WORK", "target/interop"))
SEED = int(os.environ.get("INTEROP_SEED", "16"))


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def row(check, cases, max_err, tol, status=None, note=""):
    """Print one table row; status defaults to PASS when max_err <= tol."""
    if status is None:
        status = "PASS" if max_err is not None and max_err <= tol else "FAIL"
    print(
        json.dumps(
            {
                "check": check,
                "cases": int(cases),
                "max_err": None if max_err is None else float(max_err),
                "tol": None if tol is None else float(tol),
                "status": status,
                "note": note,
            }
        ),
        flush=True,
    )


class Refused(Exception):
    """Our binary exited with an error: its last stderr line says why."""


def ours(*args):
    """Run `lora-qat ARGS`; raise Refused with its error message when it fails."""
    cmd = [BIN, *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [l for l in done.stderr.strip().splitlines() if l.strip()]
        raise Refused(lines[-1] if lines else f"exit {done.returncode}")
    return done.stdout


def ours_help(*args):
    """The `--help` text of a subcommand (to learn which options this build has)."""
    return subprocess.run([BIN, *args, "--help"], capture_output=True, text=True).stdout


def workdir(name):
    d = WORK / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_tokens(path, input_ids, labels=None):
    tensors = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64)}
    if labels is not None:
        tensors["labels"] = np.ascontiguousarray(labels, dtype=np.int64)
    save_file(tensors, str(path))


def random_tokens(gen, vocab, batch=2, seq=8):
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = ids.clone()
    labels[:, : seq // 4] = -100  # a masked prompt, as a fine-tuning batch has
    return ids.numpy(), labels.numpy()


def our_logits(model_dir, tokens_path, out_path, adapter=None):
    args = ["logits", "--model", model_dir, "--tokens", tokens_path, "--out", out_path]
    if adapter is not None:
        args += ["--adapter", adapter]
    ours(*args)
    return load_file(str(out_path))


def perturb_(model, gemma_norms=False, std=0.15, seed=0):
    """Give a freshly initialised model weights of a size that makes differences visible:
    transformers' init (std 0.02, norms exactly 1) would hide wrong norms or scales."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_((0.0 if gemma_norms else 1.0) + 0.1 * noise)
            else:
                p.copy_(std * noise)


def max_abs(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def byte_level_tokenizer(vocab_size, directory):
    """A byte-level BPE tokenizer.json of `vocab_size` tokens (single characters and one merge),
    so a tiny model's directory converts to GGUF (llama.cpp needs a vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort()
    vocab = {ch: i for i, ch in enumerate(alphabet[: vocab_size - 1])}
    merge = (alphabet[0], alphabet[1])
    vocab[merge[0] + merge[1]] = vocab_size - 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[merge]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(Path(directory) / "tokenizer.json"))
