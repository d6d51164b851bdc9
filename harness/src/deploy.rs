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
//!   `progress.jsonl` (its stdout), `agent.log` (stderr), `pid` and, once it
//!   ends, `exit_code`. The agent runs under `setsid nohup`, so a dropped
//!   connection loses nothing: the host reconnects and carries on.
//!
//! The runner knows nothing of job kinds: a planned job says which agent
//! subcommand to start, which host files to upload first (and where their
//! paths sit in the job) and which row files to fetch back.

use crate::board_lock::{self, LockOwner, TakeOutcome};
use crate::board_storage::{self, Pruned};
use crate::boards::RemoteBoard;
use crate::build::{AgentBuild, AGENT_BIN};
use crate::jobs::PlannedJob;
use crate::run::{BoardRunner, RunError};
use crate::transport::{command_line, shell_quote, Connection, SshEndpoint, TransportError};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wire::files::{read_json, ResultsError, PROBE_FILE};
use wire::probe::BoardProbe;
use wire::progress::ProgressEvent;

/// Reconnect back-off: 1, 2, 4, 8, 16, 16, ... seconds, for at most this long.
const RECONNECT_BUDGET: Duration = Duration::from_secs(120);
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// The exit code `follow` reports for an agent it stopped at the deadline.
const DEADLINE_EXIT: i32 = -2;

/// How often a run waiting for a busy board asks again.
const LOCK_POLL: Duration = Duration::from_secs(3);

/// Failed polls in a row (each followed by a reconnect) before giving up.
const MAX_FOLLOW_FAILURES: u32 = 5;

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

    fn agent_dir(&self) -> String {
        format!("{}/agents/{}", self.board.work_dir, self.agent.hash)
    }

    fn agent_path(&self) -> String {
        format!("{}/{AGENT_BIN}", self.agent_dir())
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
    fn deploy_agent(&self, conn: &Connection) -> Result<(), RunError> {
        let remote = self.agent_path();
        if self.cached_and_intact(conn, &remote, &self.agent.hash)? {
            (self.log)(format!(
                "{}: agent {} already on the board, nothing uploaded",
                self.board.name, self.agent.hash
            ));
            return Ok(());
        }
        conn.exec_ok(&command_line(&["mkdir", "-p", &self.agent_dir()]))
            .map_err(board_err)?;
        let bytes = conn
            .upload(&self.agent.path, &remote, 0o755, &mut |_| {})
            .map_err(board_err)?;
        self.uploaded_bytes.fetch_add(bytes, Ordering::Relaxed);
        (self.log)(format!(
            "{}: uploaded agent {} ({:.1} MB)",
            self.board.name,
            self.agent.hash,
            bytes as f64 / 1e6
        ));
        Ok(())
    }

    fn run_dir(&self, run_id: &str) -> String {
        format!("{}/runs/{}", self.board.work_dir, run_id)
    }

    /// The agent as the board's shell should invoke it (runner included).
    fn agent_command(&self) -> String {
        let agent_expr = crate::shell::board_path(&self.agent_path());
        let mut argv: Vec<String> = self.board.runner.iter().map(|r| shell_quote(r)).collect();
        argv.push(agent_expr);
        argv.join(" ")
    }

    /// Writes `job` as job.json in the run directory and starts
    /// `agent <subcommand> --job job.json --out-dir .` detached; returns
    /// immediately.
    fn start<T: serde::Serialize>(
        &self,
        conn: &Connection,
        run_id: &str,
        subcommand: &str,
        job: &T,
    ) -> Result<(), RunError> {
        let dir = self.run_dir(run_id);
        conn.exec_ok(&command_line(&["mkdir", "-p", &dir]))
            .map_err(board_err)?;
        let job_json =
            serde_json::to_vec_pretty(job).map_err(|e| RunError::Board(e.to_string()))?;
        conn.write_file(&format!("{dir}/job.json"), &job_json)
            .map_err(board_err)?;
        let inner = format!(
            "{} {} --job job.json --out-dir . > progress.jsonl 2> agent.log < /dev/null; echo $? > exit_code",
            self.agent_command(),
            shell_quote(subcommand)
        );
        let command = format!(
            "cd {} && rm -f exit_code && (setsid nohup sh -c {} > /dev/null 2>&1 < /dev/null & echo $! > pid)",
            shell_quote(&dir),
            shell_quote(&inner),
        );
        conn.exec_ok(&command).map_err(board_err)?;
        Ok(())
    }

    /// Follows progress until the agent ends; reconnects on a dropped
    /// connection. Returns the agent's exit code.
    fn follow(
        &self,
        run_id: &str,
        mut conn: Connection,
        on_event: &mut dyn FnMut(&ProgressEvent),
        last_started: &mut Option<String>,
        deadline: Duration,
    ) -> Result<(Connection, i32), RunError> {
        let dir = self.run_dir(run_id);
        let started = Instant::now();
        let mut offset = 0u64;
        let mut pending = String::new();
        let mut failures_in_a_row = 0;
        loop {
            let step = (|| -> Result<Option<i32>, TransportError> {
                let bytes = conn.read_from(&format!("{dir}/progress.jsonl"), offset)?;
                offset += bytes.len() as u64;
                pending.push_str(&String::from_utf8_lossy(&bytes));
                while let Some(newline) = pending.find('\n') {
                    let line: String = pending.drain(..=newline).collect();
                    if let Some(event) = ProgressEvent::parse(&line) {
                        if let ProgressEvent::CellStarted { cell_id, .. } = &event {
                            *last_started = Some(cell_id.clone());
                        }
                        on_event(&event);
                    }
                }
                let exit = conn.read_from(&format!("{dir}/exit_code"), 0)?;
                let exit = String::from_utf8_lossy(&exit).trim().to_string();
                if !exit.is_empty() {
                    return Ok(Some(exit.parse().unwrap_or(-1)));
                }
                // No exit code: is the agent still alive? (Killed together
                // with its shell, nothing would ever write one.)
                let pid = String::from_utf8_lossy(&conn.read_from(&format!("{dir}/pid"), 0)?)
                    .trim()
                    .to_string();
                if !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) {
                    let alive = conn.exec(&format!("kill -0 {pid}"))?;
                    if alive.status != 0 {
                        // Re-check the exit code: it may have been written
                        // between the two reads.
                        let exit = conn.read_from(&format!("{dir}/exit_code"), 0)?;
                        let exit = String::from_utf8_lossy(&exit).trim().to_string();
                        return Ok(Some(exit.parse().unwrap_or(137)));
                    }
                }
                Ok(None)
            })();
            match step {
                Ok(Some(code)) => return Ok((conn, code)),
                Ok(None) if started.elapsed() >= deadline => {
                    self.stop_agent(&conn, &dir)?;
                    return Ok((conn, DEADLINE_EXIT));
                }
                Ok(None) => {
                    failures_in_a_row = 0;
                    std::thread::sleep(POLL_INTERVAL)
                }
                // A dead session surfaces as socket, channel or SFTP errors
                // depending on where it broke; a fresh connection tells
                // which. A refusal that survives reconnecting is final.
                Err(e) if failures_in_a_row < MAX_FOLLOW_FAILURES => {
                    failures_in_a_row += 1;
                    (self.log)(format!(
                        "{}: connection lost ({e}); reconnecting",
                        self.board.name
                    ));
                    conn = self.reconnect()?;
                }
                Err(e) => return Err(board_err(e)),
            }
        }
    }

    /// Stops the agent of the run in `dir` and everything it started (its
    /// process group: the runner, qemu), politely first.
    fn stop_agent(&self, conn: &Connection, dir: &str) -> Result<(), RunError> {
        let script = format!(
            "cd {} && pid=$(cat pid) && kill -TERM -- -$pid 2>/dev/null; sleep 2; kill -KILL -- -$pid 2>/dev/null; true",
            crate::shell::board_path(dir)
        );
        conn.exec(&script).map_err(board_err)?;
        Ok(())
    }

    fn reconnect(&self) -> Result<Connection, RunError> {
        let started = Instant::now();
        let mut delay = Duration::from_secs(1);
        loop {
            match Connection::open(&self.endpoint()) {
                Ok(conn) => return Ok(conn),
                Err(e) if e.is_connection_loss() && started.elapsed() < RECONNECT_BUDGET => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(16));
                }
                Err(e) => {
                    return Err(RunError::Board(format!(
                        "{e} (gave up reconnecting after {:.0} s; the agent keeps running on the board and its rows stay under {})",
                        started.elapsed().as_secs_f64(),
                        self.board.work_dir
                    )))
                }
            }
        }
    }

    /// Fetches the job's row files (appended to the board's own) and the
    /// agent's log and progress (appended too), and its probe unless the
    /// board directory already has one with a bandwidth figure.
    fn collect(
        &self,
        conn: &Connection,
        run_id: &str,
        outputs: &[&str],
        board_dir: &Path,
    ) -> Result<(), RunError> {
        let dir = self.run_dir(run_id);
        for file in outputs.iter().chain(&["agent.log", "progress.jsonl"]) {
            let remote = format!("{dir}/{file}");
            if conn.exists(&remote).map_err(board_err)? {
                let part = board_dir.join(format!("{file}.part"));
                conn.download(&remote, &part).map_err(board_err)?;
                append_file(&part, &board_dir.join(file), file.ends_with(".csv"))?;
            }
        }
        let remote_probe = format!("{dir}/{PROBE_FILE}");
        let local_probe = board_dir.join(PROBE_FILE);
        let has_bandwidth = read_json::<BoardProbe>(&local_probe)
            .map(|p| p.read_bandwidth_gbps.is_some())
            .unwrap_or(false);
        if !has_bandwidth && conn.exists(&remote_probe).map_err(board_err)? {
            conn.download(&remote_probe, &local_probe)
                .map_err(board_err)?;
        }
        Ok(())
    }
}

/// Appends `part` to `target` and removes it; for CSV files the header is
/// skipped when `target` already has one.
fn append_file(part: &Path, target: &Path, csv: bool) -> Result<(), RunError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RunError::Results(ResultsError::Io { path, source })
    };
    let text = std::fs::read(part).map_err(io(part))?;
    let target_has_content = std::fs::metadata(target)
        .map(|m| m.len() > 0)
        .unwrap_or(false);
    let body: &[u8] = if csv && target_has_content {
        match text.iter().position(|&b| b == b'\n') {
            Some(newline) => &text[newline + 1..],
            None => &[],
        }
    } else {
        &text
    };
    use std::io::Write;
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(target)
        .map_err(io(target))?;
    out.write_all(body).map_err(io(target))?;
    std::fs::remove_file(part).map_err(io(part))
}

fn board_err(e: TransportError) -> RunError {
    RunError::Board(e.to_string())
}

impl SshRunner {
    /// Connects; the first time, checks the board can run the agent and
    /// deploys it.
    fn prepare(&mut self) -> Result<Connection, RunError> {
        let conn = Connection::open(&self.endpoint()).map_err(board_err)?;
        if !self.prepared {
            self.check_architecture(&conn)?;
            self.deploy_agent(&conn)?;
            self.prepared = true;
        }
        Ok(conn)
    }

    /// Starts `subcommand` on `job`, follows it, collects its files; maps a
    /// failed exit to the reason, naming the cell it died in.
    #[allow(clippy::too_many_arguments)]
    fn run_detached(
        &self,
        conn: Connection,
        run_id: &str,
        subcommand: &str,
        job: &serde_json::Value,
        outputs: &[&str],
        board_dir: &Path,
        on_event: &mut dyn FnMut(&ProgressEvent),
        deadline: Duration,
    ) -> Result<(), RunError> {
        self.start(&conn, run_id, subcommand, job)?;
        let mut last_started = None;
        let (conn, exit_code) = self.follow(run_id, conn, on_event, &mut last_started, deadline)?;
        // Collect whatever the agent finished, success or not.
        self.collect(&conn, run_id, outputs, board_dir)?;
        if exit_code == 0 {
            return Ok(());
        }
        let log = std::fs::read_to_string(board_dir.join("agent.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = tail[tail.len().saturating_sub(2)..].join(" / ");
        let reason = match exit_code {
            126 | 127 if log.contains("Exec format error") || log.contains("cannot execute") => format!(
                "the board cannot execute the agent (exec format error): wrong architecture for profile {}",
                self.board.profile.name()
            ),
            DEADLINE_EXIT => crate::run::deadline_reason(deadline),
            137 => "agent killed (SIGKILL: out of memory, or killed by hand)".to_string(),
            143 => "agent terminated (SIGTERM)".to_string(),
            code => format!("agent exited with status {code}: {tail}"),
        };
        Err(match last_started {
            Some(cell) => RunError::AgentDied { cell, reason },
            None => RunError::AgentFailed(reason),
        })
    }

    /// The board's description from the deployed agent (no bandwidth run).
    fn remote_probe(&self, conn: &Connection) -> Result<BoardProbe, RunError> {
        let out = conn
            .exec_ok(&format!("{} probe", self.agent_command()))
            .map_err(board_err)?;
        serde_json::from_str(&out).map_err(|e| {
            RunError::Board(format!("board {}: unreadable probe: {e}", self.board.name))
        })
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
    ) -> Result<String, RunError> {
        let hash = crate::build::file_hash(local).map_err(|e| RunError::Board(e.to_string()))?;
        let ext = local.extension().and_then(|e| e.to_str()).unwrap_or("bin");
        let dir = format!("{}/models", self.board.work_dir);
        let remote = format!("{dir}/{hash}.{ext}");
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
        let sent = conn
            .upload(local, &remote, 0o644, &mut |n| bar.set_position(n))
            .map_err(board_err)?;
        bar.finish_and_clear();
        self.uploaded_bytes.fetch_add(sent, Ordering::Relaxed);
        (self.log)(format!(
            "{}: uploaded {} ({:.1} MB)",
            self.board.name,
            local.display(),
            sent as f64 / 1e6
        ));
        Ok(remote)
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
        board_dir: &Path,
        on_event: &mut dyn FnMut(&ProgressEvent),
    ) -> Result<(), RunError> {
        wire::files::write_json(&board_dir.join(job.job_file()), &job.spec)?;
        let conn = self.prepare()?;
        self.check_memory(&conn, job)?;
        let mut spec = job.spec.clone();
        for upload in &job.uploads {
            let remote = self.upload_content_addressed(&conn, &upload.local)?;
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
        let run_id = format!("{}-{}", job_run_id(&job.spec), job.name);
        let owner = LockOwner::this_process(&run_id);
        self.take_board(&conn, &owner)?;
        let result = self.run_detached(
            conn,
            &run_id,
            job.subcommand,
            &spec,
            job.outputs,
            board_dir,
            on_event,
            job.deadline,
        );
        // Pruned while this job still holds the board, so no agent runs.
        // The lock is kept if its agent still runs (the board could not be
        // followed): then it goes stale when that agent ends.
        if let Ok(conn) = Connection::open(&self.endpoint()) {
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
            let _ = board_lock::release(&conn, &self.board.work_dir, &run_id);
        }
        result
    }
}

/// The run id a job carries (every job spec has `run_id`).
fn job_run_id(spec: &serde_json::Value) -> String {
    spec.get("run_id")
        .and_then(|v| v.as_str())
        .unwrap_or("run")
        .to_string()
}
