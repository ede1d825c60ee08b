//! LoftQ (PEFT's `init_lora_weights: "loftq"`): alternating NF4 quantization of the base and a
//! truncated SVD of the residual, so that `deq(Q) + s·B·A` starts close to `W`.

use super::*;

/// LoftQ's options (PEFT's `loftq_config`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoftqConfig {
    /// Bits of the base quantization; only 4 (NF4) is supported, as with bitsandbytes.
    pub loftq_bits: u32,
    /// Alternations of quantization and SVD (≥ 1).
    pub loftq_iter: usize,
    /// How the base is quantized in every iteration and stored (PEFT quantizes with
    /// blocksize 64 and no double quantization).
    pub quantization: Nf4Options,
}

/// What [`loftq_init`] produces.
#[derive(Clone, Debug)]
pub struct LoftqResult {
    /// The NF4 base `Q`.
    pub base: Nf4Base,
    /// `A: (r, in)` and `B: (out, r)` with `s·B·A ≈ W − deq(Q)`.
    pub a: Array2<f32>,
    /// See [`LoftqResult::a`].
    pub b: Array2<f32>,
    /// `‖W − (deq(Q) + s·B·A)‖_F` after each iteration (non-increasing in practice).
    pub errors: Vec<f64>,
}

/// LoftQ (Li et al., 2023), as PEFT's `loftq_init`: starting from `R = W`, repeat
/// `loftq_iter` times: `Q = nf4(R)`; `L·Rᵀ = rank-r SVD of W − deq(Q)` (`L = U√S`,
/// `Rᵀ = √S·Vᵀ`); `R = W − L·Rᵀ`. The base is the last `Q`; the adapter holds the last
/// low-rank factors.
///
/// PEFT assigns `lora_B = L`, `lora_A = Rᵀ` directly, which reproduces `W` only when the
/// adapter scale `s = α/r` is 1. Here the scale is folded in — `A = Rᵀ/√s`, `B = L/√s` — so
/// that `deq(Q) + s·B·A` is the LoftQ approximation for any `α`. Every quantization uses
/// `config.quantization`, so the SVD fits the stored base exactly.
///
/// ```
/// use lora_core::qlora::{loftq_init, LoftqConfig, Nf4Options};
/// use lora_core::AdapterOptions;
/// use ndarray::Array2;
///
/// let w = Array2::from_shape_fn((32, 64), |(i, j)| ((i * 64 + j) as f32 * 0.7).sin());
/// let config = LoftqConfig { loftq_bits: 4, loftq_iter: 3, quantization: Nf4Options::default() };
/// let r = loftq_init(w.view(), &AdapterOptions::new(4, 8.0), &config, "proj").unwrap();
/// assert_eq!((r.a.dim(), r.b.dim()), ((4, 64), (32, 4)));
/// assert!(r.errors[2] <= r.errors[0] * (1.0 + 1e-6));
/// ```
pub fn loftq_init(
    weight: ArrayView2<'_, f32>,
    adapter: &AdapterOptions,
    config: &LoftqConfig,
    context: &str,
) -> Result<LoftqResult> {
    let nf4_options = &config.quantization;
    let (out_features, in_features) = weight.dim();
    adapter.validate(out_features, in_features, context)?;
    if config.loftq_bits != 4 {
        return Err(LoraError::option(
            format!("loftq_config.loftq_bits for {context}"),
            config.loftq_bits,
            "only 4-bit (NF4) LoftQ is supported",
        ));
    }
    if config.loftq_iter == 0 {
        return Err(LoraError::option(
            format!("loftq_config.loftq_iter for {context}"),
            0,
            "at least one iteration is needed",
        ));
    }
    check_finite(|| format!("base weight of {context}"), weight.iter())?;
    let scale = adapter.scale() as f32;
    let root = scale.sqrt();
    let mut residual = weight.to_owned();
    let mut errors = Vec::with_capacity(config.loftq_iter);
    let mut last = None;
    for _ in 0..config.loftq_iter {
        let base = Nf4Base::quantize(residual.view(), None, nf4_options, context)?;
        let dequantized = base.dense_weight()?.into_owned();
        let target = &weight - &dequantized;
        let svd = truncated_svd(target.view(), adapter.r, context)?;
        let sqrt_s = svd.s.mapv(f32::sqrt);
        // L = U·√S (out, r), Rᵀ = √S·Vᵀ (r, in); fold the adapter scale: s·B·A = L·Rᵀ.
        let b = &svd.u * &sqrt_s.view().insert_axis(Axis(0)) / root;
        let a = &svd.vt * &sqrt_s.view().insert_axis(Axis(1)) / root;
        let mut low_rank = Array2::zeros((out_features, in_features));
        gemm(scale, b.view(), a.view(), 0.0, low_rank.view_mut())?;
        residual = &weight - &low_rank;
        let error = (&target - &low_rank)
            .iter()
            .map(|&e| f64::from(e) * f64::from(e))
            .sum::<f64>()
            .sqrt();
        errors.push(error);
        last = Some((base, a, b));
    }
    let (base, a, b) = last
        .ok_or_else(|| LoraError::state("LoftQ", context, "no iteration ran (loftq_iter is 0)"))?;
    Ok(LoftqResult { base, a, b, errors })
}

impl LoraLinear<Nf4Base> {
    /// A QLoRA layer initialised by LoftQ ([`loftq_init`]): NF4 base and adapter `name`
    /// (active) whose `s·B·A` fits the quantization residual. `seed` drives its dropout.
    pub fn loftq(
        weight: ArrayView2<'_, f32>,
        bias: Option<Array1<f32>>,
        name: &str,
        adapter: &AdapterOptions,
        config: &LoftqConfig,
        seed: u64,
        context: &str,
    ) -> Result<Self> {
        if adapter.use_dora {
            return Err(LoraError::option(
                format!("use_dora for {context}"),
                true,
                "LoftQ initialises plain LoRA adapters",
            ));
        }
        let init = loftq_init(weight, adapter, config, context)?;
        let base =
            Nf4Base::from_four_bit(init.base.weight, bias, config.quantization.tile, context)?;
        let adapter = LoraAdapter::from_weights(init.a, init.b, None, adapter, seed, context)?;
        let mut layer = LoraLinear::new(base, context);
        layer.insert_adapter(name, adapter)?;
        Ok(layer)
    }
}
