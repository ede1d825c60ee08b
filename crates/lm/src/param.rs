//! Trainable tensors: a value and, only while it trains, a gradient buffer of the same shape.

use ndarray::{Array, Dimension};

use crate::error::{LmError, Result};

/// A tensor of the model with an optional gradient.
///
/// The gradient buffer exists only while the parameter is trainable, so a frozen base costs no
/// gradient memory and its weight gradients are never computed. Backward passes *add* into the
/// buffer (gradient accumulation across micro-batches); [`Parameter::zero_grad`] resets it.
///
/// ```
/// use lm::Parameter;
/// use ndarray::array;
/// let mut p = Parameter::new(array![1.0f32, 2.0]);
/// assert!(p.grad().is_none());
/// p.set_trainable(true);
/// assert_eq!(p.grad().unwrap(), &array![0.0f32, 0.0]);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Parameter<D: Dimension> {
    value: Array<f32, D>,
    grad: Option<Array<f32, D>>,
}

impl<D: Dimension> Parameter<D> {
    /// A frozen parameter (no gradient buffer) holding `value`.
    pub fn new(value: Array<f32, D>) -> Self {
        // Standard layout keeps `as_slice` valid for optimizers that walk the flat buffer.
        let value = if value.is_standard_layout() {
            value
        } else {
            value.as_standard_layout().into_owned()
        };
        Parameter { value, grad: None }
    }

    pub fn value(&self) -> &Array<f32, D> {
        &self.value
    }

    pub fn value_mut(&mut self) -> &mut Array<f32, D> {
        &mut self.value
    }

    pub fn grad(&self) -> Option<&Array<f32, D>> {
        self.grad.as_ref()
    }

    pub fn grad_mut(&mut self) -> Option<&mut Array<f32, D>> {
        self.grad.as_mut()
    }

    /// The value and, when trainable, the gradient, borrowed together for a backward pass.
    pub fn value_and_grad_mut(&mut self) -> (&Array<f32, D>, Option<&mut Array<f32, D>>) {
        (&self.value, self.grad.as_mut())
    }

    pub fn is_trainable(&self) -> bool {
        self.grad.is_some()
    }

    /// Allocates a zeroed gradient buffer (trainable) or drops it (frozen).
    pub fn set_trainable(&mut self, trainable: bool) {
        match (trainable, self.grad.is_some()) {
            (true, false) => self.grad = Some(Array::zeros(self.value.raw_dim())),
            (false, true) => self.grad = None,
            _ => {}
        }
    }

    /// Sets the gradient (if any) to zero.
    pub fn zero_grad(&mut self) {
        if let Some(g) = &mut self.grad {
            g.fill(0.0);
        }
    }

    /// Flat mutable access for optimizers, under the parameter's name.
    pub fn as_param_mut<'a>(&'a mut self, name: &str) -> Result<ParamMut<'a>> {
        let shape = self.value.shape().to_vec();
        let value = self.value.as_slice_memory_order_mut().ok_or_else(|| {
            LmError::invalid(
                name,
                "non-contiguous tensor",
                "parameters are kept contiguous",
            )
        })?;
        let grad = match &mut self.grad {
            Some(g) => Some(g.as_slice_memory_order_mut().ok_or_else(|| {
                LmError::invalid(
                    name,
                    "non-contiguous gradient",
                    "gradients are kept contiguous",
                )
            })?),
            None => None,
        };
        Ok(ParamMut { shape, value, grad })
    }

    /// Errors naming the parameter and element if its gradient holds a NaN or infinity.
    pub(crate) fn check_grad_finite(&self, name: &str) -> Result<()> {
        if let Some(g) = &self.grad {
            if let Some(flat) = g.as_slice_memory_order() {
                let shape = g.shape().to_vec();
                crate::error::check_finite_at(&format!("gradient of {name}"), flat, |i| {
                    format!("element {:?}", unravel(i, &shape))
                })?;
            }
        }
        Ok(())
    }
}

/// A parameter seen flat by an optimizer: value, gradient (absent when frozen) and shape.
#[derive(Debug)]
pub struct ParamMut<'a> {
    pub shape: Vec<usize>,
    pub value: &'a mut [f32],
    pub grad: Option<&'a mut [f32]>,
}

/// Row-major multi-index of a flat index.
pub(crate) fn unravel(mut index: usize, shape: &[usize]) -> Vec<usize> {
    let mut out = vec![0; shape.len()];
    for (slot, &dim) in out.iter_mut().zip(shape).rev() {
        if dim > 0 {
            *slot = index % dim;
            index /= dim;
        }
    }
    out
}
