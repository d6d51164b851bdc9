//! Comparing two runs cell by cell: "did my last change make it slower?"
//!
//! Cells are matched by their `CellKey` (board, cell id and every setting
//! that moves its timing). The unit of replication is the invocation (one
//! agent process): each side's time is the geometric mean of its
//! invocations' medians, and the change (new / base, above 1 is slower)
//! gets an interval that covers the spread between invocations
//! (`wire::stats::invocation_change`). Runs from before invocations have
//! one a side; their interval covers repetitions only and every output
//! says so.
//!
//! Verdicts: `regressed` / `improved` when the change is a discovery under
//! Benjamini-Hochberg at `fdr` over every judged cell *and* its interval
//! (false-coverage adjusted, Benjamini-Yekutieli) lies beyond
//! `1 + max(threshold, the cell's noise floor)`; `same` when the interval
//! lies inside that margin; otherwise `inconclusive`. Cells too noisy to
//! judge (spread within invocations above `max_cv`, a warm-up that never
//! settled, thermally noisy) are `noisy`; cells another process disturbed
//! are `disturbed`. Quality columns (NMSE; perplexity, KL divergence,
//! top-1 agreement, multiple-choice accuracy) that worsen beyond a
//! tolerance make a `quality-regressed` cell. Emulated rows are never
//! compared with real ones.
//!
//! A timing regression seen once is a `suspect`; `persistence` confirms
//! it with a second measurement (the run before the base, judged against
//! both) and fills `Comparison::confirmation`.

use crate::results::run_dir::RunData;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;
use thiserror::Error;
use wire::rows::{CellKey, CellStatus};
use wire::stats::{
    benjamini_hochberg, geometric_mean, invocation_change, invocation_medians, invocation_spread,
    robust_cv, ChangeEstimate, IntervalMethod, Summary,
};

#[derive(Debug, Error)]
pub enum CompareError {
    #[error("runs {base} and {new} have no measured cell in common (same boards and matrices?); nothing to compare")]
    NothingInCommon { base: String, new: String },
    #[error(
        "--across `{0}`: not a setting of a cell key (known: distribution, load_mode, repack)"
    )]
    UnknownSetting(String),
}

/// The settings of a kernel cell's key, in the order `KernelRow::settings`
/// joins them: what `--across` may name.
pub const CELL_SETTINGS: [&str; 3] = ["distribution", "load_mode", "repack"];

/// A cell as a verdict line names it: its id and, unless the id already
/// carries them (a model cell's `[settings]`), its settings.
fn shown_cell(cell: &str, settings: &str) -> String {
    if settings.is_empty() || cell.contains(&format!("[{settings}]")) {
        cell.to_string()
    } else {
        format!("{cell} [{settings}]")
    }
}

/// `key` with the settings at `positions` replaced by `*`, so cells that
/// differ only there match.
fn across_key(key: &CellKey, positions: &[usize]) -> CellKey {
    if positions.is_empty() || key.settings.is_empty() {
        return key.clone();
    }
    let parts: Vec<&str> = key
        .settings
        .split('/')
        .enumerate()
        .map(|(i, part)| if positions.contains(&i) { "*" } else { part })
        .collect();
    CellKey {
        settings: parts.join("/"),
        ..key.clone()
    }
}

/// A cell's run-to-run noise on its board, as a relative change that
/// noise alone reaches (0.04: 4%), and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NoiseFloor {
    pub relative: f64,
    /// e.g. `history: 6 runs of agent 0123abcd`.
    pub source: String,
}

/// The thresholds of a comparison.
#[derive(Debug, Clone, Serialize)]
pub struct CompareSettings {
    /// Smallest relative change that counts (0.05 = 5%); a cell's noise
    /// floor raises it for that cell.
    pub threshold: f64,
    /// False discovery rate across all judged cells (Benjamini-Hochberg).
    pub fdr: f64,
    /// Cells whose spread within an invocation (robust coefficient of
    /// variation, 1.4826 x MAD / median, the median over invocations)
    /// exceeds this on either side are `noisy`, not judged.
    pub max_cv: f64,
    /// Relative worsening of NMSE, perplexity or KL divergence, and absolute
    /// drop of top-1 agreement or accuracy, that counts as a quality regression.
    pub quality_tolerance: f64,
    /// Confidence level of the intervals of cells that are not discoveries.
    pub level: f64,
    pub bootstrap_rounds: usize,
    /// Per-cell noise floors (from the history or a `noise` run).
    #[serde(skip)]
    pub noise_floors: BTreeMap<CellKey, NoiseFloor>,
    /// Divide each run's round effects out of its invocations (drift that
    /// hit every cell of a round alike; `wire::stats::round_effects`).
    pub adjust_rounds: bool,
    /// Settings (`CELL_SETTINGS`) the two runs may differ in: cells are
    /// matched ignoring them, to judge a setting itself (`repack` on
    /// against off).
    pub across: Vec<String>,
}

impl Default for CompareSettings {
    fn default() -> Self {
        CompareSettings {
            threshold: 0.05,
            fdr: 0.05,
            max_cv: 0.25,
            quality_tolerance: 0.02,
            level: 0.95,
            bootstrap_rounds: 1000,
            noise_floors: BTreeMap::new(),
            adjust_rounds: true,
            across: Vec::new(),
        }
    }
}

/// Worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Regressed,
    QualityRegressed,
    /// Another process used the board's CPU during the cell on a side.
    Disturbed,
    /// Too much spread within invocations, a warm-up that never settled,
    /// or thermally noisy.
    Noisy,
    /// Neither a change beyond the margin nor shown to be within it: more
    /// invocations would decide.
    Inconclusive,
    Improved,
    /// The interval lies within +-margin.
    Same,
    /// Measured on one side only (failed, unsupported or absent on the
    /// other), or one side emulated.
    NotComparable,
}

impl Verdict {
    pub const ALL: [Verdict; 8] = [
        Verdict::Regressed,
        Verdict::QualityRegressed,
        Verdict::Improved,
        Verdict::Inconclusive,
        Verdict::Noisy,
        Verdict::Disturbed,
        Verdict::Same,
        Verdict::NotComparable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Verdict::Regressed => "regressed",
            Verdict::QualityRegressed => "quality-regressed",
            Verdict::Disturbed => "disturbed",
            Verdict::Noisy => "noisy",
            Verdict::Inconclusive => "inconclusive",
            Verdict::Improved => "improved",
            Verdict::Same => "same",
            Verdict::NotComparable => "not-comparable",
        }
    }

    pub fn is_failure(self) -> bool {
        matches!(self, Verdict::Regressed | Verdict::QualityRegressed)
    }
}

/// How sure a regression is: seen once (`suspect`), or seen again in a
/// second measurement (`confirmed`). Quality columns are deterministic for
/// a build (seeded weights, fixed text), so a quality regression is
/// confirmed as soon as it is seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Persistence {
    Suspect,
    Confirmed,
}

impl Persistence {
    pub fn name(self) -> &'static str {
        match self {
            Persistence::Suspect => "suspect",
            Persistence::Confirmed => "confirmed",
        }
    }
}

/// A regression since an earlier run that both later runs show.
#[derive(Debug, Clone, Serialize)]
pub struct ConfirmedRegression {
    pub board: String,
    pub kind: String,
    pub cell: String,
    pub settings: String,
    /// The run that first showed it (the base of this comparison).
    pub first_seen: String,
    /// new / earlier, with its interval.
    pub ratio: Option<f64>,
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    pub ci_level: Option<f64>,
}

/// The second look at this comparison's regressions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Confirmation {
    /// The run before the base that the base and the new run were both
    /// judged against; `None` when there is none (every timing regression
    /// stays a suspect).
    pub against: Option<String>,
    /// The rule, or why there was no second look, in words.
    pub rule: String,
    /// Cells regressed against `against` in the base run and still in the
    /// new one (whatever their verdict between base and new).
    pub confirmed: Vec<ConfirmedRegression>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CellComparison {
    pub board: String,
    /// `kernel` or `model`.
    pub kind: String,
    pub cell: String,
    /// The settings part of the cell's key (`distribution/load_mode/repack`).
    pub settings: String,
    pub verdict: Verdict,
    /// Geometric mean of the invocations' median times.
    pub base_median_ns: Option<f64>,
    pub new_median_ns: Option<f64>,
    /// new / base (above 1: slower).
    pub ratio: Option<f64>,
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    /// Confidence level of [ci_low, ci_high]: `level`, or higher for a
    /// discovery (false-coverage adjusted).
    pub ci_level: Option<f64>,
    /// Two-sided p of "no change" (before the multiple-testing rule).
    pub p_value: Option<f64>,
    pub method: Option<IntervalMethod>,
    /// The change a verdict needs: max(threshold, noise floor).
    pub margin: f64,
    pub noise_floor: Option<NoiseFloor>,
    pub base_invocations: usize,
    pub new_invocations: usize,
    /// Spread between invocations (sd of log medians).
    pub base_spread: Option<f64>,
    pub new_spread: Option<f64>,
    /// Spread within invocations (robust CV, median over invocations).
    pub base_cv: Option<f64>,
    pub new_cv: Option<f64>,
    pub base_samples: usize,
    pub new_samples: usize,
    /// Quality columns that moved, `name base -> new`.
    pub quality: Vec<String>,
    /// What changed beside the code: kernel path, agent build, board probe.
    pub notes: Vec<String>,
    /// For `regressed` and `quality-regressed` cells.
    pub persistence: Option<Persistence>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub base_run: String,
    pub new_run: String,
    /// Which llama.cpp each side's agents contain (`RunManifest::llama_cpp`).
    pub base_llama_cpp: String,
    pub new_llama_cpp: String,
    pub settings: CompareSettings,
    /// Cells whose timing was judged (not noisy, disturbed or not comparable).
    pub judged: usize,
    /// How false discoveries are controlled across those cells.
    pub multiple_testing: String,
    /// Round effects taken out of each run, per board, in words.
    pub round_adjustment: Vec<String>,
    /// Worst first.
    pub cells: Vec<CellComparison>,
    /// Suspect or confirmed: filled by `persistence::confirm`.
    pub confirmation: Confirmation,
}

/// One side's view of a cell.
#[derive(Clone)]
struct Side {
    emulated: bool,
    measured: bool,
    /// Why a cell that was not measured has no figures (its row's note).
    not_measured_because: String,
    /// Repetitions by invocation.
    invocations: Vec<Vec<f64>>,
    kernel_path: Option<String>,
    agent_build: String,
    /// Throttled or off the `performance` governor (kernel cells).
    thermal_noisy: bool,
    settled: bool,
    disturbed: bool,
    /// (name, value, higher is better, standard error when known)
    quality: Vec<(&'static str, Option<f64>, bool, Option<f64>)>,
    /// Joules per token, its standard error over invocations and their
    /// number (model rows of a board with a power source).
    energy: Option<(f64, Option<f64>, u32)>,
}

impl Side {
    fn samples(&self) -> usize {
        self.invocations.iter().map(Vec::len).sum()
    }

    /// Geometric mean of invocation medians.
    fn time_ns(&self) -> Option<f64> {
        geometric_mean(&invocation_medians(&self.invocations))
    }

    /// Median over invocations of the robust CV within each.
    fn within_cv(&self) -> Option<f64> {
        let cvs: Vec<f64> = self
            .invocations
            .iter()
            .filter_map(|r| robust_cv(r))
            .collect();
        Summary::of(&cvs).map(|s| s.median)
    }
}

/// Each cell of a run as one side; with `adjust_rounds`, the run's round
/// effects divided out (and described in the returned lines).
fn sides(run: &RunData, adjust_rounds: bool) -> (BTreeMap<CellKey, Side>, Vec<String>) {
    let mut notes = Vec::new();
    let samples = if adjust_rounds {
        let (adjusted, effects) = run.round_adjusted_invocations();
        for (board, e) in effects.iter().filter(|(_, e)| !e.is_empty()) {
            let (low, high) = e
                .values()
                .fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
            notes.push(format!(
                "{} on {board}: {} rounds, round effects {:+.1}% to {:+.1}% taken out",
                run.manifest.run_id,
                e.len(),
                (low.exp() - 1.0) * 100.0,
                (high.exp() - 1.0) * 100.0
            ));
        }
        adjusted
    } else {
        run.invocations_by_cell()
    };
    let mut out = BTreeMap::new();
    for r in &run.kernel_rows {
        out.insert(
            r.key(),
            Side {
                emulated: r.emulated,
                measured: r.status == CellStatus::Ok && r.median_ns.is_some(),
                not_measured_because: r.note.clone(),
                invocations: samples
                    .get(&(r.board.clone(), r.cell_id.clone()))
                    .cloned()
                    .unwrap_or_default(),
                kernel_path: Some(r.kernel_path.clone()),
                agent_build: r.agent_build.clone(),
                thermal_noisy: r.thermal_noisy,
                settled: r.settled,
                disturbed: r.disturbed,
                quality: vec![("nmse", r.nmse, false, None)],
                energy: None,
            },
        );
    }
    for r in &run.model_rows {
        out.insert(
            r.key(),
            Side {
                emulated: r.emulated,
                measured: r.status == CellStatus::Ok && r.avg_ns.is_some(),
                not_measured_because: r.note.clone(),
                invocations: samples
                    .get(&(r.board.clone(), r.cell_id()))
                    .cloned()
                    .unwrap_or_default(),
                kernel_path: None,
                agent_build: r.agent_build.clone(),
                thermal_noisy: r.thermal_noisy,
                settled: true,
                disturbed: false,
                energy: r
                    .j_per_token
                    .map(|j| (j, r.j_per_token_stderr, r.invocations)),
                quality: vec![
                    ("ppl", r.ppl, false, r.ppl_stderr),
                    ("kld_mean", r.kld_mean, false, r.kld_stderr),
                    ("top1_agreement", r.top1_agreement, true, r.top1_stderr),
                    ("mc_accuracy", r.mc_accuracy, true, r.mc_stderr),
                ],
            },
        );
    }
    (out, notes)
}

/// Differences between the two runs' probes of a board worth showing.
fn probe_notes(base: &RunData, new: &RunData, board: &str) -> Vec<String> {
    let (Some(a), Some(b)) = (base.probes.get(board), new.probes.get(board)) else {
        return Vec::new();
    };
    let mut notes = Vec::new();
    if a.cpu_model != b.cpu_model {
        notes.push(format!("CPU {} -> {}", a.cpu_model, b.cpu_model));
    }
    if a.cpu_max_freq_mhz != b.cpu_max_freq_mhz {
        notes.push(format!(
            "max clock {:?} -> {:?} MHz",
            a.cpu_max_freq_mhz, b.cpu_max_freq_mhz
        ));
    }
    if a.cpufreq_governor != b.cpufreq_governor {
        notes.push(format!(
            "governor {:?} -> {:?}",
            a.cpufreq_governor, b.cpufreq_governor
        ));
    }
    notes
}

fn seed_of(key: &CellKey) -> u64 {
    key.to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        })
}

/// A model recipe that produced no figures has one row for the recipe
/// (no test, no threads): it stands for each of that recipe's cells the
/// other run measured, so a recipe that failed or cannot be made on one
/// side is a `not-comparable` cell with the reason, not a missing one.
fn spread_recipe_rows(sides: &mut BTreeMap<CellKey, Side>, other: &BTreeMap<CellKey, Side>) {
    let recipe_rows: Vec<(CellKey, String)> = sides
        .iter()
        .filter(|(key, side)| key.kind == "model" && !side.measured)
        .filter_map(|(key, _)| {
            let prefix = key.cell_id.strip_suffix("//t0")?;
            Some((key.clone(), format!("{prefix}/")))
        })
        .collect();
    for (key, prefix) in recipe_rows {
        let Some(side) = sides.get(&key).cloned() else {
            continue;
        };
        for other_key in other
            .keys()
            .filter(|k| k.kind == "model" && k.board == key.board && k.cell_id.starts_with(&prefix))
        {
            sides
                .entry(other_key.clone())
                .or_insert_with(|| side.clone());
        }
    }
}

pub fn compare(
    base: &RunData,
    new: &RunData,
    settings: &CompareSettings,
) -> Result<Comparison, CompareError> {
    let positions = settings
        .across
        .iter()
        .map(|name| {
            CELL_SETTINGS
                .iter()
                .position(|s| s == name)
                .ok_or_else(|| CompareError::UnknownSetting(name.clone()))
        })
        .collect::<Result<Vec<usize>, _>>()?;
    let (mut base_sides, mut round_notes) = sides(base, settings.adjust_rounds);
    let (mut new_sides, new_notes) = sides(new, settings.adjust_rounds);
    spread_recipe_rows(&mut base_sides, &new_sides);
    spread_recipe_rows(&mut new_sides, &base_sides);
    round_notes.extend(new_notes);
    let new_by_key: BTreeMap<CellKey, (&CellKey, &Side)> = new_sides
        .iter()
        .map(|(key, side)| (across_key(key, &positions), (key, side)))
        .collect();
    let pairs: Vec<Pair> = base_sides
        .iter()
        .filter_map(|(base_key, b)| {
            let key = across_key(base_key, &positions);
            let (new_key, n) = new_by_key.get(&key)?;
            let mut notes = probe_notes(base, new, &key.board);
            if base_key.settings != new_key.settings {
                notes.push(format!(
                    "settings {} -> {}",
                    base_key.settings, new_key.settings
                ));
            }
            Some(Pair {
                key,
                floor_key: (*new_key).clone(),
                base: b,
                new: n,
                notes,
            })
        })
        .collect();
    if !pairs
        .iter()
        .any(|p| p.base.measured && p.new.measured && p.base.emulated == p.new.emulated)
    {
        return Err(CompareError::NothingInCommon {
            base: base.manifest.run_id.clone(),
            new: new.manifest.run_id.clone(),
        });
    }
    let (cells, judged, multiple_testing) = judge(&pairs, settings);
    Ok(Comparison {
        base_run: base.label(),
        new_run: new.label(),
        base_llama_cpp: base.manifest.llama_cpp(),
        new_llama_cpp: new.manifest.llama_cpp(),
        settings: settings.clone(),
        judged,
        multiple_testing,
        round_adjustment: round_notes,
        cells,
        confirmation: Confirmation {
            against: None,
            rule: "no second look: every timing regression is a suspect".into(),
            confirmed: Vec::new(),
        },
    })
    .map(|mut cmp| {
        cmp.mark_first_look();
        cmp
    })
}

/// A cell present in both runs.
struct Pair<'a> {
    /// The key it is matched by (settings named by `--across` as `*`).
    key: CellKey,
    /// The new side's own key, whose noise floor applies.
    floor_key: CellKey,
    base: &'a Side,
    new: &'a Side,
    notes: Vec<String>,
}

/// Every pair's verdict, worst first; the number of cells whose timing was
/// judged and the multiple-testing rule in words.
fn judge(pairs: &[Pair], settings: &CompareSettings) -> (Vec<CellComparison>, usize, String) {
    let mut cells = Vec::new();
    // Cells whose timing is judged: (index in `cells`, index in `pairs`, p).
    let mut judged: Vec<(usize, usize, f64)> = Vec::new();
    for (pair_index, pair) in pairs.iter().enumerate() {
        let (key, b, n) = (&pair.key, pair.base, pair.new);
        let floor = settings.noise_floors.get(&pair.floor_key).cloned();
        let mut c = CellComparison {
            board: key.board.clone(),
            kind: key.kind.clone(),
            cell: key.cell_id.clone(),
            settings: key.settings.clone(),
            verdict: Verdict::NotComparable,
            base_median_ns: b.time_ns(),
            new_median_ns: n.time_ns(),
            ratio: None,
            ci_low: None,
            ci_high: None,
            ci_level: None,
            p_value: None,
            method: None,
            margin: settings
                .threshold
                .max(floor.as_ref().map_or(0.0, |f| f.relative)),
            noise_floor: floor,
            base_invocations: b.invocations.len(),
            new_invocations: n.invocations.len(),
            base_spread: invocation_spread(&b.invocations),
            new_spread: invocation_spread(&n.invocations),
            base_cv: b.within_cv(),
            new_cv: n.within_cv(),
            base_samples: b.samples(),
            new_samples: n.samples(),
            quality: Vec::new(),
            notes: pair.notes.clone(),
            persistence: None,
        };
        if b.emulated != n.emulated {
            c.notes
                .push("one side emulated, the other real: not compared".into());
            cells.push(c);
            continue;
        }
        if b.kernel_path != n.kernel_path {
            c.notes.push(format!(
                "kernel path {} -> {}",
                b.kernel_path.as_deref().unwrap_or(""),
                n.kernel_path.as_deref().unwrap_or("")
            ));
        }
        if b.agent_build != n.agent_build {
            c.notes
                .push(format!("agent {} -> {}", b.agent_build, n.agent_build));
        }
        if !(b.measured && n.measured) {
            c.notes.push(format!(
                "measured in {}",
                match (b.measured, n.measured) {
                    (true, false) => "the base only",
                    (false, true) => "the new run only",
                    _ => "neither run",
                }
            ));
            for (side, name) in [(b, "base"), (n, "new")] {
                if !side.measured && !side.not_measured_because.is_empty() {
                    c.notes
                        .push(format!("{name}: {}", side.not_measured_because));
                }
            }
            cells.push(c);
            continue;
        }
        if let Some(estimate) = screen(&mut c, b, n, settings, seed_of(key)) {
            judged.push((cells.len(), pair_index, estimate.p_beyond(c.margin)));
        }
        judge_quality(&mut c, b, n, settings);
        c.quality.extend(energy_change(b, n));
        cells.push(c);
    }
    let p_values: Vec<f64> = judged.iter().map(|j| j.2).collect();
    let discoveries = benjamini_hochberg(&p_values, settings.fdr);
    let found = discoveries.iter().filter(|d| **d).count();
    // Benjamini-Yekutieli: intervals of the R cells selected among m hold
    // their coverage together at level 1 - R q / m (one-sided, as the test
    // that selected them; the two-sided interval shown has the same
    // lower end for a regression).
    let selected_level = 1.0 - 2.0 * found as f64 * settings.fdr / judged.len().max(1) as f64;
    for ((cell_index, pair_index, _), discovered) in judged.iter().zip(&discoveries) {
        let c = &mut cells[*cell_index];
        let pair = &pairs[*pair_index];
        if *discovered {
            if let Some(e) = invocation_change(
                &pair.base.invocations,
                &pair.new.invocations,
                selected_level,
                settings.bootstrap_rounds,
                seed_of(&pair.key),
            ) {
                set_estimate(c, &e, selected_level);
            }
        }
        let timing = decide(c, *discovered);
        // A quality regression stands whatever the timing says, unless
        // the timing regressed too (the worse news first).
        if c.verdict != Verdict::QualityRegressed || timing == Verdict::Regressed {
            c.verdict = timing;
        }
    }
    cells.sort_by(|a, b| {
        a.verdict
            .cmp(&b.verdict)
            .then(b.ratio.unwrap_or(0.0).total_cmp(&a.ratio.unwrap_or(0.0)))
    });
    let rule = format!(
        "Benjamini-Hochberg at FDR {} over {} judged cells ({} discoveries, their intervals at {:.1}%, false-coverage adjusted)",
        settings.fdr,
        judged.len(),
        found,
        selected_level * 100.0
    );
    (cells, judged.len(), rule)
}

fn set_estimate(c: &mut CellComparison, e: &ChangeEstimate, level: f64) {
    c.ratio = Some(e.ratio);
    c.ci_low = Some(e.low);
    c.ci_high = Some(e.high);
    c.ci_level = Some(level);
    c.p_value = Some(e.p_value);
    c.method = Some(e.method);
}

/// Everything before the cross-cell rule: the estimate at `level`, and
/// the verdicts that need no test (`not-comparable`, `noisy`,
/// `disturbed`); `inconclusive` means "to be judged".
fn screen(
    c: &mut CellComparison,
    b: &Side,
    n: &Side,
    s: &CompareSettings,
    seed: u64,
) -> Option<ChangeEstimate> {
    let mut estimate = None;
    c.verdict = screen_verdict(c, b, n, s, seed, &mut estimate)?;
    estimate.filter(|_| c.verdict == Verdict::Inconclusive)
}

fn screen_verdict(
    c: &mut CellComparison,
    b: &Side,
    n: &Side,
    s: &CompareSettings,
    seed: u64,
    estimate: &mut Option<ChangeEstimate>,
) -> Option<Verdict> {
    if b.samples() == 0 || n.samples() == 0 {
        c.ratio = c.new_median_ns.zip(c.base_median_ns).map(|(n, b)| n / b);
        c.notes
            .push("no repetitions kept on one side: not judged".into());
        return Some(Verdict::NotComparable);
    }
    let Some(e) = invocation_change(
        &b.invocations,
        &n.invocations,
        s.level,
        s.bootstrap_rounds,
        seed,
    ) else {
        c.notes.push("no positive timings: not judged".into());
        return Some(Verdict::NotComparable);
    };
    set_estimate(c, &e, s.level);
    *estimate = Some(e);
    if e.method == IntervalMethod::RepetitionsOnly {
        c.notes.push(
            "one invocation a side: the interval covers repetitions in one process, not run-to-run spread"
                .into(),
        );
    }
    let side_name = |base: bool, new: bool| match (base, new) {
        (true, true) => "both runs",
        (true, false) => "the base run",
        _ => "the new run",
    };
    if b.disturbed || n.disturbed {
        c.notes.push(format!(
            "another process used the CPU during the cell in {}",
            side_name(b.disturbed, n.disturbed)
        ));
        return Some(Verdict::Disturbed);
    }
    // A throttled cell is slow because the board was hot, not because the
    // code changed.
    if b.thermal_noisy || n.thermal_noisy {
        c.notes.push(format!(
            "thermally noisy in {} (throttled or not the `performance` governor)",
            side_name(b.thermal_noisy, n.thermal_noisy)
        ));
        return Some(Verdict::Noisy);
    }
    if !(b.settled && n.settled) {
        c.notes.push(format!(
            "warm-up never settled in {}",
            side_name(!b.settled, !n.settled)
        ));
        return Some(Verdict::Noisy);
    }
    if [c.base_cv, c.new_cv]
        .iter()
        .any(|cv| cv.is_some_and(|v| v > s.max_cv))
    {
        return Some(Verdict::Noisy);
    }
    Some(Verdict::Inconclusive)
}

/// The timing verdict of a judged cell from its interval and whether the
/// cross-cell rule made it a discovery.
fn decide(c: &CellComparison, discovered: bool) -> Verdict {
    let (Some(low), Some(high)) = (c.ci_low, c.ci_high) else {
        return Verdict::Inconclusive;
    };
    let up = 1.0 + c.margin;
    let down = 1.0 / up;
    let ratio = c.ratio.unwrap_or(1.0);
    if discovered && ratio > 1.0 && low > up {
        Verdict::Regressed
    } else if discovered && ratio < 1.0 && high < down {
        Verdict::Improved
    } else if low >= down && high <= up {
        Verdict::Same
    } else {
        Verdict::Inconclusive
    }
}

/// The change of joules per token between two sides with its 95%
/// interval (from each side's standard error over invocations, on the log
/// scale as times are judged, Student's t with Welch's degrees of freedom:
/// three invocations a side know little), and what it shows: more or less
/// energy, or no change the spread can see. Shown beside the cell's
/// verdict, which stays the timing's.
fn energy_change(b: &Side, n: &Side) -> Option<String> {
    let ((before, b_se, b_n), (after, a_se, a_n)) = (b.energy?, n.energy?);
    if before <= 0.0 || after <= 0.0 {
        return None;
    }
    let ratio = after / before;
    let percent = |r: f64| format!("{:+.1}%", (r - 1.0) * 100.0);
    let Some((b_se, a_se)) = b_se.zip(a_se) else {
        return Some(format!(
            "j_per_token {} -> {} ({}, no interval: fewer than two invocations)",
            significant_digits(before),
            significant_digits(after),
            percent(ratio)
        ));
    };
    let (rb, ra) = ((b_se / before).powi(2), (a_se / after).powi(2));
    let se = (rb + ra).sqrt();
    let df = (rb + ra).powi(2)
        / (rb * rb / f64::from(b_n.max(2) - 1) + ra * ra / f64::from(a_n.max(2) - 1)).max(1e-300);
    let t = wire::stats::student_t_quantile(0.975, df.max(1.0));
    let (low, high) = ((ratio.ln() - t * se).exp(), (ratio.ln() + t * se).exp());
    let reading = if low > 1.0 {
        "more energy per token"
    } else if high < 1.0 {
        "less energy per token"
    } else {
        "no change the spread can see"
    };
    Some(format!(
        "j_per_token {} -> {} ({} [{}, {}]: {reading})",
        significant_digits(before),
        significant_digits(after),
        percent(ratio),
        percent(low),
        percent(high)
    ))
}

/// The smallest rise of a lower-is-better quality figure that can be a
/// regression, whatever its ratio. A mean KLD is a ratio of tiny numbers
/// near full precision: an F16 file's is about 3e-6 nats, and two llama.cpp
/// versions' rounding moved it by 2.4% (`ab default crate:0.1.140` on
/// stories260K), where a quantized recipe's is 1e-3 and more.
fn least_rise(figure: &str) -> f64 {
    match figure {
        "kld_mean" => 1e-4,
        _ => 1e-12,
    }
}

fn judge_quality(c: &mut CellComparison, b: &Side, n: &Side, s: &CompareSettings) {
    let mut quality_regressed = false;
    for ((name, before, higher_better, before_se), (_, after, _, after_se)) in
        b.quality.iter().zip(&n.quality)
    {
        let (Some(before), Some(after)) = (before, after) else {
            continue;
        };
        // With llama-perplexity's error bars, a change within twice the
        // combined standard error is not a regression (the two runs scored
        // the same text, so this errs towards calling it noise).
        let beyond_error = match (before_se, after_se) {
            (Some(b_se), Some(a_se)) if b_se + a_se > 0.0 => {
                (after - before).abs() > 2.0 * (b_se * b_se + a_se * a_se).sqrt()
            }
            _ => true,
        };
        let worse = beyond_error
            && if *higher_better {
                before - after > s.quality_tolerance
            } else {
                *after > before * (1.0 + s.quality_tolerance) && after - before > least_rise(name)
            };
        // Rounding-level differences (another accumulation order) are not shown.
        if worse || (after - before).abs() > 1e-6 * before.abs().max(1e-30) {
            c.quality.push(format!(
                "{name} {} -> {}",
                significant_digits(*before),
                significant_digits(*after)
            ));
        }
        quality_regressed |= worse;
    }
    if quality_regressed && !c.verdict.is_failure() {
        c.verdict = Verdict::QualityRegressed;
    }
}

impl Comparison {
    pub fn count(&self, verdict: Verdict) -> usize {
        self.cells.iter().filter(|c| c.verdict == verdict).count()
    }

    /// Any regression or quality regression, suspect or confirmed.
    pub fn any_regression(&self) -> bool {
        self.cells.iter().any(|c| c.verdict.is_failure())
    }

    /// Confirmed regressions: quality regressions, and timing regressions
    /// seen in two measurements (`persistence`).
    pub fn confirmed_count(&self) -> usize {
        let quality = self
            .cells
            .iter()
            .filter(|c| c.persistence == Some(Persistence::Confirmed))
            .filter(|c| !self.is_confirmed(c))
            .count();
        quality + self.confirmation.confirmed.len()
    }

    pub fn suspect_count(&self) -> usize {
        self.cells
            .iter()
            .filter(|c| c.persistence == Some(Persistence::Suspect))
            .count()
    }

    /// Whether `c`'s cell is in the confirmed list.
    fn is_confirmed(&self, c: &CellComparison) -> bool {
        self.confirmed_of(c).is_some()
    }

    fn confirmed_of(&self, c: &CellComparison) -> Option<&ConfirmedRegression> {
        self.confirmation.confirmed.iter().find(|r| {
            r.board == c.board && r.kind == c.kind && r.cell == c.cell && r.settings == c.settings
        })
    }

    /// Before any second look: quality regressions confirmed, timing
    /// regressions suspect.
    fn mark_first_look(&mut self) {
        for c in &mut self.cells {
            c.persistence = match c.verdict {
                Verdict::QualityRegressed => Some(Persistence::Confirmed),
                Verdict::Regressed => Some(Persistence::Suspect),
                _ => None,
            };
        }
    }

    /// `12 cells: 1 regressed, 0 quality-regressed, ...` and the
    /// multiple-testing rule.
    pub fn verdict_line(&self) -> String {
        let parts: Vec<String> = Verdict::ALL
            .iter()
            .map(|v| format!("{} {}", self.count(*v), v.name()))
            .collect();
        format!(
            "{} vs {}: {} cells: {}; regressions {} confirmed, {} suspect",
            self.new_run,
            self.base_run,
            self.cells.len(),
            parts.join(", "),
            self.confirmed_count(),
            self.suspect_count()
        )
    }

    /// The non-zero verdict counts, e.g. `2 regressed, 30 same`.
    pub fn verdict_counts_short(&self) -> String {
        let parts: Vec<String> = Verdict::ALL
            .iter()
            .filter(|v| self.count(**v) > 0)
            .map(|v| format!("{} {}", self.count(*v), v.name()))
            .collect();
        parts.join(", ")
    }

    /// The persistence rule and the confirmed regressions, one per line.
    pub fn confirmation_lines(&self) -> Vec<String> {
        let mut lines = vec![format!("persistence: {}", self.confirmation.rule)];
        for r in &self.confirmation.confirmed {
            let pct = |v: Option<f64>| {
                v.map(|r| format!("{:+.1}%", (r - 1.0) * 100.0))
                    .unwrap_or_else(|| "–".into())
            };
            let cell = shown_cell(&r.cell, &r.settings);
            lines.push(format!(
                "confirmed regression: {} {} {cell}: {} [{}, {}] since {} (first seen in {})",
                r.board,
                r.kind,
                pct(r.ratio),
                pct(r.ci_low),
                pct(r.ci_high),
                self.confirmation.against.as_deref().unwrap_or("?"),
                r.first_seen
            ));
        }
        lines
    }

    /// The rule line printed under every table.
    pub fn method_line(&self) -> String {
        let one_invocation = self
            .cells
            .iter()
            .filter(|c| c.method == Some(IntervalMethod::RepetitionsOnly))
            .count();
        let mut line = format!(
            "change: geometric mean of invocation medians, new/base; {}; margin max({:.1}%, noise floor)",
            self.multiple_testing,
            self.settings.threshold * 100.0
        );
        for note in &self.round_adjustment {
            let _ = write!(line, "; {note}");
        }
        if one_invocation > 0 {
            let _ = write!(
                line,
                "; {one_invocation} cells have one invocation a side: their intervals miss run-to-run spread"
            );
        }
        line
    }

    fn rows(&self) -> Vec<[String; 9]> {
        self.cells
            .iter()
            .map(|c| {
                let pct = |v: Option<f64>| {
                    v.map(|r| format!("{:+.1}%", (r - 1.0) * 100.0))
                        .unwrap_or_else(|| "–".into())
                };
                let pct_abs = |v: Option<f64>| {
                    v.map(|r| format!("{:.1}%", r * 100.0))
                        .unwrap_or_else(|| "–".into())
                };
                let mut detail = c.quality.clone();
                if let Some(floor) = &c.noise_floor {
                    detail.push(format!(
                        "noise floor {:.1}% ({})",
                        floor.relative * 100.0,
                        floor.source
                    ));
                }
                detail.extend(c.notes.iter().cloned());
                let cell = shown_cell(&c.cell, &c.settings);
                let verdict = match (c.persistence, self.is_confirmed(c)) {
                    (_, true) if c.verdict == Verdict::Regressed => "regressed (confirmed)".into(),
                    (Some(Persistence::Suspect), _) => "regressed (suspect)".into(),
                    (_, true) => {
                        format!("{} (confirmed regression since earlier)", c.verdict.name())
                    }
                    _ => c.verdict.name().to_string(),
                };
                [
                    verdict,
                    c.board.clone(),
                    c.kind.clone(),
                    cell,
                    match c.ci_level {
                        Some(level) => format!(
                            "{} [{}, {}] @{:.0}%",
                            pct(c.ratio),
                            pct(c.ci_low),
                            pct(c.ci_high),
                            level * 100.0
                        ),
                        None => pct(c.ratio),
                    },
                    c.p_value
                        .map(|p| format!("{p:.3}"))
                        .unwrap_or_else(|| "–".into()),
                    format!("{}/{}", c.base_invocations, c.new_invocations),
                    format!(
                        "{}/{} | {}/{}",
                        pct_abs(c.base_spread),
                        pct_abs(c.new_spread),
                        pct_abs(c.base_cv),
                        pct_abs(c.new_cv)
                    ),
                    detail.join("; "),
                ]
            })
            .collect()
    }

    const HEADER: [&'static str; 9] = [
        "verdict",
        "board",
        "kind",
        "cell",
        "change [interval]",
        "p",
        "invocations",
        "spread between | within",
        "notes",
    ];

    /// A terminal table, worst first, then the verdict count.
    pub fn to_table(&self) -> String {
        let rows = self.rows();
        let mut widths: Vec<usize> = Self::HEADER.iter().map(|h| h.len()).collect();
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let line = |cells: Vec<&str>| {
            cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        let _ = writeln!(out, "{}", line(Self::HEADER.to_vec()));
        for row in &rows {
            let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
        }
        let _ = writeln!(out, "{}", self.verdict_line());
        if let Some(energy) = self.energy_line() {
            let _ = writeln!(out, "{energy}");
        }
        let _ = writeln!(out, "{}", self.llama_cpp_line());
        let _ = writeln!(out, "{}", self.method_line());
        for line in self.confirmation_lines() {
            let _ = writeln!(out, "{line}");
        }
        out
    }

    /// How energy per token moved over the cells both sides measured it in
    /// (`energy_change`), the cells beyond their interval named; `None`
    /// where neither side had a power source.
    pub fn energy_line(&self) -> Option<String> {
        let notes: Vec<(&CellComparison, &String)> = self
            .cells
            .iter()
            .flat_map(|c| c.quality.iter().map(move |q| (c, q)))
            .filter(|(_, q)| q.starts_with("j_per_token "))
            .collect();
        if notes.is_empty() {
            return None;
        }
        let named = |reading: &str| -> Vec<String> {
            notes
                .iter()
                .filter(|(_, q)| q.ends_with(&format!("{reading})")))
                .map(|(c, _)| shown_cell(&c.cell, &c.settings))
                .collect()
        };
        let (more, less) = (
            named("more energy per token"),
            named("less energy per token"),
        );
        Some(format!(
            "energy per token: {} cells more beyond their interval{}, {} less{}, {} without a change the spread can see or without an interval",
            more.len(),
            if more.is_empty() { String::new() } else { format!(" ({})", more.join(", ")) },
            less.len(),
            if less.is_empty() { String::new() } else { format!(" ({})", less.join(", ")) },
            notes.len() - more.len() - less.len()
        ))
    }

    /// Which llama.cpp each side measured, one line.
    pub fn llama_cpp_line(&self) -> String {
        if self.base_llama_cpp == self.new_llama_cpp {
            format!("llama.cpp (both sides): {}", self.base_llama_cpp)
        } else {
            format!(
                "llama.cpp: base {} -> new {}",
                self.base_llama_cpp, self.new_llama_cpp
            )
        }
    }

    pub fn to_markdown(&self) -> String {
        let mut out = format!("### quantbench: {}\n\n", self.verdict_line());
        let _ = writeln!(out, "| {} |", Self::HEADER.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(Self::HEADER.len()));
        for row in self.rows() {
            let cells: Vec<String> = row.iter().map(|c| c.replace('|', "/")).collect();
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
        let _ = writeln!(out, "\n{}", self.llama_cpp_line());
        if let Some(energy) = self.energy_line() {
            let _ = writeln!(out, "\n{energy}");
        }
        let _ = writeln!(out, "\n{}", self.method_line());
        for line in self.confirmation_lines() {
            let _ = writeln!(out, "\n{line}");
        }
        out
    }

    pub fn to_json(&self) -> String {
        // Plain data: serializing cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// JUnit XML: one test case per cell; a failure for each confirmed
    /// regression (`type="confirmed-regression"`, or
    /// `"quality-regression"`), a `<skipped>` naming each suspect and each
    /// verdict that is neither same nor improved.
    pub fn to_junit(&self) -> String {
        let failures = self
            .cells
            .iter()
            .filter(|c| self.junit_failure(c).is_some())
            .count();
        let mut out = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n<testsuite name=\"quantbench {} vs {}\" tests=\"{}\" failures=\"{failures}\">\n",
            xml(&self.new_run),
            xml(&self.base_run),
            self.cells.len()
        );
        for (c, row) in self.cells.iter().zip(self.rows()) {
            let _ = write!(
                out,
                "<testcase classname=\"{}.{}\" name=\"{}\">",
                xml(&c.board),
                xml(&c.kind),
                xml(&c.cell)
            );
            if let Some(kind) = self.junit_failure(c) {
                let change = match self.confirmed_of(c) {
                    Some(r) if c.verdict != Verdict::Regressed => format!(
                        "{:+.1}% since {}",
                        (r.ratio.unwrap_or(1.0) - 1.0) * 100.0,
                        self.confirmation.against.as_deref().unwrap_or("?")
                    ),
                    _ => row[4].clone(),
                };
                let _ = write!(
                    out,
                    "<failure type=\"{kind}\" message=\"{kind} {}\">{}</failure>",
                    xml(&change),
                    xml(&row.join(" "))
                );
            } else if c.persistence == Some(Persistence::Suspect) {
                let _ = write!(
                    out,
                    "<skipped message=\"suspect regression {}: the next measurement confirms or clears it\"/>",
                    xml(&row[4])
                );
            } else if !matches!(c.verdict, Verdict::Same | Verdict::Improved) {
                let _ = write!(out, "<skipped message=\"{}\"/>", c.verdict.name());
            }
            out.push_str("</testcase>\n");
        }
        out.push_str("</testsuite>\n</testsuites>\n");
        out
    }

    /// The JUnit failure type of a cell, when it is a confirmed regression.
    fn junit_failure(&self, c: &CellComparison) -> Option<&'static str> {
        if self.is_confirmed(c) {
            Some("confirmed-regression")
        } else if c.verdict == Verdict::QualityRegressed {
            Some("quality-regression")
        } else {
            None
        }
    }
}

/// Five significant digits, however small (NMSE is often 1e-6).
fn significant_digits(v: f64) -> String {
    if v != 0.0 && v.abs() < 1e-2 {
        format!("{v:.4e}")
    } else {
        format!("{v:.5}")
    }
}

fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::stats::SeededRng;

    fn side(invocations: Vec<Vec<f64>>) -> Side {
        Side {
            emulated: false,
            measured: true,
            not_measured_because: String::new(),
            invocations,
            kernel_path: Some("CPU".into()),
            agent_build: "a".into(),
            thermal_noisy: false,
            settled: true,
            disturbed: false,
            quality: vec![("nmse", Some(1e-3), false, None)],
            energy: None,
        }
    }

    #[test]
    fn energy_per_token_changes_are_read_with_their_interval() {
        let with = |joules: f64, se: Option<f64>| Side {
            energy: Some((joules, se, 10)),
            ..side(vec![vec![1.0]])
        };
        // 0.20 -> 0.26 J/token, each known to 1%: more energy.
        let more = energy_change(&with(0.20, Some(0.002)), &with(0.26, Some(0.0026))).unwrap();
        assert!(
            more.contains("+30.0%") && more.ends_with("more energy per token)"),
            "{more}"
        );
        // The same change with 20% errors: nothing the spread can see.
        let wide = energy_change(&with(0.20, Some(0.04)), &with(0.26, Some(0.052))).unwrap();
        assert!(wide.ends_with("no change the spread can see)"), "{wide}");
        let less = energy_change(&with(0.26, Some(0.001)), &with(0.20, Some(0.001))).unwrap();
        assert!(less.ends_with("less energy per token)"), "{less}");
        // One invocation a side: the change, said to have no interval.
        let single = energy_change(&with(0.2, None), &with(0.3, None)).unwrap();
        assert!(single.contains("no interval"), "{single}");
        // Three invocations a side: Student's t, not the normal's 1.96. A
        // +12% change known to 3% a side is seen with ten invocations, not
        // with three.
        let few = |joules: f64, n: u32| Side {
            energy: Some((joules, Some(joules * 0.03), n)),
            ..side(vec![vec![1.0]])
        };
        let ten = energy_change(&few(0.20, 10), &few(0.224, 10)).unwrap();
        assert!(ten.ends_with("more energy per token)"), "{ten}");
        let three = energy_change(&few(0.20, 3), &few(0.224, 3)).unwrap();
        assert!(three.ends_with("no change the spread can see)"), "{three}");
        assert!(energy_change(&side(vec![]), &with(0.2, None)).is_none());
    }

    #[test]
    fn a_model_recipe_without_figures_stands_for_each_cell_the_other_run_measured() {
        let model_key = |cell: &str| CellKey {
            board: "b".into(),
            kind: "model".into(),
            cell_id: cell.into(),
            settings: String::new(),
        };
        let measured: BTreeMap<CellKey, Side> = ["m.gguf/q8_0/pp8/t1", "m.gguf/q8_0/tg2/t1"]
            .into_iter()
            .chain(["m.gguf/q4_0/pp8/t1"])
            .map(|c| (model_key(c), side(vec![vec![1.0]])))
            .collect();
        let refused = Side {
            measured: false,
            not_measured_because: "not made".into(),
            ..side(Vec::new())
        };
        let mut failed: BTreeMap<CellKey, Side> = [(model_key("m.gguf/q8_0//t0"), refused)]
            .into_iter()
            .collect();
        spread_recipe_rows(&mut failed, &measured);
        let cells: Vec<&str> = failed.keys().map(|k| k.cell_id.as_str()).collect();
        assert_eq!(
            cells,
            [
                "m.gguf/q8_0//t0",
                "m.gguf/q8_0/pp8/t1",
                "m.gguf/q8_0/tg2/t1"
            ]
        );
        assert!(failed
            .values()
            .all(|s| !s.measured && s.not_measured_because == "not made"));
        // Measured cells are never spread over.
        let mut unchanged = measured.clone();
        spread_recipe_rows(&mut unchanged, &failed);
        assert_eq!(unchanged.len(), measured.len());
    }

    fn key(i: usize) -> CellKey {
        CellKey {
            board: "b".into(),
            kind: "kernel".into(),
            cell_id: format!("cell{i}"),
            settings: "llm-like/mmap/repack".into(),
        }
    }

    /// Judges base against new for each cell; verdicts in cell order.
    fn verdicts(cells: &[(Side, Side)], settings: &CompareSettings) -> Vec<Verdict> {
        let pairs: Vec<Pair> = cells
            .iter()
            .enumerate()
            .map(|(i, (b, n))| Pair {
                key: key(i),
                floor_key: key(i),
                base: b,
                new: n,
                notes: Vec::new(),
            })
            .collect();
        let (judged, _, _) = judge(&pairs, settings);
        let mut by_cell: Vec<(String, Verdict)> =
            judged.into_iter().map(|c| (c.cell, c.verdict)).collect();
        by_cell.sort_by_key(|(cell, _)| cell.trim_start_matches("cell").parse::<usize>().unwrap());
        by_cell.into_iter().map(|(_, v)| v).collect()
    }

    /// Two-level timings as a board gives them: each invocation's level is
    /// off by `between` (log sd: placement, clocks), its repetitions by
    /// `within` around it.
    fn two_level(
        rng: &mut SeededRng,
        level: f64,
        invocations: usize,
        reps: usize,
        between: f64,
        within: f64,
    ) -> Vec<Vec<f64>> {
        (0..invocations)
            .map(|_| {
                let inv = level * (between * rng.normal()).exp();
                (0..reps)
                    .map(|_| inv * (within * rng.normal()).exp())
                    .collect()
            })
            .collect()
    }

    fn flagged(v: &[Verdict]) -> usize {
        v.iter()
            .filter(|v| matches!(v, Verdict::Regressed | Verdict::Improved))
            .count()
    }

    #[test]
    fn same_commit_pairs_raise_no_more_false_alarms_than_nominal_and_a_10_percent_change_is_found()
    {
        // A quiet board's noise: 2% between invocations, 0.5% within, at
        // the default invocations with 10 repetitions each. First a night
        // where nothing changed: 400 cells.
        let invocations = wire::kernel_job::DEFAULT_INVOCATIONS as usize;
        let mut rng = SeededRng::new(11);
        let settings = CompareSettings::default();
        let mut cell = |factor: f64| {
            (
                side(two_level(&mut rng, 1e5, invocations, 10, 0.02, 0.005)),
                side(two_level(
                    &mut rng,
                    1e5 * factor,
                    invocations,
                    10,
                    0.02,
                    0.005,
                )),
            )
        };
        let null: Vec<(Side, Side)> = (0..400).map(|_| cell(1.0)).collect();
        let v = verdicts(&null, &settings);
        let false_alarms = flagged(&v);
        assert!(
            false_alarms as f64 <= settings.fdr * null.len() as f64,
            "{false_alarms} of 400 unchanged cells flagged"
        );
        // Most unchanged cells are shown to be the same, not left open.
        let inconclusive = v.iter().filter(|v| **v == Verdict::Inconclusive).count();
        assert!(inconclusive <= 40, "{inconclusive} of 400 inconclusive");
        // A night where one kernel got 10% slower: 40 of 400 cells.
        let mut night: Vec<(Side, Side)> = (0..360).map(|_| cell(1.0)).collect();
        night.extend((0..40).map(|_| cell(1.1)));
        let v = verdicts(&night, &settings);
        let found = v[360..]
            .iter()
            .filter(|v| **v == Verdict::Regressed)
            .count();
        assert!(found >= 36, "power {found}/40 for a 10% slowdown");
        assert!(
            flagged(&v[..360]) <= 18,
            "{} false alarms",
            flagged(&v[..360])
        );
    }

    #[test]
    fn the_old_rule_on_pooled_repetitions_of_one_invocation_raises_false_alarms() {
        // The same noise measured as one invocation a side (every run before
        // invocations): the interval sees repetitions only, so placement
        // luck between the two processes is called a change. This is why
        // the unit is the invocation.
        let mut rng = SeededRng::new(5);
        let cells: Vec<(Side, Side)> = (0..200)
            .map(|_| {
                (
                    side(two_level(&mut rng, 1e5, 1, 30, 0.05, 0.005)),
                    side(two_level(&mut rng, 1e5, 1, 30, 0.05, 0.005)),
                )
            })
            .collect();
        let v = verdicts(&cells, &CompareSettings::default());
        assert!(flagged(&v) > 20, "{} of 200", flagged(&v));
        // With invocations the same noise is quiet.
        let cells: Vec<(Side, Side)> = (0..200)
            .map(|_| {
                (
                    side(two_level(&mut rng, 1e5, 5, 6, 0.05, 0.005)),
                    side(two_level(&mut rng, 1e5, 5, 6, 0.05, 0.005)),
                )
            })
            .collect();
        assert!(flagged(&verdicts(&cells, &CompareSettings::default())) <= 10);
    }

    #[test]
    fn noise_floor_raises_the_margin_and_screens_come_first() {
        let mut rng = SeededRng::new(3);
        let base = side(two_level(&mut rng, 1e5, 5, 10, 0.005, 0.002));
        let slow = side(two_level(&mut rng, 1.08e5, 5, 10, 0.005, 0.002));
        let settings = CompareSettings::default();
        assert_eq!(
            verdicts(&[(base, slow)], &settings),
            vec![Verdict::Regressed]
        );
        let mut with_floor = CompareSettings::default();
        with_floor.noise_floors.insert(
            key(0),
            NoiseFloor {
                relative: 0.12,
                source: "test".into(),
            },
        );
        let base = side(two_level(&mut rng, 1e5, 5, 10, 0.005, 0.002));
        let slow = side(two_level(&mut rng, 1.08e5, 5, 10, 0.005, 0.002));
        let v = verdicts(&[(base, slow)], &with_floor);
        assert!(
            matches!(v[0], Verdict::Inconclusive | Verdict::Same),
            "{v:?}"
        );
        let mut disturbed = side(two_level(&mut rng, 1.5e5, 5, 10, 0.005, 0.002));
        disturbed.disturbed = true;
        let mut unsettled = side(two_level(&mut rng, 1.5e5, 5, 10, 0.005, 0.002));
        unsettled.settled = false;
        let base = || side(two_level(&mut SeededRng::new(9), 1e5, 5, 10, 0.005, 0.002));
        assert_eq!(
            verdicts(&[(base(), disturbed), (base(), unsettled)], &settings),
            vec![Verdict::Disturbed, Verdict::Noisy]
        );
    }

    #[test]
    fn a_kld_rise_at_rounding_level_is_not_a_quality_regression() {
        let times = || vec![(0..10).map(|i| 1000.0 + i as f64).collect()];
        let with_kld = |kld: f64| Side {
            quality: vec![("kld_mean", Some(kld), false, None)],
            ..side(times())
        };
        let verdict = |before: f64, after: f64| {
            let (b, n) = (with_kld(before), with_kld(after));
            let pairs = [Pair {
                key: key(0),
                floor_key: key(0),
                base: &b,
                new: &n,
                notes: Vec::new(),
            }];
            judge(&pairs, &CompareSettings::default()).0[0].verdict
        };
        // An F16 file's KLD under two llama.cpp versions: 2.4% apart.
        assert_ne!(verdict(2.6641e-6, 2.7275e-6), Verdict::QualityRegressed);
        // A quantized recipe's KLD half as large again.
        assert_eq!(verdict(1e-3, 1.5e-3), Verdict::QualityRegressed);
    }

    #[test]
    fn a_quality_change_within_its_error_bars_is_not_a_regression() {
        let times = || vec![(0..10).map(|i| 1000.0 + i as f64).collect()];
        let with = |ppl: f64, se: Option<f64>| Side {
            quality: vec![("ppl", Some(ppl), false, se)],
            ..side(times())
        };
        let verdict = |b: Side, n: Side| {
            let pairs = [Pair {
                key: key(0),
                floor_key: key(0),
                base: &b,
                new: &n,
                notes: Vec::new(),
            }];
            judge(&pairs, &CompareSettings::default()).0[0].verdict
        };
        // PPL 4.00 +- 0.10 -> 4.20 +- 0.10: 5% worse, within 2 combined errors.
        assert_ne!(
            verdict(with(4.0, Some(0.1)), with(4.2, Some(0.1))),
            Verdict::QualityRegressed
        );
        // The same change measured to +- 0.01 is a regression, as is one
        // without error bars (rows from before they were recorded).
        assert_eq!(
            verdict(with(4.0, Some(0.01)), with(4.2, Some(0.01))),
            Verdict::QualityRegressed
        );
        assert_eq!(
            verdict(with(4.0, None), with(4.2, None)),
            Verdict::QualityRegressed
        );
    }

    #[test]
    fn junit_has_a_case_per_cell_and_a_failure_per_regression() {
        let base = side(vec![(0..10).map(|i| 1000.0 + i as f64).collect()]);
        let slow = side(vec![(0..10).map(|i| 1500.0 + i as f64).collect()]);
        let pairs = [Pair {
            key: CellKey {
                cell_id: "a<b>".into(),
                ..key(0)
            },
            floor_key: key(0),
            base: &base,
            new: &slow,
            notes: Vec::new(),
        }];
        let (cells, judged, multiple_testing) = judge(&pairs, &CompareSettings::default());
        let mut cmp = Comparison {
            base_run: "r1".into(),
            new_run: "r2".into(),
            base_llama_cpp: "vendored".into(),
            new_llama_cpp: "vendored".into(),
            settings: CompareSettings::default(),
            judged,
            multiple_testing,
            round_adjustment: Vec::new(),
            cells,
            confirmation: Confirmation::default(),
        };
        cmp.mark_first_look();
        // Seen once: a suspect, not a failure.
        let xml = cmp.to_junit();
        assert_eq!(xml.matches("<testcase").count(), 1);
        assert_eq!(xml.matches("<failure").count(), 0, "{xml}");
        assert!(xml.contains("suspect regression"), "{xml}");
        assert!(xml.contains("a&lt;b&gt;"));
        assert!(cmp.any_regression());
        assert_eq!((cmp.suspect_count(), cmp.confirmed_count()), (1, 0));
        let table = cmp.to_table();
        assert!(table.contains("regressed (suspect)"), "{table}");
        assert!(table.contains("1 regressed"), "{table}");
        assert!(table.contains("one invocation a side"), "{table}");
        // Seen again: confirmed, a failure.
        let c = &cmp.cells[0];
        cmp.confirmation.confirmed.push(ConfirmedRegression {
            board: c.board.clone(),
            kind: c.kind.clone(),
            cell: c.cell.clone(),
            settings: c.settings.clone(),
            first_seen: "r1".into(),
            ratio: Some(1.5),
            ci_low: Some(1.4),
            ci_high: Some(1.6),
            ci_level: Some(0.95),
        });
        cmp.confirmation.against = Some("r0".into());
        let xml = cmp.to_junit();
        assert_eq!(
            xml.matches("type=\"confirmed-regression\"").count(),
            1,
            "{xml}"
        );
        assert_eq!(cmp.confirmed_count(), 1);
        assert!(cmp
            .to_table()
            .contains("confirmed regression: b kernel a<b>"));
    }
}
