//! Statistics, computed in one place from raw samples.

use serde::{Deserialize, Serialize};

/// Summary of repeated timings (or any positive samples).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    /// Sample standard deviation (n-1); 0 for a single sample.
    pub stddev: f64,
}

impl Summary {
    /// `None` for an empty slice. NaNs are not expected (timings).
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        let mean = sorted.iter().sum::<f64>() / n as f64;
        let stddev = if n > 1 {
            (sorted.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Some(Summary {
            count: n,
            median,
            min: sorted[0],
            max: sorted[n - 1],
            mean,
            stddev,
        })
    }
}

/// Normalised mean squared error: sum((a-r)^2) / sum(r^2).
pub fn nmse(reference: &[f64], approx: &[f64]) -> f64 {
    let err: f64 = reference
        .iter()
        .zip(approx)
        .map(|(r, a)| (a - r).powi(2))
        .sum();
    let power: f64 = reference.iter().map(|r| r * r).sum();
    if power == 0.0 {
        if err == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        err / power
    }
}

/// Mann-Whitney U test of "the two runs' timings come from the same
/// distribution": the two-sided p-value. Exact (the null distribution
/// counted, ties included) for up to 24 samples in all; beyond that the
/// normal approximation with tie correction, which is good there. The exact test matters for
/// few repetitions: three against three, fully separated, gives p = 0.1
/// (not the 0.0495 the normal approximation claims).
pub fn mann_whitney_p(a: &[f64], b: &[f64]) -> Option<f64> {
    let (n1, n2) = (a.len() as f64, b.len() as f64);
    if a.is_empty() || b.is_empty() {
        return None;
    }
    if a.len() + b.len() <= 24 {
        return Some(exact_rank_sum_p(a, b));
    }
    let mut all: Vec<(f64, usize)> = a
        .iter()
        .map(|&x| (x, 0))
        .chain(b.iter().map(|&x| (x, 1)))
        .collect();
    all.sort_by(|x, y| x.0.total_cmp(&y.0));
    let mut rank_sum_a = 0.0;
    let mut tie_term = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        let ties = (j - i + 1) as f64;
        tie_term += ties.powi(3) - ties;
        rank_sum_a += all[i..=j].iter().filter(|e| e.1 == 0).count() as f64 * avg_rank;
        i = j + 1;
    }
    let u = rank_sum_a - n1 * (n1 + 1.0) / 2.0;
    let n = n1 + n2;
    let mean_u = n1 * n2 / 2.0;
    let var_u = n1 * n2 / 12.0 * ((n + 1.0) - tie_term / (n * (n - 1.0)));
    if var_u <= 0.0 {
        return Some(1.0);
    }
    let z = (u - mean_u).abs() / var_u.sqrt();
    Some((2.0 * (1.0 - standard_normal_cdf(z))).clamp(0.0, 1.0))
}

/// Exact two-sided p of the rank-sum test: under the null every choice of
/// which len(a) of the pooled values belong to `a` is equally likely. Ties
/// get mid-ranks (doubled, to stay integers) and the null distribution of
/// the doubled rank sum is counted over all C(n, len(a)) choices.
fn exact_rank_sum_p(a: &[f64], b: &[f64]) -> f64 {
    let mut pooled: Vec<(f64, bool)> = a
        .iter()
        .map(|&x| (x, true))
        .chain(b.iter().map(|&x| (x, false)))
        .collect();
    pooled.sort_by(|x, y| x.0.total_cmp(&y.0));
    let n = pooled.len();
    // Doubled mid-ranks: tied values share (first + last) of their ranks.
    let mut ranks2 = vec![0usize; n];
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && pooled[j + 1].0 == pooled[i].0 {
            j += 1;
        }
        for r in ranks2.iter_mut().take(j + 1).skip(i) {
            *r = (i + 1) + (j + 1);
        }
        i = j + 1;
    }
    let k = a.len();
    let observed: usize = ranks2
        .iter()
        .zip(&pooled)
        .filter(|(_, p)| p.1)
        .map(|(r, _)| r)
        .sum();
    let max_sum: usize = ranks2.iter().sum();
    // ways[c][s]: choices of c values with doubled rank sum s.
    let mut ways = vec![vec![0f64; max_sum + 1]; k + 1];
    ways[0][0] = 1.0;
    for &r in &ranks2 {
        for c in (1..=k).rev() {
            for s in (r..=max_sum).rev() {
                let add = ways[c - 1][s - r];
                if add != 0.0 {
                    ways[c][s] += add;
                }
            }
        }
    }
    let mean2 = k as f64 * (n as f64 + 1.0);
    let distance = (observed as f64 - mean2).abs();
    let total: f64 = ways[k].iter().sum();
    let extreme: f64 = ways[k]
        .iter()
        .enumerate()
        .filter(|(s, _)| (*s as f64 - mean2).abs() >= distance - 1e-9)
        .map(|(_, w)| w)
        .sum();
    (extreme / total).min(1.0)
}

/// Coefficient of variation (sample standard deviation over mean); `None`
/// for fewer than two samples or a zero mean.
pub fn coefficient_of_variation(samples: &[f64]) -> Option<f64> {
    let s = Summary::of(samples)?;
    (s.count >= 2 && s.mean != 0.0).then(|| s.stddev / s.mean.abs())
}

/// Robust coefficient of variation: 1.4826 x the median absolute
/// deviation over the median (equal to the CV for normal data, but one
/// descheduled repetition among many does not inflate it); `None` for
/// fewer than two samples or a zero median.
pub fn robust_cv(samples: &[f64]) -> Option<f64> {
    let median = Summary::of(samples)?.median;
    if samples.len() < 2 || median == 0.0 {
        return None;
    }
    let deviations: Vec<f64> = samples.iter().map(|x| (x - median).abs()).collect();
    let mad = Summary::of(&deviations)?.median;
    Some(1.4826 * mad / median.abs())
}

/// Ratio of medians `median(new) / median(base)` with a percentile
/// bootstrap confidence interval at `level` (e.g. 0.95): both sides are
/// resampled with replacement `rounds` times. Deterministic for a seed.
pub fn median_ratio_ci(
    base: &[f64],
    new: &[f64],
    level: f64,
    rounds: usize,
    seed: u64,
) -> Option<(f64, f64, f64)> {
    let median = |v: &[f64]| Summary::of(v).map(|s| s.median);
    let ratio = median(new)? / median(base)?;
    let mut rng = SplitMix64(seed);
    let mut ratios = Vec::with_capacity(rounds);
    let mut base_draw = vec![0.0; base.len()];
    let mut new_draw = vec![0.0; new.len()];
    for _ in 0..rounds.max(1) {
        for x in base_draw.iter_mut() {
            *x = base[rng.below(base.len())];
        }
        for x in new_draw.iter_mut() {
            *x = new[rng.below(new.len())];
        }
        if let (Some(b), Some(n)) = (median(&base_draw), median(&new_draw)) {
            if b > 0.0 {
                ratios.push(n / b);
            }
        }
    }
    ratios.sort_by(f64::total_cmp);
    let tail = (1.0 - level.clamp(0.0, 1.0)) / 2.0;
    let at =
        |q: f64| ratios[((q * (ratios.len() - 1) as f64).round() as usize).min(ratios.len() - 1)];
    if ratios.is_empty() {
        return Some((ratio, ratio, ratio));
    }
    Some((ratio, at(tail), at(1.0 - tail)))
}

/// Median of `samples` with a percentile bootstrap confidence interval at
/// `level`; deterministic for a seed.
pub fn median_ci(samples: &[f64], level: f64, rounds: usize, seed: u64) -> Option<(f64, f64, f64)> {
    let median = Summary::of(samples)?.median;
    let mut rng = SplitMix64(seed);
    let mut draw = vec![0.0; samples.len()];
    let mut medians: Vec<f64> = (0..rounds.max(1))
        .filter_map(|_| {
            for x in draw.iter_mut() {
                *x = samples[rng.below(samples.len())];
            }
            Summary::of(&draw).map(|s| s.median)
        })
        .collect();
    medians.sort_by(f64::total_cmp);
    let tail = (1.0 - level.clamp(0.0, 1.0)) / 2.0;
    let at = |q: f64| {
        medians[((q * (medians.len() - 1) as f64).round() as usize).min(medians.len() - 1)]
    };
    Some((median, at(tail), at(1.0 - tail)))
}

/// How a cell's change was estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IntervalMethod {
    /// Two or more invocations on at least one side: the interval covers
    /// the spread between invocations (hierarchical bootstrap, widened to
    /// Student's t on the invocations' log medians where that is wider).
    Invocations,
    /// One invocation a side (runs from before invocations, or emulated
    /// boards): the interval covers repetitions inside one process only and
    /// misses run-to-run spread, so it is too narrow.
    RepetitionsOnly,
}

/// The change of one cell between two runs, at the invocation level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChangeEstimate {
    /// Geometric mean of the new invocations' medians over the base's
    /// (above 1: slower).
    pub ratio: f64,
    pub low: f64,
    pub high: f64,
    /// Two-sided p of "no change": Welch's t on the invocations' log
    /// medians (Mann-Whitney on repetitions with one invocation a side).
    pub p_value: f64,
    pub method: IntervalMethod,
    /// Standard error of the log ratio and its degrees of freedom (Welch),
    /// with invocations.
    pub log_se: Option<f64>,
    pub df: Option<f64>,
}

impl ChangeEstimate {
    /// One-sided p of "the change is within +-`margin`" (0.05: 5%): small
    /// when the ratio is beyond 1 + margin (or below 1 / (1 + margin))
    /// with confidence. The test a regression verdict rests on.
    pub fn p_beyond(&self, margin: f64) -> f64 {
        let excess = self.ratio.ln().abs() - (1.0 + margin).ln();
        match (self.log_se, self.df) {
            (Some(se), Some(df)) if se > 0.0 => 1.0 - student_t_cdf(excess / se, df),
            (Some(_), Some(_)) => {
                if excess > 0.0 {
                    0.0
                } else {
                    1.0
                }
            }
            // One invocation a side: the repetition-level test, when the
            // ratio itself is beyond the margin.
            _ => {
                if excess > 0.0 {
                    self.p_value
                } else {
                    1.0
                }
            }
        }
    }
}

/// Geometric mean; `None` when empty or any value is not positive.
pub fn geometric_mean(values: &[f64]) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| v.is_nan() || *v <= 0.0) {
        return None;
    }
    Some((values.iter().map(|v| v.ln()).sum::<f64>() / values.len() as f64).exp())
}

/// Each invocation's median (empty invocations skipped).
pub fn invocation_medians(invocations: &[Vec<f64>]) -> Vec<f64> {
    invocations
        .iter()
        .filter_map(|reps| Summary::of(reps).map(|s| s.median))
        .collect()
}

/// The spread between invocations: the sample standard deviation of their
/// log medians (about the relative spread: 0.05 is 5%); `None` below two.
pub fn invocation_spread(invocations: &[Vec<f64>]) -> Option<f64> {
    let logs: Vec<f64> = invocation_medians(invocations)
        .iter()
        .filter(|m| **m > 0.0)
        .map(|m| m.ln())
        .collect();
    let s = Summary::of(&logs)?;
    (s.count >= 2).then_some(s.stddev)
}

/// Fewest cells a round must hold before its effect is estimated.
pub const MIN_CELLS_PER_ROUND: usize = 8;

/// Round effects of one run (a randomized complete block design: every
/// cell is measured once per round, in a shuffled order): `log_medians`
/// holds (cell, round, log median of that invocation). Each round's effect
/// is the median, over the cells it holds, of the cell's log median less
/// that cell's mean; the effects are centred so the run keeps its level.
/// Drift that hits every cell of a round alike (a machine warming up, a
/// neighbour for a minute) is then taken out of the spread between
/// invocations, while a change of one cell, or of the whole run, stays.
/// Empty when any round holds fewer than [`MIN_CELLS_PER_ROUND`] cells with
/// two or more invocations (too few to tell a round from a cell).
pub fn round_effects(log_medians: &[(usize, u32, f64)]) -> std::collections::BTreeMap<u32, f64> {
    use std::collections::BTreeMap;
    let mut by_cell: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for &(cell, _, v) in log_medians {
        by_cell.entry(cell).or_default().push(v);
    }
    let means: BTreeMap<usize, f64> = by_cell
        .iter()
        .filter(|(_, v)| v.len() >= 2)
        .map(|(c, v)| (*c, v.iter().sum::<f64>() / v.len() as f64))
        .collect();
    let mut residuals: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
    for &(cell, round, v) in log_medians {
        if let Some(mean) = means.get(&cell) {
            residuals.entry(round).or_default().push(v - mean);
        }
    }
    if residuals.len() < 2 || residuals.values().any(|r| r.len() < MIN_CELLS_PER_ROUND) {
        return BTreeMap::new();
    }
    let mut effects: BTreeMap<u32, f64> = residuals
        .into_iter()
        .filter_map(|(round, r)| Summary::of(&r).map(|s| (round, s.median)))
        .collect();
    let centre = effects.values().sum::<f64>() / effects.len() as f64;
    effects.values_mut().for_each(|e| *e -= centre);
    effects
}

/// One run's time of a cell, the geometric mean of its invocations'
/// medians, with an interval at `level`: Student's t on the log medians
/// with two or more invocations; with one, the bootstrap interval of the
/// median of its repetitions (too narrow: it misses run-to-run spread).
pub fn invocation_time_ci(invocations: &[Vec<f64>], level: f64) -> Option<(f64, f64, f64)> {
    let medians = invocation_medians(invocations);
    let logs: Vec<f64> = medians
        .iter()
        .filter(|m| **m > 0.0)
        .map(|m| m.ln())
        .collect();
    if logs.len() < 2 {
        let all: Vec<f64> = invocations.iter().flatten().copied().collect();
        return median_ci(&all, level, 500, 7);
    }
    let s = Summary::of(&logs)?;
    let t = student_t_quantile(1.0 - (1.0 - level) / 2.0, (logs.len() - 1) as f64);
    let half = t * s.stddev / (logs.len() as f64).sqrt();
    Some((s.mean.exp(), (s.mean - half).exp(), (s.mean + half).exp()))
}

/// How precisely `invocations` know a cell's time: the relative
/// half-width of `invocation_time_ci` at `level` (0.02: +-2%); `None`
/// below two invocations, whose interval would miss run-to-run spread.
pub fn relative_half_width(invocations: &[Vec<f64>], level: f64) -> Option<f64> {
    if invocations.iter().filter(|r| !r.is_empty()).count() < 2 {
        return None;
    }
    let (_, low, high) = invocation_time_ci(invocations, level)?;
    (low > 0.0).then(|| (high / low).sqrt() - 1.0)
}

/// The change from `base` to `new`, each a list of invocations of
/// repetitions, at confidence `level` (e.g. 0.95). Kalibera and Jones: a
/// process is the unit of replication, so the ratio is of the geometric
/// means of invocation medians and its interval comes from resampling
/// invocations, then repetitions within each (`rounds` draws, seeded).
/// A bootstrap over three to five invocations is too narrow (it sees only
/// the spread of what was drawn), so the interval is widened to Welch's t
/// interval on the log medians (df from Welch-Satterthwaite, the pooled
/// spread when one side has a single invocation) where that is wider.
pub fn invocation_change(
    base: &[Vec<f64>],
    new: &[Vec<f64>],
    level: f64,
    rounds: usize,
    seed: u64,
) -> Option<ChangeEstimate> {
    let base: Vec<&Vec<f64>> = base.iter().filter(|r| !r.is_empty()).collect();
    let new: Vec<&Vec<f64>> = new.iter().filter(|r| !r.is_empty()).collect();
    if base.is_empty() || new.is_empty() {
        return None;
    }
    let log_medians = |side: &[&Vec<f64>]| -> Option<Vec<f64>> {
        side.iter()
            .map(|reps| {
                Summary::of(reps)
                    .map(|s| s.median)
                    .filter(|m| *m > 0.0)
                    .map(f64::ln)
            })
            .collect()
    };
    let (lb, ln) = (log_medians(&base)?, log_medians(&new)?);
    if lb.len() < 2 && ln.len() < 2 {
        let flat = |side: &[&Vec<f64>]| side.iter().flat_map(|r| r.iter().copied()).collect();
        let (fb, fnew): (Vec<f64>, Vec<f64>) = (flat(&base), flat(&new));
        let (ratio, low, high) = median_ratio_ci(&fb, &fnew, level, rounds, seed)?;
        return Some(ChangeEstimate {
            ratio,
            low,
            high,
            p_value: mann_whitney_p(&fb, &fnew)?,
            method: IntervalMethod::RepetitionsOnly,
            log_se: None,
            df: None,
        });
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let var = |v: &[f64]| {
        let m = mean(v);
        if v.len() < 2 {
            0.0
        } else {
            v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64
        }
    };
    let diff = mean(&ln) - mean(&lb);
    let (nb, nn) = (lb.len() as f64, ln.len() as f64);
    let (se, df) = if lb.len() >= 2 && ln.len() >= 2 {
        let (ab, an) = (var(&lb) / nb, var(&ln) / nn);
        let se2 = ab + an;
        let df = if se2 > 0.0 {
            se2 * se2 / (ab * ab / (nb - 1.0) + an * an / (nn - 1.0)).max(1e-300)
        } else {
            nb + nn - 2.0
        };
        (se2.sqrt(), df)
    } else {
        // One side has one invocation: its spread is taken to be the other's.
        let (many, _) = if lb.len() >= 2 {
            (&lb, &ln)
        } else {
            (&ln, &lb)
        };
        (
            (var(many) * (1.0 / nb + 1.0 / nn)).sqrt(),
            many.len() as f64 - 1.0,
        )
    };
    let tail = (1.0 - level.clamp(0.0, 1.0)) / 2.0;
    let t = student_t_quantile(1.0 - tail, df);
    let (mut low, mut high) = ((diff - t * se).exp(), (diff + t * se).exp());
    let p_value = if se > 0.0 {
        2.0 * (1.0 - student_t_cdf((diff / se).abs(), df))
    } else if diff == 0.0 {
        1.0
    } else {
        0.0
    };
    let (boot_low, boot_high) = hierarchical_bootstrap(&base, &new, tail, rounds, seed);
    low = low.min(boot_low);
    high = high.max(boot_high);
    Some(ChangeEstimate {
        ratio: diff.exp(),
        low,
        high,
        p_value: p_value.clamp(0.0, 1.0),
        method: IntervalMethod::Invocations,
        log_se: Some(se),
        df: Some(df.max(1.0)),
    })
}

/// Percentile interval (tails `tail`) of the ratio of geometric means of
/// invocation medians, resampling invocations and then repetitions.
fn hierarchical_bootstrap(
    base: &[&Vec<f64>],
    new: &[&Vec<f64>],
    tail: f64,
    rounds: usize,
    seed: u64,
) -> (f64, f64) {
    let mut rng = SplitMix64(seed);
    let mut draw = Vec::new();
    let mut side_log_mean = |side: &[&Vec<f64>], rng: &mut SplitMix64| -> f64 {
        let mut sum = 0.0;
        for _ in 0..side.len() {
            let reps = side[rng.below(side.len())];
            draw.clear();
            draw.extend((0..reps.len()).map(|_| reps[rng.below(reps.len())]));
            let mid = draw.len() / 2;
            let (_, upper, _) = draw.select_nth_unstable_by(mid, f64::total_cmp);
            let mut median = *upper;
            if draw.len() % 2 == 0 {
                let lower = draw[..mid].iter().copied().fold(f64::MIN, f64::max);
                median = (median + lower) / 2.0;
            }
            sum += median.max(f64::MIN_POSITIVE).ln();
        }
        sum / side.len() as f64
    };
    let mut ratios: Vec<f64> = (0..rounds.max(1))
        .map(|_| {
            let b = side_log_mean(base, &mut rng);
            let n = side_log_mean(new, &mut rng);
            n - b
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    let at = |q: f64| {
        ratios[((q * (ratios.len() - 1) as f64).round() as usize).min(ratios.len() - 1)].exp()
    };
    (at(tail), at(1.0 - tail))
}

/// Benjamini-Hochberg at false discovery rate `q`: which of the p-values
/// are discoveries (the largest k with p_(k) <= k q / m, and every smaller).
pub fn benjamini_hochberg(p_values: &[f64], q: f64) -> Vec<bool> {
    let m = p_values.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p_values[a].total_cmp(&p_values[b]));
    let mut cutoff = 0;
    for (rank, &i) in order.iter().enumerate() {
        if p_values[i] <= (rank + 1) as f64 * q / m as f64 {
            cutoff = rank + 1;
        }
    }
    let mut out = vec![false; m];
    for &i in &order[..cutoff] {
        out[i] = true;
    }
    out
}

/// Student's t distribution function (df may be fractional, as Welch's).
pub fn student_t_cdf(t: f64, df: f64) -> f64 {
    if !df.is_finite() || df > 1e6 {
        return standard_normal_cdf(t);
    }
    let x = df / (df + t * t);
    let tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, x);
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The `p` quantile of Student's t with `df` degrees of freedom (bisection
/// on the distribution function; df below 1 is taken as 1).
pub fn student_t_quantile(p: f64, df: f64) -> f64 {
    let df = df.max(1.0);
    let (mut lo, mut hi) = (-1e4, 1e4);
    for _ in 0..200 {
        let mid = (lo + hi) / 2.0;
        if student_t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (lo + hi) / 2.0
}

/// I_x(a, b) by its continued fraction (Numerical Recipes' betacf).
fn regularized_incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    let front = ln_front.exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_continued_fraction(a, b, x) / a
    } else {
        1.0 - front * beta_continued_fraction(b, a, 1.0 - x) / b
    }
}

fn beta_continued_fraction(a: f64, b: f64, x: f64) -> f64 {
    let tiny = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < tiny {
        d = tiny;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        if d.abs() < tiny {
            d = tiny;
        }
        c = 1.0 + aa / c;
        if c.abs() < tiny {
            c = tiny;
        }
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        if d.abs() < tiny {
            d = tiny;
        }
        c = 1.0 + aa / c;
        if c.abs() < tiny {
            c = tiny;
        }
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-14 {
            break;
        }
    }
    h
}

/// Lanczos approximation (g = 7, n = 9), relative error about 1e-15.
fn ln_gamma(x: f64) -> f64 {
    const COEF: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = COEF[0];
    for (i, c) in COEF.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + 7.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// A seeded random stream for simulations and shuffles: SplitMix64 with
/// uniform and normal draws.
#[derive(Debug, Clone)]
pub struct SeededRng(SplitMix64);

impl SeededRng {
    pub fn new(seed: u64) -> SeededRng {
        SeededRng(SplitMix64(seed))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0.next()
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        self.0.below(n)
    }
    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.0.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// The SplitMix64 generator (Steele et al.), enough for resampling.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Change points of a series by an L1 piecewise-constant fit with a penalty
/// per step (the Potts model asv's regression detection solves,
/// `asv.step_detect.solve_potts`): the split that minimises the sum of
/// absolute deviations from each segment's median plus `penalty` per
/// segment. Returns the indices where a new level starts. `penalty`
/// defaults to asv's choice in spirit: a multiple of the series' spread.
pub fn change_points(series: &[f64], penalty: Option<f64>) -> Vec<usize> {
    let n = series.len();
    if n < 3 {
        return Vec::new();
    }
    let penalty = penalty.unwrap_or_else(|| {
        // Median absolute deviation of successive differences: a noise
        // scale that one real step does not inflate.
        let diffs: Vec<f64> = series.windows(2).map(|w| (w[1] - w[0]).abs()).collect();
        let scale = Summary::of(&diffs).map(|s| s.median).unwrap_or(0.0);
        let level = Summary::of(series).map(|s| s.median.abs()).unwrap_or(0.0);
        3.0 * scale.max(1e-3 * level) * (n as f64).ln().max(1.0)
    });
    let cost = |a: usize, b: usize| -> f64 {
        let seg = &series[a..b];
        let m = Summary::of(seg).map(|s| s.median).unwrap_or(0.0);
        seg.iter().map(|x| (x - m).abs()).sum()
    };
    // best[j]: the least cost of series[..j]; start[j]: where its last
    // segment begins.
    let mut best = vec![0.0f64; n + 1];
    let mut start = vec![0usize; n + 1];
    for j in 1..=n {
        let (mut b, mut s) = (f64::INFINITY, 0);
        for (i, before) in best[..j].iter().enumerate() {
            let c = before + cost(i, j) + penalty;
            if c < b {
                b = c;
                s = i;
            }
        }
        best[j] = b;
        start[j] = s;
    }
    let mut points = Vec::new();
    let mut j = n;
    while j > 0 {
        let s = start[j];
        if s > 0 {
            points.push(s);
        }
        j = s;
    }
    points.reverse();
    points
}

/// Abramowitz & Stegun 26.2.17 (absolute error below 7.5e-8).
fn standard_normal_cdf(z: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.231_641_9 * z.abs());
    let poly = t
        * (0.319_381_530
            + t * (-0.356_563_782
                + t * (1.781_477_937 + t * (-1.821_255_978 + t * 1.330_274_429))));
    let tail = (-z * z / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt() * poly;
    if z >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_odd_and_even_counts() {
        let s = Summary::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.mean), (3.0, 1.0, 5.0, 3.0));
        assert!((s.stddev - 2.0).abs() < 1e-12);
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert_eq!(Summary::of(&[7.0]).unwrap().stddev, 0.0);
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn nmse_is_relative_and_handles_zero_reference() {
        assert_eq!(nmse(&[1.0, 1.0], &[1.0, 1.0]), 0.0);
        assert!((nmse(&[2.0, 0.0], &[1.0, 0.0]) - 0.25).abs() < 1e-12);
        assert_eq!(nmse(&[0.0], &[0.0]), 0.0);
        assert!(nmse(&[0.0], &[1.0]).is_infinite());
    }

    #[test]
    fn mann_whitney_separates_shifted_runs_and_not_equal_ones() {
        let a: Vec<f64> = (0..20).map(|i| 100.0 + i as f64).collect();
        let shifted: Vec<f64> = a.iter().map(|x| x + 30.0).collect();
        let same: Vec<f64> = a.iter().rev().copied().collect();
        assert!(mann_whitney_p(&a, &shifted).unwrap() < 0.001);
        assert!(mann_whitney_p(&a, &same).unwrap() > 0.9);
        assert!((standard_normal_cdf(1.96) - 0.975).abs() < 1e-4);
    }

    #[test]
    fn bootstrap_interval_brackets_the_ratio_and_excludes_one_for_a_clear_shift() {
        let base: Vec<f64> = (0..10).map(|i| 100.0 + i as f64).collect();
        let slower: Vec<f64> = base.iter().map(|x| x * 1.3).collect();
        let (ratio, lo, hi) = median_ratio_ci(&base, &slower, 0.95, 2000, 1).unwrap();
        assert!((ratio - 1.3).abs() < 1e-9);
        assert!(lo > 1.0 && lo <= ratio && ratio <= hi, "{lo} {ratio} {hi}");
        let (ratio, lo, hi) = median_ratio_ci(&base, &base, 0.95, 2000, 1).unwrap();
        assert!(lo < 1.0 + 1e-12 && hi > 1.0 - 1e-12 && (ratio - 1.0).abs() < 1e-12);
    }

    #[test]
    fn coefficient_of_variation_is_spread_over_mean() {
        assert_eq!(coefficient_of_variation(&[1.0]), None);
        let cv = coefficient_of_variation(&[9.0, 11.0]).unwrap();
        assert!((cv - 2f64.sqrt() / 10.0).abs() < 1e-12);
    }

    #[test]
    fn change_points_find_a_step_and_ignore_noise() {
        let mut series: Vec<f64> = (0..20).map(|i| 100.0 + (i % 3) as f64).collect();
        series.extend((0..20).map(|i| 130.0 + (i % 3) as f64));
        assert_eq!(change_points(&series, None), vec![20]);
        let flat: Vec<f64> = (0..40).map(|i| 100.0 + (i % 3) as f64).collect();
        assert!(change_points(&flat, None).is_empty());
    }

    #[test]
    fn robust_cv_ignores_one_outlier_that_the_plain_cv_does_not() {
        let mut samples: Vec<f64> = (0..20).map(|i| 100.0 + (i % 5) as f64).collect();
        samples.push(100_000.0);
        assert!(coefficient_of_variation(&samples).unwrap() > 1.0);
        assert!(robust_cv(&samples).unwrap() < 0.05);
    }

    #[test]
    fn student_t_matches_tables() {
        // Two-sided 95% critical values: df 1, 4, 8, 30.
        for (df, t) in [(1.0, 12.706), (4.0, 2.776), (8.0, 2.306), (30.0, 2.042)] {
            let q = student_t_quantile(0.975, df);
            assert!((q - t).abs() < 2e-3, "df {df}: {q} vs {t}");
        }
        assert!((student_t_cdf(0.0, 5.0) - 0.5).abs() < 1e-12);
        assert!((student_t_cdf(1.96, 1e9) - 0.975).abs() < 1e-4);
    }

    #[test]
    fn round_effects_take_out_a_drift_every_cell_shared_and_keep_the_level() {
        // 10 cells x 4 rounds; round 1 was 20% slow for everyone, cell 3 is
        // simply slower than the others.
        let mut table = Vec::new();
        for cell in 0..10 {
            for round in 0..4u32 {
                let drift = if round == 1 { 1.2f64.ln() } else { 0.0 };
                let level = (100.0 + 10.0 * cell as f64).ln();
                let jitter = ((cell * 7 + round as usize * 3) % 5) as f64 * 0.001;
                table.push((cell, round, level + drift + jitter));
            }
        }
        let e = round_effects(&table);
        assert_eq!(e.len(), 4);
        let spread = e[&1] - e[&0];
        assert!((spread - 1.2f64.ln()).abs() < 0.01, "{e:?}");
        assert!(e.values().sum::<f64>().abs() < 1e-9, "centred: {e:?}");
        // Too few cells to tell a round from a cell: no adjustment.
        let few: Vec<_> = table.iter().copied().filter(|t| t.0 < 3).collect();
        assert!(round_effects(&few).is_empty());
    }

    #[test]
    fn benjamini_hochberg_takes_the_step_up_set() {
        let p = [0.01, 0.04, 0.03, 0.20, 0.005];
        // Sorted: .005 .01 .03 .04 .2 against k*0.05/5 = .01 .02 .03 .04 .05.
        assert_eq!(
            benjamini_hochberg(&p, 0.05),
            vec![true, true, true, false, true]
        );
        assert_eq!(benjamini_hochberg(&[0.5, 0.6], 0.05), vec![false, false]);
    }

    #[test]
    fn invocation_change_sees_between_invocation_spread() {
        // Tight repetitions, invocations 10% apart: the repetition-level
        // interval would exclude 1 for a pure placement difference.
        let inv = |level: f64| (0..10).map(|i| level + i as f64 * 0.01).collect::<Vec<_>>();
        let base = vec![inv(100.0), inv(110.0), inv(95.0), inv(105.0)];
        let new = vec![inv(108.0), inv(97.0), inv(103.0), inv(101.0)];
        let c = invocation_change(&base, &new, 0.95, 1000, 7).unwrap();
        assert_eq!(c.method, IntervalMethod::Invocations);
        assert!(c.low < 1.0 && c.high > 1.0, "{c:?}");
        assert!(c.p_value > 0.3);
        let one = invocation_change(&base[..1], &new[..1], 0.95, 1000, 7).unwrap();
        assert_eq!(one.method, IntervalMethod::RepetitionsOnly);
        assert!(
            one.low > 1.0,
            "one invocation a side looks significant: {one:?}"
        );
        // A clear 20% shift with every invocation agreeing.
        let slow: Vec<Vec<f64>> = base
            .iter()
            .map(|r| r.iter().map(|x| x * 1.2).collect())
            .collect();
        let c = invocation_change(&base, &slow, 0.95, 1000, 7).unwrap();
        assert!((c.ratio - 1.2).abs() < 1e-9 && c.low > 1.05, "{c:?}");
    }

    #[test]
    fn exact_mann_whitney_for_few_samples() {
        // 3 against 3, fully separated: 2 of 20 arrangements as extreme.
        let p = mann_whitney_p(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]).unwrap();
        assert!((p - 0.1).abs() < 1e-12, "{p}");
        // 10 against 10, fully separated: 2 / C(20, 10).
        let a: Vec<f64> = (0..10).map(f64::from).collect();
        let b: Vec<f64> = (10..20).map(f64::from).collect();
        let p = mann_whitney_p(&a, &b).unwrap();
        assert!((p - 2.0 / 184_756.0).abs() < 1e-12, "{p}");
        // Interleaved: no evidence.
        let p = mann_whitney_p(&[1.0, 3.0, 5.0], &[2.0, 4.0, 6.0]).unwrap();
        assert!(p > 0.5, "{p}");
        // All tied: no evidence at all.
        let p = mann_whitney_p(&[7.0, 7.0, 7.0], &[7.0, 7.0]).unwrap();
        assert!((p - 1.0).abs() < 1e-12, "{p}");
    }
}
