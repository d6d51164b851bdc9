//! Putting the agent on a board and running it there, detached from the SSH
//! session, then collecting its files.
//!
//! On the board, under `work_dir`:
//! - `agents/<hash>/quantbench-agent`: content-addressed, uploaded only when
//!   absent or when its SHA-256 on the board no longer matches its name,
//!   through a temporary name and a rename;
//! - `models/<sha256>.<ext>`: models, recipes and texts a job names,
//!   content-addressed like the agent;
//! - `runs/<run_id>-<job>/`: `job.json`, the agent's row files
//!   (`kernels.csv`, `samples.csv`, `models.csv`), `probe.json`,
//!   `progress.jsonl` (its stdout), `agent.log` (stderr), `pid`,
//!   `start_token` and, once it ends, `exit_code`. The agent runs under
//!   `setsid nohup`, so a dropped connection, or a host that dies, loses
//!   nothing: the host reconnects (or a resumed run reattaches) and carries
//!   on.
//!
//! While the agent runs, the host mirrors its files into the job's folder
//! of the run directory (`mirror`), appending the new bytes of each poll
//! and syncing them to disk, so whoever picks the job up (a reconnect, a
//! resumed run) goes on from where the host's copy ends; a board file that
//! shrank or was replaced is detected, said, and followed anew with the
//! host's rows kept. Whatever a board sends is bounded: command output,
//! downloads, the chunks of a backlog, a failed agent's log. Every remote step retries on a failed link,
//! with back-off, for the board's `retry_seconds`; every reconnect checks
//! the host key again.
//!
//! The runner knows nothing of job kinds: a planned job says which agent
//! subcommand to start, which host files to upload first (and where their
//! paths sit in the job) and which row files to fetch back.

use crate::builds::build::AgentBuild;
use crate::fleet::board_lock::{self, LockOwner, TakeOutcome};
use crate::fleet::board_storage;
use crate::fleet::boards::RemoteBoard;
use crate::fleet::transport::{Connection, SshEndpoint, TransportError};
use crate::runs::jobs::PlannedJob;
use crate::runs::run::{BoardRunner, RunError};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wire::progress::ProgressEvent;

mod agent;
mod board;

use agent::RemoteState;

pub struct SshRunner {
    pub board: RemoteBoard,
    pub agent: AgentBuild,
    pub accept_new_host_key: bool,
    /// How long to wait for the board's lock when another run holds it.
    pub lock_wait: Duration,
    /// Bytes uploaded to this board during the run (0 when the agent was there).
    pub uploaded_bytes: Arc<AtomicU64>,
    /// Where log lines go (the progress bar's println in the CLI).
    pub log: Arc<dyn Fn(String) + Send + Sync>,
    /// Set once the board has been checked and has this agent.
    pub prepared: bool,
}

/// How to reach `board` over SSH.
pub fn endpoint_of(board: &RemoteBoard, accept_new_host_key: bool) -> SshEndpoint {
    SshEndpoint {
        board: board.name.clone(),
        host: board.host.clone(),
        port: board.port,
        user: board.user.clone(),
        identities: board.identities.clone(),
        known_hosts: board.known_hosts.clone(),
        accept_new_host_key,
    }
}

/// `cargo xtask board clean`: prunes a board's work dir to its newest
/// `keep` runs, unless another run is measuring on it.
pub fn clean_board(
    board: &RemoteBoard,
    keep: usize,
    accept_new_host_key: bool,
) -> Result<String, RunError> {
    let conn = Connection::open(&endpoint_of(board, accept_new_host_key)).map_err(board_err)?;
    let owner = LockOwner::this_process(&format!("clean-{}", std::process::id()));
    let run_dir = format!("{}/runs/{}", board.work_dir, owner.run_id);
    match board_lock::try_take(&conn, &board.name, &board.work_dir, &run_dir, &owner)
        .map_err(board_err)?
    {
        TakeOutcome::Taken => {}
        TakeOutcome::Held(holder) => {
            return Err(RunError::Board(format!(
                "board {} is busy ({holder}); clean it when that run has finished",
                board.name
            )))
        }
    }
    // No agent of ours runs; keep whichever build is newest.
    let pruned = board_storage::prune(&conn, &board.work_dir, keep, "");
    let _ = board_lock::release(&conn, &board.work_dir, &owner.run_id);
    let pruned = pruned.map_err(board_err)?;
    let free = conn
        .free_bytes(&board.work_dir)
        .map(|b| format!("; {:.0} MB free", b as f64 / 1e6))
        .unwrap_or_default();
    Ok(format!("{}: {pruned}{free}", board.name))
}

/// A transport failure as the runner sees it: the network (worth a
/// reconnect) or the board (final).
fn board_err(e: TransportError) -> RunError {
    if e.is_connection_loss() {
        RunError::Link(e)
    } else {
        RunError::Board(e.to_string())
    }
}

impl BoardRunner for SshRunner {
    fn board(&self) -> &str {
        &self.board.name
    }

    fn uploaded_bytes(&self) -> u64 {
        self.uploaded_bytes.load(Ordering::Relaxed)
    }

    fn run(
        &mut self,
        job: &PlannedJob,
        job_dir: &Path,
        on_event: &mut dyn FnMut(&ProgressEvent),
    ) -> Result<(), RunError> {
        let mut conn = None;
        if !self.prepared {
            self.with_link(&mut conn, "checking the board", |c| {
                self.check_architecture(c)
            })?;
        }
        let remote_run = Self::remote_run(job);
        let owner = LockOwner::this_process(&remote_run);
        // The lock first, then the uploads: a run waiting for a busy board
        // has nothing on it that the holder's end-of-job prune could
        // remove, and everything it uploads is listed in the lock.
        self.with_link(&mut conn, "taking the board", |c| {
            self.take_board(c, &owner)
        })?;
        let result = self.run_holding(&mut conn, job, job_dir, &owner, on_event);
        self.finish_job(&remote_run);
        result
    }

    fn reattach(
        &mut self,
        job: &PlannedJob,
        job_dir: &Path,
        on_event: &mut dyn FnMut(&ProgressEvent),
    ) -> Result<(), RunError> {
        let remote_run = Self::remote_run(job);
        let dir = self.run_dir(&remote_run);
        let mut conn = None;
        let state = self.with_link(&mut conn, "looking for the interrupted run's agent", |c| {
            self.remote_state(c, &dir)
        })?;
        let what = match state {
            RemoteState::Absent => return Ok(()),
            RemoteState::Running => "still running: following it".to_string(),
            RemoteState::Exited(code) => format!("ended with status {code}: collecting its rows"),
        };
        (self.log)(format!(
            "{}: the agent of {remote_run} {what}",
            self.board.name
        ));
        let result = self.follow(&mut conn, &dir, job, job_dir, on_event);
        self.finish_job(&remote_run);
        match result {
            // Its unfinished units are measured again by the resumed run.
            Err(RunError::AgentDied { .. } | RunError::AgentFailed(_)) => Ok(()),
            other => other,
        }
    }
}
