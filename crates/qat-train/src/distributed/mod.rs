//! Data-parallel training: the collective operations a [`Trainer`](crate::trainer::Trainer)
//! needs to run as one of several processes (ranks), and the helpers that apply them to the
//! trainable tensors.
//!
//! The trainer asks its [`Collective`] for three things:
//!
//! * once per optimizer step, the element-wise sum over ranks of the flattened gradients of
//!   every trainable tensor ([`all_reduce_gradients`]: visited in the fixed
//!   [`TrainableParams`](crate::trainer::TrainableParams) order into one buffer, reduced,
//!   scattered back), before the norm is measured and clipped;
//! * the sums of the step's (and an evaluation's) losses and token counts, for the metrics;
//! * at the start of a run, rank 0's step, data position, RNG position and a hash of each
//!   trainable tensor, which every rank compares with its own ([`check_same_state`]) so a
//!   rank with another model, adapter or checkpoint is an error instead of a silent
//!   divergence.
//!
//! Every rank must get the bit-identical result of a reduction (they then take identical
//! optimizer steps and never need their parameters re-broadcast); an implementation sums in
//! an order fixed by the rank count alone. [`SingleProcess`] is the one-rank collective:
//! every operation leaves its buffer as it is, so a trainer without a collective computes
//! exactly what it did before data parallelism existed. With the `mpi` feature,
//! [`mpi::MpiSession`] provides one over MPI (`mpirun -np N`). docs/SCALING.md explains the
//! split of a global batch and why N ranks give what one process gives.
//!
//! ```
//! use qat_train::distributed::{all_reduce_gradients, Collective, SingleProcess};
//! use qat_train::params::ParamStore;
//!
//! let mut store = ParamStore::new();
//! store.add("lora_A", vec![2], vec![0.0; 2]).unwrap();
//! store.set_grad("lora_A", &[0.5, -1.5]).unwrap();
//! let mut one = SingleProcess;
//! assert_eq!((one.rank(), one.size()), (0, 1));
//! assert_eq!(all_reduce_gradients(&mut one, &mut store).unwrap(), 2);
//! assert_eq!(store.get("lora_A").unwrap().grad, vec![0.5, -1.5]); // one rank: unchanged
//! ```

use crate::error::{Result, TrainError};
use crate::params::ParamVisitor;

#[cfg(feature = "mpi")]
pub mod mpi;

/// The operations between the ranks of a data-parallel run. Every rank calls the same
/// operations in the same order with buffers of the same length (the trainer guarantees it:
/// its control flow depends only on values every rank shares).
pub trait Collective {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn size(&self) -> usize;

    /// Replaces `buffer` on every rank by the element-wise sum of all ranks' buffers, summed
    /// in an order that depends on the rank count only, so every rank holds the same bits.
    /// `what` names the buffer for errors and timeouts.
    fn all_reduce_sum_f32(&mut self, buffer: &mut [f32], what: &str) -> Result<()>;

    /// As [`all_reduce_sum_f32`](Self::all_reduce_sum_f32) for `f64` (loss sums, counts).
    fn all_reduce_sum_f64(&mut self, buffer: &mut [f64], what: &str) -> Result<()>;

    /// Replaces `buffer` on every rank by rank `root`'s.
    fn broadcast_bytes(&mut self, buffer: &mut [u8], root: usize, what: &str) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&mut self, what: &str) -> Result<()>;
}

/// The collective of a run in one process: rank 0 of 1, every operation a no-op.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&mut self, _: &mut [f32], _: &str) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&mut self, _: &mut [f64], _: &str) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&mut self, _: &mut [u8], root: usize, what: &str) -> Result<()> {
        check_root(root, 1, what)
    }
    fn barrier(&mut self, _: &str) -> Result<()> {
        Ok(())
    }
}

/// Errors when `root` is not a rank of a `size`-rank run.
pub(crate) fn check_root(root: usize, size: usize, what: &str) -> Result<()> {
    if root >= size {
        return Err(TrainError::invalid(
            format!("broadcast root of {what}"),
            root,
            format!("the run has ranks 0..{size}"),
        ));
    }
    Ok(())
}

/// Sums the gradients of every parameter of `params` over the ranks, in place: the
/// gradients are copied in visiting order into one flat buffer, reduced in one
/// [`Collective::all_reduce_sum_f32`], and copied back. Returns the number of values
/// reduced. With one rank nothing is copied.
pub fn all_reduce_gradients(
    collective: &mut dyn Collective,
    params: &mut dyn ParamVisitor,
) -> Result<usize> {
    let mut flat = Vec::new();
    params.visit_params(&mut |_, _, grad| {
        flat.extend_from_slice(grad);
        Ok(())
    })?;
    if collective.size() == 1 {
        return Ok(flat.len());
    }
    collective.all_reduce_sum_f32(&mut flat, "gradients of the trainable parameters")?;
    let mut offset = 0;
    params.visit_params(&mut |name, _, grad| {
        let end = offset + grad.len();
        let reduced = flat.get(offset..end).ok_or_else(|| {
            TrainError::shape(
                format!("reduced gradient of `{name}`"),
                end,
                "a shorter buffer (the parameters changed while reducing)",
            )
        })?;
        grad.copy_from_slice(reduced);
        offset = end;
        Ok(())
    })?;
    Ok(flat.len())
}

/// Most entries [`check_same_state`] accepts from rank 0 (a bound on what it allocates).
const MAX_STATE_ENTRIES: usize = 1 << 24;

/// Checks that every rank holds rank 0's `state`: named numbers (step, data position, a hash
/// of each trainable tensor, ...). Rank 0's are broadcast and compared; every rank whose own
/// differ errors naming the first differing entry, and the others error saying how many
/// ranks differ, so all ranks stop together.
pub fn check_same_state(
    collective: &mut dyn Collective,
    state: &[(String, u64)],
    what: &str,
) -> Result<()> {
    if collective.size() == 1 {
        return Ok(());
    }
    let rank = collective.rank();
    let mut len = (state.len() as u64).to_le_bytes();
    collective.broadcast_bytes(&mut len, 0, what)?;
    let root_len = u64::from_le_bytes(len);
    // Rank 0's length is its own, so every rank (whatever its own length) receives that
    // many values: the ranks stay in step even when the lengths disagree.
    let count = usize::try_from(root_len)
        .ok()
        .filter(|&n| n <= MAX_STATE_ENTRIES)
        .ok_or_else(|| {
            TrainError::invalid(
                format!("{what} entries on rank 0"),
                root_len,
                format!("more than {MAX_STATE_ENTRIES}"),
            )
        })?;
    let mut root: Vec<u8> = if rank == 0 {
        state.iter().flat_map(|(_, v)| v.to_le_bytes()).collect()
    } else {
        vec![0u8; count * 8]
    };
    collective.broadcast_bytes(&mut root, 0, what)?;
    let root_values: Vec<u64> = root
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    let mismatch = if root_len != state.len() as u64 {
        Some(format!(
            "{} entries here, {root_len} on rank 0",
            state.len()
        ))
    } else {
        state
            .iter()
            .zip(&root_values)
            .find(|((_, mine), theirs)| mine != *theirs)
            .map(|((name, mine), theirs)| format!("{name}: {mine} here, {theirs} on rank 0"))
    };
    // Every rank takes part in the same collectives before any reports a mismatch.
    let mut failures = [f64::from(u8::from(mismatch.is_some()))];
    collective.all_reduce_sum_f64(&mut failures, what)?;
    match mismatch {
        Some(detail) => Err(TrainError::invalid(
            what,
            format!("rank {rank}"),
            format!(
                "differs from rank 0 ({detail}): every rank must load the same model, adapter, \
                 data and checkpoint"
            ),
        )),
        None if failures[0] > 0.0 => Err(TrainError::invalid(
            what,
            format!("rank {rank}"),
            format!(
                "{} other rank(s) differ from rank 0 (their own errors say where)",
                failures[0]
            ),
        )),
        None => Ok(()),
    }
}

/// FNV-1a over the bits of `values`: a cheap fingerprint of a tensor for [`check_same_state`].
pub fn hash_f32s(values: &[f32]) -> u64 {
    values.iter().fold(0xcbf2_9ce4_8422_2325, |h, v| {
        v.to_bits().to_le_bytes().iter().fold(h, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    })
}

/// `(rank, size)` of a run split into `micro_batches` micro-batches per optimizer step:
/// errors unless they divide evenly (each rank takes whole micro-batches, docs/SCALING.md).
pub(crate) fn check_split(micro_batches: usize, size: usize) -> Result<()> {
    if size == 0 || micro_batches % size != 0 {
        return Err(TrainError::invalid(
            "TrainConfig.gradient_accumulation",
            micro_batches,
            format!(
                "data-parallel training over {size} ranks gives each rank whole micro-batches: \
                 make gradient_accumulation (micro-batches per optimizer step over all ranks) a \
                 multiple of {size}"
            ),
        ));
    }
    Ok(())
}

/// Whether item `index` of `count` (a step's micro-batches, an evaluation's batches) is
/// this rank's: rank `r` of `N` takes the contiguous block `index·N/count = r`, so the ranks
/// in order hold the items in order (micro-batches `0..k`, `k..2k`, … for `count = kN`).
pub(crate) fn owns(collective: &dyn Collective, index: usize, count: usize) -> bool {
    let (rank, size) = (collective.rank(), collective.size());
    size == 1 || (index as u128 * size as u128 / count.max(1) as u128) == rank as u128
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamStore;
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::thread;

    /// `size` threads joined by channels, reducing by gathering to rank 0 in rank order:
    /// a reference collective for testing the helpers with more than one rank.
    struct ThreadRank {
        rank: usize,
        size: usize,
        to_root: Sender<(usize, Vec<f64>)>,
        from_root: Receiver<Vec<f64>>,
        root_inbox: Option<RootInbox>,
    }

    /// What rank 0 of a [`ThreadRank`] group holds: every rank's contribution arrives on one
    /// receiver, and one sender per rank carries the result back.
    type RootInbox = (Receiver<(usize, Vec<f64>)>, Vec<Sender<Vec<f64>>>);

    impl ThreadRank {
        fn group(size: usize) -> Vec<ThreadRank> {
            let (to_root, inbox) = channel();
            let mut outs = Vec::new();
            let mut ranks = Vec::new();
            for rank in 0..size {
                let (tx, rx) = channel();
                outs.push(tx);
                ranks.push(ThreadRank {
                    rank,
                    size,
                    to_root: to_root.clone(),
                    from_root: rx,
                    root_inbox: None,
                });
            }
            ranks[0].root_inbox = Some((inbox, outs));
            ranks
        }

        fn exchange(
            &mut self,
            mine: Vec<f64>,
            combine: impl Fn(&[Vec<f64>]) -> Vec<f64>,
        ) -> Vec<f64> {
            self.to_root.send((self.rank, mine)).unwrap();
            if let Some((inbox, outs)) = &self.root_inbox {
                let mut all = vec![Vec::new(); self.size];
                for _ in 0..self.size {
                    let (r, v) = inbox.recv().unwrap();
                    all[r] = v;
                }
                let result = combine(&all);
                for out in outs {
                    out.send(result.clone()).unwrap();
                }
            }
            self.from_root.recv().unwrap()
        }
    }

    fn sum_in_rank_order(all: &[Vec<f64>]) -> Vec<f64> {
        let mut acc = all[0].clone();
        for v in &all[1..] {
            acc.iter_mut().zip(v).for_each(|(a, b)| *a += b);
        }
        acc
    }

    impl Collective for ThreadRank {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn all_reduce_sum_f32(&mut self, buffer: &mut [f32], _: &str) -> Result<()> {
            let mine = buffer.iter().map(|&v| f64::from(v)).collect();
            let all = self.exchange(mine, sum_in_rank_order);
            buffer.iter_mut().zip(all).for_each(|(b, v)| *b = v as f32);
            Ok(())
        }
        fn all_reduce_sum_f64(&mut self, buffer: &mut [f64], _: &str) -> Result<()> {
            let all = self.exchange(buffer.to_vec(), sum_in_rank_order);
            buffer.copy_from_slice(&all);
            Ok(())
        }
        fn broadcast_bytes(&mut self, buffer: &mut [u8], root: usize, what: &str) -> Result<()> {
            check_root(root, self.size, what)?;
            let mine = buffer.iter().map(|&b| f64::from(b)).collect();
            let all = self.exchange(mine, |all| all[root].clone());
            buffer.iter_mut().zip(all).for_each(|(b, v)| *b = v as u8);
            Ok(())
        }
        fn barrier(&mut self, _: &str) -> Result<()> {
            self.exchange(Vec::new(), |_| Vec::new());
            Ok(())
        }
    }

    fn on_ranks<T: Send + 'static>(
        size: usize,
        f: impl Fn(&mut ThreadRank) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let handles: Vec<_> = ThreadRank::group(size)
            .into_iter()
            .map(|mut rank| {
                let f = f.clone();
                thread::spawn(move || f(&mut rank))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn gradients_are_summed_over_ranks_in_visiting_order() {
        let results = on_ranks(3, |c| {
            let r = c.rank() as f32;
            let mut store = ParamStore::new();
            store.add("a", vec![2], vec![0.0; 2]).unwrap();
            store.add("b", vec![1], vec![0.0]).unwrap();
            store.set_grad("a", &[r, 10.0 * r]).unwrap();
            store.set_grad("b", &[100.0 * r]).unwrap();
            assert_eq!(all_reduce_gradients(c, &mut store).unwrap(), 3);
            (
                store.get("a").unwrap().grad.clone(),
                store.get("b").unwrap().grad.clone(),
            )
        });
        for (a, b) in results {
            assert_eq!(a, vec![3.0, 30.0]);
            assert_eq!(b, vec![300.0]);
        }
    }

    #[test]
    fn a_rank_with_another_state_is_named() {
        let named = |v: &[u64]| -> Vec<(String, u64)> {
            v.iter()
                .enumerate()
                .map(|(i, &x)| (format!("entry {i}"), x))
                .collect()
        };
        let results = on_ranks(3, move |c| {
            let mut state = vec![1, 2, 3];
            if c.rank() == 2 {
                state[1] = 9;
            }
            check_same_state(c, &named(&state), "run state")
                .err()
                .map(|e| e.to_string())
        });
        let own = results[2].as_ref().unwrap();
        assert!(
            own.contains("rank 2") && own.contains("entry 1: 9 here, 2 on rank 0"),
            "{own}"
        );
        assert!(
            results[0].as_ref().unwrap().contains("1 other rank"),
            "{results:?}"
        );
        let same = on_ranks(2, move |c| {
            check_same_state(c, &named(&[7, 7]), "s").is_ok()
        });
        assert_eq!(same, vec![true, true]);
        let lengths = on_ranks(2, move |c| {
            let state = vec![0; 2 + c.rank()];
            check_same_state(c, &named(&state), "s").is_err()
        });
        assert_eq!(lengths, vec![true, true]);
        assert_ne!(hash_f32s(&[1.0, 2.0]), hash_f32s(&[2.0, 1.0]));
    }

    #[test]
    fn micro_batches_are_split_whole_and_strided() {
        assert!(check_split(4, 2).is_ok());
        let err = check_split(3, 2).unwrap_err().to_string();
        assert!(
            err.contains("gradient_accumulation = 3") && err.contains("multiple of 2"),
            "{err}"
        );
        let owned: Vec<Vec<usize>> = on_ranks(2, |c| (0..6).filter(|&i| owns(c, i, 6)).collect());
        assert_eq!(owned, vec![vec![0, 1, 2], vec![3, 4, 5]]);
        // Any count is shared out whole (evaluation batches need not divide evenly).
        let uneven: Vec<Vec<usize>> = on_ranks(3, |c| (0..5).filter(|&i| owns(c, i, 5)).collect());
        assert_eq!(uneven, vec![vec![0, 1], vec![2, 3], vec![4]]);
        assert!(SingleProcess.broadcast_bytes(&mut [0], 1, "x").is_err());
    }
}
