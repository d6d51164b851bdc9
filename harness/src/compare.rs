//! Comparing two runs cell by cell: "did my last change make it slower?"
//!
//! Cells are matched by board and cell (kernel rows by `cell_id`, model
//! rows by model, recipe, test and threads). For each, from the raw
//! repetitions: the ratio of medians (new / base, above 1 is slower) with a
//! bootstrap confidence interval, and a Mann-Whitney U p-value. A cell is
//! `regressed` or `improved` only when the change passes the threshold, the
//! interval excludes 1 and p < alpha; a cell too noisy to judge (robust
//! coefficient of variation above `max_cv` on either side) is `noisy`. Quality columns
//! (NMSE; perplexity, KL divergence, top-1 agreement, multiple-choice
//! accuracy) that worsen beyond a tolerance make a `quality-regressed` cell.
//! Emulated rows are never compared with real ones.

use crate::run_dir::RunData;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;
use thiserror::Error;
use wire::rows::CellStatus;
use wire::stats::{mann_whitney_p, median_ratio_ci, robust_cv, Summary};

#[derive(Debug, Error)]
pub enum CompareError {
    #[error("runs {base} and {new} have no measured cell in common (same boards and matrices?); nothing to compare")]
    NothingInCommon { base: String, new: String },
}

/// The thresholds of a comparison.
#[derive(Debug, Clone, Serialize)]
pub struct CompareSettings {
    /// Smallest relative change of the median that counts (0.05 = 5%).
    pub threshold: f64,
    /// Significance level of the Mann-Whitney test.
    pub alpha: f64,
    /// Cells whose robust coefficient of variation (1.4826 x MAD / median)
    /// exceeds this on either side are `noisy`, not judged.
    pub max_cv: f64,
    /// Relative worsening of NMSE, perplexity or KL divergence, and absolute
    /// drop of top-1 agreement or accuracy, that counts as a quality regression.
    pub quality_tolerance: f64,
    /// Confidence level of the bootstrap interval.
    pub level: f64,
    pub bootstrap_rounds: usize,
}

impl Default for CompareSettings {
    fn default() -> Self {
        CompareSettings {
            threshold: 0.05,
            alpha: 0.05,
            max_cv: 0.25,
            quality_tolerance: 0.02,
            level: 0.95,
            bootstrap_rounds: 2000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Regressed,
    QualityRegressed,
    Noisy,
    Improved,
    Unchanged,
    /// Measured on one side only (failed, unsupported or absent on the other).
    NotComparable,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Regressed => "regressed",
            Verdict::QualityRegressed => "quality-regressed",
            Verdict::Noisy => "noisy",
            Verdict::Improved => "improved",
            Verdict::Unchanged => "unchanged",
            Verdict::NotComparable => "not-comparable",
        }
    }

    pub fn is_failure(self) -> bool {
        matches!(self, Verdict::Regressed | Verdict::QualityRegressed)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CellComparison {
    pub board: String,
    /// `kernel` or `model`.
    pub kind: String,
    pub cell: String,
    pub verdict: Verdict,
    pub base_median_ns: Option<f64>,
    pub new_median_ns: Option<f64>,
    /// new / base median time (above 1: slower).
    pub ratio: Option<f64>,
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    pub p_value: Option<f64>,
    pub base_cv: Option<f64>,
    pub new_cv: Option<f64>,
    pub base_samples: usize,
    pub new_samples: usize,
    /// Quality columns that moved, `name base -> new`.
    pub quality: Vec<String>,
    /// What changed beside the code: kernel path, agent build, board probe.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub base_run: String,
    pub new_run: String,
    pub settings: CompareSettings,
    /// Worst first.
    pub cells: Vec<CellComparison>,
}

/// One side's view of a cell.
struct Side {
    emulated: bool,
    measured: bool,
    samples: Vec<f64>,
    median_ns: Option<f64>,
    kernel_path: Option<String>,
    agent_build: String,
    /// Throttled or off the `performance` governor (kernel cells).
    thermal_noisy: bool,
    /// (name, value, higher is better)
    quality: Vec<(&'static str, Option<f64>, bool)>,
}

fn sides(run: &RunData) -> BTreeMap<(String, String, String), Side> {
    let samples = run.samples_by_cell();
    let mut out = BTreeMap::new();
    for r in &run.kernel_rows {
        let key = (r.board.clone(), "kernel".to_string(), r.cell_id.clone());
        out.insert(
            key,
            Side {
                emulated: r.emulated,
                measured: r.status == CellStatus::Ok && r.median_ns.is_some(),
                samples: samples
                    .get(&(r.board.clone(), r.cell_id.clone()))
                    .cloned()
                    .unwrap_or_default(),
                median_ns: r.median_ns,
                kernel_path: Some(r.kernel_path.clone()),
                agent_build: r.agent_build.clone(),
                thermal_noisy: r.thermal_noisy,
                quality: vec![("nmse", r.nmse, false)],
            },
        );
    }
    for r in &run.model_rows {
        let cell = r.cell_id();
        let board_samples = samples
            .get(&(r.board.clone(), cell.clone()))
            .cloned()
            .unwrap_or_default();
        out.insert(
            (r.board.clone(), "model".to_string(), cell),
            Side {
                emulated: r.emulated,
                measured: r.status == CellStatus::Ok && r.avg_ns.is_some(),
                median_ns: Summary::of(&board_samples).map(|s| s.median).or(r.avg_ns),
                samples: board_samples,
                kernel_path: None,
                agent_build: r.agent_build.clone(),
                thermal_noisy: false,
                quality: vec![
                    ("ppl", r.ppl, false),
                    ("kld_mean", r.kld_mean, false),
                    ("top1_agreement", r.top1_agreement, true),
                    ("mc_accuracy", r.mc_accuracy, true),
                ],
            },
        );
    }
    out
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

pub fn compare(
    base: &RunData,
    new: &RunData,
    settings: &CompareSettings,
) -> Result<Comparison, CompareError> {
    let base_sides = sides(base);
    let new_sides = sides(new);
    let mut cells = Vec::new();
    let mut any_common = false;
    for (key, b) in &base_sides {
        let Some(n) = new_sides.get(key) else {
            continue;
        };
        let (board, kind, cell) = key;
        let mut c = CellComparison {
            board: board.clone(),
            kind: kind.clone(),
            cell: cell.clone(),
            verdict: Verdict::NotComparable,
            base_median_ns: b.median_ns,
            new_median_ns: n.median_ns,
            ratio: None,
            ci_low: None,
            ci_high: None,
            p_value: None,
            base_cv: robust_cv(&b.samples),
            new_cv: robust_cv(&n.samples),
            base_samples: b.samples.len(),
            new_samples: n.samples.len(),
            quality: Vec::new(),
            notes: probe_notes(base, new, board),
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
            cells.push(c);
            continue;
        }
        any_common = true;
        c.verdict = judge_time(&mut c, &b.samples, &n.samples, settings);
        // A throttled cell is slow because the board was hot, not because
        // the code changed.
        if (b.thermal_noisy || n.thermal_noisy) && c.verdict != Verdict::NotComparable {
            c.notes.push(format!(
                "thermally noisy in {} (throttled or not the `performance` governor)",
                match (b.thermal_noisy, n.thermal_noisy) {
                    (true, true) => "both runs",
                    (true, false) => "the base run",
                    _ => "the new run",
                }
            ));
            c.verdict = Verdict::Noisy;
        }
        let mut quality_regressed = false;
        for ((name, before, higher_better), (_, after, _)) in b.quality.iter().zip(&n.quality) {
            let (Some(before), Some(after)) = (before, after) else {
                continue;
            };
            let worse = if *higher_better {
                before - after > settings.quality_tolerance
            } else {
                *after > before * (1.0 + settings.quality_tolerance) && after - before > 1e-12
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
        cells.push(c);
    }
    if !any_common {
        return Err(CompareError::NothingInCommon {
            base: base.manifest.run_id.clone(),
            new: new.manifest.run_id.clone(),
        });
    }
    cells.sort_by(|a, b| {
        a.verdict
            .cmp(&b.verdict)
            .then(b.ratio.unwrap_or(0.0).total_cmp(&a.ratio.unwrap_or(0.0)))
    });
    Ok(Comparison {
        base_run: base.manifest.run_id.clone(),
        new_run: new.manifest.run_id.clone(),
        settings: settings.clone(),
        cells,
    })
}

/// The timing verdict from the raw repetitions (medians only when a side
/// kept none: then never judged).
fn judge_time(c: &mut CellComparison, base: &[f64], new: &[f64], s: &CompareSettings) -> Verdict {
    if base.is_empty() || new.is_empty() {
        c.ratio = c.new_median_ns.zip(c.base_median_ns).map(|(n, b)| n / b);
        c.notes
            .push("no repetitions kept on one side: not judged".into());
        return Verdict::NotComparable;
    }
    let seed = c.cell.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    if let Some((ratio, lo, hi)) = median_ratio_ci(base, new, s.level, s.bootstrap_rounds, seed) {
        c.ratio = Some(ratio);
        c.ci_low = Some(lo);
        c.ci_high = Some(hi);
    }
    c.p_value = mann_whitney_p(base, new);
    let noisy = [c.base_cv, c.new_cv]
        .iter()
        .any(|cv| cv.is_some_and(|v| v > s.max_cv));
    if noisy {
        return Verdict::Noisy;
    }
    let (Some(ratio), Some(lo), Some(hi), Some(p)) = (c.ratio, c.ci_low, c.ci_high, c.p_value)
    else {
        return Verdict::Unchanged;
    };
    let significant = p < s.alpha;
    if ratio > 1.0 + s.threshold && lo > 1.0 && significant {
        Verdict::Regressed
    } else if ratio < 1.0 - s.threshold && hi < 1.0 && significant {
        Verdict::Improved
    } else {
        Verdict::Unchanged
    }
}

impl Comparison {
    pub fn count(&self, verdict: Verdict) -> usize {
        self.cells.iter().filter(|c| c.verdict == verdict).count()
    }

    pub fn any_regression(&self) -> bool {
        self.cells.iter().any(|c| c.verdict.is_failure())
    }

    /// `12 cells: 1 regressed, 0 quality-regressed, ...`
    pub fn verdict_line(&self) -> String {
        let parts: Vec<String> = [
            Verdict::Regressed,
            Verdict::QualityRegressed,
            Verdict::Improved,
            Verdict::Noisy,
            Verdict::Unchanged,
            Verdict::NotComparable,
        ]
        .iter()
        .map(|v| format!("{} {}", self.count(*v), v.name()))
        .collect();
        format!(
            "{} vs {}: {} cells: {}",
            self.new_run,
            self.base_run,
            self.cells.len(),
            parts.join(", ")
        )
    }

    fn rows(&self) -> Vec<[String; 9]> {
        self.cells
            .iter()
            .map(|c| {
                let pct = |v: Option<f64>| {
                    v.map(|r| format!("{:+.1}%", (r - 1.0) * 100.0))
                        .unwrap_or_else(|| "–".into())
                };
                let mut detail = c.quality.clone();
                detail.extend(c.notes.iter().cloned());
                [
                    c.verdict.name().to_string(),
                    c.board.clone(),
                    c.kind.clone(),
                    c.cell.clone(),
                    pct(c.ratio),
                    format!("[{}, {}]", pct(c.ci_low), pct(c.ci_high)),
                    c.p_value
                        .map(|p| format!("{p:.3}"))
                        .unwrap_or_else(|| "–".into()),
                    format!(
                        "{}/{}",
                        c.base_cv
                            .map(|v| format!("{:.1}%", v * 100.0))
                            .unwrap_or_else(|| "–".into()),
                        c.new_cv
                            .map(|v| format!("{:.1}%", v * 100.0))
                            .unwrap_or_else(|| "–".into())
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
        "time",
        "95% CI",
        "p",
        "CV base/new",
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
        out
    }

    pub fn to_markdown(&self) -> String {
        let mut out = format!("### quantbench: {}\n\n", self.verdict_line());
        let _ = writeln!(out, "| {} |", Self::HEADER.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(Self::HEADER.len()));
        for row in self.rows() {
            let cells: Vec<String> = row.iter().map(|c| c.replace('|', "/")).collect();
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
        out
    }

    pub fn to_json(&self) -> String {
        // Plain data: serializing cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// JUnit XML: one test case per cell, a failure for each regression.
    pub fn to_junit(&self) -> String {
        let failures = self.cells.iter().filter(|c| c.verdict.is_failure()).count();
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
            if c.verdict.is_failure() {
                let _ = write!(
                    out,
                    "<failure message=\"{} {}\">{}</failure>",
                    c.verdict.name(),
                    xml(&row[4]),
                    xml(&row.join(" "))
                );
            } else if c.verdict == Verdict::NotComparable || c.verdict == Verdict::Noisy {
                let _ = write!(out, "<skipped message=\"{}\"/>", c.verdict.name());
            }
            out.push_str("</testcase>\n");
        }
        out.push_str("</testsuite>\n</testsuites>\n");
        out
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

    fn cell(base: &[f64], new: &[f64]) -> (Verdict, CellComparison) {
        let mut c = CellComparison {
            board: "b".into(),
            kind: "kernel".into(),
            cell: "c".into(),
            verdict: Verdict::NotComparable,
            base_median_ns: None,
            new_median_ns: None,
            ratio: None,
            ci_low: None,
            ci_high: None,
            p_value: None,
            base_cv: robust_cv(base),
            new_cv: robust_cv(new),
            base_samples: base.len(),
            new_samples: new.len(),
            quality: Vec::new(),
            notes: Vec::new(),
        };
        let v = judge_time(&mut c, base, new, &CompareSettings::default());
        (v, c)
    }

    #[test]
    fn a_clear_slowdown_is_regressed_and_a_speedup_improved() {
        let base: Vec<f64> = (0..10).map(|i| 1000.0 + i as f64).collect();
        let slow: Vec<f64> = base.iter().map(|x| x * 1.2).collect();
        let fast: Vec<f64> = base.iter().map(|x| x * 0.8).collect();
        assert_eq!(cell(&base, &slow).0, Verdict::Regressed);
        assert_eq!(cell(&base, &fast).0, Verdict::Improved);
    }

    #[test]
    fn small_or_insignificant_changes_are_unchanged_and_spread_is_noisy() {
        let base: Vec<f64> = (0..10).map(|i| 1000.0 + i as f64).collect();
        // 2% slower: below the threshold however significant.
        let slight: Vec<f64> = base.iter().map(|x| x * 1.02).collect();
        assert_eq!(cell(&base, &slight).0, Verdict::Unchanged);
        // Two repetitions a side cannot reach p < 0.05.
        assert_eq!(cell(&base[..2], &[2000.0, 2001.0]).0, Verdict::Unchanged);
        let wild = [500.0, 1500.0, 700.0, 1900.0, 400.0];
        assert_eq!(cell(&base, &wild).0, Verdict::Noisy);
    }

    #[test]
    fn junit_has_a_case_per_cell_and_a_failure_per_regression() {
        let base: Vec<f64> = (0..10).map(|i| 1000.0 + i as f64).collect();
        let (v, mut c) = cell(&base, &base.iter().map(|x| x * 1.5).collect::<Vec<_>>());
        c.verdict = v;
        c.cell = "a<b>".into();
        let cmp = Comparison {
            base_run: "r1".into(),
            new_run: "r2".into(),
            settings: CompareSettings::default(),
            cells: vec![c],
        };
        let xml = cmp.to_junit();
        assert_eq!(xml.matches("<testcase").count(), 1);
        assert_eq!(xml.matches("<failure").count(), 1);
        assert!(xml.contains("a&lt;b&gt;"));
        assert!(cmp.any_regression());
        assert!(cmp.to_table().contains("1 regressed"));
    }
}
