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
/// distribution", with the normal approximation and tie correction.
/// Returns the two-sided p-value; meaningful from about 8 samples a side.
pub fn mann_whitney_p(a: &[f64], b: &[f64]) -> Option<f64> {
    let (n1, n2) = (a.len() as f64, b.len() as f64);
    if a.is_empty() || b.is_empty() {
        return None;
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
}
