//! How long results and the host's recipe cache are kept: `cargo xtask
//! prune`.
//!
//! A run directory is removed only when nothing still needs it. It is kept
//! when any of these holds, and the reason is printed:
//! - it is one of the newest `keep_runs` runs of its series (same matrices,
//!   same target): what `compare previous latest` and its second look (the
//!   run before the base) read;
//! - it started within `keep_days`;
//! - a history noise floor is made from it: for every board and board
//!   state (agent build, CPU, kernel, governor, clock), the newest
//!   `HISTORY_FLOOR_RUNS` + 1 runs (the judged run and the runs before it
//!   that make its floor);
//! - it is pinned: its run id is a line of `<results>/keep.txt` (a
//!   baseline a lab compares against);
//! - a process still owns it (a run in progress, or being resumed).
//!
//! Noise runs (`<results>/noise/`) and the floors measured from them are
//! never touched. In the recipe cache (`target/quantbench-models/<model
//! hash>/`), a model's folder goes when it was not used for
//! `models_unused_days` and the config does not name the model. Builds of
//! other llama.cpp sources (a crate copy in `target/llama-sources/`, its
//! cargo folders in `target/builds/`, each some hundreds of MB) and kept
//! agents (`target/agents/<hash>/`) go when unused for
//! `builds_unused_days`.

use crate::results::history::{History, HistoryError};
use crate::results::noise::HISTORY_FLOOR_RUNS;
use crate::results::run_dir::BoardState;
use crate::runs::run_owner::RunOwner;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// (start time, run id).
type StartedRun = (String, String);

/// The file listing pinned run ids, one per line (`#` starts a comment).
pub const PINNED_FILE: &str = "keep.txt";

#[derive(Debug, Error)]
pub enum RetentionError {
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--keep-runs {0}: keep at least 3 runs of each series (compare reads the last two and the one before them)")]
    TooFewRuns(usize),
}

#[derive(Debug, Clone)]
pub struct RetentionPolicy {
    pub keep_runs: usize,
    pub keep_days: u64,
    pub models_unused_days: u64,
    pub builds_unused_days: u64,
    /// Say what would go, remove nothing.
    pub dry_run: bool,
}

/// What a prune decided.
#[derive(Debug, Default)]
pub struct Retention {
    /// Each removed (or, in a dry run, removable) run directory.
    pub removed_runs: Vec<PathBuf>,
    /// Each kept run with why.
    pub kept_runs: Vec<(String, Vec<String>)>,
    pub removed_models: Vec<PathBuf>,
    pub kept_models: usize,
    /// Build folders and kept agents removed.
    pub removed_builds: Vec<PathBuf>,
    pub kept_builds: usize,
    pub bytes_freed: u64,
}

impl std::fmt::Display for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} run(s) removed, {} kept; {} recipe cache folder(s) removed, {} kept; {} build folder(s) and agent(s) removed, {} kept; {:.1} MB freed",
            self.removed_runs.len(),
            self.kept_runs.len(),
            self.removed_models.len(),
            self.kept_models,
            self.removed_builds.len(),
            self.kept_builds,
            self.bytes_freed as f64 / 1e6
        )
    }
}

/// Applies `policy` to `results_root` and to the recipe cache under
/// `workspace`; `config_models` are the models the config names (their
/// cache is kept whatever its age).
pub fn prune(
    results_root: &Path,
    workspace: &Path,
    config_models: &[PathBuf],
    policy: &RetentionPolicy,
) -> Result<Retention, RetentionError> {
    if policy.keep_runs < 3 {
        return Err(RetentionError::TooFewRuns(policy.keep_runs));
    }
    let mut out = Retention::default();
    let (mut history, _) = History::open(results_root)?;
    let runs = history.runs()?;
    let mut reasons: BTreeMap<String, Vec<String>> = runs
        .iter()
        .map(|r| (r.run_id.clone(), Vec::new()))
        .collect();
    let mut keep = |run_id: &str, why: String| {
        if let Some(list) = reasons.get_mut(run_id) {
            list.push(why);
        }
    };

    // Newest first from here on.
    let mut newest_first = runs.clone();
    newest_first.reverse();
    let mut per_series: BTreeMap<(String, String), usize> = BTreeMap::new();
    for run in &newest_first {
        let n = per_series
            .entry((run.matrix.clone(), run.target.clone()))
            .or_default();
        *n += 1;
        if *n <= policy.keep_runs {
            keep(
                &run.run_id,
                format!("one of the newest {} of its series", policy.keep_runs),
            );
        }
    }
    let cutoff = chrono::Utc::now() - chrono::Duration::days(policy.keep_days as i64);
    for run in &runs {
        let started = chrono::DateTime::parse_from_rfc3339(&run.started_at)
            .map(|t| t.with_timezone(&chrono::Utc));
        match started {
            Ok(t) if t >= cutoff => keep(
                &run.run_id,
                format!("younger than {} days", policy.keep_days),
            ),
            Ok(_) => {}
            // A run whose start cannot be read is not judged by age.
            Err(_) => keep(&run.run_id, "start time unreadable".into()),
        }
    }
    let started: BTreeMap<&str, &str> = runs
        .iter()
        .map(|r| (r.run_id.as_str(), r.started_at.as_str()))
        .collect();
    // Runs grouped by board and the board's state, as the floors group them.
    let mut by_state: Vec<(String, BoardState, Vec<StartedRun>)> = Vec::new();
    for (run_id, board, state) in history.board_states()? {
        let at = started
            .get(run_id.as_str())
            .copied()
            .unwrap_or("")
            .to_string();
        match by_state
            .iter_mut()
            .find(|(b, s, _)| *b == board && s.differences(&state).is_empty())
        {
            Some((_, _, list)) => list.push((at, run_id)),
            None => by_state.push((board, state, vec![(at, run_id)])),
        }
    }
    for (board, _, mut list) in by_state {
        list.sort();
        list.reverse();
        for (_, run_id) in list.into_iter().take(HISTORY_FLOOR_RUNS + 1) {
            keep(&run_id, format!("makes the history noise floor of {board}"));
        }
    }
    let pinned = pinned_runs(results_root)?;
    for run in &runs {
        if pinned.contains(&run.run_id) {
            keep(&run.run_id, format!("pinned in {PINNED_FILE}"));
        }
    }

    for run in &runs {
        let why = reasons.remove(&run.run_id).unwrap_or_default();
        if !why.is_empty() {
            out.kept_runs.push((run.run_id.clone(), why));
            continue;
        }
        // A process that owns it (a run in progress) keeps it. A run from
        // before owner locks has no lock file; a dry run leaves it so.
        if policy.dry_run && !run.dir.join(crate::runs::run_owner::OWNER_FILE).exists() {
            out.bytes_freed += folder_bytes(&run.dir);
            out.removed_runs.push(run.dir.clone());
            continue;
        }
        let owner = match RunOwner::take(&run.dir) {
            Ok(owner) => owner,
            Err(_) => {
                out.kept_runs.push((
                    run.run_id.clone(),
                    vec!["in use by a running process".into()],
                ));
                continue;
            }
        };
        out.bytes_freed += folder_bytes(&run.dir);
        if !policy.dry_run {
            std::fs::remove_dir_all(&run.dir).map_err(|source| RetentionError::Io {
                path: run.dir.clone(),
                source,
            })?;
        }
        drop(owner);
        out.removed_runs.push(run.dir.clone());
    }
    if !policy.dry_run && !out.removed_runs.is_empty() {
        history.update()?;
    }
    prune_recipe_cache(workspace, config_models, policy, &mut out)?;
    prune_builds(workspace, policy, &mut out)?;
    Ok(out)
}

/// Build folders of other llama.cpp sources and kept agents unused for
/// `builds_unused_days` (their `last-used` stamps, see `build`).
fn prune_builds(
    workspace: &Path,
    policy: &RetentionPolicy,
    out: &mut Retention,
) -> Result<(), RetentionError> {
    let cutoff = std::time::SystemTime::now()
        - std::time::Duration::from_secs(policy.builds_unused_days * 86_400);
    let remove = |dir: &Path, out: &mut Retention| -> Result<(), RetentionError> {
        out.bytes_freed += folder_bytes(dir);
        if !policy.dry_run {
            std::fs::remove_dir_all(dir).map_err(|source| RetentionError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        out.removed_builds.push(dir.to_path_buf());
        Ok(())
    };
    let builds = workspace.join(crate::builds::build::BUILDS_DIR);
    for entry in std::fs::read_dir(&builds).into_iter().flatten().flatten() {
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        if newest_mtime(&dir).is_none_or(|t| t >= cutoff) {
            out.kept_builds += 1;
            continue;
        }
        // The crate copy goes with its cargo folders.
        let copy = workspace
            .join(crate::builds::llama_source::SOURCES_DIR)
            .join(entry.file_name());
        if copy.is_dir() {
            remove(&copy, out)?;
        }
        remove(&dir, out)?;
    }
    let agents = workspace.join(crate::builds::build::AGENTS_DIR);
    for entry in std::fs::read_dir(&agents).into_iter().flatten().flatten() {
        let dir = entry.path();
        // `built/` holds the reuse records: a record of a removed agent is
        // ignored when looked up.
        if !dir.is_dir() || entry.file_name() == "built" {
            continue;
        }
        if newest_mtime(&dir).is_none_or(|t| t >= cutoff) {
            out.kept_builds += 1;
            continue;
        }
        remove(&dir, out)?;
    }
    Ok(())
}

fn pinned_runs(results_root: &Path) -> Result<BTreeSet<String>, RetentionError> {
    let path = results_root.join(PINNED_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(source) => return Err(RetentionError::Io { path, source }),
    };
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

fn prune_recipe_cache(
    workspace: &Path,
    config_models: &[PathBuf],
    policy: &RetentionPolicy,
    out: &mut Retention,
) -> Result<(), RetentionError> {
    let cache = workspace.join(crate::runs::recipes::cache::RECIPE_CACHE_DIR);
    let named: BTreeSet<String> = config_models
        .iter()
        .filter_map(|m| wire::build_id::content_hash(m).ok())
        .collect();
    let cutoff = std::time::SystemTime::now()
        - std::time::Duration::from_secs(policy.models_unused_days * 86_400);
    let Ok(entries) = std::fs::read_dir(&cache) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        let hash = entry.file_name().to_string_lossy().into_owned();
        let last_used = newest_mtime(&dir);
        if named.contains(&hash) || last_used.is_none_or(|t| t >= cutoff) {
            out.kept_models += 1;
            continue;
        }
        out.bytes_freed += folder_bytes(&dir);
        if !policy.dry_run {
            std::fs::remove_dir_all(&dir).map_err(|source| RetentionError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        out.removed_models.push(dir);
    }
    Ok(())
}

/// The newest modification time of the files in `dir` (its `last-used`
/// stamp, rewritten on every use, among them).
fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max()
}

fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => folder_bytes(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aged(path: &Path, days: u64) {
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(days * 86_400);
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    fn used(dir: &Path, days: u64) {
        std::fs::create_dir_all(dir).unwrap();
        let stamp = dir.join(crate::builds::build::LAST_USED_FILE);
        std::fs::write(&stamp, "x").unwrap();
        aged(&stamp, days);
    }

    #[test]
    fn builds_and_agents_unused_for_the_days_go_with_their_crate_copy_and_used_ones_stay() {
        let ws = tempfile::tempdir().unwrap();
        let ws = ws.path();
        let builds = ws.join(crate::builds::build::BUILDS_DIR);
        let sources = ws.join(crate::builds::llama_source::SOURCES_DIR);
        let agents = ws.join(crate::builds::build::AGENTS_DIR);
        used(&builds.join("checkout-old"), 30);
        std::fs::create_dir_all(sources.join("checkout-old/llama.cpp")).unwrap();
        used(&builds.join("crate-new"), 1);
        std::fs::create_dir_all(sources.join("crate-new")).unwrap();
        used(&agents.join("aaaaaaaaaaaa"), 30);
        used(&agents.join("bbbbbbbbbbbb"), 2);
        used(&agents.join("built"), 300);
        let mut policy = RetentionPolicy {
            keep_runs: 30,
            keep_days: 90,
            models_unused_days: 30,
            builds_unused_days: 14,
            dry_run: true,
        };
        let mut out = Retention::default();
        prune_builds(ws, &policy, &mut out).unwrap();
        assert_eq!(out.removed_builds.len(), 3, "{:?}", out.removed_builds);
        assert!(
            sources.join("checkout-old").exists(),
            "a dry run removes nothing"
        );
        policy.dry_run = false;
        let mut out = Retention::default();
        prune_builds(ws, &policy, &mut out).unwrap();
        assert!(!builds.join("checkout-old").exists());
        assert!(!sources.join("checkout-old").exists());
        assert!(!agents.join("aaaaaaaaaaaa").exists());
        assert!(builds.join("crate-new").exists() && sources.join("crate-new").exists());
        assert!(agents.join("bbbbbbbbbbbb").exists() && agents.join("built").exists());
        assert_eq!(out.kept_builds, 2);
    }
}
