//! GGML's quantized CPU kernels behind a safe API.
//!
//! This crate owns every `unsafe` call into llama.cpp's GGML (linked from the
//! pinned `llama-cpp-sys-2`, whose bindings bindgen generates from GGML's own
//! headers). It quantizes and dequantizes f32 matrices with GGML's quantizers
//! and runs matrix multiplications through GGML's CPU backend exactly as
//! llama.cpp does: activations converted to the weight type's `vec_dot_type`,
//! GGML's own thread pool, and weights placed in the CPU backend's repacking
//! buffer type when llama.cpp would place them there, otherwise read in place
//! from a mapped file as a model load reads them (`placement`). It also writes
//! synthetic llama GGUF models of real dimensions (`synthetic`), and has
//! quantbench's own non-uniform codebook formats with their kernels
//! (`codebook`, on a persistent `pool`) and its table-lookup bit-plane
//! formats for 2 and 3 bits (`lut`). It does not time
//! anything, choose matrices or write results: that is the agent's and the
//! harness's job.

/// The llama.cpp this crate was built against, as the harness named it
/// (`harness::builds::llama_source`): empty for the pinned crate's own copy.
pub fn llama_source() -> &'static str {
    match env!("QUANTBENCH_LLAMA_ID") {
        "" => "vendored",
        id => id,
    }
}

pub mod amx;
pub mod awq;
pub mod calibration;
pub mod codebook;
pub mod codebook_model;
mod ffi;
pub mod gguf_tensors;
pub mod gptq;
pub mod lut;
pub mod matmul;
pub mod model;
pub mod placement;
pub mod pool;
pub mod synthetic;
pub mod weights;

pub use matmul::{KernelPath, MatMul};
pub use placement::{LoadMode, PageState, StagedMatrix};
pub use wire::ggml_type::{GgmlType, FAMILIES_BY_BITS};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum KernelError {
    #[error("{ty} cannot hold a {rows}x{cols} matrix: {reason}")]
    Unsupported {
        ty: GgmlType,
        rows: usize,
        cols: usize,
        reason: String,
    },
    #[error("expected {expected} values, got {got}")]
    WrongLength { expected: usize, got: usize },
    #[error("GGML failed: {0}")]
    Ggml(String),
    #[error(transparent)]
    Codebook(#[from] codebook::CodebookError),
    #[error(transparent)]
    Lut(#[from] lut::LutError),
    #[error("could not place the weights in a file in {dir} ({reason}); the agent needs write access and free space there as large as the matrix")]
    Staging {
        dir: std::path::PathBuf,
        reason: String,
    },
}

/// A row-major matrix stored in one GGML type (`cols` is the inner dimension).
#[derive(Debug, Clone)]
pub struct QuantizedMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl QuantizedMatrix {
    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes of the stored matrix: what a GEMV has to stream from memory.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }
    pub fn raw(&self) -> &[u8] {
        &self.data
    }
    /// The encoded blocks, for experiments that edit them (e.g. swapping
    /// block scales between matrices, see `examples/data_effect.rs`).
    pub fn raw_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
    pub fn into_bytes(self) -> Vec<u8> {
        self.data
    }

    /// Decodes back to f32 with GGML's own `to_float`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        ffi::dequantize_rows(self.ty, &self.data, &mut out, self.rows, self.cols);
        out
    }
}

/// Quantizes a row-major `rows x cols` f32 matrix with GGML's quantizer for
/// `ty` (the same routine `llama-quantize` uses, without an importance
/// matrix). Rows are split across all cores, as llama.cpp's quantizer does.
/// The types GGML cannot make without an importance matrix (IQ2_XXS,
/// IQ2_XS) are refused: use [`quantize_with_importance`].
pub fn quantize(
    ty: GgmlType,
    rows: usize,
    cols: usize,
    values: &[f32],
) -> Result<QuantizedMatrix, KernelError> {
    if ty.requires_importance() {
        return Err(KernelError::Unsupported {
            ty,
            rows,
            cols,
            reason: format!("GGML quantizes {ty} only with an importance matrix (spell it {ty}+imatrix in a kernel matrix)"),
        });
    }
    quantize_weighted(ty, rows, cols, values, None)
}

/// [`quantize`] with an importance per input column (what `llama-imatrix`
/// collects: the mean squared activation of each column), as
/// `llama-quantize --imatrix` quantizes: the quantizer weighs each
/// weight's error by its column's importance.
pub fn quantize_with_importance(
    ty: GgmlType,
    rows: usize,
    cols: usize,
    values: &[f32],
    importance: &[f32],
) -> Result<QuantizedMatrix, KernelError> {
    if importance.len() != cols {
        return Err(KernelError::WrongLength {
            expected: cols,
            got: importance.len(),
        });
    }
    quantize_weighted(ty, rows, cols, values, Some(importance))
}

fn quantize_weighted(
    ty: GgmlType,
    rows: usize,
    cols: usize,
    values: &[f32],
    importance: Option<&[f32]>,
) -> Result<QuantizedMatrix, KernelError> {
    if values.len() != rows * cols {
        return Err(KernelError::WrongLength {
            expected: rows * cols,
            got: values.len(),
        });
    }
    if let Some(reason) = ty.unsupported_reason(cols) {
        return Err(KernelError::Unsupported {
            ty,
            rows,
            cols,
            reason,
        });
    }
    let row_bytes = ty.row_bytes(cols);
    let mut data = vec![0u8; row_bytes * rows];
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(rows.max(1));
    let rows_per_worker = rows.div_ceil(workers).max(1);
    std::thread::scope(|scope| {
        for (chunk_index, dst) in data.chunks_mut(rows_per_worker * row_bytes).enumerate() {
            let first_row = chunk_index * rows_per_worker;
            let chunk_rows = dst.len() / row_bytes;
            let src = &values[first_row * cols..(first_row + chunk_rows) * cols];
            scope.spawn(move || ffi::quantize_rows(ty, src, dst, chunk_rows, cols, importance));
        }
    });
    Ok(QuantizedMatrix {
        ty,
        rows,
        cols,
        data,
    })
}

/// CPU features GGML was compiled with and detected (e.g. `avx2`, `dotprod`).
pub fn ggml_cpu_features() -> Vec<&'static str> {
    ffi::cpu_features()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::llm_like_weights;

    fn nmse(reference: &[f32], approx: &[f32]) -> f64 {
        let err: f64 = reference
            .iter()
            .zip(approx)
            .map(|(&r, &a)| (r as f64 - a as f64).powi(2))
            .sum();
        let power: f64 = reference.iter().map(|&r| (r as f64).powi(2)).sum();
        err / power
    }

    /// Every type, those GGML makes only with an importance matrix with a
    /// uniform one (which weighs every column alike, as none does).
    fn quantize_any(ty: GgmlType, rows: usize, cols: usize, w: &[f32]) -> QuantizedMatrix {
        if ty.requires_importance() {
            quantize_with_importance(ty, rows, cols, w, &vec![1.0; cols]).unwrap()
        } else {
            quantize(ty, rows, cols, w).unwrap()
        }
    }

    #[test]
    fn types_that_need_an_importance_matrix_are_refused_without_one_in_a_sentence() {
        let w = llm_like_weights(2, 256, 1);
        for ty in [GgmlType::IQ2XXS, GgmlType::IQ2XS] {
            let err = quantize(ty, 2, 256, &w).unwrap_err().to_string();
            assert!(err.contains(&format!("{ty}+imatrix")), "{err}");
        }
        assert!(matches!(
            quantize_with_importance(GgmlType::Q2K, 2, 256, &w, &[1.0; 255]),
            Err(KernelError::WrongLength { .. })
        ));
    }

    /// The importance reaches GGML's quantizer: with it, the error weighed
    /// by it falls (the columns that matter are kept better), for a K-quant
    /// and for the i-quants.
    #[test]
    fn an_importance_matrix_lowers_the_error_it_weighs() {
        let (rows, cols) = (64, 1024);
        let w = llm_like_weights(rows, cols, 3);
        // A few columns a hundred times as important as the rest.
        let importance: Vec<f32> = (0..cols)
            .map(|c| if c % 37 == 0 { 100.0 } else { 1.0 })
            .collect();
        let weighted = |q: &QuantizedMatrix| {
            let d = q.dequantize();
            (0..rows * cols)
                .map(|i| importance[i % cols] as f64 * (w[i] - d[i]) as f64 * (w[i] - d[i]) as f64)
                .sum::<f64>()
        };
        for ty in [GgmlType::Q2K, GgmlType::IQ3S, GgmlType::IQ2S] {
            let plain = weighted(&quantize(ty, rows, cols, &w).unwrap());
            let with =
                weighted(&quantize_with_importance(ty, rows, cols, &w, &importance).unwrap());
            assert!(with < 0.9 * plain, "{ty}: {with:.3e} against {plain:.3e}");
        }
    }

    #[test]
    fn f32_round_trip_is_exact() {
        let w = llm_like_weights(4, 64, 1);
        let q = quantize(GgmlType::F32, 4, 64, &w).unwrap();
        assert_eq!(q.dequantize(), w);
        assert_eq!(q.bytes(), 4 * 64 * 4);
    }

    #[test]
    fn host_side_type_table_matches_the_linked_ggml() {
        for ty in GgmlType::ALL {
            assert_eq!(ty.block_size(), ffi::block_size(ty), "{ty}");
            assert_eq!(ty.row_bytes(4096), ffi::row_bytes(ty, 4096), "{ty}");
        }
    }

    #[test]
    fn k_quant_refuses_gemma_width() {
        let w = llm_like_weights(2, 1152, 1);
        let err = quantize(GgmlType::Q4K, 2, 1152, &w).unwrap_err();
        assert!(err.to_string().contains("multiple of 256"), "{err}");
    }

    #[test]
    fn wrong_length_is_an_error_not_a_crash() {
        assert!(matches!(
            quantize(GgmlType::Q8_0, 2, 32, &[0.0; 10]),
            Err(KernelError::WrongLength { .. })
        ));
    }

    /// Documented quality bounds: NMSE of dequantized weights on the seeded
    /// LLM-like generator (256x1024). Measured values sit well inside these
    /// (see docs/contributing.md, "Tests"); a bound failing means a kernel or the generator changed.
    #[test]
    fn every_type_meets_its_documented_nmse_bound() {
        let (rows, cols) = (256, 1024);
        let w = llm_like_weights(rows, cols, 42);
        for ty in GgmlType::ALL {
            let q = quantize_any(ty, rows, cols, &w);
            let e = nmse(&w, &q.dequantize());
            eprintln!("measured NMSE {ty}: {e:.3e}");
            assert!(
                e <= ty.documented_nmse_bound(),
                "{ty}: NMSE {e:.3e} above bound {:.1e}",
                ty.documented_nmse_bound()
            );
        }
    }

    #[test]
    fn more_bits_never_give_more_error_within_a_family() {
        let (rows, cols) = (128, 1024);
        let w = llm_like_weights(rows, cols, 7);
        let err = |ty| nmse(&w, &quantize_any(ty, rows, cols, &w).dequantize());
        for family in FAMILIES_BY_BITS {
            for pair in family.windows(2) {
                let (fewer, more) = (pair[0], pair[1]);
                assert!(
                    err(more) <= err(fewer),
                    "{more} ({:.3e}) worse than {fewer} ({:.3e})",
                    err(more),
                    err(fewer)
                );
            }
        }
    }

    #[test]
    fn gemv_matches_dequantized_reference_for_every_type() {
        let (rows, cols, tokens) = (64, 512, 3);
        let w = llm_like_weights(rows, cols, 5);
        let x = weights::llm_like_activations(tokens, cols, 5);
        for ty in GgmlType::ALL {
            let q = quantize_any(ty, rows, cols, &w);
            let deq = q.dequantize();
            let scratch = std::env::temp_dir();
            for (repack, mode) in [
                (false, LoadMode::Mmap),
                (false, LoadMode::NoMmap),
                (true, LoadMode::Mmap),
                (true, LoadMode::NoMmap),
            ] {
                let staged = StagedMatrix::stage(q.clone(), mode, &scratch).unwrap();
                let mut mm = MatMul::new(&staged, tokens, 2, repack).unwrap();
                mm.set_activations(&x).unwrap();
                mm.compute().unwrap();
                let y = mm.output();
                let mut y_ref = vec![0f32; tokens * rows];
                for t in 0..tokens {
                    for r in 0..rows {
                        y_ref[t * rows + r] = (0..cols)
                            .map(|k| deq[r * cols + k] as f64 * x[t * cols + k] as f64)
                            .sum::<f64>() as f32;
                    }
                }
                // Activations are themselves quantized to vec_dot_type
                // (q8_0/q8_K for most types), so allow that much error.
                let e = nmse(&y_ref, &y);
                assert!(
                    e < 2e-3,
                    "{ty} repack={repack} {mode}: {e:.3e} ({})",
                    mm.path()
                );
                let placement = mm.placement();
                let repacked = !["CPU", "CPU_Mapped"].contains(&mm.path().weight_buffer.as_str());
                let expected = match (mode, repacked) {
                    (_, true) => "repack/",
                    (LoadMode::Mmap, false) => "mmap/",
                    (LoadMode::NoMmap, false) => "heap/",
                };
                assert!(placement.starts_with(expected), "{ty} {mode}: {placement}");
            }
        }
    }
}
