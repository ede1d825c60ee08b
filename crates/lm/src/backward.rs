//! The backward pass of the whole model ([`LlamaModel::backward`]): from `∂L/∂logits` through
//! the final soft cap, the LM head (or the tied embedding), the final norm and every decoder
//! layer ([`crate::decoder::layer_backward`]) down to the embedding rows, freeing each layer's
//! saved activations ([`crate::forward::ForwardPass`]) as it goes; extra hidden-state
//! gradients join the residual stream where their layer's output is.

use ndarray::{Array2, Array3, ArrayView2, ArrayView3};

use crate::attention::{AttentionMask, AttentionShape};
use crate::checkpointing::SavedLayer;
use crate::decoder::{layer_backward, layer_forward, KeysFrom};
use crate::error::{check_finite_at, LmError, Result};
use crate::forward::ForwardPass;
use crate::layers::{norm_weight_array, rms_norm_backward};
use crate::loss::{cross_entropy, cross_entropy_in_place};
use crate::model::LlamaModel;

impl LlamaModel {
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
        // The precision of the pass's products (the modules carry the same one).
        let dtype = self.compute_dtype;
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

        let head_timer = crate::profile::scope(crate::profile::Op::HeadBackward);
        let mut grad_normed = Array2::<f32>::zeros((n, c.hidden_size));
        match &mut self.lm_head {
            Some(head) => head.backward(
                pass.normed_final.view(),
                grad_logits,
                grad_normed.view_mut(),
                false,
            )?,
            None => self.embed_tokens.head_backward(
                pass.normed_final.view(),
                grad_logits,
                grad_normed.view_mut(),
                dtype,
            )?,
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
        drop(head_timer);
        if let Some(last) = self.layers.len().checked_sub(1) {
            add_hidden_grads(last, &mut grad_x);
        }

        let mask = AttentionMask {
            key_mask: pass.key_mask.as_deref(),
            segments: pass.segments.as_deref(),
            sliding_window: None,
        };
        for (i, layer) in self.layers.iter_mut().enumerate().rev() {
            let saved = pass.layers.pop().ok_or_else(|| LmError::Backward {
                reason: "forward pass has fewer layers than the model".into(),
            })?;
            let x_in = pass.residuals.pop().ok_or_else(|| LmError::Backward {
                reason: "forward pass has fewer residual streams than layers".into(),
            })?;
            let ctx = Self::layer_context(&c, i, &pass.positions, &tables, dtype);
            match saved {
                SavedLayer::Stored(acts) => {
                    layer_backward(layer, &ctx, shape, &x_in, *acts, &mut grad_x)?
                }
                SavedLayer::Recompute(checkpoint) => {
                    // The forward again from the kept input, with the dropout RNGs where
                    // they stood, then the backward; then the layer is freed again.
                    layer.restore_checkpoint(checkpoint)?;
                    let (_, acts) =
                        layer_forward(layer, &ctx, &x_in, KeysFrom::Batch { shape, mask })?;
                    layer_backward(layer, &ctx, shape, &x_in, acts, &mut grad_x)?;
                    layer.release_forward_state();
                }
            }
            if i > 0 {
                add_hidden_grads(i - 1, &mut grad_x);
            }
        }

        // The embedding rows were scaled (Gemma): their gradient is scaled alike.
        if let Some(s) = c.architecture.embedding_scale {
            grad_x *= s;
        }
        self.embed_tokens
            .accumulate_row_grads(&pass.input_ids, grad_x.view());
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
        if let Some(e) = self.embed_tokens.dense() {
            e.check_grad_finite("model.embed_tokens.weight")?;
        }
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

    /// Forward, mean shifted cross-entropy and backward in one call; returns the loss.
    pub fn loss_and_backward(
        &mut self,
        input_ids: ArrayView2<'_, u32>,
        labels: ArrayView2<'_, i64>,
        attention_mask: Option<ArrayView2<'_, bool>>,
    ) -> Result<f32> {
        let mut pass = self.forward(input_ids, attention_mask)?;
        if self.config.architecture.final_softcap.is_some() {
            // The soft cap's backward reads the logits: keep them and take a gradient copy.
            let ce = cross_entropy(pass.logits().view(), labels)?;
            self.backward(pass, ce.grad_logits.view())?;
            return Ok(ce.loss);
        }
        // Nothing else reads the logits: turn them into their gradient in place (one
        // (tokens × vocab) array per step instead of two).
        let mut grad_logits = std::mem::take(&mut pass.logits);
        let (loss, _) = cross_entropy_in_place(&mut grad_logits, labels)?;
        self.backward(pass, grad_logits.view())?;
        Ok(loss)
    }
}
