//! [`LoraLinear`]: a frozen base linear with any number of named adapters.

use ndarray::{Array1, Array2, ArrayView2, Axis, Zip};
use quant_core::linalg::ComputeDtype;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::adapter::{AdapterOptions, LoraAdapter};
use crate::base::{DenseBase, FrozenBase};
use crate::config::InitLoraWeights;
use crate::error::{check_finite, LoraError, Result};
use crate::svd::truncated_svd;

/// One merged adapter, remembered so that unmerging undoes exactly what merging did.
#[derive(Clone, Debug)]
struct MergeRecord {
    adapter: String,
    /// DoRA's `m/‖W + ΔW‖_row` at merge time (PEFT caches the same norm).
    dora_factor: Option<Array1<f32>>,
}

/// A linear layer `y = x·Wᵀ + b` with a frozen base and named low-rank adapters.
///
/// Several adapters may be held and several active at once (their contributions add, as in
/// PEFT). The first adapter added becomes active; [`LoraLinear::set_active`] changes that.
/// Only active, unmerged adapters take part in forward and receive gradients.
///
/// ```
/// use lora_core::{AdapterOptions, LoraLinear};
/// use lora_core::config::InitLoraWeights;
/// use ndarray::Array2;
///
/// let w = Array2::from_shape_fn((4, 6), |(i, j)| (i as f32 - j as f32) * 0.1);
/// let mut layer = LoraLinear::dense(w, None, "model.layers.0.self_attn.q_proj").unwrap();
/// let mut options = AdapterOptions::new(2, 4.0);
/// options.init = InitLoraWeights::Random; // non-zero B so the adapter changes the output
/// layer.add_adapter("default", &options, 42).unwrap();
///
/// let x = Array2::from_shape_fn((3, 6), |(t, j)| (t + j) as f32 * 0.05);
/// let y = layer.forward(x.view()).unwrap();
/// let dx = layer.backward(Array2::ones((3, 4)).view()).unwrap();
/// assert_eq!((y.dim(), dx.dim()), ((3, 4), (3, 6)));
/// assert!(layer.adapter("default").unwrap().grad_a().iter().any(|&g| g != 0.0));
///
/// // Merging folds s·B·A into W; the output does not change, and unmerging restores W.
/// layer.merge().unwrap();
/// let merged = layer.forward(x.view()).unwrap();
/// assert!(y.iter().zip(merged.iter()).all(|(a, b)| (a - b).abs() < 1e-5));
/// layer.unmerge().unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct LoraLinear<B: FrozenBase = DenseBase> {
    base: B,
    adapters: Vec<(String, LoraAdapter)>,
    active: Vec<String>,
    enabled: bool,
    training: bool,
    merged: Vec<MergeRecord>,
    input: Option<Array2<f32>>,
    context: String,
}

impl LoraLinear<DenseBase> {
    /// A layer over a dense `f32` weight `(out, in)` and optional bias; `context` (usually the
    /// module path) appears in error messages.
    pub fn dense(weight: Array2<f32>, bias: Option<Array1<f32>>, context: &str) -> Result<Self> {
        Ok(LoraLinear::new(
            DenseBase::new(weight, bias, context)?,
            context,
        ))
    }
}

impl<B: FrozenBase> LoraLinear<B> {
    /// A layer over any frozen base, with no adapters yet, in training mode.
    pub fn new(base: B, context: &str) -> Self {
        LoraLinear {
            base,
            adapters: Vec::new(),
            active: Vec::new(),
            enabled: true,
            training: true,
            merged: Vec::new(),
            input: None,
            context: context.to_string(),
        }
    }

    /// `(out, in)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.base.out_features(), self.base.in_features())
    }

    /// The frozen base.
    pub fn base(&self) -> &B {
        &self.base
    }

    /// The precision of the layer's products (the base's and every adapter's).
    pub fn compute_dtype(&self) -> ComputeDtype {
        self.base.compute_dtype()
    }

    /// Sets the precision of every product of the layer — the base's `x·Wᵀ` and `dy·W` and
    /// each adapter's low-rank products, forward and backward — and of adapters added
    /// later. Weights, gradients and outputs stay `f32`; merging forms `ΔW` in `f32`.
    ///
    /// ```
    /// use lora_core::{AdapterOptions, LoraLinear};
    /// use ndarray::Array2;
    /// use quant_core::linalg::ComputeDtype;
    /// let w = Array2::from_shape_fn((8, 16), |(i, j)| ((i * 16 + j) as f32 * 0.37).sin());
    /// let mut layer = LoraLinear::dense(w, None, "q_proj").unwrap();
    /// layer.add_adapter("default", &AdapterOptions::new(4, 8.0), 0).unwrap();
    /// let x = Array2::from_shape_fn((3, 16), |(i, j)| ((i + 2 * j) as f32 * 0.11).cos());
    /// let full = layer.forward(x.view()).unwrap();
    /// layer.set_compute_dtype(ComputeDtype::Bf16);
    /// let bf16 = layer.forward(x.view()).unwrap();
    /// // bf16 operands (8 significant bits), f32 sums: close, but not equal.
    /// assert!(full.iter().zip(bf16.iter()).all(|(a, b)| (a - b).abs() < 2e-2));
    /// assert_ne!(full, bf16);
    /// ```
    pub fn set_compute_dtype(&mut self, dtype: ComputeDtype) {
        self.base.set_compute_dtype(dtype);
        for (_, adapter) in &mut self.adapters {
            adapter.set_compute_dtype(dtype);
        }
    }

    /// The name used in error messages (the module path).
    pub fn context(&self) -> &str {
        &self.context
    }

    /// Adds a fresh adapter initialised as `options.init` says, from `seed` (which also
    /// drives its dropout). PiSSA moves the top-`r` singular triplets of `W` into the adapter
    /// and leaves the residual in the base, as PEFT does. DoRA's magnitude starts at
    /// `‖W + s·B·A‖_row`. The first adapter becomes active.
    pub fn add_adapter(&mut self, name: &str, options: &AdapterOptions, seed: u64) -> Result<()> {
        self.check_new_name(name)?;
        let (out_features, in_features) = self.shape();
        let context = format!("{} adapter {name:?}", self.context);
        options.validate(out_features, in_features, &context)?;
        let mut adapter = if let InitLoraWeights::Loftq {
            loftq_bits,
            loftq_iter,
        } = options.init
        {
            if !self.merged.is_empty() {
                return Err(LoraError::state(
                    "LoftQ initialisation",
                    &self.context,
                    "the layer has merged adapters; unmerge first",
                ));
            }
            // The base must be editable (a 4-bit base cannot take deq(Q)): ask before the work.
            self.base.weight_mut()?;
            let (dequantized, a, b) = self.loftq_factors(options, loftq_bits, loftq_iter)?;
            let mut plain = options.clone();
            plain.use_dora = false;
            let adapter = LoraAdapter::from_weights(a, b, None, &plain, seed, &context)?;
            *self.base.weight_mut()? = dequantized;
            adapter
        } else if options.init == InitLoraWeights::Pissa {
            if !self.merged.is_empty() {
                return Err(LoraError::state(
                    "PiSSA initialisation",
                    &self.context,
                    "the layer has merged adapters; unmerge first",
                ));
            }
            let (a, b) = self.pissa_factors(options)?;
            let mut plain = options.clone();
            plain.use_dora = false;
            let adapter = LoraAdapter::from_weights(a, b, None, &plain, seed, &context)?;
            let principal = adapter.delta_weight()?;
            *self.base.weight_mut()? -= &principal;
            adapter
        } else {
            let mut plain = options.clone();
            plain.use_dora = false;
            LoraAdapter::new(&plain, out_features, in_features, seed, &context)?
        };
        if options.use_dora {
            let weight = self.base.dense_weight()?;
            adapter.init_dora_magnitude(weight.view())?;
        }
        self.insert(name, adapter);
        Ok(())
    }

    /// PEFT's PiSSA: `W = U S Vᵀ`, `A = √(S_r/s)·V_rᵀ`, `B = U_r·√(S_r/s)`, so `s·B·A` is the
    /// best rank-`r` approximation of `W`.
    fn pissa_factors(&self, options: &AdapterOptions) -> Result<(Array2<f32>, Array2<f32>)> {
        let weight = self.base.dense_weight()?;
        let svd = truncated_svd(weight.view(), options.r, &self.context)?;
        let scale = options.scale() as f32;
        let root = svd.s.mapv(|s| (s / scale).sqrt());
        let a = &svd.vt * &root.view().insert_axis(Axis(1));
        let b = &svd.u * &root.view().insert_axis(Axis(0));
        Ok((a, b))
    }

    /// PEFT's LoftQ (`LoraLayer.loftq_init`): `(deq(Q), lora_A, lora_B)` with `lora_A = √S·Vᵀ`,
    /// `lora_B = U·√S` of the last residual's rank-`r` SVD, not rescaled by `s` (PEFT assigns
    /// them as they come, so `deq(Q) + s·B·A` approximates `W` when `s = 1`), each
    /// quantization NF4 at blocksize 64 without double quantization (PEFT's `Params4bit`).
    fn loftq_factors(
        &self,
        options: &AdapterOptions,
        loftq_bits: u32,
        loftq_iter: usize,
    ) -> Result<(Array2<f32>, Array2<f32>, Array2<f32>)> {
        let weight = self.base.dense_weight()?;
        // Unit scale: loftq_init then returns PEFT's unscaled factors.
        let mut unit = AdapterOptions::new(options.r, options.r as f64);
        unit.use_rslora = false;
        let config = crate::qlora::LoftqConfig {
            loftq_bits,
            loftq_iter,
            quantization: crate::qlora::Nf4Options {
                double_quant: false,
                ..crate::qlora::Nf4Options::default()
            },
        };
        let result = crate::qlora::loftq_init(weight.view(), &unit, &config, &self.context)?;
        let dequantized = result.base.dense_weight()?.into_owned();
        Ok((dequantized, result.a, result.b))
    }

    /// Adds an adapter built elsewhere (a loaded file, a combination). Its shape must match.
    pub fn insert_adapter(&mut self, name: &str, adapter: LoraAdapter) -> Result<()> {
        self.check_new_name(name)?;
        if adapter.shape() != self.shape() {
            return Err(LoraError::shape(
                format!("adapter {name:?} for {}", self.context),
                format!("(out, in) = {:?}", self.shape()),
                format!("{:?}", adapter.shape()),
            ));
        }
        self.insert(name, adapter);
        Ok(())
    }

    fn insert(&mut self, name: &str, mut adapter: LoraAdapter) {
        // A new adapter computes in the layer's precision.
        adapter.set_compute_dtype(self.base.compute_dtype());
        self.adapters.push((name.to_string(), adapter));
        if self.adapters.len() == 1 {
            self.active = vec![name.to_string()];
        }
    }

    fn check_new_name(&self, name: &str) -> Result<()> {
        if self.adapters.iter().any(|(n, _)| n == name) {
            return Err(LoraError::DuplicateAdapter {
                name: name.to_string(),
                context: self.context.clone(),
            });
        }
        Ok(())
    }

    fn unknown(&self, name: &str) -> LoraError {
        LoraError::UnknownAdapter {
            name: name.to_string(),
            context: self.context.clone(),
            known: self.adapter_names(),
        }
    }

    /// Removes an adapter (unmerging everything first if it is merged) and returns it.
    pub fn remove_adapter(&mut self, name: &str) -> Result<LoraAdapter> {
        let index = self
            .adapters
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| self.unknown(name))?;
        if self.merged.iter().any(|m| m.adapter == name) {
            self.unmerge()?;
        }
        self.active.retain(|n| n != name);
        Ok(self.adapters.remove(index).1)
    }

    /// Removes a PiSSA adapter and gives its principal part back to the base (`W += s·B·A`),
    /// undoing [`LoraLinear::add_adapter`]; used to roll back a set-wide creation that failed.
    pub(crate) fn remove_pissa_adapter(&mut self, name: &str) -> Result<()> {
        let adapter = self.remove_adapter(name)?;
        let principal = adapter.delta_weight()?;
        *self.base.weight_mut()? += &principal;
        Ok(())
    }

    /// Puts back a base weight saved before a LoftQ creation that a later layer's failure
    /// rolls back (the layer's dense base accepted `deq(Q)`, so it accepts this too).
    pub(crate) fn restore_base_weight(&mut self, weight: Array2<f32>) {
        if let Ok(w) = self.base.weight_mut() {
            *w = weight;
        }
    }

    /// Names of all adapters, in the order they were added.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The named adapter.
    pub fn adapter(&self, name: &str) -> Result<&LoraAdapter> {
        self.adapters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a)
            .ok_or_else(|| self.unknown(name))
    }

    /// The named adapter, for an optimizer step. Refused while it is merged (its weights are
    /// inside `W` and must not change until unmerged).
    pub fn adapter_mut(&mut self, name: &str) -> Result<&mut LoraAdapter> {
        if self.merged.iter().any(|m| m.adapter == name) {
            return Err(LoraError::state(
                format!("changing adapter {name:?}"),
                &self.context,
                "it is merged into the base weight; unmerge first",
            ));
        }
        let unknown = self.unknown(name);
        self.adapters
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a)
            .ok_or(unknown)
    }

    /// The active adapter names.
    pub fn active(&self) -> &[String] {
        &self.active
    }

    /// Makes exactly `names` active (in that order), unmerging first if anything is merged,
    /// as PEFT's `set_adapter` does.
    pub fn set_active(&mut self, names: &[&str]) -> Result<()> {
        for name in names {
            self.adapter(name)?;
        }
        if !self.merged.is_empty() {
            self.unmerge()?;
        }
        self.active = names.iter().map(|s| s.to_string()).collect();
        Ok(())
    }

    /// Turns adapters off: the layer computes the base alone (unmerging first if needed).
    pub fn disable_adapters(&mut self) -> Result<()> {
        if !self.merged.is_empty() {
            self.unmerge()?;
        }
        self.enabled = false;
        Ok(())
    }

    /// Turns the active adapters back on.
    pub fn enable_adapters(&mut self) {
        self.enabled = true;
    }

    /// Whether adapters are enabled.
    pub fn adapters_enabled(&self) -> bool {
        self.enabled
    }

    /// Training mode draws dropout masks; evaluation mode does not.
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// Whether any adapter is merged into `W`.
    pub fn is_merged(&self) -> bool {
        !self.merged.is_empty()
    }

    fn contributing(&self) -> Vec<usize> {
        if !self.enabled {
            return Vec::new();
        }
        self.active
            .iter()
            .filter(|name| !self.merged.iter().any(|m| &m.adapter == *name))
            .filter_map(|name| self.adapters.iter().position(|(n, _)| n == name))
            .collect()
    }

    /// `y = x·Wᵀ + b + Σ_active adapter(x)` for `x: (tokens, in)`. Keeps `x` (and each
    /// adapter keeps its intermediates) for [`LoraLinear::backward`].
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
        let mut y = Array2::zeros((x.nrows(), out_features));
        self.base.matmul_into(x, y.view_mut())?;
        let contributing = self.contributing();
        // DoRA rescales the base output, so it needs x·Wᵀ apart from the running sum.
        let base_out = contributing
            .iter()
            .any(|&i| self.adapters[i].1.is_dora())
            .then(|| y.clone());
        for index in contributing {
            let adapter = &mut self.adapters[index].1;
            let base_out = base_out.as_ref().map(|b| b.view());
            adapter.forward_into(&self.base, x, base_out, self.training, y.view_mut())?;
        }
        if let Some(bias) = self.base.bias() {
            y += &bias.insert_axis(Axis(0));
        }
        // Refill the last step's copy of x when the shape repeats (as in training) instead of
        // a fresh allocation that page-faults on first touch.
        match &mut self.input {
            Some(kept) if kept.dim() == x.dim() => kept.assign(&x),
            slot => *slot = Some(x.to_owned()),
        }
        Ok(y)
    }

    /// Drops what the last forward kept for backward (the copy of `x`, every adapter's
    /// intermediates): gradient checkpointing frees a layer's activations this way and
    /// recomputes them with a second forward before its backward.
    pub fn release_forward_state(&mut self) {
        self.input = None;
        for (_, a) in &mut self.adapters {
            a.clear_cache();
        }
    }

    /// Given `dy = ∂L/∂y`, returns `∂L/∂x` and accumulates (`+=`) the gradients of every
    /// active, unmerged adapter. The base and its bias are frozen.
    pub fn backward(&mut self, dy: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        let (out_features, in_features) = self.shape();
        let input = self.input.take().ok_or_else(|| {
            LoraError::state("backward", &self.context, "no forward pass is stored")
        })?;
        let result = (|| {
            if dy.dim() != (input.nrows(), out_features) {
                return Err(LoraError::shape(
                    format!("backward dy of {}", self.context),
                    format!("({}, {out_features})", input.nrows()),
                    format!("{:?}", dy.dim()),
                ));
            }
            check_finite(|| format!("backward dy of {}", self.context), dy.iter())?;
            let contributing = self.contributing();
            // DoRA without dropout adds ((g − 1)⊙dy)·W to dx; fold every such term into the
            // base product: dx = (dy ⊙ (1 + Σ (g − 1)))·W + low-rank terms.
            let mut column_scale: Option<Array1<f32>> = None;
            for &index in &contributing {
                if let Some(g) = self.adapters[index].1.dora_ratio_without_dropout() {
                    let scale = column_scale.get_or_insert_with(|| Array1::ones(out_features));
                    Zip::from(scale).and(g).for_each(|c, &g| *c += g - 1.0);
                }
            }
            let mut dx = Array2::zeros((input.nrows(), in_features));
            match &column_scale {
                None => self.base.matmul_transposed_into(dy, 0.0, dx.view_mut())?,
                Some(scale) => {
                    let scaled = &dy * &scale.view().insert_axis(Axis(0));
                    self.base
                        .matmul_transposed_into(scaled.view(), 0.0, dx.view_mut())?
                }
            }
            for index in contributing {
                let adapter = &mut self.adapters[index].1;
                adapter.backward_into(&self.base, input.view(), dy, dx.view_mut(), true)?;
            }
            Ok(dx)
        })();
        self.input = Some(input);
        result
    }

    /// Zeroes every adapter's gradients.
    pub fn zero_grad(&mut self) {
        for (_, a) in &mut self.adapters {
            a.zero_grad();
        }
    }

    /// Folds every active adapter into `W` (in order). LoRA: `W += s·B·A`. DoRA, as PEFT:
    /// `W ← (m/‖W + s·B·A‖_row) ⊙ (W + s·B·A)`. Already merged adapters are skipped.
    ///
    /// As in PEFT the merges are sequential, so a DoRA adapter's factor also scales whatever
    /// was merged before it: the merged layer equals the unmerged forward when at most one
    /// active adapter is DoRA and it comes first in the active list.
    pub fn merge(&mut self) -> Result<()> {
        for name in self.active.clone() {
            if self.merged.iter().any(|m| m.adapter == name) {
                continue;
            }
            let adapter = self.adapter(&name)?;
            let delta = adapter.delta_weight()?;
            let dora_factor = match adapter.magnitude() {
                None => None,
                Some(m) => {
                    let norm = adapter.dora_weight_norm(self.base.dense_weight()?.view())?;
                    let factor = m / &norm;
                    check_finite(
                        || format!("DoRA merge factor m/‖W + ΔW‖ of {}", self.context),
                        factor.iter(),
                    )?;
                    Some(factor)
                }
            };
            let weight = self.base.weight_mut()?;
            *weight += &delta;
            if let Some(f) = &dora_factor {
                *weight *= &f.view().insert_axis(Axis(1));
            }
            self.merged.push(MergeRecord {
                adapter: name,
                dora_factor,
            });
        }
        Ok(())
    }

    /// Undoes [`LoraLinear::merge`] in reverse order, subtracting the same `ΔW` that was added
    /// (the adapters cannot change while merged, and the product is deterministic). The only
    /// loss is the rounding of `W + ΔW`: the restored `W` is within about one `f32` ulp of
    /// `|W + ΔW|` of the original (bit-exact where `ΔW` is small against `W` it is not; the
    /// error is below `1e-6·max(|W|, |W + ΔW|)`).
    pub fn unmerge(&mut self) -> Result<()> {
        while let Some(record) = self.merged.pop() {
            let delta = self.adapter(&record.adapter)?.delta_weight()?;
            let weight = self.base.weight_mut()?;
            if let Some(f) = &record.dora_factor {
                *weight /= &f.view().insert_axis(Axis(1));
            }
            *weight -= &delta;
        }
        Ok(())
    }

    /// The weight the layer currently computes with when all active adapters are merged, as a
    /// new array (the layer is unchanged): `W + Σ s·B·A` (DoRA-normalised where applicable).
    pub fn merged_weight(&self) -> Result<Array2<f32>> {
        let mut copy = LoraLinear {
            base: DenseBase::new(self.base.dense_weight()?.into_owned(), None, &self.context)?,
            adapters: self.adapters.clone(),
            active: self.active.clone(),
            enabled: self.enabled,
            training: false,
            merged: self.merged.clone(),
            input: None,
            context: self.context.clone(),
        };
        if copy.enabled {
            copy.merge()?;
        }
        Ok(copy.base.weight().clone())
    }

    /// Parameters that train: those of the active adapters.
    pub fn trainable_parameters(&self) -> usize {
        self.adapters
            .iter()
            .filter(|(n, _)| self.active.contains(n))
            .map(|(_, a)| a.parameter_count())
            .sum()
    }

    /// Every parameter: the frozen base and all adapters.
    pub fn total_parameters(&self) -> usize {
        self.base.parameter_count()
            + self
                .adapters
                .iter()
                .map(|(_, a)| a.parameter_count())
                .sum::<usize>()
    }

    /// A seed for a new adapter of this layer derived from a caller seed and the module path,
    /// so that every layer of a set gets its own stream.
    pub fn derive_seed(seed: u64, module_path: &str) -> u64 {
        // FNV-1a over the path, mixed into the caller's seed through ChaCha.
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        for byte in module_path.bytes() {
            hash = (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
        }
        ChaCha8Rng::seed_from_u64(seed ^ hash).random()
    }
}
