//! The optimizer, clipping and checkpoint primitives drive an `lm` model through its own
//! `visit_parameters`, wrapped in a `FnVisitor` (the way the trainer will plug in).

use lm::{LlamaConfig, LlamaModel};
use ndarray::array;
use qat_train::checkpoint::{Checkpoint, TrainRng};
use qat_train::optim::{AdamW, AdamWConfig, Optimizer, ParamGroups};
use qat_train::params::{clip_grad_norm, FnVisitor, ParamFn, ParamVisitor};
use qat_train::TrainError;

/// Visits the model's trainable tensors (those with a gradient buffer). `lm`'s callback must
/// return `lm::Result`, so the first `TrainError` is kept aside and the rest of the traversal
/// is skipped, then returned.
fn trainable(model: &mut LlamaModel) -> impl ParamVisitor + '_ {
    FnVisitor(move |f: &mut ParamFn<'_>| {
        let mut failure: Option<TrainError> = None;
        model.visit_parameters(|name, p| {
            if let (None, Some(grad)) = (&failure, p.grad) {
                if let Err(e) = f(name, p.value, grad) {
                    failure = Some(e);
                }
            }
            Ok(())
        })?;
        failure.map_or(Ok(()), Err)
    })
}

#[test]
fn adamw_trains_an_lm_model_and_checkpoints_restore_it() {
    let config = LlamaConfig::new(32, 16, 32, 2, 4, 2).unwrap();
    let mut model = LlamaModel::random(config.clone(), 7).unwrap();
    model.set_base_trainable(true);
    let ids = array![[1u32, 5, 9, 3, 7, 2]];
    let labels = array![[1i64, 5, 9, 3, 7, 2]];
    let mut opt = AdamW::new(
        AdamWConfig::default(),
        ParamGroups::single(1e-2, 0.0).unwrap(),
    )
    .unwrap();
    let mut losses = Vec::new();
    for _ in 0..15 {
        model.zero_grad();
        losses.push(
            model
                .loss_and_backward(ids.view(), labels.view(), None)
                .unwrap(),
        );
        let norm = clip_grad_norm(&mut trainable(&mut model), 1.0).unwrap();
        assert!(norm.is_finite() && norm > 0.0);
        opt.step(&mut trainable(&mut model), 1.0).unwrap();
    }
    assert!(
        losses[14] < 0.5 * losses[0],
        "memorising one sequence: {losses:?}"
    );

    let dir = std::env::temp_dir().join(format!("qat-lm-params-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ckpt = Checkpoint::new(opt.step_count(), TrainRng::new(0).state());
    ckpt.add_params(&mut trainable(&mut model)).unwrap();
    ckpt.set_optimizer(&opt.state()).unwrap();
    ckpt.save(&dir.join("lm.json")).unwrap();
    let loaded = Checkpoint::load(&dir.join("lm.json")).unwrap();
    let mut fresh = LlamaModel::random(config, 99).unwrap();
    fresh.set_base_trainable(true);
    loaded.restore_params(&mut trainable(&mut fresh)).unwrap();
    let values = |m: &mut LlamaModel| {
        let mut out = Vec::new();
        m.visit_parameters(|name, p| {
            out.push((name.to_string(), p.value.to_vec()));
            Ok(())
        })
        .unwrap();
        out
    };
    assert_eq!(values(&mut fresh), values(&mut model));
    std::fs::remove_dir_all(&dir).unwrap();
}
