//! Unit tests of `config` (moved out of the module file, which keeps the code).

use super::*;

#[test]
fn list_targets_match_exact_names_and_dot_suffixes_only() {
    let t = TargetModules::Names(vec!["q_proj".into(), "model.lm_head".into()]);
    assert!(t.matches("q_proj"));
    assert!(t.matches("model.layers.3.self_attn.q_proj"));
    assert!(!t.matches("model.layers.3.self_attn.xq_proj"));
    assert!(!t.matches("model.layers.3.self_attn.q_proj.base"));
    assert!(t.matches("model.lm_head"));
}

#[test]
fn string_targets_are_full_match_regexes() {
    let t = TargetModules::Regex(r".*layers\.0\..*(q|v)_proj".into());
    assert!(t.matches("model.layers.0.self_attn.q_proj"));
    assert!(!t.matches("model.layers.1.self_attn.q_proj"));
    // Full match: a prefix match is not enough.
    let t = TargetModules::Regex("q_proj".into());
    assert!(!t.matches("model.layers.0.self_attn.q_proj"));
    assert!(t.matches("q_proj"));
}

#[test]
fn patterns_take_the_first_match_in_file_order() {
    let json = r#"{"r": 8, "target_modules": ["q_proj"],
            "rank_pattern": {"layers\\.1\\..*": 2, "q_proj": 4},
            "alpha_pattern": {"q_proj": 3}}"#;
    let c: LoraConfig = serde_json::from_str(json).unwrap();
    c.validate().unwrap();
    assert_eq!(c.rank_for("model.layers.1.self_attn.q_proj"), 2);
    assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj"), 4);
    assert_eq!(c.rank_for("model.layers.0.self_attn.v_proj"), 8);
    assert_eq!(c.alpha_for("model.layers.0.self_attn.q_proj"), 3.0);
    assert_eq!(c.alpha_for("model.layers.0.self_attn.xq_proj"), 8.0);
    // Order survives writing.
    let s = serde_json::to_string(&c).unwrap();
    assert!(
        s.find("layers").unwrap() < s.find("\"q_proj\":4").unwrap(),
        "{s}"
    );
}

#[test]
fn exclude_modules_wins_over_targets() {
    let mut c = LoraConfig::new(4, 8.0, &["q_proj"]);
    c.exclude_modules = Some(TargetModules::Names(vec![
        "layers.1.self_attn.q_proj".into()
    ]));
    assert!(c.matches("model.layers.0.self_attn.q_proj"));
    assert!(!c.matches("model.layers.1.self_attn.q_proj"));
}

#[test]
fn invalid_options_are_named() {
    let base = LoraConfig::new(4, 8.0, &["q_proj"]);
    type Mutation = Box<dyn Fn(&mut LoraConfig)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (Box::new(|c| c.r = 0), "r ="),
        (Box::new(|c| c.lora_alpha = 0.0), "lora_alpha"),
        (Box::new(|c| c.lora_alpha = f64::NAN), "lora_alpha"),
        (Box::new(|c| c.lora_dropout = 1.0), "lora_dropout"),
        (Box::new(|c| c.lora_dropout = -0.1), "lora_dropout"),
        (Box::new(|c| c.bias = "lora_only".into()), "bias"),
        (Box::new(|c| c.target_modules = None), "target_modules"),
        (
            Box::new(|c| c.target_modules = Some(TargetModules::Regex("(".into()))),
            "target_modules",
        ),
        (
            Box::new(|c| c.rank_pattern = PatternMap(vec![("q".into(), 0)])),
            "rank_pattern",
        ),
        (
            Box::new(|c| {
                c.extra
                    .insert("layers_to_transform".into(), serde_json::json!([0]));
            }),
            "layers_to_transform",
        ),
        (
            Box::new(|c| {
                c.extra.insert("lora_bias".into(), Value::Bool(true));
            }),
            "lora_bias",
        ),
        (Box::new(|c| c.peft_type = "IA3".into()), "peft_type"),
    ];
    for (mutate, needle) in cases {
        let mut c = base.clone();
        mutate(&mut c);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(needle), "{e:?} should name {needle:?}");
    }
}

#[test]
fn init_values_read_and_write_like_peft() {
    for (json, init) in [
        ("true", InitLoraWeights::Kaiming),
        ("false", InitLoraWeights::Random),
        ("\"gaussian\"", InitLoraWeights::Gaussian),
        ("\"pissa\"", InitLoraWeights::Pissa),
        ("\"olora\"", InitLoraWeights::Other("olora".into())),
    ] {
        let parsed: InitLoraWeights = serde_json::from_str(json).unwrap();
        assert_eq!(parsed, init);
        assert_eq!(serde_json::to_string(&parsed).unwrap(), json);
    }
    assert!(serde_json::from_str::<InitLoraWeights>("3").is_err());
}

#[test]
fn null_patterns_and_integer_alpha() {
    let c: LoraConfig = serde_json::from_str(
        r#"{"r": 2, "lora_alpha": 16, "rank_pattern": null, "target_modules": "a.*"}"#,
    )
    .unwrap();
    assert!(c.rank_pattern.0.is_empty());
    let s = serde_json::to_string(&c).unwrap();
    assert!(s.contains("\"lora_alpha\":16,"), "{s}");
    assert!(s.contains("\"target_modules\":\"a.*\""), "{s}");
}
