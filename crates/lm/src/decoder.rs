//! The one decoder layer, written once for every family: its parameters ([`DecoderLayer`])
//! and its forward and backward, which read the family description
//! ([`crate::family::Architecture`]) for what differs — norm kind, q/k head norms, Gemma's
//! sandwich norms, the gated activation, fused or separate projections, the attention scale,
//! soft cap and window. The training pass and the key/value-cache decoder both run
//! [`layer_forward`]; they differ only in where the keys come from ([`KeysFrom`]).
//!
//! Long because the forward and its backward are kept side by side (each step of one has its
//! mirror in the other); splitting them would separate what must change together.

use ndarray::{s, Array2, Array3, ArrayView2, ArrayViewMut2, Axis, Ix1};
use quant_core::linalg::ComputeDtype;

use crate::attention::{
    attention_backward, attention_forward, AttentionMask, AttentionOptions, AttentionShape,
};
use crate::error::{LmError, Result};
use crate::family::{Architecture, NormKind};
use crate::layers::{
    gated_backward, gated_forward, norm_weight_array, rms_norm_apply, rms_norm_backward,
    rms_norm_forward,
};
use crate::linear::LinearModule;
use crate::param::Parameter;
use crate::rope::RopeTable;

pub use crate::family::LAYER_LINEAR_NAMES;

mod cached;
pub(crate) use cached::CachedSequence;

/// One decoder layer: pre-norm attention and pre-norm gated MLP, each with a residual, plus
/// what a family adds (Gemma's post-norms, q/k head norms). The HF names of the norms:
/// `input_layernorm` (before attention), `post_attention_layernorm` (before the MLP; Gemma:
/// after attention), `pre_feedforward_layernorm` / `post_feedforward_layernorm` (Gemma),
/// `self_attn.q_norm` / `self_attn.k_norm`.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderLayer {
    pub input_layernorm: Parameter<Ix1>,
    pub post_attention_layernorm: Parameter<Ix1>,
    pub pre_feedforward_layernorm: Option<Parameter<Ix1>>,
    pub post_feedforward_layernorm: Option<Parameter<Ix1>>,
    pub q_norm: Option<Parameter<Ix1>>,
    pub k_norm: Option<Parameter<Ix1>>,
    /// The projections in the family's order ([`Architecture::linear_names`]): attention
    /// inputs (q, k, v or the fused qkv), o, MLP inputs (gate, up or the fused gate_up), down.
    linears: Vec<(&'static str, LinearModule)>,
    /// How many of `linears` feed the attention (3, or 1 when fused) and the MLP (2 or 1).
    attn_inputs: usize,
    mlp_inputs: usize,
}

impl DecoderLayer {
    /// A layer from its parts; `linears` must follow `arch.linear_names()`.
    pub fn new(
        arch: &Architecture,
        norms: [Option<Parameter<Ix1>>; 6],
        linears: Vec<LinearModule>,
    ) -> Result<Self> {
        let names = arch.linear_names();
        if linears.len() != names.len() {
            return Err(LmError::invalid(
                "decoder layer projections",
                linears.len(),
                format!("the family has {}: {names:?}", names.len()),
            ));
        }
        let [input, post_attn, pre_ff, post_ff, q_norm, k_norm] = norms;
        let missing = |n: &str| LmError::invalid("decoder layer norms", n, "missing");
        let (attn_inputs, mlp_inputs) = if arch.fused_projections {
            (1, 1)
        } else {
            (3, 2)
        };
        Ok(DecoderLayer {
            input_layernorm: input.ok_or_else(|| missing("input_layernorm"))?,
            post_attention_layernorm: post_attn
                .ok_or_else(|| missing("post_attention_layernorm"))?,
            pre_feedforward_layernorm: pre_ff,
            post_feedforward_layernorm: post_ff,
            q_norm,
            k_norm,
            linears: names.iter().copied().zip(linears).collect(),
            attn_inputs,
            mlp_inputs,
        })
    }

    /// The projections with their names below the layer, in the family's order.
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut LinearModule)> {
        self.linears.iter_mut().map(|(n, l)| (*n, l)).collect()
    }

    /// The projections with their names below the layer, in the family's order.
    pub fn linears(&self) -> Vec<(&'static str, &LinearModule)> {
        self.linears.iter().map(|(n, l)| (*n, l)).collect()
    }

    /// The projection named `name` below the layer (`self_attn.q_proj`, `mlp.gate_up_proj`).
    pub fn linear(&self, name: &str) -> Option<&LinearModule> {
        self.linears
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, l)| l)
    }

    /// The norms present, each with its HF name below the layer, in checkpoint order.
    pub fn norms_mut(&mut self) -> Vec<(&'static str, &mut Parameter<Ix1>)> {
        let mut out = vec![
            ("input_layernorm", &mut self.input_layernorm),
            (
                "post_attention_layernorm",
                &mut self.post_attention_layernorm,
            ),
        ];
        for (name, norm) in [
            (
                "pre_feedforward_layernorm",
                &mut self.pre_feedforward_layernorm,
            ),
            (
                "post_feedforward_layernorm",
                &mut self.post_feedforward_layernorm,
            ),
            ("self_attn.q_norm", &mut self.q_norm),
            ("self_attn.k_norm", &mut self.k_norm),
        ] {
            if let Some(n) = norm.as_mut() {
                out.push((name, n));
            }
        }
        out
    }

    /// The norms present, each with its HF name below the layer.
    pub fn norms(&self) -> Vec<(&'static str, &Parameter<Ix1>)> {
        let mut out = vec![
            ("input_layernorm", &self.input_layernorm),
            ("post_attention_layernorm", &self.post_attention_layernorm),
        ];
        for (name, norm) in [
            ("pre_feedforward_layernorm", &self.pre_feedforward_layernorm),
            (
                "post_feedforward_layernorm",
                &self.post_feedforward_layernorm,
            ),
            ("self_attn.q_norm", &self.q_norm),
            ("self_attn.k_norm", &self.k_norm),
        ] {
            if let Some(n) = norm.as_ref() {
                out.push((name, n));
            }
        }
        out
    }

    /// The norm before the MLP: Gemma's `pre_feedforward_layernorm`, otherwise
    /// `post_attention_layernorm`.
    fn mlp_norm(&self) -> &Parameter<Ix1> {
        self.pre_feedforward_layernorm
            .as_ref()
            .unwrap_or(&self.post_attention_layernorm)
    }

    fn mlp_norm_mut(&mut self) -> &mut Parameter<Ix1> {
        match &mut self.pre_feedforward_layernorm {
            Some(n) => n,
            None => &mut self.post_attention_layernorm,
        }
    }

    /// Gemma's norm of the attention output (`post_attention_layernorm` when sandwiched).
    fn attn_post_norm(&mut self) -> Option<&mut Parameter<Ix1>> {
        if self.pre_feedforward_layernorm.is_some() {
            Some(&mut self.post_attention_layernorm)
        } else {
            None
        }
    }
}

/// Sizes and per-layer settings the layer functions read.
pub(crate) struct LayerContext<'a> {
    pub arch: &'a Architecture,
    pub eps: f32,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    /// The position of every row (restarting at each packed segment).
    pub positions: &'a [usize],
    pub rope: &'a RopeTable,
    pub sliding_window: Option<usize>,
    /// The precision of attention's products (the projections carry their own).
    pub compute_dtype: ComputeDtype,
}

impl LayerContext<'_> {
    fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }
    fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    fn norm_kind(&self) -> NormKind {
        self.arch.norm
    }
    fn options<'m>(&self, mask: AttentionMask<'m>) -> AttentionOptions<'m> {
        AttentionOptions {
            scale: self.arch.query_scale,
            softcap: self.arch.attn_softcap,
            mask: AttentionMask {
                sliding_window: self.sliding_window,
                ..mask
            },
            compute_dtype: self.compute_dtype,
        }
    }
}

/// Where a layer's attention takes its keys and values from.
pub(crate) enum KeysFrom<'a> {
    /// The rows themselves: `(batch·seq)` rows of `shape`, masked by `mask` (padding,
    /// segments; the layer adds its window).
    Batch {
        shape: AttentionShape,
        mask: AttentionMask<'a>,
    },
    /// Sequences decoded step by step, each against its own cache: their rows come one
    /// sequence after another, and each sequence's keys and values are appended to its cache
    /// ([`cached::attend`]).
    Caches(Vec<CachedSequence<'a>>),
}

/// What one layer's forward keeps for its backward. The norms' outputs (from their input and
/// `rstd`) and the gated product are one elementwise pass each, so backward recomputes them.
#[derive(Debug)]
pub(crate) struct LayerActivations {
    rstd_attn: Vec<f32>,
    /// `q | k` before the head norms (only with q/k norms) and their per-(row, head) `rstd`.
    qk_raw: Option<Array2<f32>>,
    rstd_q: Vec<f32>,
    rstd_k: Vec<f32>,
    /// `q | k | v` after the head norms and RoPE, `(tokens, (heads + 2·kv_heads)·head_dim)`.
    qkv: Array2<f32>,
    /// Attention probabilities (empty in the cached decoder).
    probs: Array3<f32>,
    attn_out: Array2<f32>,
    /// Gemma: the o projection's output before its post-norm, and that norm's `rstd`.
    attn_proj: Option<(Array2<f32>, Vec<f32>)>,
    residual_mid: Array2<f32>,
    rstd_mlp: Vec<f32>,
    /// `gate | up` before the activation, `(tokens, 2·intermediate)`.
    gate_up: Array2<f32>,
    /// Gemma: the down projection's output before its post-norm, and that norm's `rstd`.
    mlp_proj: Option<(Array2<f32>, Vec<f32>)>,
}

/// RMSNorm of `x` with a parameter as the family applies it; returns `(y, rstd)`.
fn norm(
    kind: NormKind,
    x: ArrayView2<'_, f32>,
    w: &Parameter<Ix1>,
    eps: f32,
) -> Result<(Array2<f32>, Vec<f32>)> {
    let weight = norm_weight_array(kind, w.value().view());
    let mut y = Array2::zeros(x.dim());
    let mut rstd = vec![0.0; x.nrows()];
    rms_norm_forward(x, weight.view(), eps, y.view_mut(), &mut rstd)?;
    Ok((y, rstd))
}

/// Recomputes a norm's output from its input and `rstd`.
fn norm_again(
    kind: NormKind,
    x: ArrayView2<'_, f32>,
    w: &Parameter<Ix1>,
    rstd: &[f32],
) -> Result<Array2<f32>> {
    let weight = norm_weight_array(kind, w.value().view());
    let mut y = Array2::zeros(x.dim());
    rms_norm_apply(x, weight.view(), rstd, y.view_mut())?;
    Ok(y)
}

/// Adds the norm's input gradient into `grad_x` and its weight gradient into `w`'s buffer.
fn norm_backward(
    kind: NormKind,
    x: ArrayView2<'_, f32>,
    w: &mut Parameter<Ix1>,
    rstd: &[f32],
    grad_y: ArrayView2<'_, f32>,
    grad_x: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let weight = norm_weight_array(kind, w.value().view());
    rms_norm_backward(
        x,
        weight.view(),
        rstd,
        grad_y,
        grad_x,
        w.grad_mut().map(|g| g.view_mut()),
    )
}

/// Per-head RMSNorm of `cols` (`heads` blocks of `head_dim`) in place; returns the `rstd` of
/// every (row, head).
fn head_norm_forward(
    kind: NormKind,
    mut cols: ArrayViewMut2<'_, f32>,
    heads: usize,
    w: &Parameter<Ix1>,
    eps: f32,
) -> Result<Vec<f32>> {
    let (n, hd) = (cols.nrows(), cols.ncols() / heads.max(1));
    let flat = cols
        .to_owned()
        .into_shape_with_order((n * heads, hd))
        .map_err(|e| LmError::shape("q/k head norm input", format!("{}×{hd}", n * heads), e))?;
    let (y, rstd) = norm(kind, flat.view(), w, eps)?;
    let y = y
        .into_shape_with_order((n, heads * hd))
        .map_err(|e| LmError::shape("q/k head norm output", format!("{n}×{}", heads * hd), e))?;
    cols.assign(&y);
    Ok(rstd)
}

/// Backward of [`head_norm_forward`]: replaces `grad` (of the normed heads) by the gradient of
/// the raw heads `raw`, accumulating the norm weight's gradient.
fn head_norm_backward(
    kind: NormKind,
    raw: ArrayView2<'_, f32>,
    mut grad: ArrayViewMut2<'_, f32>,
    heads: usize,
    w: &mut Parameter<Ix1>,
    rstd: &[f32],
) -> Result<()> {
    let (n, hd) = (raw.nrows(), raw.ncols() / heads.max(1));
    let reshape = |a: Array2<f32>| {
        a.into_shape_with_order((n * heads, hd))
            .map_err(|e| LmError::shape("q/k head norm backward", format!("{}×{hd}", n * heads), e))
    };
    let raw_flat = reshape(raw.to_owned())?;
    let grad_flat = reshape(grad.to_owned())?;
    let mut grad_raw = Array2::<f32>::zeros((n * heads, hd));
    norm_backward(
        kind,
        raw_flat.view(),
        w,
        rstd,
        grad_flat.view(),
        grad_raw.view_mut(),
    )?;
    let grad_raw = grad_raw
        .into_shape_with_order((n, heads * hd))
        .map_err(|e| LmError::shape("q/k head norm backward", format!("{n}×{}", heads * hd), e))?;
    grad.assign(&grad_raw);
    Ok(())
}

/// `out ← Σ` of `linears` writing consecutive column blocks of `out`.
fn project_into(
    linears: &mut [(&'static str, LinearModule)],
    x: ArrayView2<'_, f32>,
    mut out: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let mut col = 0;
    for (_, lin) in linears {
        let width = lin.out_features();
        lin.forward(x, out.slice_mut(s![.., col..col + width]), false)?;
        col += width;
    }
    Ok(())
}

/// Backward of [`project_into`]: `grad_x ← Σ ∂L/∂x` of every block.
fn project_backward(
    linears: &mut [(&'static str, LinearModule)],
    x: ArrayView2<'_, f32>,
    grad_out: ArrayView2<'_, f32>,
    mut grad_x: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let mut col = 0;
    for (i, (_, lin)) in linears.iter_mut().enumerate() {
        let width = lin.out_features();
        lin.backward(
            x,
            grad_out.slice(s![.., col..col + width]),
            grad_x.view_mut(),
            i > 0,
        )?;
        col += width;
    }
    Ok(())
}

/// One decoder layer forward: returns its output and what its backward needs.
pub(crate) fn layer_forward(
    layer: &mut DecoderLayer,
    ctx: &LayerContext<'_>,
    x_in: &Array2<f32>,
    keys: KeysFrom<'_>,
) -> Result<(Array2<f32>, LayerActivations)> {
    let n = x_in.nrows();
    let (q_width, kv_width) = (ctx.q_width(), ctx.kv_width());
    let kind = ctx.norm_kind();
    let (normed_attn, rstd_attn) = norm(kind, x_in.view(), &layer.input_layernorm, ctx.eps)?;
    let mut qkv = Array2::<f32>::zeros((n, q_width + 2 * kv_width));
    let (attn_in, rest) = layer.linears.split_at_mut(layer.attn_inputs);
    project_into(attn_in, normed_attn.view(), qkv.view_mut())?;
    drop(normed_attn);
    let (mut qk_raw, mut rstd_q, mut rstd_k) = (None, Vec::new(), Vec::new());
    if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
        qk_raw = Some(qkv.slice(s![.., ..q_width + kv_width]).to_owned());
        rstd_q = head_norm_forward(
            kind,
            qkv.slice_mut(s![.., ..q_width]),
            ctx.heads,
            qn,
            ctx.eps,
        )?;
        rstd_k = head_norm_forward(
            kind,
            qkv.slice_mut(s![.., q_width..q_width + kv_width]),
            ctx.kv_heads,
            kn,
            ctx.eps,
        )?;
    }
    ctx.rope.apply(
        qkv.slice_mut(s![.., ..q_width + kv_width]),
        ctx.positions,
        ctx.heads + ctx.kv_heads,
        false,
    )?;
    let mut attn_out = Array2::<f32>::zeros((n, q_width));
    let probs = match keys {
        KeysFrom::Batch { shape, mask } => {
            let mut probs =
                Array3::<f32>::zeros((shape.batch * shape.n_heads, shape.seq, shape.seq));
            attention_forward(
                shape,
                &ctx.options(mask),
                qkv.slice(s![.., ..q_width]),
                qkv.slice(s![.., q_width..q_width + kv_width]),
                qkv.slice(s![.., q_width + kv_width..]),
                &mut probs,
                attn_out.view_mut(),
            )?;
            probs
        }
        KeysFrom::Caches(sequences) => {
            cached::attend(ctx, sequences, qkv.view(), attn_out.view_mut())?;
            // The cached decoder keeps no activations.
            Array3::zeros((0, 0, 0))
        }
    };

    let (o_proj, mlp_rest) = rest.split_at_mut(1);
    let o_proj = &mut o_proj[0].1;
    let (residual_mid, attn_proj) = match layer.pre_feedforward_layernorm.is_some() {
        true => {
            let mut o = Array2::<f32>::zeros((n, ctx.hidden));
            o_proj.forward(attn_out.view(), o.view_mut(), false)?;
            let (normed_o, rstd_o) =
                norm(kind, o.view(), &layer.post_attention_layernorm, ctx.eps)?;
            (x_in + &normed_o, Some((o, rstd_o)))
        }
        false => {
            let mut residual_mid = x_in.clone();
            o_proj.forward(attn_out.view(), residual_mid.view_mut(), true)?;
            (residual_mid, None)
        }
    };

    let mlp_norm = match &layer.pre_feedforward_layernorm {
        Some(p) => p,
        None => &layer.post_attention_layernorm,
    };
    let (normed_mlp, rstd_mlp) = norm(kind, residual_mid.view(), mlp_norm, ctx.eps)?;
    let (mlp_in, down) = mlp_rest.split_at_mut(layer.mlp_inputs);
    let mut gate_up = Array2::<f32>::zeros((n, 2 * ctx.intermediate));
    project_into(mlp_in, normed_mlp.view(), gate_up.view_mut())?;
    drop(normed_mlp);
    let mut act = Array2::<f32>::zeros((n, ctx.intermediate));
    gated_forward(ctx.arch.activation, gate_up.view(), act.view_mut())?;
    let down = &mut down[0].1;
    let (x_out, mlp_proj) = match &layer.post_feedforward_layernorm {
        Some(post) => {
            let mut d = Array2::<f32>::zeros((n, ctx.hidden));
            down.forward(act.view(), d.view_mut(), false)?;
            let (normed_d, rstd_d) = norm(kind, d.view(), post, ctx.eps)?;
            (&residual_mid + &normed_d, Some((d, rstd_d)))
        }
        None => {
            let mut x_out = residual_mid.clone();
            down.forward(act.view(), x_out.view_mut(), true)?;
            (x_out, None)
        }
    };
    Ok((
        x_out,
        LayerActivations {
            rstd_attn,
            qk_raw,
            rstd_q,
            rstd_k,
            qkv,
            probs,
            attn_out,
            attn_proj,
            residual_mid,
            rstd_mlp,
            gate_up,
            mlp_proj,
        },
    ))
}

/// Turns `grad_x` from the gradient of the layer's output into that of its input,
/// accumulating every trainable parameter's gradient.
pub(crate) fn layer_backward(
    layer: &mut DecoderLayer,
    ctx: &LayerContext<'_>,
    shape: AttentionShape,
    x_in: &Array2<f32>,
    acts: LayerActivations,
    grad_x: &mut Array2<f32>,
) -> Result<()> {
    let n = x_in.nrows();
    let (q_width, kv_width) = (ctx.q_width(), ctx.kv_width());
    let kind = ctx.norm_kind();
    let (attn_inputs, mlp_inputs) = (layer.attn_inputs, layer.mlp_inputs);

    // MLP: the gated product is recomputed rather than kept (one elementwise pass).
    let mut act = Array2::<f32>::zeros((n, ctx.intermediate));
    gated_forward(ctx.arch.activation, acts.gate_up.view(), act.view_mut())?;
    let grad_down_out = match (&acts.mlp_proj, layer.post_feedforward_layernorm.as_mut()) {
        (Some((d, rstd)), Some(post)) => {
            let mut g = Array2::<f32>::zeros((n, ctx.hidden));
            norm_backward(kind, d.view(), post, rstd, grad_x.view(), g.view_mut())?;
            Some(g)
        }
        _ => None,
    };
    let mut grad_act = Array2::<f32>::zeros((n, ctx.intermediate));
    {
        let down = &mut layer.linears[attn_inputs + 1 + mlp_inputs].1;
        let g = grad_down_out.as_ref().map_or(grad_x.view(), |g| g.view());
        down.backward(act.view(), g, grad_act.view_mut(), false)?;
    }
    drop(act);
    let mut grad_gate_up = Array2::<f32>::zeros((n, 2 * ctx.intermediate));
    gated_backward(
        ctx.arch.activation,
        acts.gate_up.view(),
        grad_act.view(),
        grad_gate_up.view_mut(),
    )?;
    drop(grad_act);
    let normed_mlp = norm_again(
        kind,
        acts.residual_mid.view(),
        layer.mlp_norm(),
        &acts.rstd_mlp,
    )?;
    let mut grad_normed = Array2::<f32>::zeros((n, ctx.hidden));
    project_backward(
        &mut layer.linears[attn_inputs + 1..attn_inputs + 1 + mlp_inputs],
        normed_mlp.view(),
        grad_gate_up.view(),
        grad_normed.view_mut(),
    )?;
    drop(grad_gate_up);
    norm_backward(
        kind,
        acts.residual_mid.view(),
        layer.mlp_norm_mut(),
        &acts.rstd_mlp,
        grad_normed.view(),
        grad_x.view_mut(),
    )?;

    // Attention.
    let grad_o_out = match (&acts.attn_proj, layer.attn_post_norm()) {
        (Some((o, rstd)), Some(post)) => {
            let mut g = Array2::<f32>::zeros((n, ctx.hidden));
            norm_backward(kind, o.view(), post, rstd, grad_x.view(), g.view_mut())?;
            Some(g)
        }
        _ => None,
    };
    let mut grad_attn = Array2::<f32>::zeros((n, q_width));
    {
        let o_proj = &mut layer.linears[attn_inputs].1;
        let g = grad_o_out.as_ref().map_or(grad_x.view(), |g| g.view());
        o_proj.backward(acts.attn_out.view(), g, grad_attn.view_mut(), false)?;
    }
    let mut grad_qkv = Array2::<f32>::zeros((n, q_width + 2 * kv_width));
    {
        let (gq, rest) = grad_qkv.view_mut().split_at(Axis(1), q_width);
        let (gk, gv) = rest.split_at(Axis(1), kv_width);
        attention_backward(
            shape,
            &ctx.options(AttentionMask::default()),
            acts.qkv.slice(s![.., ..q_width]),
            acts.qkv.slice(s![.., q_width..q_width + kv_width]),
            acts.qkv.slice(s![.., q_width + kv_width..]),
            &acts.probs,
            grad_attn.view(),
            gq,
            gk,
            gv,
        )?;
    }
    drop(grad_attn);
    ctx.rope.apply(
        grad_qkv.slice_mut(s![.., ..q_width + kv_width]),
        ctx.positions,
        ctx.heads + ctx.kv_heads,
        true,
    )?;
    if let (Some(raw), Some(qn), Some(kn)) =
        (&acts.qk_raw, layer.q_norm.as_mut(), layer.k_norm.as_mut())
    {
        head_norm_backward(
            kind,
            raw.slice(s![.., ..q_width]),
            grad_qkv.slice_mut(s![.., ..q_width]),
            ctx.heads,
            qn,
            &acts.rstd_q,
        )?;
        head_norm_backward(
            kind,
            raw.slice(s![.., q_width..]),
            grad_qkv.slice_mut(s![.., q_width..q_width + kv_width]),
            ctx.kv_heads,
            kn,
            &acts.rstd_k,
        )?;
    }
    let normed_attn = norm_again(kind, x_in.view(), &layer.input_layernorm, &acts.rstd_attn)?;
    project_backward(
        &mut layer.linears[..attn_inputs],
        normed_attn.view(),
        grad_qkv.view(),
        grad_normed.view_mut(),
    )?;
    norm_backward(
        kind,
        x_in.view(),
        &mut layer.input_layernorm,
        &acts.rstd_attn,
        grad_normed.view(),
        grad_x.view_mut(),
    )?;
    Ok(())
}
