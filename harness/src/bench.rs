//! The `bench` and `plot` commands end to end, callable from tests without
//! spawning the CLI: config -> jobs -> agents -> rows -> CSV -> plots.

use crate::boards::{resolve_targets, BoardsFile, ResolvedBoard, SshConfig, TargetError};
use crate::build::{
    build_board_agent, build_host_agent, workspace_root, AgentBuild, BuildError, Builder,
};
use crate::config::{BenchConfig, ConfigError};
use crate::deploy::SshRunner;
use crate::matrix::job_for_board;
use crate::results::{
    read_csv, read_json, write_json, KernelRow, ResultsError, KERNEL_ROWS_FILE, MANIFEST_FILE,
};
use crate::run::BuildRecord;
use crate::run::{
    git_commit, llama_cpp_sys_version, merge_boards, new_run_id, run_boards, rustc_version,
    BoardOutcome, BoardRunner, HostInfo, LocalRunner, RunManifest, Versions,
};
use crate::setup::Need;
use indicatif::MultiProgress;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BenchError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Results(#[from] ResultsError),
    #[cfg(feature = "plot")]
    #[error(transparent)]
    Plot(#[from] crate::plot::PlotError),
    #[error(transparent)]
    Setup(#[from] crate::setup::SetupError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("{0}")]
    Model(String),
    #[error(transparent)]
    Testbed(#[from] crate::testbed::TestbedError),
    #[error("{0} is not a run directory (no {MANIFEST_FILE} or {KERNEL_ROWS_FILE}); pass a folder under results/")]
    NotARunDir(PathBuf),
}

pub struct BenchOptions {
    pub config_path: PathBuf,
    pub matrix: String,
    /// `--target`; `None` means the embedded default: one emulated Pi 5
    /// brought up on this machine (`testbed up --boards 1`), board `sim1`.
    pub target: Option<String>,
    pub results_root: PathBuf,
    pub builder: Builder,
    pub accept_new_host_key: bool,
}

/// What a finished bench produced.
pub struct BenchReport {
    pub run_dir: PathBuf,
    pub boards: Vec<BoardOutcome>,
    pub builds: Vec<BuildRecord>,
    pub summary_markdown: String,
    pub plots: Vec<PathBuf>,
}

impl BenchReport {
    pub fn all_succeeded(&self) -> bool {
        self.boards.iter().all(BoardOutcome::succeeded)
    }
}

pub fn run_bench(options: &BenchOptions) -> Result<BenchReport, BenchError> {
    let config = BenchConfig::load(&options.config_path)?;
    // Validate the matrix before any build so a typo fails in milliseconds.
    config.matrix(&options.matrix)?;
    let workspace = workspace_root();
    let target = target_or_default(options.target.as_deref(), &workspace)?;
    let boards_file = known_boards(&config, &workspace)?;
    let boards = resolve_targets(&target, &boards_file, &SshConfig::load_default())?;
    let any_remote = boards.iter().any(|b| matches!(b, ResolvedBoard::Remote(_)));
    let mut needs = vec![Need::HostBuild];
    if any_remote {
        needs.push(Need::CrossBuild);
    }
    crate::setup::ensure(&needs)?;

    let commit = git_commit(&workspace);
    // Two runs in the same second must not share a directory.
    let run_id = unique_run_id(&options.results_root, &commit);
    let mut builds: Vec<BuildRecord> = Vec::new();
    let mut agents: BTreeMap<String, AgentBuild> = BTreeMap::new();
    for board in &boards {
        let key = match board {
            ResolvedBoard::Local => "local".to_string(),
            ResolvedBoard::Remote(r) => r.profile.name().to_string(),
        };
        if agents.contains_key(&key) {
            continue;
        }
        let started = std::time::Instant::now();
        let agent = match board {
            ResolvedBoard::Local => build_host_agent(&workspace)?,
            ResolvedBoard::Remote(r) => build_board_agent(&workspace, r.profile, options.builder)?,
        };
        let record = BuildRecord {
            profile: key.clone(),
            hash: agent.hash.clone(),
            target_triple: agent.target_triple.clone(),
            seconds: started.elapsed().as_secs_f64(),
        };
        eprintln!(
            "agent for {} built: {} ({}) in {:.1} s",
            record.profile, record.hash, record.target_triple, record.seconds
        );
        builds.push(record);
        agents.insert(key, agent);
    }

    let run_dir = options.results_root.join(&run_id);
    std::fs::create_dir_all(&run_dir).map_err(|source| ResultsError::Io {
        path: run_dir.clone(),
        source,
    })?;
    let mut manifest = RunManifest {
        run_id: run_id.clone(),
        started_at: crate::utc_now_rfc3339(),
        finished_at: None,
        matrix: options.matrix.clone(),
        config_path: options.config_path.display().to_string(),
        matrix_spec: config.matrix(&options.matrix)?.clone(),
        seed: config.seed,
        git_commit: commit.clone(),
        target: target.clone(),
        versions: Versions {
            quantbench: env!("CARGO_PKG_VERSION").to_string(),
            llama_cpp_sys_2: llama_cpp_sys_version(&workspace),
            rustc: rustc_version(),
            agent_builds: builds.clone(),
        },
        host: HostInfo::current(),
        boards: Vec::new(),
    };
    // Written first, so an interrupted run still says what it was.
    write_json(&run_dir.join(MANIFEST_FILE), &manifest)?;

    let multi = MultiProgress::new();
    let log: Arc<dyn Fn(String) + Send + Sync> = {
        let multi = multi.clone();
        Arc::new(move |line: String| {
            if multi.is_hidden() || multi.println(&line).is_err() {
                eprintln!("{line}");
            }
        })
    };
    let mut jobs = Vec::new();
    let mut runners: Vec<Box<dyn BoardRunner>> = Vec::new();
    for board in &boards {
        let (emulated, runner): (bool, Box<dyn BoardRunner>) = match board {
            ResolvedBoard::Local => (
                false,
                Box::new(LocalRunner {
                    board: "local".into(),
                    agent: agents["local"].path.clone(),
                }),
            ),
            ResolvedBoard::Remote(r) => (
                r.emulated,
                Box::new(SshRunner {
                    board: r.clone(),
                    agent: agents[r.profile.name()].clone(),
                    accept_new_host_key: options.accept_new_host_key,
                    uploaded_bytes: Default::default(),
                    log: log.clone(),
                }),
            ),
        };
        jobs.push(job_for_board(
            &config,
            &options.matrix,
            &run_id,
            board.name(),
            emulated,
            &commit,
        )?);
        runners.push(runner);
    }
    let outcomes = run_boards(runners, jobs, &run_dir, &multi);
    for outcome in &outcomes {
        if let Some(e) = &outcome.error {
            log(format!("board {} failed: {e}", outcome.board));
        }
    }
    manifest.boards = outcomes.clone();
    manifest.finished_at = Some(crate::utc_now_rfc3339());
    write_json(&run_dir.join(MANIFEST_FILE), &manifest)?;

    let names: Vec<String> = boards.iter().map(|b| b.name().to_string()).collect();
    let rows = merge_boards(&run_dir, &names)?;
    let (summary_markdown, plots) = render(&run_dir, &rows, &manifest)?;
    Ok(BenchReport {
        run_dir,
        boards: outcomes,
        builds,
        summary_markdown,
        plots,
    })
}

/// Boards from the config plus the testbed's, when it is up (the config's
/// own definitions win on a name clash).
pub fn known_boards(config: &BenchConfig, workspace: &Path) -> Result<BoardsFile, BenchError> {
    let mut file = BoardsFile::default();
    let testbed_file = crate::testbed::boards_file_path(workspace);
    if testbed_file.exists() {
        let text = std::fs::read_to_string(&testbed_file).map_err(|source| ResultsError::Io {
            path: testbed_file.clone(),
            source,
        })?;
        file = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: testbed_file.clone(),
            message: e.message().to_string(),
        })?;
    }
    file.boards.extend(config.boards.clone());
    file.groups.extend(config.groups.clone());
    Ok(file)
}

/// Redraws the plots and summary of an existing run directory.
pub fn redraw(run_dir: &Path) -> Result<(String, Vec<PathBuf>), BenchError> {
    let manifest_path = run_dir.join(MANIFEST_FILE);
    let rows_path = run_dir.join(KERNEL_ROWS_FILE);
    if !manifest_path.exists() || !rows_path.exists() {
        return Err(BenchError::NotARunDir(run_dir.to_path_buf()));
    }
    let manifest: RunManifest = read_json(&manifest_path)?;
    let rows: Vec<KernelRow> = read_csv(&rows_path)?;
    render(run_dir, &rows, &manifest)
}

fn render(
    run_dir: &Path,
    rows: &[KernelRow],
    manifest: &RunManifest,
) -> Result<(String, Vec<PathBuf>), BenchError> {
    let types = crate::summary::type_table(rows);
    let summary = format!(
        "# quantbench run {}\n\nmatrix `{}`, commit {}, started {}\n{}\n## All cells\n\n{}",
        manifest.run_id,
        manifest.matrix,
        manifest.git_commit,
        manifest.started_at,
        types,
        crate::summary::cell_table(rows)
    );
    let summary_path = run_dir.join("summary.md");
    std::fs::write(&summary_path, &summary).map_err(|source| ResultsError::Io {
        path: summary_path,
        source,
    })?;
    #[cfg(feature = "plot")]
    let plots = {
        let (plot_dir, ctx) = plot_dir(run_dir, &manifest.started_at, &manifest.git_commit)?;
        match crate::plot::draw_all(rows, &ctx, &plot_dir) {
            Ok(files) => files,
            // A run where nothing could be measured still has its CSV and summary.
            Err(crate::plot::PlotError::NoRows) => Vec::new(),
            Err(e) => return Err(e.into()),
        }
    };
    #[cfg(not(feature = "plot"))]
    let plots = Vec::new();
    Ok((types, plots))
}

/// `--target`, or the embedded default: one emulated Pi 5 on this machine
/// (brought up when it is not), board `sim1`.
pub fn target_or_default(target: Option<&str>, workspace: &Path) -> Result<String, BenchError> {
    if let Some(t) = target {
        return Ok(t.to_string());
    }
    if !crate::testbed::is_up(workspace, 1) {
        eprintln!("no --target: bringing up one emulated Pi 5 (cargo xtask testbed up --boards 1)");
        crate::testbed::up(workspace, 1)?;
    }
    Ok(crate::testbed::board_name(1))
}

/// A run id whose directory does not exist yet (two runs in one second
/// must not share one).
pub fn unique_run_id(results_root: &Path, commit: &str) -> String {
    let mut run_id = new_run_id(commit);
    for attempt in 2.. {
        if !results_root.join(&run_id).exists() {
            break;
        }
        run_id = format!("{}-{attempt}", new_run_id(commit));
    }
    run_id
}

/// `<run>/plots/`, created, and the text every plot title carries.
#[cfg(feature = "plot")]
pub fn plot_dir(
    run_dir: &Path,
    date: &str,
    commit: &str,
) -> Result<(PathBuf, crate::plot::PlotContext), BenchError> {
    let dir = run_dir.join("plots");
    std::fs::create_dir_all(&dir).map_err(|source| ResultsError::Io {
        path: dir.clone(),
        source,
    })?;
    let ctx = crate::plot::PlotContext {
        date: date.to_string(),
        commit: commit.to_string(),
    };
    Ok((dir, ctx))
}
