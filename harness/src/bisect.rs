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
use wire::kernel_job::split_build;

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

/// One session of a step: its run directory, and whether its
/// invocations were pooled into the step's evidence (not when the cell
/// was disturbed, throttled or unsettled in it).
#[derive(Debug, Clone)]
pub struct StepSession {
    pub run_dir: PathBuf,
    pub pooled: bool,
}

/// One measured step: the commit, how it compared, what was decided.
#[derive(Debug, Clone)]
pub struct Step {
    pub commit: Commit,
    /// Its sessions, in order (more than one when it was measured
    /// again).
    pub sessions: Vec<StepSession>,
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
                    s.sessions
                        .iter()
                        .map(|session| if session.pooled {
                            session.run_dir.display().to_string()
                        } else {
                            format!(
                                "{}, not pooled: the cell was disturbed or unsettled",
                                session.run_dir.display()
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" + ")
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
/// while the step is undecided, up to `attempts` sessions. The sessions
/// are judged together: each one adds its invocations to the step's
/// evidence (`RunData::pool`), so a step measured three times is judged
/// on three times the invocations, not on its last session alone. A
/// session in which the cell was disturbed, throttled or unsettled is not
/// pooled (its rows stay in its run directory, and the step says so).
fn measure_until_decided(
    options: &BisectOptions,
    good: &Commit,
    mid: Option<&Commit>,
    bad: &Commit,
) -> Result<(Step, Decision), BisectError> {
    let builds = StepBuilds::of(good, mid, bad);
    let mut evidence = StepEvidence::default();
    let mut attempt = 1;
    loop {
        let run = measure(options, &builds)?;
        let judged_on = evidence.add(run, &options.cell);
        let mut step = judge_step(&options.cell, &builds, judged_on)?;
        step.sessions = evidence.sessions.clone();
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
            "bisect: {} is undecided (against good {} {}); measuring again ({attempt}/{}), judged with the invocations so far",
            step.commit.short(),
            step.versus_good.verdict.name(),
            step.versus_good.change,
            options.attempts
        );
    }
}

/// What a step is judged on: its clean sessions pooled (or, while none
/// is clean, its latest session), and every session it took.
#[derive(Default)]
struct StepEvidence {
    pooled: Option<RunData>,
    sessions: Vec<StepSession>,
}

impl StepEvidence {
    /// Adds a session; returns what the step is now judged on. Clean
    /// sessions pool; a flagged one is judged only while there is nothing
    /// clean to judge, and is replaced by the first clean one.
    fn add(&mut self, run: RunData, cell: &str) -> &RunData {
        let clean = !flagged(&run, cell);
        let run_dir = run.dir.clone();
        let (evidence, pooled) = match self.pooled.take() {
            Some(mut earlier) if clean && !flagged(&earlier, cell) => {
                earlier.pool(&run);
                (earlier, true)
            }
            Some(earlier) if !clean => (earlier, false),
            _ => {
                for s in &mut self.sessions {
                    s.pooled = false;
                }
                (run, clean)
            }
        };
        self.sessions.push(StepSession { run_dir, pooled });
        self.pooled.insert(evidence)
    }
}

/// A session's cell rows that say its timings are not to be trusted.
fn flagged(run: &RunData, cell: &str) -> bool {
    run.kernel_rows.iter().any(|r| {
        split_build(&r.cell_id).0 == cell && (r.disturbed || r.thermal_noisy || !r.settled)
    }) || run
        .model_rows
        .iter()
        .any(|r| r.thermal_noisy && split_build(&r.cell_id()).0 == cell)
}

fn build_name(role: &str, commit: &Commit) -> String {
    format!("{role}-{}", commit.short())
}

/// One step's commits, each with the name its build takes in the
/// step's sessions.
struct StepBuilds<'a> {
    good: (&'a Commit, String),
    mid: Option<(&'a Commit, String)>,
    bad: (&'a Commit, String),
}

impl<'a> StepBuilds<'a> {
    fn of(good: &'a Commit, mid: Option<&'a Commit>, bad: &'a Commit) -> StepBuilds<'a> {
        StepBuilds {
            good: (good, build_name("good", good)),
            mid: mid.map(|m| (m, build_name("mid", m))),
            bad: (bad, build_name("bad", bad)),
        }
    }
}

/// One A/B session of the step's builds on the target; its run.
fn measure(options: &BisectOptions, builds: &StepBuilds) -> Result<RunData, BisectError> {
    let spec = |c: &Commit| options.over.build(&c.hash);
    let (good, good_name) = &builds.good;
    let (bad, bad_name) = &builds.bad;
    let mut session = options.session.clone();
    session.build = good_name.clone();
    session.defined_builds = [
        (good_name.clone(), spec(good)),
        (bad_name.clone(), spec(bad)),
    ]
    .into_iter()
    .collect();
    session.versus = Vec::new();
    if let Some((mid, name)) = &builds.mid {
        session.defined_builds.insert(name.clone(), spec(mid));
        session.versus.push(name.clone());
    }
    session.versus.push(bad_name.clone());
    session.only_cells = vec![options.cell.clone()];
    let report = run_bench(&session)?;
    Ok(RunData::load(&report.run_dir)?)
}

/// The step's verdicts from its evidence (one session's run, or several
/// pooled).
fn judge_step(cell: &str, builds: &StepBuilds, run: &RunData) -> Result<Step, BisectError> {
    let judge = |base: &str, new: &str| -> Result<Judged, BisectError> {
        let comparison = compare(
            &run.build_side(base)?,
            &run.build_side(new)?,
            &CompareSettings::default(),
        )?;
        let judged = comparison.cells.iter().find(|c| c.cell == cell);
        Ok(match judged {
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
    let ((bad, bad_name), good_name) = (&builds.bad, &builds.good.1);
    let (commit, versus_good, bad_versus_it) = match &builds.mid {
        Some((mid, name)) => (
            (*mid).clone(),
            judge(good_name, name)?,
            Some(judge(name, bad_name)?),
        ),
        None => ((*bad).clone(), judge(good_name, bad_name)?, None),
    };
    Ok(Step {
        commit,
        sessions: Vec::new(),
        versus_good,
        bad_versus_it,
        decision: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Verdict::*;

    const CELL: &str = "llama3.2-1b.attn_kv/Q8_0/n1/t1";

    fn commit(name: &str) -> Commit {
        Commit {
            hash: format!("{name}0000000000"),
            subject: name.into(),
        }
    }

    /// One session's run of the builds `good-*`, `mid-*`, `bad-*`: each
    /// invocation's three repetitions around the given median (ns).
    fn session(run_id: &str, medians: &[(&str, &[f64])]) -> RunData {
        use crate::runs::manifest::{BuildRecord, HostInfo, RunManifest, Versions};
        let mut kernel_rows = Vec::new();
        let mut samples = Vec::new();
        let mut records = Vec::new();
        for (role, invocations) in medians {
            let build = build_name(role, &commit(role));
            let cell_id = format!("{CELL}@{build}");
            let mut row = wire::rows::example_row(&cell_id);
            row.run_id = run_id.into();
            row.board = "b".into();
            kernel_rows.push(row);
            for (i, median) in invocations.iter().enumerate() {
                for (r, f) in [1.0, 1.01, 0.99].iter().enumerate() {
                    samples.push(wire::rows::SampleRow {
                        run_id: run_id.into(),
                        board: "b".into(),
                        cell_id: cell_id.clone(),
                        repetition: r as u32,
                        ns: (median * f) as u64,
                        invocation: i as u32,
                        round: i as u32,
                    });
                }
            }
            records.push(BuildRecord {
                profile: "local".into(),
                hash: build.clone(),
                target_triple: "x".into(),
                seconds: 0.0,
                build,
                llama_cpp: None,
                quantbench: None,
            });
        }
        RunData {
            dir: PathBuf::from(run_id),
            manifest: RunManifest {
                run_id: run_id.into(),
                started_at: "2026-12-07T00:00:00Z".into(),
                finished_at: None,
                matrix: "tiny".into(),
                matrices: Vec::new(),
                config_path: "bench.toml".into(),
                seed: 1,
                git_commit: "abc".into(),
                target: "local".into(),
                versions: Versions {
                    quantbench: "0".into(),
                    llama_cpp_sys_2: "0".into(),
                    rustc: "r".into(),
                    agent_builds: records,
                },
                host: HostInfo::current(),
                boards: Vec::new(),
                resumed_at: Vec::new(),
                rejected_rows: Vec::new(),
            },
            kernel_rows,
            model_rows: Vec::new(),
            samples,
            sustained: Vec::new(),
            importance: Vec::new(),
            probes: Default::default(),
            side: None,
        }
    }

    fn decision_on(run: &RunData) -> Decision {
        let (good, mid, bad) = (commit("good"), commit("mid"), commit("bad"));
        let builds = StepBuilds::of(&good, Some(&mid), &bad);
        let step = judge_step(CELL, &builds, run).unwrap();
        eprintln!(
            "{}: against good {} {}; bad against it {:?}",
            run.manifest.run_id,
            step.versus_good.verdict.name(),
            step.versus_good.change,
            step.bad_versus_it
        );
        decide(
            step.versus_good.verdict,
            step.bad_versus_it.map(|j| j.verdict),
        )
    }

    /// A midpoint as fast as the good end whose invocations swing by
    /// +-60% (a busy neighbour in some of its processes) is undecided in
    /// each session judged alone; judged on all three sessions'
    /// invocations it is good: the bad end is clearly slower than it.
    #[test]
    fn a_step_measured_again_is_judged_on_every_session_together() {
        let noisy_mid: &[f64] = &[100.0, 165.0, 60.0, 160.0, 63.0];
        let measured = |i: usize| {
            session(
                &format!("s{i}"),
                &[
                    ("good", &[100.0, 101.0, 99.0, 100.5, 99.5]),
                    ("mid", noisy_mid),
                    ("bad", &[150.0, 151.0, 149.0, 150.5, 149.5]),
                ],
            )
        };
        let mut pooled = measured(0);
        assert_eq!(decision_on(&pooled), Decision::Undecided);
        for i in 1..3 {
            let again = measured(i);
            assert_eq!(decision_on(&again), Decision::Undecided);
            pooled.pool(&again);
        }
        assert_eq!(decision_on(&pooled), Decision::Good);
        // Every session's invocations are distinct invocations of the
        // pooled cell, in rounds after the earlier sessions'.
        let by_cell = pooled.invocations_by_cell();
        let mid_cell = ("b".to_string(), format!("{CELL}@mid-mid0000000"));
        assert_eq!(by_cell[&mid_cell].len(), 15);
        let rounds: std::collections::BTreeSet<u32> =
            pooled.samples.iter().map(|s| s.round).collect();
        assert_eq!(rounds.len(), 15);
    }

    /// Pooling must not turn noise into findings, and must sharpen what a
    /// step knows: 200 simulated steps whose midpoint is the good end's
    /// twin (4% spread between invocations, each session shifting every
    /// build alike by a 5% spread) and whose bad end is 1.5x. Judged on
    /// three pooled sessions the twin reads `regressed` in at most the
    /// verdicts' nominal 5%, the step is decided good nearly always, and
    /// the twin is shown the `same` (its interval within the 5% margin)
    /// far more often than on one session alone (84 against 9 of 200; the
    /// session shifts, taken as spread between invocations, keep the
    /// pooled interval wider than three sessions' worth).
    #[test]
    fn pooled_sessions_of_a_midpoint_like_the_good_end_are_sharper_and_raise_no_false_alarms() {
        let mut rng = wire::stats::SeededRng::new(7);
        let (mut false_alarms, mut good, mut same_pooled, mut same_alone) = (0, 0, 0, 0);
        let steps = 200;
        let ends = (commit("good"), commit("mid"), commit("bad"));
        let builds = StepBuilds::of(&ends.0, Some(&ends.1), &ends.2);
        for step in 0..steps {
            let mut pooled: Option<RunData> = None;
            for s in 0..3 {
                let shift = (0.05 * rng.normal()).exp();
                let mut side = |level: f64| -> Vec<f64> {
                    (0..5)
                        .map(|_| 1e5 * level * shift * (0.04 * rng.normal()).exp())
                        .collect()
                };
                let (g, m, b) = (side(1.0), side(1.0), side(1.5));
                let run = session(
                    &format!("p{step}-{s}"),
                    &[("good", &g), ("mid", &m), ("bad", &b)],
                );
                match pooled.as_mut() {
                    Some(p) => p.pool(&run),
                    None => {
                        let alone = judge_step(CELL, &builds, &run).unwrap();
                        if alone.versus_good.verdict == Verdict::Same {
                            same_alone += 1;
                        }
                        pooled = Some(run);
                    }
                }
            }
            let run = pooled.unwrap();
            let step = judge_step(CELL, &builds, &run).unwrap();
            match step.versus_good.verdict {
                Verdict::Regressed => false_alarms += 1,
                Verdict::Same => same_pooled += 1,
                _ => {}
            }
            let decision = decide(
                step.versus_good.verdict,
                step.bad_versus_it.map(|j| j.verdict),
            );
            if decision == Decision::Good {
                good += 1;
            }
        }
        eprintln!(
            "of {steps} twins: {false_alarms} regressed pooled, {good} decided good, same {same_pooled} pooled / {same_alone} alone"
        );
        assert!(
            false_alarms * 20 <= steps,
            "{false_alarms} of {steps} pooled twins read regressed"
        );
        assert!(good * 10 >= steps * 9, "{good} of {steps} decided good");
        assert!(
            same_pooled >= 4 * same_alone && same_pooled * 4 >= steps,
            "same: {same_pooled} pooled, {same_alone} alone, of {steps}"
        );
    }

    /// A session in which the cell was disturbed is judged only while no
    /// clean one exists, never pooled with clean ones, and named.
    #[test]
    fn a_disturbed_session_is_not_pooled() {
        let measured = |name: &str, disturbed: bool| {
            let mut run = session(
                name,
                &[
                    ("good", &[100.0, 101.0, 99.0]),
                    ("mid", &[100.0, 99.0, 101.0]),
                    ("bad", &[150.0, 151.0, 149.0]),
                ],
            );
            run.kernel_rows[1].disturbed = disturbed;
            run
        };
        let mut evidence = StepEvidence::default();
        let judged = evidence.add(measured("s0", true), CELL);
        assert_eq!(judged.samples.len(), 27);
        let judged = evidence.add(measured("s1", false), CELL);
        assert_eq!(judged.manifest.run_id, "s1");
        assert_eq!(judged.samples.len(), 27);
        let judged = evidence.add(measured("s2", true), CELL);
        assert_eq!(judged.samples.len(), 27);
        let judged = evidence.add(measured("s3", false), CELL);
        assert_eq!(judged.samples.len(), 54);
        let pooled: Vec<bool> = evidence.sessions.iter().map(|s| s.pooled).collect();
        assert_eq!(pooled, [false, true, false, true]);
    }

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
