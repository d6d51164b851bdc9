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

/// The SplitMix64 generator (Steele et al.), enough for resampling.
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
