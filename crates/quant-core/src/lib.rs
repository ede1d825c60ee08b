//! # quant-core
//!
//! The numeric floor of lora-qat. This crate maps `f32` weights to 2–8-bit codes and back —
//! uniform (symmetric or zero-point) and Pi-step grids at tensor, channel, token or block
//! granularity, and the NF4/FP4 codebooks of bitsandbytes with blockwise absmax scales and
//! double quantization, bit-identical to bitsandbytes — packs those codes into bytes, and
//! provides the straight-through estimators (standard, clipped, LSQ, EWGS) that let a
//! gradient pass through a quantizer. It also holds the Hadamard incoherence rotation,
//! calibration statistics, and [`linalg::gemm`], the single matrix-multiply entry point every
//! layer above calls. It knows nothing of adapters, models or training.
//!
//! ggml's block formats ([`ggml`]) are quantizers too and live here; the file containers
//! (GGUF, safetensors streaming, crash-safe writes) are the `formats` crate's, re-exported
//! under their old paths ([`gguf`], [`io`], [`safetensors_stream`]) so callers need not care.
//!
//! ```
//! use quant_core::linalg::gemm;
//! use ndarray::array;
//!
//! let x = array![[1.0f32, 2.0], [3.0, 4.0]];
//! let w = array![[1.0f32, 0.0], [0.0, 1.0], [1.0, 1.0]]; // (out=3, in=2)
//! let mut y = ndarray::Array2::<f32>::zeros((2, 3));
//! // y = x · wᵀ without copying the transpose.
//! gemm(1.0, x.view(), w.t(), 0.0, y.view_mut()).unwrap();
//! assert_eq!(y, array![[1.0, 2.0, 3.0], [3.0, 4.0, 7.0]]);
//! ```

pub mod calibration;
pub mod codebook;
pub mod config;
pub mod error;
pub mod ggml;
pub mod gguf;
pub mod hadamard;
pub mod incoherence;
/// Safetensors dtype conversion, owned tensors, crash-safe writes (the `formats` crate's).
pub use formats::io;
pub mod linalg;
pub mod nf4;
pub mod nf4_grid;
pub mod packed_layout;
pub mod packing;
pub mod pi;
pub mod quantizer;
pub mod rounding;
/// Safetensors one tensor at a time (the `formats` crate's).
pub use formats::safetensors_stream;
pub mod ste;
pub mod uniform;

pub use error::{QuantError, Result};
/// The error type of the re-exported containers; converts into [`QuantError`].
pub use formats::FormatError;
