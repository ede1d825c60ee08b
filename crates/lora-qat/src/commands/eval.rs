//! `lora-qat eval`: perplexity of a model (optionally with a PEFT or LoRA-QAT adapter) on a
//! JSONL token dataset, and exact-match accuracy when the lines are demo-task problems.

use std::path::{Path, PathBuf};

use clap::Args;
use lm::LlamaModel;
use lora_qat::demo::eval::{exact_match, perplexity};
use lora_qat::demo::task::{Problem, Tokenizer};
use qat_train::data::Dataset;

use super::logits::{load_model, ADAPTER_NAME};
use super::{CliError, CliResult};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Hugging Face model directory (config.json + model.safetensors or a sharded index).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Adapter directory: a PEFT LoRA adapter, or a LoRA-QAT adapter written by the demo
    /// (with `qat_quantizers.safetensors`), which is evaluated merged and quantized.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// JSONL file, one example per line: `input_ids` and optional `labels` (-100 = not
    /// counted). Lines that also have a demo-task `prompt` (e.g. `"347+285="`) are graded by
    /// exact match of the greedily generated answer (`test.jsonl` of a demo run has both).
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
    let text = std::fs::read_to_string(&args.data).map_err(|e| CliError::File {
        path: args.data.display().to_string(),
        reason: e.to_string(),
    })?;
    let dataset = Dataset::from_jsonl_str(&text, &args.data.display().to_string())
        .map_err(lora_qat::demo::DemoError::from)?;
    let mut model = load(&args.model, args.adapter.as_deref())?;
    let ppl = perplexity(&mut model, dataset.examples(), args.batch_size)?;
    println!(
        "perplexity {:.4} (mean cross-entropy {:.4} nats over {} labelled tokens of {} examples)",
        ppl.perplexity,
        ppl.mean_loss,
        ppl.tokens,
        dataset.len()
    );
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
