//! Codebook recipes on whole models: llama.cpp writes the model in F16
//! with the output matrix in Q8_0 (what its own 4- and 3-bit file types
//! keep it in, at least), so the metadata and every other tensor are
//! llama.cpp's own; then every other weight matrix (the layers' and the
//! token embedding) is quantized to a codebook format, with each matrix's
//! input-channel sensitivities from an importance matrix, and written back
//! decoded. llama.cpp has no kernel for these formats, so it evaluates the
//! scheme's quality on the decoded weights; their speed is the kernel
//! matrix's to measure. (F16 holds the decoded weights to about 5e-4 of
//! each value: 1e-7 in NMSE, far below any codebook's error.)

use crate::codebook::{CodebookError, CodebookMatrix, CodebookType, CODEBOOK_BLOCK};
use crate::gguf_tensors::{read_weights, tensor_slots, TensorFileError};
use crate::model::{quantize_model, ModelError, QuantizeRequest};
use llama_cpp_sys_2 as sys;
use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use wire::model_job::CodebookReport;

#[derive(Debug, thiserror::Error)]
pub enum CodebookModelError {
    #[error(transparent)]
    TensorFile(#[from] TensorFileError),
    #[error(transparent)]
    Codebook(#[from] CodebookError),
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// The tensors llama.cpp keeps at higher precision in its low-bit file
/// types, and so does a codebook recipe.
const KEPT_BY_LLAMA_CPP: &str = "output.";

/// Writes `output`: `input` in F16 by llama.cpp (output matrix Q8_0), every
/// other matrix coded to `ty` (see the module comment).
pub fn make_model(
    input: &Path,
    output: &Path,
    ty: CodebookType,
    sensitivities: &BTreeMap<String, Vec<f32>>,
    threads: usize,
) -> Result<CodebookReport, CodebookModelError> {
    quantize_model(
        input,
        output,
        &QuantizeRequest {
            ftype: "F16",
            overrides: &[(
                format!("^{}", KEPT_BY_LLAMA_CPP.replace('.', "\\.")),
                "q8_0".into(),
            )],
            threads,
            importance: &[],
            pure: false,
        },
    )?;
    apply_to_model(output, ty, sensitivities)
}

/// Codes every F32 or F16 matrix of `model` but the output matrix, in
/// place, whose rows are a multiple of 32 wide; `sensitivities` maps a weight's name to one value per input
/// column (an importance matrix's mean squares); matrices without an entry
/// are clustered with uniform sensitivities.
pub fn apply_to_model(
    model: &Path,
    ty: CodebookType,
    sensitivities: &BTreeMap<String, Vec<f32>>,
) -> Result<CodebookReport, CodebookModelError> {
    let started = std::time::Instant::now();
    let file_err = |message: String| CodebookModelError::File {
        path: model.display().to_string(),
        message,
    };
    let slots = tensor_slots(model)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(model)
        .map_err(|e| file_err(e.to_string()))?;
    let mut report = CodebookReport {
        format: ty.to_string(),
        coded: 0,
        left: Vec::new(),
        scheme_bytes: 0,
        params: 0,
        mean_weighted_nmse: 0.0,
        with_importance: 0,
        seconds: 0.0,
    };
    for slot in &slots {
        report.params += (slot.rows * slot.cols) as u64;
        let float = slot.ty == sys::GGML_TYPE_F32 || slot.ty == sys::GGML_TYPE_F16;
        let matrix = slot.rows > 1 && !slot.name.starts_with(KEPT_BY_LLAMA_CPP);
        if !(float && matrix && slot.cols.is_multiple_of(CODEBOOK_BLOCK)) {
            if matrix {
                report.left.push(slot.name.clone());
            }
            report.scheme_bytes += slot.bytes as u64;
            continue;
        }
        let weights = read_weights(model, slot)?;
        let sensitivity = sensitivities
            .get(&slot.name)
            .filter(|s| s.len() == slot.cols);
        report.with_importance += sensitivity.is_some() as usize;
        let coded = CodebookMatrix::quantize(
            ty,
            &weights,
            slot.rows,
            slot.cols,
            sensitivity.map(|s| s.as_slice()),
        )?;
        let decoded = coded.dequantize();
        report.mean_weighted_nmse += weighted_nmse(
            &weights,
            &decoded,
            slot.cols,
            sensitivity.map(|s| s.as_slice()),
        );
        report.scheme_bytes += coded.storage_bytes() as u64;
        report.coded += 1;
        let bytes: Vec<u8> = if slot.ty == sys::GGML_TYPE_F16 {
            decoded
                .iter()
                // SAFETY: a pure conversion.
                .flat_map(|&v| unsafe { sys::ggml_fp32_to_fp16(v) }.to_le_bytes())
                .collect()
        } else {
            decoded.iter().flat_map(|v| v.to_le_bytes()).collect()
        };
        file.seek(SeekFrom::Start(slot.offset))
            .and_then(|_| file.write_all(&bytes))
            .map_err(|e| file_err(format!("writing {}: {e}", slot.name)))?;
    }
    file.sync_all().map_err(|e| file_err(e.to_string()))?;
    report.mean_weighted_nmse /= report.coded.max(1) as f64;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// sum s_j (w - d)^2 / sum s_j w^2 over the matrix, `s` per column.
fn weighted_nmse(w: &[f32], decoded: &[f32], cols: usize, s: Option<&[f32]>) -> f64 {
    let (mut err, mut energy) = (0f64, 0f64);
    for (i, (&a, &b)) in w.iter().zip(decoded).enumerate() {
        let weight = s.map_or(1.0, |s| s[i % cols] as f64);
        err += weight * ((a - b) as f64).powi(2);
        energy += weight * (a as f64).powi(2);
    }
    err / energy.max(1e-30)
}
