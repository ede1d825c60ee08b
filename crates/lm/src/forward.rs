//! The forward passes of the model: embeddings, the decoder layers ([`crate::decoder`]), the
//! final norm, the LM head and the final soft cap, keeping what the backward
//! ([`crate::backward`]) needs; packed batches with per-row segment ids
//! ([`LlamaModel::forward_segmented`]).

use ndarray::{Array2, Array3, ArrayView2, Axis};

use crate::attention::{AttentionMask, AttentionShape};
use crate::checkpointing::SavedLayer;
use crate::decoder::{layer_forward, KeysFrom, LayerContext};
use crate::error::{check_finite_at, LmError, Result};
use crate::layers::{norm_weight_array, rms_norm_forward};
use crate::loss::cross_entropy;
use crate::model::LlamaModel;
use crate::rope::RopeTable;

/// The logits of a forward pass and everything [`LlamaModel::backward`] needs.
#[derive(Debug)]
pub struct ForwardPass {
    /// Which forward of the model this is (see [`PassCounter`]).
    pub(crate) serial: u64,
    pub(crate) batch: usize,
    pub(crate) seq: usize,
    pub(crate) input_ids: Vec<u32>,
    /// The position of every row (restarting at each packed segment) and the length the
    /// rope tables were built for.
    pub(crate) positions: Vec<usize>,
    pub(crate) rope_len: usize,
    /// The padding mask (one flag per token) and packed-segment run numbers the attention
    /// used: a checkpointed layer's recomputation masks as its forward did.
    pub(crate) key_mask: Option<Vec<bool>>,
    pub(crate) segments: Option<Vec<u32>>,
    /// The residual stream entering each layer, then the one entering the final norm.
    pub(crate) residuals: Vec<Array2<f32>>,
    /// Per layer: its activations, or (gradient checkpointing) what recomputing it needs.
    pub(crate) layers: Vec<SavedLayer>,
    pub(crate) rstd_final: Vec<f32>,
    pub(crate) normed_final: Array2<f32>,
    pub(crate) logits: Array3<f32>,
    /// Outputs of the layers asked for in an evaluation forward (which keeps no residuals).
    pub(crate) recorded: Vec<(usize, Array2<f32>)>,
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
        compute_dtype: quant_core::linalg::ComputeDtype,
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
            compute_dtype,
        }
    }

    /// The embedding rows of `ids`, scaled as the family scales them (Gemma: √hidden).
    pub(crate) fn embed(&self, ids: &[u32]) -> Result<Array2<f32>> {
        let _timer = crate::profile::scope(crate::profile::Op::Embedding);
        self.embed_tokens
            .gather(ids, self.config.architecture.embedding_scale)
    }

    /// Final norm, LM head (tied or not) and final soft cap of the residual stream `x`:
    /// returns `(normed, rstd, logits)`.
    pub(crate) fn head_forward(
        &mut self,
        x: &Array2<f32>,
    ) -> Result<(Array2<f32>, Vec<f32>, Array2<f32>)> {
        let _timer = crate::profile::scope(crate::profile::Op::HeadForward);
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
            None => self.embed_tokens.head_forward(
                normed.view(),
                logits.view_mut(),
                self.compute_dtype,
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
        self.sync_compute_dtype();
        let dtype = self.compute_dtype;
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

        let mut x = self.embed(&ids)?;
        let mut residuals = Vec::with_capacity(c.num_hidden_layers + 1);
        let mut saved = Vec::with_capacity(c.num_hidden_layers);
        let mut recorded = Vec::new();
        let checkpointing = keep_activations && self.gradient_checkpointing;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let ctx = Self::layer_context(&c, i, &positions, &tables, dtype);
            let checkpoint = checkpointing.then(|| layer.checkpoint(i)).transpose()?;
            let (x_out, acts) = layer_forward(layer, &ctx, &x, KeysFrom::Batch { shape, mask })?;
            let x_in = std::mem::replace(&mut x, x_out);
            if let Some(checkpoint) = checkpoint {
                // Only the input stays; backward recomputes the rest from it.
                drop(acts);
                layer.release_forward_state();
                residuals.push(x_in);
                saved.push(SavedLayer::Recompute(checkpoint));
            } else if keep_activations {
                residuals.push(x_in);
                saved.push(SavedLayer::Stored(Box::new(acts)));
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
            key_mask,
            segments,
            residuals,
            layers: saved,
            rstd_final,
            normed_final,
            logits,
            recorded,
        })
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
}
