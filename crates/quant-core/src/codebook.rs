//! The 4-bit codebooks of bitsandbytes, indexed by the 4-bit code.
//!
//! These are the exact `f32` values bitsandbytes 0.50 uses (`get_4bit_type`), checked against
//! the `code` tensor of every reference file in `tests/data/nf4/`.

/// NF4 (NormalFloat4, Dettmers et al. 2023): quantiles of N(0,1) rescaled to [-1, 1], with an
/// exact zero. Sorted ascending, so the code is the rank.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// FP4 (e2m1 with bitsandbytes' bias) divided by its maximum 12: code bit 3 is the sign, so the
/// table is not sorted; codes 0 and 8 are +0 and −0.
pub const FP4_CODE: [f32; 16] = [
    0.0,
    0.005_208_333_5,
    0.666_666_7,
    1.0,
    0.333_333_34,
    0.5,
    0.166_666_67,
    0.25,
    0.0,
    -0.005_208_333_5,
    -0.666_666_7,
    -1.0,
    -0.333_333_34,
    -0.5,
    -0.166_666_67,
    -0.25,
];
