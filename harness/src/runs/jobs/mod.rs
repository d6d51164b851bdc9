//! Kinds of job a run carries, behind one trait: a kind knows how to prepare
//! its work on the host, plan its jobs for a board (what the agent runs,
//! which files it needs on the board), turn what a board did not finish into
//! failed rows, and merge its rows into the run. The session, the runner,
//! the collection and the rendering are the same for every kind; a new kind
//! is a new file here.

pub mod kernel;
pub mod model;

use crate::runs::budget::BudgetNeed;
use crate::runs::config::{BenchConfig, ConfigError, NamedMatrix};
use crate::runs::recipes::RecipeError;
use crate::runs::session::{BoardSlot, Session};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};
use thiserror::Error;
use wire::files::{CsvAppender, ResultsError};

#[derive(Debug, Error)]
pub enum JobError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error(transparent)]
    Results(#[from] ResultsError),
    #[error("{0}")]
    MissingHostAgent(String),
    #[error("{0}")]
    Synthetic(String),
}

/// One job for one board, ready for a runner.
#[derive(Debug, Clone)]
pub struct PlannedJob {
    /// Index of the kind that planned it, in the run's list of kinds.
    pub kind_index: usize,
    /// The job's name: its job file (`job-<name>.json`) and its run folder
    /// on a board.
    pub name: String,
    /// Agent subcommand: `run`, `model-run`.
    pub subcommand: &'static str,
    /// The job as JSON, with host paths.
    pub spec: serde_json::Value,
    /// Cells, recipes, ...: the progress bar counts these.
    pub units: usize,
    /// Host files the job names (by JSON pointer into `spec`) that a remote
    /// board needs a copy of.
    pub uploads: Vec<Upload>,
    /// Memory the job needs on the board, checked before any upload.
    pub memory_need: Option<MemoryNeed>,
    /// Disk the agent uses in its run folder on the board (staged weights,
    /// rows), checked before it starts; uploads are checked on their own.
    pub disk_bytes: u64,
    /// Row files the agent writes, fetched and appended to the board's.
    pub outputs: &'static [&'static str],
    /// How long the agent may run on a board before it is stopped and its
    /// unfinished units become `failed` rows (a hung board must not hold the
    /// run forever).
    pub deadline: std::time::Duration,
    /// Other builds' agents the job runs besides the board's own (an A/B
    /// kernel job measures both builds in the same rounds): deployed first.
    pub agents: Vec<crate::builds::build::AgentBuild>,
}

/// The builds an A/B session measures on `board`, base first, as a job
/// names them, and the agents the board needs besides its own (the
/// base's); nothing for a session of one build.
pub(crate) fn job_builds(
    session: &Session,
    board: &BoardSlot,
) -> Result<
    (
        Vec<wire::kernel_job::JobBuild>,
        Vec<crate::builds::build::AgentBuild>,
    ),
    JobError,
> {
    if session.versus().is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut builds = Vec::new();
    let mut agents = Vec::new();
    for build in &session.under_test {
        let agent = build.agent_for(&board.board).ok_or_else(|| {
            JobError::MissingHostAgent(format!(
                "build `{}` has no agent for board {}",
                build.name(),
                board.name
            ))
        })?;
        builds.push(wire::kernel_job::JobBuild {
            name: build.name().to_string(),
            agent: wire::probe::AgentIdentity {
                agent_build: agent.hash.clone(),
                llama_cpp: build.source.agent_label(),
            },
            // A remote board keeps agents by hash beside each other; on
            // this machine each build's binary is in its own target folder.
            path: matches!(board.board, crate::fleet::boards::ResolvedBoard::Local)
                .then(|| agent.path.display().to_string()),
        });
        agents.push(agent.clone());
    }
    agents.remove(0);
    Ok((builds, agents))
}

impl PlannedJob {
    pub fn job_file(&self) -> String {
        format!("job-{}.json", self.name)
    }
}

#[derive(Debug, Clone)]
pub struct Upload {
    /// JSON pointer (RFC 6901) of the path in the job spec.
    pub pointer: String,
    pub local: PathBuf,
}

#[derive(Debug, Clone)]
pub struct MemoryNeed {
    pub bytes: u64,
    /// What needs it and how it was estimated.
    pub what: String,
    /// What to do when it does not fit.
    pub advice: String,
}

/// How a job ended early, for its unfinished units' failed rows.
#[derive(Debug, Clone)]
pub struct JobFailure {
    /// The unit the agent was in when it stopped, if known.
    pub died_in: Option<String>,
    pub reason: String,
}

/// A job's units by how they ended.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    pub ok: usize,
    pub unsupported: usize,
    pub failed: usize,
    /// Sum of timed repetitions, seconds.
    pub measured_seconds: f64,
}

impl Tally {
    /// Counts one unit that ended with `status`.
    pub fn count(&mut self, status: wire::rows::CellStatus) {
        use wire::rows::CellStatus;
        match status {
            CellStatus::Ok => self.ok += 1,
            CellStatus::Unsupported => self.unsupported += 1,
            CellStatus::Failed => self.failed += 1,
        }
    }
}

pub trait JobKind: Send + Sync {
    /// `kernel` or `model`: which rows this kind returns.
    fn kind(&self) -> &'static str;
    /// The matrix's name in the config.
    fn matrix(&self) -> &str;
    /// The matrix spec as run, for `run.json`.
    fn spec(&self) -> serde_json::Value;
    /// Whether `prepare` runs the host's own agent.
    fn needs_host_agent(&self) -> bool {
        false
    }
    /// Host-side work done once per run before any board starts; a failure
    /// here stops the run before its directory exists.
    fn prepare(&mut self, _session: &Session) -> Result<(), JobError> {
        Ok(())
    }
    /// The jobs for one board, in the order they run.
    fn plan(&self, session: &Session, board: &BoardSlot) -> Result<Vec<PlannedJob>, JobError>;
    /// Appends a failed row for every unit of `job` without a row in
    /// `job_dir` (the job's own folder of the board's files) and counts the
    /// job's units. Idempotent: a unit with a row gets no second one.
    fn complete(
        &self,
        job: &PlannedJob,
        job_dir: &Path,
        failure: Option<&JobFailure>,
    ) -> Result<Tally, JobError>;
    /// `job` cut down to the units without a row in `job_dir` (`None` when
    /// every unit has one): what a resumed run still has to measure.
    fn remaining(&self, job: &PlannedJob, job_dir: &Path) -> Result<Option<PlannedJob>, JobError>;

    /// The job's least time per invocation of all its units, for
    /// `--budget` (`crate::runs::budget`); `None` for kinds without invocations.
    fn budget_need(&self, _job: &PlannedJob) -> Result<Option<BudgetNeed>, JobError> {
        Ok(None)
    }

    /// The job measuring at most `invocations` a unit and, with
    /// `adaptive_seconds`, adding adaptive rounds for that long.
    fn fit_budget(
        &self,
        job: &PlannedJob,
        _invocations: u32,
        _adaptive_seconds: Option<u64>,
    ) -> Result<PlannedJob, JobError> {
        Ok(job.clone())
    }
    /// Rebuilds the run's merged row files from every board's.
    /// Merges every board's rows of this kind into the run directory's
    /// files; returns the rows left out, described (see `merge_rows`).
    fn merge(
        &self,
        run_dir: &Path,
        run_id: &str,
        boards: &[String],
    ) -> Result<Vec<String>, ResultsError>;
    /// Anything else the kind stores with the run once every board is done.
    fn finish(&self, _run_dir: &Path) -> Result<(), ResultsError> {
        Ok(())
    }
}

/// The kinds for `--matrix a,b,...`, each checked (inputs included) before
/// anything is built.
pub fn kinds_for(config: &BenchConfig, names: &str) -> Result<Vec<Box<dyn JobKind>>, JobError> {
    let mut kinds: Vec<Box<dyn JobKind>> = Vec::new();
    for named in config.matrix_list(names)? {
        kinds.push(match named {
            NamedMatrix::Kernel(name, _) => Box::new(kernel::KernelMatrix::new(config, &name)?),
            NamedMatrix::Model(name, spec) => {
                Box::new(model::ModelMatrix::new(config, &name, spec)?)
            }
        });
    }
    Ok(kinds)
}

pub(crate) fn to_spec<T: Serialize>(value: &T) -> serde_json::Value {
    // Job types hold strings, numbers and lists only: serializing cannot fail.
    serde_json::to_value(value).unwrap_or_default()
}

pub(crate) fn from_spec<T: DeserializeOwned>(job: &PlannedJob) -> Result<T, ResultsError> {
    serde_json::from_value(job.spec.clone()).map_err(|source| ResultsError::Json {
        path: PathBuf::from(job.job_file()),
        source,
    })
}

/// Rows of type `T` already in `path` (none when it does not exist), read
/// line-complete: a board's file may end in a line cut short (a full disk,
/// a killed agent) or hold a line that is not a row (a hostile board).
/// Such a line is skipped and named on stderr, once per file and line; the
/// rest of the run goes on.
pub(crate) fn rows_in<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, ResultsError> {
    let read = wire::files::read_rows(path)?;
    static REPORTED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    for line in &read.skipped {
        let what = format!("{}: {line}", path.display());
        let mut reported = REPORTED.lock().unwrap_or_else(|e| e.into_inner());
        if !reported.contains(&what) {
            eprintln!("{what}: not a row, skipped");
            reported.push(what);
        }
    }
    Ok(read.rows)
}

/// Rebuilds `run_dir/<file>` from every job folder's
/// (`run_dir/boards/<board>/jobs/<job>/<file>`), in board order then job
/// name; idempotent. A row is kept only when it names the board whose
/// folder holds it and the run `run_id` (a board cannot write rows for
/// another board or run); the others are left out and described in the
/// returned lines, one per job file.
pub fn merge_rows<T: DeserializeOwned + Serialize + wire::rows::Stamped>(
    run_dir: &Path,
    run_id: &str,
    boards: &[String],
    file: &str,
) -> Result<Vec<String>, ResultsError> {
    let merged = run_dir.join(file);
    if merged.exists() {
        std::fs::remove_file(&merged).map_err(|source| ResultsError::Io {
            path: merged.clone(),
            source,
        })?;
    }
    let mut rejected = Vec::new();
    let mut out: Option<CsvAppender<T>> = None;
    for board in boards {
        let job_files =
            crate::runs::session::job_dirs(&crate::runs::session::board_dir(run_dir, board))
                .into_iter()
                .map(|dir| dir.join(file));
        for path in job_files {
            let rows: Vec<T> = rows_in(&path)?;
            let mut claims: Vec<String> = Vec::new();
            let mut left_out = 0;
            for row in &rows {
                if row.board() != board || row.run_id() != run_id {
                    left_out += 1;
                    let claim = format!("board `{}` run `{}`", row.board(), row.run_id());
                    if !claims.contains(&claim) {
                        claims.push(claim);
                    }
                    continue;
                }
                if out.is_none() {
                    out = Some(CsvAppender::open(&merged)?);
                }
                if let Some(out) = out.as_mut() {
                    out.append_unsynced(row)?;
                }
            }
            if left_out > 0 {
                rejected.push(format!(
                    "{}: {left_out} rows claiming {} left out (rows of board `{board}` run `{run_id}` only)",
                    path.strip_prefix(run_dir).unwrap_or(&path).display(),
                    claims.join(", ")
                ));
            }
        }
    }
    // One sync for the file (the board's copies are the record until then).
    if let Some(out) = out.as_mut() {
        out.sync()?;
    }
    Ok(rejected)
}
