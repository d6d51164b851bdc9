//! A board's noise, measured: `cargo xtask noise` runs a matrix as pairs of
//! same-build runs (A, B, A, B, ...), judges each pair with `compare` (its
//! false-alarm table: what a night with nothing changed looks like on this
//! board) and keeps each cell's run-to-run spread as its noise floor in
//! `results/noise/<board>.json`. `compare` raises a cell's margin to its
//! floor when the run it judges was measured by the same agent build on
//! the board as it was (same CPU, kernel, governor); a changed board or
//! build starts a new floor.

use crate::results::compare::{
    compare, CompareError, CompareSettings, Comparison, NoiseFloor, Verdict,
};
use crate::results::history::History;
use crate::results::run_dir::{BoardState, RunData, RunDirError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;
use wire::files::{read_json, write_json, ResultsError};
use wire::rows::{CellKey, CellStatus};
use wire::stats::{invocation_medians, invocation_spread, student_t_quantile, Summary};

/// Folder under the results root for noise runs and floors.
pub const NOISE_DIR: &str = "noise";

#[derive(Debug, Error)]
pub enum NoiseError {
    #[error("a noise measurement needs at least 2 runs (one pair); got {0}")]
    TooFewRuns(usize),
    #[error("noise runs {a} and {b} were measured by different agent builds on {board} ({build_a} vs {build_b}): the two sides of a noise run must be one build; rerun `cargo xtask noise` without changing the code in between")]
    DifferentBuilds {
        board: String,
        a: String,
        b: String,
        build_a: String,
        build_b: String,
    },
    #[error("noise run {0} has no measured kernel or model cell: nothing to learn the noise from")]
    NothingMeasured(String),
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    #[error(transparent)]
    Compare(#[from] CompareError),
    #[error(transparent)]
    Results(#[from] ResultsError),
}

/// One cell's noise on one board.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellNoise {
    pub cell_id: String,
    pub kind: String,
    pub settings: String,
    /// Runs it was measured in.
    pub runs: usize,
    /// Standard deviation of the runs' log times (0.03: about 3%).
    pub run_spread: f64,
    /// Median over runs of the spread between invocations.
    pub invocation_spread: Option<f64>,
    /// Invocations per run.
    pub invocations: usize,
    /// The change two same-build runs reach by chance in 95 of 100 pairs:
    /// 1.96 x sqrt(2) x `run_spread` (relative).
    pub floor: f64,
}

/// `results/noise/<board>.json`: the latest noise measurement of a board.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoardNoise {
    pub board: String,
    pub measured_at: String,
    pub state: BoardState,
    /// The run directories it came from.
    pub runs: Vec<String>,
    pub cells: Vec<CellNoise>,
}

/// One pair's verdict counts.
#[derive(Debug, Clone, Serialize)]
pub struct PairOutcome {
    pub base_run: String,
    pub new_run: String,
    pub cells: usize,
    pub counts: BTreeMap<&'static str, usize>,
}

/// What a noise measurement found.
#[derive(Debug, Clone, Serialize)]
pub struct NoiseReport {
    pub pairs: Vec<PairOutcome>,
    /// Cells the pairs were judged with an earlier noise floor for.
    pub floors_used: usize,
    pub boards: Vec<BoardNoise>,
    /// Where each board's floors were written.
    pub written: Vec<PathBuf>,
    pub threshold: f64,
    pub fdr: f64,
}

/// Judges consecutive pairs of `runs` (oldest first: A1, B1, A2, B2, ...)
/// and derives each board's per-cell noise floors; writes them under
/// `results_root/noise/`.
pub fn measure(
    runs: &[PathBuf],
    results_root: &Path,
    settings: &CompareSettings,
) -> Result<NoiseReport, NoiseError> {
    if runs.len() < 2 {
        return Err(NoiseError::TooFewRuns(runs.len()));
    }
    let data: Vec<RunData> = runs
        .iter()
        .map(|r| RunData::load(r))
        .collect::<Result<_, _>>()?;
    check_one_build(&data)?;
    let mut pairs = Vec::new();
    let mut floors_used = 0;
    for pair in data.chunks_exact(2) {
        // Judged as a nightly would be: with the floors of the board's
        // previous noise measurement, where it still holds.
        let mut settings = settings.clone();
        let (floors, _) = floors_for(results_root, None, &pair[1]);
        floors_used = floors_used.max(floors.len());
        settings.noise_floors = floors;
        let cmp = compare(&pair[0], &pair[1], &settings)?;
        pairs.push(PairOutcome {
            base_run: cmp.base_run.clone(),
            new_run: cmp.new_run.clone(),
            cells: cmp.cells.len(),
            counts: counts(&cmp),
        });
    }
    let boards = board_noise(&data)?;
    let dir = results_root.join(NOISE_DIR);
    std::fs::create_dir_all(&dir).map_err(|source| ResultsError::Io {
        path: dir.clone(),
        source,
    })?;
    let mut written = Vec::new();
    for b in &boards {
        let path = dir.join(format!("{}.json", crate::shell::file_safe(&b.board)));
        write_json(&path, b)?;
        written.push(path);
    }
    Ok(NoiseReport {
        pairs,
        floors_used,
        boards,
        written,
        threshold: settings.threshold,
        fdr: settings.fdr,
    })
}

fn counts(cmp: &Comparison) -> BTreeMap<&'static str, usize> {
    Verdict::ALL
        .iter()
        .map(|v| (v.name(), cmp.count(*v)))
        .collect()
}

/// Every row of every run, per board, from one agent build.
fn check_one_build(data: &[RunData]) -> Result<(), NoiseError> {
    let mut seen: BTreeMap<String, (String, String)> = BTreeMap::new();
    for run in data {
        let builds = run
            .kernel_rows
            .iter()
            .map(|r| (&r.board, &r.agent_build))
            .chain(run.model_rows.iter().map(|r| (&r.board, &r.agent_build)));
        for (board, build) in builds {
            if build.is_empty() {
                continue;
            }
            match seen.get(board) {
                Some((first_run, first)) if first != build => {
                    return Err(NoiseError::DifferentBuilds {
                        board: board.clone(),
                        a: first_run.clone(),
                        b: run.manifest.run_id.clone(),
                        build_a: first.clone(),
                        build_b: build.clone(),
                    })
                }
                Some(_) => {}
                None => {
                    seen.insert(board.clone(), (run.manifest.run_id.clone(), build.clone()));
                }
            }
        }
    }
    Ok(())
}

/// Per board, per cell: the spread of the runs' times.
fn board_noise(data: &[RunData]) -> Result<Vec<BoardNoise>, NoiseError> {
    // key -> per run, repetitions by invocation
    let mut by_cell: BTreeMap<CellKey, Vec<Vec<Vec<f64>>>> = BTreeMap::new();
    let mut states: BTreeMap<String, BoardState> = BTreeMap::new();
    for run in data {
        let samples = run.invocations_by_cell();
        let mut measured = 0;
        let keys = run
            .kernel_rows
            .iter()
            .filter(|r| r.status == CellStatus::Ok)
            .map(|r| (r.key(), r.agent_build.clone()))
            .chain(
                run.model_rows
                    .iter()
                    .filter(|r| r.status == CellStatus::Ok)
                    .map(|r| (r.key(), r.agent_build.clone())),
            );
        for (key, build) in keys {
            let Some(invocations) = samples.get(&(key.board.clone(), key.cell_id.clone())) else {
                continue;
            };
            measured += 1;
            states
                .entry(key.board.clone())
                .or_insert_with(|| BoardState::of(run.probes.get(&key.board), &build));
            by_cell.entry(key).or_default().push(invocations.clone());
        }
        if measured == 0 {
            return Err(NoiseError::NothingMeasured(run.manifest.run_id.clone()));
        }
    }
    let mut boards: BTreeMap<String, Vec<CellNoise>> = BTreeMap::new();
    for (key, runs) in by_cell {
        let times: Vec<f64> = runs
            .iter()
            .filter_map(|inv| wire::stats::geometric_mean(&invocation_medians(inv)))
            .map(f64::ln)
            .collect();
        let Some(spread) = Summary::of(&times).filter(|s| s.count >= 2) else {
            continue;
        };
        let spreads: Vec<f64> = runs
            .iter()
            .filter_map(|inv| invocation_spread(inv))
            .collect();
        boards
            .entry(key.board.clone())
            .or_default()
            .push(CellNoise {
                cell_id: key.cell_id,
                kind: key.kind,
                settings: key.settings,
                runs: times.len(),
                run_spread: spread.stddev,
                invocation_spread: Summary::of(&spreads).map(|s| s.median),
                invocations: runs.iter().map(Vec::len).max().unwrap_or(0),
                floor: (1.96 * std::f64::consts::SQRT_2 * spread.stddev).exp() - 1.0,
            });
    }
    let measured_at = wire::utc_now_rfc3339();
    let runs: Vec<String> = data.iter().map(|d| d.dir.display().to_string()).collect();
    Ok(boards
        .into_iter()
        .map(|(board, cells)| BoardNoise {
            state: states.get(&board).cloned().unwrap_or(BoardState {
                agent_build: String::new(),
                cpu_model: String::new(),
                kernel: String::new(),
                governor: None,
                cpu_max_freq_mhz: None,
            }),
            board,
            measured_at: measured_at.clone(),
            runs: runs.clone(),
            cells,
        })
        .collect())
}

/// Runs of the same build a history floor looks at (the latest).
pub const HISTORY_FLOOR_RUNS: usize = 10;
/// Fewer same-build runs than this give no history floor: a spread from
/// a handful of runs is a guess.
pub const MIN_HISTORY_FLOOR_RUNS: usize = 5;

/// Noise floors for judging `run`, per board and cell, from two sources:
/// the board's latest `cargo xtask noise` measurement
/// (`results_root/noise/<board>.json`) and, with `history`, the cell's
/// times in the last `HISTORY_FLOOR_RUNS` runs before `run` of the same
/// agent build on the board as it was (at least `MIN_HISTORY_FLOOR_RUNS`).
/// Either holds only for the board as `run` found it (same agent build,
/// CPU, kernel, governor, maximum clock). Where both hold, the one from
/// more runs is used. Also returns a note per board whose noise
/// measurement was not used, saying why.
pub fn floors_for(
    results_root: &Path,
    history: Option<&History>,
    run: &RunData,
) -> (BTreeMap<CellKey, NoiseFloor>, Vec<String>) {
    let mut floors: BTreeMap<CellKey, (usize, NoiseFloor)> = BTreeMap::new();
    let mut notes = Vec::new();
    for board in run.boards() {
        let now = run.board_state(board);
        let path = results_root
            .join(NOISE_DIR)
            .join(format!("{}.json", crate::shell::file_safe(board)));
        if let Ok(noise) = read_json::<BoardNoise>(&path) {
            let changed = noise.state.differences(&now);
            if changed.is_empty() {
                for cell in noise.cells {
                    let key = CellKey {
                        board: board.to_string(),
                        kind: cell.kind,
                        cell_id: cell.cell_id,
                        settings: cell.settings,
                    };
                    let floor = NoiseFloor {
                        relative: cell.floor,
                        source: format!("noise run of {}, {} runs", noise.measured_at, cell.runs),
                    };
                    floors.insert(key, (cell.runs, floor));
                }
            } else {
                notes.push(format!(
                    "{board}: noise floors of {} not used, the board changed since ({})",
                    noise.measured_at,
                    changed.join(", ")
                ));
            }
        }
        let Some(history) = history else { continue };
        let times = match history.same_state_times(
            board,
            &now,
            &run.manifest.started_at,
            HISTORY_FLOOR_RUNS,
        ) {
            Ok(times) => times,
            Err(e) => {
                notes.push(format!("{board}: no noise floors from the history: {e}"));
                continue;
            }
        };
        let mut by_cell: BTreeMap<CellKey, Vec<f64>> = BTreeMap::new();
        for (_, key, time) in times {
            by_cell.entry(key).or_default().push(time.ln());
        }
        for (key, logs) in by_cell {
            let Some(floor) = history_floor(&logs) else {
                continue;
            };
            if floors.get(&key).is_some_and(|(runs, _)| *runs > logs.len()) {
                continue;
            }
            let source = format!("history: {} runs of agent {}", logs.len(), now.agent_build);
            floors.insert(
                key,
                (
                    logs.len(),
                    NoiseFloor {
                        relative: floor,
                        source,
                    },
                ),
            );
        }
    }
    (
        floors.into_iter().map(|(k, (_, f))| (k, f)).collect(),
        notes,
    )
}

/// The change two more runs reach by chance in 95 of 100 pairs, from the
/// log times of earlier same-build runs: a t prediction bound on the
/// difference of two runs, t(0.975, n-1) x sqrt(2) x sd. `None` below
/// `MIN_HISTORY_FLOOR_RUNS` runs.
pub fn history_floor(log_times: &[f64]) -> Option<f64> {
    if log_times.len() < MIN_HISTORY_FLOOR_RUNS {
        return None;
    }
    let s = Summary::of(log_times)?;
    let t = student_t_quantile(0.975, (s.count - 1) as f64);
    Some((t * std::f64::consts::SQRT_2 * s.stddev).exp() - 1.0)
}

impl NoiseReport {
    /// The false-alarm table, the floors' spread and the smallest change
    /// the default settings detect with 90% power, as text.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let names: Vec<&str> = Verdict::ALL.iter().map(|v| v.name()).collect();
        let _ = writeln!(
            out,
            "same-build pairs (a night where nothing changed), judged {}:",
            if self.floors_used > 0 {
                format!(
                    "with the board's earlier noise floors ({} cells)",
                    self.floors_used
                )
            } else {
                "without noise floors (none measured for this build yet)".to_string()
            }
        );
        let _ = writeln!(out, "pair  cells  {}", names.join("  "));
        for (i, p) in self.pairs.iter().enumerate() {
            let counts: Vec<String> = names
                .iter()
                .map(|n| format!("{:>width$}", p.counts.get(n).unwrap_or(&0), width = n.len()))
                .collect();
            let _ = writeln!(out, "{:>4}  {:>5}  {}", i + 1, p.cells, counts.join("  "));
        }
        let judged: usize = self.pairs.iter().map(|p| p.cells).sum();
        let alarms: usize = self
            .pairs
            .iter()
            .map(|p| {
                p.counts.get("regressed").unwrap_or(&0) + p.counts.get("improved").unwrap_or(&0)
            })
            .sum();
        let inconclusive: usize = self
            .pairs
            .iter()
            .map(|p| *p.counts.get("inconclusive").unwrap_or(&0))
            .sum();
        let _ = writeln!(
            out,
            "false alarms: {alarms} of {judged} cell judgements; inconclusive: {inconclusive} ({:.1}%)",
            100.0 * inconclusive as f64 / judged.max(1) as f64
        );
        for b in &self.boards {
            let floors: Vec<f64> = b.cells.iter().map(|c| c.floor).collect();
            let spreads: Vec<f64> = b.cells.iter().filter_map(|c| c.invocation_spread).collect();
            let q = |v: &[f64], p: f64| {
                let mut v = v.to_vec();
                v.sort_by(f64::total_cmp);
                v.get(((v.len().saturating_sub(1)) as f64 * p).round() as usize)
                    .copied()
                    .unwrap_or(0.0)
            };
            let invocations = b.cells.iter().map(|c| c.invocations).max().unwrap_or(1);
            let _ = writeln!(
                out,
                "{}: {} cells; noise floor median {:.1}%, 90th percentile {:.1}%; spread between invocations median {:.1}%",
                b.board,
                b.cells.len(),
                q(&floors, 0.5) * 100.0,
                q(&floors, 0.9) * 100.0,
                q(&spreads, 0.5) * 100.0
            );
            let detectable = detectable_change(
                q(&spreads, 0.5),
                invocations,
                self.threshold.max(q(&floors, 0.5)),
                self.fdr,
                b.cells.len(),
            );
            let _ = writeln!(
                out,
                "{}: smallest change found with 90% power at {invocations} invocations a side, alone among {} cells: {:.1}% (median cell)",
                b.board,
                b.cells.len(),
                detectable * 100.0
            );
        }
        for path in &self.written {
            let _ = writeln!(out, "noise floors written to {}", path.display());
        }
        out
    }
}

/// The smallest slowdown (relative) a cell with spread `spread` between
/// invocations (log sd) is found with 90% power at `invocations` a side,
/// when it is the only change among `cells` (Benjamini-Hochberg at `fdr`
/// then asks p <= fdr / cells of the one-sided test against `margin`).
pub fn detectable_change(
    spread: f64,
    invocations: usize,
    margin: f64,
    fdr: f64,
    cells: usize,
) -> f64 {
    let n = invocations.max(2) as f64;
    let df = 2.0 * n - 2.0;
    let se = spread * (2.0 / n).sqrt();
    let alpha = fdr / cells.max(1) as f64;
    let z = student_t_quantile(1.0 - alpha, df) + student_t_quantile(0.9, df);
    ((1.0 + margin).ln() + z * se).exp() - 1.0
}

/// A new folder for one noise measurement's runs:
/// `<results_root>/noise/<UTC time>/`, outside the nightly history.
pub fn new_session_dir(results_root: &Path) -> PathBuf {
    let stamp = wire::utc_now_rfc3339().replace([':', '-'], "");
    results_root.join(NOISE_DIR).join(stamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detectable_change_grows_with_spread_and_shrinks_with_invocations() {
        let quiet = detectable_change(0.01, 10, 0.05, 0.05, 100);
        let noisy = detectable_change(0.05, 10, 0.05, 0.05, 100);
        let more = detectable_change(0.05, 30, 0.05, 0.05, 100);
        assert!(
            quiet > 0.05 && quiet < noisy && more < noisy,
            "{quiet} {noisy} {more}"
        );
    }

    #[test]
    fn a_floor_holds_only_for_the_board_and_build_it_was_measured_on() {
        let a = BoardState {
            agent_build: "a".into(),
            cpu_model: "Cortex-A76".into(),
            kernel: "6.6".into(),
            governor: Some("performance".into()),
            cpu_max_freq_mhz: Some(2400.0),
        };
        assert!(a.differences(&a.clone()).is_empty());
        let changed = BoardState {
            governor: Some("ondemand".into()),
            agent_build: "b".into(),
            ..a.clone()
        };
        let d = a.differences(&changed).join("; ");
        assert!(d.contains("governor") && d.contains("agent a -> b"), "{d}");
    }
}
