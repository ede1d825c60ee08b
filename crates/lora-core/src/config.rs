//! [`LoraConfig`]: PEFT's `adapter_config.json`, read and written field for field.
//!
//! PEFT's file carries dozens of fields, most of them for methods this crate does not
//! implement. Reading keeps every field it does not model in [`LoraConfig::extra`] and writes
//! them back unchanged, so a file read and written again still loads in PEFT. Fields that
//! would change what the adapter computes if set (`lora_bias`, `layers_to_transform`,
//! `modules_to_save`, ...) are checked by [`LoraConfig::validate`], which names the option it
//! cannot honour instead of silently computing something else.

use std::fmt;

use regex::Regex;
use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::error::{LoraError, Result};

/// How the adapter matrices start (PEFT's `init_lora_weights`).
///
/// The enum is open (`non_exhaustive`): other data-dependent initialisations are added as
/// variants once their algorithms exist.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub enum InitLoraWeights {
    /// `true`, PEFT's default: `A` as torch's `nn.Linear` default, Kaiming-uniform with
    /// `a = √5`, which is `U(−1/√in, 1/√in)`; `B = 0`, so the adapter starts as a no-op.
    #[default]
    Kaiming,
    /// `"gaussian"`: `A ~ N(0, (1/r)²)` (PEFT uses `std = 1/r`), `B = 0`.
    Gaussian,
    /// `"pissa"`: the principal singular triplets of `W` move into the adapter
    /// (`s·B·A = U_r S_r V_rᵀ`) and the base keeps the residual `W − s·B·A`.
    Pissa,
    /// `"loftq"`: LoftQ (Li et al., 2023) as PEFT's `LoraLayer.loftq_init` computes it, with
    /// `loftq_bits`/`loftq_iter` from the file's `loftq_config` (filled in by
    /// [`crate::AdapterOptions::from_config`]; a bare `"loftq"` reads as 4 bits, 1 iteration):
    /// alternately NF4-quantize `W − B·A` (blocksize 64, no double quantization, as PEFT's
    /// `Params4bit`) and take the rank-`r` SVD of `W − deq(Q)`; then `lora_A = √S·Vᵀ`,
    /// `lora_B = U·√S` (unscaled, as PEFT assigns them) and the base weight becomes `deq(Q)`.
    Loftq {
        /// Bits of the base quantization (only 4 is supported).
        loftq_bits: u32,
        /// Alternations of quantization and SVD (≥ 1).
        loftq_iter: usize,
    },
    /// `false`: both matrices keep torch's `nn.Linear` default, `A ~ U(±1/√in)`,
    /// `B ~ U(±1/√r)`, so the adapter is non-zero from the start (useful for tests).
    Random,
    /// Any other value PEFT knows (`"olora"`, `"pissa_niter_16"`, ...). A file with
    /// it loads (its weights are given); creating a fresh adapter with it is an error.
    Other(String),
}

impl Serialize for InitLoraWeights {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            InitLoraWeights::Kaiming => serializer.serialize_bool(true),
            InitLoraWeights::Random => serializer.serialize_bool(false),
            InitLoraWeights::Gaussian => serializer.serialize_str("gaussian"),
            InitLoraWeights::Pissa => serializer.serialize_str("pissa"),
            InitLoraWeights::Loftq { .. } => serializer.serialize_str("loftq"),
            InitLoraWeights::Other(name) => serializer.serialize_str(name),
        }
    }
}

impl<'de> Deserialize<'de> for InitLoraWeights {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::Bool(true) => Ok(InitLoraWeights::Kaiming),
            Value::Bool(false) => Ok(InitLoraWeights::Random),
            Value::String(s) => Ok(match s.to_ascii_lowercase().as_str() {
                "gaussian" => InitLoraWeights::Gaussian,
                "pissa" => InitLoraWeights::Pissa,
                "loftq" => InitLoraWeights::Loftq {
                    loftq_bits: default_loftq_bits(),
                    loftq_iter: default_loftq_iter(),
                },
                _ => InitLoraWeights::Other(s),
            }),
            other => Err(de::Error::custom(format!(
                "init_lora_weights must be true, false or a method name, got {other}"
            ))),
        }
    }
}

fn default_loftq_bits() -> u32 {
    4
}
fn default_loftq_iter() -> usize {
    1
}

/// PEFT's `loftq_config` (`LoftQConfig`): read when `init_lora_weights` is `"loftq"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoftqSettings {
    /// Quantization bits (PEFT default 4).
    #[serde(default = "default_loftq_bits")]
    pub loftq_bits: u32,
    /// Alternating iterations (PEFT default 1).
    #[serde(default = "default_loftq_iter")]
    pub loftq_iter: usize,
}

/// `loftq_config` as PEFT writes it: `{}` when unused.
fn read_loftq_config<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Option<LoftqSettings>, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::Null => Ok(None),
        Value::Object(map) if map.is_empty() => Ok(None),
        other => serde_json::from_value(other)
            .map(Some)
            .map_err(|e| de::Error::custom(format!("loftq_config: {e}"))),
    }
}

fn write_loftq_config<S: Serializer>(
    value: &Option<LoftqSettings>,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    match value {
        Some(settings) => settings.serialize(serializer),
        None => serializer.serialize_map(Some(0))?.end(),
    }
}

/// PEFT's `target_modules` (and `exclude_modules`): a list of names or one regular expression.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// A single string: the whole module path must match it as a regular expression.
    Regex(String),
    /// A list: a module matches a name when the path equals it or ends with `.` + name.
    Names(Vec<String>),
}

impl TargetModules {
    /// Whether `module_path` is selected, with PEFT's semantics. An invalid regular expression
    /// selects nothing ([`LoraConfig::validate`] reports it).
    pub fn matches(&self, module_path: &str) -> bool {
        match self {
            TargetModules::Regex(pattern) => Regex::new(&format!("^(?:{pattern})$"))
                .map(|re| re.is_match(module_path))
                .unwrap_or(false),
            TargetModules::Names(names) => names.iter().any(|name| {
                module_path == name
                    || (module_path.len() > name.len()
                        && module_path.ends_with(name.as_str())
                        && module_path.as_bytes()[module_path.len() - name.len() - 1] == b'.')
            }),
        }
    }
}

/// An ordered map from key patterns to values (`rank_pattern`, `alpha_pattern`). PEFT takes the
/// first key, in file order, that matches, so the order is kept. `null` reads as empty.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PatternMap<T>(pub Vec<(String, T)>);

impl<T> PatternMap<T> {
    /// The value of the first pattern that matches `module_path` the way PEFT's
    /// `get_pattern_key` does: `re.match(r"(.*\.)?(KEY)$", module_path)`.
    pub fn lookup(&self, module_path: &str) -> Option<&T> {
        self.0.iter().find_map(|(key, value)| {
            Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
                .ok()
                .filter(|re| re.is_match(module_path))
                .map(|_| value)
        })
    }
}

impl<T: Serialize> Serialize for PatternMap<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for PatternMap<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct OrderedVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for OrderedVisitor<T> {
            type Value = PatternMap<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map from module-name patterns to values, or null")
            }
            fn visit_unit<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
                Ok(PatternMap(Vec::new()))
            }
            fn visit_none<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
                Ok(PatternMap(Vec::new()))
            }
            fn visit_some<D: Deserializer<'de>>(
                self,
                d: D,
            ) -> std::result::Result<Self::Value, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut access: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = access.next_entry::<String, T>()? {
                    entries.push((k, v));
                }
                Ok(PatternMap(entries))
            }
        }
        deserializer.deserialize_any(OrderedVisitor(std::marker::PhantomData))
    }
}

fn default_peft_type() -> String {
    "LORA".to_string()
}
fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_bias() -> String {
    "none".to_string()
}

/// Writes a whole-number float as a JSON integer (`8`, not `8.0`), as PEFT's files have it.
fn write_number<S: Serializer>(v: &f64, serializer: S) -> std::result::Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        serializer.serialize_i64(*v as i64)
    } else {
        serializer.serialize_f64(*v)
    }
}

/// A LoRA adapter's configuration, compatible with PEFT's `adapter_config.json`.
///
/// ```
/// use lora_core::config::{LoraConfig, TargetModules};
///
/// let json = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8,
///                "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM",
///                "rank_pattern": {"layers.0.self_attn.q_proj": 2}}"#;
/// let config: LoraConfig = serde_json::from_str(json).unwrap();
/// config.validate().unwrap();
/// assert!(config.matches("model.layers.0.self_attn.q_proj"));
/// assert!(!config.matches("model.layers.0.self_attn.k_proj"));
/// assert_eq!(config.rank_for("model.layers.0.self_attn.q_proj"), 2);
/// assert_eq!(config.rank_for("model.layers.1.self_attn.q_proj"), 4);
/// assert_eq!(config.scale_for("model.layers.1.self_attn.q_proj"), 2.0);
/// // Fields this crate does not model survive a round trip.
/// let again = serde_json::to_string(&config).unwrap();
/// assert!(again.contains("\"task_type\":\"CAUSAL_LM\""));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Always `"LORA"` for this crate.
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    /// The adapter rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// The scaling numerator: `s = α/r`, or `α/√r` with rsLoRA.
    #[serde(default = "default_alpha", serialize_with = "write_number")]
    pub lora_alpha: f64,
    /// Dropout probability on the adapter's input, in `[0, 1)`.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which modules get an adapter.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Which modules never get one, even if targeted.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// The base weight is stored `(in, out)` (GPT-2's `Conv1D`); adapters keep PEFT's layout.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// rsLoRA: `s = α/√r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA: a trainable per-output-row magnitude over the normalised adapted weight.
    #[serde(default)]
    pub use_dora: bool,
    /// Which biases train; only `"none"` is supported.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// Per-module rank overrides.
    #[serde(default)]
    pub rank_pattern: PatternMap<usize>,
    /// Per-module alpha overrides.
    #[serde(default)]
    pub alpha_pattern: PatternMap<f64>,
    /// How a fresh adapter starts.
    #[serde(default)]
    pub init_lora_weights: InitLoraWeights,
    /// LoftQ's settings (`init_lora_weights: "loftq"` only); written `{}` when `None`.
    #[serde(
        default,
        deserialize_with = "read_loftq_config",
        serialize_with = "write_loftq_config"
    )]
    pub loftq_config: Option<LoftqSettings>,
    /// Every other field of the file, kept verbatim.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            peft_type: default_peft_type(),
            r: default_r(),
            lora_alpha: default_alpha(),
            lora_dropout: 0.0,
            target_modules: None,
            exclude_modules: None,
            fan_in_fan_out: false,
            use_rslora: false,
            use_dora: false,
            bias: default_bias(),
            rank_pattern: PatternMap::default(),
            alpha_pattern: PatternMap::default(),
            init_lora_weights: InitLoraWeights::default(),
            loftq_config: None,
            extra: serde_json::Map::new(),
        }
    }
}

/// Options of PEFT's file that change what the adapter computes when set; each must be
/// absent, `null`, `false` or empty for this crate to compute what PEFT would.
const MUST_BE_UNSET: &[&str] = &[
    "lora_bias",
    "layers_to_transform",
    "layer_replication",
    "modules_to_save",
    "use_qalora",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_bdlora",
    "megatron_config",
];

fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

impl LoraConfig {
    /// A config with rank `r`, scaling numerator `lora_alpha` and the given target names.
    ///
    /// ```
    /// let c = lora_core::LoraConfig::new(8, 16.0, &["q_proj", "v_proj"]);
    /// assert_eq!(c.scale_for("model.layers.0.self_attn.q_proj"), 2.0);
    /// ```
    pub fn new(r: usize, lora_alpha: f64, target_modules: &[&str]) -> Self {
        LoraConfig {
            r,
            lora_alpha,
            target_modules: Some(TargetModules::Names(
                target_modules.iter().map(|s| s.to_string()).collect(),
            )),
            ..LoraConfig::default()
        }
    }

    /// Checks every option; the error names the first bad one.
    ///
    /// ```
    /// let mut c = lora_core::LoraConfig::new(8, 16.0, &["q_proj"]);
    /// c.bias = "all".into();
    /// assert!(c.validate().unwrap_err().to_string().contains("bias"));
    /// ```
    pub fn validate(&self) -> Result<()> {
        if self.peft_type != "LORA" {
            return Err(LoraError::option(
                "peft_type",
                &self.peft_type,
                "only LORA adapters are supported",
            ));
        }
        check_rank("r", self.r)?;
        check_alpha("lora_alpha", self.lora_alpha)?;
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(LoraError::option(
                "lora_dropout",
                self.lora_dropout,
                "must be in [0, 1)",
            ));
        }
        if self.bias != "none" {
            return Err(LoraError::option(
                "bias",
                format!("{:?}", self.bias),
                "only \"none\" is supported (biases stay frozen)",
            ));
        }
        match &self.target_modules {
            None => {
                return Err(LoraError::option(
                    "target_modules",
                    "null",
                    "must be given (PEFT's per-architecture defaults are not known here)",
                ))
            }
            Some(t) => check_targets("target_modules", t)?,
        }
        if let Some(t) = &self.exclude_modules {
            check_targets("exclude_modules", t)?;
        }
        for (key, r) in &self.rank_pattern.0 {
            check_pattern("rank_pattern", key)?;
            check_rank(&format!("rank_pattern[{key:?}]"), *r)?;
        }
        for (key, a) in &self.alpha_pattern.0 {
            check_pattern("alpha_pattern", key)?;
            check_alpha(&format!("alpha_pattern[{key:?}]"), *a)?;
        }
        match (&self.init_lora_weights, &self.loftq_config) {
            (InitLoraWeights::Loftq { .. }, None) => {
                return Err(LoraError::option(
                    "loftq_config",
                    "{}",
                    "must give loftq_bits and loftq_iter when init_lora_weights is \"loftq\"",
                ))
            }
            (InitLoraWeights::Loftq { .. }, Some(settings)) => {
                if settings.loftq_bits != 4 {
                    return Err(LoraError::option(
                        "loftq_config.loftq_bits",
                        settings.loftq_bits,
                        "only 4-bit (NF4) LoftQ is supported",
                    ));
                }
                if settings.loftq_iter == 0 {
                    return Err(LoraError::option(
                        "loftq_config.loftq_iter",
                        0,
                        "must be at least 1",
                    ));
                }
            }
            (_, Some(settings)) => {
                return Err(LoraError::option(
                    "loftq_config",
                    format!("{settings:?}"),
                    "is set but init_lora_weights is not \"loftq\"",
                ))
            }
            (_, None) => {}
        }
        for &name in MUST_BE_UNSET {
            if let Some(v) = self.extra.get(name) {
                if !is_unset(v) {
                    return Err(LoraError::option(
                        name,
                        v,
                        "is not supported by lora-core (it must be null, false or empty)",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether `module_path` gets an adapter: targeted and not excluded.
    pub fn matches(&self, module_path: &str) -> bool {
        let targeted = self
            .target_modules
            .as_ref()
            .is_some_and(|t| t.matches(module_path));
        let excluded = self
            .exclude_modules
            .as_ref()
            .is_some_and(|t| t.matches(module_path));
        targeted && !excluded
    }

    /// The rank for `module_path`: the first matching `rank_pattern` entry, else `r`.
    pub fn rank_for(&self, module_path: &str) -> usize {
        self.rank_pattern
            .lookup(module_path)
            .copied()
            .unwrap_or(self.r)
    }

    /// The alpha for `module_path`: the first matching `alpha_pattern` entry, else
    /// `lora_alpha`.
    pub fn alpha_for(&self, module_path: &str) -> f64 {
        self.alpha_pattern
            .lookup(module_path)
            .copied()
            .unwrap_or(self.lora_alpha)
    }

    /// The scale `s` for `module_path`: `α/r`, or `α/√r` with rsLoRA.
    pub fn scale_for(&self, module_path: &str) -> f64 {
        scale(
            self.alpha_for(module_path),
            self.rank_for(module_path),
            self.use_rslora,
        )
    }
}

/// `α/r`, or `α/√r` for rsLoRA.
pub fn scale(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

fn check_rank(option: &str, r: usize) -> Result<()> {
    if r == 0 {
        Err(LoraError::option(option, r, "the rank must be at least 1"))
    } else {
        Ok(())
    }
}

fn check_alpha(option: &str, alpha: f64) -> Result<()> {
    if alpha.is_finite() && alpha > 0.0 {
        Ok(())
    } else {
        Err(LoraError::option(
            option,
            alpha,
            "alpha must be finite and > 0",
        ))
    }
}

fn check_pattern(option: &str, key: &str) -> Result<()> {
    Regex::new(key)
        .map(|_| ())
        .map_err(|e| LoraError::option(option, format!("{key:?}"), format!("bad regex: {e}")))
}

fn check_targets(option: &str, targets: &TargetModules) -> Result<()> {
    match targets {
        TargetModules::Regex(pattern) => check_pattern(option, pattern),
        TargetModules::Names(names) if names.is_empty() => Err(LoraError::option(
            option,
            "[]",
            "the list selects no module",
        )),
        TargetModules::Names(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests;
