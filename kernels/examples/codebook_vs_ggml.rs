//! SqueezeLLM-style codebooks (SQ4, SQ3, with and without 0.45% exact
//! outliers) against GGML's Q4_0, IQ4_NL and Q3_K on Llama-3.2-1B's
//! shapes, with the kernel matrix's LLM-like weights and activations:
//! bits per weight, output NMSE (against an f64 product with the
//! unquantized weights, as the kernel matrix measures it), and the GEMV
//! (batch 1) time with all threads.
//!
//!     cargo run --release -p kernels --example codebook_vs_ggml [-- --threads 2]
//!
//! Sensitivities for the codebooks are the expected second moments of the
//! activations' channels (the generator makes them uneven). A benchmark:
//! numbers, not assertions.

mod common;

use kernels::codebook::{CodebookMatrix, CodebookType};
use kernels::pool::WorkerPool;
use kernels::weights::{activation_second_moments, activations, weights, Distribution};
use kernels::{quantize, GgmlType, LoadMode, MatMul, StagedMatrix};
use std::time::Instant;

const SEED: u64 = 42;

/// NMSE of `y` (tokens x rows) against the f64 product with `w`.
fn output_nmse(w: &[f32], x: &[f32], y: &[f32], rows: usize, cols: usize, tokens: usize) -> f64 {
    let (mut err, mut power) = (0f64, 0f64);
    for t in 0..tokens {
        let xt = &x[t * cols..(t + 1) * cols];
        for r in (0..rows).step_by(rows.div_ceil(256).max(1)) {
            let exact: f64 = w[r * cols..(r + 1) * cols]
                .iter()
                .zip(xt)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            err += (y[t * rows + r] as f64 - exact).powi(2);
            power += exact * exact;
        }
    }
    err / power
}

fn median_us(mut f: impl FnMut()) -> f64 {
    // Warm for 100 ms, not a few calls: on a VM the pool's worker thread,
    // asleep through the quantization, takes a while of back-to-back calls
    // before its wake-ups stop costing hundreds of microseconds.
    let warm = Instant::now();
    while warm.elapsed().as_millis() < 100 {
        f();
    }
    let mut samples: Vec<f64> = (0..30)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    let threads = common::arg("--threads", 2);
    let shapes = [
        ("attn_q", 2048, 2048),
        ("attn_kv", 512, 2048),
        ("ffn_up", 8192, 2048),
        ("ffn_down", 2048, 8192),
    ];
    println!("llama3.2-1b shapes, LLM-like data, GEMV (batch 1), {threads} threads\n");
    let pool = WorkerPool::new(threads);
    println!(
        "{:<9} {:<10} {:>6} {:>11} {:>10} {:>12}",
        "shape", "type", "bits", "NMSE", "GEMV us", "vs Q4_0 time"
    );
    for (name, rows, cols) in shapes {
        let w = weights(Distribution::LlmLike, rows, cols, SEED);
        let x = activations(Distribution::LlmLike, 4, cols, SEED);
        // The expected second moment of each channel of these activations
        // (the generator's channel scales, squared).
        let second_moment = activation_second_moments(Distribution::LlmLike, cols, SEED);
        let mut q4_0_us = f64::NAN;
        for ty in [GgmlType::Q4_0, GgmlType::IQ4NL, GgmlType::Q3K] {
            let q = quantize(ty, rows, cols, &w).expect("quantize");
            let bits = q.bytes() as f64 * 8.0 / (rows * cols) as f64;
            let staged =
                StagedMatrix::stage(q, LoadMode::Mmap, &std::env::temp_dir()).expect("stage");
            // One GGML thread pool at a time: an idle one still polls for
            // work and would take a core from the one being timed.
            let nmse = {
                let mut four = MatMul::new(&staged, 4, threads, true).expect("matmul");
                four.set_activations(&x).expect("activations");
                four.compute().expect("compute");
                output_nmse(&w, &x, &four.output(), rows, cols, 4)
            };
            let mut one = MatMul::new(&staged, 1, threads, true).expect("matmul");
            one.set_activations(&x[..cols]).expect("activations");
            let us = common::median_gemv_us(&mut one);
            if ty == GgmlType::Q4_0 {
                q4_0_us = us;
            }
            println!(
                "{name:<9} {:<10} {bits:>6.3} {nmse:>11.3e} {us:>10.1} {:>11.2}x",
                ty.name(),
                us / q4_0_us
            );
        }
        for spelling in ["SQ4", "SQ4+S0.45", "SQ3", "SQ3+S0.45"] {
            let ty = CodebookType::parse(spelling).expect("spelling");
            let started = Instant::now();
            let m = CodebookMatrix::quantize(ty, &w, rows, cols, Some(&second_moment))
                .expect("quantize");
            let quantize_s = started.elapsed().as_secs_f64();
            let mut y = vec![0f32; 4 * rows];
            m.gemm(&x, 4, &mut y, &pool);
            let nmse = output_nmse(&w, &x, &y, rows, cols, 4);
            let mut y1 = vec![0f32; rows];
            let us = median_us(|| m.gemm(&x[..cols], 1, &mut y1, &pool));
            println!(
                "{name:<9} {spelling:<10} {:>6.3} {nmse:>11.3e} {us:>10.1} {:>11.2}x   (quantized in {quantize_s:.1} s)",
                m.bits_per_weight(),
                us / q4_0_us
            );
        }
        println!();
    }
}
