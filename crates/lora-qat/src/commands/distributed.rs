//! The ranks of `lora-qat train` under an MPI launcher (`mpirun -np N lora-qat train ...`,
//! built with `--features mpi`): which rank this process is, the collective the trainer
//! syncs with, and how a failure ends the whole job. Started without a launcher (or built
//! without the feature) the run is one process and nothing changes. See docs/SCALING.md.

use std::time::Duration;

use qat_train::distributed::{Collective, SingleProcess};

use super::{CliError, CliResult};

/// This process's place in the job; keeps MPI initialised while it lives.
#[derive(Debug)]
pub struct Ranks {
    #[cfg(feature = "mpi")]
    session: Option<qat_train::distributed::mpi::MpiSession>,
}

impl Ranks {
    /// Joins the MPI job when started by a launcher (with a watchdog ending the job after
    /// `collective_timeout` seconds without progress in one collective; `0` waits forever),
    /// else a single process. Errors when a launcher started several ranks of a binary built
    /// without the `mpi` feature (they would each train alone and overwrite each other's
    /// files).
    pub fn start(collective_timeout: f64) -> CliResult<Self> {
        if !(collective_timeout.is_finite() && collective_timeout >= 0.0) {
            return Err(CliError::Usage(format!(
                "--collective-timeout {collective_timeout}: must be a number of seconds >= 0"
            )));
        }
        let timeout =
            (collective_timeout > 0.0).then(|| Duration::from_secs_f64(collective_timeout));
        #[cfg(feature = "mpi")]
        {
            use qat_train::distributed::mpi::{launched_by_mpirun, MpiSession};
            let session = if launched_by_mpirun() {
                Some(MpiSession::init(timeout)?)
            } else {
                None
            };
            Ok(Self { session })
        }
        #[cfg(not(feature = "mpi"))]
        {
            let _ = timeout;
            // Variables an MPI launcher sets to the number of ranks (OpenMPI, MPICH/Hydra).
            for var in ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"] {
                let ranks = std::env::var(var)
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok());
                if let Some(n) = ranks.filter(|&n| n > 1) {
                    return Err(CliError::Usage(format!(
                        "started as one of {n} MPI ranks ({var}={n}) but this lora-qat was built \
                         without the `mpi` feature: rebuild with `cargo build --release \
                         --features mpi`, or run one process"
                    )));
                }
            }
            Ok(Self {})
        }
    }

    /// This process's rank (0 in a single process).
    pub fn rank(&self) -> usize {
        #[cfg(feature = "mpi")]
        if let Some(s) = &self.session {
            return s.rank();
        }
        0
    }

    /// Number of ranks (1 in a single process).
    pub fn size(&self) -> usize {
        #[cfg(feature = "mpi")]
        if let Some(s) = &self.session {
            return s.size();
        }
        1
    }

    /// The collective the trainer syncs with.
    pub fn collective(&self) -> Box<dyn Collective> {
        #[cfg(feature = "mpi")]
        if let Some(s) = &self.session {
            return Box::new(s.collective());
        }
        Box::new(SingleProcess)
    }

    /// Ends the run with `result`: with several ranks a failure is printed with this rank's
    /// number and ends every rank at once (`MPI_Abort`), since the others would otherwise
    /// wait for this one in their next collective.
    pub fn finish(self, result: CliResult) -> CliResult {
        #[cfg(feature = "mpi")]
        if let (Err(e), Some(s)) = (&result, &self.session) {
            if s.size() > 1 {
                // One write, so the launcher does not interleave it with another rank's.
                let line = format!(
                    "error: rank {} of {}: {e}; ending the job on every rank\n",
                    s.rank(),
                    s.size()
                );
                let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
                s.abort(1);
            }
        }
        result
    }
}
