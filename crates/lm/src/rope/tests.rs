//! Inverse frequencies of every rope type against values computed by hand (Python `math`,
//! f64) from the formulas of transformers' `modeling_rope_utils.py`; committed numbers.

use super::*;
use serde_json::json;

fn rope(params: Value, dim: usize, config: Value) -> Rope {
    let config = config.as_object().unwrap().clone();
    Rope::parse("rope_parameters", params.as_object(), None, dim, &config).unwrap()
}

fn close(got: &[f32], expected: &[f64]) {
    assert_eq!(got.len(), expected.len());
    for (g, e) in got.iter().zip(expected) {
        assert!(
            (*g as f64 - e).abs() <= 1e-6 * e.abs().max(1e-3),
            "{got:?} vs {expected:?}"
        );
    }
}

#[test]
fn every_rope_type_matches_the_reference_formulas() {
    let cfg = json!({"max_position_embeddings": 32});
    let linear = rope(
        json!({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
        8,
        cfg.clone(),
    );
    close(&linear.inv_freq(4).0, &[0.25, 0.025, 0.0025, 0.00025]);

    let dynamic = rope(
        json!({"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 8}),
        8,
        cfg.clone(),
    );
    // Within the original length: the default frequencies; at 16 positions θ grows.
    close(&dynamic.inv_freq(8).0, &[1.0, 0.1, 0.01, 0.001]);
    close(
        &dynamic.inv_freq(16).0,
        &[
            1.0,
            0.069_336_127_435_063_47,
            0.004_807_498_567_691_361,
            0.000_333_333_333_333_333_4,
        ],
    );

    let yarn = rope(
        json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}),
        8,
        cfg.clone(),
    );
    let (inv, attention) = yarn.inv_freq(4);
    close(&inv, &[1.0, 0.1, 0.00625, 0.00025]);
    close(&[attention], &[1.138_629_436_111_989]);

    let longrope = rope(
        json!({"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 2.5],
               "long_factor": [3.0, 4.0, 5.0, 6.0]}),
        8,
        json!({"max_position_embeddings": 32, "original_max_position_embeddings": 8}),
    );
    let (short, attention) = longrope.inv_freq(8);
    close(&short, &[1.0, 0.066_666_666_666_666_67, 0.005, 0.0004]);
    close(&[attention], &[1.290_994_448_735_805_6]);
    close(
        &longrope.inv_freq(9).0,
        &[
            0.333_333_333_333_333_3,
            0.025,
            0.002,
            0.000_166_666_666_666_666_66,
        ],
    );

    let llama3 = rope(
        json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        16,
        cfg,
    );
    close(
        &llama3.inv_freq(4).0,
        &[
            1.0,
            0.095_839_985_882_962_66,
            0.0125,
            0.003_952_847_075_210_474,
            0.00125,
            0.000_395_284_707_521_047_37,
            0.000125,
            3.952_847_075_210_474e-5,
        ],
    );
}

#[test]
fn unknown_rope_types_and_options_are_refused_by_name() {
    let cfg = json!({}).as_object().unwrap().clone();
    let p = json!({"rope_type": "su"});
    let e = Rope::parse("rope_scaling", p.as_object(), None, 8, &cfg).unwrap_err();
    assert!(
        e.to_string().contains("rope_scaling.rope_type") && e.to_string().contains("su"),
        "{e}"
    );
    let p = json!({"rope_type": "linear", "factor": 2.0, "beta_fast": 3.0});
    let e = Rope::parse("rope_parameters", p.as_object(), None, 8, &cfg).unwrap_err();
    assert!(e.to_string().contains("rope_parameters.beta_fast"), "{e}");
}
