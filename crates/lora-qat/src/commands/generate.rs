//! `lora-qat generate`: continue a prompt of token ids with a key/value cache.

use std::path::PathBuf;

use clap::Args;
use lm::Sampling;

use super::logits::load_model;
use super::CliResult;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Hugging Face model directory (config.json + model.safetensors or a sharded index).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// PEFT adapter directory to apply.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Prompt token ids, comma-separated (e.g. 1,2,3).
    #[arg(long, value_name = "IDS", value_delimiter = ',', required = true)]
    pub prompt_ids: Vec<u32>,
    /// Most new tokens to generate.
    #[arg(long, default_value_t = 20)]
    pub max_new: usize,
    /// Sampling temperature (> 0); without it decoding is greedy.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Seed of the sampler (ChaCha8) when sampling with a temperature.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop after this token id (it is printed); default: the config's first eos_token_id.
    #[arg(long)]
    pub eos: Option<u32>,
    /// Do not stop at an end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
}

pub fn run(args: &GenerateArgs) -> CliResult {
    let mut model = load_model(&args.model, args.adapter.as_deref())?;
    let sampling = match args.temperature {
        None => Sampling::Greedy,
        Some(temperature) => Sampling::Temperature {
            temperature,
            seed: args.seed,
        },
    };
    let eos = if args.ignore_eos {
        None
    } else {
        args.eos
            .or_else(|| model.config().eos_token_ids.first().copied())
    };
    let ids = model.generate(&args.prompt_ids, args.max_new, &sampling, eos)?;
    let text: Vec<String> = ids.iter().map(u32::to_string).collect();
    println!("{}", text.join(","));
    Ok(())
}
