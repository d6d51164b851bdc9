//! The one run pipeline, for every kind of job: config -> job kinds
//! (inputs checked) -> session (boards, set-up, agents, run id) -> host-side
//! preparation -> run directory and `run.json` -> every board's jobs at once
//! -> merged rows -> summary and plots. Callable from tests without
//! spawning the CLI.
//!
//! A resumed run (`--resume`) goes through the same stages with what its
//! `run.json` recorded (config, matrices, target, run id); its agents must
//! be the same builds, so resumed rows measure the same code.

use crate::builds::build::rustc_version;
use crate::builds::llama_source::llama_cpp_sys_version;
use crate::fleet::boards::ResolvedBoard;
use crate::results::render::{render_run, RenderError, Rendered};
use crate::runs::config::{BenchConfig, ConfigError};
use crate::runs::deploy::SshRunner;
use crate::runs::farm::FarmRunner;
use crate::runs::jobs::{kinds_for, JobError};
use crate::runs::manifest::{
    BoardOutcome, HostInfo, ManifestWriter, MatrixRecord, RunManifest, Versions,
};
use crate::runs::run::{run_all, BoardBudget, BoardPlan, BoardRunner, LocalRunner};
use crate::runs::run_owner::RunOwner;
use crate::runs::session::{Session, SessionError, SessionOptions};
use crate::runs::steps::Stage;
use indicatif::MultiProgress;
use std::path::PathBuf;
use std::sync::Arc;
use thiserror::Error;
use wire::files::{ResultsError, MANIFEST_FILE};

#[derive(Debug, Error)]
pub enum BenchError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Results(#[from] ResultsError),
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error("{0}")]
    Resume(String),
    #[error("{0}")]
    NoSuchCell(String),
    #[error(transparent)]
    Budget(#[from] crate::runs::budget::BudgetError),
    #[error(transparent)]
    Owner(#[from] crate::runs::run_owner::OwnerError),
}

/// What a finished run produced.
pub struct BenchReport {
    pub run_dir: PathBuf,
    pub boards: Vec<BoardOutcome>,
    pub rendered: Rendered,
}

impl BenchReport {
    pub fn all_succeeded(&self) -> bool {
        self.boards.iter().all(BoardOutcome::succeeded)
    }
}

pub fn run_bench(options: &SessionOptions) -> Result<BenchReport, BenchError> {
    // The budget bounds the whole run, builds and preparation included.
    let budget_ends = options.budget.map(|b| std::time::Instant::now() + b);
    let resumed = match &options.resume {
        Some(reference) => Some(find_run_to_resume(&options.results_root, reference)?),
        None => None,
    };
    // Held until this function returns: one process per run directory.
    let mut _owner = match &resumed {
        Some((dir, _)) => Some(RunOwner::take(dir)?),
        None => None,
    };
    let options = &match &resumed {
        Some((_, recorded)) => SessionOptions {
            config_path: PathBuf::from(&recorded.config_path),
            matrix: recorded.matrix.clone(),
            target: Some(recorded.target.clone()),
            build: recorded
                .versions
                .agent_builds
                .first()
                .map(|b| b.build.clone())
                .unwrap_or_else(|| "default".into()),
            // An A/B run's other builds, in their order.
            versus: {
                let mut names: Vec<String> = Vec::new();
                for b in recorded.versions.agent_builds.iter().skip(1) {
                    if !names.contains(&b.build)
                        && Some(&b.build)
                            != recorded.versions.agent_builds.first().map(|f| &f.build)
                    {
                        names.push(b.build.clone());
                    }
                }
                names
            },
            ..options.clone()
        },
        None => options.clone(),
    };
    let config = BenchConfig::load(&options.config_path)?;
    // Every matrix and its inputs are checked before any build, so a typo
    // fails in milliseconds.
    let mut kinds = kinds_for(&config, &options.matrix)?;
    let needs_host_agent = kinds.iter().any(|k| k.needs_host_agent());
    let mut session = Session::open(options, &config, needs_host_agent)?;
    if let Some((dir, recorded)) = &resumed {
        check_same_agents(&session, recorded, dir)?;
        session.run_id = recorded.run_id.clone();
        session.run_dir = dir.clone();
    }
    for kind in kinds.iter_mut() {
        kind.prepare(&session)?;
    }

    // Every board's jobs, fitted to the budget, before anything is
    // written: a budget too small refuses the run with nothing on disk.
    let mut planned = Vec::new();
    for slot in &session.boards {
        let mut jobs = Vec::new();
        for (index, kind) in kinds.iter().enumerate() {
            for mut job in kind.plan(&session, slot)? {
                job.kind_index = index;
                jobs.push(job);
            }
        }
        let budget = match budget_ends {
            Some(ends) => {
                let left = ends.saturating_duration_since(std::time::Instant::now());
                let needs = jobs
                    .iter()
                    .map(|job| kinds[job.kind_index].budget_need(job))
                    .collect::<Result<Vec<_>, _>>()?;
                let total = options.budget.unwrap_or(left);
                let fit = crate::runs::budget::fit_board(&slot.name, &needs, left, total)?;
                if let Some(line) = &fit.lowered {
                    eprintln!("{line}");
                }
                for (job, &invocations) in jobs.iter_mut().zip(&fit.invocations) {
                    *job = kinds[job.kind_index].fit_budget(job, invocations, None)?;
                }
                Some(BoardBudget {
                    ends,
                    least: fit.least,
                    reserve_after: fit.reserve_after,
                })
            }
            None => None,
        };
        planned.push((jobs, budget));
    }

    if !options.only_cells.is_empty() && planned.iter().all(|(jobs, _)| jobs.is_empty()) {
        return Err(BenchError::NoSuchCell(format!(
            "no cell of matrix `{}` is {}: give a kernel cell as kernels.csv names it (`<shape>/<type>/n<batch>/t<threads>`) or a model test as `<model file>/<recipe>/<pp|tg><N>/t<threads>`",
            options.matrix,
            options.only_cells.join(", ")
        )));
    }
    let run_dir = session.run_dir.clone();
    std::fs::create_dir_all(&run_dir).map_err(|source| ResultsError::Io {
        path: run_dir.clone(),
        source,
    })?;
    if _owner.is_none() {
        _owner = Some(RunOwner::take(&run_dir)?);
    }
    let fresh = || RunManifest {
        run_id: session.run_id.clone(),
        started_at: wire::utc_now_rfc3339(),
        finished_at: None,
        matrix: options.matrix.clone(),
        matrices: kinds
            .iter()
            .map(|k| MatrixRecord {
                name: k.matrix().to_string(),
                kind: k.kind().to_string(),
                spec: k.spec(),
            })
            .collect(),
        config_path: options.config_path.display().to_string(),
        seed: config.seed,
        git_commit: session.commit.clone(),
        target: session.target.clone(),
        versions: Versions {
            quantbench: env!("CARGO_PKG_VERSION").to_string(),
            llama_cpp_sys_2: llama_cpp_sys_version(&session.workspace),
            rustc: rustc_version(),
            agent_builds: session.builds.clone(),
        },
        host: HostInfo::current(),
        boards: session
            .boards
            .iter()
            .map(|b| BoardOutcome {
                board: b.name.clone(),
                emulated: b.emulated,
                ..Default::default()
            })
            .collect(),
        resumed_at: Vec::new(),
        rejected_rows: Vec::new(),
    };
    let manifest = ManifestWriter::create(
        &run_dir.join(MANIFEST_FILE),
        match resumed {
            Some((_, mut recorded)) => {
                recorded.finished_at = None;
                recorded.resumed_at.push(wire::utc_now_rfc3339());
                recorded
            }
            None => fresh(),
        },
    )?;
    let recorded_boards = manifest.snapshot().boards;

    let multi = MultiProgress::new();
    let log: Arc<dyn Fn(String) + Send + Sync> = {
        let multi = multi.clone();
        Arc::new(move |line: String| {
            if multi.is_hidden() || multi.println(&line).is_err() {
                eprintln!("{line}");
            }
        })
    };
    let mut plans = Vec::new();
    for (slot, (jobs, budget)) in session.boards.iter().zip(planned) {
        let runner: Box<dyn BoardRunner> = match (&slot.board, session.agent_for(&slot.board)) {
            (ResolvedBoard::Local, Some(agent)) => Box::new(LocalRunner {
                board: slot.name.clone(),
                agent: agent.path.clone(),
            }),
            (ResolvedBoard::Remote(r), Some(agent)) => {
                let ssh = SshRunner {
                    board: r.clone(),
                    agent: agent.clone(),
                    accept_new_host_key: options.accept_new_host_key,
                    lock_wait: options.board_lock_wait,
                    uploaded_bytes: Default::default(),
                    log: log.clone(),
                    prepared: false,
                };
                if r.farm.is_some() {
                    Box::new(FarmRunner::new(ssh, options.board_lock_wait))
                } else {
                    Box::new(ssh)
                }
            }
            (_, None) => {
                return Err(JobError::MissingHostAgent(format!(
                    "no agent was built for board {}",
                    slot.name
                ))
                .into())
            }
        };
        plans.push(BoardPlan {
            runner,
            emulated: slot.emulated,
            jobs,
            previous: recorded_boards
                .iter()
                .find(|b| b.board == slot.name && b.started_at.is_some())
                .cloned(),
            budget,
        });
    }
    Stage::Measuring.begin(&format!(
        "measuring matrix `{}` on {} board(s); rows are written to {} as they are measured (if interrupted, `cargo xtask bench --resume latest` goes on)",
        options.matrix,
        session.boards.len(),
        run_dir.display()
    ));
    let outcomes = run_all(plans, &kinds, &run_dir, &manifest, &multi);
    Stage::Results.begin(&format!(
        "results: rows merged, summary and plots drawn into {}",
        run_dir.display()
    ));
    for outcome in &outcomes {
        if let Some(e) = &outcome.error {
            log(format!("board {} failed: {e}", outcome.board));
        }
    }
    manifest.update(|m| m.finished_at = Some(wire::utc_now_rfc3339()))?;

    let names = session.board_names();
    let mut rejected: Vec<String> = Vec::new();
    for kind in &kinds {
        for line in kind.merge(&run_dir, &session.run_id, &names)? {
            // Samples are merged by each kind: say each once.
            if !rejected.contains(&line) {
                log(format!("rows left out: {line}"));
                rejected.push(line);
            }
        }
        kind.finish(&run_dir)?;
    }
    if !rejected.is_empty() {
        manifest.update(|m| m.rejected_rows = rejected.clone())?;
    }
    let rendered = render_run(&run_dir)?;
    // The run directory is the record; the index is a convenience that a
    // later `cargo xtask history` can always rebuild.
    if let Err(e) = crate::results::history::History::open(&options.results_root) {
        log(format!(
            "history index not updated ({e}); `cargo xtask history` rebuilds it"
        ));
    }
    Ok(BenchReport {
        run_dir,
        boards: outcomes,
        rendered,
    })
}

/// The run directory `reference` names (a path, a run id under
/// `results_root`, or `latest`) and its `run.json`.
fn find_run_to_resume(
    results_root: &std::path::Path,
    reference: &str,
) -> Result<(PathBuf, RunManifest), BenchError> {
    let dir = if reference == "latest" {
        crate::results::run_dir::list_runs(results_root).pop().ok_or_else(|| {
            BenchError::Resume(format!(
                "--resume latest: no run under {} (no folder with a {MANIFEST_FILE}); pass the run directory",
                results_root.display()
            ))
        })?
    } else if std::path::Path::new(reference)
        .join(MANIFEST_FILE)
        .is_file()
    {
        PathBuf::from(reference)
    } else if results_root.join(reference).join(MANIFEST_FILE).is_file() {
        results_root.join(reference)
    } else {
        return Err(BenchError::Resume(format!(
            "--resume {reference}: not a run directory, nor a run id under {} (each has a {MANIFEST_FILE}); use `latest` or a folder under it",
            results_root.display()
        )));
    };
    let recorded = wire::files::read_json(&dir.join(MANIFEST_FILE))?;
    Ok((dir, recorded))
}

/// A resumed run must measure with the agents it started with, or its rows
/// would mix two builds under one run id.
fn check_same_agents(
    session: &Session,
    recorded: &RunManifest,
    dir: &std::path::Path,
) -> Result<(), BenchError> {
    for build in &session.builds {
        let before = recorded
            .versions
            .agent_builds
            .iter()
            .find(|b| b.profile == build.profile);
        if let Some(before) = before.filter(|b| b.hash != build.hash) {
            return Err(BenchError::Resume(format!(
                "cannot resume {}: it was measured with agent {} for {} (commit {}), but this checkout builds {}. Check out commit {} (with the same local changes) and resume again",
                dir.display(),
                before.hash,
                build.profile,
                recorded.git_commit,
                build.hash,
                recorded.git_commit.trim_end_matches("-dirty")
            )));
        }
    }
    Ok(())
}
