//! LoRA-QAT on the model: projections whose one adapter trains through a differentiable
//! weight quantizer ([`QatLayer`], in [`crate::qat_layer`]), injected by PEFT's targeting
//! rules over any base (an NF4 or ggml base is dequantized once: see
//! [`LlamaModel::inject_qat_adapters`]), with the quantizer's steps as trainable parameters, a
//! switch for full-precision warm-up, recalibration, PEFT-directory save/load plus the steps
//! beside it, and export of the quantized weights.

use std::collections::BTreeMap;
use std::path::Path;

use lora_core::peft;
use lora_core::{
    AdapterOptions, FrozenBase, LoraAdapter, LoraConfig, LoraLinear, LoraQatLinear, QatMode,
};
use ndarray::Array2;
use quant_core::config::QatConfig;
use quant_core::io::OwnedTensor;
use quant_core::quantizer::InitMethod;
use safetensors::SafeTensors;

use crate::error::{LmError, Result};
use crate::linear::LinearModule;
use crate::model::LlamaModel;
pub use crate::qat_layer::{quantizer_step_name, QatLayer, QAT_STATE_FILE, QUANTIZER_STEP_SUFFIX};

/// The [`QAT_STATE_FILE`] format version: 2 records the SHA-256 of the adapter's two PEFT
/// files (under [`WEIGHTS_SHA256_KEY`] and [`CONFIG_SHA256_KEY`]), which a load checks.
const QAT_STATE_VERSION: &str = "2";
/// Metadata key of [`QAT_STATE_FILE`]: the SHA-256 of `adapter_model.safetensors`.
const WEIGHTS_SHA256_KEY: &str = "adapter_model_sha256";
/// Metadata key of [`QAT_STATE_FILE`]: the SHA-256 of `adapter_config.json`.
const CONFIG_SHA256_KEY: &str = "adapter_config_sha256";

/// The LoRA-QAT state of a model as the [`QAT_STATE_FILE`] stores it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct QatState {
    pub(crate) config: QatConfig,
    pub(crate) mode: QatMode,
    pub(crate) steps: BTreeMap<String, Vec<f32>>,
}

impl QatState {
    /// The weight a LoRA-QAT layer of `module` computes with, with fake quantization on:
    /// `Q(W + s·B·A)` (merged mode) or `Q(W) + s·B·A` (frozen-base mode), from its base
    /// `weight`, the adapter's tensors and this state's steps. What `merge` and `export-gguf`
    /// write for a LoRA-QAT adapter, one module at a time.
    pub(crate) fn quantized_weight(
        &self,
        weight: Array2<f32>,
        adapter: &peft::AdapterWeights,
        lora: &LoraConfig,
        module: &str,
        file: &Path,
    ) -> Result<Array2<f32>> {
        let mut layer = self.layer(weight, adapter, lora, module, file)?;
        layer.set_fake_quant(true);
        Ok(layer.effective_weight()?)
    }

    /// The LoRA-QAT layer `module` trained as: base `weight`, the saved adapter and the
    /// saved quantizer steps.
    pub(crate) fn layer(
        &self,
        weight: Array2<f32>,
        adapter: &peft::AdapterWeights,
        lora: &LoraConfig,
        module: &str,
        file: &Path,
    ) -> Result<LoraQatLinear> {
        let options = AdapterOptions::from_config(lora, module);
        let adapter = LoraAdapter::from_weights(
            adapter.a.clone(),
            adapter.b.clone(),
            adapter.magnitude.clone(),
            &options,
            LoraLinear::<lora_core::DenseBase>::derive_seed(0, module),
            module,
        )?;
        let mut layer =
            LoraQatLinear::with_adapter(weight, None, adapter, &self.config, self.mode, module)?;
        self.copy_steps(&mut layer, module, file)?;
        Ok(layer)
    }

    /// Replaces `layer`'s quantizer steps with the stored ones of `module`.
    pub(crate) fn copy_steps(
        &self,
        layer: &mut LoraQatLinear,
        module: &str,
        file: &Path,
    ) -> Result<()> {
        let key = quantizer_step_name(module);
        let steps = self
            .steps
            .get(module)
            .ok_or_else(|| LmError::MissingTensor {
                key: format!("{key} (in {})", file.display()),
                expected: vec![layer.quantizer_params().len()],
            })?;
        let params = layer.quantizer_params_mut();
        if steps.len() != params.len() {
            return Err(LmError::TensorShape {
                key,
                expected: vec![params.len()],
                got: vec![steps.len()],
            });
        }
        params.copy_from_slice(steps);
        Ok(())
    }
}

fn mode_name(mode: QatMode) -> &'static str {
    match mode {
        QatMode::QuantizeMerged => "quantize_merged",
        QatMode::FrozenQuantizedBase => "frozen_quantized_base",
    }
}

/// Refuses a [`QAT_STATE_FILE`] at `path` whose recorded SHA-256 of a PEFT file beside it
/// disagrees with that file: a save interrupted between its renames, or files of two saves
/// mixed. The error names both files.
fn check_adapter_pair(path: &Path, meta: &std::collections::HashMap<String, String>) -> Result<()> {
    let bad = |reason: String| LmError::SafeTensors {
        path: path.to_path_buf(),
        reason,
    };
    match meta.get("version").map(String::as_str) {
        Some(QAT_STATE_VERSION) => {}
        other => {
            return Err(bad(format!(
                "metadata `version` is {other:?}, expected \"{QAT_STATE_VERSION}\" (the version \
                 that records the SHA-256 of the adapter's PEFT files; save the adapter again)"
            )))
        }
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    for (key, file) in [
        (WEIGHTS_SHA256_KEY, peft::WEIGHTS_FILE),
        (CONFIG_SHA256_KEY, peft::CONFIG_FILE),
    ] {
        let recorded = meta
            .get(key)
            .ok_or_else(|| bad(format!("no `{key}` metadata entry")))?;
        let sibling = dir.join(file);
        let bytes = std::fs::read(&sibling).map_err(|e| LmError::io(&sibling, e))?;
        let actual = quant_core::io::sha256_hex(&bytes);
        if &actual != recorded {
            return Err(bad(format!(
                "was saved with another {file} (recorded sha256 {recorded}, {} has {actual}): \
                 a half-saved or mixed LoRA-QAT adapter directory; save it again",
                sibling.display()
            )));
        }
    }
    Ok(())
}

pub(crate) fn read_qat_state(path: &Path) -> Result<QatState> {
    let bytes = std::fs::read(path).map_err(|e| LmError::io(path, e))?;
    let bad = |reason: String| LmError::SafeTensors {
        path: path.to_path_buf(),
        reason,
    };
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    check_adapter_pair(path, &meta)?;
    let config_text = meta
        .get("qat_config")
        .ok_or_else(|| bad("no `qat_config` metadata entry".into()))?;
    let config: QatConfig = serde_json::from_str(config_text)
        .map_err(|e| bad(format!("metadata `qat_config`: {e}")))?;
    let mode = match meta.get("qat_mode").map(String::as_str) {
        Some("quantize_merged") => QatMode::QuantizeMerged,
        Some("frozen_quantized_base") => QatMode::FrozenQuantizedBase,
        other => {
            return Err(bad(format!(
                "metadata `qat_mode` is {other:?}, expected \"quantize_merged\" or \
                 \"frozen_quantized_base\""
            )))
        }
    };
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut steps = BTreeMap::new();
    for (name, view) in st.tensors() {
        let module = name
            .strip_prefix(peft::KEY_PREFIX)
            .and_then(|n| n.strip_suffix(QUANTIZER_STEP_SUFFIX))
            .ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` is not `{}<module>{QUANTIZER_STEP_SUFFIX}`",
                    peft::KEY_PREFIX
                ))
            })?;
        let values = quant_core::io::tensor_to_f32(&name, &view)?;
        steps.insert(module.to_string(), values);
    }
    Ok(QatState {
        config,
        mode,
        steps,
    })
}

impl LlamaModel {
    /// Makes every projection `config` targets (PEFT's `target_modules` rules, as
    /// [`LlamaModel::inject_adapters`]) a LoRA-QAT layer ([`LinearModule::Qat`]) with a fresh
    /// adapter `name` (initialised as `config` says from `seed`, each module from its own
    /// derived stream) and a quantizer built from `qat` and fitted (`qat.init`) to
    /// `W + s·B·A` (`QatMode::QuantizeMerged`) or `W` (`QatMode::FrozenQuantizedBase`). The
    /// base is frozen; the adapter becomes active when it is the model's first. Targets must
    /// be unadapted projections; DoRA, and dropout in the merged mode, are refused. Returns
    /// the number of layers; on any error the model is unchanged.
    ///
    /// Over an NF4 or ggml base (a QLoRA checkpoint, a GGUF file's blocks) the quantizer
    /// needs `W` itself: the base is dequantized once and the layer holds `W` in `f32` from
    /// then on — 4 bytes per weight instead of the base's ~0.5 (NF4, Q4_*) to 2 (F16), and,
    /// while the layers are built, both copies (the model is unchanged until all are). The
    /// quantized codes are dropped; `merge_and_unload` gives a dense `f32` projection, as for
    /// any LoRA-QAT layer.
    ///
    /// ```
    /// use lm::{LlamaConfig, LlamaModel};
    /// use lora_core::{LoraConfig, QatMode};
    /// use quant_core::config::QatConfig;
    /// let mut model = LlamaModel::random(LlamaConfig::new(32, 16, 32, 1, 4, 2).unwrap(), 1).unwrap();
    /// let lora = LoraConfig::new(2, 4.0, &["q_proj", "down_proj"]);
    /// let n = model.inject_qat_adapters(&lora, &QatConfig::piq3(), QatMode::QuantizeMerged, "qat", 0).unwrap();
    /// assert_eq!(n, 2);
    /// let mut names = Vec::new();
    /// model.visit_trainable_parameters(|name, _| { names.push(name.to_string()); Ok(()) }).unwrap();
    /// assert_eq!(names[2], "base_model.model.model.layers.0.self_attn.q_proj.quantizer.step");
    /// ```
    pub fn inject_qat_adapters(
        &mut self,
        config: &LoraConfig,
        qat: &QatConfig,
        mode: QatMode,
        name: &str,
        seed: u64,
    ) -> Result<usize> {
        let targets = self.adapter_targets(config, name)?;
        qat.validate()?;
        let mut built: Vec<(String, LinearModule)> = Vec::with_capacity(targets.len());
        for (path, out_features, in_features) in &targets {
            let options = AdapterOptions::from_config(config, path);
            options.validate(*out_features, *in_features, path)?;
            let lin = self.linear_module_mut(path)?;
            let bias = lin.base_bias().map(|b| b.to_owned());
            let weight = dense_weight_for_qat(lin, path)?;
            let layer = LoraQatLinear::new(
                weight,
                bias,
                &options,
                qat,
                mode,
                LoraLinear::<lora_core::DenseBase>::derive_seed(seed, path),
                path,
            )?;
            built.push((
                path.clone(),
                LinearModule::Qat(Box::new(QatLayer::new(name, layer))),
            ));
        }
        self.install_qat_layers(config, name, built)
    }

    /// Puts the built layers in place, registers the adapter and activates it if first.
    fn install_qat_layers(
        &mut self,
        config: &LoraConfig,
        name: &str,
        built: Vec<(String, LinearModule)>,
    ) -> Result<usize> {
        self.set_base_trainable(false);
        let count = built.len();
        for (path, module) in built {
            *self.linear_module_mut(&path)? = module;
        }
        self.adapter_configs
            .insert(name.to_string(), config.clone());
        self.activate_first_adapter(name)?;
        Ok(count)
    }

    /// Every LoRA-QAT layer with its path.
    fn qat_layers_mut(&mut self) -> Vec<(String, &mut QatLayer)> {
        self.linear_modules_mut()
            .filter_map(|(path, lin)| match lin {
                LinearModule::Qat(q) => Some((path, q.as_mut())),
                _ => None,
            })
            .collect()
    }

    /// Turns fake quantization on (the default) or off in every LoRA-QAT layer; off, they
    /// compute with `W + s·B·A` in full precision (warm-up steps) and their steps get no
    /// gradient. Returns the number of layers switched.
    pub fn set_fake_quant(&mut self, enabled: bool) -> usize {
        let layers = self.qat_layers_mut();
        let count = layers.len();
        for (_, q) in layers {
            q.layer_mut().set_fake_quant(enabled);
        }
        count
    }

    /// Re-initialises every LoRA-QAT layer's quantizer with `init` from the weight it
    /// quantizes now (`W + s·B·A` with the current adapter, or `W` in the frozen-base mode);
    /// their accumulated step gradients are zeroed. Returns the number of layers.
    pub fn recalibrate_quantizers(&mut self, init: InitMethod) -> Result<usize> {
        let layers = self.qat_layers_mut();
        let count = layers.len();
        for (_, q) in layers {
            q.layer_mut().recalibrate(init)?;
        }
        Ok(count)
    }

    /// Writes LoRA-QAT adapter `name` to `dir`: `adapter_config.json` and
    /// `adapter_model.safetensors` exactly as PEFT writes a LoRA adapter (so PEFT can load the
    /// unquantized adapter), and [`QAT_STATE_FILE`] with every layer's quantizer steps under
    /// [`quantizer_step_name`] and the `QatConfig` and mode as metadata (`docs/FORMATS.md`).
    pub fn save_qat_adapter(&self, dir: impl AsRef<Path>, name: &str) -> Result<()> {
        let dir = dir.as_ref();
        let config = self.adapter_config(name)?;
        let linears = self.linear_modules();
        let mut modules: Vec<(&str, &LoraAdapter)> = Vec::new();
        let mut steps: Vec<(String, OwnedTensor)> = Vec::new();
        let mut settings: Option<(QatConfig, QatMode)> = None;
        for (path, lin) in &linears {
            let LinearModule::Qat(q) = lin else { continue };
            if q.name() != name {
                continue;
            }
            let layer = q.layer();
            let these = (*layer.config(), layer.mode());
            if settings.is_some_and(|s| s != these) {
                return Err(LmError::AdapterState {
                    operation: format!("saving LoRA-QAT adapter {name:?}"),
                    reason: format!("{path} has another QatConfig or mode than earlier layers"),
                });
            }
            settings = Some(these);
            modules.push((path.as_str(), layer.adapter()));
            let params = layer.quantizer_params();
            steps.push((
                quantizer_step_name(path),
                OwnedTensor::f32(vec![params.len()], params)?,
            ));
        }
        let (qat, mode) = settings.ok_or_else(|| LmError::AdapterState {
            operation: format!("saving LoRA-QAT adapter {name:?}"),
            reason: "no LoRA-QAT layer holds it (save_adapter writes plain LoRA adapters)".into(),
        })?;
        // The three files commit as one (docs/FORMATS.md): the quantizer file, which records
        // the SHA-256 of the two PEFT files, is renamed in first, so a crash between renames
        // leaves a directory whose recorded hashes disagree — refused by `read_qat_state`.
        let peft_files = peft::encode_adapter(dir, config, modules, peft::SaveDtype::F32)?;
        let config_json = serde_json::to_string(&qat).map_err(|e| LmError::Json {
            path: dir.join(QAT_STATE_FILE),
            reason: e.to_string(),
        })?;
        let metadata = [
            ("qat_config".to_string(), config_json),
            ("qat_mode".to_string(), mode_name(mode).to_string()),
            ("format".to_string(), "lora-qat.qat_quantizers".to_string()),
            ("version".to_string(), QAT_STATE_VERSION.to_string()),
            (
                WEIGHTS_SHA256_KEY.to_string(),
                quant_core::io::sha256_hex(&peft_files.weights),
            ),
            (
                CONFIG_SHA256_KEY.to_string(),
                quant_core::io::sha256_hex(&peft_files.config),
            ),
        ];
        let state_bytes =
            quant_core::io::serialize_safetensors(&steps, Some(metadata.into_iter().collect()))?;
        let mut files = vec![(dir.join(QAT_STATE_FILE), state_bytes)];
        files.extend(peft_files.into_files(dir));
        peft::write_adapter_files(dir, files)?;
        Ok(())
    }

    /// Loads a directory written by [`LlamaModel::save_qat_adapter`] as adapter `name`: the
    /// PEFT files give `A`, `B` and the targets, [`QAT_STATE_FILE`] the `QatConfig`, the mode
    /// and every layer's steps (which replace the ones fitted at construction). Every target
    /// must be an unadapted projection of this model (an NF4 or ggml base is dequantized once,
    /// as in [`LlamaModel::inject_qat_adapters`]); a missing or mis-sized step tensor is an
    /// error naming it, and leaves the model unchanged. Returns the number of layers.
    pub fn load_qat_adapter(&mut self, dir: impl AsRef<Path>, name: &str) -> Result<usize> {
        let dir = dir.as_ref();
        let state = read_qat_state(&dir.join(QAT_STATE_FILE))?;
        let shapes: BTreeMap<String, (usize, usize)> = self
            .linear_modules()
            .into_iter()
            .map(|(path, lin)| (path, (lin.out_features(), lin.in_features())))
            .collect();
        let loaded = peft::load_adapter(dir, &shapes)?;
        self.adapter_targets(&loaded.config, name)?;
        if let Some(extra) = state
            .steps
            .keys()
            .find(|m| !loaded.modules.iter().any(|(module, _)| module == *m))
        {
            return Err(LmError::UnexpectedTensor {
                key: quantizer_step_name(extra),
                file: dir.join(QAT_STATE_FILE),
            });
        }
        let mut built: Vec<(String, LinearModule)> = Vec::with_capacity(loaded.modules.len());
        for (module, weights) in loaded.modules {
            let options = AdapterOptions::from_config(&loaded.config, &module);
            let adapter = LoraAdapter::from_weights(
                weights.a,
                weights.b,
                weights.magnitude,
                &options,
                LoraLinear::<lora_core::DenseBase>::derive_seed(0, &module),
                &module,
            )?;
            let lin = self.linear_module_mut(&module)?;
            let bias = lin.base_bias().map(|b| b.to_owned());
            let weight = dense_weight_for_qat(lin, &module)?;
            let mut layer = LoraQatLinear::with_adapter(
                weight,
                bias,
                adapter,
                &state.config,
                state.mode,
                &module,
            )?;
            state.copy_steps(&mut layer, &module, &dir.join(QAT_STATE_FILE))?;
            built.push((
                module,
                LinearModule::Qat(Box::new(QatLayer::new(name, layer))),
            ));
        }
        self.install_qat_layers(&loaded.config, name, built)
    }

    /// The quantized weight of every LoRA-QAT layer, `Q(W + s·B·A)` with the current steps
    /// (`Q(W)` in the frozen-base mode), in the layouts of `LoraQatLinear::export` under the
    /// module path (`model.layers.0.self_attn.q_proj.qweight`, `.qscale`, `.qzero`,
    /// `.qstate`); written to one safetensors file through a temporary file and a rename.
    /// Returns the number of layers written; a model without LoRA-QAT layers is an error.
    pub fn export_quantized(&mut self, path: impl AsRef<Path>) -> Result<usize> {
        let mut tensors: Vec<(String, OwnedTensor)> = Vec::new();
        let layers = self.qat_layers_mut();
        let count = layers.len();
        if count == 0 {
            return Err(LmError::AdapterState {
                operation: "exporting quantized weights".into(),
                reason: "the model has no LoRA-QAT layer (inject_qat_adapters first)".into(),
            });
        }
        for (module, q) in layers {
            tensors.extend(q.layer_mut().export(&module)?);
        }
        let metadata = [("format".to_string(), "lora-qat.packed".to_string())];
        quant_core::io::write_safetensors(
            path.as_ref(),
            &tensors,
            Some(metadata.into_iter().collect()),
        )?;
        Ok(count)
    }

    /// The gradients of LoRA-QAT adapter `name`'s quantizer steps, under
    /// [`quantizer_step_name`], in model order (besides `adapter_gradients` for `A`, `B`).
    pub fn quantizer_gradients(&self, name: &str) -> Result<Vec<(String, Vec<f32>)>> {
        self.adapter_config(name)?;
        Ok(self
            .linear_modules()
            .into_iter()
            .filter_map(|(path, lin)| match lin {
                LinearModule::Qat(q) if q.name() == name => Some((
                    quantizer_step_name(&path),
                    q.layer().grad_quantizer_params().to_vec(),
                )),
                _ => None,
            })
            .collect())
    }
}

/// The `f32` weight a LoRA-QAT layer is built over: an unadapted projection's weight, copied
/// (so that nothing changes when a later module fails) or dequantized from an NF4 or ggml
/// base. An adapted projection is an error naming `path`.
fn dense_weight_for_qat(lin: &LinearModule, path: &str) -> Result<Array2<f32>> {
    match lin {
        LinearModule::Base(base) => Ok(base.dense_weight()?.into_owned()),
        other => Err(LmError::AdapterState {
            operation: format!("LoRA-QAT on {path}"),
            reason: format!(
                "the projection is {}, not an unadapted base; LoRA-QAT layers are built over \
                 an unadapted projection (dense f32, NF4 or ggml)",
                other.kind()
            ),
        }),
    }
}
