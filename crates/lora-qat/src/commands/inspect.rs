//! `lora-qat inspect PATH`: what a model directory, a PEFT adapter directory, a safetensors
//! file (plain, bitsandbytes 4-bit, or this project's packed uniform/Pi layout) or a GGUF
//! file holds, read from headers only (no tensor data is loaded except quant-state JSON).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;
use lm::lazy_checkpoint::{LazyCheckpoint, StoredAs};
use quant_core::gguf::GgufFile;
use quant_core::safetensors_stream::SafetensorsReader;

use super::{CliError, CliResult};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A model directory (config.json), an adapter directory (adapter_config.json), a
    /// .safetensors file or a .gguf file.
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
    /// List every tensor (by default, at most 40 lines of tensors).
    #[arg(long)]
    pub all: bool,
}

pub fn run(args: &InspectArgs) -> CliResult {
    print!("{}", describe(&args.path, args.all)?);
    Ok(())
}

/// The report `inspect` prints.
pub fn describe(path: &Path, all: bool) -> CliResult<String> {
    let limit = if all { usize::MAX } else { 40 };
    if path.is_dir() {
        if path.join("adapter_config.json").is_file() {
            return describe_adapter(path, limit);
        }
        if path.join("config.json").is_file() {
            return describe_model(path, limit);
        }
        return Err(CliError::File {
            path: path.display().to_string(),
            reason: "a directory with neither config.json (model) nor adapter_config.json \
                     (adapter)"
                .into(),
        });
    }
    let mut magic = [0u8; 4];
    let is_gguf = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == quant_core::gguf::MAGIC;
    if is_gguf {
        describe_gguf(path, limit)
    } else {
        describe_safetensors(path, limit)
    }
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} GB", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} MB", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} kB", n as f64 / 1e3),
        n => format!("{n} B"),
    }
}

fn describe_model(dir: &Path, limit: usize) -> CliResult<String> {
    let ckpt = LazyCheckpoint::open(dir)?;
    let c = &ckpt.config;
    let mut s = format!("model directory {}\n", dir.display());
    s += &format!(
        "  {} ({}): {} layers, hidden {}, MLP {}, {} heads ({} kv) of {}, vocab {}, context {}, \
         rope θ {}, rms eps {}, tied embeddings {}\n",
        c.family(),
        c.architecture.family.architecture(),
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.vocab_size,
        c.max_position_embeddings,
        c.rope_theta,
        c.rms_norm_eps,
        c.tie_word_embeddings
    );
    if let Some(q) = &c.quantization_config {
        s += &format!("  quantization_config: {q}\n");
    }
    let mut kinds: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    let mut params = 0u64;
    for t in ckpt.tensors() {
        let n: u64 = t.shape.iter().product::<usize>() as u64;
        params += n;
        let kind = match &t.stored {
            StoredAs::Float(d) => format!("{d:?}"),
            StoredAs::Bnb4 => "bnb 4-bit".to_string(),
        };
        let e = kinds.entry(kind).or_default();
        e.0 += 1;
        e.1 += n;
    }
    s += &format!(
        "  {} tensors, {:.3} M parameters, {} stored\n",
        ckpt.tensors().count(),
        params as f64 / 1e6,
        human_bytes(ckpt.stored_bytes())
    );
    for (kind, (count, n)) in &kinds {
        s += &format!(
            "    {kind}: {count} tensors, {:.3} M values\n",
            *n as f64 / 1e6
        );
    }
    for extra in ["tokenizer.json", "model.safetensors.index.json"] {
        if dir.join(extra).is_file() {
            s += &format!("  has {extra}\n");
        }
    }
    for (i, t) in ckpt.tensors().enumerate() {
        if i >= limit {
            s += "  ... (--all lists every tensor)\n";
            break;
        }
        let kind = match &t.stored {
            StoredAs::Float(d) => format!("{d:?}"),
            StoredAs::Bnb4 => "bnb4".to_string(),
        };
        s += &format!("  {:<56} {:>6} {:?}\n", t.name, kind, t.shape);
    }
    Ok(s)
}

fn describe_adapter(dir: &Path, limit: usize) -> CliResult<String> {
    let config_path = dir.join(lora_core::peft::CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(|e| CliError::File {
        path: config_path.display().to_string(),
        reason: e.to_string(),
    })?;
    let config: lora_core::LoraConfig =
        serde_json::from_str(&text).map_err(|e| CliError::File {
            path: config_path.display().to_string(),
            reason: e.to_string(),
        })?;
    let mut s = format!("PEFT adapter directory {}\n", dir.display());
    s += &format!(
        "  r = {}, lora_alpha = {}, scale = {:.6}, rsLoRA {}, DoRA {}, dropout {}\n",
        config.r,
        config.lora_alpha,
        lora_core::config::scale(config.lora_alpha, config.r, config.use_rslora),
        config.use_rslora,
        config.use_dora,
        config.lora_dropout
    );
    s += &format!("  target_modules: {:?}\n", config.target_modules);
    let weights = dir.join(lora_core::peft::WEIGHTS_FILE);
    let reader = SafetensorsReader::open(&weights)?;
    let modules: std::collections::BTreeSet<&str> = reader
        .tensors
        .keys()
        .filter_map(|k| {
            k.strip_prefix(lora_core::peft::KEY_PREFIX)
                .and_then(|k| k.split(".lora_").next())
        })
        .collect();
    s += &format!(
        "  {} tensors on {} modules, {}\n",
        reader.tensors.len(),
        modules.len(),
        human_bytes(reader.tensors.values().map(|t| t.len).sum())
    );
    s += &list_tensors(&reader, limit);
    Ok(s)
}

fn list_tensors(reader: &SafetensorsReader, limit: usize) -> String {
    let mut s = String::new();
    for (i, (name, t)) in reader.tensors.iter().enumerate() {
        if i >= limit {
            s += "  ... (--all lists every tensor)\n";
            break;
        }
        s += &format!("  {:<64} {:>5?} {:?}\n", name, t.dtype, t.shape);
    }
    s
}

fn describe_safetensors(path: &Path, limit: usize) -> CliResult<String> {
    let reader = SafetensorsReader::open(path)?;
    let mut s = format!(
        "safetensors file {}: {} tensors, {}\n",
        path.display(),
        reader.tensors.len(),
        human_bytes(reader.tensors.values().map(|t| t.len).sum())
    );
    if let Some(m) = &reader.metadata {
        let sorted: BTreeMap<_, _> = m.iter().collect();
        s += &format!("  __metadata__: {sorted:?}\n");
    }
    // Quantized weights: bnb 4-bit (quant_state JSON) and the project's packed layout.
    for (name, _) in reader.tensors.iter() {
        let (weight, kind) = if let Some(w) = name
            .strip_suffix(".quant_state.bitsandbytes__nf4")
            .or_else(|| name.strip_suffix(".quant_state.bitsandbytes__fp4"))
        {
            (w, "bitsandbytes 4-bit")
        } else if let Some(w) = name.strip_suffix(".qstate") {
            (w, "packed uniform/Pi")
        } else {
            continue;
        };
        let state = reader.read_bytes(name)?;
        s += &format!(
            "  quantized {weight} ({kind}): {}\n",
            String::from_utf8_lossy(&state)
        );
    }
    s += &list_tensors(&reader, limit);
    Ok(s)
}

fn describe_gguf(path: &Path, limit: usize) -> CliResult<String> {
    let file = GgufFile::open(path)?;
    let mut s = format!(
        "GGUF v{} file {}: {} metadata keys, {} tensors, alignment {}, data at byte {}\n",
        file.version,
        path.display(),
        file.metadata.len(),
        file.tensors.len(),
        file.alignment,
        file.data_offset
    );
    // The family, from llama.cpp's architecture name through lm's one GGUF name table.
    let arch = file.metadata_str("general.architecture").unwrap_or("");
    let kind = match file.metadata_str("general.type") {
        Some("adapter") => "LoRA adapter",
        _ => "model",
    };
    s += &match lm::gguf::FamilyNames::for_arch(arch) {
        Some(names) if arch == "llama" => format!(
            "  {kind} of family {} (llama.cpp architecture `llama`; a Mistral model is written \
             as `llama` too)\n",
            names.family
        ),
        Some(names) => format!(
            "  {kind} of family {} (llama.cpp architecture `{arch}`)\n",
            names.family
        ),
        None => format!(
            "  {kind} of llama.cpp architecture {arch:?}: not a family this project reads \
             ({})\n",
            lm::gguf::FamilyNames::architectures().join(", ")
        ),
    };
    // As a model: the family and config derived from the metadata, or why it is not one.
    if kind == "model" {
        match lm::gguf_model::GgufModelFile::open(path) {
            Ok(model) => {
                let c = model.config();
                s += &format!(
                "  model: {} (GGUF `{}`), {} layers, hidden {}, {} heads ({} key/value) of {}, \
                 MLP {}, vocabulary {}, {} positions, {} embeddings\n",
                c.family(),
                model.architecture(),
                c.num_hidden_layers,
                c.hidden_size,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim,
                c.intermediate_size,
                c.vocab_size,
                c.max_position_embeddings,
                if c.tie_word_embeddings { "tied" } else { "untied" }
            );
            }
            Err(e) => s += &format!("  not loadable as a model: {e}\n"),
        }
    }
    for (key, value) in &file.metadata {
        s += &format!("  {key} = {}\n", value.summary());
    }
    let mut by_type: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for t in &file.tensors {
        let e = by_type.entry(t.ty.name()).or_default();
        e.0 += 1;
        e.1 += t.size;
    }
    for (ty, (count, bytes)) in &by_type {
        s += &format!("  {ty}: {count} tensors, {}\n", human_bytes(*bytes));
    }
    for (i, t) in file.tensors.iter().enumerate() {
        if i >= limit {
            s += "  ... (--all lists every tensor)\n";
            break;
        }
        // ggml's order: ne[0] (the contiguous dimension) first.
        let ne: Vec<usize> = t.shape.iter().rev().copied().collect();
        s += &format!(
            "  {:<40} {:>5} ne={:?} offset {}\n",
            t.name,
            t.ty.name(),
            ne,
            t.offset
        );
    }
    Ok(s)
}
