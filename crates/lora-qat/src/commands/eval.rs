//! `lora-qat eval`: perplexity of a model (optionally with a PEFT or LoRA-QAT adapter) on a
//! dataset in any format `train --data` reads (text, chat, prompt-completion or token JSONL),
//! and exact-match accuracy when the lines are demo-task problems; with `--reference`, the
//! model against a full-precision reference as llama.cpp's `perplexity --kl-divergence`
//! measures it (`qat_train::quality`).

use std::path::{Path, PathBuf};

use clap::Args;
use lora_qat::demo::eval::{exact_match, perplexity};
use lora_qat::demo::task::{Problem, Tokenizer};
use lora_qat::text::{examples_from_file, DataFormat, ModelText};

use super::logits::load_model;
use super::{resolve_model_arg, CliError, CliResult};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Hugging Face model directory (config.json + model.safetensors or a sharded index), a
    /// llama.cpp GGUF file (dequantized; tokenizer from its metadata), or a hub id
    /// (org/name) in the local Hugging Face cache.
    #[arg(long, value_name = "DIR|FILE.gguf|ID")]
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
    /// Full-precision reference model directory: compare --model (with --adapter) against it
    /// as llama.cpp's `perplexity --kl-divergence` does — mean and 99th-percentile
    /// KL(P_ref ‖ P_q) per token, top-1 agreement and both perplexities over the second half
    /// of each --ctx chunk of --data (plain text read as one stream and tokenized with the
    /// model's tokenizer, bos at each chunk's start; or token JSONL, its `input_ids`
    /// concatenated).
    #[arg(long, value_name = "DIR|ID")]
    pub reference: Option<PathBuf>,
    /// Tokens per chunk of the KL-divergence comparison (llama.cpp's -c; default 512).
    #[arg(long, value_name = "N", default_value_t = 512, requires = "reference")]
    pub ctx: usize,
    /// Precision of the matrix products: f32, or bf16 (operands rounded to bf16, sums in
    /// f32, as PyTorch's CPU autocast; weights, norms, softmax and loss stay f32), of the
    /// model and of --reference alike.
    #[arg(long, value_name = "f32|bf16", default_value = "f32", value_parser = super::parse_compute_dtype)]
    pub compute_dtype: quant_core::linalg::ComputeDtype,
}

/// The token stream of `path` for the KL-divergence comparison and the bos id to put at each
/// chunk's start: token JSONL lines' `input_ids` concatenated (no bos), or the whole text
/// tokenized with the model's tokenizer (bos when the tokenizer names one).
fn token_stream(path: &Path, model_dir: &Path) -> CliResult<(Vec<u32>, Option<u32>)> {
    let text = std::fs::read_to_string(path).map_err(|e| CliError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let ids_of = |line: &str| -> Option<Vec<u32>> {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        value
            .get("input_ids")?
            .as_array()?
            .iter()
            .map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok()))
            .collect()
    };
    let parsed: Option<Vec<Vec<u32>>> = lines.iter().map(|l| ids_of(l)).collect();
    if let Some(parsed) = parsed.filter(|p| !p.is_empty()) {
        return Ok((parsed.concat(), None));
    }
    let model_text = ModelText::load(model_dir)?;
    let ids = model_text.encode(&text, false)?;
    let bos = model_text
        .bos_token()
        .and_then(|b| model_text.tokenizer().token_to_id(b));
    Ok((ids, bos))
}

/// `eval --reference`: the comparison and its printout.
fn compare(args: &EvalArgs, model_dir: &Path, reference: &Path) -> CliResult {
    let reference_dir = resolve_model_arg(reference, None)?;
    let (tokens, bos) = token_stream(&args.data, model_dir)?;
    let mut quantized = load_model(model_dir, args.adapter.as_deref())?;
    let mut reference_model = load_model(&reference_dir, None)?;
    quantized.set_compute_dtype(args.compute_dtype);
    reference_model.set_compute_dtype(args.compute_dtype);
    let r = qat_train::quality::compare_models(
        &mut quantized,
        &mut reference_model,
        &tokens,
        args.ctx,
        bos,
    )?;
    println!(
        "KL divergence over {} tokens ({} chunks of {}, second halves scored)",
        r.tokens,
        tokens.len() / args.ctx,
        args.ctx
    );
    println!(
        "Mean    KLD: {:10.6} ± {:10.6}",
        r.mean_kld, r.mean_kld_uncertainty
    );
    println!("99.0%   KLD: {:10.6}", r.kld_p99);
    println!("Median  KLD: {:10.6}", r.median_kld);
    println!("Maximum KLD: {:10.6}", r.max_kld);
    println!(
        "Same top p: {:7.3} ± {:5.3} %",
        100.0 * r.same_top,
        100.0 * r.same_top_uncertainty
    );
    println!("Mean PPL(Q)   : {:10.6}", r.perplexity);
    println!("Mean PPL(base): {:10.6}", r.reference_perplexity);
    Ok(())
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
    if let Some(reference) = &args.reference {
        return compare(args, &model_dir, reference);
    }
    let data = examples_from_file(&args.data, || ModelText::load(&model_dir))?;
    let dataset = data.dataset;
    let mut model = load_model(&model_dir, args.adapter.as_deref())?;
    model.set_compute_dtype(args.compute_dtype);
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
