//! Trainable parameters as named flat `f32` slices with their gradients, and the global
//! gradient norm and its clipping.
//!
//! Optimizers never see a model: they see a [`ParamVisitor`], which hands out
//! `(name, value, grad)` for every trainable tensor in a fixed order. [`ParamStore`] is an
//! owned implementation (tests, adapters held outside a model); [`FnVisitor`] wraps a closure so
//! a model's own traversal (such as `lm`'s `visit_parameters`) plugs in without a copy.

use crate::error::{Result, TrainError};

/// The callback a [`ParamVisitor`] calls: `(name, value, grad)`, `value.len() == grad.len()`.
pub type ParamFn<'f> = dyn FnMut(&str, &mut [f32], &mut [f32]) -> Result<()> + 'f;

/// Something that holds trainable parameters and their gradients.
pub trait ParamVisitor {
    /// Calls `f(name, value, grad)` for every trainable parameter, always in the same order,
    /// stopping at the first error.
    fn visit_params(&mut self, f: &mut ParamFn<'_>) -> Result<()>;
}

/// A [`ParamVisitor`] made from a closure that drives the traversal.
///
/// ```
/// use qat_train::params::{FnVisitor, ParamVisitor};
/// let (mut w, mut g) = (vec![1.0f32, 2.0], vec![0.5f32, 0.5]);
/// let mut visitor = FnVisitor(|f: &mut qat_train::params::ParamFn<'_>| f("w", &mut w, &mut g));
/// let mut seen = Vec::new();
/// visitor.visit_params(&mut |name, value, _| { seen.push((name.to_string(), value.len())); Ok(()) }).unwrap();
/// assert_eq!(seen, vec![("w".to_string(), 2)]);
/// ```
pub struct FnVisitor<F>(pub F);

impl<F> ParamVisitor for FnVisitor<F>
where
    F: FnMut(&mut ParamFn<'_>) -> Result<()>,
{
    fn visit_params(&mut self, f: &mut ParamFn<'_>) -> Result<()> {
        (self.0)(f)
    }
}

/// One owned parameter: name, shape, values and gradient (row-major, same length).
#[derive(Debug, Clone, PartialEq)]
pub struct NamedParam {
    /// Unique name (e.g. `model.layers.0.self_attn.q_proj.lora_A.default.weight`).
    pub name: String,
    /// Shape; its product is `value.len()`.
    pub shape: Vec<usize>,
    /// Values.
    pub value: Vec<f32>,
    /// Gradient, accumulated by the caller, cleared by [`ParamStore::zero_grad`].
    pub grad: Vec<f32>,
}

/// Owned named parameters in insertion order.
///
/// ```
/// use qat_train::params::ParamStore;
/// let mut store = ParamStore::new();
/// store.add("lora_A", vec![2, 2], vec![1.0; 4]).unwrap();
/// store.set_grad("lora_A", &[3.0, 0.0, 0.0, 4.0]).unwrap();
/// assert_eq!(qat_train::params::grad_norm(&mut store).unwrap(), 5.0);
/// assert!(store.add("lora_A", vec![1], vec![0.0]).is_err()); // names are unique
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParamStore {
    params: Vec<NamedParam>,
}

impl ParamStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a parameter with a zero gradient; errors on a duplicate name, a shape whose
    /// product is not `value.len()` or a non-finite value.
    pub fn add(&mut self, name: &str, shape: Vec<usize>, value: Vec<f32>) -> Result<()> {
        if self.get(name).is_some() {
            return Err(TrainError::invalid(
                "parameter name",
                name,
                "already in the store",
            ));
        }
        let expected: usize = shape.iter().product();
        if expected != value.len() {
            return Err(TrainError::shape(
                format!("parameter `{name}`"),
                format!("{expected} values for shape {shape:?}"),
                value.len(),
            ));
        }
        crate::error::check_finite(&format!("parameter `{name}`"), &value)?;
        let grad = vec![0.0; value.len()];
        self.params.push(NamedParam {
            name: name.to_string(),
            shape,
            value,
            grad,
        });
        Ok(())
    }

    /// The parameter called `name`.
    pub fn get(&self, name: &str) -> Option<&NamedParam> {
        self.params.iter().find(|p| p.name == name)
    }

    /// The parameter called `name`, mutably.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut NamedParam> {
        self.params.iter_mut().find(|p| p.name == name)
    }

    /// Replaces the gradient of `name`; errors on an unknown name or a wrong length.
    pub fn set_grad(&mut self, name: &str, grad: &[f32]) -> Result<()> {
        let p = self.get_mut(name).ok_or_else(|| {
            TrainError::invalid("parameter name", name, "no such parameter in the store")
        })?;
        if p.grad.len() != grad.len() {
            return Err(TrainError::shape(
                format!("gradient of `{name}`"),
                p.grad.len(),
                grad.len(),
            ));
        }
        p.grad.copy_from_slice(grad);
        Ok(())
    }

    /// All parameters in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = &NamedParam> {
        self.params.iter()
    }

    /// Number of parameters (tensors).
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// Whether the store holds no parameter.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Sets every gradient to zero.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.grad.fill(0.0);
        }
    }
}

impl ParamVisitor for ParamStore {
    fn visit_params(&mut self, f: &mut ParamFn<'_>) -> Result<()> {
        for p in &mut self.params {
            if p.value.len() != p.grad.len() {
                return Err(TrainError::shape(
                    format!("gradient of `{}`", p.name),
                    p.value.len(),
                    p.grad.len(),
                ));
            }
            f(&p.name, &mut p.value, &mut p.grad)?;
        }
        Ok(())
    }
}

/// `sqrt(Σ g²)` over every gradient (accumulated in `f64`); errors on the first non-finite
/// gradient element, naming the parameter and index.
pub fn grad_norm(params: &mut dyn ParamVisitor) -> Result<f64> {
    let mut sum_sq = 0.0f64;
    params.visit_params(&mut |name, _, grad| {
        crate::error::check_finite(&format!("gradient of `{name}`"), grad)?;
        sum_sq += grad
            .iter()
            .map(|&g| f64::from(g) * f64::from(g))
            .sum::<f64>();
        Ok(())
    })?;
    // Finite elements can still overflow the sum of squares only beyond f64's range.
    if !sum_sq.is_finite() {
        return Err(TrainError::non_finite(
            "global gradient norm",
            "sum of squares",
            sum_sq,
        ));
    }
    Ok(sum_sq.sqrt())
}

/// Clips gradients by their global norm as PyTorch's `clip_grad_norm_`: when
/// `norm > max_norm` every gradient is multiplied by `max_norm / (norm + 1e-6)`. Returns the
/// norm before clipping. Errors on a non-finite gradient (nothing is scaled then) or a
/// `max_norm` that is not finite and positive.
///
/// ```
/// use qat_train::params::{clip_grad_norm, ParamStore};
/// let mut store = ParamStore::new();
/// store.add("w", vec![2], vec![0.0, 0.0]).unwrap();
/// store.set_grad("w", &[30.0, 40.0]).unwrap();
/// assert_eq!(clip_grad_norm(&mut store, 1.0).unwrap(), 50.0);
/// let g = &store.get("w").unwrap().grad;
/// assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
/// ```
pub fn clip_grad_norm(params: &mut dyn ParamVisitor, max_norm: f32) -> Result<f32> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(TrainError::invalid(
            "max_norm",
            max_norm,
            "must be finite and positive",
        ));
    }
    let norm = grad_norm(params)?;
    let coef = f64::from(max_norm) / (norm + 1e-6);
    if coef < 1.0 {
        let coef = coef as f32;
        params.visit_params(&mut |_, _, grad| {
            grad.iter_mut().for_each(|g| *g *= coef);
            Ok(())
        })?;
    }
    Ok(norm as f32)
}

/// Sets every gradient to zero.
pub fn zero_grads(params: &mut dyn ParamVisitor) -> Result<()> {
    params.visit_params(&mut |_, _, grad| {
        grad.fill(0.0);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn non_finite_gradients_are_reported_by_name_and_nothing_is_scaled() {
        let mut store = ParamStore::new();
        store.add("a", vec![2], vec![0.0; 2]).unwrap();
        store.add("b", vec![3], vec![0.0; 3]).unwrap();
        store.set_grad("a", &[100.0, 100.0]).unwrap();
        store.set_grad("b", &[0.0, f32::NAN, 0.0]).unwrap();
        let err = clip_grad_norm(&mut store, 1.0).unwrap_err().to_string();
        assert!(err.contains("`b`") && err.contains("index 1"), "{err}");
        assert_eq!(store.get("a").unwrap().grad, vec![100.0, 100.0]);
        assert!(clip_grad_norm(&mut store, 0.0).is_err());
    }

    #[test]
    fn bad_additions_are_errors() {
        let mut store = ParamStore::new();
        assert!(store
            .add("w", vec![2, 2], vec![0.0; 3])
            .unwrap_err()
            .to_string()
            .contains("`w`"));
        assert!(store.add("w", vec![1], vec![f32::NAN]).is_err());
        assert!(store.set_grad("missing", &[]).is_err());
    }

    proptest! {
        /// After clipping the norm is min(norm, max_norm) (up to the 1e-6 guard).
        #[test]
        fn clipped_norm_is_at_most_max_norm(grads in proptest::collection::vec(-100.0f32..100.0, 1..20), max_norm in 0.01f32..50.0) {
            let mut store = ParamStore::new();
            store.add("w", vec![grads.len()], vec![0.0; grads.len()]).unwrap();
            store.set_grad("w", &grads).unwrap();
            let before = clip_grad_norm(&mut store, max_norm).unwrap();
            let after = grad_norm(&mut store).unwrap() as f32;
            let expected = before.min(max_norm);
            prop_assert!((after - expected).abs() <= 1e-4 * (1.0 + expected));
        }
    }
}
