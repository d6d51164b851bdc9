//! Calibration on real activations: a model run over a text with GGML's
//! evaluation callback watching every weight matrix multiplication, as
//! `llama-imatrix` does. Per weight matrix it sums the squares of each
//! input column's activations (the importance matrix, written and read in
//! the GGUF layout stock `llama-quantize --imatrix` reads) and, on request,
//! the whole Gram matrix X^T X (GPTQ's Hessian).
//!
//! The choices that decide the numbers follow `llama-imatrix`: the text is
//! tokenized with BOS, cut into chunks of `ctx` tokens whose first token is
//! BOS, evaluated `max(1, 2048 / ctx)` chunks per batch with every
//! position's logits requested (so the last layer sees every row), and only
//! `blk.*` matrices multiplied by at least 16 f32 rows are counted.

use crate::model::{c_path, BatchEntry, LoadedModel, ModelError};
use llama_cpp_sys_2 as sys;
use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::path::Path;
use std::ptr;

/// What was collected for one weight matrix (2-D weights: one matrix).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ActivationStats {
    /// Per input column, the sum over every row seen of the activation squared.
    pub sums: Vec<f32>,
    /// Rows (tokens) seen.
    pub count: u64,
    /// X^T X, row-major `cols x cols`, when asked for.
    pub gram: Option<Vec<f64>>,
}

impl ActivationStats {
    /// The importance `llama-quantize` uses: the mean square per column.
    pub fn mean_squares(&self) -> Vec<f32> {
        if self.count == 0 {
            return vec![1.0; self.sums.len()];
        }
        let n = self.count as f32;
        self.sums.iter().map(|s| s / n).collect()
    }
}

/// Activations of every `blk.*` weight matrix over a calibration text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Calibration {
    /// By weight name (`blk.0.attn_q.weight`).
    pub entries: BTreeMap<String, ActivationStats>,
    pub chunk_count: usize,
    pub chunk_size: usize,
    /// What the text was (recorded in the imatrix file).
    pub dataset: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("calibration text {path} has {tokens} tokens; it needs at least one context of {ctx} tokens (give a longer text or a smaller `ctx`)")]
    TextTooShort {
        path: String,
        tokens: usize,
        ctx: usize,
    },
    #[error("{path}: not an importance matrix GGUF ({reason})")]
    BadImatrix { path: String, reason: String },
    #[error("{path}: could not write the importance matrix")]
    Write { path: String },
}

/// The callback's state.
struct Collector {
    entries: BTreeMap<String, ActivationStats>,
    gram: bool,
    /// Set when a callback panicked: the collection is then void.
    failed: bool,
}

/// `llama-imatrix`'s name filter: `CPU#blk.0.x#0` -> `blk.0.x`.
fn weight_name(raw: &str) -> &str {
    match raw.split_once('#') {
        Some((_, rest)) => rest.split('#').next().unwrap_or(rest),
        None => raw,
    }
}

unsafe fn tensor_name(t: *const sys::ggml_tensor) -> String {
    CStr::from_ptr((*t).name.as_ptr())
        .to_string_lossy()
        .into_owned()
}

unsafe extern "C" fn observe(
    t: *mut sys::ggml_tensor,
    ask: bool,
    user_data: *mut std::os::raw::c_void,
) -> bool {
    // A panic must not unwind into C.
    let result = std::panic::catch_unwind(|| {
        let node = &*t;
        let (src0, src1) = (node.src[0], node.src[1]);
        if node.op != sys::GGML_OP_MUL_MAT || src0.is_null() || src1.is_null() {
            return !ask;
        }
        let name = tensor_name(src0);
        let name = weight_name(&name);
        if ask {
            return (*src1).ne[1] >= 16
                && (*src1).type_ == sys::GGML_TYPE_F32
                && name.starts_with("blk.");
        }
        let collector = &mut *(user_data as *mut Collector);
        let x = &*src1;
        if x.data.is_null() || (!x.buffer.is_null() && !sys::ggml_backend_buffer_is_host(x.buffer))
        {
            // CPU-only contexts keep activations in host memory.
            collector.failed = true;
            return true;
        }
        let cols = x.ne[0] as usize;
        let entry = collector
            .entries
            .entry(name.to_string())
            .or_insert_with(|| ActivationStats {
                sums: vec![0.0; cols],
                count: 0,
                gram: None,
            });
        if entry.sums.len() != cols {
            collector.failed = true;
            return true;
        }
        if collector.gram && entry.gram.is_none() {
            entry.gram = Some(vec![0.0; cols * cols]);
        }
        let base = x.data as *const u8;
        for i3 in 0..x.ne[3] as usize {
            for i2 in 0..x.ne[2] as usize {
                for row in 0..x.ne[1] as usize {
                    let at = base.add(row * x.nb[1] + i2 * x.nb[2] + i3 * x.nb[3]) as *const f32;
                    let values = std::slice::from_raw_parts(at, cols);
                    for (sum, v) in entry.sums.iter_mut().zip(values) {
                        *sum += v * v;
                    }
                    if let Some(gram) = entry.gram.as_mut() {
                        for (a, va) in values.iter().enumerate() {
                            let va = *va as f64;
                            let line = &mut gram[a * cols..(a + 1) * cols];
                            for (g, vb) in line.iter_mut().zip(values) {
                                *g += va * *vb as f64;
                            }
                        }
                    }
                    entry.count += 1;
                }
            }
        }
        true
    });
    result.unwrap_or_else(|_| {
        (*(user_data as *mut Collector)).failed = true;
        true
    })
}

/// Runs `model` over `text` in chunks of `ctx` tokens and collects every
/// `blk.*` matrix's activations (and X^T X when `gram`).
pub fn calibrate(
    model: &Path,
    text: &str,
    text_name: &str,
    ctx: usize,
    threads: usize,
    gram: bool,
) -> Result<Calibration, CalibrationError> {
    let n_seq = (2048 / ctx.max(1)).max(1);
    let mut collector = Box::new(Collector {
        entries: BTreeMap::new(),
        gram,
        failed: false,
    });
    let user_data = &mut *collector as *mut Collector as *mut std::os::raw::c_void;
    // SAFETY: the collector outlives the model (dropped at the end of this
    // function, after `loaded`), and `observe` casts user_data back to it.
    let mut loaded = unsafe {
        LoadedModel::load_observed(model, ctx, n_seq, threads, Some(observe), user_data)?
    };
    let tokens = loaded.tokenize(text, true);
    let n_chunk = tokens.len() / ctx.max(1);
    if n_chunk == 0 {
        return Err(CalibrationError::TextTooShort {
            path: text_name.to_string(),
            tokens: tokens.len(),
            ctx,
        });
    }
    let bos = loaded.adds_bos().then(|| loaded.bos());
    for first in (0..n_chunk).step_by(n_seq) {
        loaded.clear();
        let mut entries = Vec::with_capacity(n_seq * ctx);
        for seq in 0..n_seq.min(n_chunk - first) {
            let start = (first + seq) * ctx;
            for k in 0..ctx {
                let token = match (k, bos) {
                    (0, Some(bos)) => bos,
                    _ => tokens[start + k],
                };
                entries.push(BatchEntry {
                    token,
                    pos: k,
                    seq,
                    logits: true,
                });
            }
        }
        loaded.submit(&entries)?;
    }
    drop(loaded);
    if collector.failed {
        return Err(ModelError::Llama(
            "the activation callback could not read a matrix's input".into(),
        )
        .into());
    }
    Ok(Calibration {
        entries: std::mem::take(&mut collector.entries),
        chunk_count: n_chunk,
        chunk_size: ctx,
        dataset: text_name.to_string(),
    })
}

const IMATRIX_DATASETS: &str = "imatrix.datasets";
const IMATRIX_CHUNK_COUNT: &str = "imatrix.chunk_count";
const IMATRIX_CHUNK_SIZE: &str = "imatrix.chunk_size";

/// Writes the importance matrix as `llama-imatrix` does: `general.type =
/// imatrix`, the datasets and chunk figures, and per weight
/// `<name>.in_sum2` (f32, cols x 1) and `<name>.counts` (f32, 1 x 1),
/// sorted by name.
pub fn write_imatrix(path: &Path, calibration: &Calibration) -> Result<(), CalibrationError> {
    let fail = || CalibrationError::Write {
        path: path.display().to_string(),
    };
    let out = c_path(path)?;
    let cstr = |s: &str| CString::new(s).map_err(|_| fail());
    let data_size: usize = calibration
        .entries
        .values()
        .map(|e| 2 * (1024 + 4 * (e.sums.len() + 1)))
        .sum::<usize>()
        + 4096;
    // SAFETY: the ggml context is sized for every tensor created in it; each
    // tensor's data is written within its element count; both contexts are
    // freed before returning.
    unsafe {
        let ctx = sys::ggml_init(sys::ggml_init_params {
            mem_size: data_size,
            mem_buffer: ptr::null_mut(),
            no_alloc: false,
        });
        if ctx.is_null() {
            return Err(fail());
        }
        let gguf = sys::gguf_init_empty();
        let general_type = cstr("general.type")?;
        let imatrix = cstr("imatrix")?;
        sys::gguf_set_val_str(gguf, general_type.as_ptr(), imatrix.as_ptr());
        let dataset = cstr(&calibration.dataset)?;
        let datasets = [dataset.as_ptr()];
        let key = cstr(IMATRIX_DATASETS)?;
        sys::gguf_set_arr_str(gguf, key.as_ptr(), datasets.as_ptr() as *mut _, 1);
        let key = cstr(IMATRIX_CHUNK_COUNT)?;
        sys::gguf_set_val_u32(gguf, key.as_ptr(), calibration.chunk_count as u32);
        let key = cstr(IMATRIX_CHUNK_SIZE)?;
        sys::gguf_set_val_u32(gguf, key.as_ptr(), calibration.chunk_size as u32);
        for (name, entry) in &calibration.entries {
            let sums = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F32, entry.sums.len() as i64, 1);
            let counts = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F32, 1, 1);
            let sums_name = cstr(&format!("{name}.in_sum2"))?;
            let counts_name = cstr(&format!("{name}.counts"))?;
            sys::ggml_set_name(sums, sums_name.as_ptr());
            sys::ggml_set_name(counts, counts_name.as_ptr());
            std::slice::from_raw_parts_mut((*sums).data as *mut f32, entry.sums.len())
                .copy_from_slice(&entry.sums);
            *((*counts).data as *mut f32) = entry.count as f32;
            sys::gguf_add_tensor(gguf, sums);
            sys::gguf_add_tensor(gguf, counts);
        }
        let written = sys::gguf_write_to_file(gguf, out.as_ptr(), false);
        sys::gguf_free(gguf);
        sys::ggml_free(ctx);
        if !written {
            return Err(fail());
        }
    }
    Ok(())
}

/// Reads an importance matrix GGUF (ours or stock `llama-imatrix`'s).
pub fn read_imatrix(path: &Path) -> Result<Calibration, CalibrationError> {
    let bad = |reason: &str| CalibrationError::BadImatrix {
        path: path.display().to_string(),
        reason: reason.to_string(),
    };
    // GGML's typed getters abort the process on a key of another type, and
    // its parser trusts the header's sizes: checked in Rust first.
    wire::gguf::check_file(path).map_err(|reason| CalibrationError::BadImatrix {
        path: path.display().to_string(),
        reason,
    })?;
    let c = c_path(path)?;
    let mut data_ctx: *mut sys::ggml_context = ptr::null_mut();
    // SAFETY: NULL results are checked; tensors are read within their
    // element counts; both contexts are freed before returning.
    unsafe {
        let gguf = sys::gguf_init_from_file(
            c.as_ptr(),
            sys::gguf_init_params {
                no_alloc: false,
                ctx: &mut data_ctx,
            },
        );
        if gguf.is_null() || data_ctx.is_null() {
            return Err(bad("not a readable GGUF file"));
        }
        let u32_of = |key: &str| -> Option<u32> {
            let key = CString::new(key).ok()?;
            let id = sys::gguf_find_key(gguf, key.as_ptr());
            (id >= 0).then(|| sys::gguf_get_val_u32(gguf, id))
        };
        let mut out = Calibration {
            chunk_count: u32_of(IMATRIX_CHUNK_COUNT).unwrap_or(0) as usize,
            chunk_size: u32_of(IMATRIX_CHUNK_SIZE).unwrap_or(0) as usize,
            ..Default::default()
        };
        let key = CString::new(IMATRIX_DATASETS).unwrap_or_default();
        let id = sys::gguf_find_key(gguf, key.as_ptr());
        if id >= 0 && sys::gguf_get_arr_n(gguf, id) > 0 {
            out.dataset = CStr::from_ptr(sys::gguf_get_arr_str(gguf, id, 0))
                .to_string_lossy()
                .into_owned();
        }
        let mut sums: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        let mut counts: BTreeMap<String, f32> = BTreeMap::new();
        for i in 0..sys::gguf_get_n_tensors(gguf) {
            let name = CStr::from_ptr(sys::gguf_get_tensor_name(gguf, i))
                .to_string_lossy()
                .into_owned();
            let tensor = sys::ggml_get_tensor(data_ctx, sys::gguf_get_tensor_name(gguf, i));
            if tensor.is_null() || (*tensor).type_ != sys::GGML_TYPE_F32 {
                continue;
            }
            let n = sys::ggml_nelements(tensor) as usize;
            let values = std::slice::from_raw_parts((*tensor).data as *const f32, n);
            if let Some(weight) = name.strip_suffix(".in_sum2") {
                sums.insert(weight.to_string(), values.to_vec());
            } else if let Some(weight) = name.strip_suffix(".counts") {
                // One matrix per weight here (no experts): its count.
                counts.insert(weight.to_string(), values.first().copied().unwrap_or(0.0));
            }
        }
        sys::gguf_free(gguf);
        sys::ggml_free(data_ctx);
        if sums.is_empty() {
            return Err(bad("no `<name>.in_sum2` tensors"));
        }
        for (name, values) in sums {
            let count = counts.get(&name).copied().unwrap_or(0.0);
            out.entries.insert(
                name,
                ActivationStats {
                    sums: values,
                    count: count.max(0.0) as u64,
                    gram: None,
                },
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures")
            .join(name)
    }

    /// The largest and the mean relative difference per column between two
    /// importance matrices, over every weight; entries and counts must
    /// match exactly.
    fn relative_differences(ours: &Calibration, stock: &Calibration) -> (f64, f64) {
        assert_eq!(
            ours.entries.keys().collect::<Vec<_>>(),
            stock.entries.keys().collect::<Vec<_>>()
        );
        let (mut worst, mut total, mut n) = (0f64, 0f64, 0usize);
        for (name, a) in &ours.entries {
            let b = &stock.entries[name];
            assert_eq!(a.count, b.count, "{name}: rows seen");
            assert_eq!(a.sums.len(), b.sums.len(), "{name}");
            for (x, y) in a.sums.iter().zip(&b.sums) {
                let scale = (x.abs().max(y.abs()) as f64).max(1e-12);
                let relative = (x - y).abs() as f64 / scale;
                worst = worst.max(relative);
                total += relative;
                n += 1;
            }
        }
        (worst, total / n.max(1) as f64)
    }

    #[test]
    fn the_importance_matrix_agrees_with_stock_llama_imatrix_on_the_fixture() {
        // fixtures/stories260K-calib.imatrix.gguf: stock `llama-imatrix -m
        // stories260K.gguf -f stories-calib.txt -c 128 -t 2` (see the
        // fixtures README).
        let stock = read_imatrix(&fixture("stories260K-calib.imatrix.gguf")).unwrap();
        let text = std::fs::read_to_string(fixture("stories-calib.txt")).unwrap();
        let ours = calibrate(
            &fixture("stories260K.gguf"),
            &text,
            "stories-calib.txt",
            128,
            2,
            false,
        )
        .unwrap();
        assert_eq!((ours.chunk_count, ours.chunk_size), (17, 128));
        assert_eq!((stock.chunk_count, stock.chunk_size), (17, 128));
        assert_eq!(ours.entries.len(), 5 * 7, "7 matrices in each of 5 layers");
        // Same rows, same columns; the sums differ only by f32 rounding
        // (measured: at most 2.9e-4, mean 6e-6).
        let (worst, mean) = relative_differences(&ours, &stock);
        eprintln!(
            "relative difference per column against llama-imatrix: largest {worst:.2e}, mean {mean:.2e}"
        );
        assert!(worst < 1e-3 && mean < 5e-5, "{worst} {mean}");
        // Written and read back, it is the same matrix.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ours.imatrix.gguf");
        write_imatrix(&path, &ours).unwrap();
        let back = read_imatrix(&path).unwrap();
        assert_eq!(relative_differences(&back, &ours), (0.0, 0.0));
        assert_eq!(back.dataset, "stories-calib.txt");
    }

    #[test]
    fn a_text_shorter_than_one_context_is_named() {
        let e = calibrate(
            &fixture("stories260K.gguf"),
            "Once upon a time.",
            "short.txt",
            128,
            1,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("short.txt") && e.contains("at least one context of 128"),
            "{e}"
        );
    }

    #[test]
    fn backend_prefixes_are_stripped_like_llama_imatrix() {
        assert_eq!(weight_name("blk.0.attn_q.weight"), "blk.0.attn_q.weight");
        assert_eq!(
            weight_name("CPU#blk.0.attn_q.weight#0"),
            "blk.0.attn_q.weight"
        );
        assert_eq!(
            weight_name("CUDA0#blk.1.ffn_up.weight"),
            "blk.1.ffn_up.weight"
        );
    }
}
