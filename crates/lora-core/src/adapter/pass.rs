//! The adapter's forward and backward passes over any [`FrozenBase`]: dropout, the low-rank
//! product `s·B·A·x`, and DoRA's row-norm rescaling with its gradients.

use super::*;

impl LoraAdapter {
    /// Adds this adapter's contribution for input `x: (tokens, in)` into `y: (tokens, out)`.
    /// `base_out = x·Wᵀ` (bias excluded), when given, is the base product the layer already
    /// computed; DoRA reuses it when no dropout is applied and computes it otherwise. Dropout
    /// is drawn only when `training`.
    pub fn forward_into<B: FrozenBase + ?Sized>(
        &mut self,
        base: &B,
        x: ArrayView2<'_, f32>,
        base_out: Option<ArrayView2<'_, f32>>,
        training: bool,
        mut y: ArrayViewMut2<'_, f32>,
    ) -> Result<()> {
        let tokens = x.nrows();
        self.check_io(base, "forward x", x.dim(), self.in_features_())?;
        check_dim("adapter forward y", (tokens, self.b.nrows()), y.dim())?;
        if let Some(u) = &base_out {
            check_dim(
                "adapter forward base_out",
                (tokens, self.b.nrows()),
                u.dim(),
            )?;
        }
        let p = self.options.dropout as f32;
        let (x_dropped, mask) = if training && p > 0.0 {
            let keep_scale = 1.0 / (1.0 - p);
            let rng = &mut self.rng;
            let mask = Array2::from_shape_fn(x.dim(), |_| {
                if rng.random::<f32>() < p {
                    0.0
                } else {
                    keep_scale
                }
            });
            (Some(&x * &mask), Some(mask))
        } else {
            (None, None)
        };
        let xd = x_dropped.as_ref().map_or(x, |v| v.view());
        let dtype = self.compute_dtype;
        let mut hidden = Array2::zeros((tokens, self.a.nrows()));
        gemm_in(dtype, 1.0, xd, self.a.t(), 0.0, hidden.view_mut())?;
        let dora = match &self.magnitude {
            None => {
                gemm_in(
                    dtype,
                    self.scale,
                    hidden.view(),
                    self.b.t(),
                    1.0,
                    y.view_mut(),
                )?;
                None
            }
            Some(magnitude) => {
                let weight = base.dense_weight()?;
                let weight_norm = self.dora_weight_norm(weight.view())?;
                let ratio = magnitude / &weight_norm;
                if let Some(j) = ratio.iter().position(|v| !v.is_finite()) {
                    return Err(LoraError::NonFinite {
                        context: format!("DoRA scale m/‖W + s·B·A‖ (row norm {})", weight_norm[j]),
                        index: j,
                        value: ratio[j],
                    });
                }
                let dropped_base;
                let u = match base_out {
                    Some(u) if x_dropped.is_none() => u,
                    _ => {
                        let mut out = Array2::zeros((tokens, base.out_features()));
                        base.matmul_into(xd, out.view_mut())?;
                        dropped_base = out;
                        dropped_base.view()
                    }
                };
                let mut scaled_lora = Array2::zeros((tokens, self.b.nrows()));
                gemm_in(
                    dtype,
                    self.scale,
                    hidden.view(),
                    self.b.t(),
                    0.0,
                    scaled_lora.view_mut(),
                )?;
                let ratio_row = ratio.view().insert_axis(Axis(0));
                Zip::from(&mut y)
                    .and(&u)
                    .and(&scaled_lora)
                    .and_broadcast(&ratio_row)
                    .for_each(|y, &u, &l, &g| *y += (g - 1.0) * u + g * l);
                scaled_lora += &u;
                Some(DoraCache {
                    ratio,
                    weight_norm,
                    direction_out: scaled_lora,
                })
            }
        };
        self.cache = Some(AdapterCache {
            x_dropped,
            mask,
            hidden,
            dora,
        });
        Ok(())
    }

    fn in_features_(&self) -> usize {
        self.a.ncols()
    }

    /// The base must have this adapter's `(out, in)` and `x` must have `in` columns: a
    /// caller's mismatch is an error here, not a panic inside an elementwise product.
    fn check_io<B: FrozenBase + ?Sized>(
        &self,
        base: &B,
        what: &str,
        x: (usize, usize),
        in_features: usize,
    ) -> Result<()> {
        let shape = (self.b.nrows(), self.a.ncols());
        if (base.out_features(), base.in_features()) != shape {
            return Err(LoraError::shape(
                format!("adapter {what}: base (out, in)"),
                format!("{shape:?}"),
                format!("{:?}", (base.out_features(), base.in_features())),
            ));
        }
        if x.1 != in_features {
            return Err(LoraError::shape(
                format!("adapter {what}"),
                format!("(tokens, {in_features})"),
                format!("{x:?}"),
            ));
        }
        Ok(())
    }

    /// Given `dy = ∂L/∂y: (tokens, out)` and the layer input `x` of the last forward,
    /// accumulates `∂L/∂A`, `∂L/∂B` (and `∂L/∂m`) and adds this adapter's part of `∂L/∂x`
    /// into `dx: (tokens, in)`.
    ///
    /// DoRA's part of `∂L/∂x` includes `((g − 1)⊙dy)·W`. Without dropout that term can be
    /// folded into the layer's own `dy·W` (one product instead of two); a caller that did so
    /// (see [`LoraAdapter::dora_ratio_without_dropout`]) passes `dora_base_term_folded = true`.
    pub fn backward_into<B: FrozenBase + ?Sized>(
        &mut self,
        base: &B,
        x: ArrayView2<'_, f32>,
        dy: ArrayView2<'_, f32>,
        mut dx: ArrayViewMut2<'_, f32>,
        dora_base_term_folded: bool,
    ) -> Result<()> {
        let cache = self.cache.as_ref().ok_or_else(|| {
            LoraError::state(
                "adapter backward",
                "a LoRA adapter",
                "no forward pass is stored",
            )
        })?;
        if cache.hidden.nrows() != dy.nrows() {
            return Err(LoraError::shape(
                "adapter backward: dy tokens vs the last forward",
                cache.hidden.nrows(),
                dy.nrows(),
            ));
        }
        let tokens = dy.nrows();
        self.check_io(base, "backward x", x.dim(), self.in_features_())?;
        check_dim("adapter backward x", (tokens, self.a.ncols()), x.dim())?;
        check_dim("adapter backward dy", (tokens, self.b.nrows()), dy.dim())?;
        check_dim("adapter backward dx", (tokens, self.a.ncols()), dx.dim())?;
        let xd = cache.x_dropped.as_ref().map_or(x, |v| v.view());
        // The low-rank path sees g⊙dy under DoRA (g is a constant: the norm is detached).
        let scaled_dy;
        let dy_lora = match &cache.dora {
            Some(d) => {
                scaled_dy = &dy * &d.ratio.view().insert_axis(Axis(0));
                scaled_dy.view()
            }
            None => dy,
        };
        let dtype = self.compute_dtype;
        gemm_in(
            dtype,
            self.scale,
            dy_lora.t(),
            cache.hidden.view(),
            1.0,
            self.grad_b.view_mut(),
        )?;
        let mut d_hidden = Array2::zeros(cache.hidden.dim());
        gemm_in(
            dtype,
            self.scale,
            dy_lora,
            self.b.view(),
            0.0,
            d_hidden.view_mut(),
        )?;
        gemm_in(dtype, 1.0, d_hidden.t(), xd, 1.0, self.grad_a.view_mut())?;
        if let Some(d) = &cache.dora {
            // ∂y/∂m_j = (x_d·W'ᵀ)_j / ‖W'_j‖ with W' = W + s·B·A.
            if let Some(grad_m) = self.grad_magnitude.as_mut() {
                Zip::from(grad_m)
                    .and(dy.axis_iter(Axis(1)))
                    .and(d.direction_out.axis_iter(Axis(1)))
                    .and(&d.weight_norm)
                    .for_each(|gm, dy_col, dir_col, &n| {
                        let dot: f64 = dy_col
                            .iter()
                            .zip(dir_col.iter())
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum();
                        *gm += (dot / n as f64) as f32;
                    });
            }
        }
        let base_term = cache
            .dora
            .as_ref()
            .filter(|_| !(dora_base_term_folded && cache.mask.is_none()));
        if cache.mask.is_none() && base_term.is_none() {
            gemm_in(dtype, 1.0, d_hidden.view(), self.a.view(), 1.0, dx)?;
            return Ok(());
        }
        let mut dx_dropped = Array2::zeros((tokens, self.a.ncols()));
        gemm_in(
            dtype,
            1.0,
            d_hidden.view(),
            self.a.view(),
            0.0,
            dx_dropped.view_mut(),
        )?;
        if let Some(d) = base_term {
            let ratio_minus_one = d.ratio.mapv(|g| g - 1.0).insert_axis(Axis(0));
            let dy_base = &dy * &ratio_minus_one;
            base.matmul_transposed_into(dy_base.view(), 1.0, dx_dropped.view_mut())?;
        }
        if let Some(mask) = &cache.mask {
            dx_dropped *= mask;
        }
        dx += &dx_dropped;
        Ok(())
    }
}
