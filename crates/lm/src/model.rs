//! `LlamaForCausalLM`: parameters, loading and saving, the training forward pass that keeps
//! what backward needs, and the backward pass through every layer.

use std::collections::BTreeMap;
use std::path::Path;

use lora_core::LoraConfig;

use ndarray::{s, Array1, Array2, Array3, ArrayView2, ArrayView3, Axis, Ix1, Ix2};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::checkpoint::{save_f32_safetensors, write_atomically, Checkpoint};
use crate::config::LlamaConfig;
use crate::error::{check_finite_at, LmError, Result};
use crate::layers::{
    attention_backward, attention_forward, rms_norm_apply, rms_norm_backward, rms_norm_forward,
    swiglu_backward, swiglu_forward, AttentionShape, RopeTable,
};
use crate::linear::{DenseLinear, LinearModule};
use crate::loss::cross_entropy;
use crate::param::{ParamMut, Parameter};

/// The linear projections of a decoder layer, by their path below `model.layers.{i}`.
pub const LAYER_LINEAR_NAMES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Builds the linear module at a path (`model.layers.0.self_attn.q_proj`, `lm_head`) of shape
/// `(out, in)` from checkpoint tensors, taking (removing) what it uses.
pub type LinearLoader<'a> =
    dyn FnMut(&str, [usize; 2], &mut Checkpoint) -> Result<LinearModule> + 'a;

/// One decoder layer: pre-norm attention and pre-norm SwiGLU MLP, each with a residual.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderLayer {
    pub input_layernorm: Parameter<Ix1>,
    pub post_attention_layernorm: Parameter<Ix1>,
    pub q_proj: LinearModule,
    pub k_proj: LinearModule,
    pub v_proj: LinearModule,
    pub o_proj: LinearModule,
    pub gate_proj: LinearModule,
    pub up_proj: LinearModule,
    pub down_proj: LinearModule,
}

impl DecoderLayer {
    /// The seven projections with their names from [`LAYER_LINEAR_NAMES`].
    pub fn linears_mut(&mut self) -> [(&'static str, &mut LinearModule); 7] {
        let [q, k, v, o, g, u, d] = LAYER_LINEAR_NAMES;
        [
            (q, &mut self.q_proj),
            (k, &mut self.k_proj),
            (v, &mut self.v_proj),
            (o, &mut self.o_proj),
            (g, &mut self.gate_proj),
            (u, &mut self.up_proj),
            (d, &mut self.down_proj),
        ]
    }

    pub(crate) fn linears(&self) -> [(&'static str, &LinearModule); 7] {
        let [q, k, v, o, g, u, d] = LAYER_LINEAR_NAMES;
        [
            (q, &self.q_proj),
            (k, &self.k_proj),
            (v, &self.v_proj),
            (o, &self.o_proj),
            (g, &self.gate_proj),
            (u, &self.up_proj),
            (d, &self.down_proj),
        ]
    }
}

/// A Llama-architecture causal language model (`LlamaForCausalLM`).
///
/// Parameters start **frozen** (no gradient buffers): call
/// [`LlamaModel::set_base_trainable`] to train them. A training step is
/// [`LlamaModel::forward`] → [`cross_entropy`] → [`LlamaModel::backward`], or
/// [`LlamaModel::loss_and_backward`] for all three.
///
/// ```
/// use lm::{LlamaConfig, LlamaModel};
/// use ndarray::array;
/// let config = LlamaConfig::new(32, 16, 32, 2, 4, 2).unwrap();
/// let mut model = LlamaModel::random(config, 7).unwrap();
/// model.set_base_trainable(true);
/// let ids = array![[1u32, 5, 9, 3]];
/// let labels = array![[1i64, 5, 9, 3]];
/// let loss = model.loss_and_backward(ids.view(), labels.view(), None).unwrap();
/// assert!((loss - 32f32.ln()).abs() < 0.1, "a random init is close to uniform: {loss}");
/// let mut grads = 0;
/// model.visit_parameters(|_, p| { grads += p.grad.is_some() as usize; Ok(()) }).unwrap();
/// assert_eq!(grads, 1 + 2 * 9 + 1 + 1);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaModel {
    pub(crate) config: LlamaConfig,
    pub(crate) embed_tokens: Parameter<Ix2>,
    pub(crate) layers: Vec<DecoderLayer>,
    pub(crate) norm: Parameter<Ix1>,
    /// `None` when the embeddings are tied: the head multiplies by `embed_tokens`.
    pub(crate) lm_head: Option<LinearModule>,
    /// The config of every adapter injected or loaded, by adapter name.
    pub(crate) adapter_configs: BTreeMap<String, LoraConfig>,
    /// The adapters every adapted module computes (those of them it holds).
    pub(crate) active_adapters: Vec<String>,
    /// Training mode: adapter dropout is drawn in [`LlamaModel::forward`].
    pub(crate) training: bool,
    pub(crate) passes: PassCounter,
}

/// Counts forward passes, so that a backward can check that the adapter layers (which keep
/// their last input) still hold the inputs of the pass it is given. Bookkeeping, not model
/// state: models compare equal whatever their counts.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PassCounter(pub(crate) u64);

impl PartialEq for PassCounter {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// What one decoder layer's forward keeps for its backward. The two norms' outputs (from
/// their input and `rstd`) and the SwiGLU product `silu(gate)⊙up` are one elementwise pass
/// each, so backward recomputes them instead of keeping them.
#[derive(Debug)]
struct LayerActivations {
    rstd_attn: Vec<f32>,
    /// `q | k | v` after RoPE, `(tokens, (heads + 2·kv_heads)·head_dim)`.
    qkv: Array2<f32>,
    probs: Array3<f32>,
    attn_out: Array2<f32>,
    residual_mid: Array2<f32>,
    rstd_mlp: Vec<f32>,
    /// `gate | up` before the activation, `(tokens, 2·intermediate)`.
    gate_up: Array2<f32>,
}

/// The logits of a forward pass and everything [`LlamaModel::backward`] needs.
#[derive(Debug)]
pub struct ForwardPass {
    /// Which forward of the model this is (see [`PassCounter`]).
    serial: u64,
    batch: usize,
    seq: usize,
    input_ids: Vec<u32>,
    /// The residual stream entering each layer, then the one entering the final norm.
    residuals: Vec<Array2<f32>>,
    layers: Vec<LayerActivations>,
    rstd_final: Vec<f32>,
    normed_final: Array2<f32>,
    logits: Array3<f32>,
    /// Outputs of the layers asked for in an evaluation forward (which keeps no residuals).
    recorded: Vec<(usize, Array2<f32>)>,
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

/// The buffers a layer's forward works in, named by what they hold.
struct LayerDims {
    tokens: usize,
    hidden: usize,
    q_width: usize,
    kv_width: usize,
    intermediate: usize,
}

impl LlamaModel {
    /// Reads `config.json` and `model.safetensors` (or a sharded index) from `dir`. A
    /// bitsandbytes 4-bit checkpoint (`quantization_config` with `quant_method:
    /// "bitsandbytes"`, `load_in_4bit`, NF4) loads its quantized projections as frozen NF4
    /// bases ([`LinearModule::Nf4`]; adapters make them QLoRA layers) and the rest as `f32`;
    /// any other `quantization_config` is an [`LmError::Unsupported`] naming it.
    ///
    /// ```
    /// let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/llama");
    /// let model = lm::LlamaModel::from_pretrained(format!("{data}/base")).unwrap();
    /// assert_eq!(model.config().num_key_value_heads, 2);
    /// let mut qlora = lm::LlamaModel::from_pretrained(format!("{data}/base_bnb4")).unwrap();
    /// assert_eq!(qlora.layers()[0].q_proj.kind(), "NF4");
    /// assert_eq!(qlora.load_adapter(format!("{data}/adapter_qlora"), "default", 0).unwrap(), 14);
    /// assert_eq!(qlora.layers()[0].q_proj.kind(), "QLoRA");
    /// ```
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = LlamaConfig::from_file(dir.join("config.json"))?;
        let bnb4 = match &config.quantization_config {
            None => false,
            Some(q) => {
                crate::quantize::check_bnb4_config(q)?;
                true
            }
        };
        let mut ckpt = Checkpoint::open_dir(dir)?;
        let model = if bnb4 {
            Self::from_checkpoint(
                config,
                &mut ckpt,
                &mut crate::quantize::bnb4_linear_from_checkpoint,
            )?
        } else {
            Self::from_checkpoint(config, &mut ckpt, &mut dense_linear_from_checkpoint)?
        };
        ckpt.finish()?;
        Ok(model)
    }

    /// Builds the model from tensors of `ckpt`, taking each projection through `load_linear`
    /// (called with the module path, e.g. `model.layers.0.self_attn.q_proj`, and the
    /// `(out, in)` shape). This is where quantized-base loaders plug in; the default is
    /// [`dense_linear_from_checkpoint`]. Tensors taken are removed from `ckpt`.
    pub fn from_checkpoint(
        config: LlamaConfig,
        ckpt: &mut Checkpoint,
        load_linear: &mut LinearLoader<'_>,
    ) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let (d, v) = (c.hidden_size, c.vocab_size);
        let take2 = |ckpt: &mut Checkpoint, key: &str, shape: [usize; 2]| -> Result<Array2<f32>> {
            let a = ckpt.take_f32(key, &shape)?;
            a.into_dimensionality::<Ix2>()
                .map_err(|e| LmError::shape(key, format!("{shape:?}"), e))
        };
        let take1 = |ckpt: &mut Checkpoint, key: &str| -> Result<Parameter<Ix1>> {
            let a = ckpt.take_f32(key, &[d])?;
            let a = a
                .into_dimensionality::<Ix1>()
                .map_err(|e| LmError::shape(key, d, e))?;
            Ok(Parameter::new(a))
        };
        let embed_tokens = Parameter::new(take2(ckpt, "model.embed_tokens.weight", [v, d])?);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            ckpt.discard(&format!("{p}.self_attn.rotary_emb.inv_freq"));
            let shapes = linear_shapes(c);
            let mut lin = |name: &str, shape: [usize; 2], ckpt: &mut Checkpoint| {
                load_linear(&format!("{p}.{name}"), shape, ckpt)
            };
            layers.push(DecoderLayer {
                input_layernorm: take1(ckpt, &format!("{p}.input_layernorm.weight"))?,
                post_attention_layernorm: take1(
                    ckpt,
                    &format!("{p}.post_attention_layernorm.weight"),
                )?,
                q_proj: lin(LAYER_LINEAR_NAMES[0], shapes[0], ckpt)?,
                k_proj: lin(LAYER_LINEAR_NAMES[1], shapes[1], ckpt)?,
                v_proj: lin(LAYER_LINEAR_NAMES[2], shapes[2], ckpt)?,
                o_proj: lin(LAYER_LINEAR_NAMES[3], shapes[3], ckpt)?,
                gate_proj: lin(LAYER_LINEAR_NAMES[4], shapes[4], ckpt)?,
                up_proj: lin(LAYER_LINEAR_NAMES[5], shapes[5], ckpt)?,
                down_proj: lin(LAYER_LINEAR_NAMES[6], shapes[6], ckpt)?,
            });
        }
        let norm = take1(ckpt, "model.norm.weight")?;
        let lm_head = if c.tie_word_embeddings {
            // Some exporters also write the tied copy; the embedding is authoritative.
            ckpt.discard("lm_head.weight");
            None
        } else {
            Some(load_linear("lm_head", [v, d], ckpt)?)
        };
        let model = LlamaModel {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            adapter_configs: BTreeMap::new(),
            active_adapters: Vec::new(),
            training: true,
            passes: PassCounter::default(),
        };
        model.check_linear_shapes()?;
        Ok(model)
    }

    /// A freshly initialised model as transformers' `_init_weights`: embeddings and linears
    /// from `N(0, initializer_range²)`, norms at 1. Draws come from `ChaCha8Rng(seed)` in
    /// parameter order (embedding, layers in order, q/k/v/o/gate/up/down, LM head).
    pub fn random(config: LlamaConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let std = config.initializer_range;
        let normal = Normal::new(0.0f32, std)
            .map_err(|e| LmError::config("initializer_range", e.to_string()))?;
        let mut draw = |shape: [usize; 2]| -> Array2<f32> {
            Array2::from_shape_simple_fn((shape[0], shape[1]), || normal.sample(&mut rng))
        };
        let (d, v) = (config.hidden_size, config.vocab_size);
        let embed_tokens = Parameter::new(draw([v, d]));
        let shapes = linear_shapes(&config);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for _ in 0..config.num_hidden_layers {
            let mut lin = |i: usize| LinearModule::Dense(DenseLinear::new(draw(shapes[i])));
            layers.push(DecoderLayer {
                input_layernorm: Parameter::new(Array1::ones(d)),
                post_attention_layernorm: Parameter::new(Array1::ones(d)),
                q_proj: lin(0),
                k_proj: lin(1),
                v_proj: lin(2),
                o_proj: lin(3),
                gate_proj: lin(4),
                up_proj: lin(5),
                down_proj: lin(6),
            });
        }
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(LinearModule::Dense(DenseLinear::new(draw([v, d]))))
        };
        Ok(LlamaModel {
            config,
            embed_tokens,
            layers,
            norm: Parameter::new(Array1::ones(d)),
            lm_head,
            adapter_configs: BTreeMap::new(),
            active_adapters: Vec::new(),
            training: true,
            passes: PassCounter::default(),
        })
    }

    /// Writes `config.json` and `model.safetensors` (f32, Hugging Face names) into `dir`,
    /// each through a temporary file and a rename.
    ///
    /// ```
    /// let config = lm::LlamaConfig::new(16, 8, 16, 1, 2, 1).unwrap();
    /// let model = lm::LlamaModel::random(config, 0).unwrap();
    /// let dir = std::env::temp_dir().join(format!("lm-doc-save-{}", std::process::id()));
    /// model.save_pretrained(&dir).unwrap();
    /// assert_eq!(lm::LlamaModel::from_pretrained(&dir).unwrap(), model);
    /// std::fs::remove_dir_all(&dir).unwrap();
    /// ```
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| LmError::io(dir, e))?;
        let config_text =
            serde_json::to_string_pretty(&self.config.to_json_value()).map_err(|e| {
                LmError::Json {
                    path: dir.join("config.json"),
                    reason: e.to_string(),
                }
            })?;
        write_atomically(&dir.join("config.json"), config_text.as_bytes())?;
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        let mut push = |name: String, shape: &[usize], values: Vec<f32>| {
            tensors.push((name, shape.to_vec(), values));
        };
        let e = self.embed_tokens.value();
        push(
            "model.embed_tokens.weight".into(),
            e.shape(),
            e.iter().copied().collect(),
        );
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            for (name, norm) in [
                ("input_layernorm", &layer.input_layernorm),
                ("post_attention_layernorm", &layer.post_attention_layernorm),
            ] {
                push(
                    format!("{p}.{name}.weight"),
                    norm.value().shape(),
                    norm.value().to_vec(),
                );
            }
            for (name, lin) in layer.linears() {
                let w = lin.base_weight()?;
                push(
                    format!("{p}.{name}.weight"),
                    w.shape(),
                    w.iter().copied().collect(),
                );
            }
        }
        push(
            "model.norm.weight".into(),
            self.norm.value().shape(),
            self.norm.value().to_vec(),
        );
        if let Some(head) = &self.lm_head {
            let w = head.base_weight()?;
            push(
                "lm_head.weight".into(),
                w.shape(),
                w.iter().copied().collect(),
            );
        }
        save_f32_safetensors(&dir.join("model.safetensors"), &tensors)
    }

    /// Number of scalars in all parameters, adapters included (the tied head counts once).
    ///
    /// ```
    /// let config = lm::LlamaConfig::new(16, 8, 12, 1, 2, 1).unwrap();
    /// let mut model = lm::LlamaModel::random(config, 0).unwrap();
    /// // embed 16·8, norms 2·8, q 8·8, k and v 4·8 each, o 8·8, gate/up/down 3·12·8, norm 8, head 16·8
    /// assert_eq!(model.num_parameters(), 128 + 16 + 64 + 64 + 64 + 288 + 8 + 128);
    /// ```
    pub fn num_parameters(&mut self) -> usize {
        let d = self.config.hidden_size;
        let linears: usize = self
            .linear_modules_mut()
            .map(|(_, lin)| lin.parameter_count())
            .sum();
        self.embed_tokens.value().len() + (2 * self.layers.len() + 1) * d + linears
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    pub fn embed_tokens(&self) -> &Parameter<Ix2> {
        &self.embed_tokens
    }

    /// Trains (allocating gradient buffers) or freezes (dropping them) every base parameter:
    /// embedding, norms, projections and LM head. A frozen base still passes input gradients.
    pub fn set_base_trainable(&mut self, trainable: bool) {
        self.embed_tokens.set_trainable(trainable);
        self.norm.set_trainable(trainable);
        for layer in &mut self.layers {
            layer.input_layernorm.set_trainable(trainable);
            layer.post_attention_layernorm.set_trainable(trainable);
            for (_, lin) in layer.linears_mut() {
                lin.set_base_trainable(trainable);
            }
        }
        if let Some(head) = &mut self.lm_head {
            head.set_base_trainable(trainable);
        }
    }

    /// Restarts the dropout RNG of every adapter of every adapted projection from `seed`
    /// (each from its own stream, derived from the module path and adapter name), so that
    /// dropout masks are a function of a training loop's saved RNG. Merged adapters (which
    /// draw no dropout) are skipped.
    pub fn reseed_adapter_dropout(&mut self, seed: u64) -> Result<()> {
        for (path, lin) in self.linear_modules_mut() {
            if let Some(layer) = lin.adapted_mut() {
                if layer.is_merged() {
                    continue;
                }
                for name in layer.adapter_names() {
                    let stream = format!("{path}/{name}");
                    let derived =
                        lora_core::LoraLinear::<lora_core::DenseBase>::derive_seed(seed, &stream);
                    layer.adapter_mut(&name)?.reseed_dropout(derived);
                }
            }
        }
        Ok(())
    }

    /// Sets every gradient buffer to zero (backward passes accumulate).
    pub fn zero_grad(&mut self) {
        self.embed_tokens.zero_grad();
        self.norm.zero_grad();
        for layer in &mut self.layers {
            layer.input_layernorm.zero_grad();
            layer.post_attention_layernorm.zero_grad();
            for (_, lin) in layer.linears_mut() {
                lin.zero_grad();
            }
        }
        if let Some(head) = &mut self.lm_head {
            head.zero_grad();
        }
    }

    /// Every linear module with its Hugging Face path (`model.layers.{i}.self_attn.q_proj`,
    /// ..., `model.layers.{i}.mlp.down_proj`, then `lm_head` when untied) — where adapters are
    /// injected (replace the module through the `&mut`).
    ///
    /// ```
    /// let config = lm::LlamaConfig::new(16, 8, 16, 1, 2, 1).unwrap();
    /// let mut model = lm::LlamaModel::random(config, 0).unwrap();
    /// let paths: Vec<String> = model.linear_modules_mut().map(|(p, _)| p).collect();
    /// assert_eq!(paths[0], "model.layers.0.self_attn.q_proj");
    /// assert_eq!(paths.len(), 8);
    /// ```
    pub fn linear_modules_mut(&mut self) -> impl Iterator<Item = (String, &mut LinearModule)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7 + 1);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, lin) in layer.linears_mut() {
                out.push((format!("model.layers.{i}.{name}"), lin));
            }
        }
        if let Some(head) = &mut self.lm_head {
            out.push(("lm_head".to_string(), head));
        }
        out.into_iter()
    }

    /// The linear module at a Hugging Face path, or an error naming the path.
    pub fn linear_module_mut(&mut self, path: &str) -> Result<&mut LinearModule> {
        self.linear_modules_mut()
            .find(|(p, _)| p == path)
            .map(|(_, lin)| lin)
            .ok_or_else(|| LmError::UnknownName {
                what: "linear module path".into(),
                name: path.to_string(),
            })
    }

    /// Calls `f(name, parameter)` for every tensor under its Hugging Face name, with its
    /// gradient when trainable. Order: embedding, per layer norms then projections, final
    /// norm, LM head.
    pub fn visit_parameters(
        &mut self,
        mut f: impl FnMut(&str, ParamMut<'_>) -> Result<()>,
    ) -> Result<()> {
        let name = "model.embed_tokens.weight";
        f(name, self.embed_tokens.as_param_mut(name)?)?;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (norm_name, norm) in [
                ("input_layernorm", &mut layer.input_layernorm),
                (
                    "post_attention_layernorm",
                    &mut layer.post_attention_layernorm,
                ),
            ] {
                let name = format!("model.layers.{i}.{norm_name}.weight");
                f(&name, norm.as_param_mut(&name)?)?;
            }
            for (lin_name, lin) in layer.linears_mut() {
                lin.visit_parameters(&format!("model.layers.{i}.{lin_name}"), &mut f)?;
            }
        }
        let name = "model.norm.weight";
        f(name, self.norm.as_param_mut(name)?)?;
        if let Some(head) = &mut self.lm_head {
            head.visit_parameters("lm_head", &mut f)?;
        }
        Ok(())
    }

    fn check_linear_shapes(&self) -> Result<()> {
        let shapes = linear_shapes(&self.config);
        for (i, layer) in self.layers.iter().enumerate() {
            for ((name, lin), shape) in layer.linears().into_iter().zip(shapes) {
                let got = [lin.out_features(), lin.in_features()];
                if got != shape {
                    return Err(LmError::TensorShape {
                        key: format!("model.layers.{i}.{name}"),
                        expected: shape.to_vec(),
                        got: got.to_vec(),
                    });
                }
            }
        }
        if let Some(head) = &self.lm_head {
            let shape = [self.config.vocab_size, self.config.hidden_size];
            let got = [head.out_features(), head.in_features()];
            if got != shape {
                return Err(LmError::TensorShape {
                    key: "lm_head".into(),
                    expected: shape.to_vec(),
                    got: got.to_vec(),
                });
            }
        }
        Ok(())
    }

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

    fn dims(&self, tokens: usize) -> LayerDims {
        let c = &self.config;
        LayerDims {
            tokens,
            hidden: c.hidden_size,
            q_width: c.num_attention_heads * c.head_dim,
            kv_width: c.num_key_value_heads * c.head_dim,
            intermediate: c.intermediate_size,
        }
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
        self.forward_impl(input_ids, attention_mask, true, &[])
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
                .forward_impl(input_ids, attention_mask, false, &[])?
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
            let mut pass = model.forward_impl(input_ids, attention_mask, false, layers)?;
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

    fn forward_impl(
        &mut self,
        input_ids: ArrayView2<'_, u32>,
        attention_mask: Option<ArrayView2<'_, bool>>,
        keep_activations: bool,
        record_layers: &[usize],
    ) -> Result<ForwardPass> {
        let (batch, seq) = input_ids.dim();
        let (ids, key_mask) = self.check_inputs(input_ids, attention_mask)?;
        self.passes.0 += 1;
        let serial = self.passes.0;
        let c = self.config.clone();
        let dims = self.dims(batch * seq);
        let n = dims.tokens;
        let positions: Vec<usize> = (0..n).map(|r| r % seq).collect();
        let rope = RopeTable::new(c.rope_theta, c.head_dim, 0, seq)?;
        let shape = AttentionShape {
            batch,
            seq,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        };

        let mut x = Array2::<f32>::zeros((n, c.hidden_size));
        let embed = self.embed_tokens.value();
        for (mut row, &id) in x.axis_iter_mut(Axis(0)).zip(&ids) {
            row.assign(&embed.row(id as usize));
        }
        let mut residuals = Vec::with_capacity(c.num_hidden_layers + 1);
        let mut saved = Vec::with_capacity(c.num_hidden_layers);
        let mut recorded = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let (x_out, acts) = layer_forward(
                layer,
                &c,
                &dims,
                &x,
                &positions,
                &rope,
                shape,
                key_mask.as_deref(),
            )?;
            let x_in = std::mem::replace(&mut x, x_out);
            if keep_activations {
                residuals.push(x_in);
                saved.push(acts);
            } else if record_layers.contains(&i) {
                recorded.push((i, x.clone()));
            }
        }
        let mut normed_final = Array2::<f32>::zeros((n, c.hidden_size));
        let mut rstd_final = vec![0.0; n];
        rms_norm_forward(
            x.view(),
            self.norm.value().view(),
            c.rms_norm_eps,
            normed_final.view_mut(),
            &mut rstd_final,
        )?;
        residuals.push(x);
        let mut logits = Array2::<f32>::zeros((n, c.vocab_size));
        match &mut self.lm_head {
            Some(head) => head.forward(normed_final.view(), logits.view_mut(), false)?,
            None => quant_core::linalg::gemm(
                1.0,
                normed_final.view(),
                self.embed_tokens.value().t(),
                0.0,
                logits.view_mut(),
            )?,
        }
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
            residuals,
            layers: saved,
            rstd_final,
            normed_final,
            logits,
            recorded,
        })
    }

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

        let dims = self.dims(n);
        let positions: Vec<usize> = (0..n).map(|r| r % seq).collect();
        let rope = RopeTable::new(c.rope_theta, c.head_dim, 0, seq)?;
        let shape = AttentionShape {
            batch,
            seq,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        };

        let mut grad_normed = Array2::<f32>::zeros((n, c.hidden_size));
        match &mut self.lm_head {
            Some(head) => head.backward(
                pass.normed_final.view(),
                grad_logits,
                grad_normed.view_mut(),
                false,
            )?,
            None => {
                let (embed, embed_grad) = self.embed_tokens.value_and_grad_mut();
                quant_core::linalg::gemm(
                    1.0,
                    grad_logits,
                    embed.view(),
                    0.0,
                    grad_normed.view_mut(),
                )?;
                if let Some(g) = embed_grad {
                    quant_core::linalg::gemm(
                        1.0,
                        grad_logits.t(),
                        pass.normed_final.view(),
                        1.0,
                        g.view_mut(),
                    )?;
                }
            }
        }
        let residual_final = pass.residuals.pop().ok_or_else(|| LmError::Backward {
            reason: "forward pass without residual streams".into(),
        })?;
        let mut grad_x = Array2::<f32>::zeros((n, c.hidden_size));
        let (w, gw) = self.norm.value_and_grad_mut();
        rms_norm_backward(
            residual_final.view(),
            w.view(),
            &pass.rstd_final,
            grad_normed.view(),
            grad_x.view_mut(),
            gw.map(|g| g.view_mut()),
        )?;
        drop(residual_final);
        if let Some(last) = self.layers.len().checked_sub(1) {
            add_hidden_grads(last, &mut grad_x);
        }

        for (i, layer) in self.layers.iter_mut().enumerate().rev() {
            let acts = pass.layers.pop().ok_or_else(|| LmError::Backward {
                reason: "forward pass has fewer layers than the model".into(),
            })?;
            let x_in = pass.residuals.pop().ok_or_else(|| LmError::Backward {
                reason: "forward pass has fewer residual streams than layers".into(),
            })?;
            layer_backward(
                layer,
                &dims,
                &x_in,
                acts,
                &positions,
                &rope,
                shape,
                &mut grad_x,
            )?;
            if i > 0 {
                add_hidden_grads(i - 1, &mut grad_x);
            }
        }

        if let Some(g) = self.embed_tokens.grad_mut() {
            for (row, &id) in grad_x.axis_iter(Axis(0)).zip(&pass.input_ids) {
                let mut target = g.row_mut(id as usize);
                target += &row;
            }
        }
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
        self.embed_tokens
            .check_grad_finite("model.embed_tokens.weight")?;
        for (i, layer) in self.layers.iter().enumerate() {
            layer
                .input_layernorm
                .check_grad_finite(&format!("model.layers.{i}.input_layernorm.weight"))?;
            layer
                .post_attention_layernorm
                .check_grad_finite(&format!("model.layers.{i}.post_attention_layernorm.weight"))?;
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

    /// Forward, mean shifted cross-entropy and backward in one call; returns the loss.
    pub fn loss_and_backward(
        &mut self,
        input_ids: ArrayView2<'_, u32>,
        labels: ArrayView2<'_, i64>,
        attention_mask: Option<ArrayView2<'_, bool>>,
    ) -> Result<f32> {
        let pass = self.forward(input_ids, attention_mask)?;
        let ce = cross_entropy(pass.logits().view(), labels)?;
        self.backward(pass, ce.grad_logits.view())?;
        Ok(ce.loss)
    }
}

/// `(out, in)` of q, k, v, o, gate, up, down.
fn linear_shapes(c: &LlamaConfig) -> [[usize; 2]; 7] {
    let (d, i) = (c.hidden_size, c.intermediate_size);
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    [[q, d], [kv, d], [kv, d], [d, q], [i, d], [i, d], [d, i]]
}

/// Takes `{path}.weight` of shape `(out, in)` as a frozen [`DenseLinear`].
pub fn dense_linear_from_checkpoint(
    path: &str,
    shape: [usize; 2],
    ckpt: &mut Checkpoint,
) -> Result<LinearModule> {
    let key = format!("{path}.weight");
    let w = ckpt
        .take_f32(&key, &shape)?
        .into_dimensionality::<Ix2>()
        .map_err(|e| LmError::shape(&key, format!("{shape:?}"), e))?;
    Ok(LinearModule::Dense(DenseLinear::new(w)))
}

#[allow(clippy::too_many_arguments)]
fn layer_forward(
    layer: &mut DecoderLayer,
    c: &LlamaConfig,
    dims: &LayerDims,
    x_in: &Array2<f32>,
    positions: &[usize],
    rope: &RopeTable,
    shape: AttentionShape,
    key_mask: Option<&[bool]>,
) -> Result<(Array2<f32>, LayerActivations)> {
    let LayerDims {
        tokens: n,
        hidden,
        q_width,
        kv_width,
        intermediate,
    } = *dims;
    let mut normed_attn = Array2::<f32>::zeros((n, hidden));
    let mut rstd_attn = vec![0.0; n];
    rms_norm_forward(
        x_in.view(),
        layer.input_layernorm.value().view(),
        c.rms_norm_eps,
        normed_attn.view_mut(),
        &mut rstd_attn,
    )?;
    let mut qkv = Array2::<f32>::zeros((n, q_width + 2 * kv_width));
    {
        let (q, rest) = qkv.view_mut().split_at(Axis(1), q_width);
        let (k, v) = rest.split_at(Axis(1), kv_width);
        layer.q_proj.forward(normed_attn.view(), q, false)?;
        layer.k_proj.forward(normed_attn.view(), k, false)?;
        layer.v_proj.forward(normed_attn.view(), v, false)?;
    }
    rope.apply(
        qkv.slice_mut(s![.., ..q_width + kv_width]),
        positions,
        shape.n_heads + shape.n_kv_heads,
        false,
    )?;
    let mut probs = Array3::<f32>::zeros((shape.batch * shape.n_heads, shape.seq, shape.seq));
    let mut attn_out = Array2::<f32>::zeros((n, q_width));
    attention_forward(
        shape,
        qkv.slice(s![.., ..q_width]),
        qkv.slice(s![.., q_width..q_width + kv_width]),
        qkv.slice(s![.., q_width + kv_width..]),
        key_mask,
        &mut probs,
        attn_out.view_mut(),
    )?;
    let mut residual_mid = x_in.clone();
    layer
        .o_proj
        .forward(attn_out.view(), residual_mid.view_mut(), true)?;

    let mut normed_mlp = Array2::<f32>::zeros((n, hidden));
    let mut rstd_mlp = vec![0.0; n];
    rms_norm_forward(
        residual_mid.view(),
        layer.post_attention_layernorm.value().view(),
        c.rms_norm_eps,
        normed_mlp.view_mut(),
        &mut rstd_mlp,
    )?;
    let mut gate_up = Array2::<f32>::zeros((n, 2 * intermediate));
    {
        let (g, u) = gate_up.view_mut().split_at(Axis(1), intermediate);
        layer.gate_proj.forward(normed_mlp.view(), g, false)?;
        layer.up_proj.forward(normed_mlp.view(), u, false)?;
    }
    let mut act = Array2::<f32>::zeros((n, intermediate));
    swiglu_forward(gate_up.view(), act.view_mut())?;
    let mut x_out = residual_mid.clone();
    layer
        .down_proj
        .forward(act.view(), x_out.view_mut(), true)?;
    Ok((
        x_out,
        LayerActivations {
            rstd_attn,
            qkv,
            probs,
            attn_out,
            residual_mid,
            rstd_mlp,
            gate_up,
        },
    ))
}

/// Turns `grad_x` from the gradient of the layer's output into that of its input.
#[allow(clippy::too_many_arguments)]
fn layer_backward(
    layer: &mut DecoderLayer,
    dims: &LayerDims,
    x_in: &Array2<f32>,
    acts: LayerActivations,
    positions: &[usize],
    rope: &RopeTable,
    shape: AttentionShape,
    grad_x: &mut Array2<f32>,
) -> Result<()> {
    let LayerDims {
        tokens: n,
        hidden,
        q_width,
        kv_width,
        intermediate,
    } = *dims;
    // MLP: the SwiGLU product is recomputed rather than kept (one elementwise pass).
    let mut act = Array2::<f32>::zeros((n, intermediate));
    swiglu_forward(acts.gate_up.view(), act.view_mut())?;
    let mut grad_act = Array2::<f32>::zeros((n, intermediate));
    layer
        .down_proj
        .backward(act.view(), grad_x.view(), grad_act.view_mut(), false)?;
    drop(act);
    let mut grad_gate_up = Array2::<f32>::zeros((n, 2 * intermediate));
    swiglu_backward(
        acts.gate_up.view(),
        grad_act.view(),
        grad_gate_up.view_mut(),
    )?;
    drop(grad_act);
    let mut normed = Array2::<f32>::zeros((n, hidden));
    rms_norm_apply(
        acts.residual_mid.view(),
        layer.post_attention_layernorm.value().view(),
        &acts.rstd_mlp,
        normed.view_mut(),
    )?;
    let mut grad_normed = Array2::<f32>::zeros((n, hidden));
    layer.gate_proj.backward(
        normed.view(),
        grad_gate_up.slice(s![.., ..intermediate]),
        grad_normed.view_mut(),
        false,
    )?;
    layer.up_proj.backward(
        normed.view(),
        grad_gate_up.slice(s![.., intermediate..]),
        grad_normed.view_mut(),
        true,
    )?;
    drop(grad_gate_up);
    {
        let (w, gw) = layer.post_attention_layernorm.value_and_grad_mut();
        rms_norm_backward(
            acts.residual_mid.view(),
            w.view(),
            &acts.rstd_mlp,
            grad_normed.view(),
            grad_x.view_mut(),
            gw.map(|g| g.view_mut()),
        )?;
    }

    // Attention.
    let mut grad_attn = Array2::<f32>::zeros((n, q_width));
    layer.o_proj.backward(
        acts.attn_out.view(),
        grad_x.view(),
        grad_attn.view_mut(),
        false,
    )?;
    let mut grad_qkv = Array2::<f32>::zeros((n, q_width + 2 * kv_width));
    {
        let (gq, rest) = grad_qkv.view_mut().split_at(Axis(1), q_width);
        let (gk, gv) = rest.split_at(Axis(1), kv_width);
        attention_backward(
            shape,
            acts.qkv.slice(s![.., ..q_width]),
            acts.qkv.slice(s![.., q_width..q_width + kv_width]),
            acts.qkv.slice(s![.., q_width + kv_width..]),
            &acts.probs,
            grad_attn.view(),
            gq,
            gk,
            gv,
        )?;
    }
    drop(grad_attn);
    rope.apply(
        grad_qkv.slice_mut(s![.., ..q_width + kv_width]),
        positions,
        shape.n_heads + shape.n_kv_heads,
        true,
    )?;
    rms_norm_apply(
        x_in.view(),
        layer.input_layernorm.value().view(),
        &acts.rstd_attn,
        normed.view_mut(),
    )?;
    layer.q_proj.backward(
        normed.view(),
        grad_qkv.slice(s![.., ..q_width]),
        grad_normed.view_mut(),
        false,
    )?;
    layer.k_proj.backward(
        normed.view(),
        grad_qkv.slice(s![.., q_width..q_width + kv_width]),
        grad_normed.view_mut(),
        true,
    )?;
    layer.v_proj.backward(
        normed.view(),
        grad_qkv.slice(s![.., q_width + kv_width..]),
        grad_normed.view_mut(),
        true,
    )?;
    let (w, gw) = layer.input_layernorm.value_and_grad_mut();
    rms_norm_backward(
        x_in.view(),
        w.view(),
        &acts.rstd_attn,
        grad_normed.view(),
        grad_x.view_mut(),
        gw.map(|g| g.view_mut()),
    )?;
    Ok(())
}
