//! The `bench` and `plot` commands end to end, callable from tests without
//! spawning the CLI: config -> jobs -> agents -> rows -> CSV -> plots.

use crate::build::{build_host_agent, workspace_root, BuildError};
use crate::config::{BenchConfig, ConfigError};
use crate::matrix::job_for_board;
use crate::results::{
    read_csv, read_json, write_json, KernelRow, ResultsError, KERNEL_ROWS_FILE, MANIFEST_FILE,
};
use crate::run::{
    git_commit, llama_cpp_sys_version, merge_boards, new_run_id, run_boards, rustc_version,
    BoardOutcome, BoardRunner, HostInfo, LocalRunner, RunManifest, Versions,
};
use std::path::{Path, PathBuf};
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
    #[error("unknown target `{0}`: this version runs `local` (the host itself)")]
    UnknownTarget(String),
    #[error("{0} is not a run directory (no {MANIFEST_FILE} or {KERNEL_ROWS_FILE}); pass a folder under results/")]
    NotARunDir(PathBuf),
}

pub struct BenchOptions {
    pub config_path: PathBuf,
    pub matrix: String,
    pub target: String,
    pub results_root: PathBuf,
}

/// What a finished bench produced.
pub struct BenchReport {
    pub run_dir: PathBuf,
    pub boards: Vec<BoardOutcome>,
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
    if options.target != "local" {
        return Err(BenchError::UnknownTarget(options.target.clone()));
    }
    let workspace = workspace_root();
    let commit = git_commit(&workspace);
    let run_id = new_run_id(&commit);
    let job = job_for_board(&config, &options.matrix, &run_id, "local", false, &commit)?;
    crate::setup::ensure(&[crate::setup::Need::HostBuild])?;
    let agent = build_host_agent(&workspace)?;

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
        git_commit: commit,
        versions: Versions {
            quantbench: env!("CARGO_PKG_VERSION").to_string(),
            llama_cpp_sys_2: llama_cpp_sys_version(&workspace),
            rustc: rustc_version(),
            agent_builds: vec![format!("{} ({})", agent.hash, agent.target_triple)],
        },
        host: HostInfo::current(),
        boards: Vec::new(),
    };
    // Written first, so an interrupted run still says what it was.
    write_json(&run_dir.join(MANIFEST_FILE), &manifest)?;

    let boards = vec![job.board.clone()];
    let runners: Vec<Box<dyn BoardRunner>> = vec![Box::new(LocalRunner {
        board: job.board.clone(),
        agent: agent.path.clone(),
    })];
    let outcomes = run_boards(runners, vec![job], &run_dir);
    manifest.boards = outcomes.clone();
    manifest.finished_at = Some(crate::utc_now_rfc3339());
    write_json(&run_dir.join(MANIFEST_FILE), &manifest)?;

    let rows = merge_boards(&run_dir, &boards)?;
    let (summary_markdown, plots) = render(&run_dir, &rows, &manifest)?;
    Ok(BenchReport {
        run_dir,
        boards: outcomes,
        summary_markdown,
        plots,
    })
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
        let plot_dir = run_dir.join("plots");
        std::fs::create_dir_all(&plot_dir).map_err(|source| ResultsError::Io {
            path: plot_dir.clone(),
            source,
        })?;
        let ctx = crate::plot::PlotContext {
            date: manifest.started_at.clone(),
            commit: manifest.git_commit.clone(),
        };
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
