//! Synthetic llama-architecture GGUF models: real dimensions, seeded
//! LLM-like weights (the kernel matrix's generator), a borrowed tokenizer.
//!
//! Speed and memory of a model depend on its architecture and sizes, not on
//! what its weights learned, so a model written here decodes at the speed
//! of a trained model of the same shape and types. It has no quality to
//! measure. The file says it is synthetic (`quantbench.synthetic`,
//! `quantbench.seed`), and the same arguments give the same bytes.

use crate::model::{c_path, open_gguf_metadata, ModelError};
use crate::weights::llm_like_weights;
use crate::{quantize, GgmlType};
use llama_cpp_sys_2 as sys;
use std::ffi::CString;
use std::path::Path;
use std::ptr;

/// The dimensions of a llama-architecture model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlamaDims {
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_layer: usize,
}

impl LlamaDims {
    /// Llama-3-8B's layer dimensions (32 layers in the real model).
    pub const LLAMA3_8B: LlamaDims = LlamaDims {
        n_embd: 4096,
        n_ff: 14336,
        n_head: 32,
        n_head_kv: 8,
        n_layer: 32,
    };

    pub fn with_layers(self, n_layer: usize) -> Self {
        LlamaDims { n_layer, ..self }
    }

    fn n_embd_kv(&self) -> usize {
        self.n_embd / self.n_head * self.n_head_kv
    }
}

/// One weight matrix of a written model: what a decoded token streams.
#[derive(Debug, Clone, PartialEq)]
pub struct WrittenMatrix {
    pub name: String,
    /// Output features (GGML's ne1).
    pub rows: usize,
    /// Input features (GGML's ne0).
    pub cols: usize,
    pub ty: GgmlType,
    pub bytes: usize,
}

/// Writes a llama model of `dims` whose 2-D weights are stored in `ty`
/// (norms in F32), with the tokenizer and remaining metadata of the GGUF
/// `tokenizer_from`. Returns the weight matrices in file order.
pub fn write_llama(
    out: &Path,
    tokenizer_from: &Path,
    dims: LlamaDims,
    ty: GgmlType,
    seed: u64,
) -> Result<Vec<WrittenMatrix>, ModelError> {
    let (e, kv, ff) = (dims.n_embd, dims.n_embd_kv(), dims.n_ff);
    let n_vocab = vocab_size(tokenizer_from)?;
    // (name, rows, cols); 1-D norms have rows = 1 and are written as F32 ones.
    let mut plan: Vec<(String, usize, usize)> = vec![("token_embd.weight".into(), n_vocab, e)];
    for l in 0..dims.n_layer {
        let b = format!("blk.{l}");
        plan.push((format!("{b}.attn_norm.weight"), 1, e));
        plan.push((format!("{b}.attn_q.weight"), e, e));
        plan.push((format!("{b}.attn_k.weight"), kv, e));
        plan.push((format!("{b}.attn_v.weight"), kv, e));
        plan.push((format!("{b}.attn_output.weight"), e, e));
        plan.push((format!("{b}.ffn_norm.weight"), 1, e));
        plan.push((format!("{b}.ffn_gate.weight"), ff, e));
        plan.push((format!("{b}.ffn_up.weight"), ff, e));
        plan.push((format!("{b}.ffn_down.weight"), e, ff));
    }
    plan.push(("output_norm.weight".into(), 1, e));
    plan.push(("output.weight".into(), n_vocab, e));

    let mut written = Vec::new();
    let mut blobs: Vec<(String, usize, usize, GgmlType, Vec<u8>)> = Vec::new();
    for (index, (name, rows, cols)) in plan.into_iter().enumerate() {
        if rows == 1 {
            let ones: Vec<u8> = std::iter::repeat_n(1f32.to_le_bytes(), cols)
                .flatten()
                .collect();
            blobs.push((name, 1, cols, GgmlType::F32, ones));
            continue;
        }
        let values = llm_like_weights(rows, cols, seed.wrapping_add(index as u64));
        let quantized = quantize(ty, rows, cols, &values)
            .map_err(|err| ModelError::Llama(format!("{name}: {err}")))?;
        written.push(WrittenMatrix {
            name: name.clone(),
            rows,
            cols,
            ty,
            bytes: quantized.bytes(),
        });
        blobs.push((name, rows, cols, ty, quantized.into_bytes()));
    }
    write_gguf(out, tokenizer_from, dims, seed, &blobs)?;
    Ok(written)
}

fn vocab_size(tokenizer_from: &Path) -> Result<usize, ModelError> {
    let ctx = open_gguf_metadata(tokenizer_from)?;
    // SAFETY: ctx is a valid metadata context, freed before returning.
    let n = unsafe {
        let key = sys::gguf_find_key(ctx, c"tokenizer.ggml.tokens".as_ptr());
        let n = if key < 0 {
            0
        } else {
            sys::gguf_get_arr_n(ctx, key)
        };
        sys::gguf_free(ctx);
        n
    };
    if n == 0 {
        return Err(ModelError::Llama(format!(
            "{}: has no tokenizer.ggml.tokens to borrow",
            tokenizer_from.display()
        )));
    }
    Ok(n)
}

fn write_gguf(
    out: &Path,
    tokenizer_from: &Path,
    dims: LlamaDims,
    seed: u64,
    blobs: &[(String, usize, usize, GgmlType, Vec<u8>)],
) -> Result<(), ModelError> {
    let target = c_path(out)?;
    let src = open_gguf_metadata(tokenizer_from)?;
    let names: Vec<CString> = blobs
        .iter()
        .map(|(name, ..)| CString::new(name.as_str()).expect("tensor names have no NUL"))
        .collect();
    // SAFETY: every context is checked for NULL and freed on every path;
    // each tensor is created with exactly the size of the bytes copied in.
    unsafe {
        let gguf = sys::gguf_init_empty();
        sys::gguf_set_kv(gguf, src);
        sys::gguf_free(src);
        for (key, value) in [
            (c"llama.embedding_length", dims.n_embd),
            (c"llama.feed_forward_length", dims.n_ff),
            (c"llama.attention.head_count", dims.n_head),
            (c"llama.attention.head_count_kv", dims.n_head_kv),
            (c"llama.block_count", dims.n_layer),
            (c"llama.context_length", 4096),
            (c"llama.rope.dimension_count", dims.n_embd / dims.n_head),
        ] {
            sys::gguf_set_val_u32(gguf, key.as_ptr(), value as u32);
        }
        sys::gguf_set_val_str(
            gguf,
            c"general.name".as_ptr(),
            c"quantbench synthetic llama".as_ptr(),
        );
        sys::gguf_set_val_bool(gguf, c"quantbench.synthetic".as_ptr(), true);
        sys::gguf_set_val_u64(gguf, c"quantbench.seed".as_ptr(), seed);

        let data_bytes: usize = blobs.iter().map(|b| b.4.len()).sum();
        let ctx = sys::ggml_init(sys::ggml_init_params {
            mem_size: data_bytes + blobs.len() * (sys::ggml_tensor_overhead() + 64),
            mem_buffer: ptr::null_mut(),
            no_alloc: false,
        });
        if ctx.is_null() {
            sys::gguf_free(gguf);
            return Err(ModelError::Llama(
                "could not allocate the tensors to write".into(),
            ));
        }
        for ((_, rows, cols, ty, bytes), name) in blobs.iter().zip(&names) {
            let raw = crate::ffi::raw_type(*ty);
            let tensor = if *rows == 1 {
                sys::ggml_new_tensor_1d(ctx, raw, *cols as i64)
            } else {
                sys::ggml_new_tensor_2d(ctx, raw, *cols as i64, *rows as i64)
            };
            sys::ggml_set_name(tensor, name.as_ptr());
            ptr::copy_nonoverlapping(bytes.as_ptr(), (*tensor).data.cast::<u8>(), bytes.len());
            sys::gguf_add_tensor(gguf, tensor);
        }
        let ok = sys::gguf_write_to_file(gguf, target.as_ptr(), false);
        sys::ggml_free(ctx);
        sys::gguf_free(gguf);
        if !ok {
            return Err(ModelError::Llama(format!(
                "could not write {}",
                out.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{gguf_tensor_types, LoadedModel};

    fn fixture() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/stories260K.gguf")
    }

    #[test]
    fn a_small_synthetic_llama_loads_decodes_and_is_deterministic() {
        let dir = std::env::temp_dir();
        let dims = LlamaDims {
            n_embd: 256,
            n_ff: 512,
            n_head: 4,
            n_head_kv: 2,
            n_layer: 2,
        };
        let a = dir.join(format!("qb-synth-a-{}.gguf", std::process::id()));
        let b = dir.join(format!("qb-synth-b-{}.gguf", std::process::id()));
        let matrices = write_llama(&a, &fixture(), dims, GgmlType::Q8_0, 7).unwrap();
        write_llama(&b, &fixture(), dims, GgmlType::Q8_0, 7).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        // Embedding, 7 matrices per layer, output head.
        assert_eq!(matrices.len(), 2 + 7 * 2);
        let down = matrices
            .iter()
            .find(|m| m.name == "blk.1.ffn_down.weight")
            .unwrap();
        assert_eq!((down.rows, down.cols), (256, 512));
        let types = gguf_tensor_types(&a).unwrap();
        assert!(types
            .iter()
            .any(|(n, t)| n == "blk.0.attn_k.weight" && t == "q8_0"));

        let mut model = LoadedModel::load(&a, 64, 2).unwrap();
        assert_eq!(model.facts().n_layer, 2);
        let logits = model.decode(&[1, 2, 3], 0, false).unwrap();
        assert_eq!(logits.len(), model.n_vocab());
        drop(model);
        std::fs::remove_file(&a).unwrap();
        std::fs::remove_file(&b).unwrap();
    }
}
