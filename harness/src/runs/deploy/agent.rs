//! The agent's life on a board, for the SSH runner: its upload and
//! architecture check, starting it detached, following its progress and
//! mirroring its files until it ends (or is stopped at the deadline), and
//! finishing the job with its probe and exit status.

use super::{board_err, endpoint_of, SshRunner};
use crate::builds::build::{AgentBuild, AGENT_BIN};
use crate::fleet::board_lock::{self, LockOwner};
use crate::fleet::board_storage::{self, Pruned};
use crate::fleet::mirror::{self, MirrorError};
use crate::fleet::transport::{command_line, shell_quote, Connection, SshEndpoint, TransportError};
use crate::runs::jobs::PlannedJob;
use crate::runs::run::RunError;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use wire::files::{ResultsError, PROBE_FILE};
use wire::progress::ProgressEvent;

const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// The exit code `follow` reports for an agent it stopped at the deadline.
const DEADLINE_EXIT: i32 = -2;
/// What `follow` reports for an agent whose shell died before it could
/// write the exit status.
const NO_EXIT_STATUS: i32 = -3;
/// Below this much free space, a failed agent is blamed on a full disk.
const DISK_FULL_BYTES: u64 = 1 << 20;
/// The longest progress line read as an event (a real one is under 1 KB).
const MAX_PROGRESS_LINE: usize = 1 << 20;
/// How much of a failed agent's log is read for its last lines.
const LOG_TAIL_BYTES: u64 = 64 << 10;
/// The largest probe.json taken from a board (a real one is a few KB).
const MAX_PROBE_BYTES: u64 = 4 << 20;
/// The longest pause between two retries of a failed remote step.
const MAX_BACKOFF: Duration = Duration::from_secs(16);

/// Where an agent's run folder on a board stands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum RemoteState {
    /// No agent was started there (or there is no such folder).
    Absent,
    Running,
    /// Ended with this status (137 when killed before it could write one).
    Exited(i32),
}

const AGENT_LOG: &str = "agent.log";
const PROGRESS_FILE: &str = "progress.jsonl";

impl SshRunner {
    pub(super) fn endpoint(&self) -> SshEndpoint {
        endpoint_of(&self.board, self.accept_new_host_key)
    }

    /// `agents/<hash>/`: where the board keeps an agent build.
    pub(super) fn agent_dir(&self, hash: &str) -> String {
        format!("{}/agents/{hash}", self.board.work_dir)
    }

    pub(super) fn agent_path(&self) -> String {
        format!("{}/{AGENT_BIN}", self.agent_dir(&self.agent.hash))
    }

    /// Refuses a board whose CPU cannot run the agent (unless a runner such
    /// as qemu is configured), with both architectures named.
    pub(super) fn check_architecture(&self, conn: &Connection) -> Result<(), RunError> {
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
    pub(super) fn deploy_agent(
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

    pub(super) fn run_dir(&self, remote_run: &str) -> String {
        format!("{}/runs/{}", self.board.work_dir, remote_run)
    }

    /// The job's folder name on the board: `<run_id>-<job>`.
    pub(super) fn remote_run(job: &PlannedJob) -> String {
        let run_id = job
            .spec
            .get("run_id")
            .and_then(|v| v.as_str())
            .unwrap_or("run");
        format!("{run_id}-{}", job.name)
    }

    /// The agent as the board's shell should invoke it (runner included).
    pub(super) fn agent_command(&self) -> String {
        let agent_expr = crate::shell::board_path(&self.agent_path());
        let mut argv: Vec<String> = self.board.runner.iter().map(|r| shell_quote(r)).collect();
        argv.push(agent_expr);
        argv.join(" ")
    }

    /// Runs `step` on a connection, opening one when there is none; while
    /// the link fails, drops the connection and tries again (a fresh
    /// connection checks the host key again) with back-off, for the board's
    /// `retry_seconds`. Every step given here can be repeated safely.
    pub(super) fn with_link<T>(
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
    pub(super) fn start(
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
    pub(super) fn remote_state(
        &self,
        conn: &Connection,
        dir: &str,
    ) -> Result<RemoteState, RunError> {
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
    pub(super) fn mirror(
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
    pub(super) fn follow(
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
            DEADLINE_EXIT => crate::runs::run::deadline_reason(job.deadline),
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
    pub(super) fn fetch_probe(
        &self,
        conn: &Connection,
        dir: &str,
        job_dir: &Path,
    ) -> Result<(), RunError> {
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
    pub(super) fn stop_agent(&self, conn: &Connection, dir: &str) -> Result<(), RunError> {
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
    pub(super) fn finish_job(&self, remote_run: &str) {
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

/// `line` cut to at most `max` characters, saying how much was cut.
fn cut_line(line: &str, max: usize) -> String {
    match line.char_indices().nth(max) {
        None => line.to_string(),
        Some((at, _)) => format!("{}... ({} more bytes)", &line[..at], line.len() - at),
    }
}

/// A failure on a connection that was working: whatever libssh2 calls it
/// (socket, channel or SFTP errors, depending on where it broke), a fresh
/// connection tells whether the board is still there.
fn link_err(e: TransportError) -> RunError {
    RunError::Link(e)
}
