//! The training and evaluation passes of the model: embeddings, the decoder layers
//! ([`crate::decoder`]), the final norm, the LM head and the final soft cap, forward (keeping
//! what backward needs) and backward; packed batches with per-row segment ids
//! ([`LlamaModel::forward_segmented`]).
//!
//! Long because the forward and backward of the whole model belong together with the input
//! checks both share; the per-layer work lives in `decoder.rs`.

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, Axis};

use crate::attention::{AttentionMask, AttentionShape};
use crate::decoder::{layer_backward, layer_forward, KeysFrom, LayerActivations, LayerContext};
use crate::error::{check_finite_at, LmError, Result};
use crate::layers::{norm_weight_array, rms_norm_backward, rms_norm_forward};
use crate::loss::cross_entropy;
use crate::model::LlamaModel;
use crate::rope::RopeTable;

/// The logits of a forward pass and everything [`LlamaModel::backward`] needs.
#[derive(Debug)]
pub struct ForwardPass {
    /// Which forward of the model this is (see [`PassCounter`]).
    serial: u64,
    batch: usize,
    seq: usize,
    input_ids: Vec<u32>,
    /// The position of every row (restarting at each packed segment) and the length the
    /// rope tables were built for.
    positions: Vec<usize>,
    rope_len: usize,
    /// The residual stream entering each layer, then the one entering the final norm.
    residuals: Vec<Array2<f32>>,
    layers: Vec<LayerActivations>,
    rstd_final: Vec<f32>,
    normed_final: Array2<f32>,
    logits: Array3<f32>,
    /// Outputs of the layers asked for in an evaluation forward (which keeps no residuals).
    recorded: Vec<(usize, Array2<f32>)>,
}

impl ForwardPass {
    /// `(batch, seq, vocab)` logits.
    pub fn logits(&self) -> &Array3<f32> {
        &self.logits
    }

    /// `(batch, seq)` of the pass.
    pub fn batch_seq(&self) -> (usize, usize) {
        (self.batch, self.seq)
    }

    /// The output of decoder layer `layer` — the residual stream after it, before the next
    /// layer's norm (after the last layer: before the final norm) — as `(batch·seq, hidden)`
    /// with row `b·seq + t`, the layout the hidden-state and reasoning losses take. Errors when
    /// `layer` is out of range.
    ///
    /// ```
    /// let config = lm::LlamaConfig::new(16, 8, 16, 2, 2, 1).unwrap();
    /// let mut model = lm::LlamaModel::random(config, 0).unwrap();
    /// let ids = ndarray::array![[1u32, 2, 3]];
    /// let pass = model.forward(ids.view(), None).unwrap();
    /// assert_eq!(pass.hidden_state(1).unwrap().dim(), (3, 8));
    /// assert!(pass.hidden_state(2).is_err());
    /// ```
    pub fn hidden_state(&self, layer: usize) -> Result<ArrayView2<'_, f32>> {
        if self.layers.is_empty() {
            // An evaluation pass keeps only the layers it was asked to record.
            return self
                .recorded
                .iter()
                .find(|(l, _)| *l == layer)
                .map(|(_, h)| h.view())
                .ok_or_else(|| {
                    LmError::invalid(
                        "hidden state layer",
                        layer,
                        format!(
                            "this evaluation pass recorded layers {:?} only",
                            self.recorded.iter().map(|(l, _)| *l).collect::<Vec<_>>()
                        ),
                    )
                });
        }
        // residuals[i] enters layer i; the last one enters the final norm.
        self.residuals
            .get(layer + 1)
            .map(|h| h.view())
            .ok_or_else(|| {
                LmError::invalid(
                    "hidden state layer",
                    layer,
                    format!("the model has decoder layers 0..{}", self.layers.len()),
                )
            })
    }

    pub fn into_logits(self) -> Array3<f32> {
        self.logits
    }
}

impl LlamaModel {
    /// Checks `(batch, seq)` ids against the vocabulary and position table and the mask shape;
    /// returns the ids flat and the mask as one flag per token.
    pub(crate) fn check_inputs(
        &self,
        input_ids: ArrayView2<'_, u32>,
        attention_mask: Option<ArrayView2<'_, bool>>,
    ) -> Result<(Vec<u32>, Option<Vec<bool>>)> {
        let (batch, seq) = input_ids.dim();
        if batch == 0 || seq == 0 {
            return Err(LmError::shape(
                "input_ids (batch, seq)",
                "non-empty",
                format!("{batch}×{seq}"),
            ));
        }
        if seq > self.config.max_position_embeddings {
            return Err(LmError::SequenceTooLong {
                len: seq,
                max: self.config.max_position_embeddings,
            });
        }
        let vocab = self.config.vocab_size;
        if let Some(((b, t), &id)) = input_ids
            .indexed_iter()
            .find(|(_, &id)| id as usize >= vocab)
        {
            return Err(LmError::TokenOutOfRange {
                what: "token id".into(),
                value: id as i64,
                batch: b,
                position: t,
                vocab,
            });
        }
        let mask = match attention_mask {
            None => None,
            Some(m) if m.dim() != (batch, seq) => {
                return Err(LmError::shape(
                    "attention_mask (batch, seq)",
                    format!("{batch}×{seq}"),
                    format!("{}×{}", m.nrows(), m.ncols()),
                ))
            }
            Some(m) => Some(m.iter().copied().collect()),
        };
        Ok((input_ids.iter().copied().collect(), mask))
    }

    /// Logits `(batch, seq, vocab)` for `input_ids: (batch, seq)`, keeping the activations the
    /// backward pass needs. `attention_mask` (false = padding) hides padded keys, as a right-
    /// padded batch of different lengths needs; positions are `0..seq` in every row, as
    /// transformers' forward without `position_ids`.
    pub fn forward(
        &mut self,
        input_ids: ArrayView2<'_, u32>,
        attention_mask: Option<ArrayView2<'_, bool>>,
    ) -> Result<ForwardPass> {
        self.forward_impl(input_ids, attention_mask, None, true, &[])
    }

    /// Logits `(batch, seq, vocab)` as [`LlamaModel::forward`] computes them, keeping only one
    /// layer's activations at a time (evaluation: no backward pass possible).
    ///
    /// ```
    /// let config = lm::LlamaConfig::new(16, 8, 16, 2, 2, 1).unwrap();
    /// let mut model = lm::LlamaModel::random(config, 0).unwrap();
    /// let ids = ndarray::array![[1u32, 2, 3]];
    /// let logits = model.logits(ids.view(), None).unwrap();
    /// assert_eq!(logits, model.forward(ids.view(), None).unwrap().into_logits());
    /// ```
    pub fn logits(
        &mut self,
        input_ids: ArrayView2<'_, u32>,
        attention_mask: Option<ArrayView2<'_, bool>>,
    ) -> Result<Array3<f32>> {
        self.in_eval_mode(|model| {
            Ok(model
                .forward_impl(input_ids, attention_mask, None, false, &[])?
                .into_logits())
        })
    }

    /// Logits as [`LlamaModel::logits`] and the outputs of decoder layers `layers` (see
    /// [`ForwardPass::hidden_state`]), each `(batch·seq, hidden)`, in the order asked — what a
    /// frozen teacher gives hidden-state and reasoning distillation. Errors on a layer out of
    /// range.
    ///
    /// ```
    /// let config = lm::LlamaConfig::new(16, 8, 16, 2, 2, 1).unwrap();
    /// let mut model = lm::LlamaModel::random(config, 0).unwrap();
    /// let ids = ndarray::array![[1u32, 2, 3]];
    /// let (logits, hidden) = model.logits_and_hidden_states(ids.view(), None, &[1, 0]).unwrap();
    /// let pass = model.forward(ids.view(), None).unwrap();
    /// assert_eq!(&logits, pass.logits());
    /// assert_eq!(hidden[0], pass.hidden_state(1).unwrap());
    /// assert_eq!(hidden[1], pass.hidden_state(0).unwrap());
    /// ```
    pub fn logits_and_hidden_states(
        &mut self,
        input_ids: ArrayView2<'_, u32>,
        attention_mask: Option<ArrayView2<'_, bool>>,
        layers: &[usize],
    ) -> Result<(Array3<f32>, Vec<Array2<f32>>)> {
        self.check_layer_indices(layers)?;
        self.in_eval_mode(|model| {
            let mut pass = model.forward_impl(input_ids, attention_mask, None, false, layers)?;
            let mut hidden = Vec::with_capacity(layers.len());
            for &l in layers {
                let pos = pass
                    .recorded
                    .iter()
                    .position(|(r, _)| *r == l)
                    .ok_or_else(|| LmError::Backward {
                        reason: format!("layer {l} was not recorded"),
                    })?;
                // A layer asked twice is cloned; the last request takes the buffer.
                if layers[..].iter().filter(|&&x| x == l).count() > 1 {
                    hidden.push(pass.recorded[pos].1.clone());
                } else {
                    hidden.push(pass.recorded.swap_remove(pos).1);
                }
            }
            Ok((pass.logits, hidden))
        })
    }

    fn check_layer_indices(&self, layers: &[usize]) -> Result<()> {
        let n = self.layers.len();
        match layers.iter().find(|&&l| l >= n) {
            Some(&l) => Err(LmError::invalid(
                "hidden state layer",
                l,
                format!("the model has decoder layers 0..{n}"),
            )),
            None => Ok(()),
        }
    }

    /// Runs `f` with adapter dropout off, then restores the model's training mode.
    pub(crate) fn in_eval_mode<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let training = self.training;
        self.set_adapters_training(false);
        let result = f(self);
        self.set_adapters_training(training);
        result
    }

    /// Logits for a packed batch: `segment_ids: (batch, seq)` numbers the documents packed in
    /// each row. A new segment starts wherever the id changes from the previous token; its
    /// positions restart at 0 and its tokens attend only to earlier tokens of the same segment
    /// (a block-diagonal causal mask, combined with each layer's sliding window). The pass
    /// keeps its positions and masks, so [`LlamaModel::backward`] is unchanged. Without
    /// packing (one segment per row) this is [`LlamaModel::forward`]. `record_hidden` is
    /// checked against the layer count; a training pass keeps every layer's output (see
    /// [`ForwardPass::hidden_state`]).
    ///
    /// ```
    /// let config = lm::LlamaConfig::new(16, 8, 16, 1, 2, 1).unwrap();
    /// let mut model = lm::LlamaModel::random(config, 0).unwrap();
    /// // Two documents packed in one row give what each gives alone.
    /// let packed = ndarray::array![[1u32, 2, 3, 4, 5]];
    /// let segments = ndarray::array![[0u32, 0, 0, 1, 1]];
    /// let pass = model.forward_segmented(packed.view(), segments.view(), None).unwrap();
    /// let alone = model.logits(ndarray::array![[4u32, 5]].view(), None).unwrap();
    /// for v in 0..16 {
    ///     assert!((pass.logits()[[0, 4, v]] - alone[[0, 1, v]]).abs() < 1e-5);
    /// }
    /// ```
    pub fn forward_segmented(
        &mut self,
        input_ids: ArrayView2<'_, u32>,
        segment_ids: ArrayView2<'_, u32>,
        record_hidden: Option<&[usize]>,
    ) -> Result<ForwardPass> {
        if segment_ids.dim() != input_ids.dim() {
            return Err(LmError::shape(
                "segment_ids (batch, seq)",
                format!("{}×{}", input_ids.nrows(), input_ids.ncols()),
                format!("{}×{}", segment_ids.nrows(), segment_ids.ncols()),
            ));
        }
        if let Some(layers) = record_hidden {
            self.check_layer_indices(layers)?;
        }
        self.forward_impl(input_ids, None, Some(segment_ids), true, &[])
    }

    /// Rope tables for positions `0..len`, one per distinct rope of the family.
    pub(crate) fn rope_tables(
        &self,
        first: usize,
        len: usize,
        seq_len: usize,
    ) -> Result<Vec<RopeTable>> {
        self.config
            .architecture
            .ropes
            .iter()
            .map(|rope| RopeTable::for_rope(rope, first, len, seq_len))
            .collect()
    }

    /// The context of layer `i` for rows at `positions`.
    pub(crate) fn layer_context<'a>(
        config: &'a crate::config::LlamaConfig,
        i: usize,
        positions: &'a [usize],
        tables: &'a [RopeTable],
    ) -> LayerContext<'a> {
        let arch = &config.architecture;
        let layer = &arch.layers[i];
        LayerContext {
            arch,
            eps: config.rms_norm_eps,
            hidden: config.hidden_size,
            heads: config.num_attention_heads,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            intermediate: config.intermediate_size,
            positions,
            rope: &tables[layer.rope],
            sliding_window: layer.sliding_window,
        }
    }

    /// The embedding rows of `ids`, scaled as the family scales them (Gemma: √hidden).
    pub(crate) fn embed(&self, ids: &[u32]) -> Array2<f32> {
        let mut x = Array2::<f32>::zeros((ids.len(), self.config.hidden_size));
        let embed = self.embed_tokens.value();
        let scale = self.config.architecture.embedding_scale;
        for (mut row, &id) in x.axis_iter_mut(Axis(0)).zip(ids) {
            row.assign(&embed.row(id as usize));
            if let Some(s) = scale {
                row *= s;
            }
        }
        x
    }

    /// Final norm, LM head (tied or not) and final soft cap of the residual stream `x`:
    /// returns `(normed, rstd, logits)`.
    pub(crate) fn head_forward(
        &mut self,
        x: &Array2<f32>,
    ) -> Result<(Array2<f32>, Vec<f32>, Array2<f32>)> {
        let c = &self.config;
        let n = x.nrows();
        let weight = norm_weight_array(c.architecture.norm, self.norm.value().view());
        let mut normed = Array2::<f32>::zeros((n, c.hidden_size));
        let mut rstd = vec![0.0; n];
        rms_norm_forward(
            x.view(),
            weight.view(),
            c.rms_norm_eps,
            normed.view_mut(),
            &mut rstd,
        )?;
        let mut logits = Array2::<f32>::zeros((n, c.vocab_size));
        let cap = c.architecture.final_softcap;
        match &mut self.lm_head {
            Some(head) => head.forward(normed.view(), logits.view_mut(), false)?,
            None => quant_core::linalg::gemm(
                1.0,
                normed.view(),
                self.embed_tokens.value().t(),
                0.0,
                logits.view_mut(),
            )?,
        }
        if let Some(cap) = cap {
            logits.mapv_inplace(|l| cap * (l / cap).tanh());
        }
        Ok((normed, rstd, logits))
    }

    fn forward_impl(
        &mut self,
        input_ids: ArrayView2<'_, u32>,
        attention_mask: Option<ArrayView2<'_, bool>>,
        segment_ids: Option<ArrayView2<'_, u32>>,
        keep_activations: bool,
        record_layers: &[usize],
    ) -> Result<ForwardPass> {
        let (batch, seq) = input_ids.dim();
        let (ids, key_mask) = self.check_inputs(input_ids, attention_mask)?;
        // Segments become run numbers per row; positions restart at each run.
        let mut positions: Vec<usize> = (0..batch * seq).map(|r| r % seq).collect();
        let segments: Option<Vec<u32>> = segment_ids.map(|segs| {
            let mut runs = Vec::with_capacity(batch * seq);
            for row in segs.axis_iter(Axis(0)) {
                let (mut run, mut start) = (0u32, 0usize);
                for (t, &id) in row.iter().enumerate() {
                    if t > 0 && id != row[t - 1] {
                        run += 1;
                        start = t;
                    }
                    positions[runs.len()] = t - start;
                    runs.push(run);
                }
            }
            runs
        });
        let rope_len = positions.iter().copied().max().unwrap_or(0) + 1;
        self.passes.0 += 1;
        let serial = self.passes.0;
        let c = self.config.clone();
        let tables = self.rope_tables(0, rope_len, rope_len)?;
        let shape = AttentionShape {
            batch,
            seq,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        };
        let mask = AttentionMask {
            key_mask: key_mask.as_deref(),
            segments: segments.as_deref(),
            sliding_window: None,
        };

        let mut x = self.embed(&ids);
        let mut residuals = Vec::with_capacity(c.num_hidden_layers + 1);
        let mut saved = Vec::with_capacity(c.num_hidden_layers);
        let mut recorded = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let ctx = Self::layer_context(&c, i, &positions, &tables);
            let (x_out, acts) = layer_forward(layer, &ctx, &x, KeysFrom::Batch { shape, mask })?;
            let x_in = std::mem::replace(&mut x, x_out);
            if keep_activations {
                residuals.push(x_in);
                saved.push(acts);
            } else if record_layers.contains(&i) {
                recorded.push((i, x.clone()));
            }
        }
        let (normed_final, rstd_final, logits) = self.head_forward(&x)?;
        residuals.push(x);
        let vocab = c.vocab_size;
        check_finite_at("logits", logits.as_slice().unwrap_or_default(), |i| {
            format!(
                "(batch {}, position {}, vocab {})",
                i / vocab / seq,
                i / vocab % seq,
                i % vocab
            )
        })?;
        let logits = logits
            .into_shape_with_order((batch, seq, vocab))
            .map_err(|e| LmError::shape("logits", format!("{batch}×{seq}×{vocab}"), e))?;
        Ok(ForwardPass {
            serial,
            batch,
            seq,
            input_ids: ids,
            positions,
            rope_len,
            residuals,
            layers: saved,
            rstd_final,
            normed_final,
            logits,
            recorded,
        })
    }

    /// Backward from `∂L/∂logits: (batch, seq, vocab)` through the whole model: adds the
    /// gradient of every trainable parameter into its buffer and returns `∂L/∂(embedding
    /// outputs)` `(batch, seq, hidden)` (what flows into the embedding lookup). The pass is
    /// consumed; its activations are freed layer by layer as the backward moves down.
    pub fn backward(
        &mut self,
        pass: ForwardPass,
        grad_logits: ArrayView3<'_, f32>,
    ) -> Result<Array3<f32>> {
        self.backward_with_hidden(pass, grad_logits, &[])
    }

    /// [`LlamaModel::backward`] with extra gradients `(layer, ∂L/∂h_layer)` of the decoder
    /// layers' outputs (each `(batch·seq, hidden)`, see [`ForwardPass::hidden_state`]), as
    /// hidden-state distillation and the reasoning loss produce them: each is added to the
    /// gradient flowing down the residual stream where that layer's output is, so it reaches
    /// every parameter below. A layer may appear more than once (the gradients add up).
    ///
    /// ```
    /// let config = lm::LlamaConfig::new(16, 8, 16, 2, 2, 1).unwrap();
    /// let mut model = lm::LlamaModel::random(config, 0).unwrap();
    /// model.set_base_trainable(true);
    /// let ids = ndarray::array![[1u32, 2, 3]];
    /// let pass = model.forward(ids.view(), None).unwrap();
    /// let zero_logits = ndarray::Array3::zeros(pass.logits().dim());
    /// let grad_h = ndarray::Array2::ones((3, 8));
    /// model.backward_with_hidden(pass, zero_logits.view(), &[(0, grad_h.view())]).unwrap();
    /// // Layer 0's output gets a gradient: layer 0 trains, layer 1 (above it) does not.
    /// let mut grads = std::collections::BTreeMap::new();
    /// model.visit_parameters(|n, p| {
    ///     grads.insert(n.to_string(), p.grad.unwrap().iter().any(|&g| g != 0.0)); Ok(())
    /// }).unwrap();
    /// assert!(grads["model.layers.0.mlp.down_proj.weight"]);
    /// assert!(!grads["model.layers.1.mlp.down_proj.weight"]);
    /// ```
    pub fn backward_with_hidden(
        &mut self,
        mut pass: ForwardPass,
        grad_logits: ArrayView3<'_, f32>,
        grad_hidden: &[(usize, ArrayView2<'_, f32>)],
    ) -> Result<Array3<f32>> {
        let c = self.config.clone();
        let (batch, seq) = (pass.batch, pass.seq);
        let n = batch * seq;
        if grad_logits.dim() != (batch, seq, c.vocab_size) {
            return Err(LmError::shape(
                "grad_logits (batch, seq, vocab)",
                format!("{batch}×{seq}×{}", c.vocab_size),
                format!("{:?}", grad_logits.dim()),
            ));
        }
        if let Some(&id) = pass
            .input_ids
            .iter()
            .find(|&&id| id as usize >= c.vocab_size)
        {
            return Err(LmError::Backward {
                reason: format!(
                    "the forward pass has token id {id}, outside this model's vocabulary 0..{}",
                    c.vocab_size
                ),
            });
        }
        if pass.serial != self.passes.0 && self.has_adapters() {
            return Err(LmError::Backward {
                reason: format!(
                    "the pass is forward #{} but the model has run forward #{} since; adapter \
                     layers keep only their last input, so backward must follow its own forward",
                    pass.serial, self.passes.0
                ),
            });
        }
        for (k, (layer, g)) in grad_hidden.iter().enumerate() {
            let context = format!("grad_hidden[{k}] (layer {layer})");
            if *layer >= self.layers.len() {
                return Err(LmError::invalid(
                    "hidden state layer",
                    layer,
                    format!("the model has decoder layers 0..{}", self.layers.len()),
                ));
            }
            if g.dim() != (n, c.hidden_size) {
                return Err(LmError::shape(
                    &context,
                    format!("{n}×{} (batch·seq × hidden)", c.hidden_size),
                    format!("{:?}", g.dim()),
                ));
            }
            if let Some((i, v)) = g.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(LmError::Backward {
                    reason: format!(
                        "{context} has non-finite value {v} at row {}, dim {}",
                        i / c.hidden_size,
                        i % c.hidden_size
                    ),
                });
            }
        }
        let add_hidden_grads = |layer: usize, grad_x: &mut Array2<f32>| {
            for (_, g) in grad_hidden.iter().filter(|(l, _)| *l == layer) {
                *grad_x += g;
            }
        };
        if pass.layers.len() != self.layers.len() || pass.normed_final.ncols() != c.hidden_size {
            return Err(LmError::Backward {
                reason: format!(
                    "the forward pass has {} layers of width {}, the model {} of width {}",
                    pass.layers.len(),
                    pass.normed_final.ncols(),
                    self.layers.len(),
                    c.hidden_size
                ),
            });
        }
        let grad_logits = grad_logits.as_standard_layout();
        let grad_logits = grad_logits
            .view()
            .into_shape_with_order((n, c.vocab_size))
            .map_err(|e| LmError::shape("grad_logits", format!("{n}×{}", c.vocab_size), e))?;
        let vocab = c.vocab_size;
        check_finite_at(
            "grad_logits",
            grad_logits.as_slice().unwrap_or_default(),
            |i| {
                format!(
                    "(batch {}, position {}, vocab {})",
                    i / vocab / seq,
                    i / vocab % seq,
                    i % vocab
                )
            },
        )?;

        let tables = self.rope_tables(0, pass.rope_len, pass.rope_len)?;
        let shape = AttentionShape {
            batch,
            seq,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        };

        // The final soft cap: d pre-cap = d logit·(1 − (logit/cap)²).
        let capped;
        let grad_logits = match c.architecture.final_softcap {
            Some(cap) => {
                let logits = pass
                    .logits
                    .view()
                    .into_shape_with_order((n, c.vocab_size))
                    .map_err(|e| LmError::shape("logits", format!("{n}×{}", c.vocab_size), e))?;
                let mut g = grad_logits.to_owned();
                g.zip_mut_with(&logits, |gv, &l| {
                    let t = l / cap;
                    *gv *= 1.0 - t * t;
                });
                capped = g;
                capped.view()
            }
            None => grad_logits,
        };

        let mut grad_normed = Array2::<f32>::zeros((n, c.hidden_size));
        match &mut self.lm_head {
            Some(head) => head.backward(
                pass.normed_final.view(),
                grad_logits,
                grad_normed.view_mut(),
                false,
            )?,
            None => {
                let (embed, embed_grad) = self.embed_tokens.value_and_grad_mut();
                quant_core::linalg::gemm(
                    1.0,
                    grad_logits,
                    embed.view(),
                    0.0,
                    grad_normed.view_mut(),
                )?;
                if let Some(g) = embed_grad {
                    quant_core::linalg::gemm(
                        1.0,
                        grad_logits.t(),
                        pass.normed_final.view(),
                        1.0,
                        g.view_mut(),
                    )?;
                }
            }
        }
        let residual_final = pass.residuals.pop().ok_or_else(|| LmError::Backward {
            reason: "forward pass without residual streams".into(),
        })?;
        let mut grad_x = Array2::<f32>::zeros((n, c.hidden_size));
        let weight = norm_weight_array(c.architecture.norm, self.norm.value().view());
        rms_norm_backward(
            residual_final.view(),
            weight.view(),
            &pass.rstd_final,
            grad_normed.view(),
            grad_x.view_mut(),
            self.norm.grad_mut().map(|g| g.view_mut()),
        )?;
        drop(residual_final);
        if let Some(last) = self.layers.len().checked_sub(1) {
            add_hidden_grads(last, &mut grad_x);
        }

        for (i, layer) in self.layers.iter_mut().enumerate().rev() {
            let acts: LayerActivations = pass.layers.pop().ok_or_else(|| LmError::Backward {
                reason: "forward pass has fewer layers than the model".into(),
            })?;
            let x_in = pass.residuals.pop().ok_or_else(|| LmError::Backward {
                reason: "forward pass has fewer residual streams than layers".into(),
            })?;
            let ctx = Self::layer_context(&c, i, &pass.positions, &tables);
            layer_backward(layer, &ctx, shape, &x_in, acts, &mut grad_x)?;
            if i > 0 {
                add_hidden_grads(i - 1, &mut grad_x);
            }
        }

        // The embedding rows were scaled (Gemma): their gradient is scaled alike.
        if let Some(s) = c.architecture.embedding_scale {
            grad_x *= s;
        }
        if let Some(g) = self.embed_tokens.grad_mut() {
            for (row, &id) in grad_x.axis_iter(Axis(0)).zip(&pass.input_ids) {
                let mut target = g.row_mut(id as usize);
                target += &row;
            }
        }
        let hidden = c.hidden_size;
        check_finite_at(
            "gradient of the embedding outputs",
            grad_x.as_slice().unwrap_or_default(),
            |i| {
                format!(
                    "(batch {}, position {}, dim {})",
                    i / hidden / seq,
                    i / hidden % seq,
                    i % hidden
                )
            },
        )?;
        self.check_grads_finite()?;
        grad_x
            .into_shape_with_order((batch, seq, hidden))
            .map_err(|e| LmError::shape("input gradient", format!("{batch}×{seq}×{hidden}"), e))
    }

    fn check_grads_finite(&self) -> Result<()> {
        self.embed_tokens
            .check_grad_finite("model.embed_tokens.weight")?;
        for (i, layer) in self.layers.iter().enumerate() {
            for (name, norm) in layer.norms() {
                norm.check_grad_finite(&format!("model.layers.{i}.{name}.weight"))?;
            }
            for (name, lin) in layer.linears() {
                lin.check_grads_finite(&format!("model.layers.{i}.{name}"))?;
            }
        }
        self.norm.check_grad_finite("model.norm.weight")?;
        if let Some(head) = &self.lm_head {
            head.check_grads_finite("lm_head")?;
        }
        Ok(())
    }

    /// Mean shifted cross-entropy of `labels` (−100 ignored) without keeping a backward pass.
    pub fn loss(
        &mut self,
        input_ids: ArrayView2<'_, u32>,
        labels: ArrayView2<'_, i64>,
        attention_mask: Option<ArrayView2<'_, bool>>,
    ) -> Result<f32> {
        let logits = self.logits(input_ids, attention_mask)?;
        Ok(cross_entropy(logits.view(), labels)?.loss)
    }

    /// Forward, mean shifted cross-entropy and backward in one call; returns the loss.
    pub fn loss_and_backward(
        &mut self,
        input_ids: ArrayView2<'_, u32>,
        labels: ArrayView2<'_, i64>,
        attention_mask: Option<ArrayView2<'_, bool>>,
    ) -> Result<f32> {
        let pass = self.forward(input_ids, attention_mask)?;
        let ce = cross_entropy(pass.logits().view(), labels)?;
        self.backward(pass, ce.grad_logits.view())?;
        Ok(ce.loss)
    }
}
