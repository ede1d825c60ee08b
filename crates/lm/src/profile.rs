//! Wall time per kind of operation of a training step, for `lora-qat bench train --profile`.
//!
//! Off by default: a [`scope`] is then one relaxed atomic load and nothing is timed. When
//! [`set_enabled`] turns it on, each scope adds its wall time to its [`Op`]'s total. Only the
//! outermost scope of a thread counts (an LM head that goes through [`crate::LinearModule`]
//! counts as the head, not as a projection), so the totals never overlap; the products that
//! a scope hands to the rayon pool are inside its wall time. The training pass opens scopes
//! on the calling thread only, so the totals add up to at most the step's wall time; the rest
//! of the step is residual additions, copies, allocation and checks.
//!
//! ```
//! use lm::profile::{self, Op};
//! profile::set_enabled(true);
//! {
//!     let _timer = profile::scope(Op::Loss);
//!     std::thread::sleep(std::time::Duration::from_millis(2));
//! }
//! profile::set_enabled(false);
//! let totals = profile::take();
//! let loss = totals.iter().find(|(op, _)| *op == Op::Loss).unwrap().1;
//! assert!(loss >= std::time::Duration::from_millis(2));
//! ```

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The kinds of work a training step is split into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Embedding lookup.
    Embedding,
    /// The decoder projections (base and adapters), forward.
    ProjectionForward,
    /// The decoder projections' input and adapter gradients.
    ProjectionBackward,
    /// Attention (scores, softmax, values), forward.
    AttentionForward,
    /// Attention backward.
    AttentionBackward,
    /// RMSNorm forward, recomputation and backward.
    RmsNorm,
    /// Rotary embeddings (forward and the inverse rotation of the backward).
    Rope,
    /// The gated MLP activation (SwiGLU/GeGLU), forward and backward.
    GatedActivation,
    /// Final norm and LM head product, forward.
    HeadForward,
    /// LM head input gradient (and its weight gradient when it trains).
    HeadBackward,
    /// Softmax cross-entropy over the vocabulary and its gradient.
    Loss,
    /// The optimizer's update of the trainable tensors (opened by the caller that steps it,
    /// e.g. `lora-qat bench train`).
    Optimizer,
}

impl Op {
    /// Every kind, in the order of a step.
    pub const ALL: [Op; 12] = [
        Op::Embedding,
        Op::ProjectionForward,
        Op::AttentionForward,
        Op::Rope,
        Op::RmsNorm,
        Op::GatedActivation,
        Op::HeadForward,
        Op::Loss,
        Op::HeadBackward,
        Op::ProjectionBackward,
        Op::AttentionBackward,
        Op::Optimizer,
    ];

    /// A short label for tables.
    pub fn label(self) -> &'static str {
        match self {
            Op::Embedding => "embedding",
            Op::ProjectionForward => "projections fwd (GEMM, LoRA)",
            Op::ProjectionBackward => "projections bwd (GEMM, LoRA)",
            Op::AttentionForward => "attention fwd",
            Op::AttentionBackward => "attention bwd",
            Op::RmsNorm => "RMSNorm fwd+bwd",
            Op::Rope => "RoPE fwd+bwd",
            Op::GatedActivation => "SwiGLU fwd+bwd",
            Op::HeadForward => "final norm + LM head fwd",
            Op::HeadBackward => "LM head + final norm bwd",
            Op::Loss => "softmax cross-entropy",
            Op::Optimizer => "optimizer step (AdamW)",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const KINDS: usize = Op::ALL.len();

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; KINDS] = [const { AtomicU64::new(0) }; KINDS];

thread_local! {
    /// Whether a scope is open on this thread (nested scopes do not count).
    static OPEN: Cell<bool> = const { Cell::new(false) };
}

/// Turns timing on or off for every thread.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Returns the totals since the last call (every [`Op`], in [`Op::ALL`] order) and resets them.
pub fn take() -> Vec<(Op, Duration)> {
    Op::ALL
        .iter()
        .map(|&op| {
            let nanos = NANOS[op.index()].swap(0, Ordering::Relaxed);
            (op, Duration::from_nanos(nanos))
        })
        .collect()
}

/// A running timer; adds its wall time to its kind when dropped.
#[derive(Debug)]
pub struct Scope {
    op: Op,
    start: Instant,
}

impl Drop for Scope {
    fn drop(&mut self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        NANOS[self.op.index()].fetch_add(nanos, Ordering::Relaxed);
        OPEN.with(|open| open.set(false));
    }
}

/// Starts timing `op` when profiling is on and no other scope is open on this thread.
pub fn scope(op: Op) -> Option<Scope> {
    if !ENABLED.load(Ordering::Relaxed) {
        return None;
    }
    OPEN.with(|open| {
        if open.get() {
            None
        } else {
            open.set(true);
            Some(Scope {
                op,
                start: Instant::now(),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_scopes_count_once_and_disabled_scopes_nothing() {
        assert!(scope(Op::Rope).is_none());
        set_enabled(true);
        let _ = take();
        {
            let outer = scope(Op::HeadForward);
            assert!(outer.is_some());
            assert!(scope(Op::ProjectionForward).is_none());
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(scope(Op::Rope).is_some());
        set_enabled(false);
        let totals = take();
        let get = |op| totals.iter().find(|(o, _)| *o == op).unwrap().1;
        // Other tests of this process may add to the totals while timing is on, never less.
        assert!(get(Op::HeadForward) >= Duration::from_millis(1));
    }
}
