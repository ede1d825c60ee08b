//! `lora-qat`: the command-line tool. Each subcommand lives in its own module under
//! `commands/`; this file only parses arguments and reports errors.

mod commands;

use clap::{Parser, Subcommand};

/// Fine-tune and compress language models with low-rank adapters under quantization.
#[derive(Debug, Parser)]
#[command(name = "lora-qat", version, about, long_about = None)]
struct Cli {
    /// Without a command, `demo` runs with its defaults.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The main job: post-training quantization against LoRA-QAT at 4, 3 and 2 bits on the
    /// embedded arithmetic task (the default command); `--pretrain` retrains the teacher.
    Demo(commands::demo::DemoArgs),
    /// Perplexity of a model (optionally with an adapter) on a JSONL dataset, and exact-match
    /// accuracy on demo-task problems.
    Eval(commands::eval::EvalArgs),
    /// Quantize the 2-D floating-point tensors of a safetensors file (NF4/FP4 in the
    /// bitsandbytes layout transformers reads, or uniform/Pi in this project's packed layout).
    Quantize(commands::quantize::QuantizeArgs),
    /// Logits (and loss, given labels) of a model, optionally with a PEFT adapter.
    Logits(commands::logits::LogitsArgs),
    /// Gradients of the loss for every tensor of a PEFT adapter, under PEFT's keys.
    Grads(commands::grads::GradsArgs),
    /// Continue a prompt of token ids (greedy or with a temperature).
    Generate(commands::generate::GenerateArgs),
    /// Fine-tune adapters (LoRA, DoRA, QLoRA, LoRA-QAT) on text or token data, optionally
    /// distilling from a teacher; writes a PEFT adapter, metrics CSV and a resumable checkpoint.
    Train(Box<commands::train::TrainArgs>),
    /// Merge a PEFT adapter into its base one tensor at a time and write a transformers
    /// checkpoint (dense f32/f16/bf16 or NF4), sharded past --max-shard-size.
    Merge(commands::merge::MergeArgs),
    /// Write a Llama model (optionally with an adapter merged) as a GGUF file for llama.cpp,
    /// or with --lora the adapter alone as a GGUF LoRA adapter.
    ExportGguf(commands::export_gguf::ExportGgufArgs),
    /// Quantize a model to a llama.cpp block type by LoRA-QAT distilled from itself (data-free
    /// without --data): PTQ and QAT GGUF files, a PTQ-vs-QAT quality table and report.
    Qat(Box<commands::qat::QatArgs>),
    /// Convert a llama.cpp GGUF model file into a transformers directory (config.json,
    /// model.safetensors in f32/f16/bf16, tokenizer.json, tokenizer_config.json).
    Convert(commands::convert::ConvertArgs),
    /// Summarise a model or adapter directory, a safetensors file or a GGUF file.
    Inspect(commands::inspect::InspectArgs),
    /// Time the library's kernels on this machine.
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // No command: `demo` with its defaults, parsed as if typed.
    let command = match cli.command {
        Some(command) => command,
        None => match Cli::parse_from(["lora-qat", "demo"]).command {
            Some(command) => command,
            None => unreachable!("`demo` parses as the demo command"),
        },
    };
    let result = match command {
        Command::Demo(args) => commands::demo::run(&args),
        Command::Eval(args) => commands::eval::run(&args),
        Command::Quantize(args) => commands::quantize::run(&args),
        Command::Logits(args) => commands::logits::run(&args),
        Command::Grads(args) => commands::grads::run(&args),
        Command::Generate(args) => commands::generate::run(&args),
        Command::Train(args) => commands::train::run(&args),
        Command::Merge(args) => commands::merge::run(&args),
        Command::ExportGguf(args) => commands::export_gguf::run(&args),
        Command::Qat(args) => commands::qat::run(&args),
        Command::Convert(args) => commands::convert::run(&args),
        Command::Inspect(args) => commands::inspect::run(&args),
        Command::Bench(cmd) => commands::bench::run(&cmd),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
