//! What a projection holds and trains, by name: parameter counts, visiting its tensors under
//! Hugging Face / PEFT names (with their gradients when they train), memory accounting and
//! the finiteness check of its gradients — for every composition of [`LinearModule`].

use lora_core::FrozenBase;

use crate::adapted::{peft_parameter_name, AdaptedLayer};
use crate::base::LinearBase;
use crate::error::{check_finite_at, LmError, Result};
use crate::linear::LinearModule;
use crate::memory::MemoryReport;
use crate::param::ParamMut;
use crate::qat_layer::quantizer_step_name;

impl LinearModule {
    /// Scalars of the base weight and of every adapter (and of a LoRA-QAT quantizer).
    pub fn parameter_count(&self) -> usize {
        match self {
            LinearModule::Base(b) => b.parameter_count(),
            LinearModule::Qat(q) => {
                let layer = q.layer();
                q.base_parameter_count()
                    + layer.adapter().parameter_count()
                    + layer.quantizer_params().len()
            }
            LinearModule::Lora(l) => {
                let adapters: usize = l
                    .adapter_names()
                    .iter()
                    .filter_map(|n| l.adapter(n).ok())
                    .map(|a| a.parameter_count())
                    .sum();
                l.base().parameter_count() + adapters
            }
        }
    }

    /// Calls `f` for every tensor of the module: a dense weight under `{path}.weight` (HF
    /// name); an adapted module's adapter tensors under PEFT's parameter names (see
    /// [`peft_parameter_name`]), with gradients for active adapters only; a LoRA-QAT
    /// module's quantizer steps after them under [`crate::quantizer_step_name`] (with a
    /// gradient when its adapter is active and the mode trains them). The frozen base of an
    /// adapted module belongs to its adapter layer and is not visited, nor is a frozen NF4
    /// or ggml base. Merged adapters cannot be visited (their values are folded into the
    /// base): an error says so.
    pub fn visit_parameters(
        &mut self,
        path: &str,
        f: &mut dyn FnMut(&str, ParamMut<'_>) -> Result<()>,
    ) -> Result<()> {
        match self {
            LinearModule::Base(LinearBase::Dense(d)) => {
                let name = format!("{path}.weight");
                let p = d.weight.as_param_mut(&name)?;
                f(&name, p)?;
                if let Some(b) = &mut d.bias {
                    let name = format!("{path}.bias");
                    f(&name, b.as_param_mut(&name)?)?;
                }
                Ok(())
            }
            LinearModule::Base(_) => Ok(()),
            LinearModule::Lora(l) => visit_adapter_tensors(l.as_mut(), path, f),
            LinearModule::Qat(q) => {
                visit_adapter_tensors(q.as_mut(), path, f)?;
                let trains = !q.active().is_empty()
                    && q.layer().mode() == lora_core::QatMode::QuantizeMerged;
                let (value, grad) = q.layer_mut().quantizer_params_and_grads_mut();
                let name = quantizer_step_name(path);
                f(
                    &name,
                    ParamMut {
                        shape: vec![value.len()],
                        value,
                        grad: if trains { Some(grad) } else { None },
                    },
                )
            }
        }
    }

    /// Adds this module's resident bytes to `report`.
    pub(crate) fn add_memory(&self, report: &mut MemoryReport) {
        if let LinearModule::Qat(q) = self {
            // The quantizer's steps train like the adapter: counted with it, with a gradient.
            let steps = q.layer().quantizer_params();
            report.adapter_parameters += steps.len();
            report.adapter_bytes += std::mem::size_of_val(steps);
            report.gradient_bytes += std::mem::size_of_val(steps);
        }
        match self {
            LinearModule::Base(LinearBase::Dense(d)) => {
                report.add_f32_parameter(d.weight.value().len(), d.weight.is_trainable());
                if let Some(b) = &d.bias {
                    report.add_f32_parameter(b.value().len(), b.is_trainable());
                }
            }
            LinearModule::Base(base) => report.add_quantized_base(
                base.storage_kind(),
                base.storage_bytes(),
                base.parameter_count(),
            ),
            LinearModule::Lora(l) => add_adapted_memory(l.as_ref(), report),
            LinearModule::Qat(q) => add_adapted_memory(q.as_ref(), report),
        }
    }

    pub(crate) fn check_grads_finite(&self, path: &str) -> Result<()> {
        let layer: &dyn AdaptedLayer = match self {
            LinearModule::Base(LinearBase::Dense(d)) => {
                d.weight.check_grad_finite(&format!("{path}.weight"))?;
                return match &d.bias {
                    Some(b) => b.check_grad_finite(&format!("{path}.bias")),
                    None => Ok(()),
                };
            }
            LinearModule::Base(_) => return Ok(()),
            LinearModule::Lora(l) => l.as_ref(),
            LinearModule::Qat(q) => {
                check_finite_at(
                    &format!("gradient of {}", quantizer_step_name(path)),
                    q.layer().grad_quantizer_params(),
                    |i| format!("element [{i}]"),
                )?;
                q.as_ref()
            }
        };
        for name in layer.active() {
            let adapter = layer.adapter(&name)?;
            let mut grads = vec![
                (
                    "lora_A",
                    adapter.grad_a().as_slice(),
                    adapter.grad_a().ncols(),
                ),
                (
                    "lora_B",
                    adapter.grad_b().as_slice(),
                    adapter.grad_b().ncols(),
                ),
            ];
            if let Some(g) = adapter.grad_magnitude() {
                grads.push(("lora_magnitude_vector", g.as_slice(), g.len()));
            }
            for (tensor, values, cols) in grads {
                let cols = cols.max(1);
                check_finite_at(
                    &format!("gradient of {}", peft_parameter_name(path, tensor, &name)),
                    values.unwrap_or_default(),
                    |i| format!("element [{}, {}]", i / cols, i % cols),
                )?;
            }
        }
        Ok(())
    }
}

/// The base and adapter bytes of an adapted module.
fn add_adapted_memory(layer: &dyn AdaptedLayer, report: &mut MemoryReport) {
    let f32_bytes = std::mem::size_of::<f32>();
    let quantized = layer.base_storage_kind() != "f32";
    if quantized {
        report.add_quantized_base(
            layer.base_storage_kind(),
            layer.base_storage_bytes(),
            layer.base_parameter_count(),
        );
    } else {
        *report
            .base_bytes_by_kind
            .entry(layer.base_storage_kind().to_string())
            .or_default() += layer.base_storage_bytes();
        report.base_parameters += layer.base_parameter_count();
    }
    for name in layer.adapter_names() {
        if let Ok(adapter) = layer.adapter(&name) {
            let count = adapter.parameter_count();
            report.adapter_parameters += count;
            report.adapter_bytes += count * f32_bytes;
            if quantized {
                report.adapter_bytes_on_quantized_bases += count * f32_bytes;
            }
            // lora-core keeps a gradient buffer for every adapter it holds.
            report.gradient_bytes += count * f32_bytes;
        }
    }
}

/// A contiguous tensor's flat buffer, or an error naming the tensor.
fn flat<'a>(what: &str, values: Option<&'a mut [f32]>) -> Result<&'a mut [f32]> {
    values.ok_or_else(|| {
        LmError::invalid(
            what,
            "non-contiguous tensor",
            "adapters are kept contiguous",
        )
    })
}

fn visit_adapter_tensors(
    layer: &mut dyn AdaptedLayer,
    path: &str,
    f: &mut dyn FnMut(&str, ParamMut<'_>) -> Result<()>,
) -> Result<()> {
    if layer.is_merged() {
        return Err(LmError::AdapterState {
            operation: format!("visiting the adapter parameters of {path}"),
            reason: "adapters are merged into the base weight; unmerge first".into(),
        });
    }
    let active = layer.active();
    for name in layer.adapter_names() {
        let trains = active.contains(&name);
        let tensors = layer.adapter_mut(&name)?.tensors_mut();
        let (a, grad_a) = tensors.a;
        let (b, grad_b) = tensors.b;
        let mut visit = |tensor: &str, shape: Vec<usize>, value, grad| -> Result<()> {
            let full = peft_parameter_name(path, tensor, &name);
            let value = flat(&full, value)?;
            let grad = flat(&full, grad)?;
            let grad = if trains { Some(grad) } else { None };
            f(&full, ParamMut { shape, value, grad })
        };
        visit(
            "lora_A",
            a.shape().to_vec(),
            a.as_slice_mut(),
            grad_a.as_slice_mut(),
        )?;
        visit(
            "lora_B",
            b.shape().to_vec(),
            b.as_slice_mut(),
            grad_b.as_slice_mut(),
        )?;
        if let Some((m, grad_m)) = tensors.magnitude {
            visit(
                "lora_magnitude_vector",
                vec![m.len()],
                m.as_slice_mut(),
                grad_m.as_slice_mut(),
            )?;
        }
    }
    Ok(())
}
