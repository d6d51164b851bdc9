//! Rendering any run directory, kernel, model or both: `summary.md` and
//! every plot kind that has rows to draw. Rendering reads only the run's
//! files, so `cargo xtask plot <run>` redraws what the run drew.
//!
//! - `figures`: derived figures, computed once for the summary and plots;
//! - `summary`: the markdown tables;
//! - `plots/`: one file per plot kind behind `PlotKind`;
//! - `chart`: the data a plot kind hands over; `canvas`: the only module
//!   that names the plotting library.

pub mod canvas;
pub mod chart;
pub mod figures;
pub mod plots;
pub mod summary;

pub use crate::results::run_dir::RunData;
use crate::results::run_dir::RunDirError;
use chart::Figure;
use std::path::{Path, PathBuf};
use thiserror::Error;
use wire::files::ResultsError;

#[derive(Debug, Error)]
pub enum RenderError {
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    #[error(transparent)]
    Results(#[from] ResultsError),
    #[error(transparent)]
    Draw(#[from] canvas::DrawError),
    #[error("unknown plot `{name}` (known: {known})")]
    UnknownPlot { name: String, known: String },
}

/// One kind of plot: which figures it draws from a run's rows (none when
/// the run has no rows of its kind).
pub trait PlotKind {
    /// The plot's name: its file stem (or their prefix, for a plot drawn
    /// once per model).
    fn name(&self) -> &'static str;
    fn figures(&self, run: &RunData) -> Vec<Figure>;
}

/// What rendering produced.
pub struct Rendered {
    /// The summary's tables (what the CLI prints).
    pub tables: String,
    pub summary_path: PathBuf,
    pub plots: Vec<PathBuf>,
}

/// Writes `summary.md` and every plot of the run into `<run>/plots/`.
pub fn render_run(run_dir: &Path) -> Result<Rendered, RenderError> {
    render_selected(run_dir, &[])
}

/// As `render_run`, drawing only the named plot kinds (all when empty).
pub fn render_selected(run_dir: &Path, only: &[String]) -> Result<Rendered, RenderError> {
    let kinds = plots::all();
    for name in only {
        if !kinds.iter().any(|k| k.name() == name) {
            return Err(RenderError::UnknownPlot {
                name: name.clone(),
                known: kinds
                    .iter()
                    .map(|k| k.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    let run = RunData::load(run_dir)?;
    let (tables, full) = summary::summary(&run);
    let summary_path = run_dir.join("summary.md");
    std::fs::write(&summary_path, full).map_err(|source| ResultsError::Io {
        path: summary_path.clone(),
        source,
    })?;
    let plot_dir = run_dir.join("plots");
    std::fs::create_dir_all(&plot_dir).map_err(|source| ResultsError::Io {
        path: plot_dir.clone(),
        source,
    })?;
    let mut written = Vec::new();
    for kind in kinds
        .iter()
        .filter(|k| only.is_empty() || only.iter().any(|n| n == k.name()))
    {
        for figure in kind.figures(&run) {
            written.extend(canvas::draw(
                &figure,
                &run.manifest.started_at,
                &format!(
                    "{} | llama.cpp {}",
                    run.manifest.git_commit,
                    run.manifest.llama_cpp()
                ),
                &plot_dir,
            )?);
        }
    }
    Ok(Rendered {
        tables,
        summary_path,
        plots: written,
    })
}
