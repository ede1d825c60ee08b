//! `lora-qat quantize`: quantize the 2-D floating-point tensors of a safetensors file.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::ArrayView2;
use regex::Regex;
use safetensors::SafeTensors;

use quant_core::io::{read_file, tensor_to_f32, write_safetensors, OwnedTensor};
use quant_core::nf4::bnb_layout::to_bnb_tensors;
use quant_core::nf4::{FourBitTensor, FourBitType};
use quant_core::quantizer::InitMethod;
use quant_core::uniform::{quantize_tensor, Granularity, GridKind, TensorQuantSpec};

use super::{CliError, CliResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// bitsandbytes NF4 (4 bits, blockwise absmax).
    Nf4,
    /// bitsandbytes FP4 (4 bits, blockwise absmax).
    Fp4,
    /// Uniform grid, 2–8 bits (project layout, docs/FORMATS.md).
    Uniform,
    /// Uniform grid with step α·π/k, 2–8 bits (project layout, docs/FORMATS.md).
    Pi,
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Quantization method.
    #[arg(long, value_enum, default_value = "nf4")]
    pub method: Method,
    /// NF4/FP4: values per absmax block (a power of two, 32..=4096).
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
    /// NF4/FP4: quantize the block absmax values again to 8 bits (bitsandbytes
    /// `compress_statistics`, transformers' `bnb_4bit_use_double_quant`).
    #[arg(long)]
    pub double_quant: bool,
    /// Uniform/Pi: bits per weight, 2..=8.
    #[arg(long, default_value_t = 4)]
    pub bits: u32,
    /// Uniform/Pi: which weights share a scale: `per-tensor`, `per-channel` (one per row of an
    /// (out, in) weight) or `per-block:N` (N consecutive weights of a row).
    #[arg(long, default_value = "per-channel", value_parser = parse_granularity)]
    pub granularity: Granularity,
    /// Uniform/Pi: use an asymmetric grid with a zero point (default symmetric).
    #[arg(long)]
    pub asymmetric: bool,
    /// Pi: the divisor k of the step α·π/k (2..=5).
    #[arg(long, default_value_t = 3)]
    pub pi_k: u32,
    /// Uniform/Pi: pick each group's clipping range by minimising the squared error instead
    /// of using its absolute maximum.
    #[arg(long)]
    pub mse_clip: bool,
    /// Quantize only tensors whose name matches this regular expression (default: every
    /// 2-D f32/f16/bf16 tensor). Other tensors are copied unchanged.
    #[arg(long)]
    pub include: Option<String>,
    /// Input safetensors file.
    pub input: PathBuf,
    /// Output safetensors file (written to a temporary file, then renamed).
    pub output: PathBuf,
}

fn parse_granularity(s: &str) -> Result<Granularity, String> {
    match s {
        "per-tensor" => Ok(Granularity::PerTensor),
        "per-channel" => Ok(Granularity::PerChannel),
        _ => match s.strip_prefix("per-block:") {
            Some(n) => n
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .map(|size| Granularity::PerBlock { size })
                .ok_or_else(|| format!("`{s}`: the block size must be a positive integer")),
            None => Err(format!(
                "`{s}`: expected per-tensor, per-channel or per-block:N"
            )),
        },
    }
}

/// What one quantized tensor cost and how far it moved.
struct TensorReport {
    name: String,
    shape: Vec<usize>,
    rmse: f64,
    max_abs: f64,
    bits_per_weight: f64,
}

pub fn run(args: &QuantizeArgs) -> CliResult {
    let include = args
        .include
        .as_deref()
        .map(Regex::new)
        .transpose()
        .map_err(|e| CliError::Usage(format!("--include: {e}")))?;
    let bytes = read_file(&args.input)?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| CliError::File {
        path: args.input.display().to_string(),
        reason: format!("not a safetensors file: {e}"),
    })?;
    let metadata = SafeTensors::read_metadata(&bytes)
        .ok()
        .and_then(|(_, m)| m.metadata().clone());

    let mut names: Vec<String> = file.names().into_iter().map(str::to_string).collect();
    names.sort();
    let selected: Vec<&String> = names
        .iter()
        .filter(|n| {
            let view = file.tensor(n).expect("name listed by the file");
            is_float_matrix(&view) && include.as_ref().is_none_or(|re| re.is_match(n))
        })
        .collect();
    if selected.is_empty() {
        return Err(CliError::Usage(format!(
            "{}: no 2-D f32/f16/bf16 tensor{} to quantize",
            args.input.display(),
            if include.is_some() {
                " matches --include"
            } else {
                ""
            }
        )));
    }

    let progress = ProgressBar::new(selected.len() as u64);
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
            .expect("static progress template"),
    );
    let mut out: Vec<(String, OwnedTensor)> = Vec::new();
    let mut reports = Vec::new();
    for name in &names {
        let view = file.tensor(name).expect("name listed by the file");
        if !selected.contains(&name) {
            out.push((name.clone(), OwnedTensor::from_view(&view)));
            continue;
        }
        progress.set_message(name.clone());
        let values = tensor_to_f32(name, &view)?;
        let shape = view.shape().to_vec();
        let (tensors, report) = quantize_one(args, name, &shape, &values)?;
        out.extend(tensors);
        reports.push(report);
        progress.inc(1);
    }
    progress.finish_and_clear();
    write_safetensors(&args.output, &out, metadata)?;
    print_reports(args, &reports);
    Ok(())
}

fn is_float_matrix(view: &safetensors::tensor::TensorView<'_>) -> bool {
    use safetensors::Dtype;
    view.shape().len() == 2 && matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

fn quantize_one(
    args: &QuantizeArgs,
    name: &str,
    shape: &[usize],
    values: &[f32],
) -> CliResult<(Vec<(String, OwnedTensor)>, TensorReport)> {
    let original = ArrayView2::from_shape((shape[0], shape[1]), values)
        .map_err(|e| CliError::Usage(format!("tensor `{name}`: {e}")))?;
    let in_context =
        |e: quant_core::QuantError| CliError::Usage(format!("tensor `{name}` {shape:?}: {e}"));
    match args.method {
        Method::Nf4 | Method::Fp4 => {
            let kind = if args.method == Method::Nf4 {
                FourBitType::Nf4
            } else {
                FourBitType::Fp4
            };
            let q = FourBitTensor::quantize(values, shape, args.blocksize, kind, args.double_quant)
                .map_err(in_context)?;
            let mut restored = vec![0.0f32; values.len()];
            q.dequantize_into(&mut restored)?;
            let stats = quant_core::uniform::error_stats(
                original,
                ArrayView2::from_shape((shape[0], shape[1]), &restored)
                    .expect("same shape as the input"),
            )?;
            let tensors = to_bnb_tensors(name, &q)
                .into_iter()
                .map(|(n, t)| (n, OwnedTensor::from(t)))
                .collect();
            Ok((
                tensors,
                TensorReport {
                    name: name.to_string(),
                    shape: shape.to_vec(),
                    rmse: stats.rmse,
                    max_abs: stats.max_abs,
                    bits_per_weight: q.bits_per_weight(),
                },
            ))
        }
        Method::Uniform | Method::Pi => {
            let spec = TensorQuantSpec {
                kind: if args.method == Method::Pi {
                    GridKind::Pi { k: args.pi_k }
                } else {
                    GridKind::Uniform
                },
                bits: args.bits,
                granularity: args.granularity,
                symmetric: !args.asymmetric,
                init: if args.mse_clip {
                    InitMethod::MseClipSearch
                } else {
                    InitMethod::Absmax
                },
            };
            let q = quantize_tensor(original, &spec).map_err(in_context)?;
            let stats = q.error_stats(original)?;
            let tensors = quant_core::packed_layout::to_tensors(name, &q, &spec)?;
            Ok((
                tensors,
                TensorReport {
                    name: name.to_string(),
                    shape: shape.to_vec(),
                    rmse: stats.rmse,
                    max_abs: stats.max_abs,
                    bits_per_weight: q.bits_per_weight(),
                },
            ))
        }
    }
}

fn print_reports(args: &QuantizeArgs, reports: &[TensorReport]) {
    let width = reports
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(4)
        .max(6);
    println!(
        "{:<width$}  {:>14}  {:>11}  {:>11}  {:>8}",
        "tensor", "shape", "rmse", "max_abs", "bits/w"
    );
    let (mut weights, mut bits) = (0usize, 0.0f64);
    for r in reports {
        let n: usize = r.shape.iter().product();
        weights += n;
        bits += r.bits_per_weight * n as f64;
        println!(
            "{:<width$}  {:>14}  {:>11.3e}  {:>11.3e}  {:>8.3}",
            r.name,
            format!("{:?}", r.shape),
            r.rmse,
            r.max_abs,
            r.bits_per_weight
        );
    }
    println!(
        "{} tensors, {} weights quantized at {:.3} bits per weight -> {}",
        reports.len(),
        weights,
        bits / weights.max(1) as f64,
        args.output.display()
    );
}
