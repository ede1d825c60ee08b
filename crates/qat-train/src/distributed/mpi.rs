//! The [`Collective`] over MPI (rsmpi on the system's MPI library; OpenMPI from Debian's
//! `libopenmpi-dev` is what CI uses), for `mpirun -np N`.
//!
//! * **Reduction**: rank-ordered, written on MPI's point-to-point calls rather than
//!   `MPI_Allreduce`, whose algorithm (and so summation order) the MPI library picks by
//!   message size and may change between versions. The buffer is cut into segments of
//!   [`SEGMENT_VALUES`]; each segment travels down the chain of ranks `0 → 1 → … → N−1`, every
//!   rank adding its own values to the partial sum it received, so every element is summed
//!   as `((p₀ + p₁) + p₂) + … + p_{N−1}` — the order of the ranks, which take contiguous
//!   blocks of the step's micro-batches, is the order one process accumulates them in. The
//!   chain is pipelined (rank `r` works on segment `j` while rank `r + 1` works on `j − 1`);
//!   rank `N−1` then broadcasts the sums. Time ≈ `2·bytes/bandwidth + (N−1)·segment/bandwidth`
//!   (docs/SCALING.md), against `2(N−1)/N·bytes/bandwidth` for a ring all-reduce, whose order
//!   differs between chunks of the buffer.
//! * **Timeout**: a watchdog thread ends the whole job with `MPI_Abort` (after a message naming
//!   the rank and the operation) when one collective call has waited longer than the
//!   configured timeout: a rank that hangs, or a dead rank the launcher did not notice,
//!   cannot keep the others waiting forever. A rank that exits or is killed is noticed by
//!   `mpirun` itself, which ends the job.
//!
//! Nothing here runs in the test suite of this crate (it needs `mpirun`); the `lora-qat`
//! crate's `mpi` test runs the trainer on two ranks and compares with one process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Destination, Root, Source};
use mpi::Threading;

use super::{check_root, Collective};
use crate::error::{Result, TrainError};

/// Environment variables an MPI launcher sets in every rank (OpenMPI, PMIx, MPICH/Hydra).
const LAUNCHER_VARIABLES: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"];

/// Whether this process was started by an MPI launcher (`mpirun`, `mpiexec`, `srun`): one of
/// the variables they set is present. A process started without one runs alone, and MPI is
/// not initialised for it.
pub fn launched_by_mpirun() -> bool {
    LAUNCHER_VARIABLES
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// What the watchdog watches: the collective call in progress, if any, and since when.
#[derive(Default)]
struct Watch {
    busy: Mutex<Option<(Instant, String)>>,
    stop: AtomicBool,
}

impl Watch {
    fn enter(&self, what: &str) -> BusyGuard<'_> {
        if let Ok(mut busy) = self.busy.lock() {
            *busy = Some((Instant::now(), what.to_string()));
        }
        BusyGuard(self)
    }
}

/// Clears the watch when a collective call returns.
struct BusyGuard<'a>(&'a Watch);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.0.busy.lock() {
            *busy = None;
        }
    }
}

/// MPI for the life of a run: initialised by [`MpiSession::init`], finalised on drop. Keep it
/// alive (in `main`) for as long as any [`MpiCollective`] is used; on an error call
/// [`MpiSession::abort`] rather than dropping it, so the other ranks do not wait in their
/// next collective (finalising is itself collective).
pub struct MpiSession {
    // Dropped last: MPI_Finalize after the watchdog has stopped.
    universe: Universe,
    watch: Arc<Watch>,
    watchdog: Option<JoinHandle<()>>,
    rank: usize,
    size: usize,
}

impl std::fmt::Debug for MpiSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiSession")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("watchdog", &self.watchdog.is_some())
            .finish_non_exhaustive()
    }
}

impl MpiSession {
    /// Initialises MPI (thread level `MPI_THREAD_MULTIPLE`, so the watchdog may call
    /// `MPI_Abort` while the main thread waits in a collective) and, with `timeout`, starts
    /// the watchdog. Errors when MPI was already initialised, the timeout is zero, or the
    /// library lacks thread support for a watchdog.
    pub fn init(timeout: Option<Duration>) -> Result<Self> {
        if timeout == Some(Duration::ZERO) {
            return Err(TrainError::invalid(
                "collective timeout",
                "0 s",
                "must be positive (or none to wait forever)",
            ));
        }
        let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| {
                TrainError::invalid("MPI", "initialize", "MPI is already initialised")
            })?;
        let world = universe.world();
        let (rank, size) = (rank_of(&world), size_of(&world));
        if timeout.is_some() && threading != Threading::Multiple {
            // The universe drops here: finalise on every rank alike (all fail the same way).
            return Err(TrainError::invalid(
                "collective timeout",
                format!("{timeout:?}"),
                format!(
                    "the MPI library gives thread level {threading:?}, the watchdog needs \
                     Multiple: run without a timeout"
                ),
            ));
        }
        let watch = Arc::new(Watch::default());
        let watchdog = timeout.map(|limit| {
            let watch = Arc::clone(&watch);
            std::thread::spawn(move || watchdog(&watch, limit, rank, size))
        });
        Ok(Self {
            universe,
            watch,
            watchdog,
            rank,
            size,
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }

    /// A collective over all ranks (`MPI_COMM_WORLD`) for the trainer.
    pub fn collective(&self) -> MpiCollective {
        MpiCollective {
            world: self.universe.world(),
            watch: Arc::clone(&self.watch),
            rank: self.rank,
            size: self.size,
        }
    }

    /// Ends every rank of the job now (`MPI_Abort`), exit status `code`.
    pub fn abort(&self, code: i32) -> ! {
        self.universe.world().abort(code)
    }
}

impl Drop for MpiSession {
    fn drop(&mut self) {
        self.watch.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.watchdog.take() {
            // The thread wakes at least once a second; a panic inside it already printed.
            let _ = handle.join();
        }
    }
}

fn rank_of(world: &SimpleCommunicator) -> usize {
    usize::try_from(world.rank()).unwrap_or(0)
}

fn size_of(world: &SimpleCommunicator) -> usize {
    usize::try_from(world.size()).unwrap_or(1).max(1)
}

/// Aborts the job when one collective call has waited longer than `limit`.
fn watchdog(watch: &Watch, limit: Duration, rank: usize, size: usize) {
    let tick = (limit / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    while !watch.stop.load(Ordering::Relaxed) {
        std::thread::sleep(tick);
        let overdue = watch.busy.lock().ok().and_then(|busy| {
            busy.as_ref()
                .filter(|(since, _)| since.elapsed() > limit)
                .map(|(_, what)| what.clone())
        });
        if let Some(what) = overdue {
            // One write, so the launcher does not interleave it with another rank's.
            let line = format!(
                "error: rank {rank} of {size}: no progress for {:.1} s in the all-rank \
                 operation on {what} (another rank died, hangs or is far slower; see \
                 --collective-timeout); aborting the job\n",
                limit.as_secs_f64()
            );
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            // SAFETY: MPI is initialised with MPI_THREAD_MULTIPLE (checked in `init`), so
            // this thread may call MPI while the main thread waits inside a collective.
            unsafe {
                mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 124);
            }
        }
    }
}

/// [`Collective`] over `MPI_COMM_WORLD` (see the [module docs](self)); from
/// [`MpiSession::collective`].
pub struct MpiCollective {
    world: SimpleCommunicator,
    watch: Arc<Watch>,
    rank: usize,
    size: usize,
}

impl std::fmt::Debug for MpiCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiCollective")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// `[start, end)` of chunk `c` when `len` values are cut into `n` near-equal chunks.
fn chunk(len: usize, n: usize, c: usize) -> std::ops::Range<usize> {
    (c * len / n)..((c + 1) * len / n)
}

/// Values per message of the pipelined reduction (1 MiB of `f32`): small enough that the
/// chain of ranks works on different segments at once, large enough that per-message latency
/// does not dominate.
const SEGMENT_VALUES: usize = 1 << 18;

impl MpiCollective {
    /// The rank-ordered all-reduce of the [module docs](self): a pipelined chain
    /// `0 → 1 → … → N−1` adds each segment as `((p₀ + p₁) + p₂) + …`, then rank `N−1`
    /// broadcasts the sums (a copy: the same bits on every rank whatever algorithm the MPI
    /// library uses for it).
    fn ordered_all_reduce<T>(&self, buffer: &mut [T]) -> Result<()>
    where
        T: Equivalence + Copy + Default + std::ops::Add<Output = T>,
    {
        let (n, r, len) = (self.size, self.rank, buffer.len());
        if n == 1 {
            return Ok(());
        }
        let segments = len.div_ceil(SEGMENT_VALUES).max(1);
        let mut incoming = vec![T::default(); chunk(len, segments, 0).len() + 1];
        for j in 0..segments {
            let range = chunk(len, segments, j);
            if r > 0 {
                let into = &mut incoming[..range.len()];
                self.world
                    .process_at_rank((r - 1) as i32)
                    .receive_into(into);
                for (own, partial) in buffer[range.clone()].iter_mut().zip(into.iter()) {
                    // The ranks before this one, in rank order, then this one.
                    *own = *partial + *own;
                }
            }
            if r + 1 < n {
                self.world
                    .process_at_rank((r + 1) as i32)
                    .send(&buffer[range]);
            }
        }
        self.world
            .process_at_rank((n - 1) as i32)
            .broadcast_into(buffer);
        Ok(())
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum_f32(&mut self, buffer: &mut [f32], what: &str) -> Result<()> {
        let _busy = self.watch.enter(what);
        self.ordered_all_reduce(buffer)
    }

    fn all_reduce_sum_f64(&mut self, buffer: &mut [f64], what: &str) -> Result<()> {
        let _busy = self.watch.enter(what);
        self.ordered_all_reduce(buffer)
    }

    fn broadcast_bytes(&mut self, buffer: &mut [u8], root: usize, what: &str) -> Result<()> {
        check_root(root, self.size, what)?;
        let _busy = self.watch.enter(what);
        self.world
            .process_at_rank(root as i32)
            .broadcast_into(buffer);
        Ok(())
    }

    fn barrier(&mut self, what: &str) -> Result<()> {
        let _busy = self.watch.enter(what);
        self.world.barrier();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::chunk;

    #[test]
    fn chunks_cover_the_buffer_in_order() {
        for len in 0..20 {
            for n in 1..6 {
                let mut next = 0;
                for c in 0..n {
                    let range = chunk(len, n, c);
                    assert_eq!(range.start, next);
                    next = range.end;
                }
                assert_eq!(next, len);
                assert!((0..n).all(|c| chunk(len, n, c).len() <= chunk(len, n, 0).len() + 1));
            }
        }
    }
}
