//! Reading a finished (or interrupted) run directory back: its manifest,
//! rows of every kind, raw repetitions, boards' probes and layer
//! importance. Rendering, comparing and the history all read runs here.

use crate::runs::jobs::model::IMPORTANCE_FILE;
use crate::runs::manifest::RunManifest;
use crate::runs::recipes::LayerImportance;
use crate::runs::session::board_dir;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;
use wire::files::{
    read_csv, read_json, ResultsError, KERNEL_ROWS_FILE, MANIFEST_FILE, MODEL_ROWS_FILE,
    PROBE_FILE, SAMPLES_FILE,
};
use wire::kernel_job::split_build;
use wire::probe::BoardProbe;
use wire::rows::{KernelRow, ModelRow, SampleRow};

#[derive(Debug, Error)]
pub enum RunDirError {
    #[error("{0} is not a run directory (no {MANIFEST_FILE}, or neither {KERNEL_ROWS_FILE} nor {MODEL_ROWS_FILE}); pass a folder under results/")]
    NotARunDir(PathBuf),
    #[error(transparent)]
    Results(#[from] ResultsError),
    #[error("{run}: no build `{build}` was measured in this run (builds: {known}); `<run>@<build>` picks one build of an A/B run made by `cargo xtask ab`")]
    NoSuchBuild {
        run: PathBuf,
        build: String,
        known: String,
    },
}

/// (board, cell id).
pub type BoardCell = (String, String);
/// Repetitions (ns) by (board, cell id), grouped by invocation.
pub type InvocationsByCell = BTreeMap<BoardCell, Vec<Vec<f64>>>;
/// Each board's round effects (log factors by round).
pub type RoundEffects = BTreeMap<String, BTreeMap<u32, f64>>;

/// What a board was during a run: a run-to-run noise floor holds only
/// for the same (a changed agent build, CPU, kernel, governor or maximum
/// clock starts a new one).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BoardState {
    pub agent_build: String,
    pub cpu_model: String,
    pub kernel: String,
    pub governor: Option<String>,
    pub cpu_max_freq_mhz: Option<f64>,
}

impl BoardState {
    pub fn of(probe: Option<&BoardProbe>, agent_build: &str) -> BoardState {
        BoardState {
            agent_build: agent_build.to_string(),
            cpu_model: probe.map(|p| p.cpu_model.clone()).unwrap_or_default(),
            kernel: probe.map(|p| p.kernel.clone()).unwrap_or_default(),
            governor: probe.and_then(|p| p.cpufreq_governor.clone()),
            cpu_max_freq_mhz: probe.and_then(|p| p.cpu_max_freq_mhz),
        }
    }

    /// What differs from `other`, in words; empty when the same.
    pub fn differences(&self, other: &BoardState) -> Vec<String> {
        let mut out = Vec::new();
        if self.agent_build != other.agent_build {
            out.push(format!(
                "agent {} -> {}",
                self.agent_build, other.agent_build
            ));
        }
        if self.cpu_model != other.cpu_model {
            out.push(format!("CPU {} -> {}", self.cpu_model, other.cpu_model));
        }
        if self.kernel != other.kernel {
            out.push(format!("kernel {} -> {}", self.kernel, other.kernel));
        }
        if self.governor != other.governor {
            out.push(format!(
                "governor {:?} -> {:?}",
                self.governor, other.governor
            ));
        }
        if self.cpu_max_freq_mhz != other.cpu_max_freq_mhz {
            out.push(format!(
                "max clock {:?} -> {:?} MHz",
                self.cpu_max_freq_mhz, other.cpu_max_freq_mhz
            ));
        }
        out
    }
}

/// Everything a run directory holds.
pub struct RunData {
    pub dir: PathBuf,
    pub manifest: RunManifest,
    pub kernel_rows: Vec<KernelRow>,
    pub model_rows: Vec<ModelRow>,
    pub samples: Vec<SampleRow>,
    /// Sustained decodes (`sustained.csv`), where a model matrix asked.
    pub sustained: Vec<wire::rows::SustainRow>,
    pub importance: Vec<LayerImportance>,
    /// Each board's probe, where the run kept one.
    pub probes: BTreeMap<String, BoardProbe>,
    /// The build this is one side of, for a side of an A/B run.
    pub side: Option<String>,
}

impl RunData {
    pub fn load(run_dir: &Path) -> Result<RunData, RunDirError> {
        let manifest_path = run_dir.join(MANIFEST_FILE);
        let kernels = run_dir.join(KERNEL_ROWS_FILE);
        let models = run_dir.join(MODEL_ROWS_FILE);
        if !manifest_path.exists() || !(kernels.exists() || models.exists()) {
            return Err(RunDirError::NotARunDir(run_dir.to_path_buf()));
        }
        let manifest: RunManifest = read_json(&manifest_path)?;
        let probes = manifest
            .boards
            .iter()
            .filter_map(|b| {
                let probe = read_json(&board_dir(run_dir, &b.board).join(PROBE_FILE)).ok()?;
                Some((b.board.clone(), probe))
            })
            .collect();
        Ok(RunData {
            dir: run_dir.to_path_buf(),
            kernel_rows: read_if_present(&kernels)?,
            model_rows: read_if_present(&models)?,
            samples: read_if_present(&run_dir.join(SAMPLES_FILE))?,
            sustained: read_if_present(&run_dir.join(wire::files::SUSTAINED_FILE))?,
            importance: {
                let path = run_dir.join(IMPORTANCE_FILE);
                if path.exists() {
                    read_json(&path)?
                } else {
                    Vec::new()
                }
            },
            probes,
            manifest,
            side: None,
        })
    }

    /// The builds an A/B run measured (`<cell>@<build>` cell ids), in the
    /// order of its run.json; empty for a run of one build.
    pub fn measured_builds(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for record in &self.manifest.versions.agent_builds {
            if !names.contains(&record.build) {
                names.push(record.build.clone());
            }
        }
        let measured = |name: &String| {
            self.kernel_rows
                .iter()
                .any(|r| split_build(&r.cell_id).1 == Some(name.as_str()))
                || self.model_rows.iter().any(|r| r.build == *name)
        };
        names.retain(measured);
        names
    }

    /// One build's side of an A/B run, as if it were a run of its own: its
    /// rows and repetitions with `@<build>` taken off the cell ids, so
    /// `compare` judges one build against the other cell by cell.
    pub fn build_side(&self, build: &str) -> Result<RunData, RunDirError> {
        let builds = self.measured_builds();
        if !builds.iter().any(|b| b == build) {
            return Err(RunDirError::NoSuchBuild {
                run: self.dir.clone(),
                build: build.to_string(),
                known: if builds.is_empty() {
                    "none: it is not an A/B run".into()
                } else {
                    builds.join(", ")
                },
            });
        }
        let mine = |id: &str| match split_build(id) {
            (cell, Some(b)) if b == build => Some(cell.to_string()),
            _ => None,
        };
        let mut manifest = self.manifest.clone();
        manifest.versions.agent_builds.retain(|b| b.build == build);
        Ok(RunData {
            dir: self.dir.clone(),
            manifest,
            kernel_rows: self
                .kernel_rows
                .iter()
                .filter_map(|r| {
                    let cell_id = mine(&r.cell_id)?;
                    Some(KernelRow {
                        cell_id,
                        ..r.clone()
                    })
                })
                .collect(),
            model_rows: self
                .model_rows
                .iter()
                .filter(|r| r.build == build)
                .map(|r| ModelRow {
                    build: String::new(),
                    ..r.clone()
                })
                .collect(),
            samples: self
                .samples
                .iter()
                .filter_map(|s| {
                    let cell_id = mine(&s.cell_id)?;
                    Some(SampleRow {
                        cell_id,
                        ..s.clone()
                    })
                })
                .collect(),
            sustained: self
                .sustained
                .iter()
                .filter(|r| r.build == build)
                .cloned()
                .collect(),
            importance: self.importance.clone(),
            probes: self.probes.clone(),
            side: Some(build.to_string()),
        })
    }

    /// Adds a later session's measurements of the same cells (the same
    /// builds measured again) to this run's: its repetitions become
    /// further invocations and rounds of each cell, numbered after this
    /// run's own, so statistics over invocations judge one longer run
    /// (a second session judged alone is as likely to be noisy as the
    /// first, and its evidence would be thrown away with it). A cell this
    /// run lacks takes the later row; a cell both have keeps this run's
    /// row, flagged disturbed, throttled or unsettled when either was.
    pub fn pool(&mut self, later: &RunData) {
        let mut next: BTreeMap<BoardCell, (u32, u32)> = BTreeMap::new();
        for s in &self.samples {
            let (invocation, round) = next
                .entry((s.board.clone(), s.cell_id.clone()))
                .or_default();
            *invocation = (*invocation).max(s.invocation + 1);
            *round = (*round).max(s.round + 1);
        }
        // Rounds are shared by the cells of a board: the later session's
        // round r becomes one after every round this run used there.
        let mut board_rounds: BTreeMap<&str, u32> = BTreeMap::new();
        for ((board, _), (_, round)) in &next {
            let r = board_rounds.entry(board.as_str()).or_default();
            *r = (*r).max(*round);
        }
        let board_rounds: BTreeMap<String, u32> = board_rounds
            .into_iter()
            .map(|(b, r)| (b.to_string(), r))
            .collect();
        for s in &later.samples {
            let key = (s.board.clone(), s.cell_id.clone());
            let first_invocation = next.get(&key).map_or(0, |n| n.0);
            self.samples.push(SampleRow {
                invocation: first_invocation + s.invocation,
                round: board_rounds.get(&s.board).copied().unwrap_or(0) + s.round,
                ..s.clone()
            });
        }
        for row in &later.kernel_rows {
            match self
                .kernel_rows
                .iter_mut()
                .find(|r| r.board == row.board && r.cell_id == row.cell_id)
            {
                Some(mine) => {
                    mine.disturbed |= row.disturbed;
                    mine.thermal_noisy |= row.thermal_noisy;
                    mine.settled &= row.settled;
                }
                None => self.kernel_rows.push(row.clone()),
            }
        }
        for row in &later.model_rows {
            let id = row.cell_id();
            match self
                .model_rows
                .iter_mut()
                .find(|r| r.board == row.board && r.build == row.build && r.cell_id() == id)
            {
                Some(mine) => mine.thermal_noisy |= row.thermal_noisy,
                None => self.model_rows.push(row.clone()),
            }
        }
    }

    /// The run's name as a comparison shows it: its id, `@<build>` for
    /// one side of an A/B run.
    pub fn label(&self) -> String {
        match &self.side {
            Some(build) => format!("{}@{build}", self.manifest.run_id),
            None => self.manifest.run_id.clone(),
        }
    }

    /// Loads `<run dir>` or, for `<run dir>@<build>`, that build's side of
    /// an A/B run.
    pub fn load_side(run_dir: &Path, build: Option<&str>) -> Result<RunData, RunDirError> {
        let run = RunData::load(run_dir)?;
        match build {
            Some(build) => run.build_side(build),
            None => Ok(run),
        }
    }

    /// As [`RunData::invocations_by_cell`], with each board's round
    /// effects (`wire::stats::round_effects`) divided out of its
    /// repetitions; returns the effects per board (empty where a board's
    /// rounds hold too few cells, or the run has one invocation a cell).
    pub fn round_adjusted_invocations(&self) -> (InvocationsByCell, RoundEffects) {
        // (board, cell) -> invocation -> (round, repetitions)
        let mut grouped: BTreeMap<BoardCell, BTreeMap<u32, (u32, Vec<f64>)>> = BTreeMap::new();
        for s in &self.samples {
            grouped
                .entry((s.board.clone(), s.cell_id.clone()))
                .or_default()
                .entry(s.invocation)
                .or_insert_with(|| (s.round, Vec::new()))
                .1
                .push(s.ns as f64);
        }
        let mut tables: BTreeMap<String, Vec<(usize, u32, f64)>> = BTreeMap::new();
        for (index, ((board, _), invocations)) in grouped.iter().enumerate() {
            for (round, reps) in invocations.values() {
                if let Some(m) = wire::stats::Summary::of(reps).map(|s| s.median) {
                    if m > 0.0 {
                        tables
                            .entry(board.clone())
                            .or_default()
                            .push((index, *round, m.ln()));
                    }
                }
            }
        }
        let effects: RoundEffects = tables
            .into_iter()
            .map(|(board, table)| (board, wire::stats::round_effects(&table)))
            .collect();
        let adjusted = grouped
            .into_iter()
            .map(|((board, cell), invocations)| {
                let board_effects = effects.get(&board);
                let groups = invocations
                    .into_values()
                    .map(|(round, reps)| {
                        let factor = board_effects
                            .and_then(|e| e.get(&round))
                            .map_or(1.0, |e| (-e).exp());
                        reps.into_iter().map(|ns| ns * factor).collect()
                    })
                    .collect();
                ((board, cell), groups)
            })
            .collect();
        (adjusted, effects)
    }

    /// Boards that have rows in this run.
    pub fn boards(&self) -> std::collections::BTreeSet<&str> {
        self.kernel_rows
            .iter()
            .map(|r| r.board.as_str())
            .chain(self.model_rows.iter().map(|r| r.board.as_str()))
            .collect()
    }

    /// What `board` was in this run: its probe and the agent build of its
    /// rows.
    pub fn board_state(&self, board: &str) -> BoardState {
        let build = self
            .kernel_rows
            .iter()
            .filter(|r| r.board == board)
            .map(|r| r.agent_build.as_str())
            .chain(
                self.model_rows
                    .iter()
                    .filter(|r| r.board == board)
                    .map(|r| r.agent_build.as_str()),
            )
            .find(|b| !b.is_empty())
            .unwrap_or_default();
        BoardState::of(self.probes.get(board), build)
    }

    /// Raw repetitions (ns) by (board, cell id), grouped by the
    /// invocation (agent process) that measured them, in invocation order.
    /// A run from before invocations has one group per cell.
    pub fn invocations_by_cell(&self) -> InvocationsByCell {
        let mut grouped: BTreeMap<BoardCell, BTreeMap<u32, Vec<f64>>> = BTreeMap::new();
        for s in &self.samples {
            grouped
                .entry((s.board.clone(), s.cell_id.clone()))
                .or_default()
                .entry(s.invocation)
                .or_default()
                .push(s.ns as f64);
        }
        grouped
            .into_iter()
            .map(|(key, by_invocation)| (key, by_invocation.into_values().collect()))
            .collect()
    }
}

fn read_if_present<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, ResultsError> {
    if path.exists() {
        read_csv(path)
    } else {
        Ok(Vec::new())
    }
}

/// Run directories under `results_root` (those with a manifest), oldest
/// first: run ids start with their UTC start time.
pub fn list_runs(results_root: &Path) -> Vec<PathBuf> {
    let mut runs: Vec<PathBuf> = std::fs::read_dir(results_root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join(MANIFEST_FILE).is_file())
        .collect();
    runs.sort();
    runs
}
