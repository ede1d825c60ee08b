//! [`LoraAdapter`]: one named low-rank update `ΔW = s·B·A`, its gradients, its dropout and,
//! for DoRA, its magnitude vector — everything of an adapter except the base product.
//!
//! The adapter's forward and backward take the base as a [`FrozenBase`] and the base's output
//! `x·Wᵀ`, so the same code runs over an `f32`, NF4 or fake-quantized base.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut2, Axis, Zip};
use quant_core::linalg::{gemm, gemm_in, ComputeDtype};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::base::FrozenBase;
use crate::config::{scale, InitLoraWeights, LoraConfig};
use crate::error::{check_finite, LoraError, Result};

mod pass;

/// The per-layer hyper-parameters of one adapter, as PEFT resolves them from a config for one
/// module path (rank and alpha after `rank_pattern` / `alpha_pattern`).
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterOptions {
    /// Rank `r`.
    pub r: usize,
    /// Scaling numerator `α`.
    pub alpha: f64,
    /// Dropout probability on the adapter input, in `[0, 1)`.
    pub dropout: f64,
    /// `s = α/√r` instead of `α/r`.
    pub use_rslora: bool,
    /// Adds DoRA's trainable magnitude.
    pub use_dora: bool,
    /// How `A` and `B` start.
    pub init: InitLoraWeights,
}

impl AdapterOptions {
    /// Plain LoRA with rank `r`, alpha `alpha`, no dropout, PEFT's default init.
    pub fn new(r: usize, alpha: f64) -> Self {
        AdapterOptions {
            r,
            alpha,
            dropout: 0.0,
            use_rslora: false,
            use_dora: false,
            init: InitLoraWeights::Kaiming,
        }
    }

    /// The options `config` gives `module_path`.
    ///
    /// ```
    /// use lora_core::{AdapterOptions, LoraConfig};
    /// let mut config = LoraConfig::new(8, 16.0, &["q_proj"]);
    /// config.use_rslora = true;
    /// let o = AdapterOptions::from_config(&config, "model.layers.0.self_attn.q_proj");
    /// assert_eq!(o.scale(), 16.0 / 8f64.sqrt());
    /// ```
    pub fn from_config(config: &LoraConfig, module_path: &str) -> Self {
        AdapterOptions {
            r: config.rank_for(module_path),
            alpha: config.alpha_for(module_path),
            dropout: config.lora_dropout,
            use_rslora: config.use_rslora,
            use_dora: config.use_dora,
            init: match (&config.init_lora_weights, config.loftq_config) {
                (InitLoraWeights::Loftq { .. }, Some(settings)) => InitLoraWeights::Loftq {
                    loftq_bits: settings.loftq_bits,
                    loftq_iter: settings.loftq_iter,
                },
                (init, _) => init.clone(),
            },
        }
    }

    /// `s = α/r`, or `α/√r` with rsLoRA.
    pub fn scale(&self) -> f64 {
        scale(self.alpha, self.r, self.use_rslora)
    }

    /// Checks the options for a layer of shape `(out, in)`; the error names the option.
    pub fn validate(&self, out_features: usize, in_features: usize, context: &str) -> Result<()> {
        let max_rank = out_features.min(in_features);
        if self.r == 0 || self.r > max_rank {
            return Err(LoraError::option(
                format!("r for {context}"),
                self.r,
                format!("must be in 1..={max_rank} for a {out_features}×{in_features} layer"),
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(LoraError::option(
                format!("lora_alpha for {context}"),
                self.alpha,
                "must be finite and > 0",
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraError::option(
                format!("lora_dropout for {context}"),
                self.dropout,
                "must be in [0, 1)",
            ));
        }
        Ok(())
    }
}

/// A saved position of an adapter's dropout RNG ([`LoraAdapter::dropout_state`]).
#[derive(Clone, Debug)]
pub struct DropoutState(ChaCha8Rng);

/// What the backward pass needs from the forward pass.
#[derive(Clone, Debug)]
struct AdapterCache {
    /// `mask ⊙ x` when dropout was applied, else `None` (the layer's `x` is used).
    x_dropped: Option<Array2<f32>>,
    /// `0` or `1/(1−p)` per input element, when dropout was applied.
    mask: Option<Array2<f32>>,
    /// `x_d·Aᵀ`, `(tokens, r)`.
    hidden: Array2<f32>,
    dora: Option<DoraCache>,
}

#[derive(Clone, Debug)]
struct DoraCache {
    /// `g = m / ‖W + s·B·A‖_row`, the norm held constant (detached), `(out)`.
    ratio: Array1<f32>,
    /// `‖W + s·B·A‖_row`, `(out)`.
    weight_norm: Array1<f32>,
    /// `x_d·Wᵀ + s·x_d·Aᵀ·Bᵀ`, `(tokens, out)`: what `m/‖·‖` multiplies.
    direction_out: Array2<f32>,
}

/// One adapter: `A: (r, in)`, `B: (out, r)`, scale `s`, optional DoRA magnitude `m: (out)`,
/// their gradients, and a seeded dropout.
///
/// The contribution to a layer's output for input `x` (after dropout `x_d`) is
/// `s·x_d·Aᵀ·Bᵀ` for LoRA, computed through the rank-`r` intermediate (never forming `ΔW`);
/// for DoRA it is PEFT's `(g − 1)⊙(x_d·Wᵀ) + g⊙(s·x_d·Aᵀ·Bᵀ)` with
/// `g = m / ‖W + s·B·A‖_row` and the norm treated as a constant in backward (DoRA §4.3).
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    a: Array2<f32>,
    b: Array2<f32>,
    magnitude: Option<Array1<f32>>,
    grad_a: Array2<f32>,
    grad_b: Array2<f32>,
    grad_magnitude: Option<Array1<f32>>,
    options: AdapterOptions,
    scale: f32,
    rng: ChaCha8Rng,
    cache: Option<AdapterCache>,
    /// The precision of the forward and backward products (`x·Aᵀ`, `h·Bᵀ` and their
    /// gradients); `A`, `B` and their gradients stay `f32` (master weights).
    compute_dtype: ComputeDtype,
}

impl LoraAdapter {
    /// A fresh adapter for an `(out, in)` layer, initialised as `options.init` says from a
    /// seeded RNG (the same seed also drives this adapter's dropout masks). DoRA's magnitude
    /// is set from the base with [`LoraAdapter::init_dora_magnitude`]; PiSSA needs the base
    /// weight and is done by [`crate::LoraLinear::add_adapter`].
    ///
    /// ```
    /// use lora_core::{AdapterOptions, LoraAdapter};
    /// let a = LoraAdapter::new(&AdapterOptions::new(2, 4.0), 5, 3, 7, "demo").unwrap();
    /// assert_eq!(a.a().dim(), (2, 3));
    /// assert!(a.b().iter().all(|&v| v == 0.0)); // PEFT's default: B = 0
    /// assert!(a.a().iter().all(|&v| v.abs() <= 1.0 / 3f32.sqrt()));
    /// ```
    pub fn new(
        options: &AdapterOptions,
        out_features: usize,
        in_features: usize,
        seed: u64,
        context: &str,
    ) -> Result<Self> {
        options.validate(out_features, in_features, context)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let r = options.r;
        // torch's nn.Linear default (kaiming_uniform_ with a = √5) has bound
        // gain·√3/√fan_in = √(2/(1+5))·√3/√fan_in = 1/√fan_in.
        let uniform = |rng: &mut ChaCha8Rng, rows: usize, fan_in: usize| {
            let bound = 1.0 / (fan_in as f32).sqrt();
            Array2::from_shape_fn((rows, fan_in), |_| rng.random_range(-bound..=bound))
        };
        let (a, b) = match &options.init {
            InitLoraWeights::Kaiming => (
                uniform(&mut rng, r, in_features),
                Array2::zeros((out_features, r)),
            ),
            InitLoraWeights::Gaussian => {
                let normal = Normal::new(0.0f32, 1.0 / r as f32).map_err(|e| {
                    LoraError::option("init_lora_weights", "gaussian", e.to_string())
                })?;
                (
                    Array2::from_shape_fn((r, in_features), |_| normal.sample(&mut rng)),
                    Array2::zeros((out_features, r)),
                )
            }
            InitLoraWeights::Random => {
                let a = uniform(&mut rng, r, in_features);
                (a, uniform(&mut rng, out_features, r))
            }
            InitLoraWeights::Pissa | InitLoraWeights::Loftq { .. } => {
                return Err(LoraError::option(
                    format!("init_lora_weights for {context}"),
                    format!("{:?}", options.init),
                    "needs the base weight: create the adapter through LoraLinear::add_adapter",
                ))
            }
            InitLoraWeights::Other(name) => {
                return Err(LoraError::option(
                    format!("init_lora_weights for {context}"),
                    format!("{name:?}"),
                    "this initialisation is not implemented (supported: true, false, \
                     \"gaussian\", \"pissa\", \"loftq\")",
                ))
            }
        };
        Self::assemble(a, b, None, options, rng)
    }

    /// An adapter from given matrices (a loaded file, a combination). `a: (r, in)`,
    /// `b: (out, r)`, `magnitude: (out)` when `options.use_dora`. `seed` drives dropout.
    pub fn from_weights(
        a: Array2<f32>,
        b: Array2<f32>,
        magnitude: Option<Array1<f32>>,
        options: &AdapterOptions,
        seed: u64,
        context: &str,
    ) -> Result<Self> {
        let (r, in_features) = a.dim();
        let out_features = b.nrows();
        if r != options.r {
            return Err(LoraError::shape(
                format!("lora_A of {context}"),
                format!("{} rows (r)", options.r),
                format!("{:?}", a.dim()),
            ));
        }
        if b.ncols() != r {
            return Err(LoraError::shape(
                format!("lora_B of {context}"),
                format!("({out_features}, {r})"),
                format!("{:?}", b.dim()),
            ));
        }
        options.validate(out_features, in_features, context)?;
        check_finite(|| format!("lora_A of {context}"), a.iter())?;
        check_finite(|| format!("lora_B of {context}"), b.iter())?;
        match (&magnitude, options.use_dora) {
            (Some(m), true) => {
                if m.len() != out_features {
                    return Err(LoraError::shape(
                        format!("lora_magnitude_vector of {context}"),
                        out_features,
                        m.len(),
                    ));
                }
                check_finite(|| format!("lora_magnitude_vector of {context}"), m.iter())?;
            }
            (None, false) => {}
            (Some(_), false) => {
                return Err(LoraError::option(
                    format!("use_dora for {context}"),
                    false,
                    "a magnitude vector was given for a non-DoRA adapter",
                ))
            }
            (None, true) => {
                return Err(LoraError::option(
                    format!("use_dora for {context}"),
                    true,
                    "a DoRA adapter needs its magnitude vector",
                ))
            }
        }
        Self::assemble(a, b, magnitude, options, ChaCha8Rng::seed_from_u64(seed))
    }

    fn assemble(
        a: Array2<f32>,
        b: Array2<f32>,
        magnitude: Option<Array1<f32>>,
        options: &AdapterOptions,
        rng: ChaCha8Rng,
    ) -> Result<Self> {
        let grad_magnitude = magnitude.as_ref().map(|m| Array1::zeros(m.len()));
        Ok(LoraAdapter {
            grad_a: Array2::zeros(a.dim()),
            grad_b: Array2::zeros(b.dim()),
            a,
            b,
            magnitude,
            grad_magnitude,
            scale: options.scale() as f32,
            options: options.clone(),
            rng,
            cache: None,
            compute_dtype: ComputeDtype::F32,
        })
    }

    /// Sets DoRA's magnitude to `‖W + s·B·A‖_row`, as PEFT does when the adapter is created,
    /// so that the adapted layer starts equal to the LoRA-adapted one.
    pub fn init_dora_magnitude(&mut self, weight: ArrayView2<'_, f32>) -> Result<()> {
        let norm = self.dora_weight_norm(weight)?;
        self.grad_magnitude = Some(Array1::zeros(norm.len()));
        self.magnitude = Some(norm);
        self.options.use_dora = true;
        Ok(())
    }

    /// `‖W + s·B·A‖` over the input dimension, one value per output row (accumulated in f64).
    pub fn dora_weight_norm(&self, weight: ArrayView2<'_, f32>) -> Result<Array1<f32>> {
        let mut adapted = self.delta_weight()?;
        if adapted.dim() != weight.dim() {
            return Err(LoraError::shape(
                "DoRA weight norm: base weight (out, in)",
                format!("{:?}", adapted.dim()),
                format!("{:?}", weight.dim()),
            ));
        }
        adapted += &weight;
        Ok(adapted.map_axis(Axis(1), |row| {
            row.iter()
                .map(|&v| (v as f64) * (v as f64))
                .sum::<f64>()
                .sqrt() as f32
        }))
    }

    /// The precision of this adapter's forward and backward products.
    pub fn compute_dtype(&self) -> ComputeDtype {
        self.compute_dtype
    }

    /// Sets the precision of the forward and backward products (bf16: operands rounded,
    /// sums in `f32`). `ΔW` for merging and DoRA's norm is always formed in `f32`.
    pub fn set_compute_dtype(&mut self, dtype: ComputeDtype) {
        self.compute_dtype = dtype;
    }

    /// `ΔW = s·B·A`, `(out, in)`. Used for merging and DoRA's norm, never in the LoRA forward.
    pub fn delta_weight(&self) -> Result<Array2<f32>> {
        let mut delta = Array2::zeros((self.b.nrows(), self.a.ncols()));
        gemm(
            self.scale,
            self.b.view(),
            self.a.view(),
            0.0,
            delta.view_mut(),
        )?;
        Ok(delta)
    }

    /// Restarts the dropout masks' RNG from `seed`: a training loop that reseeds every step
    /// from its own saved RNG makes the masks a function of its state, so a resumed run
    /// draws the masks the uninterrupted one would.
    ///
    /// ```
    /// use lora_core::{AdapterOptions, LoraAdapter};
    /// let mut options = AdapterOptions::new(2, 4.0);
    /// options.dropout = 0.5;
    /// let mut a = LoraAdapter::new(&options, 4, 3, 7, "demo").unwrap();
    /// let mut b = a.clone();
    /// let base = lora_core::DenseBase::new(ndarray::Array2::zeros((4, 3)), None, "demo").unwrap();
    /// let x = ndarray::Array2::ones((5, 3));
    /// let mut y = ndarray::Array2::zeros((5, 4));
    /// a.forward_into(&base, x.view(), None, true, y.view_mut()).unwrap(); // a's RNG moves on
    /// a.reseed_dropout(1);
    /// b.reseed_dropout(1);
    /// a.forward_into(&base, x.view(), None, true, y.view_mut()).unwrap();
    /// b.forward_into(&base, x.view(), None, true, y.view_mut()).unwrap();
    /// assert_eq!(a.last_dropout_mask(), b.last_dropout_mask());
    /// ```
    pub fn reseed_dropout(&mut self, seed: u64) {
        self.rng = ChaCha8Rng::seed_from_u64(seed);
    }

    /// Where the dropout masks' RNG stands now. Gradient checkpointing takes it before a
    /// layer's forward and [`LoraAdapter::restore_dropout_state`]s it before recomputing
    /// that forward in backward, so the recomputation draws the very masks the forward drew.
    ///
    /// ```
    /// use lora_core::{AdapterOptions, LoraAdapter};
    /// let mut options = AdapterOptions::new(2, 4.0);
    /// options.dropout = 0.5;
    /// let mut a = LoraAdapter::new(&options, 4, 3, 7, "demo").unwrap();
    /// let base = lora_core::DenseBase::new(ndarray::Array2::zeros((4, 3)), None, "demo").unwrap();
    /// let x = ndarray::Array2::ones((5, 3));
    /// let mut y = ndarray::Array2::zeros((5, 4));
    /// let before = a.dropout_state();
    /// a.forward_into(&base, x.view(), None, true, y.view_mut()).unwrap();
    /// let first = a.last_dropout_mask().unwrap().clone();
    /// a.restore_dropout_state(before);
    /// a.forward_into(&base, x.view(), None, true, y.view_mut()).unwrap();
    /// assert_eq!(a.last_dropout_mask().unwrap(), &first);
    /// ```
    pub fn dropout_state(&self) -> DropoutState {
        DropoutState(self.rng.clone())
    }

    /// Puts the dropout masks' RNG back where [`LoraAdapter::dropout_state`] found it.
    pub fn restore_dropout_state(&mut self, state: DropoutState) {
        self.rng = state.0;
    }

    /// DoRA's `g = m/‖W + s·B·A‖_row` of the last forward when it ran without dropout: the
    /// layer may then fold `((g − 1)⊙dy)·W` into its own `dy·W`.
    pub fn dora_ratio_without_dropout(&self) -> Option<&Array1<f32>> {
        self.cache
            .as_ref()
            .filter(|c| c.mask.is_none())
            .and_then(|c| c.dora.as_ref())
            .map(|d| &d.ratio)
    }

    /// `(∂L/∂A, ∂L/∂B)` for layers that compute them outside the low-rank path (LoRA-QAT).
    pub(crate) fn grads_mut(&mut self) -> (&mut Array2<f32>, &mut Array2<f32>) {
        (&mut self.grad_a, &mut self.grad_b)
    }

    /// Sets every gradient to zero.
    pub fn zero_grad(&mut self) {
        self.grad_a.fill(0.0);
        self.grad_b.fill(0.0);
        if let Some(g) = &mut self.grad_magnitude {
            g.fill(0.0);
        }
    }

    /// Drops what the last forward kept.
    pub fn clear_cache(&mut self) {
        self.cache = None;
    }

    /// The dropout mask of the last training forward (`0` or `1/(1−p)` per input element),
    /// if dropout was applied; tests use it to rebuild the same function.
    pub fn last_dropout_mask(&self) -> Option<&Array2<f32>> {
        self.cache.as_ref().and_then(|c| c.mask.as_ref())
    }

    /// `A: (r, in)`.
    pub fn a(&self) -> &Array2<f32> {
        &self.a
    }
    /// `B: (out, r)`.
    pub fn b(&self) -> &Array2<f32> {
        &self.b
    }
    /// DoRA's magnitude `m: (out)`, if this is a DoRA adapter.
    pub fn magnitude(&self) -> Option<&Array1<f32>> {
        self.magnitude.as_ref()
    }
    /// `∂L/∂A` accumulated since the last `zero_grad`.
    pub fn grad_a(&self) -> &Array2<f32> {
        &self.grad_a
    }
    /// `∂L/∂B` accumulated since the last `zero_grad`.
    pub fn grad_b(&self) -> &Array2<f32> {
        &self.grad_b
    }
    /// `∂L/∂m` accumulated since the last `zero_grad` (DoRA only).
    pub fn grad_magnitude(&self) -> Option<&Array1<f32>> {
        self.grad_magnitude.as_ref()
    }
    /// The options the adapter was made with.
    pub fn options(&self) -> &AdapterOptions {
        &self.options
    }
    /// Rank `r`.
    pub fn rank(&self) -> usize {
        self.a.nrows()
    }
    /// The scale `s` as applied (`f32`).
    pub fn scale(&self) -> f32 {
        self.scale
    }
    /// Whether this is a DoRA adapter.
    pub fn is_dora(&self) -> bool {
        self.magnitude.is_some()
    }
    /// `(out, in)` of the layer this adapter fits.
    pub fn shape(&self) -> (usize, usize) {
        (self.b.nrows(), self.a.ncols())
    }
    /// Trainable parameters: `r·in + out·r` (+ `out` for DoRA).
    pub fn parameter_count(&self) -> usize {
        self.a.len() + self.b.len() + self.magnitude.as_ref().map_or(0, |m| m.len())
    }

    /// Replaces `A`, `B` and (DoRA) `m` with same-shaped finite values, e.g. after an
    /// optimizer step. Gradients are kept; the stored forward is dropped.
    pub fn set_weights(
        &mut self,
        a: ArrayView2<'_, f32>,
        b: ArrayView2<'_, f32>,
        magnitude: Option<ArrayView1<'_, f32>>,
    ) -> Result<()> {
        if a.dim() != self.a.dim() {
            return Err(LoraError::shape(
                "set_weights: lora_A",
                format!("{:?}", self.a.dim()),
                format!("{:?}", a.dim()),
            ));
        }
        if b.dim() != self.b.dim() {
            return Err(LoraError::shape(
                "set_weights: lora_B",
                format!("{:?}", self.b.dim()),
                format!("{:?}", b.dim()),
            ));
        }
        check_finite(|| "set_weights: lora_A".into(), a.iter())?;
        check_finite(|| "set_weights: lora_B".into(), b.iter())?;
        match (&mut self.magnitude, magnitude) {
            (Some(m), Some(new)) => {
                if new.len() != m.len() {
                    return Err(LoraError::shape(
                        "set_weights: lora_magnitude_vector",
                        m.len(),
                        new.len(),
                    ));
                }
                check_finite(|| "set_weights: lora_magnitude_vector".into(), new.iter())?;
                m.assign(&new);
            }
            (None, None) | (Some(_), None) => {}
            (None, Some(_)) => {
                return Err(LoraError::option(
                    "set_weights: magnitude",
                    "given",
                    "the adapter is not a DoRA adapter",
                ))
            }
        }
        self.a.assign(&a);
        self.b.assign(&b);
        self.cache = None;
        Ok(())
    }
}

/// The trainable tensors of a [`LoraAdapter`] and their gradients, borrowed mutably together,
/// for optimizers that update in place and for models that expose adapters as parameters.
#[derive(Debug)]
pub struct AdapterTensorsMut<'a> {
    /// `A: (r, in)` and `∂L/∂A`.
    pub a: (&'a mut Array2<f32>, &'a mut Array2<f32>),
    /// `B: (out, r)` and `∂L/∂B`.
    pub b: (&'a mut Array2<f32>, &'a mut Array2<f32>),
    /// DoRA's `m: (out)` and `∂L/∂m`.
    pub magnitude: Option<(&'a mut Array1<f32>, &'a mut Array1<f32>)>,
}

impl LoraAdapter {
    /// `A`, `B`, DoRA's `m` and their gradients for in-place updates. The forward kept for
    /// backward is not invalidated: change values between steps, not between a forward and
    /// its backward.
    ///
    /// ```
    /// use lora_core::{AdapterOptions, LoraAdapter};
    /// let mut adapter = LoraAdapter::new(&AdapterOptions::new(2, 4.0), 5, 3, 7, "demo").unwrap();
    /// let tensors = adapter.tensors_mut();
    /// tensors.b.0.fill(0.5);
    /// assert_eq!(adapter.b()[[4, 1]], 0.5);
    /// ```
    pub fn tensors_mut(&mut self) -> AdapterTensorsMut<'_> {
        AdapterTensorsMut {
            a: (&mut self.a, &mut self.grad_a),
            b: (&mut self.b, &mut self.grad_b),
            magnitude: self.magnitude.as_mut().zip(self.grad_magnitude.as_mut()),
        }
    }
}

/// A caller-supplied buffer's shape must be `want`.
fn check_dim(what: &str, want: (usize, usize), got: (usize, usize)) -> Result<()> {
    if want != got {
        return Err(LoraError::shape(
            what,
            format!("{want:?}"),
            format!("{got:?}"),
        ));
    }
    Ok(())
}
