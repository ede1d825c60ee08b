//! The causal language model of every supported family (`LlamaForCausalLM` and its
//! relatives): parameters, loading from and saving to Hugging Face checkpoints, parameter
//! visiting. The forward and backward passes are in [`crate::forward`], the layer itself in
//! [`crate::decoder`].

use std::collections::BTreeMap;
use std::path::Path;

use lora_core::LoraConfig;

use ndarray::{Array1, Array2, Ix1};
use quant_core::linalg::ComputeDtype;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::checkpoint::{save_f32_safetensors, write_atomically, Checkpoint};
use crate::config::{linear_shapes, LlamaConfig};
use crate::embedding::TokenEmbedding;
use crate::error::{LmError, Result};
use crate::family::{Architecture, NormKind};
use crate::linear::LinearModule;
use crate::param::{ParamMut, Parameter};
use crate::source::{check_bnb4_config, take_vector, Bnb4Checkpoint, ModelSource};

pub use crate::decoder::{DecoderLayer, LAYER_LINEAR_NAMES};

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
    pub(crate) embed_tokens: TokenEmbedding,
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
    /// The precision of every linear and attention product ([`LlamaModel::set_compute_dtype`]).
    pub(crate) compute_dtype: ComputeDtype,
    pub(crate) passes: PassCounter,
    /// Gradient checkpointing ([`LlamaModel::set_gradient_checkpointing`]): the training
    /// forward keeps only each decoder layer's input and backward recomputes the layer.
    pub(crate) gradient_checkpointing: bool,
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

impl LlamaModel {
    /// Reads `config.json` and `model.safetensors` (or a sharded index) from `dir`. A
    /// bitsandbytes 4-bit checkpoint (`quantization_config` with `quant_method:
    /// "bitsandbytes"`, `load_in_4bit`, NF4) loads its quantized projections as frozen NF4
    /// bases ([`LinearModule::nf4`]; adapters make them QLoRA layers) and the rest as `f32`;
    /// any other `quantization_config` is an [`LmError::Unsupported`] naming it.
    ///
    /// ```
    /// let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/llama");
    /// let model = lm::LlamaModel::from_pretrained(format!("{data}/base")).unwrap();
    /// assert_eq!(model.config().num_key_value_heads, 2);
    /// let mut qlora = lm::LlamaModel::from_pretrained(format!("{data}/base_bnb4")).unwrap();
    /// assert_eq!(qlora.layers()[0].linear("self_attn.q_proj").unwrap().kind(), "NF4");
    /// assert_eq!(qlora.load_adapter(format!("{data}/adapter_qlora"), "default", 0).unwrap(), 14);
    /// assert_eq!(qlora.layers()[0].linear("self_attn.q_proj").unwrap().kind(), "QLoRA");
    /// ```
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = LlamaConfig::from_file(dir.join("config.json"))?;
        let bnb4 = match &config.quantization_config {
            None => false,
            Some(q) => {
                check_bnb4_config(q)?;
                true
            }
        };
        let mut ckpt = Checkpoint::open_dir(dir)?;
        let model = if bnb4 {
            Self::from_source(config, &mut Bnb4Checkpoint(&mut ckpt))?
        } else {
            Self::from_source(config, &mut ckpt)?
        };
        ckpt.finish()?;
        Ok(model)
    }

    /// Builds the model from the tensors of a checkpoint (taken out of it), every projection
    /// dense `f32`: [`LlamaModel::from_source`] over the [`Checkpoint`].
    pub fn from_checkpoint(config: LlamaConfig, ckpt: &mut Checkpoint) -> Result<Self> {
        Self::from_source(config, ckpt)
    }

    /// Builds the model from `source`: norms and embeddings through
    /// [`ModelSource::take_f32`], every projection through [`ModelSource::take_linear`]
    /// (module path such as `model.layers.0.self_attn.q_proj`, `(out, in)`, and whether the
    /// family has a bias there), so the source chooses each projection's base (dense `f32`,
    /// NF4, ggml blocks). This is where quantized-base loaders plug in. Every projection's
    /// shape is checked against the config.
    pub fn from_source<S: ModelSource + ?Sized>(
        config: LlamaConfig,
        source: &mut S,
    ) -> Result<Self> {
        config.validate()?;
        let config = config.resolved();
        let c = &config;
        let arch = &c.architecture;
        let (d, v) = (c.hidden_size, c.vocab_size);
        let embed_tokens = source.take_embedding("model.embed_tokens.weight", (v, d))?;
        let shapes = linear_shapes(c);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            source.discard(&format!("{p}.self_attn.rotary_emb.inv_freq"));
            let mut norms: [Option<Parameter<Ix1>>; 6] = Default::default();
            for (slot, (name, len)) in norm_layout(c).into_iter().enumerate() {
                if let Some(name) = name {
                    norms[slot] = Some(Parameter::new(take_vector(
                        source,
                        &format!("{p}.{name}.weight"),
                        len,
                    )?));
                }
            }
            let mut linears = Vec::with_capacity(shapes.len());
            for (name, shape) in arch.linear_names().iter().zip(&shapes) {
                let path = format!("{p}.{name}");
                linears.push(source.take_linear(
                    &path,
                    (shape[0], shape[1]),
                    arch.has_bias(name),
                )?);
            }
            layers.push(DecoderLayer::new(arch, norms, linears)?);
        }
        let norm = Parameter::new(take_vector(source, "model.norm.weight", d)?);
        let lm_head = if c.tie_word_embeddings {
            // Some exporters also write the tied copy; the embedding is authoritative.
            source.discard("lm_head.weight");
            None
        } else {
            Some(source.take_linear("lm_head", (v, d), false)?)
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
            compute_dtype: ComputeDtype::F32,
            passes: PassCounter::default(),
            gradient_checkpointing: false,
        };
        model.check_linear_shapes()?;
        Ok(model)
    }

    /// A freshly initialised model as transformers' `_init_weights`: embeddings and linears
    /// from `N(0, initializer_range²)`, norms at 1. Draws come from `ChaCha8Rng(seed)` in
    /// parameter order (embedding, layers in order, q/k/v/o/gate/up/down, LM head).
    pub fn random(config: LlamaConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let config = config.resolved();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let std = config.initializer_range;
        let normal = Normal::new(0.0f32, std)
            .map_err(|e| LmError::config("initializer_range", e.to_string()))?;
        let mut draw = |shape: [usize; 2]| -> Array2<f32> {
            Array2::from_shape_simple_fn((shape[0], shape[1]), || normal.sample(&mut rng))
        };
        let (d, v) = (config.hidden_size, config.vocab_size);
        let embed_tokens = TokenEmbedding::Dense(Parameter::new(draw([v, d])));
        let shapes = linear_shapes(&config);
        // Gemma's norms store w with x̂·(1 + w): the identity is w = 0.
        let norm_init = match config.architecture.norm {
            NormKind::Weight => 1.0,
            NormKind::OnePlusWeight => 0.0,
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for _ in 0..config.num_hidden_layers {
            let mut norms: [Option<Parameter<Ix1>>; 6] = Default::default();
            for (slot, (name, len)) in norm_layout(&config).into_iter().enumerate() {
                if name.is_some() {
                    norms[slot] = Some(Parameter::new(Array1::from_elem(len, norm_init)));
                }
            }
            let mut linears = Vec::with_capacity(shapes.len());
            for (name, shape) in config.architecture.linear_names().iter().zip(&shapes) {
                let bias = config
                    .architecture
                    .has_bias(name)
                    .then(|| Array1::zeros(shape[0]));
                linears.push(LinearModule::dense(draw(*shape), bias));
            }
            layers.push(DecoderLayer::new(&config.architecture, norms, linears)?);
        }
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(LinearModule::dense(draw([v, d]), None))
        };
        Ok(LlamaModel {
            config,
            embed_tokens,
            layers,
            norm: Parameter::new(Array1::from_elem(d, norm_init)),
            lm_head,
            adapter_configs: BTreeMap::new(),
            active_adapters: Vec::new(),
            training: true,
            compute_dtype: ComputeDtype::F32,
            passes: PassCounter::default(),
            gradient_checkpointing: false,
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
        let e = self.embed_tokens.weight_f32()?;
        push(
            "model.embed_tokens.weight".into(),
            e.shape(),
            e.iter().copied().collect(),
        );
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            for (name, norm) in layer.norms() {
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
                if let Some(b) = lin.base_bias() {
                    push(format!("{p}.{name}.bias"), &[b.len()], b.to_vec());
                }
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
        let norms: usize = self
            .layers
            .iter()
            .flat_map(|l| l.norms())
            .map(|(_, n)| n.value().len())
            .sum();
        let linears: usize = self
            .linear_modules_mut()
            .map(|(_, lin)| lin.parameter_count())
            .sum();
        self.embed_tokens.parameter_count() + norms + d + linears
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// The token embedding (dense, or a GGUF file's frozen ggml blocks).
    pub fn embed_tokens(&self) -> &TokenEmbedding {
        &self.embed_tokens
    }

    /// Trains (allocating gradient buffers) or freezes (dropping them) every base parameter:
    /// embedding, norms, projections and LM head. A frozen base still passes input gradients.
    /// Quantized bases (ggml-block embedding and projections, NF4) stay frozen.
    pub fn set_base_trainable(&mut self, trainable: bool) {
        if let Some(e) = self.embed_tokens.dense_mut() {
            e.set_trainable(trainable);
        }
        self.norm.set_trainable(trainable);
        for layer in &mut self.layers {
            for (_, norm) in layer.norms_mut() {
                norm.set_trainable(trainable);
            }
            for (_, lin) in layer.linears_mut() {
                lin.set_base_trainable(trainable);
            }
        }
        if let Some(head) = &mut self.lm_head {
            head.set_base_trainable(trainable);
        }
    }

    /// The precision of the model's products (`f32` unless set).
    pub fn compute_dtype(&self) -> ComputeDtype {
        self.compute_dtype
    }

    /// Sets the precision of every matrix product of the forward and backward passes: the
    /// projections (dense, NF4 and ggml bases after decoding each tile, LoRA's `A` and `B`,
    /// LoRA-QAT's fake-quantized weight), the tied LM head and attention's `q·kᵀ` and `P·v`.
    /// bf16 rounds the operands to bf16 and sums in `f32` (PyTorch's CPU autocast
    /// arithmetic); weights, gradients, optimizer state, norms, softmax and the loss stay
    /// `f32`. Adapters injected or loaded later compute in the same precision.
    ///
    /// ```
    /// use quant_core::linalg::ComputeDtype;
    /// let config = lm::LlamaConfig::new(32, 16, 32, 2, 4, 2).unwrap();
    /// let mut model = lm::LlamaModel::random(config, 7).unwrap();
    /// let ids = ndarray::array![[1u32, 5, 9, 3]];
    /// let full = model.logits(ids.view(), None).unwrap();
    /// model.set_compute_dtype(ComputeDtype::Bf16);
    /// let bf16 = model.logits(ids.view(), None).unwrap();
    /// let worst = full.iter().zip(bf16.iter()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    /// assert!(worst > 0.0 && worst < 1e-2, "{worst}");
    /// ```
    pub fn set_compute_dtype(&mut self, dtype: ComputeDtype) {
        self.compute_dtype = dtype;
        self.sync_compute_dtype();
    }

    /// Gives every linear module the model's precision (a module injected since the last
    /// pass starts in `f32`); a module already in it is left alone. Called by every pass.
    pub(crate) fn sync_compute_dtype(&mut self) {
        let dtype = self.compute_dtype;
        self.embed_tokens.set_compute_dtype(dtype);
        for (_, module) in self.linear_modules_mut() {
            module.set_compute_dtype(dtype);
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
        if let Some(e) = self.embed_tokens.dense_mut() {
            e.zero_grad();
        }
        self.norm.zero_grad();
        for layer in &mut self.layers {
            for (_, norm) in layer.norms_mut() {
                norm.zero_grad();
            }
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
        // A ggml-block embedding is frozen, like a quantized projection base: not visited.
        if let Some(e) = self.embed_tokens.dense_mut() {
            f(name, e.as_param_mut(name)?)?;
        }
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (norm_name, norm) in layer.norms_mut() {
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
            for ((name, lin), shape) in layer.linears().into_iter().zip(shapes.iter().copied()) {
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
}

/// The six norm slots of [`DecoderLayer::new`] with the HF name (if the family has the norm)
/// and length: input, post-attention, pre-/post-feedforward (Gemma), q/k head norms.
fn norm_layout(c: &LlamaConfig) -> [(Option<&'static str>, usize); 6] {
    let arch: &Architecture = &c.architecture;
    let (d, hd) = (c.hidden_size, c.head_dim);
    let sandwich = arch.sandwich_norms;
    let qk = arch.qk_norm;
    [
        (Some("input_layernorm"), d),
        (Some("post_attention_layernorm"), d),
        (sandwich.then_some("pre_feedforward_layernorm"), d),
        (sandwich.then_some("post_feedforward_layernorm"), d),
        (qk.then_some("self_attn.q_norm"), hd),
        (qk.then_some("self_attn.k_norm"), hd),
    ]
}
