//! [`AdapterSet`]: adapted layers keyed by module path, and the configs of named adapters.

use std::collections::BTreeMap;

use ndarray::{Array1, Array2};

use crate::adapter::AdapterOptions;
use crate::base::{DenseBase, FrozenBase};
use crate::combine::{combine, Combination, CombinationType};
use crate::config::{InitLoraWeights, LoraConfig, PatternMap};
use crate::error::{LoraError, Result};
use crate::linear::LoraLinear;

/// Parameter counts and memory of a set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SetSummary {
    /// Parameters of the active adapters.
    pub trainable_parameters: usize,
    /// Base parameters and inactive adapters' parameters.
    pub frozen_parameters: usize,
    /// Bytes by storage kind: each base kind (`"f32"`, ...), `"adapter"` (all adapter
    /// weights) and `"adapter_grad"` (their gradients).
    pub bytes_by_kind: BTreeMap<String, usize>,
    /// Number of layers.
    pub layers: usize,
}

impl std::fmt::Display for SetSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total = self.trainable_parameters + self.frozen_parameters;
        write!(
            f,
            "{} layers; trainable params: {} || all params: {} || trainable%: {:.4}",
            self.layers,
            self.trainable_parameters,
            total,
            100.0 * self.trainable_parameters as f64 / total.max(1) as f64
        )?;
        for (kind, bytes) in &self.bytes_by_kind {
            write!(f, "; {kind}: {bytes} B")?;
        }
        Ok(())
    }
}

/// Adapted layers by module path (`model.layers.0.self_attn.q_proj`) and the config of each
/// named adapter. Adapters are created for the layers their config targets.
///
/// ```
/// use lora_core::{AdapterSet, LoraConfig};
/// use lora_core::combine::{Combination, CombinationType};
/// use ndarray::Array2;
///
/// let mut set = AdapterSet::new();
/// for path in ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"] {
///     set.add_module(path, Array2::eye(6), None).unwrap();
/// }
/// let mut config = LoraConfig::new(2, 4.0, &["q_proj", "v_proj"]);
/// config.init_lora_weights = lora_core::InitLoraWeights::Random;
/// set.add_adapter("a", config.clone(), 1).unwrap();
/// set.add_adapter("b", config, 2).unwrap();
/// set.add_weighted_adapter(&["a", "b"], &[0.5, 0.5], "ab", &Combination::new(CombinationType::Cat)).unwrap();
/// set.set_active(&["ab"]).unwrap();
/// assert_eq!(set.config("ab").unwrap().r, 4);
/// set.merge_all().unwrap();
/// set.unmerge_all().unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct AdapterSet<B: FrozenBase = DenseBase> {
    layers: BTreeMap<String, LoraLinear<B>>,
    configs: BTreeMap<String, LoraConfig>,
    active: Vec<String>,
}

impl Default for AdapterSet<DenseBase> {
    fn default() -> Self {
        Self::new()
    }
}

impl AdapterSet<DenseBase> {
    /// An empty set over dense `f32` bases.
    pub fn new() -> Self {
        AdapterSet {
            layers: BTreeMap::new(),
            configs: BTreeMap::new(),
            active: Vec::new(),
        }
    }

    /// Adds a module with base weight `(out, in)` and optional bias.
    pub fn add_module(
        &mut self,
        module_path: &str,
        weight: Array2<f32>,
        bias: Option<Array1<f32>>,
    ) -> Result<()> {
        self.insert_layer(module_path, LoraLinear::dense(weight, bias, module_path)?)
    }
}

impl<B: FrozenBase + Clone> AdapterSet<B> {
    /// An empty set over bases of type `B`.
    pub fn with_base() -> Self {
        AdapterSet {
            layers: BTreeMap::new(),
            configs: BTreeMap::new(),
            active: Vec::new(),
        }
    }

    /// Adds a layer under `module_path`.
    pub fn insert_layer(&mut self, module_path: &str, layer: LoraLinear<B>) -> Result<()> {
        if self.layers.contains_key(module_path) {
            return Err(LoraError::option(
                "module path",
                module_path,
                "is already in the set",
            ));
        }
        self.layers.insert(module_path.to_string(), layer);
        Ok(())
    }

    /// The layer at `module_path`.
    pub fn layer(&self, module_path: &str) -> Result<&LoraLinear<B>> {
        self.layers
            .get(module_path)
            .ok_or_else(|| LoraError::UnknownModule {
                module: module_path.to_string(),
            })
    }

    /// The layer at `module_path`, mutably (forward/backward, optimizer steps).
    pub fn layer_mut(&mut self, module_path: &str) -> Result<&mut LoraLinear<B>> {
        self.layers
            .get_mut(module_path)
            .ok_or_else(|| LoraError::UnknownModule {
                module: module_path.to_string(),
            })
    }

    /// All layers, by module path.
    pub fn layers(&self) -> impl Iterator<Item = (&str, &LoraLinear<B>)> {
        self.layers.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// All layers, mutably.
    pub fn layers_mut(&mut self) -> impl Iterator<Item = (&str, &mut LoraLinear<B>)> {
        self.layers.iter_mut().map(|(k, v)| (k.as_str(), v))
    }

    /// `(out, in)` of every layer, by module path.
    pub fn shapes(&self) -> BTreeMap<String, (usize, usize)> {
        self.layers
            .iter()
            .map(|(k, v)| (k.clone(), v.shape()))
            .collect()
    }

    /// The config of a named adapter.
    pub fn config(&self, name: &str) -> Result<&LoraConfig> {
        self.configs.get(name).ok_or_else(|| self.unknown(name))
    }

    /// Names of all adapters.
    pub fn adapter_names(&self) -> Vec<String> {
        self.configs.keys().cloned().collect()
    }

    /// The active adapter names.
    pub fn active(&self) -> &[String] {
        &self.active
    }

    /// The module paths a named adapter lives on.
    pub fn modules_of(&self, name: &str) -> Vec<String> {
        self.layers
            .iter()
            .filter(|(_, l)| l.adapter(name).is_ok())
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn unknown(&self, name: &str) -> LoraError {
        LoraError::UnknownAdapter {
            name: name.to_string(),
            context: "the adapter set".into(),
            known: self.adapter_names(),
        }
    }

    /// Creates adapter `name` on every layer `config` targets, from `seed` (each layer draws
    /// from its own stream derived from the seed and its path). Returns how many layers got
    /// it; targeting none is an error, as in PEFT. The first adapter becomes active.
    pub fn add_adapter(&mut self, name: &str, config: LoraConfig, seed: u64) -> Result<usize> {
        config.validate()?;
        if self.configs.contains_key(name) {
            return Err(LoraError::DuplicateAdapter {
                name: name.to_string(),
                context: "the adapter set".into(),
            });
        }
        let targets: Vec<String> = self
            .layers
            .keys()
            .filter(|k| config.matches(k))
            .cloned()
            .collect();
        if targets.is_empty() {
            return Err(LoraError::option(
                "target_modules",
                format!("{:?}", config.target_modules),
                format!(
                    "matches none of the {} modules in the set",
                    self.layers.len()
                ),
            ));
        }
        // Validate every layer first so that a failure leaves the set unchanged.
        for path in &targets {
            let (out_features, in_features) = self.layers[path].shape();
            AdapterOptions::from_config(&config, path).validate(out_features, in_features, path)?;
        }
        // LoftQ replaces each base weight by deq(Q): keep the originals to roll back.
        let loftq = matches!(config.init_lora_weights, InitLoraWeights::Loftq { .. });
        let mut originals = Vec::new();
        for path in &targets {
            let options = AdapterOptions::from_config(&config, path);
            let layer_seed = LoraLinear::<B>::derive_seed(seed, path);
            let Some(layer) = self.layers.get_mut(path) else {
                continue;
            };
            if loftq {
                originals.push((path.clone(), layer.base().dense_weight()?.into_owned()));
            }
            if let Err(e) = layer.add_adapter(name, &options, layer_seed) {
                self.remove_from_layers(name, config.init_lora_weights == InitLoraWeights::Pissa);
                for (path, weight) in originals {
                    if let Some(layer) = self.layers.get_mut(&path) {
                        layer.restore_base_weight(weight);
                    }
                }
                return Err(e);
            }
        }
        self.register(name, config);
        Ok(targets.len())
    }

    /// Rolls back a partly created adapter; PiSSA's residuals are given back to the bases.
    fn remove_from_layers(&mut self, name: &str, pissa: bool) {
        for layer in self.layers.values_mut() {
            if layer.adapter(name).is_err() {
                continue;
            }
            // The adapter exists on this layer, so removal cannot fail on its name; a base
            // that refused W edits would have refused PiSSA in the first place.
            let _ = if pissa {
                layer.remove_pissa_adapter(name)
            } else {
                layer.remove_adapter(name).map(|_| ())
            };
        }
    }

    /// Records `config` for an adapter already inserted into its layers.
    pub(crate) fn register(&mut self, name: &str, config: LoraConfig) {
        self.configs.insert(name.to_string(), config);
        if self.active.is_empty() {
            self.active = vec![name.to_string()];
        }
        self.sync_active();
    }

    fn sync_active(&mut self) {
        let active = self.active.clone();
        for layer in self.layers.values_mut() {
            let present: Vec<&str> = active
                .iter()
                .filter(|n| layer.adapter(n).is_ok())
                .map(|s| s.as_str())
                .collect();
            // Names were just filtered to those the layer holds, so this cannot fail on them;
            // it can only fail on unmerging, which merge/unmerge keep consistent.
            let _ = layer.set_active(&present);
        }
    }

    /// Makes `names` the active adapters on every layer (unmerging first, like PEFT).
    pub fn set_active(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            self.config(n)?;
        }
        for layer in self.layers.values_mut() {
            if layer.is_merged() {
                layer.unmerge()?;
            }
        }
        self.active = names.iter().map(|s| s.to_string()).collect();
        self.sync_active();
        Ok(())
    }

    /// Every layer computes its base alone.
    pub fn disable(&mut self) -> Result<()> {
        for layer in self.layers.values_mut() {
            layer.disable_adapters()?;
        }
        Ok(())
    }

    /// Re-enables the active adapters.
    pub fn enable(&mut self) {
        for layer in self.layers.values_mut() {
            layer.enable_adapters();
        }
    }

    /// Training mode (dropout on) or evaluation mode on every layer.
    pub fn set_training(&mut self, training: bool) {
        for layer in self.layers.values_mut() {
            layer.set_training(training);
        }
    }

    /// Zeroes every adapter gradient.
    pub fn zero_grad(&mut self) {
        for layer in self.layers.values_mut() {
            layer.zero_grad();
        }
    }

    /// Merges the active adapters into every layer's base.
    pub fn merge_all(&mut self) -> Result<()> {
        for layer in self.layers.values_mut() {
            layer.merge()?;
        }
        Ok(())
    }

    /// Undoes [`AdapterSet::merge_all`].
    pub fn unmerge_all(&mut self) -> Result<()> {
        for layer in self.layers.values_mut() {
            layer.unmerge()?;
        }
        Ok(())
    }

    /// Removes a named adapter from every layer and the set.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.config(name)?;
        for layer in self.layers.values_mut() {
            if layer.adapter(name).is_ok() {
                layer.remove_adapter(name)?;
            }
        }
        self.configs.remove(name);
        self.active.retain(|n| n != name);
        Ok(())
    }

    /// Parameter counts and memory by kind.
    pub fn summary(&self) -> SetSummary {
        let mut s = SetSummary {
            layers: self.layers.len(),
            ..SetSummary::default()
        };
        let f32_bytes = std::mem::size_of::<f32>();
        for layer in self.layers.values() {
            let trainable = layer.trainable_parameters();
            let adapters = layer.total_parameters() - layer.base().parameter_count();
            s.trainable_parameters += trainable;
            s.frozen_parameters += layer.total_parameters() - trainable;
            *s.bytes_by_kind
                .entry(layer.base().storage_kind().to_string())
                .or_default() += layer.base().storage_bytes();
            *s.bytes_by_kind.entry("adapter".into()).or_default() += adapters * f32_bytes;
            *s.bytes_by_kind.entry("adapter_grad".into()).or_default() += adapters * f32_bytes;
        }
        s
    }

    /// Creates adapter `new_name` combining `adapters` with `weights` on every layer where all
    /// of them exist (PEFT's `add_weighted_adapter`; semantics in [`crate::combine`]). The new
    /// adapter's config is the first adapter's with the new rank, `α = r` (scale 1), no
    /// rsLoRA and the union of target modules; layers whose rank differs get an exact-path
    /// `rank_pattern`/`alpha_pattern` entry so the config describes the files it saves.
    pub fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        new_name: &str,
        combination: &Combination,
    ) -> Result<()> {
        if adapters.len() != weights.len() {
            return Err(LoraError::shape(
                "add_weighted_adapter weights",
                adapters.len(),
                weights.len(),
            ));
        }
        if self.configs.contains_key(new_name) {
            return Err(LoraError::DuplicateAdapter {
                name: new_name.to_string(),
                context: "the adapter set".into(),
            });
        }
        let mut configs = Vec::new();
        for name in adapters {
            configs.push(self.config(name)?.clone());
        }
        // One adapter: PEFT falls back to linear.
        let mut combination = combination.clone();
        if adapters.len() == 1 {
            combination.kind = CombinationType::Linear;
        }
        let mut combined = Vec::new();
        for (path, layer) in &self.layers {
            let present: Vec<_> = adapters
                .iter()
                .zip(weights)
                .filter_map(|(n, &w)| layer.adapter(n).ok().map(|a| (a, w)))
                .collect();
            if present.len() != adapters.len() {
                continue;
            }
            let seed = LoraLinear::<B>::derive_seed(combination.seed, path);
            combined.push((path.clone(), combine(&present, &combination, seed, path)?));
        }
        if combined.is_empty() {
            return Err(LoraError::option(
                "adapters",
                format!("{adapters:?}"),
                "no layer holds all of them",
            ));
        }
        let mut config = configs[0].clone();
        let first_rank = combined[0].1.rank();
        config.r = first_rank;
        config.lora_alpha = first_rank as f64;
        config.use_rslora = false;
        config.use_dora = false;
        config.rank_pattern = PatternMap::default();
        config.alpha_pattern = PatternMap::default();
        for (path, adapter) in &combined {
            if adapter.rank() != first_rank {
                let key = regex::escape(path);
                config.rank_pattern.0.push((key.clone(), adapter.rank()));
                config.alpha_pattern.0.push((key, adapter.rank() as f64));
            }
        }
        let mut names: Vec<String> = Vec::new();
        for c in &configs {
            match &c.target_modules {
                Some(crate::config::TargetModules::Names(list)) => {
                    names.extend(list.iter().cloned())
                }
                _ => {
                    names.clear();
                    break;
                }
            }
        }
        names.sort();
        names.dedup();
        config.target_modules = Some(if names.is_empty() {
            let alternatives: Vec<String> =
                combined.iter().map(|(p, _)| regex::escape(p)).collect();
            crate::config::TargetModules::Regex(alternatives.join("|"))
        } else {
            crate::config::TargetModules::Names(names)
        });
        for (path, adapter) in combined {
            self.layers
                .get_mut(&path)
                .expect("paths come from the map")
                .insert_adapter(new_name, adapter)?;
        }
        self.register(new_name, config);
        Ok(())
    }

    /// Inserts adapter `name` with `config` from per-module adapters (used by the loader).
    pub(crate) fn insert_adapter_layers(
        &mut self,
        name: &str,
        config: LoraConfig,
        adapters: Vec<(String, crate::adapter::LoraAdapter)>,
    ) -> Result<()> {
        if self.configs.contains_key(name) {
            return Err(LoraError::DuplicateAdapter {
                name: name.to_string(),
                context: "the adapter set".into(),
            });
        }
        for (path, _) in &adapters {
            self.layer(path)?;
        }
        for (path, adapter) in adapters {
            self.layers
                .get_mut(&path)
                .expect("checked above")
                .insert_adapter(name, adapter)?;
        }
        self.register(name, config);
        Ok(())
    }
}
