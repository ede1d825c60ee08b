//! lora-core layer benchmarks: one forward + backward (input gradient included) of an adapted
//! linear layer at m = 512 tokens, in = out = 2048, r = 16 — LoRA over an f32 base, QLoRA
//! over an NF4 base (blocksize 64, double quant, tiled products), and LoRA-QAT (3-bit uniform
//! LSQ, per-channel steps, quantizing W + s·B·A). Also the differentiable quantizers alone on
//! the 4M weights of that layer. `lora-qat bench layer` prints the same three layer numbers.
use criterion::{criterion_group, criterion_main, Criterion};
use lora_core::config::InitLoraWeights;
use lora_core::qat::{LoraQatLinear, QatMode};
use lora_core::qlora::Nf4Options;
use lora_core::QLoraLinear;
use lora_core::{AdapterOptions, LoraLinear};
use ndarray::Array2;
use quant_core::config::{QatConfig, QuantizerKind};
use quant_core::quantizer::InitMethod;
use quant_core::ste::Ste;
use quant_core::uniform::Granularity;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::hint::black_box;

const M: usize = 512;
const D: usize = 2048;
const R: usize = 16;

fn normal(rng: &mut ChaCha8Rng, rows: usize, cols: usize, std: f32) -> Array2<f32> {
    let dist = Normal::new(0.0f32, std).unwrap();
    Array2::from_shape_fn((rows, cols), |_| dist.sample(rng))
}

fn qat_config(kind: QuantizerKind) -> QatConfig {
    QatConfig {
        quantizer: kind,
        bits: if kind == QuantizerKind::Nf4 { 4 } else { 3 },
        granularity: Granularity::PerChannel,
        ste: Ste::Lsq,
        pi_k: (kind == QuantizerKind::Pi).then_some(3),
        symmetric: true,
        incoherence: None,
        init: InitMethod::MseClipSearch,
        double_quant: false,
    }
}

fn layers(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let w = normal(&mut rng, D, D, 0.02);
    let x = normal(&mut rng, M, D, 1.0);
    let dy = normal(&mut rng, M, D, 1.0);
    let mut options = AdapterOptions::new(R, 2.0 * R as f64);
    options.init = InitLoraWeights::Random;

    let mut lora = LoraLinear::dense(w.clone(), None, "lora").unwrap();
    lora.add_adapter("default", &options, 1).unwrap();
    let mut qlora = QLoraLinear::qlora(w.view(), None, &Nf4Options::default(), "qlora").unwrap();
    qlora.add_adapter("default", &options, 1).unwrap();
    let mut qat = LoraQatLinear::new(
        w.clone(),
        None,
        &options,
        &qat_config(QuantizerKind::Uniform),
        QatMode::QuantizeMerged,
        1,
        "qat",
    )
    .unwrap();

    let mut group = c.benchmark_group("layer_512x2048_r16");
    group.sample_size(10);
    group.bench_function("lora_fwd_bwd", |b| {
        b.iter(|| {
            black_box(lora.forward(x.view()).unwrap());
            black_box(lora.backward(dy.view()).unwrap());
        })
    });
    group.bench_function("qlora_fwd_bwd", |b| {
        b.iter(|| {
            black_box(qlora.forward(x.view()).unwrap());
            black_box(qlora.backward(dy.view()).unwrap());
        })
    });
    group.bench_function("lora_qat_fwd_bwd", |b| {
        b.iter(|| {
            black_box(qat.forward(x.view()).unwrap());
            black_box(qat.backward(dy.view()).unwrap());
        })
    });
    group.finish();

    let mut group = c.benchmark_group("quantizer_2048x2048");
    group.sample_size(10);
    for kind in [
        QuantizerKind::Uniform,
        QuantizerKind::Pi,
        QuantizerKind::Nf4,
    ] {
        let mut q = qat_config(kind).build().unwrap();
        q.init_from_weights(w.view(), InitMethod::Absmax).unwrap();
        let name = format!("{kind:?}").to_lowercase();
        group.bench_function(format!("{name}_forward"), |b| {
            b.iter(|| black_box(q.forward(w.view()).unwrap()))
        });
        group.bench_function(format!("{name}_backward"), |b| {
            b.iter(|| black_box(q.backward(w.view()).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, layers);
criterion_main!(benches);
