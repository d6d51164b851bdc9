//! AWQ (Lin et al., 2023, "Activation-aware Weight Quantization"): the
//! input channels a layer's activations make large matter most, so before
//! rounding, each weight column j is multiplied by a scale s_j and the
//! operation that produces the layer's input is divided by it, which leaves
//! the unquantized model's function unchanged while the rounding grid moves
//! towards the salient channels. Per group of matrices sharing one input,
//! s = a^alpha with a the per-channel activation magnitude, alpha searched
//! on a grid to minimise the group's output error on the calibration
//! activations after rounding to the target type, exactly as AWQ's
//! `auto_scale` does (with its normalisation s / sqrt(max s * min s)).
//!
//! The scales are folded into the model, never stored beside it: into the
//! RMS/LayerNorm weight (and bias) before q/k/v and before gate/up, into
//! the up projection's rows (and bias) before down, and into v's rows before
//! the attention output when their shapes match (no grouped-query sharing),
//! the four places AWQ scales a Llama block. The folded model is then
//! quantized by llama.cpp, so the file is an ordinary GGUF of the target
//! type that stock llama.cpp runs at that type's speed.
//!
//! Differences from AutoAWQ, said where they apply: the activation
//! magnitude is the root mean square per channel (what llama-imatrix
//! collects) rather than the mean absolute value, and the output error is
//! computed from X^T X (exactly the summed squared error over the
//! calibration tokens) on up to `rows_searched` evenly spaced rows per
//! matrix. AWQ's optional weight-clipping search is not done.

use crate::ffi::{dequantize_rows, quantize_rows};
use crate::gguf_tensors::{read_weights, tensor_slots, TensorFileError, TensorSlot};
use crate::GgmlType;
use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum AwqError {
    #[error("AWQ rounds onto {0}: it is done here for q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl and the K-quant types")]
    Format(String),
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error(transparent)]
    TensorFile(#[from] TensorFileError),
}

/// What the search does; the defaults are AutoAWQ's grid.
#[derive(Debug, Clone, Copy)]
pub struct AwqOptions {
    /// alpha in {0, 1/grid, ..., 1}.
    pub grid: usize,
    /// Rows of each matrix whose output error the search sums.
    pub rows_searched: usize,
    pub threads: usize,
}

impl Default for AwqOptions {
    fn default() -> Self {
        AwqOptions {
            grid: 20,
            rows_searched: 128,
            threads: 1,
        }
    }
}

/// One group of matrices sharing an input: the alpha chosen and the
/// group's relative output error, sum over the searched rows of
/// (w - q)^T H (w - q) / w^T H w, with plain rounding (alpha 0) and AWQ.
#[derive(Debug, Clone, PartialEq)]
pub struct AwqGroup {
    /// What the scales were folded into (`blk.3.ffn_norm.weight`).
    pub folded_into: String,
    pub matrices: Vec<String>,
    pub cols: usize,
    pub alpha: f64,
    pub error_plain: f64,
    pub error_awq: f64,
}

/// The GGML type AWQ's search rounds onto for a llama.cpp file type
/// (a K-quant mix by its main type).
pub fn search_type(ftype: &str) -> Result<GgmlType, AwqError> {
    let lower = ftype.to_ascii_lowercase();
    let main = match lower.as_str() {
        "q4_k_m" | "q4_k_s" => "q4_k",
        "q5_k_m" | "q5_k_s" => "q5_k",
        "q3_k_m" | "q3_k_s" | "q3_k_l" => "q3_k",
        other => other,
    };
    match main.parse::<GgmlType>() {
        // The 2- and 3-bit i-quants are not searched here (IQ2_XXS and
        // IQ2_XS cannot even be rounded without an importance matrix).
        Ok(ty)
            if !matches!(
                ty,
                GgmlType::F32
                    | GgmlType::F16
                    | GgmlType::BF16
                    | GgmlType::IQ3S
                    | GgmlType::IQ3XXS
                    | GgmlType::IQ2S
                    | GgmlType::IQ2XS
                    | GgmlType::IQ2XXS
            ) =>
        {
            Ok(ty)
        }
        _ => Err(AwqError::Format(ftype.to_string())),
    }
}

/// What precedes a group's matrices, where 1/s is folded.
enum Fold {
    /// A norm's per-channel weight (and bias).
    Vector(String),
    /// The rows (output channels) of a matrix (and its bias).
    Rows(String),
}

impl Fold {
    fn name(&self) -> &str {
        match self {
            Fold::Vector(n) | Fold::Rows(n) => n,
        }
    }
}

/// The groups of one transformer block present in the file.
fn block_groups(slots: &[TensorSlot], block: usize) -> Vec<(Fold, Vec<String>)> {
    let name = |part: &str| format!("blk.{block}.{part}.weight");
    let slot = |n: &str| slots.iter().find(|s| s.name == n);
    let present = |parts: &[&str]| -> Vec<String> {
        parts
            .iter()
            .map(|p| name(p))
            .filter(|n| slot(n).is_some())
            .collect()
    };
    let mut groups = Vec::new();
    let attention = present(&["attn_q", "attn_k", "attn_v", "attn_qkv"]);
    if slot(&name("attn_norm")).is_some() && !attention.is_empty() {
        groups.push((Fold::Vector(name("attn_norm")), attention));
    }
    let ffn_in = present(&["ffn_gate", "ffn_up"]);
    if slot(&name("ffn_norm")).is_some() && !ffn_in.is_empty() {
        groups.push((Fold::Vector(name("ffn_norm")), ffn_in));
    }
    // down's input is act(gate) * up (or act(up)): scaling up's output
    // channel j by 1/s_j scales that input channel by 1/s_j. Only when the
    // activation is elementwise-linear in up, i.e. a gated FFN.
    let (up, down) = (name("ffn_up"), name("ffn_down"));
    if let (Some(up_slot), Some(down_slot), Some(_)) =
        (slot(&up), slot(&down), slot(&name("ffn_gate")))
    {
        if up_slot.rows == down_slot.cols {
            groups.push((Fold::Rows(up), vec![down]));
        }
    }
    // The attention output's input is softmax(QK) V per head: v's output
    // channel j reaches it unmixed only when every head has its own v.
    let (v, o) = (name("attn_v"), name("attn_output"));
    if let (Some(v_slot), Some(o_slot)) = (slot(&v), slot(&o)) {
        if v_slot.rows == o_slot.cols {
            groups.push((Fold::Rows(v), vec![o]));
        }
    }
    groups
}

/// AWQ's scales for activation magnitudes `magnitude` at `alpha`.
fn scales(magnitude: &[f64], alpha: f64) -> Vec<f64> {
    let s: Vec<f64> = magnitude
        .iter()
        .map(|&a| a.max(1e-8).powf(alpha).max(1e-4))
        .collect();
    let (max, min) = s
        .iter()
        .fold((f64::MIN, f64::MAX), |(hi, lo), &v| (hi.max(v), lo.min(v)));
    let norm = (max * min).sqrt();
    s.into_iter().map(|v| v / norm).collect()
}

/// Sum over `rows` of (q - w)^T H (q - w) and of w^T H w, q the row of
/// w * s rounded to `ty` and divided by s again.
fn rounding_error(
    weights: &[f32],
    cols: usize,
    rows: &[usize],
    s: &[f64],
    gram: &[f64],
    ty: GgmlType,
) -> (f64, f64) {
    let row_bytes = ty.row_bytes(cols);
    let mut scaled = vec![0f32; cols];
    let mut packed = vec![0u8; row_bytes];
    let mut rounded = vec![0f32; cols];
    let mut residual = vec![0f64; cols];
    let (mut error, mut energy) = (0.0, 0.0);
    for &r in rows {
        let w = &weights[r * cols..(r + 1) * cols];
        for j in 0..cols {
            scaled[j] = (w[j] as f64 * s[j]) as f32;
        }
        quantize_rows(ty, &scaled, &mut packed, 1, cols, None);
        dequantize_rows(ty, &packed, &mut rounded, 1, cols);
        for j in 0..cols {
            residual[j] = rounded[j] as f64 / s[j] - w[j] as f64;
        }
        for i in 0..cols {
            let g = &gram[i * cols..(i + 1) * cols];
            let (mut gr, mut gw) = (0.0, 0.0);
            for j in 0..cols {
                gr += g[j] * residual[j];
                gw += g[j] * w[j] as f64;
            }
            error += residual[i] * gr;
            energy += w[i] as f64 * gw;
        }
    }
    (error, energy)
}

/// Evenly spaced rows, at most `most`.
fn rows_to_search(rows: usize, most: usize) -> Vec<usize> {
    if rows <= most {
        return (0..rows).collect();
    }
    (0..most).map(|i| i * rows / most).collect()
}

/// A group's output error at each alpha of the grid, alphas split over
/// threads.
fn search(
    matrices: &[(Vec<f32>, usize)],
    magnitude: &[f64],
    gram: &[f64],
    ty: GgmlType,
    options: AwqOptions,
) -> Vec<(f64, f64)> {
    let cols = magnitude.len();
    let alphas: Vec<f64> = (0..=options.grid)
        .map(|i| i as f64 / options.grid.max(1) as f64)
        .collect();
    let per = alphas.len().div_ceil(options.threads.max(1)).max(1);
    std::thread::scope(|scope| {
        alphas
            .chunks(per)
            .map(|share| {
                scope.spawn(move || {
                    share
                        .iter()
                        .map(|&alpha| {
                            let s = scales(magnitude, alpha);
                            let (mut error, mut energy) = (0.0, 0.0);
                            for (weights, rows) in matrices {
                                let searched = rows_to_search(*rows, options.rows_searched);
                                let (e, w) = rounding_error(weights, cols, &searched, &s, gram, ty);
                                error += e;
                                energy += w;
                            }
                            (alpha, error / energy.max(f64::MIN_POSITIVE))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// Searches AWQ's scales for every group of `model` (an F32 GGUF, changed
/// in place) with the activations of `calibration` (X^T X per matrix, from
/// `calibration::calibrate(.., gram: true)`), rounding onto `ty`, and folds
/// them in. The file then computes what it computed before, up to f32
/// rounding; quantizing it is the caller's.
pub fn apply_to_model(
    model: &Path,
    calibration: &crate::calibration::Calibration,
    ty: GgmlType,
    options: AwqOptions,
) -> Result<Vec<AwqGroup>, AwqError> {
    let file_error = |message: String| AwqError::File {
        path: model.display().to_string(),
        message,
    };
    let slots = tensor_slots(model)?;
    if let Some(slot) = slots.iter().find(|s| s.ty != 0) {
        return Err(file_error(format!(
            "{} is not F32: AWQ folds scales into an F32 copy of the model",
            slot.name
        )));
    }
    let slot = |name: &str| slots.iter().find(|s| s.name == name);
    // Every changed tensor, by name, written once at the end: up and v
    // take part in two groups (their columns and their rows).
    let mut changed: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    let current =
        |changed: &BTreeMap<String, Vec<f32>>, name: &str| -> Result<Vec<f32>, AwqError> {
            match changed.get(name) {
                Some(values) => Ok(values.clone()),
                None => {
                    let s = slot(name).ok_or_else(|| file_error(format!("no tensor {name}")))?;
                    Ok(read_weights(model, s)?)
                }
            }
        };
    let mut groups_done = Vec::new();
    let mut plan = Vec::new();
    for block in 0.. {
        let groups = block_groups(&slots, block);
        if groups.is_empty() && slot(&format!("blk.{block}.attn_norm.weight")).is_none() {
            break;
        }
        plan.extend(groups);
    }
    // Scales from the original weights, all groups first, then folded:
    // a later group's search must not see an earlier group's scaling.
    let mut folds = Vec::new();
    for (fold, names) in plan {
        let Some(stats) = calibration.entries.get(&names[0]) else {
            continue;
        };
        let Some(gram) = &stats.gram else {
            continue;
        };
        let cols = stats.sums.len();
        let shapes: Vec<&TensorSlot> = names.iter().filter_map(|n| slot(n)).collect();
        if shapes.len() != names.len()
            || shapes.iter().any(|s| s.cols != cols)
            || cols % ty.block_size() != 0
        {
            continue;
        }
        let magnitude: Vec<f64> = stats
            .mean_squares()
            .iter()
            .map(|&m| (m as f64).sqrt())
            .collect();
        let mut matrices = Vec::new();
        for s in &shapes {
            matrices.push((read_weights(model, s)?, s.rows));
        }
        let errors = search(&matrices, &magnitude, gram, ty, options);
        let plain = errors.first().map_or(0.0, |e| e.1);
        let (alpha, best) = errors
            .iter()
            .copied()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((0.0, plain));
        groups_done.push(AwqGroup {
            folded_into: fold.name().to_string(),
            matrices: names.clone(),
            cols,
            alpha,
            error_plain: plain,
            error_awq: best,
        });
        if alpha > 0.0 {
            folds.push((fold, names, scales(&magnitude, alpha)));
        }
    }
    for (fold, names, s) in folds {
        for name in &names {
            let mut w = current(&changed, name)?;
            for row in w.chunks_exact_mut(s.len()) {
                for (v, sj) in row.iter_mut().zip(&s) {
                    *v = (*v as f64 * sj) as f32;
                }
            }
            changed.insert(name.clone(), w);
        }
        let bias = fold.name().replace(".weight", ".bias");
        match &fold {
            Fold::Vector(name) => {
                for target in [name.clone(), bias] {
                    if slot(&target).is_none() {
                        continue;
                    }
                    let mut v = current(&changed, &target)?;
                    for (x, sj) in v.iter_mut().zip(&s) {
                        *x = (*x as f64 / sj) as f32;
                    }
                    changed.insert(target, v);
                }
            }
            Fold::Rows(name) => {
                let mut w = current(&changed, name)?;
                let cols = slot(name).map_or(0, |t| t.cols);
                for (row, sj) in w.chunks_exact_mut(cols.max(1)).zip(&s) {
                    for x in row {
                        *x = (*x as f64 / sj) as f32;
                    }
                }
                changed.insert(name.clone(), w);
                if slot(&bias).is_some() {
                    let mut b = current(&changed, &bias)?;
                    for (x, sj) in b.iter_mut().zip(&s) {
                        *x = (*x as f64 / sj) as f32;
                    }
                    changed.insert(bias, b);
                }
            }
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(model)
        .map_err(|e| file_error(e.to_string()))?;
    for (name, values) in &changed {
        let Some(target) = slot(name) else { continue };
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        if bytes.len() != target.bytes {
            return Err(file_error(format!(
                "{name}: {} bytes to write into {}",
                bytes.len(),
                target.bytes
            )));
        }
        file.seek(SeekFrom::Start(target.offset))
            .and_then(|_| file.write_all(&bytes))
            .map_err(|e| file_error(format!("writing {name}: {e}")))?;
    }
    file.sync_all().map_err(|e| file_error(e.to_string()))?;
    Ok(groups_done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_are_normalised_and_alpha_zero_is_plain_rounding() {
        let a = [0.5, 2.0, 8.0];
        assert!(scales(&a, 0.0).iter().all(|&s| (s - 1.0).abs() < 1e-12));
        let s = scales(&a, 1.0);
        // s / sqrt(max * min): the geometric middle of the range is 1.
        assert!((s[0] * s[2] - 1.0).abs() < 1e-12, "{s:?}");
        assert!(s[0] < s[1] && s[1] < s[2]);
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures")
            .join(name)
    }

    /// Folding the scales changes the weights but not the model: the
    /// fixture's logits before and after agree to f32 rounding.
    #[test]
    fn folded_scales_leave_the_model_computing_the_same_function() {
        let original = fixture("stories260K.gguf");
        let dir = tempfile::tempdir().unwrap();
        let folded = dir.path().join("folded.gguf");
        std::fs::copy(&original, &folded).unwrap();
        let text = std::fs::read_to_string(fixture("stories-calib.txt")).unwrap();
        let calibration =
            crate::calibration::calibrate(&original, &text, "stories-calib.txt", 128, 2, true)
                .unwrap();
        let groups =
            apply_to_model(&folded, &calibration, GgmlType::Q4_0, AwqOptions::default()).unwrap();
        // Five blocks, each with its attention and FFN inputs (the
        // fixture's down rows of 172 are not whole blocks of 32, and its
        // grouped-query v cannot take the output's scales).
        assert_eq!(groups.len(), 10, "{groups:?}");
        assert!(groups.iter().all(|g| g.error_awq <= g.error_plain));
        assert!(groups.iter().any(|g| g.alpha > 0.0), "{groups:?}");
        let norm = |path: &Path| {
            let slots = tensor_slots(path).unwrap();
            let slot = slots
                .iter()
                .find(|s| s.name == "blk.1.ffn_norm.weight")
                .unwrap();
            read_weights(path, slot).unwrap()
        };
        assert_ne!(norm(&original), norm(&folded), "the scales were folded in");
        let logits = |path: &Path| {
            let mut model = crate::model::LoadedModel::load(path, 64, 1).unwrap();
            let tokens = model.tokenize("Once upon a time there was a little girl", true);
            model.decode(&tokens, 0, true).unwrap()
        };
        let (a, b) = (logits(&original), logits(&folded));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let range = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        // The f16 KV cache rounds the scaled keys and values differently:
        // measured 3.2e-3 of a range of 20.6. A fold left out or put in
        // the wrong place moves logits by whole units.
        assert!(
            worst < 1e-3 * range.max(1.0),
            "largest logit change {worst} of {range}"
        );
    }

    #[test]
    fn search_type_names_the_grid_rounded_onto() {
        assert_eq!(search_type("q4_0").unwrap(), GgmlType::Q4_0);
        assert_eq!(search_type("Q4_K_M").unwrap(), GgmlType::Q4K);
        assert!(search_type("f16").is_err());
    }

    /// On activations with a few large channels, scaling them up before
    /// rounding lowers the output error below plain rounding.
    #[test]
    fn salient_channels_scaled_up_round_with_less_output_error() {
        let (rows, cols) = (16, 64);
        let mut state = 0x2545f4914f6cdd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let w: Vec<f32> = (0..rows * cols).map(|_| next() as f32).collect();
        let mut gram = vec![0.0; cols * cols];
        let mut sums = vec![0.0; cols];
        let samples = 300;
        for _ in 0..samples {
            let x: Vec<f64> = (0..cols)
                .map(|j| next() * if j % 16 == 0 { 30.0 } else { 1.0 })
                .collect();
            for a in 0..cols {
                sums[a] += x[a] * x[a];
                for b in 0..cols {
                    gram[a * cols + b] += x[a] * x[b];
                }
            }
        }
        let magnitude: Vec<f64> = sums.iter().map(|s| (s / samples as f64).sqrt()).collect();
        let errors = search(
            &[(w, rows)],
            &magnitude,
            &gram,
            GgmlType::Q4_0,
            AwqOptions::default(),
        );
        let plain = errors[0].1;
        let best = errors.iter().map(|e| e.1).fold(f64::MAX, f64::min);
        assert!(best < 0.8 * plain, "plain {plain}, best {best}");
    }
}
