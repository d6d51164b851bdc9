//! What the kernel benchmarks share: timing one GEMV the way a kernel cell
//! does (warm-up, then the median of repetitions), and their options.
// Each example compiles this module on its own and uses part of it.
#![allow(dead_code)]

use kernels::MatMul;
use std::time::Instant;

/// Median time of one `compute`, in microseconds, after 3 warm-up runs,
/// over 30 timed repetitions.
pub fn median_gemv_us(mm: &mut MatMul) -> f64 {
    for _ in 0..3 {
        mm.compute().expect("compute");
    }
    let mut samples: Vec<f64> = (0..30)
        .map(|_| {
            let t = Instant::now();
            mm.compute().expect("compute");
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// The number after `name` on the command line, or `default`.
pub fn arg(name: &str, default: usize) -> usize {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
