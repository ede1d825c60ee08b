//! `lora-qat eval`: perplexity of a model (optionally with a PEFT or LoRA-QAT adapter) on a
//! dataset in any format `train --data` reads (text, chat, prompt-completion or token JSONL),
//! and exact-match accuracy when the lines are demo-task problems.

use std::path::{Path, PathBuf};

use clap::Args;
use lm::LlamaModel;
use lora_qat::demo::eval::{exact_match, perplexity};
use lora_qat::demo::task::{Problem, Tokenizer};
use lora_qat::text::{examples_from_file, DataFormat, ModelText};

use super::logits::{load_model, ADAPTER_NAME};
use super::{resolve_model_arg, CliError, CliResult};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Hugging Face model directory (config.json + model.safetensors or a sharded index), or
    /// a hub id (org/name) in the local Hugging Face cache.
    #[arg(long, value_name = "DIR|ID")]
    pub model: PathBuf,
    /// Revision of a hub id (branch, tag or commit; default main).
    #[arg(long)]
    pub revision: Option<String>,
    /// Adapter directory: a PEFT LoRA adapter, or a LoRA-QAT adapter written by the demo
    /// (with `qat_quantizers.safetensors`), which is evaluated merged and quantized.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Data in any format `train --data` reads: plain text (one example per line, tokenized
    /// with the model's tokenizer), chat / prompt-completion / text JSONL, or token JSONL
    /// (`input_ids` and optional `labels`, -100 = not counted). Token lines that also have a
    /// demo-task `prompt` (e.g. `"347+285="`) are graded by exact match of the greedily
    /// generated answer (`test.jsonl` of a demo run has both).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Sequences per forward pass for the perplexity.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

/// The model with the adapter applied as it is deployed.
fn load(model_dir: &Path, adapter: Option<&Path>) -> CliResult<LlamaModel> {
    match adapter {
        Some(dir) if dir.join(lm::qat::QAT_STATE_FILE).is_file() => {
            let mut model = load_model(model_dir, None)?;
            model.load_qat_adapter(dir, ADAPTER_NAME)?;
            model.merge_and_unload()?;
            Ok(model)
        }
        other => load_model(model_dir, other),
    }
}

/// The demo-task problems of the file, by their `prompt` field; `None` when no line has one.
fn problems(path: &Path, text: &str) -> CliResult<Option<Vec<Problem>>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| CliError::File {
            path: path.display().to_string(),
            reason: format!("line {}: {e}", i + 1),
        })?;
        if let Some(prompt) = value.get("prompt").and_then(|p| p.as_str()) {
            out.push(Problem::parse_prompt(prompt).map_err(|e| CliError::File {
                path: path.display().to_string(),
                reason: format!("line {}: {e}", i + 1),
            })?);
        }
    }
    Ok((!out.is_empty()).then_some(out))
}

pub fn run(args: &EvalArgs) -> CliResult {
    let model_dir = resolve_model_arg(&args.model, args.revision.as_deref())?;
    let data = examples_from_file(&args.data, || ModelText::load(&model_dir))?;
    let dataset = data.dataset;
    let mut model = load(&model_dir, args.adapter.as_deref())?;
    let ppl = perplexity(&mut model, dataset.examples(), args.batch_size)?;
    println!(
        "perplexity {:.4} (mean cross-entropy {:.4} nats over {} labelled tokens of {} examples)",
        ppl.perplexity,
        ppl.mean_loss,
        ppl.tokens,
        dataset.len()
    );
    if data.format != DataFormat::PreTokenized {
        return Ok(());
    }
    let text = std::fs::read_to_string(&args.data).map_err(|e| CliError::File {
        path: args.data.display().to_string(),
        reason: e.to_string(),
    })?;
    if let Some(problems) = problems(&args.data, &text)? {
        let tokenizer = Tokenizer::new();
        if model.config().vocab_size != tokenizer.vocab_size() {
            return Err(CliError::Usage(format!(
                "the file has demo-task prompts but the model's vocabulary has {} tokens, the \
                 task's {}",
                model.config().vocab_size,
                tokenizer.vocab_size()
            )));
        }
        let em = exact_match(&model, &problems, &tokenizer, None)?;
        println!(
            "exact-match {:.2}% ({}/{} problems)",
            100.0 * em.accuracy(),
            em.correct,
            em.total
        );
    }
    Ok(())
}
