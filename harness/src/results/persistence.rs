//! Suspect or confirmed: a nightly alert is a regression seen twice.
//!
//! A comparison of `base` and `new` flags regressions that one
//! measurement showed (suspects: a bad night, a placement the statistics
//! could not see). The second look judges the run before the base
//! (`earlier`) against both: a cell regressed against `earlier` in the base
//! run *and* still in the new one is confirmed. On a nightly that is the
//! next night (a step at night N is a suspect at N and confirmed at N+1);
//! in one session it is a re-measure (run the matrix again right after a
//! suspect, then `compare previous latest`: earlier = last night, base =
//! the first run, new = the re-measure). Quality regressions need no
//! second look (their columns are deterministic for a build).

use crate::results::compare::{
    compare, CellComparison, CompareError, CompareSettings, Comparison, ConfirmedRegression,
    Persistence, Verdict,
};
use crate::results::history::{History, HistoryError};
use crate::results::run_dir::{RunData, RunDirError};
use thiserror::Error;
use wire::rows::CellKey;

#[derive(Debug, Error)]
pub enum PersistenceError {
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    #[error(transparent)]
    Compare(#[from] CompareError),
}

/// Which run the second look judges against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfirmAgainst {
    /// The latest run before the base measured on the same boards.
    PreviousOfBase,
    /// No second look: every timing regression stays a suspect.
    Nothing,
    /// A run reference as `compare` takes it (directory, `previous`, commit).
    Run(String),
}

impl ConfirmAgainst {
    /// `auto`, `none`, or a run reference.
    pub fn parse(text: &str) -> ConfirmAgainst {
        match text {
            "auto" => ConfirmAgainst::PreviousOfBase,
            "none" => ConfirmAgainst::Nothing,
            other => ConfirmAgainst::Run(other.to_string()),
        }
    }
}

/// `base` against `new` with `settings`, then the second look at its
/// regressions against the run `against` names.
pub fn compare_and_confirm(
    history: &History,
    base: &RunData,
    new: &RunData,
    settings: &CompareSettings,
    against: &ConfirmAgainst,
) -> Result<Comparison, PersistenceError> {
    let mut comparison = compare(base, new, settings)?;
    let earlier = match against {
        ConfirmAgainst::Nothing => {
            comparison.confirmation.rule =
                "no second look asked for (--confirm-against none): every timing regression is a suspect"
                    .into();
            return Ok(comparison);
        }
        ConfirmAgainst::Run(reference) => Some(history.resolve(reference)?),
        // The history names a run by its directory.
        ConfirmAgainst::PreviousOfBase => history
            .previous_of_same_boards(&run_name(base))?
            .map(|run| run.dir),
    };
    let Some(earlier) = earlier else {
        comparison.confirmation.rule = format!(
            "no run of these boards before {} to confirm against: every timing regression is a suspect until the next run (or a re-measure) shows it again",
            run_name(base)
        );
        return Ok(comparison);
    };
    let earlier = RunData::load(&earlier)?;
    confirm(&mut comparison, &earlier, base, new, settings);
    Ok(comparison)
}

fn run_name(run: &RunData) -> String {
    run.dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| run.manifest.run_id.clone())
}

/// Fills `comparison.confirmation`: the cells regressed against `earlier`
/// in both `base` and `new`.
pub fn confirm(
    comparison: &mut Comparison,
    earlier: &RunData,
    base: &RunData,
    new: &RunData,
    settings: &CompareSettings,
) {
    let earlier_id = run_name(earlier);
    let (first, second) = match (
        compare(earlier, base, settings),
        compare(earlier, new, settings),
    ) {
        (Ok(first), Ok(second)) => (first, second),
        _ => {
            comparison.confirmation.against = Some(earlier_id.clone());
            comparison.confirmation.rule = format!(
                "{earlier_id} has no measured cell in common with both runs: every timing regression is a suspect"
            );
            return;
        }
    };
    let regressed_in_first: std::collections::BTreeSet<CellKey> = first
        .cells
        .iter()
        .filter(|c| c.verdict == Verdict::Regressed)
        .map(key_of)
        .collect();
    let confirmed: Vec<ConfirmedRegression> = second
        .cells
        .iter()
        .filter(|c| c.verdict == Verdict::Regressed)
        .filter(|c| regressed_in_first.contains(&key_of(c)))
        .map(|c| ConfirmedRegression {
            board: c.board.clone(),
            kind: c.kind.clone(),
            cell: c.cell.clone(),
            settings: c.settings.clone(),
            first_seen: run_name(base),
            ratio: c.ratio,
            ci_low: c.ci_low,
            ci_high: c.ci_high,
            ci_level: c.ci_level,
        })
        .collect();
    comparison.confirmation.against = Some(earlier_id.clone());
    comparison.confirmation.rule = format!(
        "a timing regression is confirmed when {earlier_id} (the run before the base) judged against the base ({}) and against the new run ({}) finds it in both; {} confirmed, the rest of the regressions are suspects",
        first.verdict_counts_short(),
        second.verdict_counts_short(),
        confirmed.len()
    );
    comparison.confirmation.confirmed = confirmed;
    let confirmed_keys: std::collections::BTreeSet<CellKey> = comparison
        .confirmation
        .confirmed
        .iter()
        .map(|r| CellKey {
            board: r.board.clone(),
            kind: r.kind.clone(),
            cell_id: r.cell.clone(),
            settings: r.settings.clone(),
        })
        .collect();
    for c in &mut comparison.cells {
        if c.verdict == Verdict::Regressed && confirmed_keys.contains(&key_of(c)) {
            c.persistence = Some(Persistence::Confirmed);
        }
    }
}

/// The key a cell of a comparison was judged under.
fn key_of(c: &CellComparison) -> CellKey {
    CellKey {
        board: c.board.clone(),
        kind: c.kind.clone(),
        cell_id: c.cell.clone(),
        settings: c.settings.clone(),
    }
}
