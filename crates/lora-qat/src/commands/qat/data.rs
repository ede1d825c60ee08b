//! The data of a `qat` run: `--data` packed (10% held out unless `--heldout`), or the
//! model's own sequences (data-free, saved in the work directory so a resume reuses them),
//! and the held-out tokens of the table.

use std::path::Path;

use lm::LlamaModel;
use lora_qat::text::ModelText;
use qat_train::data::Dataset;
use qat_train::data_free::{teacher_sequences, DataFreeConfig};

use super::{file_error, progress_bar, QatArgs, RunFiles};
use crate::commands::train::read_dataset;
use crate::commands::{CliError, CliResult};

/// Writes `sequences` as pre-tokenized JSONL (`{"input_ids": [...]}` per line), atomically.
fn save_sequences(path: &Path, sequences: &[Vec<u32>]) -> CliResult {
    let mut text = String::new();
    for ids in sequences {
        text.push_str(&serde_json::json!({ "input_ids": ids }).to_string());
        text.push('\n');
    }
    quant_core::io::write_atomic(path, text.as_bytes())?;
    Ok(())
}

/// The data-free sequences in `path`, or written by `teacher` (and saved there) when the file
/// does not exist yet: a resumed run trains on the very sequences it started with.
pub(super) fn teacher_dataset(
    teacher: &mut LlamaModel,
    config: &DataFreeConfig,
    path: &Path,
    what: &str,
    quiet: bool,
) -> CliResult<Dataset> {
    if path.is_file() {
        let data = Dataset::from_jsonl_file(path)?;
        if data.len() != config.sequences {
            return Err(file_error(
                path,
                format!(
                    "{} sequences saved, this run asks for {}: delete the file or resume with \
                     the same settings",
                    data.len(),
                    config.sequences
                ),
            ));
        }
        return Ok(data);
    }
    let bar = progress_bar(config.sequences as u64, quiet, what)?;
    // The teacher writes `config.batch` sequences at once; the bar moves as each finishes.
    let data = teacher_sequences(teacher, config, &mut |_, _| bar.inc(1))?;
    bar.finish_and_clear();
    let sequences: Vec<Vec<u32>> = data
        .examples()
        .iter()
        .map(|e| e.input_ids.clone())
        .collect();
    save_sequences(path, &sequences)?;
    Ok(data)
}

/// The run's training data and held-out tokens (with the BOS the evaluation puts first).
pub(super) struct RunData {
    pub(super) train: Dataset,
    pub(super) heldout: Vec<u32>,
    pub(super) heldout_source: String,
    pub(super) bos: Option<u32>,
}

pub(super) fn run_data(
    args: &QatArgs,
    model_dir: &Path,
    files: &RunFiles,
    teacher: &mut LlamaModel,
) -> CliResult<RunData> {
    let tc = teacher.config().clone();
    let data_free = |seed: u64, sequences: usize| DataFreeConfig {
        sequences,
        seq_len: args.seq_len,
        greedy_tokens: args.greedy_tokens,
        batch: args.teacher_batch,
        seed,
        // Control tokens are no start of text; the model's end token closes a sequence.
        exclude_start: tc
            .bos_token_id
            .into_iter()
            .chain(tc.eos_token_ids.clone())
            .collect(),
        eos: tc.eos_token_ids.first().copied(),
        ..DataFreeConfig::new(seed)
    };
    let (train, held_examples) = match &args.data {
        Some(path) => {
            let data = read_dataset(path, model_dir)?;
            let (train, held) = if args.heldout.is_none() {
                let (t, h) = data.split(0.1, args.seed)?;
                (t, Some(h))
            } else {
                (data, None)
            };
            (train.packed(args.seq_len)?, held)
        }
        None => {
            let n = args
                .sequences
                .unwrap_or((args.steps as usize).saturating_mul(args.batch_size).max(1));
            let train = teacher_dataset(
                teacher,
                &data_free(args.seed, n),
                &files.sequences(),
                "teacher writes training data",
                args.quiet,
            )?;
            let held = if args.heldout.is_none() {
                // Another seed: none of these sequences is trained on.
                let seed = args.seed ^ 0x05EE_D0F4_E1D0_u64;
                let n = (2 * args.ctx).div_ceil(args.seq_len).max(16);
                Some(teacher_dataset(
                    teacher,
                    &data_free(seed, n),
                    &files.heldout_sequences(),
                    "teacher writes held-out data",
                    args.quiet,
                )?)
            } else {
                None
            };
            (train.packed(args.seq_len)?, held)
        }
    };
    let (heldout, heldout_source, bos) = match (&args.heldout, held_examples) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e))?;
            let model_text = ModelText::load(model_dir)?;
            let ids = model_text.encode(&text, false)?;
            let bos = model_text
                .bos_token()
                .and_then(|b| model_text.tokenizer().token_to_id(b));
            (ids, path.display().to_string(), bos)
        }
        (None, Some(held)) => {
            let ids: Vec<u32> = held
                .examples()
                .iter()
                .flat_map(|e| e.input_ids.iter().copied())
                .collect();
            let source = if args.data.is_some() {
                "10% of --data held out".to_string()
            } else {
                "sequences the model wrote under another seed".to_string()
            };
            (ids, source, None)
        }
        // Held-out examples are made above whenever --heldout is absent.
        (None, None) => {
            return Err(CliError::Usage(
                "no held-out text: give --heldout FILE".into(),
            ))
        }
    };
    Ok(RunData {
        train,
        heldout,
        heldout_source,
        bos,
    })
}
