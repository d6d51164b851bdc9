//! Reproducible synthetic weights and activations shaped like an LLM's.
//!
//! Quantization error depends on the distribution, so uniform or Gaussian
//! test data would flatter every format. The generator reproduces the three
//! features of trained transformer weights that matter to block quantizers:
//!
//! 1. **Per-row scale variation**: each output row `r` gets a scale
//!    `s_r = 0.02 * exp(0.5 * z_r)` with `z_r ~ N(0, 1)` (log-normal), as rows
//!    of trained projections differ in norm by several times.
//! 2. **Heavy tails**: each element is `s_r * t` with `t` drawn from a
//!    Student-t distribution with 5 degrees of freedom (kurtosis 9 versus 3 for
//!    a Gaussian).
//! 3. **Outliers**: a fraction `OUTLIER_FRACTION` (0.1%) of elements is
//!    replaced by `s_r * u * 10..20` with a random sign, an order of magnitude
//!    above the bulk, which is what makes a block's absmax scale coarse.
//!
//! Activations are Gaussian with per-channel (column) scales `exp(0.7 * z)`,
//! mimicking the uneven channel magnitudes of residual-stream activations.
//!
//! Everything is driven by SplitMix64 seeded from `(seed, stream)`, so the
//! same seed gives the same bits on every platform and version of this crate;
//! normal variates use the Box-Muller transform.

/// Share of weight elements replaced by an outlier.
pub const OUTLIER_FRACTION: f64 = 0.001;

/// SplitMix64: tiny, fast and fully specified, so results never depend on a
/// third-party RNG crate's version.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64, stream: u64) -> Self {
        Self {
            state: seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03),
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in the open interval (0, 1).
    pub fn next_open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn next_normal(&mut self) -> f64 {
        let u1 = self.next_open01();
        let u2 = self.next_open01();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Student-t with `dof` degrees of freedom: normal / sqrt(chi2/dof).
    pub fn next_student_t(&mut self, dof: u32) -> f64 {
        let z = self.next_normal();
        let chi2: f64 = (0..dof).map(|_| self.next_normal().powi(2)).sum();
        z / (chi2 / dof as f64).sqrt()
    }
}

/// Row-major `rows x cols` weight matrix (`cols` is the inner dimension K).
/// Rows are generated on all cores; the result does not depend on how many.
pub fn llm_like_weights(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    if out.is_empty() {
        return out;
    }
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let rows_per_worker = rows.div_ceil(workers).max(1);
    std::thread::scope(|scope| {
        for (chunk_index, chunk) in out.chunks_mut(rows_per_worker * cols).enumerate() {
            scope.spawn(move || {
                for (i, row) in chunk.chunks_mut(cols).enumerate() {
                    fill_weight_row(row, chunk_index * rows_per_worker + i, seed);
                }
            });
        }
    });
    out
}

fn fill_weight_row(row: &mut [f32], row_index: usize, seed: u64) {
    // One stream per row keeps a row's values independent of the matrix
    // height and of the number of worker threads.
    let mut rng = SplitMix64::new(seed, row_index as u64 + 1);
    let row_scale = 0.02 * (0.5 * rng.next_normal()).exp();
    for v in row.iter_mut() {
        let value = if rng.next_open01() < OUTLIER_FRACTION {
            let sign = if rng.next_u64() & 1 == 0 { 1.0 } else { -1.0 };
            sign * row_scale * (10.0 + 10.0 * rng.next_open01())
        } else {
            row_scale * rng.next_student_t(5)
        };
        *v = value as f32;
    }
}

/// Row-major `tokens x cols` activations (one row per token).
pub fn llm_like_activations(tokens: usize, cols: usize, seed: u64) -> Vec<f32> {
    let channel_scale = llm_like_channel_scales(cols, seed);
    let mut rng = SplitMix64::new(seed, u64::MAX - 1);
    let mut out = Vec::with_capacity(tokens * cols);
    for _ in 0..tokens {
        for scale in &channel_scale {
            out.push((scale * rng.next_normal()) as f32);
        }
    }
    out
}

/// The standard deviation of each activation channel for `seed`: every
/// token of `llm_like_activations(_, cols, seed)` draws channel `j` from
/// N(0, scale_j^2).
fn llm_like_channel_scales(cols: usize, seed: u64) -> Vec<f64> {
    let mut channel_rng = SplitMix64::new(seed, u64::MAX);
    (0..cols)
        .map(|_| (0.7 * channel_rng.next_normal()).exp())
        .collect()
}

pub use wire::ggml_type::Distribution;

/// The expected square of each activation channel of `activations(
/// distribution, _, cols, seed)`: the per-input-channel sensitivity a
/// codebook quantizer weights its error by (what a calibration run would
/// estimate, without its sampling noise).
pub fn activation_second_moments(distribution: Distribution, cols: usize, seed: u64) -> Vec<f32> {
    match distribution {
        Distribution::LlmLike => llm_like_channel_scales(cols, seed)
            .iter()
            .map(|s| (s * s) as f32)
            .collect(),
        // Uniform in [-1, 1].
        Distribution::Uniform => vec![1.0 / 3.0; cols],
    }
}

/// Weights for `distribution` (row-major, `rows x cols`).
pub fn weights(distribution: Distribution, rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    match distribution {
        Distribution::LlmLike => llm_like_weights(rows, cols, seed),
        Distribution::Uniform => uniform(rows * cols, seed, 1),
    }
}

/// Activations for `distribution` (row-major, `tokens x cols`).
pub fn activations(distribution: Distribution, tokens: usize, cols: usize, seed: u64) -> Vec<f32> {
    match distribution {
        Distribution::LlmLike => llm_like_activations(tokens, cols, seed),
        Distribution::Uniform => uniform(tokens * cols, seed, 2),
    }
}

fn uniform(len: usize, seed: u64, stream: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed, u64::MAX - 1 - stream);
    (0..len)
        .map(|_| (2.0 * rng.next_open01() - 1.0) as f32)
        .collect()
}

/// NMSE of `y = W x` (`tokens x rows`) against the f64 product of the
/// `rows x cols` matrix `w` with `x`: the kernels' tests' measure.
#[cfg(test)]
pub fn output_nmse(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
    y: &[f32],
) -> f64 {
    let (mut err, mut energy) = (0f64, 0f64);
    for t in 0..tokens {
        for r in 0..rows {
            let exact: f64 = (0..cols)
                .map(|j| w[r * cols + j] as f64 * x[t * cols + j] as f64)
                .sum();
            err += (y[t * rows + r] as f64 - exact).powi(2);
            energy += exact * exact;
        }
    }
    err / energy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_gives_same_bits_and_other_seed_differs() {
        let a = llm_like_weights(8, 64, 7);
        let b = llm_like_weights(8, 64, 7);
        let c = llm_like_weights(8, 64, 8);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn smaller_shape_is_prefix_of_taller_one() {
        let small = llm_like_weights(4, 32, 3);
        let tall = llm_like_weights(9, 32, 3);
        assert_eq!(small[..], tall[..small.len()]);
    }

    #[test]
    fn weights_are_heavy_tailed_with_outliers() {
        let w = llm_like_weights(256, 1024, 1);
        let n = w.len() as f64;
        let mean = w.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = w.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let kurt = w.iter().map(|&v| (v as f64 - mean).powi(4)).sum::<f64>() / n / var.powi(2);
        // A Gaussian has kurtosis 3; LLM weights are far above it.
        assert!(kurt > 6.0, "kurtosis {kurt}");
        let std = var.sqrt();
        let beyond_8_sigma = w
            .iter()
            .filter(|&&v| (v as f64 - mean).abs() > 8.0 * std)
            .count();
        assert!(beyond_8_sigma > 0, "no outliers");
    }
}
