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

use crate::board_lock::{self, LockOwner, TakeOutcome};
use crate::board_storage::{self, Pruned};
use crate::boards::RemoteBoard;
use crate::build::{AgentBuild, AGENT_BIN};
use crate::jobs::PlannedJob;
use crate::mirror::{self, MirrorError};
use crate::run::{BoardRunner, RunError};
use crate::transport::{command_line, shell_quote, Connection, SshEndpoint, TransportError};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wire::files::{ResultsError, PROBE_FILE};
use wire::probe::BoardProbe;
use wire::progress::ProgressEvent;

const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// The exit code `follow` reports for an agent it stopped at the deadline.
const DEADLINE_EXIT: i32 = -2;

/// How often a run waiting for a busy board asks again.
const LOCK_POLL: Duration = Duration::from_secs(3);
/// How often a long upload refreshes its run's lock (well inside the
/// lock's start grace).
const LOCK_HEARTBEAT: Duration = Duration::from_secs(30);

/// What `follow` reports for an agent whose shell died before it could
/// write the exit status.
const NO_EXIT_STATUS: i32 = -3;
/// Below this much free space, a failed agent is blamed on a full disk.
const DISK_FULL_BYTES: u64 = 1 << 20;
/// Free space kept beside what a job needs, for the system and its logs.
const DISK_MARGIN_BYTES: u64 = 16 << 20;

/// The longest progress line read as an event (a real one is under 1 KB).
const MAX_PROGRESS_LINE: usize = 1 << 20;
/// How much of a failed agent's log is read for its last lines.
const LOG_TAIL_BYTES: u64 = 64 << 10;
/// The largest probe.json taken from a board (a real one is a few KB).
const MAX_PROBE_BYTES: u64 = 4 << 20;

/// The longest pause between two retries of a failed remote step.
const MAX_BACKOFF: Duration = Duration::from_secs(16);

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

impl SshRunner {
    fn endpoint(&self) -> SshEndpoint {
        endpoint_of(&self.board, self.accept_new_host_key)
    }

    /// `agents/<hash>/`: where the board keeps an agent build.
    fn agent_dir(&self, hash: &str) -> String {
        format!("{}/agents/{hash}", self.board.work_dir)
    }

    fn agent_path(&self) -> String {
        format!("{}/{AGENT_BIN}", self.agent_dir(&self.agent.hash))
    }

    /// Refuses a board whose CPU cannot run the agent (unless a runner such
    /// as qemu is configured), with both architectures named.
    fn check_architecture(&self, conn: &Connection) -> Result<(), RunError> {
        if !self.board.runner.is_empty() {
            return Ok(());
        }
        let machine = conn.exec_ok("uname -m").map_err(board_err)?;
        let machine = machine.trim();
        let agent_arch = self.agent.target_triple.split('-').next().unwrap_or("");
        let compatible = machine == agent_arch || (agent_arch == "aarch64" && machine == "arm64");
        if !compatible {
            return Err(RunError::Board(format!(
                "board {} is {machine} but the agent is built for {agent_arch} (profile {}): wrong architecture. Use a board profile for its CPU, or set `runner = [\"qemu-aarch64\", \"-cpu\", \"{}\"]` for an emulated board",
                self.board.name,
                self.board.profile.name(),
                self.board.profile.qemu_cpu()
            )));
        }
        Ok(())
    }

    /// Uploads the agent unless the board already has this exact build,
    /// intact.
    /// Checked before every job (another run's prune, or a person, may
    /// have removed it between two jobs); said once.
    /// `agent` is the runner's own or another build a job measures (A/B).
    fn deploy_agent(
        &self,
        conn: &Connection,
        agent: &AgentBuild,
        say_cached: bool,
    ) -> Result<(), RunError> {
        let dir = self.agent_dir(&agent.hash);
        let remote = format!("{dir}/{AGENT_BIN}");
        if self.cached_and_intact(conn, &remote, &agent.hash)? {
            if say_cached {
                (self.log)(format!(
                    "{}: agent {} already on the board, nothing uploaded",
                    self.board.name, agent.hash
                ));
            }
            return Ok(());
        }
        conn.exec_ok(&command_line(&["mkdir", "-p", &dir]))
            .map_err(board_err)?;
        let bytes = conn
            .upload(&agent.path, &remote, 0o755, &mut |_| {})
            .map_err(board_err)?;
        self.uploaded_bytes.fetch_add(bytes, Ordering::Relaxed);
        (self.log)(format!(
            "{}: uploaded agent {} ({:.1} MB)",
            self.board.name,
            agent.hash,
            bytes as f64 / 1e6
        ));
        Ok(())
    }

    fn run_dir(&self, remote_run: &str) -> String {
        format!("{}/runs/{}", self.board.work_dir, remote_run)
    }

    /// The job's folder name on the board: `<run_id>-<job>`.
    fn remote_run(job: &PlannedJob) -> String {
        let run_id = job
            .spec
            .get("run_id")
            .and_then(|v| v.as_str())
            .unwrap_or("run");
        format!("{run_id}-{}", job.name)
    }

    /// The agent as the board's shell should invoke it (runner included).
    fn agent_command(&self) -> String {
        let agent_expr = crate::shell::board_path(&self.agent_path());
        let mut argv: Vec<String> = self.board.runner.iter().map(|r| shell_quote(r)).collect();
        argv.push(agent_expr);
        argv.join(" ")
    }

    /// Runs `step` on a connection, opening one when there is none; while
    /// the link fails, drops the connection and tries again (a fresh
    /// connection checks the host key again) with back-off, for the board's
    /// `retry_seconds`. Every step given here can be repeated safely.
    fn with_link<T>(
        &self,
        conn: &mut Option<Connection>,
        what: &str,
        mut step: impl FnMut(&Connection) -> Result<T, RunError>,
    ) -> Result<T, RunError> {
        let started = Instant::now();
        let budget = Duration::from_secs(self.board.retry_seconds);
        let mut delay = Duration::from_secs(1);
        loop {
            let attempt = match conn.as_ref() {
                Some(c) => step(c),
                None => match Connection::open(&self.endpoint()) {
                    Ok(c) => {
                        let result = step(&c);
                        *conn = Some(c);
                        result
                    }
                    Err(e) => Err(board_err(e)),
                },
            };
            match attempt {
                Err(RunError::Link(e)) => {
                    *conn = None;
                    if started.elapsed() >= budget {
                        return Err(RunError::Board(format!(
                            "{e} (while {what}; gave up after retrying for {:.0} s, the board's `retry_seconds`. An agent already started keeps running on the board with its rows under {}; `cargo xtask bench --resume latest` collects them)",
                            started.elapsed().as_secs_f64(),
                            self.board.work_dir
                        )));
                    }
                    (self.log)(format!(
                        "{}: {what}: link failed ({e}); reconnecting in {} s",
                        self.board.name,
                        delay.as_secs()
                    ));
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
                other => return other,
            }
        }
    }

    /// Writes `job` as job.json in the run folder and starts `agent
    /// <subcommand> --job job.json --out-dir .` detached; returns at once.
    /// Repeating it with the same `token` (a retry after the link dropped
    /// before the answer came) never starts a second agent. A folder where
    /// an agent ran before (a resumed run measuring what is left) keeps its
    /// files: the agent appends.
    fn start(
        &self,
        conn: &Connection,
        dir: &str,
        subcommand: &str,
        job: &serde_json::Value,
        token: &str,
        owner: &LockOwner,
    ) -> Result<(), RunError> {
        conn.exec_ok(&command_line(&["mkdir", "-p", dir]))
            .map_err(board_err)?;
        let job_json =
            serde_json::to_vec_pretty(job).map_err(|e| RunError::Board(e.to_string()))?;
        conn.write_file(&format!("{dir}/job.json.next"), &job_json)
            .map_err(board_err)?;
        let inner = format!(
            "{} {} --job job.json --out-dir . >> progress.jsonl 2>> agent.log < /dev/null; echo $? > exit_code",
            self.agent_command(),
            shell_quote(subcommand)
        );
        let script = format!(
            "cd {dir} && if [ \"$(cat start_token 2>/dev/null)\" = {token} ]; then exit 0; fi && mv job.json.next job.json && printf '%s' {token} > start_token && rm -f exit_code pid && (setsid nohup sh -c {inner} > /dev/null 2>&1 < /dev/null & echo $! > pid)",
            dir = crate::shell::board_path(dir),
            token = shell_quote(token),
            inner = shell_quote(&inner),
        );
        match board_lock::start_holding(
            conn,
            &self.board.name,
            &self.board.work_dir,
            owner,
            &script,
        )
        .map_err(board_err)?
        {
            board_lock::Holding::Held => Ok(()),
            board_lock::Holding::Lost(holder) => Err(self.lost_lock(&holder)),
        }
    }

    /// Whether an agent was started in `dir`, and if so whether it runs (a
    /// zombie no one has reaped yet has ended).
    fn remote_state(&self, conn: &Connection, dir: &str) -> Result<RemoteState, RunError> {
        let script = format!(
            "cd {} 2>/dev/null || {{ echo absent; exit 0; }}\nif [ -s exit_code ]; then echo exited $(cat exit_code)\nelif [ -s pid ] && kill -0 $(cat pid) 2>/dev/null && ! grep -q '^State:.*Z' /proc/$(cat pid)/status 2>/dev/null; then echo running\nelif [ -s pid ]; then if [ -s exit_code ]; then echo exited $(cat exit_code); else echo exited {NO_EXIT_STATUS}; fi\nelse echo absent; fi",
            crate::shell::board_path(dir)
        );
        let out = conn.exec_ok(&script).map_err(link_err)?;
        let words: Vec<&str> = out.split_whitespace().collect();
        Ok(match words.as_slice() {
            ["running"] => RemoteState::Running,
            ["exited", code] => RemoteState::Exited(code.parse().unwrap_or(-1)),
            _ => RemoteState::Absent,
        })
    }

    /// Appends what the board's copy of each file in `dir` has beyond the
    /// host's copy in `job_dir`, synced to disk (see `mirror`); returns the
    /// new progress lines' bytes.
    fn mirror(
        &self,
        conn: &Connection,
        dir: &str,
        job_dir: &Path,
        outputs: &[&str],
    ) -> Result<Vec<u8>, RunError> {
        let mut progress = Vec::new();
        for file in outputs.iter().chain(&[AGENT_LOG, PROGRESS_FILE]) {
            let is_progress = *file == PROGRESS_FILE;
            let followed = mirror::follow(
                conn,
                &format!("{dir}/{file}"),
                &job_dir.join(file),
                is_progress,
            )
            .map_err(|e| match e {
                MirrorError::Board(e) => link_err(e),
                MirrorError::Host(e) => RunError::Results(e),
            })?;
            if let Some(note) = followed.note {
                (self.log)(format!("{}: {note}", self.board.name));
            }
            if followed.cut > 0 {
                (self.log)(format!(
                    "{}: {} bytes of the agent's progress output came in one poll, more than {} MiB: kept in {PROGRESS_FILE}, not read as progress",
                    self.board.name,
                    followed.cut,
                    mirror::MAX_KEPT_BYTES >> 20
                ));
            }
            if is_progress {
                progress = followed.bytes;
            }
        }
        Ok(progress)
    }

    /// Follows the agent in `dir` to its end, mirroring its files as they
    /// grow, reconnecting while the link fails; stops it at `deadline`.
    /// Then maps a failed exit to the reason, naming the cell it died in.
    fn follow(
        &self,
        conn: &mut Option<Connection>,
        dir: &str,
        job: &PlannedJob,
        job_dir: &Path,
        on_event: &mut dyn FnMut(&ProgressEvent),
    ) -> Result<(), RunError> {
        let started = Instant::now();
        let mut pending = String::new();
        let mut last_started: Option<String> = None;
        let mut dispatch = |progress: &[u8], last_started: &mut Option<String>| {
            pending.push_str(&String::from_utf8_lossy(progress));
            while let Some(newline) = pending.find('\n') {
                let line: String = pending.drain(..=newline).collect();
                if line.len() > MAX_PROGRESS_LINE {
                    // No event is that long: not a progress line.
                    continue;
                }
                if let Some(event) = ProgressEvent::parse(&line) {
                    if let ProgressEvent::CellStarted { cell_id, .. } = &event {
                        *last_started = Some(cell_id.clone());
                    }
                    on_event(&event);
                }
            }
            if pending.len() > MAX_PROGRESS_LINE {
                // A line without end that long is no event; drop what has
                // come of it rather than hold it.
                pending.clear();
            }
        };
        let exit_code = loop {
            let (progress, state) = self.with_link(conn, "following the agent", |c| {
                let progress = self.mirror(c, dir, job_dir, job.outputs)?;
                Ok((progress, self.remote_state(c, dir)?))
            })?;
            dispatch(&progress, &mut last_started);
            match state {
                RemoteState::Exited(code) => break code,
                RemoteState::Absent => {
                    return Err(RunError::Board(format!(
                        "board {}: the agent's folder {dir} is gone (deleted on the board?)",
                        self.board.name
                    )))
                }
                RemoteState::Running if started.elapsed() >= job.deadline => {
                    self.with_link(conn, "stopping the agent at its deadline", |c| {
                        self.stop_agent(c, dir)
                    })?;
                    break DEADLINE_EXIT;
                }
                RemoteState::Running => std::thread::sleep(POLL_INTERVAL),
            }
        };
        // Whatever the agent wrote last, and its description of the board.
        // Its last progress lines (the `finished` event with the agent's
        // own time) are often written between the last poll's read and
        // its exit, so they are dispatched too.
        let (progress, free_after) = self.with_link(conn, "collecting the agent's files", |c| {
            let progress = self.mirror(c, dir, job_dir, job.outputs)?;
            self.fetch_probe(c, dir, job_dir)?;
            Ok((progress, c.free_bytes(dir)))
        })?;
        dispatch(&progress, &mut last_started);
        if exit_code == 0 {
            return Ok(());
        }
        // Its last lines only: a failed agent's log can be any size.
        let log = mirror::read_tail(&job_dir.join(AGENT_LOG), LOG_TAIL_BYTES)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let tail: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = tail[tail.len().saturating_sub(2)..]
            .iter()
            .map(|line| cut_line(line, 400))
            .collect::<Vec<_>>()
            .join(" / ");
        let reason = match exit_code {
            126 | 127 if log.contains("Exec format error") || log.contains("cannot execute") => format!(
                "the board cannot execute the agent (exec format error): wrong architecture for profile {}",
                self.board.profile.name()
            ),
            DEADLINE_EXIT => crate::run::deadline_reason(job.deadline),
            137 => "agent killed (SIGKILL: out of memory, or killed by hand)".to_string(),
            143 => "agent terminated (SIGTERM)".to_string(),
            NO_EXIT_STATUS => "agent killed without an exit status (SIGKILL to its whole process group, or a full disk kept its shell from writing one)".to_string(),
            code => format!("agent exited with status {code}: {tail}"),
        };
        // A full disk makes agents fail in many ways; name the cause.
        let reason = match free_after {
            Some(free) if free < DISK_FULL_BYTES => format!(
                "the board's disk is full under {dir} ({} KiB free; free space, lower `keep_runs`, or set a `work_dir` on a larger filesystem): {reason}",
                free / 1024
            ),
            _ => reason,
        };
        Err(match last_started {
            Some(cell) => RunError::AgentDied { cell, reason },
            None => RunError::AgentFailed(reason),
        })
    }

    /// Downloads the run's probe.json into `job_dir` (whole, through a
    /// temporary name) when the board has one.
    fn fetch_probe(&self, conn: &Connection, dir: &str, job_dir: &Path) -> Result<(), RunError> {
        let remote = format!("{dir}/{PROBE_FILE}");
        if !conn.exists(&remote).map_err(link_err)? {
            return Ok(());
        }
        let part = job_dir.join(format!("{PROBE_FILE}.part"));
        conn.download(&remote, &part, MAX_PROBE_BYTES)
            .map_err(board_err)?;
        std::fs::rename(&part, job_dir.join(PROBE_FILE)).map_err(|source| {
            RunError::Results(ResultsError::Io {
                path: part.clone(),
                source,
            })
        })
    }

    /// Stops the agent of the run in `dir` and everything it started (its
    /// process group: the runner, qemu), politely first.
    fn stop_agent(&self, conn: &Connection, dir: &str) -> Result<(), RunError> {
        let script = format!(
            "cd {} && pid=$(cat pid) && kill -TERM -- -$pid 2>/dev/null; sleep 2; kill -KILL -- -$pid 2>/dev/null; true",
            crate::shell::board_path(dir)
        );
        conn.exec(&script).map_err(link_err)?;
        Ok(())
    }

    /// After a job, whatever happened: prunes the work dir while this job
    /// still holds the board (so no agent of ours runs), then releases the
    /// lock, unless its agent still runs (the board could not be followed):
    /// then it goes stale when that agent ends.
    fn finish_job(&self, remote_run: &str) {
        let Ok(conn) = Connection::open(&self.endpoint()) else {
            return;
        };
        match board_storage::prune(
            &conn,
            &self.board.work_dir,
            self.board.keep_runs,
            &self.agent.hash,
        ) {
            Ok(pruned) if pruned != Pruned::default() => (self.log)(format!(
                "{}: {pruned} (keep_runs = {})",
                self.board.name, self.board.keep_runs
            )),
            _ => {}
        }
        let _ = board_lock::release(&conn, &self.board.work_dir, remote_run);
    }
}

/// Where an agent's run folder on a board stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RemoteState {
    /// No agent was started there (or there is no such folder).
    Absent,
    Running,
    /// Ended with this status (137 when killed before it could write one).
    Exited(i32),
}

const AGENT_LOG: &str = "agent.log";
const PROGRESS_FILE: &str = "progress.jsonl";

/// `line` cut to at most `max` characters, saying how much was cut.
fn cut_line(line: &str, max: usize) -> String {
    match line.char_indices().nth(max) {
        None => line.to_string(),
        Some((at, _)) => format!("{}... ({} more bytes)", &line[..at], line.len() - at),
    }
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

/// A failure on a connection that was working: whatever libssh2 calls it
/// (socket, channel or SFTP errors, depending on where it broke), a fresh
/// connection tells whether the board is still there.
fn link_err(e: TransportError) -> RunError {
    RunError::Link(e)
}

impl SshRunner {
    /// The board's description from the deployed agent (no bandwidth run).
    fn remote_probe(&self, conn: &Connection) -> Result<BoardProbe, RunError> {
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
    fn run_holding(
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
    fn keep_holding(
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

    fn lost_lock(&self, holder: &str) -> RunError {
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
    fn take_board(&self, conn: &Connection, owner: &LockOwner) -> Result<(), RunError> {
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
    fn cached_and_intact(
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
    fn upload_content_addressed(
        &self,
        conn: &Connection,
        local: &Path,
        owner: &LockOwner,
    ) -> Result<String, RunError> {
        let hash = crate::build::file_hash(local).map_err(|e| RunError::Board(e.to_string()))?;
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
    fn check_disk(&self, conn: &Connection, need: u64) -> Result<(), RunError> {
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
    fn check_memory(&self, conn: &Connection, job: &PlannedJob) -> Result<(), RunError> {
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
