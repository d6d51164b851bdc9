//! Where each tensor of a GGUF file sits and its values as f32: what the
//! recipes that rewrite a model's matrices in place (GPTQ, codebooks) read.

use crate::model::ModelError;
use llama_cpp_sys_2 as sys;
use std::ffi::CStr;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// A tensor's place in a GGUF file.
pub struct TensorSlot {
    pub name: String,
    pub ty: sys::ggml_type,
    /// ne[0] (inner, columns), ne[1] (rows).
    pub cols: usize,
    pub rows: usize,
    pub offset: u64,
    pub bytes: usize,
}

pub fn tensor_slots(path: &Path) -> Result<Vec<TensorSlot>, TensorFileError> {
    // GGML trusts the sizes in the header, and read_weights allocates from
    // them: the header is checked against the file first.
    let c = crate::model::checked_gguf_path(path)?;
    let bad = || TensorFileError::File {
        path: path.display().to_string(),
        message: "not a readable GGUF file".into(),
    };
    let mut out = Vec::new();
    // SAFETY: NULL results are checked; with no_alloc the ggml context
    // holds only each tensor's shape; both contexts are freed below.
    unsafe {
        let mut meta: *mut sys::ggml_context = std::ptr::null_mut();
        let ctx = sys::gguf_init_from_file(
            c.as_ptr(),
            sys::gguf_init_params {
                no_alloc: true,
                ctx: &mut meta,
            },
        );
        if ctx.is_null() || meta.is_null() {
            if !ctx.is_null() {
                sys::gguf_free(ctx);
            }
            return Err(bad());
        }
        let base = sys::gguf_get_data_offset(ctx) as u64;
        for i in 0..sys::gguf_get_n_tensors(ctx) {
            let name_ptr = sys::gguf_get_tensor_name(ctx, i);
            let tensor = sys::ggml_get_tensor(meta, name_ptr);
            if tensor.is_null() {
                continue;
            }
            let ne = (*tensor).ne;
            out.push(TensorSlot {
                name: CStr::from_ptr(name_ptr).to_string_lossy().into_owned(),
                ty: sys::gguf_get_tensor_type(ctx, i),
                cols: ne[0] as usize,
                rows: (ne[1] * ne[2] * ne[3]) as usize,
                offset: base + sys::gguf_get_tensor_offset(ctx, i) as u64,
                bytes: sys::gguf_get_tensor_size(ctx, i),
            });
        }
        sys::gguf_free(ctx);
        sys::ggml_free(meta);
    }
    Ok(out)
}

/// A tensor of `source` as f32 (F32, F16 or BF16 weights).
pub fn read_weights(path: &Path, slot: &TensorSlot) -> Result<Vec<f32>, TensorFileError> {
    let file_err = |message: String| TensorFileError::File {
        path: path.display().to_string(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(|e| file_err(e.to_string()))?;
    let mut raw = vec![0u8; slot.bytes];
    file.seek(SeekFrom::Start(slot.offset))
        .and_then(|_| file.read_exact(&mut raw))
        .map_err(|e| file_err(format!("reading {}: {e}", slot.name)))?;
    let n = slot.rows * slot.cols;
    let mut out = vec![0f32; n];
    // SAFETY: the type traits are GGML's static table; to_float reads
    // `n` elements of the tensor's type from `raw`, which holds them all.
    unsafe {
        let traits = sys::ggml_get_type_traits(slot.ty);
        let to_float = (!traits.is_null()).then(|| (*traits).to_float).flatten();
        match (slot.ty, to_float) {
            (sys::GGML_TYPE_F32, _) => {
                for (o, chunk) in out.iter_mut().zip(raw.chunks_exact(4)) {
                    *o = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                }
            }
            (_, Some(convert))
                if slot.ty == sys::GGML_TYPE_F16 || slot.ty == sys::GGML_TYPE_BF16 =>
            {
                convert(raw.as_ptr().cast(), out.as_mut_ptr(), n as i64)
            }
            _ => {
                return Err(file_err(format!(
                    "{} is stored quantized: this needs the unquantized (F32, F16 or BF16) model",
                    slot.name
                )))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use llama_cpp_sys_2 as sys;

    #[test]
    fn the_gguf_checks_type_table_is_ggmls() {
        for id in 0..sys::GGML_TYPE_COUNT {
            // SAFETY: static table lookups for every type value GGML defines.
            let (block, bytes) = unsafe { (sys::ggml_blck_size(id), sys::ggml_type_size(id)) };
            let ours = wire::gguf::type_size(id);
            if block == 0 {
                assert_eq!(ours, None, "type {id} is retired in GGML");
            } else {
                assert_eq!(ours, Some((block as u64, bytes as u64)), "type {id}");
            }
        }
        assert_eq!(wire::gguf::type_size(sys::GGML_TYPE_COUNT), None);
    }
}
