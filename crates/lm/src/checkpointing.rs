//! Gradient checkpointing (issue 14): with [`LlamaModel::set_gradient_checkpointing`] the
//! training forward keeps only each decoder layer's input (the residual stream entering it)
//! and frees everything else the layer computed, including the copies of their inputs that
//! the adapter layers keep; backward runs the layer's forward again from that input, then its
//! backward, then frees the layer again. Memory goes from every layer's activations to one
//! layer's at a time, for about one more forward per step.
//!
//! The recomputation is the forward itself on the same input and parameters, so it gives the
//! same bits; the one random thing in a layer's forward is adapter dropout, and the position of
//! every adapter's dropout RNG is saved before the forward ([`LayerCheckpoint`]) and put back
//! before the recomputation, which so draws the very masks the forward drew. The gradients
//! are therefore bit-identical to the stored-activation path (`tests/gradient_checkpointing.rs`).

use lora_core::DropoutState;

use crate::decoder::{DecoderLayer, LayerActivations};
use crate::error::{LmError, Result};
use crate::linear::LinearModule;
use crate::model::LlamaModel;

/// What a training forward keeps of one decoder layer for its backward.
#[derive(Debug)]
pub(crate) enum SavedLayer {
    /// Every activation the backward reads.
    Stored(Box<LayerActivations>),
    /// Nothing but where the adapters' dropout RNGs stood: backward recomputes the layer.
    Recompute(LayerCheckpoint),
}

/// The dropout RNG position of every adapter with dropout in one layer, by projection index
/// and adapter name, taken before the layer's forward.
#[derive(Debug, Default)]
pub(crate) struct LayerCheckpoint {
    dropout: Vec<(usize, Vec<(String, DropoutState)>)>,
}

impl LinearModule {
    /// Drops what an adapted module's last forward kept for its backward.
    pub(crate) fn release_forward_state(&mut self) {
        if let Some(layer) = self.adapted_mut() {
            layer.release_forward_state();
        }
    }

    /// The dropout RNG position of each of the module's adapters that draws dropout. A
    /// module with merged adapters cannot be checkpointed when one of its adapters has
    /// dropout (restoring an RNG goes through `adapter_mut`, which a merged layer refuses):
    /// an error names it.
    fn dropout_states(&self, path: &str) -> Result<Vec<(String, DropoutState)>> {
        let Some(layer) = self.adapted() else {
            return Ok(Vec::new());
        };
        let mut states = Vec::new();
        for name in layer.adapter_names() {
            let adapter = layer.adapter(&name)?;
            if adapter.options().dropout > 0.0 {
                if layer.is_merged() {
                    return Err(LmError::invalid(
                        "gradient checkpointing",
                        path,
                        format!(
                            "the module has merged adapters and adapter `{name}` draws dropout; \
                             unmerge before training with gradient checkpointing"
                        ),
                    ));
                }
                states.push((name, adapter.dropout_state()));
            }
        }
        Ok(states)
    }

    fn restore_dropout_states(&mut self, states: Vec<(String, DropoutState)>) -> Result<()> {
        if states.is_empty() {
            return Ok(());
        }
        let kind = self.kind();
        let layer = self.adapted_mut().ok_or_else(|| LmError::Backward {
            reason: format!("a checkpointed {kind} module lost its adapters before backward"),
        })?;
        for (name, state) in states {
            layer.adapter_mut(&name)?.restore_dropout_state(state);
        }
        Ok(())
    }
}

impl DecoderLayer {
    /// Where the dropout RNGs of layer `index`'s adapters stand (before its forward).
    pub(crate) fn checkpoint(&self, index: usize) -> Result<LayerCheckpoint> {
        let mut dropout = Vec::new();
        for (i, (name, lin)) in self.linears().into_iter().enumerate() {
            let states = lin.dropout_states(&format!("model.layers.{index}.{name}"))?;
            if !states.is_empty() {
                dropout.push((i, states));
            }
        }
        Ok(LayerCheckpoint { dropout })
    }

    /// Puts the dropout RNGs back where [`DecoderLayer::checkpoint`] found them.
    pub(crate) fn restore_checkpoint(&mut self, checkpoint: LayerCheckpoint) -> Result<()> {
        let mut linears = self.linears_mut();
        for (i, states) in checkpoint.dropout {
            let (_, lin) = linears.get_mut(i).ok_or_else(|| LmError::Backward {
                reason: format!("a checkpoint names projection {i} of a layer without it"),
            })?;
            lin.restore_dropout_states(states)?;
        }
        Ok(())
    }

    /// Frees what every projection of the layer kept for its backward.
    pub(crate) fn release_forward_state(&mut self) {
        for (_, lin) in self.linears_mut() {
            lin.release_forward_state();
        }
    }
}

impl LlamaModel {
    /// Gradient checkpointing on or off (off by default). On, a training forward keeps only
    /// each decoder layer's input and [`LlamaModel::backward`] recomputes the layer before
    /// its backward: the gradients are bit-identical, the activations of one layer are held
    /// at a time instead of all of them, and a step costs about one more forward.
    ///
    /// ```
    /// let config = lm::LlamaConfig::new(16, 8, 16, 2, 2, 1).unwrap();
    /// let mut model = lm::LlamaModel::random(config, 0).unwrap();
    /// model.set_base_trainable(true);
    /// let ids = ndarray::array![[1u32, 2, 3]];
    /// let grads = |model: &mut lm::LlamaModel| {
    ///     model.zero_grad();
    ///     model.loss_and_backward(ids.view(), ids.mapv(i64::from).view(), None).unwrap();
    ///     let mut all = Vec::new();
    ///     model.visit_parameters(|_, p| { all.extend(p.grad.unwrap().iter().copied()); Ok(()) })
    ///         .unwrap();
    ///     all
    /// };
    /// let stored = grads(&mut model);
    /// model.set_gradient_checkpointing(true);
    /// assert!(model.gradient_checkpointing());
    /// assert_eq!(grads(&mut model), stored);
    /// ```
    pub fn set_gradient_checkpointing(&mut self, enabled: bool) {
        self.gradient_checkpointing = enabled;
    }

    /// Whether gradient checkpointing is on.
    pub fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }
}
