//! What GPTQ and the importance matrix cost, and how it grows.
//!
//!     cargo run --release -p kernels --example gptq_cost [-- --rows 2048 --max-cols 8192 --threads 2]
//!
//! First the fixture model, as the `gptq-q4_0` recipe makes it: the
//! calibration pass (activations and X^T X of every matrix) and GPTQ on
//! every matrix. Then one `rows x cols` matrix per inner dimension, with a
//! random positive definite Hessian: the factor of H^-1 is cubic in the
//! inner dimension (cols^3) and the rows' pass is rows x cols^2 (each
//! column's error is spread over the columns after it, and the output
//! error is measured before and after). A benchmark: numbers, not
//! assertions.

mod common;

use kernels::calibration::calibrate;
use kernels::gptq::{gptq_matrix, GptqFormat, GptqOptions};
use kernels::weights::llm_like_weights;
use std::path::Path;
use std::time::Instant;

fn main() {
    let rows = common::arg("--rows", 2048);
    let max_cols = common::arg("--max-cols", 4096);
    let threads = common::arg("--threads", 2);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let model = fixtures.join("stories260K.gguf");
    let text = std::fs::read_to_string(fixtures.join("stories-calib.txt")).expect("fixture text");

    let started = Instant::now();
    let calibration =
        calibrate(&model, &text, "stories-calib.txt", 128, threads, true).expect("calibrates");
    let calibrate_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut matrices = 0;
    for stats in calibration.entries.values() {
        let cols = stats.sums.len();
        if cols % 32 != 0 {
            continue;
        }
        let gram = stats.gram.as_ref().expect("asked for X^T X");
        // The fixture's matrices are 64 wide; their row counts vary, and
        // the cost is what matters here: 64 rows stand in for each.
        let w = llm_like_weights(64, cols, 1);
        gptq_matrix(
            "m",
            &w,
            64,
            cols,
            gram,
            GptqFormat::Q4_0,
            GptqOptions {
                threads,
                ..Default::default()
            },
        )
        .expect("gptq");
        matrices += 1;
    }
    println!(
        "fixture stories260K: calibration pass (17 chunks of 128 tokens, X^T X of {} matrices) {calibrate_s:.2} s; GPTQ on {matrices} matrices {:.3} s",
        calibration.entries.len(),
        started.elapsed().as_secs_f64()
    );

    println!("\none {rows} x cols matrix to q4_0, {threads} threads:");
    println!(
        "{:>6} {:>12} {:>12} {:>10} {:>10}",
        "cols", "H^-1 factor", "rows pass", "total s", "err ratio"
    );
    let mut cols = 512;
    while cols <= max_cols {
        let w = llm_like_weights(rows, cols, 7);
        // A positive definite Gram matrix with correlated channels: a
        // diagonal plus a few strong directions, as activations have.
        let mut gram = vec![0.0f64; cols * cols];
        for i in 0..cols {
            gram[i * cols + i] = 1.0 + (i % 13) as f64;
        }
        for r in 0..8 {
            let v: Vec<f64> = (0..cols)
                .map(|j| (((j * (r + 3)) % 17) as f64 - 8.0) / 8.0)
                .collect();
            for a in 0..cols {
                for b in 0..cols {
                    gram[a * cols + b] += v[a] * v[b];
                }
            }
        }
        let started = Instant::now();
        let done = gptq_matrix(
            "bench",
            &w,
            rows,
            cols,
            &gram,
            GptqFormat::Q4_0,
            GptqOptions {
                threads,
                ..Default::default()
            },
        )
        .expect("gptq");
        println!(
            "{cols:>6} {:>12.2} {:>12.2} {:>10.2} {:>10.3}",
            done.factor_seconds,
            done.rows_seconds,
            started.elapsed().as_secs_f64(),
            done.error_gptq / done.error_rtn
        );
        cols *= 2;
    }
}
