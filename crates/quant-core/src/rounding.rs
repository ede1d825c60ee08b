//! Rounding and the scalar fake-quantization step shared by every uniform-grid quantizer.

/// Rounds half to even, as `torch.round` and IEEE 754 `roundTiesToEven` do.
///
/// ```
/// use quant_core::rounding::round_half_even;
/// assert_eq!(round_half_even(0.5), 0.0);
/// assert_eq!(round_half_even(1.5), 2.0);
/// assert_eq!(round_half_even(-2.5), -2.0);
/// assert_eq!(round_half_even(2.6), 3.0);
/// ```
#[inline]
pub fn round_half_even(x: f32) -> f32 {
    x.round_ties_even()
}

/// The integer code of `x` on the grid `scale·(q − zero_point)`, `q ∈ [qmin, qmax]`:
/// `clamp(round(x / scale) + zero_point, qmin, qmax)`.
///
/// ```
/// use quant_core::rounding::quantize_scalar;
/// assert_eq!(quantize_scalar(0.26, 0.1, 0.0, -4.0, 3.0), 3.0);
/// assert_eq!(quantize_scalar(-9.0, 0.1, 0.0, -4.0, 3.0), -4.0);
/// ```
#[inline]
pub fn quantize_scalar(x: f32, scale: f32, zero_point: f32, qmin: f32, qmax: f32) -> f32 {
    (round_half_even(x / scale) + zero_point).clamp(qmin, qmax)
}

/// Quantize then dequantize one value: `(quantize_scalar(x) − zero_point)·scale`.
///
/// ```
/// use quant_core::rounding::fake_quant_scalar;
/// assert!((fake_quant_scalar(0.26, 0.1, 0.0, -4.0, 3.0) - 0.3).abs() < 1e-6);
/// ```
#[inline]
pub fn fake_quant_scalar(x: f32, scale: f32, zero_point: f32, qmin: f32, qmax: f32) -> f32 {
    (quantize_scalar(x, scale, zero_point, qmin, qmax) - zero_point) * scale
}
