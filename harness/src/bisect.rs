//! Bisect: the first commit of a llama.cpp checkout, or of this
//! repository (our own kernels and agent), that made one kernel cell or
//! model test slower. Each step is an A/B session (`pipeline::run_bench` with
//! several builds) on the target: the nearest known-good commit, the
//! midpoint and the nearest known-bad commit measured in the same shuffled
//! rounds, the midpoint judged against both with `compare`'s statistics. A step that cannot decide
//! (inconclusive, noisy, disturbed) is measured again, up to `attempts`;
//! a midpoint slower than both ends, or faster than the good one, makes
//! the range not monotonic, and that is the answer.
//!
//! Every revision of the checkout is built in the same crate copy and
//! cargo folders (`llama_source`: one folder per source location, files
//! rewritten only where they differ; `quantbench_revision`: one export
//! folder for this repository's commits), so a step after a small change
//! is an incremental build; each step's run is a run directory of its
//! own, in the history like any other.

use crate::builds::llama_source::{BuildSpec, LlamaSource};
use crate::pipeline::run_bench;
use crate::results::compare::{compare, CompareSettings, Verdict};
use crate::results::run_dir::RunData;
use crate::runs::session::SessionOptions;
use std::path::{Path, PathBuf};
use std::process::Command;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BisectError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Bench(#[from] crate::pipeline::BenchError),
    #[error(transparent)]
    RunDir(#[from] crate::results::run_dir::RunDirError),
    #[error(transparent)]
    Compare(#[from] crate::results::compare::CompareError),
}

/// What to bisect and where.
pub struct BisectOptions {
    /// Target, matrix, config and results as for `bench`; its builds are
    /// set by each step.
    pub session: SessionOptions,
    pub over: BisectOver,
    pub good: String,
    pub bad: String,
    /// The kernel cell, as its id (`<shape>/<type>/n<batch>/t<threads>`),
    /// or a model test (`<model file>/<recipe>/<pp|tg><N>/t<threads>`).
    pub cell: String,
    /// Sessions a step may take before it is called inconclusive.
    pub attempts: u32,
}

/// Whose commits are bisected.
#[derive(Debug, Clone)]
pub enum BisectOver {
    /// A llama.cpp checkout's, built with this repository's working tree.
    Llama(PathBuf),
    /// This repository's (the workspace), built with the default
    /// llama.cpp; each commit must speak the host's job format.
    Quantbench(PathBuf),
}

impl BisectOver {
    fn repository(&self) -> &Path {
        match self {
            BisectOver::Llama(path) | BisectOver::Quantbench(path) => path,
        }
    }

    /// The build of `commit`.
    fn build(&self, commit: &str) -> BuildSpec {
        match self {
            BisectOver::Llama(path) => BuildSpec {
                llama: LlamaSource::Checkout {
                    path: path.clone(),
                    rev: Some(commit.to_string()),
                },
                ..BuildSpec::default()
            },
            BisectOver::Quantbench(_) => BuildSpec {
                quantbench: Some(commit.to_string()),
                ..BuildSpec::default()
            },
        }
    }
}

/// One commit of the range.
#[derive(Debug, Clone)]
pub struct Commit {
    pub hash: String,
    pub subject: String,
}

impl Commit {
    pub fn short(&self) -> &str {
        &self.hash[..self.hash.len().min(10)]
    }
}

/// What one session found about one build against another.
#[derive(Debug, Clone)]
pub struct Judged {
    pub verdict: Verdict,
    /// `+15.2% [+11.0%, +20.1%]`, or what kept it from a figure.
    pub change: String,
}

/// One measured step: the commit, how it compared, what was decided.
#[derive(Debug, Clone)]
pub struct Step {
    pub commit: Commit,
    pub run_dir: PathBuf,
    pub versus_good: Judged,
    /// The bad end against this commit (absent for the first step, which
    /// measures the bad end itself against the good one).
    pub bad_versus_it: Option<Judged>,
    pub decision: String,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    FirstBad(Commit),
    /// The bad end is not slower than the good one for this cell.
    NoRegression(Judged),
    /// A midpoint slower than both ends (or faster than the good end).
    NotMonotonic(Commit),
    /// A step stayed undecided after every attempt: the first bad commit
    /// is in the range after `good` up to `bad`.
    Inconclusive {
        good: Commit,
        bad: Commit,
    },
}

pub struct Report {
    pub outcome: Outcome,
    pub steps: Vec<Step>,
    /// Commits in the range (after good, up to and including bad).
    pub range: usize,
}

impl Report {
    /// The answer in one line.
    pub fn verdict_line(&self, cell: &str) -> String {
        match &self.outcome {
            Outcome::FirstBad(c) => format!(
                "first bad commit for {cell}: {} {} ({} steps over {} commits)",
                c.short(),
                c.subject,
                self.steps.len(),
                self.range
            ),
            Outcome::NoRegression(j) => format!(
                "no regression of {cell} between the ends to bisect: bad against good is {} {}",
                j.verdict.name(),
                j.change
            ),
            Outcome::NotMonotonic(c) => format!(
                "the range is not monotonic for {cell}: {} {} is slower than both ends or faster than the good one, so no single commit explains it (see the steps)",
                c.short(),
                c.subject
            ),
            Outcome::Inconclusive { good, bad } => format!(
                "inconclusive for {cell}: the first bad commit is after {} and at or before {}; measure with more invocations or on a quieter board",
                good.short(),
                bad.short()
            ),
        }
    }

    /// One line per step: the evidence.
    pub fn step_lines(&self) -> Vec<String> {
        self.steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let bad = s
                    .bad_versus_it
                    .as_ref()
                    .map(|j| format!("; bad against it {} {}", j.verdict.name(), j.change))
                    .unwrap_or_default();
                format!(
                    "step {}: {} {}: against good {} {}{bad} -> {} ({})",
                    i + 1,
                    s.commit.short(),
                    s.commit.subject,
                    s.versus_good.verdict.name(),
                    s.versus_good.change,
                    s.decision,
                    s.run_dir.display()
                )
            })
            .collect()
    }
}

fn git(repo: &Path, args: &[&str]) -> Result<String, BisectError> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .map_err(|e| BisectError::Input(format!("could not run git: {e}")))?;
    if !out.status.success() {
        return Err(BisectError::Input(format!(
            "git {} in {}: {}",
            args.join(" "),
            repo.display(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or("failed")
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn commit(repo: &Path, rev: &str) -> Result<Commit, BisectError> {
    if rev.starts_with('-') {
        return Err(BisectError::Input(format!("`{rev}` is not a git revision")));
    }
    let hash = git(
        repo,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{rev}^{{commit}}"),
        ],
    )
    .map_err(|_| {
        BisectError::Input(format!(
            "{} has no revision `{rev}`; check it with `git -C {} log --oneline`",
            repo.display(),
            repo.display()
        ))
    })?;
    let subject = git(repo, &["log", "-1", "--format=%s", &hash])?;
    Ok(Commit { hash, subject })
}

/// The commits after `good` up to and including `bad`, oldest first
/// (first-parent history, as `git bisect --first-parent`).
pub fn range(repo: &Path, good: &Commit, bad: &Commit) -> Result<Vec<Commit>, BisectError> {
    let ancestor = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["merge-base", "--is-ancestor", &good.hash, &bad.hash])
        .status()
        .map_err(|e| BisectError::Input(format!("could not run git: {e}")))?;
    if !ancestor.success() {
        return Err(BisectError::Input(format!(
            "--good {} is not an ancestor of --bad {}: give the older, fast revision as --good",
            good.short(),
            bad.short()
        )));
    }
    let listed = git(
        repo,
        &[
            "rev-list",
            "--reverse",
            "--first-parent",
            &format!("{}..{}", good.hash, bad.hash),
        ],
    )?;
    let commits = listed
        .lines()
        .map(|hash| commit(repo, hash))
        .collect::<Result<Vec<_>, _>>()?;
    if commits.is_empty() {
        return Err(BisectError::Input(format!(
            "--good {} and --bad {} are the same commit: nothing to bisect",
            good.short(),
            bad.short()
        )));
    }
    Ok(commits)
}

/// What one step's verdicts say about its commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// The first step: the bad end is slower than the good one.
    Regression,
    /// The first step: it is not.
    NoRegression,
    Good,
    Bad,
    NotMonotonic,
    Undecided,
}

impl Decision {
    fn said(self) -> &'static str {
        match self {
            Decision::Regression => "the range holds a regression",
            Decision::NoRegression => "no regression to bisect",
            Decision::Good => "good",
            Decision::Bad => "bad",
            Decision::NotMonotonic => "not monotonic",
            Decision::Undecided => "undecided",
        }
    }
}

/// A midpoint is judged against both neighbours: good when it is not
/// slower than the good one and the bad one is slower than it; bad the
/// other way round; not monotonic when it is slower than both or faster
/// than the good one; otherwise undecided. (Asking for `same` against the
/// good one alone left a midpoint 3% off with a +-5% interval undecided
/// however often it was measured, while the bad end was 16% slower than
/// it: the two comparisons together decide.)
fn decide(against_good: Verdict, bad_against_it: Option<Verdict>) -> Decision {
    use Verdict::*;
    let unclear = |v: Verdict| matches!(v, Same | Inconclusive);
    match bad_against_it {
        None => match against_good {
            Regressed => Decision::Regression,
            Same | Improved => Decision::NoRegression,
            _ => Decision::Undecided,
        },
        Some(bad) => match (against_good, bad) {
            (Improved, _) | (Regressed, Improved) => Decision::NotMonotonic,
            // Slower than good, whatever comes after it (a second
            // regression later is not the first).
            (Regressed, b) if unclear(b) || b == Regressed => Decision::Bad,
            (g, Regressed) if unclear(g) => Decision::Good,
            _ => Decision::Undecided,
        },
    }
}

/// Bisects (see the module).
pub fn bisect(options: &BisectOptions) -> Result<Report, BisectError> {
    let checkout = options.over.repository();
    let good = commit(checkout, &options.good)?;
    let bad = commit(checkout, &options.bad)?;
    let commits = range(checkout, &good, &bad)?;
    let range_len = commits.len();
    // index 0: good; the last: bad.
    let mut line: Vec<Commit> = vec![good.clone()];
    line.extend(commits);
    let (mut lo, mut hi) = (0usize, line.len() - 1);
    let mut steps = Vec::new();
    let report = |outcome, steps| Report {
        outcome,
        steps,
        range: range_len,
    };

    // The ends first: is the bad end slower at all?
    let (first, decision) = measure_until_decided(options, &line[0], None, &line[hi])?;
    steps.push(first);
    match decision {
        Decision::Regression => {}
        Decision::NoRegression => {
            let judged = steps[0].versus_good.clone();
            return Ok(report(Outcome::NoRegression(judged), steps));
        }
        _ => {
            let outcome = Outcome::Inconclusive {
                good: line[0].clone(),
                bad: line[hi].clone(),
            };
            return Ok(report(outcome, steps));
        }
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        // The nearest known-good and known-bad commits beside the midpoint.
        let (step, decision) =
            measure_until_decided(options, &line[lo], Some(&line[mid]), &line[hi])?;
        steps.push(step);
        match decision {
            Decision::Bad => hi = mid,
            Decision::Good => lo = mid,
            Decision::NotMonotonic => {
                return Ok(report(Outcome::NotMonotonic(line[mid].clone()), steps));
            }
            _ => {
                let outcome = Outcome::Inconclusive {
                    good: line[lo].clone(),
                    bad: line[hi].clone(),
                };
                return Ok(report(outcome, steps));
            }
        }
    }
    Ok(report(Outcome::FirstBad(line[hi].clone()), steps))
}

/// Measures `good`, `mid` (when given) and `bad` in one session, again
/// while the step is undecided, up to `attempts` sessions.
fn measure_until_decided(
    options: &BisectOptions,
    good: &Commit,
    mid: Option<&Commit>,
    bad: &Commit,
) -> Result<(Step, Decision), BisectError> {
    let mut attempt = 1;
    loop {
        let mut step = measure(options, good, mid, bad)?;
        let decision = decide(
            step.versus_good.verdict,
            step.bad_versus_it.as_ref().map(|j| j.verdict),
        );
        step.decision = decision.said().to_string();
        if decision != Decision::Undecided || attempt >= options.attempts.max(1) {
            return Ok((step, decision));
        }
        attempt += 1;
        eprintln!(
            "bisect: {} is undecided (against good {} {}); measuring again ({attempt}/{})",
            step.commit.short(),
            step.versus_good.verdict.name(),
            step.versus_good.change,
            options.attempts
        );
    }
}

fn build_name(role: &str, commit: &Commit) -> String {
    format!("{role}-{}", commit.short())
}

fn measure(
    options: &BisectOptions,
    good: &Commit,
    mid: Option<&Commit>,
    bad: &Commit,
) -> Result<Step, BisectError> {
    let spec = |c: &Commit| options.over.build(&c.hash);
    let good_name = build_name("good", good);
    let bad_name = build_name("bad", bad);
    let mut session = options.session.clone();
    session.build = good_name.clone();
    session.defined_builds = [
        (good_name.clone(), spec(good)),
        (bad_name.clone(), spec(bad)),
    ]
    .into_iter()
    .collect();
    session.versus = Vec::new();
    let mid_name = mid.map(|m| build_name("mid", m));
    if let (Some(name), Some(m)) = (&mid_name, mid) {
        session.defined_builds.insert(name.clone(), spec(m));
        session.versus.push(name.clone());
    }
    session.versus.push(bad_name.clone());
    session.only_cells = vec![options.cell.clone()];
    let report = run_bench(&session)?;
    let run = RunData::load(&report.run_dir)?;
    let judge = |base: &str, new: &str| -> Result<Judged, BisectError> {
        let comparison = compare(
            &run.build_side(base)?,
            &run.build_side(new)?,
            &CompareSettings::default(),
        )?;
        let cell = comparison.cells.iter().find(|c| c.cell == options.cell);
        Ok(match cell {
            Some(c) => Judged {
                verdict: c.verdict,
                change: match (c.ratio, c.ci_low, c.ci_high) {
                    (Some(r), Some(lo), Some(hi)) => format!(
                        "{:+.1}% [{:+.1}%, {:+.1}%]",
                        (r - 1.0) * 100.0,
                        (lo - 1.0) * 100.0,
                        (hi - 1.0) * 100.0
                    ),
                    _ => c.notes.join("; "),
                },
            },
            None => Judged {
                verdict: Verdict::NotComparable,
                change: "the cell has no rows on one side (see the run's summary)".into(),
            },
        })
    };
    let (commit, versus_good, bad_versus_it) = match &mid_name {
        Some(name) => (
            mid.cloned().unwrap_or_else(|| bad.clone()),
            judge(&good_name, name)?,
            Some(judge(name, &bad_name)?),
        ),
        None => (bad.clone(), judge(&good_name, &bad_name)?, None),
    };
    Ok(Step {
        commit,
        run_dir: report.run_dir,
        versus_good,
        bad_versus_it,
        decision: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Verdict::*;

    #[test]
    fn a_midpoint_is_judged_against_both_neighbours() {
        assert_eq!(decide(Regressed, None), Decision::Regression);
        assert_eq!(decide(Same, None), Decision::NoRegression);
        assert_eq!(decide(Inconclusive, None), Decision::Undecided);
        assert_eq!(decide(Inconclusive, Some(Regressed)), Decision::Good);
        assert_eq!(decide(Same, Some(Regressed)), Decision::Good);
        assert_eq!(decide(Regressed, Some(Same)), Decision::Bad);
        assert_eq!(decide(Regressed, Some(Inconclusive)), Decision::Bad);
        assert_eq!(decide(Regressed, Some(Improved)), Decision::NotMonotonic);
        assert_eq!(decide(Improved, Some(Regressed)), Decision::NotMonotonic);
        assert_eq!(
            decide(Inconclusive, Some(Inconclusive)),
            Decision::Undecided
        );
        assert_eq!(decide(Regressed, Some(Regressed)), Decision::Bad);
        assert_eq!(decide(Same, Some(Same)), Decision::Undecided);
        assert_eq!(decide(Noisy, Some(Regressed)), Decision::Undecided);
    }
}
