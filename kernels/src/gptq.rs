//! GPTQ (Frantar et al., 2022) onto GGML's own block formats: each weight
//! row is quantized column by column, and each column's rounding error is
//! spread over the columns not yet quantized, weighted by the inverse of
//! the layer's Hessian H = X^T X (from calibration activations, dampened).
//! Scales are chosen per 32-column block from the row's values as they
//! stand when the block is reached, exactly as the format stores them (an
//! f16 scale per block), so the result is ordinary Q4_0 / Q8_0 blocks that
//! stock llama.cpp loads and runs at that type's speed.
//!
//! Rows are independent given H, so they are split over threads.

use crate::gguf_tensors::{read_weights, tensor_slots, TensorFileError};
use crate::model::ModelError;
use llama_cpp_sys_2 as sys;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
pub use wire::model_job::MatrixError;

#[derive(Debug, thiserror::Error)]
pub enum GptqError {
    #[error("GPTQ writes {0}: it is defined here for q4_0 and q8_0 only")]
    Format(String),
    #[error("{name}: the Hessian is not positive definite even after dampening (a calibration text too short for this matrix?)")]
    NotPositiveDefinite { name: String },
    #[error("{name}: {rows} x {cols} does not fit {format} blocks of 32")]
    Shape {
        name: String,
        rows: usize,
        cols: usize,
        format: &'static str,
    },
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    TensorFile(#[from] TensorFileError),
}

/// The block formats GPTQ rounds onto.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GptqFormat {
    Q4_0,
    Q8_0,
}

const BLOCK: usize = 32;

fn f16_round(value: f32) -> (u16, f32) {
    // SAFETY: pure conversions.
    unsafe {
        let bits = sys::ggml_fp32_to_fp16(value);
        (bits, sys::ggml_fp16_to_fp32(bits))
    }
}

impl GptqFormat {
    pub fn from_name(name: &str) -> Result<GptqFormat, GptqError> {
        match name.to_ascii_lowercase().as_str() {
            "q4_0" => Ok(GptqFormat::Q4_0),
            "q8_0" => Ok(GptqFormat::Q8_0),
            other => Err(GptqError::Format(other.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GptqFormat::Q4_0 => "q4_0",
            GptqFormat::Q8_0 => "q8_0",
        }
    }

    fn ggml_type(self) -> sys::ggml_type {
        match self {
            GptqFormat::Q4_0 => sys::GGML_TYPE_Q4_0,
            GptqFormat::Q8_0 => sys::GGML_TYPE_Q8_0,
        }
    }

    fn block_bytes(self) -> usize {
        match self {
            GptqFormat::Q4_0 => 2 + BLOCK / 2,
            GptqFormat::Q8_0 => 2 + BLOCK,
        }
    }

    /// The block's scale as GGML's reference quantizer picks it (Q4_0: the
    /// value of largest magnitude maps to -8; Q8_0: the largest magnitude
    /// to 127), before rounding to the f16 the block stores: GGML computes
    /// the codes with it and stores the rounded one.
    fn scale(self, block: &[f32]) -> f32 {
        match self {
            GptqFormat::Q4_0 => {
                let mut max = 0f32;
                for &v in block {
                    if v.abs() > max.abs() {
                        max = v;
                    }
                }
                max / -8.0
            }
            GptqFormat::Q8_0 => block.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0,
        }
    }

    /// (stored code, value it decodes to) for `value` under scale `d`,
    /// stored as `stored`.
    fn round(self, value: f32, d: f32, stored: f32) -> (u8, f32) {
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        let d = stored;
        match self {
            GptqFormat::Q4_0 => {
                // As quantize_row_q4_0_ref: trunc(x/d + 8.5), kept in 0..=15.
                let code = (value * inverse + 8.5).floor().clamp(0.0, 15.0) as u8;
                (code, (code as f32 - 8.0) * d)
            }
            GptqFormat::Q8_0 => {
                let code = (value * inverse).round().clamp(-127.0, 127.0) as i8;
                (code as u8, code as f32 * d)
            }
        }
    }

    fn encode(self, scale_bits: u16, codes: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&scale_bits.to_le_bytes());
        match self {
            GptqFormat::Q4_0 => {
                for j in 0..BLOCK / 2 {
                    out.push(codes[j] | (codes[j + BLOCK / 2] << 4));
                }
            }
            GptqFormat::Q8_0 => out.extend_from_slice(codes),
        }
    }
}

/// One matrix quantized: its blocks and how well each method reproduces
/// the layer's output on the calibration activations.
#[derive(Debug, Clone)]
pub struct GptqMatrix {
    /// GGML blocks, row after row.
    pub blocks: Vec<u8>,
    /// Relative output error of plain round-to-nearest on the same grid
    /// (what llama.cpp's reference quantizer does): sum over the rows of
    /// (w-q)^T H (w-q) / w^T H w, H undamped (every row of a matrix of up
    /// to 256 rows; 256 evenly spaced rows of a larger one).
    pub error_rtn: f64,
    /// The same for GPTQ.
    pub error_gptq: f64,
    /// Time spent on H^-1's factor (cubic in the columns) and on the rows
    /// (rows x columns^2: quantizing, compensating, measuring the errors).
    pub factor_seconds: f64,
    pub rows_seconds: f64,
}

/// Tunables; the defaults are the GPTQ paper's.
#[derive(Debug, Clone, Copy)]
pub struct GptqOptions {
    /// Added to H's diagonal, as a fraction of its mean.
    pub damp: f64,
    pub threads: usize,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions {
            damp: 0.01,
            threads: 1,
        }
    }
}

/// A dot product with independent partial sums, so the compiler can keep
/// several SIMD lanes busy (a single running sum is one long dependency).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut sum: f64 = acc.iter().sum();
    for i in chunks * 8..a.len().min(b.len()) {
        sum += a[i] * b[i];
    }
    sum
}

/// Splits `0..n` into at most `threads` contiguous ranges.
fn ranges(n: usize, threads: usize) -> Vec<std::ops::Range<usize>> {
    let per = n.div_ceil(threads.max(1)).max(1);
    (0..n).step_by(per).map(|s| s..(s + per).min(n)).collect()
}

/// Lower Cholesky factor of the `n x n` row-major `a`, in place, column by
/// column (each column's rows below the diagonal are independent, so they
/// are split over threads); false when `a` is not positive definite.
fn cholesky(a: &mut [f64], n: usize, threads: usize) -> bool {
    for j in 0..n {
        let (head, tail) = a.split_at_mut((j + 1) * n);
        let row_j = &mut head[j * n..];
        let diagonal = row_j[j] - dot(&row_j[..j], &row_j[..j]);
        if diagonal <= 0.0 || !diagonal.is_finite() {
            return false;
        }
        let diagonal = diagonal.sqrt();
        row_j[j] = diagonal;
        for x in &mut row_j[j + 1..] {
            *x = 0.0;
        }
        let row_j = &row_j[..j];
        let below = n - j - 1;
        let work = below * j;
        let update = |rows: &mut [f64]| {
            for row_i in rows.chunks_exact_mut(n) {
                row_i[j] = (row_i[j] - dot(&row_i[..j], row_j)) / diagonal;
            }
        };
        if work < 1 << 16 || threads <= 1 {
            update(tail);
        } else {
            std::thread::scope(|scope| {
                let per = below.div_ceil(threads) * n;
                for rows in tail.chunks_mut(per) {
                    scope.spawn(move || update(rows));
                }
            });
        }
    }
    true
}

/// The inverse of a lower-triangular `l`, returned transposed (row `j` of
/// the result is column `j` of the inverse), columns split over threads.
fn invert_lower_transposed(l: &[f64], n: usize, threads: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * n];
    std::thread::scope(|scope| {
        // Column j costs about (n - j)^2 / 2: deal columns round-robin so
        // every thread gets a fair share.
        let threads = threads.max(1);
        let mut columns: Vec<Vec<(usize, &mut [f64])>> = (0..threads).map(|_| Vec::new()).collect();
        for (j, column) in out.chunks_exact_mut(n).enumerate() {
            columns[j % threads].push((j, column));
        }
        for share in columns {
            scope.spawn(move || {
                for (j, x) in share {
                    x[j] = 1.0 / l[j * n + j];
                    for i in j + 1..n {
                        let row = &l[i * n..i * n + i];
                        x[i] = -dot(&row[j..i], &x[j..i]) / l[i * n + i];
                    }
                }
            });
        }
    });
    out
}

/// GPTQ's `U`: the upper Cholesky factor of H^-1 (H^-1 = U^T U), row-major.
/// With J the order-reversing permutation and J H J = L L^T, H^-1 = U^T U
/// for U = J L^-1 J: one Cholesky and one triangular inverse, no explicit
/// H^-1.
fn inverse_hessian_factor(
    h: &[f64],
    n: usize,
    name: &str,
    threads: usize,
) -> Result<Vec<f64>, GptqError> {
    let mut reversed = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            reversed[i * n + j] = h[(n - 1 - i) * n + (n - 1 - j)];
        }
    }
    if !cholesky(&mut reversed, n, threads) {
        return Err(GptqError::NotPositiveDefinite {
            name: name.to_string(),
        });
    }
    let inverse_t = invert_lower_transposed(&reversed, n, threads);
    // U[i][j] = Linv[n-1-i][n-1-j] = inverse_t[n-1-j][n-1-i].
    let mut u = vec![0.0; n * n];
    for i in 0..n {
        for j in i..n {
            u[i * n + j] = inverse_t[(n - 1 - j) * n + (n - 1 - i)];
        }
    }
    Ok(u)
}

/// Quantizes a group of rows: round-to-nearest when `u` is `None`, GPTQ
/// with it (`u` as f32: the compensation is an f32 update of the f32
/// weights). The rows go through the columns together, so each line of
/// `u` is read from memory once per group, not once per row. Returns per
/// row (blocks, dequantized row).
fn quantize_rows(
    rows: &[&[f32]],
    u: Option<&[f32]>,
    format: GptqFormat,
) -> Vec<(Vec<u8>, Vec<f32>)> {
    let n = rows.first().map_or(0, |r| r.len());
    let mut w: Vec<Vec<f32>> = rows.iter().map(|r| r.to_vec()).collect();
    let mut out: Vec<(Vec<u8>, Vec<f32>)> = rows
        .iter()
        .map(|_| {
            (
                Vec::with_capacity(n / BLOCK * format.block_bytes()),
                vec![0f32; n],
            )
        })
        .collect();
    let mut codes = vec![[0u8; BLOCK]; rows.len()];
    let mut scales = vec![(0u16, 0f32, 0f32); rows.len()];
    let mut errors = vec![0f32; rows.len()];
    for start in (0..n).step_by(BLOCK) {
        for (r, wr) in w.iter().enumerate() {
            let d = format.scale(&wr[start..start + BLOCK]);
            let (bits, stored) = f16_round(d);
            scales[r] = (bits, d, stored);
        }
        for i in start..start + BLOCK {
            for (r, wr) in w.iter().enumerate() {
                let (_, d, stored) = scales[r];
                let (code, value) = format.round(wr[i], d, stored);
                codes[r][i - start] = code;
                out[r].1[i] = value;
                errors[r] = wr[i] - value;
            }
            if let Some(u) = u {
                let line = &u[i * n..(i + 1) * n];
                for (wr, err) in w.iter_mut().zip(&errors) {
                    let err = err / line[i];
                    for (wj, uj) in wr[i + 1..].iter_mut().zip(&line[i + 1..]) {
                        *wj -= err * uj;
                    }
                }
            }
        }
        for (r, (blocks, _)) in out.iter_mut().enumerate() {
            format.encode(scales[r].0, &codes[r], blocks);
        }
    }
    out
}

/// One row (see `quantize_rows`).
fn quantize_row(row: &[f32], u: Option<&[f32]>, format: GptqFormat) -> (Vec<u8>, Vec<f32>) {
    quantize_rows(&[row], u, format).pop().unwrap_or_default()
}

/// Rows whose output error is measured: every row of a small matrix, 256
/// evenly spaced ones of a large (measuring costs cols^2 per row, as much
/// as GPTQ itself).
const ERROR_SAMPLE_ROWS: usize = 256;

/// Rows quantized together (see `quantize_rows`).
const GROUP_ROWS: usize = 16;

/// For the sampled rows, sum of r^T G r for each residual set and w^T G w,
/// with G visited once per tile of its rows (so a large G is read from
/// memory a few times, not once per matrix row).
fn output_errors(
    gram: &[f64],
    n: usize,
    weights: &[Vec<f64>],
    residuals: [&[Vec<f64>]; 2],
    threads: usize,
) -> (f64, f64, f64) {
    const TILE: usize = 64;
    let tiles: Vec<usize> = (0..n).step_by(TILE).collect();
    let partial: Vec<(f64, f64, f64)> = std::thread::scope(|scope| {
        ranges(tiles.len(), threads)
            .into_iter()
            .map(|share| {
                let tiles = &tiles[share];
                scope.spawn(move || {
                    let mut sums = (0.0, 0.0, 0.0);
                    for &start in tiles {
                        for i in start..(start + TILE).min(n) {
                            let g = &gram[i * n..(i + 1) * n];
                            for (s, w) in weights.iter().enumerate() {
                                let (r0, r1) = (&residuals[0][s], &residuals[1][s]);
                                sums.0 += r0[i] * dot(g, r0);
                                sums.1 += r1[i] * dot(g, r1);
                                sums.2 += w[i] * dot(g, w);
                            }
                        }
                    }
                    sums
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    partial
        .into_iter()
        .fold((0.0, 0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2))
}

/// GPTQ on the row-major `rows x cols` matrix `w` with the Gram matrix
/// `gram` (`cols x cols`, X^T X of its inputs, any positive scale).
pub fn gptq_matrix(
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    gram: &[f64],
    format: GptqFormat,
    options: GptqOptions,
) -> Result<GptqMatrix, GptqError> {
    if !cols.is_multiple_of(BLOCK) || w.len() != rows * cols || gram.len() != cols * cols {
        return Err(GptqError::Shape {
            name: name.to_string(),
            rows,
            cols,
            format: format.name(),
        });
    }
    let threads = options.threads.max(1);
    let mut h = gram.to_vec();
    let mut w = w.to_vec();
    // Columns no calibration token ever touched: their weights cannot
    // matter to the output; GPTQ zeroes them and makes H invertible.
    for i in 0..cols {
        if h[i * cols + i] == 0.0 {
            h[i * cols + i] = 1.0;
            for r in 0..rows {
                w[r * cols + i] = 0.0;
            }
        }
    }
    let mean_diagonal = (0..cols).map(|i| h[i * cols + i]).sum::<f64>() / cols as f64;
    for i in 0..cols {
        h[i * cols + i] += options.damp * mean_diagonal;
    }
    let started = std::time::Instant::now();
    let u = inverse_hessian_factor(&h, cols, name, threads)?;
    drop(h);
    let u: Vec<f32> = u.iter().map(|&x| x as f32).collect();
    let factor_seconds = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let step = rows.div_ceil(ERROR_SAMPLE_ROWS).max(1);
    type RowsDone = (Vec<u8>, Vec<(usize, Vec<f32>, Vec<f32>)>);
    let done: Vec<RowsDone> = std::thread::scope(|scope| {
        ranges(rows, threads)
            .into_iter()
            .map(|share| {
                let (w, u) = (&w, &u);
                scope.spawn(move || {
                    let mut blocks = Vec::new();
                    let mut sampled = Vec::new();
                    let share: Vec<usize> = share.collect();
                    for group in share.chunks(GROUP_ROWS) {
                        let group_rows: Vec<&[f32]> = group
                            .iter()
                            .map(|&r| &w[r * cols..(r + 1) * cols])
                            .collect();
                        let done = quantize_rows(&group_rows, Some(u), format);
                        for ((&r, row), (encoded, compensated)) in
                            group.iter().zip(&group_rows).zip(done)
                        {
                            if r % step == 0 {
                                let (_, plain) = quantize_row(row, None, format);
                                sampled.push((r, plain, compensated));
                            }
                            blocks.extend_from_slice(&encoded);
                        }
                    }
                    (blocks, sampled)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut blocks = Vec::with_capacity(rows * cols / BLOCK * format.block_bytes());
    let (mut originals, mut plain_residuals, mut gptq_residuals) =
        (Vec::new(), Vec::new(), Vec::new());
    for (part, sampled) in done {
        blocks.extend_from_slice(&part);
        for (r, plain, compensated) in sampled {
            let row = &w[r * cols..(r + 1) * cols];
            originals.push(row.iter().map(|&x| x as f64).collect::<Vec<f64>>());
            plain_residuals.push(
                row.iter()
                    .zip(&plain)
                    .map(|(a, b)| (a - b) as f64)
                    .collect(),
            );
            gptq_residuals.push(
                row.iter()
                    .zip(&compensated)
                    .map(|(a, b)| (a - b) as f64)
                    .collect(),
            );
        }
    }
    let (error_rtn, error_gptq, energy) = output_errors(
        gram,
        cols,
        &originals,
        [&plain_residuals, &gptq_residuals],
        threads,
    );
    let energy = if energy > 0.0 { energy } else { 1.0 };
    Ok(GptqMatrix {
        blocks,
        error_rtn: error_rtn / energy,
        error_gptq: error_gptq / energy,
        factor_seconds,
        rows_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Replaces, in `quantized` (the unquantized `source` quantized to
/// `format` by llama.cpp, so every other tensor and the metadata are
/// llama.cpp's own), the blocks of every `format` tensor that has a Gram
/// matrix in `grams` with GPTQ's. Tensors the quantizer stored in another
/// type (fallbacks) keep it.
pub fn apply_to_model(
    source: &Path,
    quantized: &Path,
    grams: &std::collections::BTreeMap<String, (Vec<f64>, usize)>,
    format: GptqFormat,
    options: GptqOptions,
) -> Result<Vec<MatrixError>, GptqError> {
    let sources = tensor_slots(source)?;
    let targets = tensor_slots(quantized)?;
    let mut out_file = std::fs::OpenOptions::new()
        .write(true)
        .open(quantized)
        .map_err(|e| GptqError::File {
            path: quantized.display().to_string(),
            message: e.to_string(),
        })?;
    let mut reports = Vec::new();
    for target in targets.iter().filter(|t| t.ty == format.ggml_type()) {
        let (Some((gram, cols)), Some(slot)) = (
            grams.get(&target.name),
            sources.iter().find(|s| s.name == target.name),
        ) else {
            continue;
        };
        if *cols != target.cols || slot.cols != target.cols {
            continue;
        }
        let weights = read_weights(source, slot)?;
        let done = gptq_matrix(
            &target.name,
            &weights,
            target.rows,
            target.cols,
            gram,
            format,
            options,
        )?;
        if done.blocks.len() != target.bytes {
            return Err(GptqError::Shape {
                name: target.name.clone(),
                rows: target.rows,
                cols: target.cols,
                format: format.name(),
            });
        }
        out_file
            .seek(SeekFrom::Start(target.offset))
            .and_then(|_| out_file.write_all(&done.blocks))
            .map_err(|e| GptqError::File {
                path: quantized.display().to_string(),
                message: format!("writing {}: {e}", target.name),
            })?;
        reports.push(MatrixError {
            name: target.name.clone(),
            rows: target.rows,
            cols: target.cols,
            error_rtn: done.error_rtn,
            error_gptq: done.error_gptq,
        });
    }
    out_file.sync_all().map_err(|e| GptqError::File {
        path: quantized.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic matrix and correlated activations.
    fn problem(rows: usize, cols: usize, samples: usize) -> (Vec<f32>, Vec<f64>) {
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let w: Vec<f32> = (0..rows * cols).map(|_| next() as f32).collect();
        let mut gram = vec![0.0; cols * cols];
        for _ in 0..samples {
            // Correlated inputs with uneven channel scales, as activations are.
            let base = next();
            let x: Vec<f64> = (0..cols)
                .map(|j| (base + 0.5 * next()) * (1.0 + 4.0 * ((j % 7) as f64 / 7.0)))
                .collect();
            for a in 0..cols {
                for b in 0..cols {
                    gram[a * cols + b] += x[a] * x[b];
                }
            }
        }
        (w, gram)
    }

    #[test]
    fn rounding_matches_ggmls_reference_quantizer() {
        let (w, _) = problem(1, 256, 1);
        for (format, ty) in [
            (GptqFormat::Q4_0, crate::GgmlType::Q4_0),
            (GptqFormat::Q8_0, crate::GgmlType::Q8_0),
        ] {
            let (blocks, _) = quantize_row(&w[..256], None, format);
            let mut reference = vec![0u8; crate::ffi::row_bytes(ty, 256)];
            crate::ffi::quantize_rows(ty, &w[..256], &mut reference, 1, 256, None);
            assert_eq!(blocks, reference, "{format:?}");
        }
    }

    #[test]
    fn gptq_lowers_the_output_error_below_round_to_nearest() {
        let (w, gram) = problem(16, 128, 400);
        for format in [GptqFormat::Q4_0, GptqFormat::Q8_0] {
            let done = gptq_matrix(
                "t",
                &w,
                16,
                128,
                &gram,
                format,
                GptqOptions {
                    threads: 3,
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(done.blocks.len(), 16 * 4 * format.block_bytes());
            assert!(
                done.error_gptq < done.error_rtn * 0.9,
                "{format:?}: {} vs {}",
                done.error_gptq,
                done.error_rtn
            );
        }
    }

    #[test]
    fn rows_quantized_together_equal_rows_quantized_alone() {
        let (w, mut gram) = problem(5, 96, 300);
        for i in 0..96 {
            gram[i * 96 + i] += 0.5;
        }
        let u: Vec<f32> = inverse_hessian_factor(&gram, 96, "t", 2)
            .unwrap()
            .iter()
            .map(|&x| x as f32)
            .collect();
        let rows: Vec<&[f32]> = w.chunks(96).collect();
        let together = quantize_rows(&rows, Some(&u), GptqFormat::Q4_0);
        for (row, done) in rows.iter().zip(together) {
            assert_eq!(quantize_row(row, Some(&u), GptqFormat::Q4_0), done);
        }
    }

    #[test]
    fn the_threaded_factor_of_a_large_hessian_is_right() {
        // Large enough for the threaded column updates (n = 520, not a
        // multiple of the dot product's 8 lanes).
        let n = 520;
        let (_, mut gram) = problem(1, n, 40);
        for i in 0..n {
            gram[i * n + i] += 1.0;
        }
        let u = inverse_hessian_factor(&gram, n, "t", 2).unwrap();
        // (U^T U H) e_j = e_j for a few columns j.
        for j in [0, 7, 259, 519] {
            let hj: Vec<f64> = (0..n).map(|k| gram[k * n + j]).collect();
            let uh: Vec<f64> = (0..n).map(|m| dot(&u[m * n..(m + 1) * n], &hj)).collect();
            for i in 0..n {
                let s: f64 = (0..n).map(|m| u[m * n + i] * uh[m]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((s - want).abs() < 1e-6, "{i},{j}: {s}");
            }
        }
    }

    #[test]
    fn the_inverse_factor_satisfies_u_transpose_u_times_h_is_identity() {
        let (_, mut gram) = problem(1, 32, 100);
        for i in 0..32 {
            gram[i * 32 + i] += 1.0;
        }
        let u = inverse_hessian_factor(&gram, 32, "t", 2).unwrap();
        for i in 0..32 {
            for j in 0..32 {
                // (U^T U H)[i][j]
                let mut s = 0.0;
                for k in 0..32 {
                    let mut hinv_ik = 0.0;
                    for m in 0..32 {
                        hinv_ik += u[m * 32 + i] * u[m * 32 + k];
                    }
                    s += hinv_ik * gram[k * 32 + j];
                }
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((s - want).abs() < 1e-6, "{i},{j}: {s}");
            }
        }
    }
}
