//! LoRA-QAT on the model: a projection whose one adapter trains through a differentiable
//! weight quantizer ([`QatLayer`], wrapping `lora_core::LoraQatLinear`), injected by PEFT's
//! targeting rules, with the quantizer's steps as trainable parameters, a switch for
//! full-precision warm-up, recalibration, PEFT-directory save/load plus the steps beside it,
//! and export of the quantized weights.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use lora_core::peft;
use lora_core::{AdapterOptions, LoraAdapter, LoraConfig, LoraLinear, LoraQatLinear, QatMode};
use ndarray::{Array2, ArrayView2};
use quant_core::config::QatConfig;
use quant_core::io::OwnedTensor;
use quant_core::linalg::gemm;
use quant_core::quantizer::InitMethod;
use safetensors::SafeTensors;

use crate::error::{LmError, Result};
use crate::linear::{AdaptedLayer, LinearModule};
use crate::model::LlamaModel;

/// The file, beside a PEFT adapter directory's own two, that holds the quantizer state of a
/// LoRA-QAT adapter (see `docs/FORMATS.md`).
pub const QAT_STATE_FILE: &str = "qat_quantizers.safetensors";

/// Suffix of a quantizer's step parameter name: `base_model.model.<module>.quantizer.step`.
/// Optimizers select the steps by it (they are not `lora_` tensors).
pub const QUANTIZER_STEP_SUFFIX: &str = ".quantizer.step";

/// The name of the quantizer steps of the module at `path`, as [`LlamaModel::visit_parameters`]
/// reports them and the [`QAT_STATE_FILE`] stores them.
pub fn quantizer_step_name(path: &str) -> String {
    format!("{}{path}{QUANTIZER_STEP_SUFFIX}", peft::KEY_PREFIX)
}

/// A projection trained with LoRA-QAT: one named adapter (`A`, `B`) and a quantizer whose
/// steps train, over the frozen `f32` weight (see `lora_core::qat`).
///
/// As an [`AdaptedLayer`] it holds exactly that adapter: adding a second one is an error, and
/// so is merging in place (the deployed form is [`LlamaModel::export_quantized`] or
/// [`LlamaModel::merge_and_unload`]). When its adapter is not active the projection computes
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
        gemm(1.0, x, w.t(), 0.0, y.view_mut())?;
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
                gemm(1.0, dy, w.view(), 0.0, dx.view_mut())?;
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
        layer.set_fake_quant(true);
        Ok(layer.effective_weight()?)
    }

    /// Replaces `layer`'s quantizer steps with the stored ones of `module`.
    pub(crate) fn copy_steps(&self, layer: &mut LoraQatLinear, module: &str, file: &Path) -> Result<()> {
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

pub(crate) fn read_qat_state(path: &Path) -> Result<QatState> {
    let bytes = std::fs::read(path).map_err(|e| LmError::io(path, e))?;
    let bad = |reason: String| LmError::SafeTensors {
        path: path.to_path_buf(),
        reason,
    };
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
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
    /// be dense `f32` projections; DoRA, and dropout in the merged mode, are refused. Returns
    /// the number of layers; on any error the model is unchanged.
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
        peft::save_adapters(dir, config, modules)?;
        let config_json = serde_json::to_string(&qat).map_err(|e| LmError::Json {
            path: dir.join(QAT_STATE_FILE),
            reason: e.to_string(),
        })?;
        let metadata = [
            ("qat_config".to_string(), config_json),
            ("qat_mode".to_string(), mode_name(mode).to_string()),
            ("format".to_string(), "lora-qat.qat_quantizers".to_string()),
            ("version".to_string(), "1".to_string()),
        ];
        quant_core::io::write_safetensors(
            &dir.join(QAT_STATE_FILE),
            &steps,
            Some(metadata.into_iter().collect()),
        )?;
        Ok(())
    }

    /// Loads a directory written by [`LlamaModel::save_qat_adapter`] as adapter `name`: the
    /// PEFT files give `A`, `B` and the targets, [`QAT_STATE_FILE`] the `QatConfig`, the mode
    /// and every layer's steps (which replace the ones fitted at construction). Every target
    /// must be a dense projection of this model; a missing or mis-sized step tensor is an
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

/// The `f32` weight a LoRA-QAT layer is built over: a dense projection's weight (copied, so
/// that nothing changes when a later module fails). Anything else is an error naming `path`.
fn dense_weight_for_qat(lin: &mut LinearModule, path: &str) -> Result<Array2<f32>> {
    match lin {
        LinearModule::Dense(d) => Ok(d.weight().value().clone()),
        other => Err(LmError::AdapterState {
            operation: format!("LoRA-QAT on {path}"),
            reason: format!(
                "the projection is {}, not a dense f32 weight; LoRA-QAT layers are built over \
                 an unadapted f32 projection",
                other.kind()
            ),
        }),
    }
}
