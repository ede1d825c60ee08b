//! Low-rank adapters on the model: injecting them by PEFT's `target_modules` rules, loading
//! and saving PEFT adapter directories, merging, their gradients under PEFT's keys, and the
//! model's memory by kind.
//!
//! An adapted projection is a [`LinearModule`] variant holding a `lora_core::LoraLinear`;
//! its base stays frozen and the model's forward and backward run through the adapter layer.

use std::collections::BTreeMap;
use std::path::Path;

use lora_core::peft::{self, KEY_PREFIX};
use lora_core::{AdapterOptions, LoraAdapter, LoraConfig, LoraLinear};
use ndarray::ArrayD;

use crate::error::{LmError, Result};
use crate::linear::LinearModule;
use crate::memory::MemoryReport;
use crate::model::LlamaModel;
use crate::param::ParamMut;

/// PEFT's adapter-file key of an adapter tensor: `base_model.model.<module>.lora_A.weight`,
/// `.lora_B.weight` or `.lora_magnitude_vector` (no suffix, as PEFT writes it).
pub fn peft_file_key(module: &str, tensor: &str) -> String {
    match tensor {
        "lora_magnitude_vector" => format!("{KEY_PREFIX}{module}.{tensor}"),
        _ => format!("{KEY_PREFIX}{module}.{tensor}.weight"),
    }
}

impl LlamaModel {
    /// Every linear module with its Hugging Face path, read-only, in model order.
    pub(crate) fn linear_modules(&self) -> Vec<(String, &LinearModule)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7 + 1);
        for (i, layer) in self.layers.iter().enumerate() {
            for (name, lin) in layer.linears() {
                out.push((format!("model.layers.{i}.{name}"), lin));
            }
        }
        if let Some(head) = &self.lm_head {
            out.push(("lm_head".to_string(), head));
        }
        out
    }

    /// Whether any projection is adapted.
    pub fn has_adapters(&self) -> bool {
        self.linear_modules()
            .iter()
            .any(|(_, lin)| lin.adapted().is_some())
    }

    /// Training mode (the default) draws adapter dropout in [`LlamaModel::forward`];
    /// evaluation mode does not. [`LlamaModel::logits`] and generation always evaluate.
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
        self.set_adapters_training(training);
    }

    pub fn is_training(&self) -> bool {
        self.training
    }

    pub(crate) fn set_adapters_training(&mut self, training: bool) {
        for (_, lin) in self.linear_modules_mut() {
            if let Some(layer) = lin.adapted_mut() {
                layer.set_training(training);
            }
        }
    }

    /// Names of the adapters injected or loaded, sorted.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapter_configs.keys().cloned().collect()
    }

    /// The config adapter `name` was created or loaded with.
    pub fn adapter_config(&self, name: &str) -> Result<&LoraConfig> {
        self.adapter_configs
            .get(name)
            .ok_or_else(|| self.unknown_adapter(name))
    }

    fn unknown_adapter(&self, name: &str) -> LmError {
        LmError::AdapterState {
            operation: format!("adapter {name:?}"),
            reason: format!(
                "the model has no adapter of that name (it has {:?})",
                self.adapter_names()
            ),
        }
    }

    /// Paths of the projections `config` targets, checked to be a usable config for this
    /// model, with `name` new.
    pub(crate) fn adapter_targets(
        &self,
        config: &LoraConfig,
        name: &str,
    ) -> Result<Vec<(String, usize, usize)>> {
        config.validate()?;
        if config.fan_in_fan_out {
            return Err(LmError::invalid(
                "fan_in_fan_out",
                true,
                "Llama projections are nn.Linear, stored (out, in); the config must say false",
            ));
        }
        if self.adapter_configs.contains_key(name) {
            return Err(LmError::AdapterState {
                operation: format!("adding adapter {name:?}"),
                reason: "the model already has an adapter of that name".into(),
            });
        }
        let targets: Vec<(String, usize, usize)> = self
            .linear_modules()
            .into_iter()
            .filter(|(path, _)| config.matches(path))
            .map(|(path, lin)| (path, lin.out_features(), lin.in_features()))
            .collect();
        if targets.is_empty() {
            return Err(LmError::invalid(
                "target_modules",
                format!("{:?}", config.target_modules),
                format!(
                    "matches none of the model's linear modules (model.layers.{{i}}.{{{}}}{})",
                    crate::model::LAYER_LINEAR_NAMES.join(","),
                    if self.lm_head.is_some() {
                        ", lm_head"
                    } else {
                        ""
                    }
                ),
            ));
        }
        Ok(targets)
    }

    /// Adds a fresh adapter `name` on every projection `config` targets (PEFT's
    /// `target_modules` / `exclude_modules` rules on paths such as
    /// `model.layers.0.self_attn.q_proj`; `lm_head` only when targeted), initialised as the
    /// config says from `seed` (each module draws from its own stream, derived as
    /// `lora_core::AdapterSet` derives it). Like `get_peft_model`, it freezes the whole base:
    /// only adapters train. The first adapter becomes active. Returns the number of adapted
    /// modules. Nothing changes when an option is invalid for some module.
    ///
    /// ```
    /// use lm::{LlamaConfig, LlamaModel};
    /// use lora_core::LoraConfig;
    /// let mut model = LlamaModel::random(LlamaConfig::new(32, 16, 32, 2, 4, 2).unwrap(), 1).unwrap();
    /// let ids = ndarray::array![[1u32, 5, 9, 3]];
    /// let before = model.logits(ids.view(), None).unwrap();
    /// let config = LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "down_proj"]);
    /// assert_eq!(model.inject_adapters(&config, "default", 0).unwrap(), 2 * 3);
    /// // PEFT's default init has B = 0: the adapted model computes what the base did.
    /// assert_eq!(model.logits(ids.view(), None).unwrap(), before);
    /// model.loss_and_backward(ids.view(), ndarray::array![[1i64, 5, 9, 3]].view(), None).unwrap();
    /// let grads = model.adapter_gradients("default").unwrap();
    /// assert_eq!(grads[0].0, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
    /// assert_eq!(grads.len(), 2 * 3 * 2);
    /// ```
    pub fn inject_adapters(&mut self, config: &LoraConfig, name: &str, seed: u64) -> Result<usize> {
        let targets = self.adapter_targets(config, name)?;
        for (path, out_features, in_features) in &targets {
            AdapterOptions::from_config(config, path).validate(
                *out_features,
                *in_features,
                path,
            )?;
        }
        self.set_base_trainable(false);
        let training = self.training;
        let mut done: Vec<String> = Vec::with_capacity(targets.len());
        for (path, _, _) in &targets {
            let options = AdapterOptions::from_config(config, path);
            let seed = LoraLinear::<lora_core::DenseBase>::derive_seed(seed, path);
            let result = self.linear_module_mut(path).and_then(|lin| {
                let layer = lin.make_adapted(path)?;
                layer.set_training(training);
                Ok(layer.add_adapter(name, &options, seed)?)
            });
            if let Err(e) = result {
                // Leave no half-created adapter behind.
                for done_path in &done {
                    if let Some(layer) = self
                        .linear_module_mut(done_path)
                        .ok()
                        .and_then(|lin| lin.adapted_mut())
                    {
                        let _ = layer.remove_adapter(name);
                    }
                }
                return Err(e);
            }
            done.push(path.clone());
        }
        self.adapter_configs
            .insert(name.to_string(), config.clone());
        self.activate_first_adapter(name)?;
        Ok(targets.len())
    }

    /// Loads the PEFT adapter directory `dir` (`adapter_config.json` +
    /// `adapter_model.safetensors`) as adapter `name` (`seed` drives its dropout). Shapes
    /// come from the model's projections; a key missing from the file, a key for no module of
    /// the model, a wrong shape, or targets that match no module of the model is an error
    /// naming it, and leaves the model unchanged. Returns the number of adapted modules.
    ///
    /// ```
    /// let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/llama");
    /// let mut model = lm::LlamaModel::from_pretrained(format!("{data}/base")).unwrap();
    /// assert_eq!(model.load_adapter(format!("{data}/adapter_lora"), "default", 0).unwrap(), 14);
    /// assert_eq!(model.adapter_config("default").unwrap().r, 4);
    /// ```
    pub fn load_adapter(&mut self, dir: impl AsRef<Path>, name: &str, seed: u64) -> Result<usize> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(LmError::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not a directory (expected a PEFT adapter directory)",
                ),
            ));
        }
        let shapes: BTreeMap<String, (usize, usize)> = self
            .linear_modules()
            .into_iter()
            .map(|(path, lin)| (path, (lin.out_features(), lin.in_features())))
            .collect();
        let loaded = peft::load_adapter(dir, &shapes)?;
        self.adapter_targets(&loaded.config, name)?;
        let mut adapters: Vec<(String, LoraAdapter)> = Vec::with_capacity(loaded.modules.len());
        for (module, weights) in loaded.modules {
            let options = AdapterOptions::from_config(&loaded.config, &module);
            let adapter = LoraAdapter::from_weights(
                weights.a,
                weights.b,
                weights.magnitude,
                &options,
                LoraLinear::<lora_core::DenseBase>::derive_seed(seed, &module),
                &module,
            )?;
            adapters.push((module, adapter));
        }
        self.set_base_trainable(false);
        let training = self.training;
        let count = adapters.len();
        for (module, adapter) in adapters {
            let lin = self.linear_module_mut(&module)?;
            let layer = lin.make_adapted(&module)?;
            layer.set_training(training);
            layer.insert_adapter(name, adapter)?;
        }
        self.adapter_configs.insert(name.to_string(), loaded.config);
        self.activate_first_adapter(name)?;
        Ok(count)
    }

    /// Writes adapter `name` to `dir` in PEFT's layout (through `lora_core::peft`): its
    /// config and `A`, `B` (and DoRA's magnitude) of every module holding it.
    pub fn save_adapter(&self, dir: impl AsRef<Path>, name: &str) -> Result<()> {
        self.save_adapter_as(dir, name, peft::SaveDtype::F32)
    }

    /// [`LlamaModel::save_adapter`] with the tensors stored as `dtype` (f32, f16 or bf16;
    /// `lora-qat train --save-dtype`).
    pub fn save_adapter_as(
        &self,
        dir: impl AsRef<Path>,
        name: &str,
        dtype: peft::SaveDtype,
    ) -> Result<()> {
        let config = self.adapter_config(name)?;
        let linears = self.linear_modules();
        let mut modules: Vec<(&str, &LoraAdapter)> = Vec::new();
        for (path, lin) in &linears {
            if let Some(adapter) = lin.adapted().and_then(|layer| layer.adapter(name).ok()) {
                modules.push((path.as_str(), adapter));
            }
        }
        peft::save_adapters_as(dir.as_ref(), config, modules, dtype)?;
        Ok(())
    }

    /// The gradients accumulated for adapter `name`, under PEFT's adapter-file keys (see
    /// [`peft_file_key`]), in model order: per module `lora_A`, `lora_B`, then DoRA's
    /// `lora_magnitude_vector`.
    pub fn adapter_gradients(&self, name: &str) -> Result<Vec<(String, ArrayD<f32>)>> {
        self.adapter_config(name)?;
        let mut out = Vec::new();
        for (path, lin) in self.linear_modules() {
            let Some(adapter) = lin.adapted().and_then(|layer| layer.adapter(name).ok()) else {
                continue;
            };
            out.push((
                peft_file_key(&path, "lora_A"),
                adapter.grad_a().clone().into_dyn(),
            ));
            out.push((
                peft_file_key(&path, "lora_B"),
                adapter.grad_b().clone().into_dyn(),
            ));
            if let Some(g) = adapter.grad_magnitude() {
                out.push((
                    peft_file_key(&path, "lora_magnitude_vector"),
                    g.clone().into_dyn(),
                ));
            }
        }
        Ok(out)
    }

    /// The first adapter added becomes active (as in PEFT); later ones wait for
    /// [`LlamaModel::set_active_adapters`], also on modules they alone adapt.
    pub(crate) fn activate_first_adapter(&mut self, name: &str) -> Result<()> {
        if self.active_adapters.is_empty() {
            self.active_adapters = vec![name.to_string()];
        }
        let active = self.active_adapters.clone();
        let names: Vec<&str> = active.iter().map(String::as_str).collect();
        self.set_active_adapters(&names)
    }

    /// The adapters the model computes with.
    pub fn active_adapters(&self) -> &[String] {
        &self.active_adapters
    }

    /// Makes exactly `names` the active adapters on every adapted module (a module computes
    /// those of them it holds), unmerging first, as PEFT's `set_adapter`. Only active
    /// adapters train.
    pub fn set_active_adapters(&mut self, names: &[&str]) -> Result<()> {
        for name in names {
            self.adapter_config(name)?;
        }
        self.active_adapters = names.iter().map(|n| n.to_string()).collect();
        for (_, lin) in self.linear_modules_mut() {
            if let Some(layer) = lin.adapted_mut() {
                let held = layer.adapter_names();
                let present: Vec<&str> = names
                    .iter()
                    .copied()
                    .filter(|n| held.iter().any(|h| h == n))
                    .collect();
                layer.set_active(&present)?;
            }
        }
        Ok(())
    }

    /// Folds the active adapters into the base weights of every adapted module (PEFT's
    /// `merge_adapter`): the model computes the same function with one product per
    /// projection. [`LlamaModel::save_pretrained`] then writes the merged weights, as after
    /// `merge_and_unload`.
    pub fn merge_adapters(&mut self) -> Result<()> {
        for (_, lin) in self.linear_modules_mut() {
            if let Some(layer) = lin.adapted_mut() {
                layer.merge()?;
            }
        }
        Ok(())
    }

    /// Undoes [`LlamaModel::merge_adapters`].
    pub fn unmerge_adapters(&mut self) -> Result<()> {
        for (_, lin) in self.linear_modules_mut() {
            if let Some(layer) = lin.adapted_mut() {
                layer.unmerge()?;
            }
        }
        Ok(())
    }

    /// [`LlamaModel::visit_parameters`] restricted to the tensors that train (those with a
    /// gradient buffer): active adapters, and base parameters made trainable.
    pub fn visit_trainable_parameters(
        &mut self,
        mut f: impl FnMut(&str, ParamMut<'_>) -> Result<()>,
    ) -> Result<()> {
        self.visit_parameters(|name, p| if p.grad.is_some() { f(name, p) } else { Ok(()) })
    }

    /// Bytes the model holds, by kind: base tensors by storage kind (through
    /// `FrozenBase::storage_bytes` for adapted projections), adapters, gradient buffers.
    ///
    /// ```
    /// use lm::{LlamaConfig, LlamaModel};
    /// let mut model = LlamaModel::random(LlamaConfig::new(32, 16, 32, 1, 4, 2).unwrap(), 1).unwrap();
    /// let report = model.memory_report();
    /// assert_eq!(report.base_bytes(), 4 * model.num_parameters());
    /// assert_eq!(report.bytes_per_base_parameter(), 4.0);
    /// assert_eq!((report.adapter_bytes, report.gradient_bytes), (0, 0));
    /// ```
    pub fn memory_report(&self) -> MemoryReport {
        let mut report = MemoryReport::default();
        self.embed_tokens.add_memory(&mut report);
        for layer in &self.layers {
            for norm in [&layer.input_layernorm, &layer.post_attention_layernorm] {
                report.add_f32_parameter(norm.value().len(), norm.is_trainable());
            }
        }
        report.add_f32_parameter(self.norm.value().len(), self.norm.is_trainable());
        for (_, lin) in self.linear_modules() {
            lin.add_memory(&mut report);
        }
        report
    }
}
