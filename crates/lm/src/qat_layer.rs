//! The LoRA-QAT projection ([`QatLayer`]): one named adapter trained through a
//! differentiable weight quantizer whose steps train too (`lora_core::LoraQatLinear`), as an
//! [`AdaptedLayer`] so the model activates, visits and merges it like any adapter. The
//! model-level operations (injection, save/load, export) are in [`crate::qat`].

use std::borrow::Cow;

use lora_core::peft;
use lora_core::{AdapterOptions, LoraAdapter, LoraQatLinear};
use ndarray::{Array2, ArrayView2};
use quant_core::linalg::gemm_in;

use crate::adapted::AdaptedLayer;

/// The file, beside a PEFT adapter directory's own two, that holds the quantizer state of a
/// LoRA-QAT adapter (see `docs/FORMATS.md`).
pub const QAT_STATE_FILE: &str = "qat_quantizers.safetensors";

/// Suffix of a quantizer's step parameter name: `base_model.model.<module>.quantizer.step`.
/// Optimizers select the steps by it (they are not `lora_` tensors).
pub const QUANTIZER_STEP_SUFFIX: &str = ".quantizer.step";

/// The name of the quantizer steps of the module at `path`, as [`crate::LlamaModel::visit_parameters`]
/// reports them and the [`QAT_STATE_FILE`] stores them.
pub fn quantizer_step_name(path: &str) -> String {
    format!("{}{path}{QUANTIZER_STEP_SUFFIX}", peft::KEY_PREFIX)
}

/// A projection trained with LoRA-QAT: one named adapter (`A`, `B`) and a quantizer whose
/// steps train, over the frozen `f32` weight (see `lora_core::qat`).
///
/// As an [`AdaptedLayer`] it holds exactly that adapter: adding a second one is an error, and
/// so is merging in place (the deployed form is [`crate::LlamaModel::export_quantized`] or
/// [`crate::LlamaModel::merge_and_unload`]). When its adapter is not active the projection computes
/// with the unquantized `W` alone.
#[derive(Debug, Clone)]
pub struct QatLayer {
    name: String,
    layer: LoraQatLinear,
    active: bool,
    /// Which path the last forward took (`Some(true)`: through the QAT layer), for backward.
    last_forward_active: Option<bool>,
}

impl QatLayer {
    /// Wraps `layer` as adapter `name` (active).
    pub fn new(name: &str, layer: LoraQatLinear) -> Self {
        QatLayer {
            name: name.to_string(),
            layer,
            active: true,
            last_forward_active: None,
        }
    }

    /// The adapter's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The LoRA-QAT layer.
    pub fn layer(&self) -> &LoraQatLinear {
        &self.layer
    }

    /// The LoRA-QAT layer, mutably (an optimizer step on θ, a mode switch).
    pub fn layer_mut(&mut self) -> &mut LoraQatLinear {
        self.last_forward_active = None;
        &mut self.layer
    }

    fn check_name(&self, name: &str) -> lora_core::Result<()> {
        if name == self.name {
            Ok(())
        } else {
            Err(lora_core::LoraError::UnknownAdapter {
                name: name.to_string(),
                context: self.layer.context().to_string(),
                known: vec![self.name.clone()],
            })
        }
    }

    fn one_adapter_only(&self, operation: &str) -> lora_core::LoraError {
        lora_core::LoraError::state(
            operation,
            self.layer.context(),
            format!(
                "a LoRA-QAT projection holds exactly one adapter ({:?}), the one its quantizer \
                 is fitted to",
                self.name
            ),
        )
    }
}

impl PartialEq for QatLayer {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (&self.layer, &other.layer);
        self.name == other.name
            && self.active == other.active
            && a.weight() == b.weight()
            && a.bias() == b.bias()
            && a.adapter().a() == b.adapter().a()
            && a.adapter().b() == b.adapter().b()
            && a.adapter().options() == b.adapter().options()
            && a.quantizer_params() == b.quantizer_params()
            && a.config() == b.config()
            && a.mode() == b.mode()
            && a.fake_quant() == b.fake_quant()
    }
}

impl AdaptedLayer for QatLayer {
    fn shape(&self) -> (usize, usize) {
        self.layer.shape()
    }
    fn forward(&mut self, x: ArrayView2<'_, f32>) -> lora_core::Result<Array2<f32>> {
        self.last_forward_active = Some(self.active);
        if self.active {
            return self.layer.forward(x);
        }
        let w = self.layer.weight();
        let mut y = Array2::zeros((x.nrows(), w.nrows()));
        gemm_in(self.layer.compute_dtype(), 1.0, x, w.t(), 0.0, y.view_mut())?;
        if let Some(b) = self.layer.bias() {
            y += &b;
        }
        Ok(y)
    }
    fn backward(&mut self, dy: ArrayView2<'_, f32>) -> lora_core::Result<Array2<f32>> {
        match self.last_forward_active {
            Some(true) => self.layer.backward(dy),
            Some(false) => {
                let w = self.layer.weight();
                let mut dx = Array2::zeros((dy.nrows(), w.ncols()));
                gemm_in(
                    self.layer.compute_dtype(),
                    1.0,
                    dy,
                    w.view(),
                    0.0,
                    dx.view_mut(),
                )?;
                Ok(dx)
            }
            None => Err(lora_core::LoraError::state(
                "backward",
                self.layer.context(),
                "no forward pass is stored",
            )),
        }
    }
    fn adapter(&self, name: &str) -> lora_core::Result<&LoraAdapter> {
        self.check_name(name)?;
        Ok(self.layer.adapter())
    }
    fn adapter_mut(&mut self, name: &str) -> lora_core::Result<&mut LoraAdapter> {
        self.check_name(name)?;
        self.last_forward_active = None;
        Ok(self.layer.adapter_mut())
    }
    fn adapter_names(&self) -> Vec<String> {
        vec![self.name.clone()]
    }
    fn active(&self) -> Vec<String> {
        if self.active {
            vec![self.name.clone()]
        } else {
            Vec::new()
        }
    }
    fn set_active(&mut self, names: &[&str]) -> lora_core::Result<()> {
        for name in names {
            self.check_name(name)?;
        }
        self.active = !names.is_empty();
        self.last_forward_active = None;
        Ok(())
    }
    fn add_adapter(&mut self, _: &str, _: &AdapterOptions, _: u64) -> lora_core::Result<()> {
        Err(self.one_adapter_only("adding an adapter"))
    }
    fn insert_adapter(&mut self, _: &str, _: LoraAdapter) -> lora_core::Result<()> {
        Err(self.one_adapter_only("inserting an adapter"))
    }
    fn remove_adapter(&mut self, _: &str) -> lora_core::Result<LoraAdapter> {
        Err(self.one_adapter_only("removing the adapter"))
    }
    fn merge(&mut self) -> lora_core::Result<()> {
        Err(lora_core::LoraError::state(
            "merging in place",
            self.layer.context(),
            "a LoRA-QAT projection computes with Q(W + s·B·A); export_quantized writes that \
             weight and merge_and_unload makes it the projection's dense weight",
        ))
    }
    fn unmerge(&mut self) -> lora_core::Result<()> {
        Ok(())
    }
    fn is_merged(&self) -> bool {
        false
    }
    fn set_training(&mut self, training: bool) {
        // The merged mode has no dropout; the frozen-base mode draws it only in training.
        self.layer.set_training(training);
    }
    fn zero_grad(&mut self) {
        self.layer.zero_grad();
    }
    fn release_forward_state(&mut self) {
        self.layer.release_forward_state();
        self.last_forward_active = None;
    }
    fn base_weight(&self) -> lora_core::Result<Cow<'_, Array2<f32>>> {
        Ok(Cow::Borrowed(self.layer.weight()))
    }
    fn merged_weight(&mut self) -> lora_core::Result<Array2<f32>> {
        if self.active {
            // The deployed weight is the quantized one whatever the fake-quant switch says
            // (a warm-up turns it off; merging then must not hand back full precision).
            let was = self.layer.fake_quant();
            self.layer.set_fake_quant(true);
            let w = self.layer.effective_weight();
            self.layer.set_fake_quant(was);
            w
        } else {
            Ok(self.layer.weight().clone())
        }
    }
    fn base_parameter_count(&self) -> usize {
        self.layer.weight().len() + self.layer.bias().map_or(0, |b| b.len())
    }
    fn base_storage_bytes(&self) -> usize {
        self.layer.base_storage_bytes()
    }
    fn base_storage_kind(&self) -> &'static str {
        "f32"
    }
}
