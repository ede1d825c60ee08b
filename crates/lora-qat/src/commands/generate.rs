//! `lora-qat generate`: continue a text prompt (optionally through the model's chat template)
//! or a prompt of token ids with a key/value cache, streaming the text as it is decoded.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

use clap::Args;
use lm::sampling::{LogitsSampler, SamplingConfig};
use lora_qat::text::{ChatMessage, ModelText, TextStreamer};

use super::logits::load_model;
use super::{resolve_model_arg, CliError, CliResult};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Hugging Face model directory (config.json + model.safetensors or a sharded index), a
    /// llama.cpp GGUF file (dequantized; tokenizer and chat template from its metadata), or a
    /// hub id (org/name) in the local Hugging Face cache.
    #[arg(long, value_name = "DIR|FILE.gguf|ID")]
    pub model: PathBuf,
    /// Revision of a hub id (branch, tag or commit; default main).
    #[arg(long)]
    pub revision: Option<String>,
    /// Adapter directory to apply: PEFT LoRA, or LoRA-QAT (with qat_quantizers.safetensors),
    /// which generates with its trained quantized weights Q(W + s·B·A).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Prompt text, tokenized with the model's tokenizer; the continuation is printed as text.
    #[arg(
        long,
        value_name = "TEXT",
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    pub prompt: Option<String>,
    /// Prompt token ids, comma-separated (e.g. 1,2,3); the new ids are printed.
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Apply the model's chat template: --prompt is the user's message (after --system), and
    /// the assistant's turn is generated.
    #[arg(long, requires = "prompt")]
    pub chat: bool,
    /// System message of the chat (with --chat).
    #[arg(long, value_name = "TEXT", requires = "chat")]
    pub system: Option<String>,
    /// Most new tokens to generate (default 20 for --prompt-ids, 256 for --prompt).
    #[arg(long)]
    pub max_new: Option<usize>,
    /// Sample with this temperature (> 0) instead of greedy decoding.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Sample from the k most likely tokens (turns sampling on).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample from the most likely tokens whose probability reaches p (turns sampling on).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than min-p times the most likely one (turns sampling on).
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Penalise tokens already in the sequence (> 1 discourages repeats; also when greedy).
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Seed of the sampler (ChaCha8).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the generated text contains this string (not printed); repeatable.
    #[arg(long, value_name = "TEXT", requires = "prompt")]
    pub stop: Vec<String>,
    /// Stop after this token id; default: the eos ids of config.json, generation_config.json
    /// and the tokenizer.
    #[arg(long)]
    pub eos: Option<u32>,
    /// Do not stop at an end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Precision of the matrix products: f32, or bf16 (operands rounded to bf16, sums in
    /// f32, as PyTorch's CPU autocast; weights, norms, softmax and loss stay f32).
    #[arg(long, value_name = "f32|bf16", default_value = "f32", value_parser = super::parse_compute_dtype)]
    pub compute_dtype: quant_core::linalg::ComputeDtype,
}

fn sampling_config(args: &GenerateArgs) -> CliResult<SamplingConfig> {
    let do_sample = args.temperature.is_some()
        || args.top_k.is_some()
        || args.top_p.is_some()
        || args.min_p.is_some();
    let config = SamplingConfig {
        do_sample,
        temperature: args.temperature.unwrap_or(1.0),
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    };
    config
        .validate()
        .map_err(|e| CliError::Usage(format!("sampling options: {e}")))?;
    Ok(config)
}

pub fn run(args: &GenerateArgs) -> CliResult {
    let model_path = resolve_model_arg(&args.model, args.revision.as_deref())?;
    let mut sampler = LogitsSampler::new(sampling_config(args)?)?;
    let mut model = load_model(&model_path, args.adapter.as_deref())?;
    model.set_compute_dtype(args.compute_dtype);
    let text = match &args.prompt {
        Some(_) => Some(ModelText::load(&model_path)?),
        None => None,
    };
    let mut stop_ids: Vec<u32> = match args.eos {
        Some(id) => vec![id],
        None => model.config().eos_token_ids.clone(),
    };
    if let (None, Some(text)) = (args.eos, &text) {
        for &id in text.eos_ids() {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
    }
    if args.ignore_eos {
        stop_ids.clear();
    }
    match (&args.prompt_ids, &text, &args.prompt) {
        (Some(ids), _, _) => {
            let new = model.decode_stream(
                ids,
                args.max_new.unwrap_or(20),
                &mut sampler,
                &stop_ids,
                |_| ControlFlow::Continue(()),
            )?;
            let text: Vec<String> = new.iter().map(u32::to_string).collect();
            println!("{}", text.join(","));
            Ok(())
        }
        (None, Some(text), Some(prompt)) => {
            let prompt_ids = if args.chat {
                let mut messages = Vec::new();
                if let Some(system) = &args.system {
                    messages.push(ChatMessage::new("system", system));
                }
                messages.push(ChatMessage::new("user", prompt));
                let rendered = text.require_chat_template()?.render(&messages, true)?;
                text.encode(&rendered, false)?
            } else {
                text.encode(prompt, true)?
            };
            if prompt_ids.is_empty() {
                return Err(CliError::Usage("--prompt tokenizes to no tokens".into()));
            }
            let mut streamer = TextStreamer::new(text, true, &args.stop);
            let mut stdout = std::io::stdout().lock();
            let mut failure: Option<CliError> = None;
            model.decode_stream(
                &prompt_ids,
                args.max_new.unwrap_or(256),
                &mut sampler,
                &stop_ids,
                |id| {
                    let piece = match streamer.push(id) {
                        Ok(piece) => piece,
                        Err(e) => {
                            failure = Some(e.into());
                            return ControlFlow::Break(());
                        }
                    };
                    if let Err(e) = stdout
                        .write_all(piece.as_bytes())
                        .and_then(|_| stdout.flush())
                    {
                        failure = Some(CliError::File {
                            path: "<stdout>".into(),
                            reason: e.to_string(),
                        });
                        return ControlFlow::Break(());
                    }
                    if streamer.stopped() {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                },
            )?;
            if let Some(e) = failure {
                return Err(e);
            }
            let rest = streamer.finish()?;
            writeln!(stdout, "{rest}").map_err(|e| CliError::File {
                path: "<stdout>".into(),
                reason: e.to_string(),
            })?;
            Ok(())
        }
        _ => Err(CliError::Usage(
            "give --prompt TEXT or --prompt-ids IDS".into(),
        )),
    }
}
