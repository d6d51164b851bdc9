//! The runner: every board of a run at once, one thread and one progress
//! bar each, each board's jobs (of every kind) one after another so their
//! timings never overlap on a board. A board that fails gets failed rows
//! for what it did not finish and never stops the others; `run.json` is
//! rewritten as each board starts and finishes a job.
//!
//! Each job's files live in its own folder (`boards/<board>/jobs/<job>/`),
//! grown as rows arrive; a job is over when its `done` marker is written,
//! after its unfinished units got their failed rows. A resumed run skips
//! jobs that are over, reattaches to the agent of a job that was going
//! (following it if it still runs, collecting what it wrote), and then
//! measures only the units still without a row.

use crate::runs::jobs::{JobFailure, JobKind, PlannedJob};
use crate::runs::manifest::{BoardOutcome, JobOutcome, ManifestWriter};
use crate::runs::session::{board_dir, job_dir};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use thiserror::Error;
use wire::files::{write_json, ResultsError, PROBE_FILE};
use wire::probe::BoardProbe;
use wire::progress::ProgressEvent;

#[derive(Debug, Error)]
pub enum RunError {
    #[error("could not start the agent {path}: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent stopped during {cell}: {reason}")]
    AgentDied { cell: String, reason: String },
    #[error("the agent failed before measuring anything: {0}")]
    AgentFailed(String),
    #[error(transparent)]
    Results(#[from] ResultsError),
    /// The link to the board failed (worth a reconnect); once retries are
    /// spent, the board is failed like `Board`.
    #[error(transparent)]
    Link(crate::fleet::transport::TransportError),
    /// The board itself cannot be used (unreachable, refused, wrong
    /// architecture, ...): its later jobs are not tried.
    #[error("{0}")]
    Board(String),
    /// This job does not fit the board; later jobs may.
    #[error("{0}")]
    DoesNotFit(String),
}

/// Runs one job on one board and leaves the board's files for it in
/// `job_dir`, appending as they arrive.
pub trait BoardRunner: Send {
    fn board(&self) -> &str;
    /// Starts the agent on `job` (all of it, or what a resumed run still
    /// has to measure) and follows it to its end.
    fn run(
        &mut self,
        job: &PlannedJob,
        job_dir: &Path,
        on_event: &mut dyn FnMut(&ProgressEvent),
    ) -> Result<(), RunError>;
    /// For a resumed run: finds the agent an earlier host process started
    /// for `job`, follows it while it runs and collects what it wrote.
    fn reattach(
        &mut self,
        job: &PlannedJob,
        job_dir: &Path,
        on_event: &mut dyn FnMut(&ProgressEvent),
    ) -> Result<(), RunError>;
    /// Bytes this runner uploaded (remote boards only).
    fn uploaded_bytes(&self) -> u64 {
        0
    }
    /// The board failed (`failure`): try once to bring it back (a board
    /// farm's power cycle). True when it answers again and the job is
    /// worth trying again.
    fn recover(&mut self, _failure: &str) -> bool {
        false
    }
    /// The board's jobs are over (or failed): give back what the runner
    /// holds (a board farm's place).
    fn release(&mut self) {}
    /// Where a board farm's board came from, for run.json.
    fn farm_record(&self) -> Option<crate::runs::manifest::FarmRecord> {
        None
    }
}

/// The `local` target: the agent runs as a child process of the host and
/// writes straight into the board directory.
pub struct LocalRunner {
    pub board: String,
    pub agent: PathBuf,
}

impl BoardRunner for LocalRunner {
    fn board(&self) -> &str {
        &self.board
    }

    fn run(
        &mut self,
        job: &PlannedJob,
        job_dir: &Path,
        on_event: &mut dyn FnMut(&ProgressEvent),
    ) -> Result<(), RunError> {
        let job_path = job_dir.join(JOB_SPEC_FILE);
        write_json(&job_path, &job.spec)?;
        run_local_agent(
            &self.agent,
            job.subcommand,
            &job_path,
            job_dir,
            job.deadline,
            on_event,
        )
    }

    /// The agent of a host process that died usually dies with it (its
    /// progress pipe breaks), but may still be finishing a cell: wait for
    /// it (up to the job's deadline), so two agents never measure at once.
    fn reattach(
        &mut self,
        job: &PlannedJob,
        job_dir: &Path,
        _on_event: &mut dyn FnMut(&ProgressEvent),
    ) -> Result<(), RunError> {
        let Some(pid) = std::fs::read_to_string(job_dir.join(PID_FILE))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        else {
            return Ok(());
        };
        let marker = job_dir.display().to_string();
        let ours = || {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&marker))
                .unwrap_or(false)
        };
        let started = std::time::Instant::now();
        while ours() {
            if started.elapsed() >= job.deadline {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        Ok(())
    }
}

/// The job spec as the agent ran it, in its job folder (on a board, in its
/// run folder there).
pub const JOB_SPEC_FILE: &str = "job.json";
/// The agent's process id, in its job folder.
pub const PID_FILE: &str = "pid";
/// Written in a job folder once the job is over and every unit has a row.
pub const DONE_MARKER: &str = "done";

/// Runs `agent <subcommand> --job <job> --out-dir <out_dir>` on this machine,
/// feeding its progress lines to `on_event`; its stderr is appended to
/// `out_dir/agent.log`. A failure names the cell the agent was in. An agent
/// still running at `deadline` is killed.
pub fn run_local_agent(
    agent: &Path,
    subcommand: &str,
    job_path: &Path,
    out_dir: &Path,
    deadline: std::time::Duration,
    on_event: &mut dyn FnMut(&ProgressEvent),
) -> Result<(), RunError> {
    let log_path = out_dir.join("agent.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|source| ResultsError::Io {
            path: log_path.clone(),
            source,
        })?;
    let spawn_err = |source| RunError::Spawn {
        path: agent.to_path_buf(),
        source,
    };
    let mut child = Command::new(agent)
        .arg(subcommand)
        .arg("--job")
        .arg(job_path)
        .arg("--out-dir")
        .arg(out_dir)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(spawn_err)?;
    // A resumed run finds it by this.
    let _ = std::fs::write(out_dir.join(PID_FILE), child.id().to_string());
    // A watchdog kills the agent at the deadline; reading its stdout then
    // ends and the failure says why.
    let finished = Arc::new(AtomicBool::new(false));
    let timed_out = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (finished, timed_out) = (finished.clone(), timed_out.clone());
        let pid = child.id().to_string();
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            while !finished.load(Ordering::Relaxed) {
                if started.elapsed() >= deadline {
                    timed_out.store(true, Ordering::Relaxed);
                    let _ = Command::new("kill").args(["-KILL", &pid]).status();
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        })
    };
    let mut last_started = None;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(event) = ProgressEvent::parse(&line) {
                if let ProgressEvent::CellStarted { cell_id, .. } = &event {
                    last_started = Some(cell_id.clone());
                }
                on_event(&event);
            }
        }
    }
    let status = child.wait().map_err(spawn_err);
    finished.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    let status = status?;
    if status.success() {
        return Ok(());
    }
    let reason = if timed_out.load(Ordering::Relaxed) {
        deadline_reason(deadline)
    } else {
        format!("{status}; last lines of agent.log: {}", log_tail(&log_path))
    };
    Err(match last_started {
        Some(cell) => RunError::AgentDied { cell, reason },
        None => RunError::AgentFailed(reason),
    })
}

/// Why a job's unfinished units failed when its deadline stopped the agent.
pub fn deadline_reason(deadline: std::time::Duration) -> String {
    format!(
        "the job's deadline of {} s passed and the agent was stopped (a hung board, or a matrix bigger than its deadline: set `deadline_seconds` in the matrix)",
        deadline.as_secs()
    )
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    // The agent's own error (`Error: ...` and its causes) rather than the
    // backtrace printed after it when RUST_BACKTRACE is set.
    if let Some(error) = lines.iter().rposition(|l| l.starts_with("Error: ")) {
        let said: Vec<&str> = lines[error..]
            .iter()
            .take_while(|l| !l.trim_start().starts_with("Stack backtrace"))
            .take(4)
            .copied()
            .collect();
        return said.join(" / ");
    }
    let tail = &lines[lines.len().saturating_sub(3)..];
    if tail.is_empty() {
        "(empty)".to_string()
    } else {
        tail.join(" / ")
    }
}

/// One board's share of a run: how to reach it and its jobs in order.
pub struct BoardPlan {
    pub runner: Box<dyn BoardRunner>,
    pub emulated: bool,
    pub jobs: Vec<PlannedJob>,
    /// What `run.json` said of this board when the run is resumed.
    pub previous: Option<BoardOutcome>,
    /// The run's `--budget`, fitted to this board's jobs.
    pub budget: Option<BoardBudget>,
}

/// When the budget ends, and per job the least time it and the board's
/// later jobs need (`crate::runs::budget`).
#[derive(Debug, Clone)]
pub struct BoardBudget {
    pub ends: std::time::Instant,
    pub least: Vec<f64>,
    pub reserve_after: Vec<f64>,
}

/// Runs every board's jobs concurrently, one progress bar per board.
pub fn run_all(
    plans: Vec<BoardPlan>,
    kinds: &[Box<dyn JobKind>],
    run_dir: &Path,
    manifest: &ManifestWriter,
    multi: &MultiProgress,
) -> Vec<BoardOutcome> {
    let style = ProgressStyle::with_template(
        "{prefix:>10} [{bar:30}] {pos}/{len} units {elapsed_precise} {wide_msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    std::thread::scope(|scope| {
        let handles: Vec<_> = plans
            .into_iter()
            .map(|plan| {
                let units = plan.jobs.iter().map(|j| j.units).sum::<usize>();
                let bar = multi.add(ProgressBar::new(units as u64));
                bar.set_style(style.clone());
                bar.set_prefix(plan.runner.board().to_string());
                let name = plan.runner.board().to_string();
                let handle = scope.spawn(move || run_board(plan, kinds, run_dir, manifest, &bar));
                (name, handle)
            })
            .collect();
        handles
            .into_iter()
            .map(|(board, h)| {
                h.join().unwrap_or_else(|_| BoardOutcome {
                    board,
                    error: Some("board thread panicked".into()),
                    ..Default::default()
                })
            })
            .collect()
    })
}

fn run_board(
    mut plan: BoardPlan,
    kinds: &[Box<dyn JobKind>],
    run_dir: &Path,
    manifest: &ManifestWriter,
    bar: &ProgressBar,
) -> BoardOutcome {
    let board = plan.runner.board().to_string();
    let dir = board_dir(run_dir, &board);
    let started = std::time::Instant::now();
    let previous = plan.previous.take();
    let mut outcome = BoardOutcome {
        board: board.clone(),
        emulated: plan.emulated,
        started_at: previous
            .as_ref()
            .and_then(|p| p.started_at.clone())
            .or_else(|| Some(wire::utc_now_rfc3339_millis())),
        ..Default::default()
    };
    let log_manifest = |result: Result<(), ResultsError>| {
        if let Err(e) = result {
            bar.println(format!("{board}: could not update run.json: {e}"));
        }
    };
    log_manifest(manifest.update_board(&board, |b| *b = outcome.clone()));
    if let Err(source) = std::fs::create_dir_all(&dir) {
        outcome.error = Some(
            ResultsError::Io {
                path: dir.clone(),
                source,
            }
            .to_string(),
        );
    }
    // Set when the board itself fails: later jobs are not tried.
    let mut board_down: Option<String> = outcome.error.clone();
    let mut done_units = 0u64;
    for (job_index, job) in plan.jobs.iter().enumerate() {
        let kind = &kinds[job.kind_index];
        let job_dir = job_dir(&dir, &job.name);
        let earlier = previous
            .as_ref()
            .and_then(|p| p.jobs.iter().find(|j| j.job == job.name))
            .cloned();
        let mut record = JobOutcome {
            kind: kind.kind().to_string(),
            matrix: kind.matrix().to_string(),
            job: job.name.clone(),
            started_at: wire::utc_now_rfc3339_millis(),
            ..Default::default()
        };
        let over = job_dir.join(DONE_MARKER).exists();
        let result = if over {
            // Finished before the run was interrupted: nothing to measure.
            if let Some(earlier) = &earlier {
                record = earlier.clone();
            }
            match &earlier {
                Some(JobOutcome { error: Some(e), .. }) => Err(RunError::Board(e.clone())),
                _ => Ok(()),
            }
        } else if let Some(reason) = &board_down {
            Err(RunError::Board(format!(
                "not run: the board failed earlier ({reason})"
            )))
        } else {
            let on_event = &mut |event: &ProgressEvent| match event {
                ProgressEvent::CellStarted { cell_id, .. } => bar.set_message(cell_id.clone()),
                ProgressEvent::InvocationFinished {
                    cell_id,
                    done,
                    invocations,
                    round,
                } => bar.set_message(format!(
                    "round {}: {cell_id} ({done}/{invocations} invocations)",
                    round + 1
                )),
                ProgressEvent::CellFinished { index, .. } => {
                    bar.set_position(done_units + *index as u64 + 1)
                }
                ProgressEvent::Finished {
                    elapsed_seconds, ..
                } => record.agent_seconds += *elapsed_seconds,
                _ => {}
            };
            // With a budget, the job may add adaptive rounds for what is
            // left of it, less what the later jobs need.
            let fitted = match &plan.budget {
                Some(b) => {
                    let left = b.ends.saturating_duration_since(std::time::Instant::now());
                    let i = job_index;
                    let seconds =
                        crate::runs::budget::adaptive_seconds(left, b.reserve_after[i], b.least[i]);
                    kind.fit_budget(job, u32::MAX, Some(seconds))
                        .unwrap_or_else(|_| job.clone())
                }
                None => job.clone(),
            };
            let job = &fitted;
            let first = run_job(&mut *plan.runner, &**kind, job, &dir, &job_dir, on_event);
            match &first {
                // A board that went away may come back (a farm's power
                // cycle); the job is then resumed like an interrupted one:
                // what its agent wrote is kept, only units without a row run.
                Err(e @ (RunError::Board(_) | RunError::Link(_)))
                    if plan.runner.recover(&e.to_string()) =>
                {
                    log_manifest(
                        manifest.update_board(&board, |b| b.labgrid = plan.runner.farm_record()),
                    );
                    run_job(&mut *plan.runner, &**kind, job, &dir, &job_dir, on_event)
                }
                _ => first,
            }
        };
        done_units += job.units as u64;
        bar.set_position(done_units);
        let failure = result.as_ref().err().map(|e| JobFailure {
            died_in: match e {
                RunError::AgentDied { cell, .. } => Some(cell.clone()),
                _ => None,
            },
            reason: e.to_string(),
        });
        if !over && matches!(&result, Err(RunError::Board(_) | RunError::Link(_))) {
            board_down.get_or_insert_with(|| reason_of(&result));
        }
        record.error = failure.as_ref().map(|f| f.reason.clone());
        // Whatever happened, the job's files end up with a row per unit.
        let completed = std::fs::create_dir_all(&job_dir)
            .map_err(|source| {
                crate::runs::jobs::JobError::from(ResultsError::Io {
                    path: job_dir.clone(),
                    source,
                })
            })
            .and_then(|_| kind.complete(job, &job_dir, failure.as_ref()));
        match completed {
            Ok(tally) => {
                record.ok = tally.ok;
                record.unsupported = tally.unsupported;
                record.failed = tally.failed;
                record.measured_seconds = tally.measured_seconds;
                if let Err(e) = mark_done(&job_dir) {
                    record.error.get_or_insert_with(|| e.to_string());
                }
            }
            Err(e) => {
                record.error.get_or_insert_with(|| e.to_string());
            }
        }
        keep_board_probe(&dir, &job_dir);
        if !over || record.finished_at.is_empty() {
            record.finished_at = wire::utc_now_rfc3339_millis();
        }
        outcome.ok += record.ok;
        outcome.unsupported += record.unsupported;
        outcome.failed += record.failed;
        outcome.agent_seconds += record.agent_seconds;
        outcome.measured_seconds += record.measured_seconds;
        if outcome.error.is_none() {
            outcome.error = record.error.clone();
        }
        outcome.jobs.push(record);
        outcome.uploaded_bytes =
            previous.as_ref().map(|p| p.uploaded_bytes).unwrap_or(0) + plan.runner.uploaded_bytes();
        outcome.labgrid = plan.runner.farm_record();
        outcome.wall_seconds = previous.as_ref().map(|p| p.wall_seconds).unwrap_or(0.0)
            + started.elapsed().as_secs_f64();
        log_manifest(manifest.update_board(&board, |b| *b = outcome.clone()));
    }
    plan.runner.release();
    outcome.labgrid = plan.runner.farm_record();
    match &outcome.error {
        Some(e) => bar.abandon_with_message(format!("FAILED: {e}")),
        None => bar.finish_with_message("done"),
    }
    outcome.finished_at = Some(wire::utc_now_rfc3339_millis());
    outcome.wall_seconds =
        previous.as_ref().map(|p| p.wall_seconds).unwrap_or(0.0) + started.elapsed().as_secs_f64();
    log_manifest(manifest.update_board(&board, |b| *b = outcome.clone()));
    outcome
}

fn reason_of(result: &Result<(), RunError>) -> String {
    result
        .as_ref()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
}

/// One job that is not over: on a resumed run (its folder exists), first
/// whatever an earlier host process's agent did; then the units still
/// without a row.
fn run_job(
    runner: &mut dyn BoardRunner,
    kind: &dyn JobKind,
    job: &PlannedJob,
    board_dir: &Path,
    job_dir: &Path,
    on_event: &mut dyn FnMut(&ProgressEvent),
) -> Result<(), RunError> {
    let resumed = job_dir.exists();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RunError::Results(ResultsError::Io { path, source })
    };
    std::fs::create_dir_all(job_dir).map_err(io(job_dir))?;
    // The whole job as planned, beside the board's other jobs.
    write_json(&board_dir.join(job.job_file()), &job.spec)?;
    if !resumed {
        return runner.run(job, job_dir, on_event);
    }
    runner.reattach(job, job_dir, on_event)?;
    let rest = kind
        .remaining(job, job_dir)
        .map_err(|e| RunError::AgentFailed(e.to_string()))?;
    match rest {
        Some(rest) => runner.run(&rest, job_dir, on_event),
        None => Ok(()),
    }
}

/// Marks a job folder as over, durably.
fn mark_done(job_dir: &Path) -> Result<(), ResultsError> {
    let path = job_dir.join(DONE_MARKER);
    std::fs::File::create(&path)
        .and_then(|f| f.sync_all())
        .map_err(|source| ResultsError::Io { path, source })
}

/// Keeps `<board_dir>/probe.json` as the board's description: the job's,
/// unless the board's already has a measured bandwidth and the job's not;
/// a model job's power report either way (kernel jobs make none).
fn keep_board_probe(board_dir: &Path, job_dir: &Path) {
    let read = |dir: &Path| wire::files::read_json::<BoardProbe>(&dir.join(PROBE_FILE)).ok();
    let Some(job_probe) = read(job_dir) else {
        return;
    };
    let board_probe = read(board_dir);
    let board_power = board_probe.as_ref().and_then(|b| b.power.clone());
    let mut kept = match board_probe {
        Some(b) if b.read_bandwidth_gbps.is_some() && job_probe.read_bandwidth_gbps.is_none() => b,
        _ => job_probe.clone(),
    };
    kept.power = job_probe.power.or(board_power);
    let _ = write_json(&board_dir.join(PROBE_FILE), &kept);
}
