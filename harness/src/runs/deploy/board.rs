//! Holding a board for the SSH runner: its lock (taken first, kept fresh
//! during long uploads, lost if another run took it over), content-addressed
//! uploads verified by SHA-256, and the disk and memory checks before a job.

use super::{board_err, SshRunner};
use crate::fleet::board_lock::{self, LockOwner, TakeOutcome};
use crate::fleet::transport::{command_line, Connection, TransportError};
use crate::runs::jobs::PlannedJob;
use crate::runs::run::RunError;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use wire::probe::BoardProbe;
use wire::progress::ProgressEvent;

/// How often a run waiting for a busy board asks again.
const LOCK_POLL: Duration = Duration::from_secs(3);
/// How often a long upload refreshes its run's lock (well inside the
/// lock's start grace).
const LOCK_HEARTBEAT: Duration = Duration::from_secs(30);
/// Free space kept beside what a job needs, for the system and its logs.
const DISK_MARGIN_BYTES: u64 = 16 << 20;

impl SshRunner {
    /// The board's description from the deployed agent (no bandwidth run).
    pub(super) fn remote_probe(&self, conn: &Connection) -> Result<BoardProbe, RunError> {
        let out = conn
            .exec_ok(&format!("{} probe", self.agent_command()))
            .map_err(board_err)?;
        serde_json::from_str(&out).map_err(|e| {
            RunError::Board(format!("board {}: unreadable probe: {e}", self.board.name))
        })
    }

    /// The job's steps once its run holds the board: the agent, the
    /// checks, the uploads (each listed in the lock before it starts), the
    /// start (only while the lock is still this run's) and following.
    pub(super) fn run_holding(
        &mut self,
        conn: &mut Option<Connection>,
        job: &PlannedJob,
        job_dir: &Path,
        owner: &LockOwner,
        on_event: &mut dyn FnMut(&ProgressEvent),
    ) -> Result<(), RunError> {
        let first = !self.prepared;
        self.with_link(conn, "preparing the board", |c| {
            self.keep_holding(c, owner, std::slice::from_ref(&self.agent.hash))?;
            self.deploy_agent(c, &self.agent, first)
        })?;
        // The other builds an A/B job measures, each listed in the lock
        // before its upload, like every upload.
        for agent in &job.agents {
            self.with_link(conn, "uploading another build's agent", |c| {
                self.keep_holding(c, owner, std::slice::from_ref(&agent.hash))?;
                self.deploy_agent(c, agent, true)
            })?;
        }
        self.prepared = true;
        self.with_link(conn, "checking the board's memory", |c| {
            self.check_memory(c, job)
        })?;
        let mut spec = job.spec.clone();
        for upload in &job.uploads {
            let remote = self.with_link(conn, "uploading", |c| {
                self.upload_content_addressed(c, &upload.local, owner)
            })?;
            match spec.pointer_mut(&upload.pointer) {
                Some(slot) => *slot = serde_json::Value::String(remote),
                None => {
                    return Err(RunError::Board(format!(
                        "job {}: no `{}` in the job to point at {}",
                        job.name,
                        upload.pointer,
                        upload.local.display()
                    )))
                }
            }
        }
        self.with_link(conn, "checking the board's free space", |c| {
            self.check_disk(c, job.disk_bytes)
        })?;
        let dir = self.run_dir(&owner.run_id);
        let token = format!("{}-{}", std::process::id(), wire::utc_now_rfc3339_millis());
        self.with_link(conn, "starting the agent", |c| {
            self.start(c, &dir, job.subcommand, &spec, &token, owner)
        })?;
        self.follow(conn, &dir, job, job_dir, on_event)
    }

    /// Confirms this run still holds the board, keeps its lock fresh and
    /// lists `uses` in it (so no prune removes them).
    pub(super) fn keep_holding(
        &self,
        conn: &Connection,
        owner: &LockOwner,
        uses: &[String],
    ) -> Result<(), RunError> {
        match board_lock::hold(conn, &self.board.name, &self.board.work_dir, owner, uses)
            .map_err(board_err)?
        {
            board_lock::Holding::Held => Ok(()),
            board_lock::Holding::Lost(holder) => Err(self.lost_lock(&holder)),
        }
    }

    pub(super) fn lost_lock(&self, holder: &str) -> RunError {
        let holder = serde_json::from_str::<LockOwner>(holder)
            .map(|o| o.describe())
            .unwrap_or_else(|_| holder.to_string());
        RunError::Board(format!(
            "board {}: this run lost the board's lock to {holder} (it could not reach the board for longer than the lock's {} s start grace, and the lock was taken over); nothing more is started here. Run again, or resume, once that run has finished",
            self.board.name,
            board_lock::START_GRACE_SECS
        ))
    }

    /// Takes the board's lock for `owner`, waiting up to `lock_wait` while
    /// another live run holds it; then fails with who holds it.
    pub(super) fn take_board(&self, conn: &Connection, owner: &LockOwner) -> Result<(), RunError> {
        let run_dir = self.run_dir(&owner.run_id);
        let started = Instant::now();
        let mut said_waiting = false;
        loop {
            let holder = match board_lock::try_take(
                conn,
                &self.board.name,
                &self.board.work_dir,
                &run_dir,
                owner,
            )
            .map_err(board_err)?
            {
                TakeOutcome::Taken => return Ok(()),
                TakeOutcome::Held(raw) => serde_json::from_str::<LockOwner>(&raw)
                    .map(|o| o.describe())
                    .unwrap_or(raw),
            };
            if started.elapsed() >= self.lock_wait {
                return Err(RunError::Board(format!(
                    "board {} is busy: {holder} is measuring on it (waited {:.0} s). Let it finish, or wait longer with --lock-wait",
                    self.board.name,
                    started.elapsed().as_secs_f64()
                )));
            }
            if !said_waiting {
                (self.log)(format!(
                    "{}: busy with {holder}; waiting up to {} s",
                    self.board.name,
                    self.lock_wait.as_secs()
                ));
                said_waiting = true;
            }
            std::thread::sleep(LOCK_POLL.min(self.lock_wait.saturating_sub(started.elapsed())));
        }
    }

    /// True when `remote` is on the board and its SHA-256 starts with
    /// `hash` (the prefix its name carries). A file of that name whose
    /// content does not match (truncated by a power cut, half-copied by
    /// hand) is deleted, so the caller uploads it again instead of running
    /// a broken agent or model every night.
    pub(super) fn cached_and_intact(
        &self,
        conn: &Connection,
        remote: &str,
        hash: &str,
    ) -> Result<bool, RunError> {
        if !conn.exists(remote).map_err(board_err)? {
            return Ok(false);
        }
        let sum = conn
            .exec(&command_line(&["sha256sum", "--", remote]))
            .map_err(board_err)?;
        if sum.status == 0 && sum.stdout.trim_start().starts_with(hash) {
            return Ok(true);
        }
        let found = match sum.status {
            0 => sum.stdout.get(..12).unwrap_or("?").to_string(),
            _ => format!("unreadable: {}", sum.stderr.trim()),
        };
        (self.log)(format!(
            "{}: cached {remote} does not match its SHA-256 ({found} instead of {hash}...): deleting it and uploading again",
            self.board.name
        ));
        conn.exec_ok(&command_line(&["rm", "-f", "--", remote]))
            .map_err(board_err)?;
        Ok(false)
    }

    /// Uploads `local` to `<work_dir>/models/<hash>.<ext>` unless there,
    /// never leaving a partial file under the final name; returns the
    /// remote path.
    pub(super) fn upload_content_addressed(
        &self,
        conn: &Connection,
        local: &Path,
        owner: &LockOwner,
    ) -> Result<String, RunError> {
        let hash =
            crate::builds::build::file_hash(local).map_err(|e| RunError::Board(e.to_string()))?;
        let ext = local.extension().and_then(|e| e.to_str()).unwrap_or("bin");
        let dir = format!("{}/models", self.board.work_dir);
        let name = format!("{hash}.{ext}");
        let remote = format!("{dir}/{name}");
        self.keep_holding(conn, owner, &[name])?;
        if self.cached_and_intact(conn, &remote, &hash)? {
            (self.log)(format!(
                "{}: {} already on the board",
                self.board.name,
                local.display()
            ));
            return Ok(remote);
        }
        conn.exec_ok(&command_line(&["mkdir", "-p", &dir]))
            .map_err(board_err)?;
        let size = std::fs::metadata(local).map(|m| m.len()).unwrap_or(0);
        let bar = indicatif::ProgressBar::new(size);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>10} upload {bytes}/{total_bytes} {wide_msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_prefix(self.board.name.clone());
        bar.set_message(local.display().to_string());
        // A long upload keeps the lock fresh, so the run never looks
        // stale while it holds the board without an agent yet.
        let mut last_hold = Instant::now();
        let mut lost = None;
        let sent = conn
            .upload(local, &remote, 0o644, &mut |n| {
                bar.set_position(n);
                if last_hold.elapsed() >= LOCK_HEARTBEAT && lost.is_none() {
                    last_hold = Instant::now();
                    if let Err(e) = self.keep_holding(conn, owner, &[]) {
                        lost = Some(e);
                    }
                }
            })
            .map_err(board_err)?;
        bar.finish_and_clear();
        if let Some(e) = lost {
            return Err(e);
        }
        self.uploaded_bytes.fetch_add(sent, Ordering::Relaxed);
        (self.log)(format!(
            "{}: uploaded {} ({:.1} MB)",
            self.board.name,
            local.display(),
            sent as f64 / 1e6
        ));
        Ok(remote)
    }

    /// Checks the board has room for what the agent will write.
    pub(super) fn check_disk(&self, conn: &Connection, need: u64) -> Result<(), RunError> {
        let Some(free) = conn.free_bytes(&self.board.work_dir) else {
            return Ok(());
        };
        if free < need + DISK_MARGIN_BYTES {
            return Err(RunError::Board(
                TransportError::DiskFull {
                    board: self.board.name.clone(),
                    path: self.board.work_dir.clone(),
                    detail: format!(
                        "{:.1} MB free; the job needs about {:.1} MB for staged weights and rows, plus {} MB kept free",
                        free as f64 / 1e6,
                        need as f64 / 1e6,
                        DISK_MARGIN_BYTES >> 20
                    ),
                }
                .to_string(),
            ));
        }
        Ok(())
    }

    /// Checks the job fits the board's memory (its own, or `max_memory_mb`).
    pub(super) fn check_memory(&self, conn: &Connection, job: &PlannedJob) -> Result<(), RunError> {
        let Some(need) = &job.memory_need else {
            return Ok(());
        };
        let probe = self.remote_probe(conn)?;
        let memory = match (probe.memory_bytes, self.board.max_memory_bytes) {
            (0, limit) => limit.unwrap_or(0),
            (reported, Some(limit)) => reported.min(limit),
            (reported, None) => reported,
        };
        if memory > 0 && need.bytes > memory {
            return Err(RunError::DoesNotFit(format!(
                "board {}: {} needs about {:.3} GB but the board has {:.3} GB of memory to plan for (its own, or `max_memory_mb`); {}",
                self.board.name,
                need.what,
                need.bytes as f64 / 1e9,
                memory as f64 / 1e9,
                need.advice
            )));
        }
        Ok(())
    }
}
