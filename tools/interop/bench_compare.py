"""`cargo xtask bench-compare`: PyTorch / PEFT / bitsandbytes against `lora-qat bench` on the
same shapes, in one run, on 2 threads. Prints one JSON row per line:
    {"work", "ours", "pytorch", "unit", "speed": ours speed / PyTorch speed, "note"}
(speed > 1: we are faster).

* layer m=512 d=2048 r=16, forward + backward with the input gradient: LoRA over f32, QLoRA
  over bnb NF4 (blocksize 64, double quant), LoRA-QAT 3-bit LSQ per-channel on W + s·B·A;
* GEMM 512×2048×2048 in f32 and bf16 (`lora-qat bench gemm`);
* training on the SmolLM2-135M shape (LoRA r=8 on 7 projections, batch 4×128): PyTorch+PEFT
  f32 eager, bf16 autocast, bnb NF4 QLoRA against `lora-qat bench train` (both sides:
  forward + loss + backward + AdamW step), and `lora-qat bench train --compute-dtype bf16`
  against the bf16 autocast row;
* training on the bench model (row group `model`: `lora-qat bench train`'s default shape,
  width 512, 8 layers, 8 heads, MLP 1408, vocab 4096, LoRA r=16 on 7 projections, batch
  4×256) against PyTorch+PEFT f32 eager on the same Llama;
* gradient checkpointing (row group `ckpt`; `python bench_compare.py ckpt` runs only it):
  LoRA r=8 on the SmolLM2-135M shape at batch 1 × seq 2048, with and without it — tokens/s
  and peak resident memory of ours (`bench train --gradient-checkpointing`) against
  PyTorch+PEFT with `model.gradient_checkpointing_enable()` (non-reentrant, the inputs made to
  require grad as PEFT needs), each PyTorch run in a fresh process so that its peak RSS is its
  own.

BENCH_ROWS (comma-separated, default all) picks groups of rows so one change can be re-measured
without the whole run: layer, gemm, train (f32 vs PEFT f32 and bf16 autocast), bf16 (ours
--compute-dtype bf16 vs PEFT bf16 autocast), qlora (ours vs
bnb), model (the bench model, f32), gguf (ours over the GGUF Q4_1 blocks of LORA_QAT_REAL_MODEL_GGUF, when set, against PEFT
f32 on the SmolLM2 shape), ckpt (gradient checkpointing). Every row of ours also reports the CPU
time per step in its note when the binary prints it (a shared machine inflates wall time, not
CPU time).
"""

import json
import math
import multiprocessing
import os
import resource
import sys
import statistics
import time
from pathlib import Path

import torch

from common import BIN, log, ours, ours_help

torch.set_num_threads(2)
RUNS = int(os.environ.get("BENCH_RUNS", "10"))
TRAIN_RUNS = int(os.environ.get("BENCH_TRAIN_RUNS", "3"))
ROWS = set(os.environ.get("BENCH_ROWS", "layer,gemm,train,bf16,qlora,model,gguf,ckpt").split(","))
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
               rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
# `lora-qat bench train` with no size options (its `rms_norm_eps`, `rope_theta` and untied head
# are `lm::LlamaConfig::new`'s defaults), trained at batch 4 × 256 with LoRA r=16, alpha 32.
BENCH_MODEL = dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                   rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)


def median_ms(fn, runs):
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def emit(work, ours_value, theirs, unit, note=""):
    if ours_value is None or theirs is None:
        speed = None
    elif unit == "ms":
        speed = theirs / ours_value
    else:  # a rate: tokens/s, GFLOP/s
        speed = ours_value / theirs
    print(json.dumps({"work": work, "ours": ours_value, "pytorch": theirs, "unit": unit,
                      "speed": speed, "note": note}), flush=True)


def lsq(w, step, bits):
    """3-bit LSQ fake quantization (Esser et al.): straight-through round, step gradient
    scaled by 1/sqrt(N·Qp)."""
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    g = 1.0 / math.sqrt(w.shape[1] * qp)
    s = step * g + (step - step * g).detach()
    v = torch.clamp(w / s, -qn, qp)
    return ((v.round() - v).detach() + v) * s


def torch_layer(m=512, d=2048, r=16):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    gen = torch.Generator().manual_seed(0)
    w = 0.02 * torch.randn(d, d, generator=gen)
    x = torch.randn(m, d, generator=gen).requires_grad_()
    dy = torch.randn(m, d, generator=gen)
    a = (0.02 * torch.randn(r, d, generator=gen)).requires_grad_()
    b = (0.02 * torch.randn(d, r, generator=gen)).requires_grad_()
    scale = 2.0
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    qp = 3
    step = (w.abs().amax(dim=1, keepdim=True) / qp).requires_grad_()

    def lora():
        y = x @ w.T + scale * (x @ a.T) @ b.T
        y.backward(dy)

    def qlora():
        y = bnb.matmul_4bit(x, packed.t(), quant_state=state) + scale * (x @ a.T) @ b.T
        y.backward(dy)

    def lora_qat():
        merged = w + scale * b @ a
        y = x @ lsq(merged, step, 3).T
        y.backward(dy)

    return {"lora_fwd_bwd": median_ms(lora, RUNS), "qlora_fwd_bwd": median_ms(qlora, RUNS),
            "lora_qat_fwd_bwd": median_ms(lora_qat, RUNS)}


def torch_gemm(dtype):
    a, b = torch.randn(512, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
    ms = median_ms(lambda: a @ b, RUNS)
    return 2 * 512 * 2048 * 2048 / (ms / 1e3) / 1e9


def ours_gemm():
    """GFLOP/s of `lora-qat bench gemm` rows x·B (f32, and the fastest bf16 kernel)."""
    if "gemm" not in ours_help("bench"):
        return None, None
    rows = {r["bench"]: r["gflops"] for r in ours_json("bench", "gemm", "--json", "--runs", RUNS)}
    bf16 = [v for k, v in rows.items() if k.startswith("bf16_") and k.endswith("_x_b")]
    return rows.get("f32_x_b"), max(bf16) if bf16 else None


def torch_train(mode, shape=SMOLLM2, batch=4, seq=128, rank=8):
    """tokens/s of PyTorch+PEFT on the SmolLM2-135M shape (or `shape`); mode f32 | bf16 | qlora."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape)
    torch.manual_seed(0)
    if mode == "qlora":  # bnb quantizes while loading: the real model, or a saved random one
        path = Path(os.environ.get("LORA_QAT_REAL_MODEL_HF", "-"))
        if not (path / "config.json").is_file():
            path = Path(os.environ.get("INTEROP_WORK", "target/interop")) / "bench/smollm2-shape"
        if not (path / "config.json").is_file():
            LlamaForCausalLM(config).save_pretrained(path)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        model = LlamaForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32)
    else:
        model = LlamaForCausalLM(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seq))

    def step():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()

    return batch * seq / (median_ms(step, TRAIN_RUNS) / 1e3)


CKPT_RUNS = int(os.environ.get("BENCH_CKPT_RUNS", "2"))
CKPT_SEQ = int(os.environ.get("BENCH_CKPT_SEQ", "2048"))


def _torch_ckpt_child(checkpointing, queue):
    """In a fresh process: tokens/s and peak RSS of PEFT LoRA training at 1 x CKPT_SEQ."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = LlamaConfig(**dict(SMOLLM2, max_position_embeddings=max(2048, CKPT_SEQ)))
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (1, CKPT_SEQ))

    def step():
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    tps = CKPT_SEQ / (median_ms(step, CKPT_RUNS) / 1e3)
    queue.put((tps, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


def torch_ckpt(checkpointing):
    """(tokens/s, peak RSS bytes) of PyTorch+PEFT, measured in a child process."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_torch_ckpt_child, args=(checkpointing, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def ours_ckpt(checkpointing):
    """(tokens/s, peak RSS bytes) of `lora-qat bench train` at 1 x CKPT_SEQ."""
    args = ["bench", "train", "--json", "--batch", 1, "--seq", CKPT_SEQ, "--hidden", 576,
            "--intermediate", 1536, "--layers", 30, "--heads", 9, "--kv-heads", 3,
            "--vocab", 49152, "--rank", 8, "--runs", CKPT_RUNS]
    if checkpointing:
        args.append("--gradient-checkpointing")
    row = ours_json(*args)[0]
    return row["tokens_per_s"], row.get("peak_rss_bytes")


def emit_ckpt():
    if "--gradient-checkpointing" not in ours_help("bench", "train"):
        log("bench-compare: this lora-qat has no --gradient-checkpointing; rows skipped")
        return
    mib = lambda b: None if b is None else round(b / 2**20, 1)
    for checkpointing in (True, False):
        label = "with" if checkpointing else "without"
        ours_tps, ours_rss = ours_ckpt(checkpointing)
        torch_tps, torch_rss = torch_ckpt(checkpointing)
        shape = f"LoRA r=8 x7, batch 1x{CKPT_SEQ}"
        emit(f"train SmolLM2-135M shape {label} gradient checkpointing: tokens/s", ours_tps,
             torch_tps, "tokens/s", shape)
        print(json.dumps({"work": f"train SmolLM2-135M shape {label} gradient checkpointing: "
                          "peak resident", "ours": mib(ours_rss), "pytorch": mib(torch_rss),
                          "unit": "MiB", "speed": None,
                          "note": shape + "; process peak RSS (VmHWM / ru_maxrss)"}), flush=True)


def ours_json(*args):
    return [json.loads(l) for l in ours(*args).splitlines() if l.startswith("{")]


def ours_train(qlora, gguf=None, dtype="f32"):
    """(tokens/s, CPU ms per step or None) of `lora-qat bench train` on the SmolLM2 shape."""
    if gguf:
        args = ["bench", "train", "--json", "--batch", 4, "--seq", 128, "--rank", 8,
                "--runs", TRAIN_RUNS, "--model", gguf]
    else:
        args = ["bench", "train", "--json", "--batch", 4, "--seq", 128, "--hidden", 576,
                "--intermediate", 1536, "--layers", 30, "--heads", 9, "--vocab", 49152,
                "--rank", 8, "--runs", TRAIN_RUNS]
        if "--kv-heads" in ours_help("bench", "train"):
            args += ["--kv-heads", 3]
        if qlora:
            args.append("--qlora")
    if dtype != "f32":
        if "--compute-dtype" not in ours_help("bench", "train"):
            return None, None
        args += ["--compute-dtype", dtype]
    record = ours_json(*args)[0]
    return record["tokens_per_s"], record.get("cpu_ms_per_step")


def cpu_note(cpu_ms):
    return "" if cpu_ms is None else f"; ours {cpu_ms:.0f} CPU ms/step"


if __name__ == "__main__":
    log(f"bench-compare: {BIN}, torch {torch.__version__} on {torch.get_num_threads()} threads")
    if sys.argv[1:] == ["ckpt"]:
        emit_ckpt()
        sys.exit(0)
    if "layer" in ROWS:
        layer_ours = {r["bench"]: r["ms"] for r in ours_json("bench", "layer", "--json", "--runs", RUNS)}
        layer_torch = torch_layer()
        names = {"lora_fwd_bwd": "LoRA", "qlora_fwd_bwd": "QLoRA NF4 (bnb)", "lora_qat_fwd_bwd": "LoRA-QAT 3-bit LSQ"}
        for key, label in names.items():
            emit(f"layer m=512 d=2048 r=16: {label}", layer_ours.get(key), layer_torch[key], "ms",
                 "fwd+bwd incl. input gradient, median")
    if "gemm" in ROWS:
        f32_gemm, bf16_gemm = ours_gemm()
        emit("sgemm 512x2048x2048 f32", f32_gemm, torch_gemm(torch.float32), "GFLOP/s", "x·B, median")
        emit("GEMM 512x2048x2048 bf16", bf16_gemm, torch_gemm(torch.bfloat16), "GFLOP/s",
             "ours: fastest bf16 kernel, f32 accumulation")
    kv_note = "" if "--kv-heads" in ours_help("bench", "train") else \
        "; ours with 9 kv heads (bench train has no --kv-heads), PyTorch the real 3"
    peft_f32 = None
    if "train" in ROWS or "gguf" in ROWS:
        peft_f32 = torch_train("f32")
    if "train" in ROWS:
        f32_ours, cpu = ours_train(qlora=False)
        emit("train SmolLM2-135M shape: ours f32 vs PEFT f32 eager", f32_ours, peft_f32, "tokens/s",
             "LoRA r=8 x7, batch 4x128" + kv_note + cpu_note(cpu))
    if "train" in ROWS or "bf16" in ROWS:
        peft_bf16 = torch_train("bf16")
    if "train" in ROWS:
        emit("train SmolLM2-135M shape: ours f32 vs PEFT bf16 autocast", f32_ours, peft_bf16,
             "tokens/s", "LoRA r=8 x7, batch 4x128" + kv_note + cpu_note(cpu))
    if "bf16" in ROWS:
        bf16_ours, cpu = ours_train(qlora=False, dtype="bf16")
        emit("train SmolLM2-135M shape: ours --compute-dtype bf16 vs PEFT bf16 autocast", bf16_ours,
             peft_bf16, "tokens/s",
             "LoRA r=8 x7, batch 4x128; bf16 operands, f32 sums and master weights" + kv_note
             + cpu_note(cpu))
    if "qlora" in ROWS:
        try:
            bnb_tps = torch_train("qlora")
            note = ""
        except Exception as e:  # bitsandbytes' CPU 4-bit loading is young: report, don't stop
            bnb_tps, note = None, f"bnb QLoRA failed: {str(e)[:120]}"
        ours_q, cpu = ours_train(qlora=True)
        emit("train SmolLM2-135M shape: ours QLoRA vs bnb QLoRA", ours_q, bnb_tps,
             "tokens/s", (note or "NF4 blocksize 64 + double quant") + kv_note + cpu_note(cpu))
    if "model" in ROWS:
        theirs = torch_train("f32", shape=BENCH_MODEL, batch=4, seq=256, rank=16)
        record = ours_json("bench", "train", "--json", "--runs", TRAIN_RUNS)[0]
        emit("train bench model (bench train defaults): ours f32 vs PEFT f32 eager",
             record["tokens_per_s"], theirs, "tokens/s",
             "width 512, 8 layers, vocab 4096, LoRA r=16 x7, batch 4x256"
             + cpu_note(record.get("cpu_ms_per_step")))
    gguf = os.environ.get("LORA_QAT_REAL_MODEL_GGUF")
    if "gguf" in ROWS and gguf and Path(gguf).is_file():
        ours_g, cpu = ours_train(qlora=False, gguf=gguf)
        emit("train SmolLM2-135M: ours over GGUF Q4_1 blocks vs PEFT f32 eager", ours_g, peft_f32,
             "tokens/s", "LoRA r=8 on every projection, batch 4x128" + cpu_note(cpu))
    if "ckpt" in ROWS:
        emit_ckpt()
