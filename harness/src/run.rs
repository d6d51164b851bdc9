//! Running jobs on boards and collecting their rows into a run directory.
//!
//! Layout of a run directory (`results/<UTC time>-<commit>/`):
//! - `run.json`: the manifest (config, versions, host, per-board outcome)
//! - `kernels.csv`, `samples.csv`: rows of every board, merged
//! - `boards/<board>/`: that board's `job.json`, `probe.json`, `kernels.csv`,
//!   `samples.csv` and `agent.log` (the agent's stderr)
//! - `plots/`: PNG and SVG plots; `summary.md`: the markdown tables

use crate::matrix::JobSpec;
use crate::probe::BoardProbe;
use crate::progress::ProgressEvent;
use crate::results::{
    read_csv, read_json, write_json, CellStatus, CsvAppender, KernelRow, ResultsError, SampleRow,
    KERNEL_ROWS_FILE, PROBE_FILE, SAMPLES_FILE,
};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RunError {
    #[error("could not start the agent {path}: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent stopped during cell {cell}: {reason}")]
    AgentDied { cell: String, reason: String },
    #[error("the agent failed before measuring anything: {0}")]
    AgentFailed(String),
    #[error(transparent)]
    Results(#[from] ResultsError),
    #[error("{0}")]
    Board(String),
}

/// Runs one job on one board and leaves the board's files in `board_dir`.
pub trait BoardRunner: Send {
    fn board(&self) -> &str;
    fn run(
        &mut self,
        job: &JobSpec,
        board_dir: &Path,
        on_event: &mut dyn FnMut(&ProgressEvent),
    ) -> Result<(), RunError>;
    /// Bytes this runner uploaded (remote boards only).
    fn uploaded_bytes(&self) -> u64 {
        0
    }
}

/// The `local` target: the agent runs as a child process of the host.
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
        job: &JobSpec,
        board_dir: &Path,
        on_event: &mut dyn FnMut(&ProgressEvent),
    ) -> Result<(), RunError> {
        let job_path = board_dir.join("job.json");
        write_json(&job_path, job)?;
        run_local_agent(&self.agent, "run", &job_path, board_dir, on_event)
    }
}

/// Runs `agent <subcommand> --job <job> --out-dir <out_dir>` on this machine,
/// feeding its progress lines to `on_event`; its stderr is appended to
/// `out_dir/agent.log`. A failure names the cell the agent was in.
pub fn run_local_agent(
    agent: &Path,
    subcommand: &str,
    job_path: &Path,
    out_dir: &Path,
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
    let status = child.wait().map_err(spawn_err)?;
    if status.success() {
        return Ok(());
    }
    let reason = format!("{status}; last lines of agent.log: {}", log_tail(&log_path));
    Err(match last_started {
        Some(cell) => RunError::AgentDied { cell, reason },
        None => RunError::AgentFailed(reason),
    })
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(3)..];
    if tail.is_empty() {
        "(empty)".to_string()
    } else {
        tail.join(" / ")
    }
}

/// What happened on one board.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BoardOutcome {
    pub board: String,
    pub emulated: bool,
    pub ok: usize,
    pub unsupported: usize,
    pub failed: usize,
    /// Why the board's run failed, if it did.
    pub error: Option<String>,
    pub wall_seconds: f64,
    /// Sum of the agent's timed repetitions.
    pub measured_seconds: f64,
    /// The agent's own run time (probe, bandwidth, data generation,
    /// quantization, timing); `wall_seconds` minus this is the host-side
    /// overhead (build check, connect, upload, polling, collection).
    pub agent_seconds: f64,
    /// Agent bytes uploaded to the board in this run (0: already there).
    pub uploaded_bytes: u64,
}

impl BoardOutcome {
    pub fn succeeded(&self) -> bool {
        self.error.is_none() && self.failed == 0
    }
}

/// Runs every board's job concurrently, one progress bar each. A failing
/// board is reported in its outcome and never stops the others.
pub fn run_boards(
    runners: Vec<Box<dyn BoardRunner>>,
    jobs: Vec<JobSpec>,
    run_dir: &Path,
    multi: &MultiProgress,
) -> Vec<BoardOutcome> {
    let style = ProgressStyle::with_template(
        "{prefix:>10} [{bar:30}] {pos}/{len} cells {elapsed_precise} {wide_msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    std::thread::scope(|scope| {
        let handles: Vec<_> = runners
            .into_iter()
            .zip(jobs)
            .map(|(mut runner, job)| {
                let bar = multi.add(ProgressBar::new(job.cells.len() as u64));
                bar.set_style(style.clone());
                bar.set_prefix(runner.board().to_string());
                scope.spawn(move || run_one(runner.as_mut(), &job, run_dir, &bar))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| BoardOutcome {
                    board: "?".into(),
                    emulated: false,
                    ok: 0,
                    unsupported: 0,
                    failed: 0,
                    error: Some("board thread panicked".into()),
                    wall_seconds: 0.0,
                    measured_seconds: 0.0,
                    agent_seconds: 0.0,
                    uploaded_bytes: 0,
                })
            })
            .collect()
    })
}

pub fn board_dir(run_dir: &Path, board: &str) -> PathBuf {
    run_dir.join("boards").join(board)
}

fn run_one(
    runner: &mut dyn BoardRunner,
    job: &JobSpec,
    run_dir: &Path,
    bar: &ProgressBar,
) -> BoardOutcome {
    let dir = board_dir(run_dir, &job.board);
    let started = std::time::Instant::now();
    let mut agent_seconds = 0.0;
    let result = std::fs::create_dir_all(&dir)
        .map_err(|source| {
            RunError::Results(ResultsError::Io {
                path: dir.clone(),
                source,
            })
        })
        .and_then(|_| {
            runner.run(job, &dir, &mut |event| match event {
                ProgressEvent::CellStarted { cell_id, .. } => bar.set_message(cell_id.clone()),
                ProgressEvent::CellFinished { index, .. } => bar.set_position(*index as u64 + 1),
                ProgressEvent::Finished {
                    elapsed_seconds, ..
                } => agent_seconds = *elapsed_seconds,
                _ => {}
            })
        });
    let error = result.as_ref().err().map(|e| e.to_string());
    let failed_cell = match &result {
        Err(RunError::AgentDied { cell, .. }) => Some(cell.clone()),
        _ => None,
    };
    if let Some(e) = &error {
        bar.abandon_with_message(format!("FAILED: {e}"));
    } else {
        bar.finish_with_message("done");
    }
    let mut outcome = BoardOutcome {
        board: job.board.clone(),
        emulated: job.emulated,
        ok: 0,
        unsupported: 0,
        failed: 0,
        error,
        wall_seconds: started.elapsed().as_secs_f64(),
        measured_seconds: 0.0,
        agent_seconds,
        uploaded_bytes: runner.uploaded_bytes(),
    };
    // Whatever happened, the board's CSV ends up with one row per cell.
    match complete_rows(job, &dir, failed_cell.as_deref(), outcome.error.as_deref()) {
        Ok(rows) => {
            for r in &rows {
                match r.status {
                    CellStatus::Ok => outcome.ok += 1,
                    CellStatus::Unsupported => outcome.unsupported += 1,
                    CellStatus::Failed => outcome.failed += 1,
                }
            }
        }
        Err(e) => {
            outcome.error.get_or_insert_with(|| e.to_string());
        }
    }
    outcome.measured_seconds = measured_seconds(&dir);
    outcome
}

/// Adds a `failed` row for each cell the agent did not finish: the cell it
/// died in gets the reason, later ones say they were not reached.
pub fn complete_rows(
    job: &JobSpec,
    board_dir: &Path,
    died_in: Option<&str>,
    error: Option<&str>,
) -> Result<Vec<KernelRow>, ResultsError> {
    let path = board_dir.join(KERNEL_ROWS_FILE);
    let mut rows: Vec<KernelRow> = if path.exists() {
        read_csv(&path)?
    } else {
        Vec::new()
    };
    let done: HashSet<String> = rows.iter().map(|r| r.cell_id.clone()).collect();
    let missing: Vec<_> = job.cells.iter().filter(|c| !done.contains(&c.id)).collect();
    if missing.is_empty() {
        return Ok(rows);
    }
    let probe: Option<BoardProbe> = read_json(&board_dir.join(PROBE_FILE)).ok();
    let cores = probe.as_ref().map(|p| p.cores).unwrap_or(0);
    let build = probe.map(|p| p.agent_build).unwrap_or_default();
    let mut appender = CsvAppender::open(&path)?;
    for cell in missing {
        let note = if Some(cell.id.as_str()) == died_in {
            format!(
                "agent died in this cell: {}",
                error.unwrap_or("unknown reason")
            )
        } else {
            format!(
                "not reached: the board's run ended early ({})",
                error.unwrap_or("no reason given")
            )
        };
        let row = KernelRow::unmeasured(
            job,
            cell,
            cell.threads.resolve(cores),
            &build,
            CellStatus::Failed,
            note,
        );
        appender.append(&row)?;
        rows.push(row);
    }
    Ok(rows)
}

fn measured_seconds(board_dir: &Path) -> f64 {
    read_csv::<SampleRow>(&board_dir.join(SAMPLES_FILE))
        .map(|s| s.iter().map(|r| r.ns as f64).sum::<f64>() / 1e9)
        .unwrap_or(0.0)
}

/// Merges every board's rows into the run's `kernels.csv` and `samples.csv`.
pub fn merge_boards(run_dir: &Path, boards: &[String]) -> Result<Vec<KernelRow>, ResultsError> {
    let mut all_rows = Vec::new();
    let merged_rows = run_dir.join(KERNEL_ROWS_FILE);
    let merged_samples = run_dir.join(SAMPLES_FILE);
    for path in [&merged_rows, &merged_samples] {
        if path.exists() {
            std::fs::remove_file(path).map_err(|source| ResultsError::Io {
                path: path.clone(),
                source,
            })?;
        }
    }
    let mut rows_out = CsvAppender::<KernelRow>::open(&merged_rows)?;
    let mut samples_out = CsvAppender::<SampleRow>::open(&merged_samples)?;
    for board in boards {
        let dir = board_dir(run_dir, board);
        let rows_path = dir.join(KERNEL_ROWS_FILE);
        if rows_path.exists() {
            for row in read_csv::<KernelRow>(&rows_path)? {
                rows_out.append(&row)?;
                all_rows.push(row);
            }
        }
        let samples_path = dir.join(SAMPLES_FILE);
        if samples_path.exists() {
            for s in read_csv::<SampleRow>(&samples_path)? {
                samples_out.append(&s)?;
            }
        }
    }
    Ok(all_rows)
}

/// `run.json`: how a run was made, so it can be understood and redone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunManifest {
    pub run_id: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub matrix: String,
    pub config_path: String,
    /// The matrix as run (types, shapes, batches, threads, timing).
    pub matrix_spec: crate::config::MatrixSpec,
    pub seed: u64,
    pub git_commit: String,
    /// The `--target` as given (or the default's board).
    pub target: String,
    pub versions: Versions,
    pub host: HostInfo,
    pub boards: Vec<BoardOutcome>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Versions {
    pub quantbench: String,
    pub llama_cpp_sys_2: String,
    pub rustc: String,
    pub agent_builds: Vec<BuildRecord>,
}

/// One agent build of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildRecord {
    /// `local` or the board profile (`pi5`, ...).
    pub profile: String,
    pub hash: String,
    pub target_triple: String,
    /// Wall time of the build step (a warm build is cargo's up-to-date check).
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub cores: usize,
}

impl HostInfo {
    pub fn current() -> Self {
        let os = std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    l.strip_prefix("PRETTY_NAME=")
                        .map(|v| v.trim_matches('"').to_string())
                })
            })
            .unwrap_or_else(|| std::env::consts::OS.to_string());
        HostInfo {
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            os,
            arch: std::env::consts::ARCH.to_string(),
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }
}

/// The pinned llama-cpp-sys-2 version, read from the workspace manifest.
pub fn llama_cpp_sys_version(workspace: &Path) -> String {
    std::fs::read_to_string(workspace.join("Cargo.toml"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("llama-cpp-sys-2"))
                .and_then(|l| l.split("version = \"").nth(1))
                .and_then(|v| v.split('"').next())
                .map(|v| v.trim_start_matches('=').to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub fn rustc_version() -> String {
    Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Short commit of the workspace, with `-dirty` when it has local changes.
pub fn git_commit(workspace: &Path) -> String {
    let run = |args: &[&str]| {
        Command::new("git")
            .current_dir(workspace)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(commit) = run(&["rev-parse", "--short=7", "HEAD"]) else {
        return "nogit".into();
    };
    let dirty =
        run(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    }
}

/// `results/<UTC time>-<commit>`: sorts by time, names the code measured.
pub fn new_run_id(commit: &str) -> String {
    format!("{}-{commit}", chrono::Utc::now().format("%Y%m%dT%H%M%SZ"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BenchConfig;
    use crate::matrix::job_for_board;

    #[test]
    fn unfinished_cells_become_failed_rows_and_finished_ones_are_kept() {
        let config = BenchConfig::parse(
            "[matrices.m]\ntypes=[\"f32\",\"q8_0\",\"q4_0\"]\nshapes=[\"llama3.2-1b.attn_kv\"]\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let job = job_for_board(&config, "m", "r", "b", false, "c").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut finished =
            KernelRow::unmeasured(&job, &job.cells[0], 2, "h", CellStatus::Ok, String::new());
        finished.median_ns = Some(1.0);
        CsvAppender::open(&dir.path().join(KERNEL_ROWS_FILE))
            .unwrap()
            .append(&finished)
            .unwrap();
        let rows = complete_rows(
            &job,
            dir.path(),
            Some(&job.cells[1].id),
            Some("killed by SIGKILL"),
        )
        .unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0], finished);
        assert_eq!(rows[1].status, CellStatus::Failed);
        assert!(rows[1].note.contains("died in this cell") && rows[1].note.contains("SIGKILL"));
        assert!(rows[2].note.contains("not reached"));
        // The completed file on disk says the same.
        let on_disk: Vec<KernelRow> = read_csv(&dir.path().join(KERNEL_ROWS_FILE)).unwrap();
        assert_eq!(on_disk, rows);
    }
}
