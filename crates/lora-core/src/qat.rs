//! LoRA-QAT: a LoRA layer trained through a differentiable weight quantizer
//! ([`LoraQatLinear`]), in two modes ([`QatMode`]).
//!
//! * [`QatMode::QuantizeMerged`]: the layer computes with `W_q = Q(W + s·B·A)`, `Q` a
//!   quantizer from quant-core built from a [`QatConfig`] (uniform, Pi or NF4 grid, any
//!   granularity, optional Hadamard rotation). Backward: `dx = dy·W_q`, `dŴ = dyᵀ·x`, the
//!   quantizer's backward turns `dŴ` into `dV = ∂L/∂(W + s·B·A)` (through its STE) and
//!   `∂L/∂θ` for its steps/scales, then `dA = s·Bᵀ·dV`, `dB = s·dV·Aᵀ`.
//!   The grid may be one of ggml's (`q4_0` … `q6_k`, [`QatConfig::ggml`]): the layer then
//!   trains on the blocks llama.cpp will run, and [`LoraQatLinear::export_ggml_blocks`]
//!   writes them (the exports are in `qat/export.rs`).
//! * [`QatMode::FrozenQuantizedBase`]: QLoRA-style, `y = x·Q(W)ᵀ + s·x·Aᵀ·Bᵀ` with `Q(W)`
//!   computed once; the quantizer parameters do not train.
//!
//! # Cost
//!
//! A LoRA layer needs two full products per step (`x·Wᵀ`, `dy·W`). Quantizing the merged
//! weight adds a third, `dŴ = dyᵀ·x` (`(out, in)`, `tokens` deep): the quantizer's STE needs
//! `∂L/∂Ŵ` element by element, and so does LSQ's step gradient `Σ g·∂ŵ/∂s` over each group;
//! neither factors through the low-rank path. Add two rank-`r` products for `s·B·A` and
//! `dA`, `dB` and the quantizer's elementwise forward and backward over `out·in` values, and
//! the floor is about 1.5× the LoRA layer. Measured with `lora-qat bench layer` (512 tokens,
//! 2048×2048, r = 16, 3-bit uniform LSQ per channel) on the shared 2-core machine: 1.9–2.7×
//! the LoRA layer (147–160 ms; PyTorch's LSQ LoRA-QAT takes 168 ms); what remains above the floor is the quantizer's elementwise passes
//! (copy of its input, forward, backward: ~6–10 ms each at 4M weights) and the
//! weight-sized temporaries (`W + s·B·A`, `dŴ`, `dV`).

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};
use quant_core::config::{QatConfig, QuantizerKind};
use quant_core::ggml::qat::GgmlQatQuantizer;
use quant_core::linalg::{gemm, gemm_in, ComputeDtype};
use quant_core::nf4_grid::Nf4GridQuantizer;
use quant_core::pi::PiQuantizer;
use quant_core::quantizer::{DifferentiableQuantizer, InitMethod};
use quant_core::uniform::UniformQuantizer;

use crate::adapter::{AdapterOptions, LoraAdapter};
use crate::base::{DenseBase, FrozenBase};
use crate::error::{check_finite, LoraError, Result};

mod export;

/// Where the quantizer sits in a [`LoraQatLinear`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QatMode {
    /// `y = x·Q(W + s·B·A)ᵀ`: the adapter is trained through the quantizer, whose steps train
    /// too.
    QuantizeMerged,
    /// `y = x·Q(W)ᵀ + s·x·Aᵀ·Bᵀ` with `Q(W)` computed once (QLoRA-style, any grid).
    FrozenQuantizedBase,
}

/// The quantizer, kept concrete so that export can reach each grid's stored form.
#[derive(Debug, Clone)]
enum Grid {
    Uniform(UniformQuantizer),
    Pi(PiQuantizer),
    Nf4(Nf4GridQuantizer),
    /// ggml's block grids (`q4_0` … `q6_k`), on llama.cpp's fallback type when the rows do
    /// not divide.
    Ggml(GgmlQatQuantizer),
    /// Wrapped in a Hadamard rotation (export is not offered: the rotation is not stored).
    Rotated(Box<dyn DifferentiableQuantizer>),
}

impl Grid {
    fn build(config: &QatConfig, out_features: usize, in_features: usize) -> Result<Self> {
        config.validate()?;
        if let Some(grid) = config.ggml_grid_for_rows(in_features)? {
            return Ok(Grid::Ggml(grid));
        }
        if config.incoherence.is_some() {
            return Ok(Grid::Rotated(
                config.build_for_weight(out_features, in_features)?,
            ));
        }
        Ok(match config.quantizer {
            QuantizerKind::Uniform => Grid::Uniform(UniformQuantizer::new(
                config.bits,
                config.symmetric,
                config.granularity,
                config.ste,
            )?),
            QuantizerKind::Pi => Grid::Pi(PiQuantizer::new(
                config.bits,
                config.symmetric,
                config.granularity,
                config.ste,
                config.pi_k.unwrap_or_default(),
            )?),
            QuantizerKind::Nf4 => Grid::Nf4(
                Nf4GridQuantizer::new(config.granularity, config.ste)?
                    .with_double_quant(config.double_quant),
            ),
            other => {
                return Err(LoraError::option(
                    "quantizer",
                    format!("{other:?}"),
                    "a ggml grid is built by QatConfig::ggml_grid_for_rows",
                ))
            }
        })
    }

    fn get(&self) -> &dyn DifferentiableQuantizer {
        match self {
            Grid::Uniform(q) => q,
            Grid::Pi(q) => q,
            Grid::Nf4(q) => q,
            Grid::Ggml(q) => q,
            Grid::Rotated(q) => q.as_ref(),
        }
    }

    fn get_mut(&mut self) -> &mut dyn DifferentiableQuantizer {
        match self {
            Grid::Uniform(q) => q,
            Grid::Pi(q) => q,
            Grid::Nf4(q) => q,
            Grid::Ggml(q) => q,
            Grid::Rotated(q) => q.as_mut(),
        }
    }
}

/// What backward needs from forward.
#[derive(Debug, Clone)]
struct QatCache {
    /// The layer input.
    input: Array2<f32>,
    /// The weight the merged mode's forward computed with: `W_q = Q(W + s·B·A)` with fake
    /// quantization on, `W + s·B·A` itself with it off. `None` in the frozen mode.
    merged: Option<Array2<f32>>,
    /// Whether that forward went through the quantizer (fake quantization on).
    quantized: bool,
}

/// A linear layer with a LoRA adapter trained under weight quantization (see the
/// [module docs](self)).
///
/// ```
/// use lora_core::qat::{LoraQatLinear, QatMode};
/// use lora_core::{config::InitLoraWeights, AdapterOptions};
/// use quant_core::config::QatConfig;
/// use ndarray::Array2;
///
/// let w = Array2::from_shape_fn((8, 16), |(i, j)| ((i * 16 + j) as f32 * 0.3).sin());
/// let mut options = AdapterOptions::new(2, 4.0);
/// options.init = InitLoraWeights::Random;
/// let mut layer = LoraQatLinear::new(w, None, &options, &QatConfig::piq3(),
///                                    QatMode::QuantizeMerged, 7, "q_proj").unwrap();
/// let x = Array2::from_shape_fn((4, 16), |(t, j)| ((t + 2 * j) as f32).cos());
/// let y = layer.forward(x.view()).unwrap();
/// let dx = layer.backward(Array2::ones((4, 8)).view()).unwrap();
/// assert_eq!((y.dim(), dx.dim()), ((4, 8), (4, 16)));
/// assert_eq!(layer.quantizer_params().len(), 8); // one α per output channel
/// assert!(layer.grad_quantizer_params().iter().any(|&g| g != 0.0));
/// ```
#[derive(Debug, Clone)]
pub struct LoraQatLinear {
    /// The frozen `f32` weight `W` and bias.
    base: DenseBase,
    adapter: LoraAdapter,
    grid: Grid,
    grad_quantizer: Vec<f32>,
    config: QatConfig,
    mode: QatMode,
    /// `Q(W)`, computed once in [`QatMode::FrozenQuantizedBase`].
    frozen: Option<DenseBase>,
    /// Fake quantization on (the default): the layer computes with the quantized weight.
    /// Off: it computes with `W + s·B·A` unquantized (full-precision warm-up steps), and the
    /// quantizer neither runs nor gets gradients.
    fake_quant: bool,
    /// Training mode (the default) draws the frozen-base mode's dropout; evaluation mode
    /// does not (set by [`LoraQatLinear::set_training`]).
    training: bool,
    cache: Option<QatCache>,
    /// Weight-sized scratch reused across steps (`W + s·B·A` in forward, `dŴ` in backward):
    /// refilling warm memory is a copy, a fresh allocation adds a page fault per 4 KiB.
    scratch: Option<Array2<f32>>,
    /// The precision of the products with the (fake-quantized) weight and of the
    /// gradient products; `W + s·B·A` itself is formed in `f32`.
    compute_dtype: ComputeDtype,
    context: String,
}

impl LoraQatLinear {
    /// A layer over the frozen `weight: (out, in)` (and optional bias) with a fresh adapter
    /// initialised as `options.init` says from `seed`, and a quantizer built from `config`
    /// and initialised (`config.init`) on `W + s·B·A` (merged mode) or `W`.
    ///
    /// DoRA is not supported; dropout only in the frozen-base mode (in the merged mode the
    /// adapter is part of the weight, which sees no input dropout).
    pub fn new(
        weight: Array2<f32>,
        bias: Option<Array1<f32>>,
        options: &AdapterOptions,
        config: &QatConfig,
        mode: QatMode,
        seed: u64,
        context: &str,
    ) -> Result<Self> {
        let (out_features, in_features) = weight.dim();
        let adapter = LoraAdapter::new(options, out_features, in_features, seed, context)?;
        Self::with_adapter(weight, bias, adapter, config, mode, context)
    }

    /// As [`LoraQatLinear::new`] with a given adapter (loaded, or LoftQ/PiSSA-initialised).
    pub fn with_adapter(
        weight: Array2<f32>,
        bias: Option<Array1<f32>>,
        adapter: LoraAdapter,
        config: &QatConfig,
        mode: QatMode,
        context: &str,
    ) -> Result<Self> {
        // DenseBase checks emptiness, finiteness and the bias length.
        let dense = DenseBase::new(weight, bias, context)?;
        let (out_features, in_features) = (dense.weight().nrows(), dense.weight().ncols());
        if adapter.shape() != (out_features, in_features) {
            return Err(LoraError::shape(
                format!("adapter of {context}"),
                format!("(out, in) = {:?}", (out_features, in_features)),
                format!("{:?}", adapter.shape()),
            ));
        }
        if adapter.is_dora() || adapter.options().use_dora {
            return Err(LoraError::option(
                format!("use_dora for {context}"),
                true,
                "DoRA is not supported under quantization-aware training",
            ));
        }
        if mode == QatMode::QuantizeMerged && adapter.options().dropout > 0.0 {
            return Err(LoraError::option(
                format!("lora_dropout for {context}"),
                adapter.options().dropout,
                "the merged QAT mode quantizes W + s·B·A, which has no separate input to drop",
            ));
        }
        let grid = Grid::build(config, out_features, in_features)?;
        let mut layer = LoraQatLinear {
            base: dense,
            adapter,
            grid,
            grad_quantizer: Vec::new(),
            config: *config,
            mode,
            frozen: None,
            fake_quant: true,
            cache: None,
            scratch: None,
            training: true,
            compute_dtype: ComputeDtype::F32,
            context: context.to_string(),
        };
        layer.recalibrate(config.init)?;
        Ok(layer)
    }

    /// Re-initialises the quantizer's parameters θ with `method` from the weight it quantizes
    /// now: `W + s·B·A` with the current adapter (merged mode), or `W` (frozen mode, where
    /// `Q(W)` is recomputed). Accumulated quantizer gradients are zeroed (they belong to the
    /// old θ); the adapter's are kept.
    ///
    /// ```
    /// use lora_core::qat::{LoraQatLinear, QatMode};
    /// use lora_core::{config::InitLoraWeights, AdapterOptions};
    /// use quant_core::{config::QatConfig, quantizer::InitMethod};
    /// use ndarray::Array2;
    /// let w = Array2::from_shape_fn((4, 8), |(i, j)| ((i * 8 + j) as f32 * 0.7).sin());
    /// let mut options = AdapterOptions::new(2, 4.0);
    /// options.init = InitLoraWeights::Random;
    /// let mut layer = LoraQatLinear::new(w, None, &options, &QatConfig::piq3(),
    ///                                    QatMode::QuantizeMerged, 1, "proj").unwrap();
    /// let fitted = layer.quantizer_params().to_vec();
    /// layer.quantizer_params_mut().iter_mut().for_each(|a| *a *= 3.0);
    /// layer.recalibrate(InitMethod::MseClipSearch).unwrap();
    /// assert_eq!(layer.quantizer_params(), &fitted[..]);
    /// ```
    pub fn recalibrate(&mut self, method: InitMethod) -> Result<()> {
        self.cache = None;
        match self.mode {
            QatMode::QuantizeMerged => {
                let merged = merged_weight(self.base.weight(), &self.adapter)?;
                self.grid
                    .get_mut()
                    .init_from_weights(merged.view(), method)?;
            }
            QatMode::FrozenQuantizedBase => {
                let q = self.grid.get_mut();
                q.init_from_weights(self.base.weight().view(), method)?;
                let quantized = q.forward(self.base.weight().view())?.dequantized;
                let mut frozen = DenseBase::new(quantized, None, &self.context)?;
                frozen.set_compute_dtype(self.compute_dtype);
                self.frozen = Some(frozen);
            }
        }
        // θ exists only once the quantizer is initialised; its gradient follows its length.
        let count = self.grid.get().params().len();
        self.grad_quantizer.clear();
        self.grad_quantizer.resize(count, 0.0);
        Ok(())
    }

    /// Turns fake quantization on (the default) or off. Off, the layer computes with
    /// `W + s·B·A` (merged mode) or `W` plus the adapter (frozen mode) in full precision:
    /// warm-up steps before quantization, or a full-precision reference. The quantizer
    /// parameters are kept as they are and get no gradient while it is off.
    ///
    /// ```
    /// use lora_core::qat::{LoraQatLinear, QatMode};
    /// use lora_core::{config::InitLoraWeights, AdapterOptions};
    /// use quant_core::config::QatConfig;
    /// use ndarray::Array2;
    /// let w = Array2::from_shape_fn((4, 8), |(i, j)| ((i * 8 + j) as f32 * 0.7).sin());
    /// let mut options = AdapterOptions::new(2, 4.0);
    /// options.init = InitLoraWeights::Random;
    /// let mut layer = LoraQatLinear::new(w, None, &options, &QatConfig::piq3(),
    ///                                    QatMode::QuantizeMerged, 1, "proj").unwrap();
    /// layer.set_fake_quant(false);
    /// let x = Array2::from_shape_fn((3, 8), |(t, j)| (t as f32 - j as f32) * 0.1);
    /// let y = layer.forward(x.view()).unwrap();
    /// let reference = x.dot(&layer.merged_weight().unwrap().t());
    /// assert!(y.iter().zip(reference.iter()).all(|(a, b)| (a - b).abs() < 1e-5));
    /// ```
    pub fn set_fake_quant(&mut self, enabled: bool) {
        if self.fake_quant != enabled {
            self.cache = None;
        }
        self.fake_quant = enabled;
    }

    /// The precision of the layer's products.
    pub fn compute_dtype(&self) -> ComputeDtype {
        self.compute_dtype
    }

    /// Sets the precision of every product of the layer (bf16: operands rounded to bf16,
    /// sums in `f32`): `x·Ŵᵀ`, `dy·Ŵ`, `dyᵀ·x` and the adapter's gradient products. The
    /// weight `W + s·B·A`, the quantizer and every gradient stay `f32`.
    pub fn set_compute_dtype(&mut self, dtype: ComputeDtype) {
        self.compute_dtype = dtype;
        self.base.set_compute_dtype(dtype);
        if let Some(frozen) = &mut self.frozen {
            frozen.set_compute_dtype(dtype);
        }
        self.adapter.set_compute_dtype(dtype);
    }

    /// Whether the layer computes with the quantized weight.
    pub fn fake_quant(&self) -> bool {
        self.fake_quant
    }

    /// The name this layer was built with (its module path), used in errors.
    pub fn context(&self) -> &str {
        &self.context
    }

    /// `(out, in)`.
    pub fn shape(&self) -> (usize, usize) {
        self.base.weight().dim()
    }

    /// The mode.
    pub fn mode(&self) -> QatMode {
        self.mode
    }

    /// The quantization config.
    pub fn config(&self) -> &QatConfig {
        &self.config
    }

    /// The frozen `f32` weight `W`.
    pub fn weight(&self) -> &Array2<f32> {
        self.base.weight()
    }

    /// The frozen bias.
    pub fn bias(&self) -> Option<ArrayView1<'_, f32>> {
        self.base.bias()
    }

    /// Bytes of the frozen `f32` weight and bias, plus `Q(W)` in the frozen mode.
    pub fn base_storage_bytes(&self) -> usize {
        self.base.storage_bytes() + self.frozen.as_ref().map_or(0, |f| f.storage_bytes())
    }

    /// The adapter (`A`, `B`, their gradients).
    pub fn adapter(&self) -> &LoraAdapter {
        &self.adapter
    }

    /// The adapter, for an optimizer step ([`LoraAdapter::set_weights`]).
    pub fn adapter_mut(&mut self) -> &mut LoraAdapter {
        self.cache = None;
        &mut self.adapter
    }

    /// The quantizer's trainable parameters θ (steps, Pi's α, NF4 scales), flattened.
    pub fn quantizer_params(&self) -> &[f32] {
        self.grid.get().params()
    }

    /// θ for an optimizer step.
    pub fn quantizer_params_mut(&mut self) -> &mut [f32] {
        self.cache = None;
        self.grid.get_mut().params_mut()
    }

    /// `∂L/∂θ` accumulated since the last [`LoraQatLinear::zero_grad`] (zero in the frozen
    /// mode).
    pub fn grad_quantizer_params(&self) -> &[f32] {
        &self.grad_quantizer
    }

    /// θ and `∂L/∂θ` together, for an optimizer that walks values and gradients in one pass.
    pub fn quantizer_params_and_grads_mut(&mut self) -> (&mut [f32], &mut [f32]) {
        self.cache = None;
        (self.grid.get_mut().params_mut(), &mut self.grad_quantizer)
    }

    /// Zeroes the adapter's and the quantizer's gradients.
    pub fn zero_grad(&mut self) {
        self.adapter.zero_grad();
        self.grad_quantizer.fill(0.0);
    }

    /// Trainable parameters: the adapter, plus θ in the merged mode.
    pub fn trainable_parameters(&self) -> usize {
        self.adapter.parameter_count()
            + match self.mode {
                QatMode::QuantizeMerged => self.grad_quantizer.len(),
                QatMode::FrozenQuantizedBase => 0,
            }
    }

    /// `W + s·B·A`: what the merged mode quantizes.
    pub fn merged_weight(&self) -> Result<Array2<f32>> {
        merged_weight(self.base.weight(), &self.adapter)
    }

    /// The weight the layer computes with: `Q(W + s·B·A)` (merged mode) or
    /// `Q(W) + s·B·A` (frozen mode), as `f32`; with fake quantization off, `W + s·B·A`.
    pub fn effective_weight(&mut self) -> Result<Array2<f32>> {
        if !self.fake_quant {
            return merged_weight(self.base.weight(), &self.adapter);
        }
        match &self.frozen {
            Some(base) => {
                let mut w = base.weight().clone();
                w += &self.adapter.delta_weight()?;
                Ok(w)
            }
            None => {
                let merged = merged_weight(self.base.weight(), &self.adapter)?;
                Ok(self.grid.get_mut().forward(merged.view())?.dequantized)
            }
        }
    }

    /// Training mode draws the adapter's dropout masks (frozen-base mode); evaluation mode
    /// does not, so an evaluation forward is deterministic and unscaled.
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// Whether the layer is in training mode.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// `y = x·W_qᵀ + b` for `x: (tokens, in)` (`W_q` as [`LoraQatLinear::effective_weight`]
    /// says); keeps what backward needs.
    pub fn forward(&mut self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        let (out_features, in_features) = self.shape();
        if x.ncols() != in_features {
            return Err(LoraError::shape(
                format!("forward input of {}", self.context),
                format!("(tokens, {in_features})"),
                format!("{:?}", x.dim()),
            ));
        }
        check_finite(|| format!("forward input of {}", self.context), x.iter())?;
        let tokens = x.nrows();
        // y starts as the broadcast bias so that the base product adds to it (β = 1) instead
        // of a separate pass over y; without a bias it is a fresh zeroed allocation (calloc'd
        // pages, no pass) that the product overwrites (β = 0).
        let (mut y, beta) = match self.base.bias() {
            Some(b) => (
                Array2::from_shape_fn((tokens, out_features), |(_, j)| b[j]),
                1.0,
            ),
            None => (Array2::zeros((tokens, out_features)), 0.0),
        };
        // The last forward's buffers are refilled instead of reallocated (a fresh
        // weight-sized array costs a page fault per 4 KiB on first touch).
        let dtype = self.compute_dtype;
        let (old_input, old_weight) = match self.cache.take() {
            Some(cache) => (Some(cache.input), cache.merged),
            None => (None, None),
        };
        let merged = match &self.frozen {
            Some(frozen) => {
                // Fake quantization off: the adapter over the unquantized W.
                let base = if self.fake_quant { frozen } else { &self.base };
                gemm_in(dtype, 1.0, x, base.weight().t(), beta, y.view_mut())?;
                self.adapter
                    .forward_into(base, x, None, self.training, y.view_mut())?;
                None
            }
            None => {
                let mut merged = self
                    .scratch
                    .take()
                    .unwrap_or_else(|| Array2::zeros(self.base.weight().dim()));
                merged.assign(self.base.weight());
                let adapter = &self.adapter;
                gemm(
                    adapter.scale(),
                    adapter.b().view(),
                    adapter.a().view(),
                    1.0,
                    merged.view_mut(),
                )?;
                let used = if self.fake_quant {
                    let mut w_q = old_weight.unwrap_or_default();
                    // The quantizer keeps `merged` as its backward input (no copy) and hands
                    // back its previous input buffer as the next scratch.
                    self.scratch = Some(
                        self.grid
                            .get_mut()
                            .forward_dequantized_owned(merged, &mut w_q)?,
                    );
                    w_q
                } else {
                    merged
                };
                gemm_in(dtype, 1.0, x, used.t(), beta, y.view_mut())?;
                Some(used)
            }
        };
        let input = match old_input {
            Some(mut kept) if kept.dim() == x.dim() => {
                kept.assign(&x);
                kept
            }
            _ => x.to_owned(),
        };
        self.cache = Some(QatCache {
            input,
            merged,
            quantized: self.fake_quant,
        });
        Ok(y)
    }

    /// Drops what the last forward kept for backward (the input and the quantized weight;
    /// the weight-sized scratch stays for reuse): gradient checkpointing frees a layer's
    /// activations this way and recomputes them with a second forward before its backward.
    pub fn release_forward_state(&mut self) {
        self.cache = None;
        self.adapter.clear_cache();
    }

    /// Given `dy: (tokens, out)`, returns `dx` and accumulates `dA`, `dB` (and `dθ` in the
    /// merged mode with fake quantization on).
    pub fn backward(&mut self, dy: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        let (out_features, in_features) = self.shape();
        let cache = self.cache.as_ref().ok_or_else(|| {
            LoraError::state("backward", &self.context, "no forward pass is stored")
        })?;
        let tokens = cache.input.nrows();
        if dy.dim() != (tokens, out_features) {
            return Err(LoraError::shape(
                format!("backward dy of {}", self.context),
                format!("({tokens}, {out_features})"),
                format!("{:?}", dy.dim()),
            ));
        }
        check_finite(|| format!("backward dy of {}", self.context), dy.iter())?;
        let mut dx = Array2::<f32>::zeros((tokens, in_features));
        let dtype = self.compute_dtype;
        match (&self.frozen, &cache.merged) {
            (Some(frozen), _) => {
                let base = if cache.quantized { frozen } else { &self.base };
                gemm_in(dtype, 1.0, dy, base.weight().view(), 0.0, dx.view_mut())?;
                self.adapter
                    .backward_into(base, cache.input.view(), dy, dx.view_mut(), true)?;
            }
            (None, Some(used)) => {
                gemm_in(dtype, 1.0, dy, used.view(), 0.0, dx.view_mut())?;
                let mut grad_w = self
                    .scratch
                    .take()
                    .unwrap_or_else(|| Array2::zeros((out_features, in_features)));
                gemm_in(
                    dtype,
                    1.0,
                    dy.t(),
                    cache.input.view(),
                    0.0,
                    grad_w.view_mut(),
                )?;
                // dV: through the quantizer's STE with fake quantization on; the identity
                // (V itself was the weight) with it off.
                if cache.quantized {
                    // dŴ becomes dV in place.
                    let params = self.grid.get_mut().backward_in_place(&mut grad_w)?;
                    for (acc, g) in self.grad_quantizer.iter_mut().zip(&params) {
                        *acc += g;
                    }
                }
                let grad_v = grad_w;
                let scale = self.adapter.scale();
                let (a, b) = (self.adapter.a().clone(), self.adapter.b().clone());
                let (grad_a, grad_b) = self.adapter.grads_mut();
                // dA = s·Bᵀ·dV (r, in); dB = s·dV·Aᵀ (out, r).
                gemm_in(dtype, scale, b.t(), grad_v.view(), 1.0, grad_a.view_mut())?;
                gemm_in(dtype, scale, grad_v.view(), a.t(), 1.0, grad_b.view_mut())?;
                if self.scratch.is_none() {
                    self.scratch = Some(grad_v);
                }
            }
            (None, None) => {
                return Err(LoraError::state(
                    "backward",
                    &self.context,
                    "the stored forward has no weight",
                ))
            }
        }
        Ok(dx)
    }
}

/// `W + s·B·A`.
fn merged_weight(weight: &Array2<f32>, adapter: &LoraAdapter) -> Result<Array2<f32>> {
    let mut merged = weight.clone();
    gemm(
        adapter.scale(),
        adapter.b().view(),
        adapter.a().view(),
        1.0,
        merged.view_mut(),
    )?;
    Ok(merged)
}
