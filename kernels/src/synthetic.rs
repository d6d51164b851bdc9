//! Synthetic GGUF models that stock llama.cpp loads as the seed studies'
//! architectures (GPT-2, Llama, Gemma 3, EXAONE) at their real sizes:
//! seeded LLM-like weights (the kernel matrix's generator), norms of ones,
//! zero biases, and a borrowed tokenizer padded to the real vocabulary.
//!
//! Speed and memory of a model depend on its architecture and sizes, not on
//! what its weights learned, so a model written here decodes at the speed
//! of a trained model of the same shape and types. It has no quality to
//! measure. The file says it is synthetic (`quantbench.synthetic`,
//! `quantbench.seed`, `quantbench.like`, `quantbench.version`), and the
//! same arguments give the same bytes on any machine.
//!
//! The file is streamed: the metadata first, then one tensor at a time, so
//! a 10 GB model needs the memory of its largest matrix, not of the model.

use crate::model::{c_path, open_gguf_metadata, ModelError};
use crate::weights::llm_like_weights;
use crate::{quantize, GgmlType};
use llama_cpp_sys_2 as sys;
use std::ffi::{CStr, CString};
use std::io::Write;
use std::path::Path;
use std::ptr;
use wire::synthetic::{Arch, SyntheticSpec, TensorRole};

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

    /// A llama spec of these dimensions with `n_vocab` tokens and an
    /// output head of its own.
    fn spec(self, n_vocab: usize) -> SyntheticSpec {
        SyntheticSpec {
            like: "llama".into(),
            arch: Arch::Llama,
            n_embd: self.n_embd,
            n_ff: self.n_ff,
            n_head: self.n_head,
            n_head_kv: self.n_head_kv,
            head_dim: self.n_embd / self.n_head,
            n_layer: self.n_layer,
            n_vocab,
            n_ctx_train: 4096,
            tied_embeddings: false,
            rope_freq_base: 10_000.0,
            sliding_window: None,
        }
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
/// (norms in F32), with the tokenizer of the GGUF `tokenizer_from` (and its
/// vocabulary size). Returns the weight matrices in file order.
pub fn write_llama(
    out: &Path,
    tokenizer_from: &Path,
    dims: LlamaDims,
    ty: GgmlType,
    seed: u64,
) -> Result<Vec<WrittenMatrix>, ModelError> {
    let n_vocab = read_vocab(tokenizer_from)?.tokens.len();
    write_model(out, tokenizer_from, &dims.spec(n_vocab), ty, seed)
}

/// Writes the model `spec` describes with its matrices in `ty` (vectors in
/// F32) and the tokenizer of `tokenizer_from`, padded with unique tokens to
/// `spec.n_vocab`. Written under a temporary name and renamed, so `out`
/// never holds half a model. Returns the weight matrices in file order.
pub fn write_model(
    out: &Path,
    tokenizer_from: &Path,
    spec: &SyntheticSpec,
    ty: GgmlType,
    seed: u64,
) -> Result<Vec<WrittenMatrix>, ModelError> {
    let plan = spec.tensors();
    let vocab = read_vocab(tokenizer_from)?.padded(spec.n_vocab)?;
    let temp = out.with_extension(format!("part-{}", std::process::id()));
    let written = (|| {
        let alignment = write_metadata(&temp, tokenizer_from, spec, ty, seed, &vocab, &plan)?;
        let io = |e: std::io::Error| ModelError::Llama(format!("writing {}: {e}", temp.display()));
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&temp)
            .map_err(io)?;
        let mut file = std::io::BufWriter::with_capacity(8 << 20, file);
        let mut written = Vec::new();
        for (index, tensor) in plan.iter().enumerate() {
            let bytes = match tensor.role {
                TensorRole::NormScale => f32_bytes(tensor.cols, 1.0),
                TensorRole::Bias => f32_bytes(tensor.cols, 0.0),
                TensorRole::Matrix => {
                    let values =
                        llm_like_weights(tensor.rows, tensor.cols, seed.wrapping_add(index as u64));
                    let quantized = quantize(ty, tensor.rows, tensor.cols, &values)
                        .map_err(|e| ModelError::Llama(format!("{}: {e}", tensor.name)))?;
                    written.push(WrittenMatrix {
                        name: tensor.name.clone(),
                        rows: tensor.rows,
                        cols: tensor.cols,
                        ty,
                        bytes: quantized.bytes(),
                    });
                    quantized.into_bytes()
                }
            };
            file.write_all(&bytes).map_err(io)?;
            let padding = bytes.len().next_multiple_of(alignment) - bytes.len();
            file.write_all(&vec![0u8; padding]).map_err(io)?;
        }
        file.flush().map_err(io)?;
        file.get_ref().sync_all().map_err(io)?;
        Ok(written)
    })();
    match written {
        Ok(written) => {
            std::fs::rename(&temp, out).map_err(|e| {
                ModelError::Llama(format!(
                    "renaming {} to {}: {e}",
                    temp.display(),
                    out.display()
                ))
            })?;
            Ok(written)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(e)
        }
    }
}

fn f32_bytes(n: usize, value: f32) -> Vec<u8> {
    std::iter::repeat_n(value.to_le_bytes(), n)
        .flatten()
        .collect()
}

/// A tokenizer's vocabulary as GGUF stores it.
struct Vocab {
    tokens: Vec<CString>,
    scores: Vec<f32>,
    token_types: Vec<i32>,
}

impl Vocab {
    /// Padded with unique, never-matched tokens to `n_vocab` (a model's
    /// embedding and output head have one row per token).
    fn padded(mut self, n_vocab: usize) -> Result<Vocab, ModelError> {
        if self.tokens.len() > n_vocab {
            return Err(ModelError::Llama(format!(
                "the borrowed tokenizer has {} tokens, more than the model's {n_vocab}",
                self.tokens.len()
            )));
        }
        for i in self.tokens.len()..n_vocab {
            self.tokens.push(
                CString::new(format!("<quantbench_pad_{i}>")).expect("no NUL in a pad token"),
            );
            self.scores.push(-1e9);
            // LLAMA_TOKEN_TYPE_UNUSED: never produced by the tokenizer.
            self.token_types.push(5);
        }
        Ok(self)
    }
}

fn read_vocab(tokenizer_from: &Path) -> Result<Vocab, ModelError> {
    let ctx = open_gguf_metadata(tokenizer_from)?;
    // SAFETY: ctx is a valid metadata context, freed before returning;
    // arrays are read within their reported lengths and types.
    let vocab = unsafe {
        let find = |key: &CStr| sys::gguf_find_key(ctx, key.as_ptr());
        let tokens_key = find(c"tokenizer.ggml.tokens");
        let n = if tokens_key < 0 {
            0
        } else {
            sys::gguf_get_arr_n(ctx, tokens_key)
        };
        let tokens: Vec<CString> = (0..n)
            .map(|i| CStr::from_ptr(sys::gguf_get_arr_str(ctx, tokens_key, i)).to_owned())
            .collect();
        let read_array = |key: &CStr, ty: sys::gguf_type| -> Vec<[u8; 4]> {
            let id = find(key);
            if id < 0 || sys::gguf_get_arr_type(ctx, id) != ty || sys::gguf_get_arr_n(ctx, id) != n
            {
                return Vec::new();
            }
            let data = sys::gguf_get_arr_data(ctx, id).cast::<[u8; 4]>();
            std::slice::from_raw_parts(data, n).to_vec()
        };
        let scores = read_array(c"tokenizer.ggml.scores", sys::GGUF_TYPE_FLOAT32);
        let types = read_array(c"tokenizer.ggml.token_type", sys::GGUF_TYPE_INT32);
        sys::gguf_free(ctx);
        Vocab {
            scores: if scores.len() == n {
                scores.into_iter().map(f32::from_le_bytes).collect()
            } else {
                vec![0.0; n]
            },
            token_types: if types.len() == n {
                types.into_iter().map(i32::from_le_bytes).collect()
            } else {
                vec![1; n]
            },
            tokens,
        }
    };
    if vocab.tokens.is_empty() {
        return Err(ModelError::Llama(format!(
            "{}: has no tokenizer.ggml.tokens to borrow",
            tokenizer_from.display()
        )));
    }
    Ok(vocab)
}

/// Writes the metadata and tensor index of the model (no tensor data) to
/// `out`; returns the data alignment.
fn write_metadata(
    out: &Path,
    tokenizer_from: &Path,
    spec: &SyntheticSpec,
    ty: GgmlType,
    seed: u64,
    vocab: &Vocab,
    plan: &[wire::synthetic::PlannedTensor],
) -> Result<usize, ModelError> {
    let target = c_path(out)?;
    let src = open_gguf_metadata(tokenizer_from)?;
    let arch = spec.arch.name();
    let key = |suffix: &str| CString::new(format!("{arch}.{suffix}")).expect("no NUL in keys");
    let names: Vec<CString> = plan
        .iter()
        .map(|t| CString::new(t.name.as_str()).expect("tensor names have no NUL"))
        .collect();
    let like = CString::new(spec.like.as_str()).expect("no NUL in a model name");
    let arch_c = CString::new(arch).expect("no NUL in an architecture");
    let name = CString::new(format!("quantbench synthetic {}", spec.like)).expect("no NUL");
    let version = CString::new(env!("CARGO_PKG_VERSION")).expect("no NUL");
    // SAFETY: every context is checked for NULL and freed on every path;
    // the tensors exist for their metadata only (no data is read).
    unsafe {
        let gguf = sys::gguf_init_empty();
        sys::gguf_set_kv(gguf, src);
        sys::gguf_free(src);
        // Only the tokenizer is borrowed: the donor's architecture keys and
        // names would misdescribe this model.
        let n_kv = sys::gguf_get_n_kv(gguf);
        let foreign: Vec<CString> = (0..n_kv)
            .map(|i| CStr::from_ptr(sys::gguf_get_key(gguf, i)).to_owned())
            .filter(|k| !k.to_bytes().starts_with(b"tokenizer."))
            .collect();
        for k in &foreign {
            sys::gguf_remove_key(gguf, k.as_ptr());
        }
        let token_ptrs: Vec<*const std::os::raw::c_char> =
            vocab.tokens.iter().map(|t| t.as_ptr()).collect();
        sys::gguf_set_arr_str(
            gguf,
            c"tokenizer.ggml.tokens".as_ptr(),
            token_ptrs.as_ptr().cast_mut(),
            token_ptrs.len(),
        );
        sys::gguf_set_arr_data(
            gguf,
            c"tokenizer.ggml.scores".as_ptr(),
            sys::GGUF_TYPE_FLOAT32,
            vocab.scores.as_ptr().cast(),
            vocab.scores.len(),
        );
        sys::gguf_set_arr_data(
            gguf,
            c"tokenizer.ggml.token_type".as_ptr(),
            sys::GGUF_TYPE_INT32,
            vocab.token_types.as_ptr().cast(),
            vocab.token_types.len(),
        );

        sys::gguf_set_val_str(gguf, c"general.architecture".as_ptr(), arch_c.as_ptr());
        sys::gguf_set_val_str(gguf, c"general.name".as_ptr(), name.as_ptr());
        // llama_ftype: ALL_F32 = 0, MOSTLY_F16 = 1; others are set by the
        // quantizer that makes a recipe from this file.
        match ty {
            GgmlType::F32 => sys::gguf_set_val_u32(gguf, c"general.file_type".as_ptr(), 0),
            GgmlType::F16 => sys::gguf_set_val_u32(gguf, c"general.file_type".as_ptr(), 1),
            _ => {}
        }
        sys::gguf_set_val_bool(gguf, c"quantbench.synthetic".as_ptr(), true);
        sys::gguf_set_val_u64(gguf, c"quantbench.seed".as_ptr(), seed);
        sys::gguf_set_val_str(gguf, c"quantbench.like".as_ptr(), like.as_ptr());
        sys::gguf_set_val_str(gguf, c"quantbench.version".as_ptr(), version.as_ptr());
        for (suffix, value) in [
            ("context_length", spec.n_ctx_train),
            ("embedding_length", spec.n_embd),
            ("feed_forward_length", spec.n_ff),
            ("block_count", spec.n_layer),
            ("attention.head_count", spec.n_head),
            ("attention.head_count_kv", spec.n_head_kv),
            ("attention.key_length", spec.head_dim),
            ("attention.value_length", spec.head_dim),
            ("rope.dimension_count", spec.head_dim),
            ("vocab_size", spec.n_vocab),
        ] {
            sys::gguf_set_val_u32(gguf, key(suffix).as_ptr(), value as u32);
        }
        sys::gguf_set_val_f32(gguf, key("rope.freq_base").as_ptr(), spec.rope_freq_base);
        let (eps_key, eps) = match spec.arch {
            Arch::Gpt2 => ("attention.layer_norm_epsilon", 1e-5),
            Arch::Gemma3 => ("attention.layer_norm_rms_epsilon", 1e-6),
            Arch::Llama | Arch::Exaone => ("attention.layer_norm_rms_epsilon", 1e-5),
        };
        sys::gguf_set_val_f32(gguf, key(eps_key).as_ptr(), eps);
        if let Some(window) = spec.sliding_window {
            sys::gguf_set_val_u32(
                gguf,
                key("attention.sliding_window").as_ptr(),
                window as u32,
            );
        }

        let ctx = sys::ggml_init(sys::ggml_init_params {
            mem_size: plan.len() * sys::ggml_tensor_overhead() + (1 << 16),
            mem_buffer: ptr::null_mut(),
            no_alloc: true,
        });
        if ctx.is_null() {
            sys::gguf_free(gguf);
            return Err(ModelError::Llama(
                "could not allocate the tensor index".into(),
            ));
        }
        for (tensor, name) in plan.iter().zip(&names) {
            let tensor_ty = match tensor.role {
                TensorRole::Matrix => ty,
                TensorRole::NormScale | TensorRole::Bias => GgmlType::F32,
            };
            let raw = crate::ffi::raw_type(tensor_ty);
            let t = if tensor.rows == 1 {
                sys::ggml_new_tensor_1d(ctx, raw, tensor.cols as i64)
            } else {
                sys::ggml_new_tensor_2d(ctx, raw, tensor.cols as i64, tensor.rows as i64)
            };
            sys::ggml_set_name(t, name.as_ptr());
            sys::gguf_add_tensor(gguf, t);
        }
        let alignment = sys::gguf_get_alignment(gguf);
        let ok = sys::gguf_write_to_file(gguf, target.as_ptr(), true);
        sys::ggml_free(ctx);
        sys::gguf_free(gguf);
        if !ok {
            return Err(ModelError::Llama(format!(
                "could not write {}",
                out.display()
            )));
        }
        Ok(alignment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{gguf_tensor_types, LoadedModel};

    #[test]
    fn every_seed_architecture_loads_in_llama_cpp_at_its_real_width_and_vocabulary() {
        let dir = tempfile_dir();
        for like in ["distilgpt2", "llama3.2-1b", "gemma3-1b", "exaone3.5-2.4b"] {
            // One block keeps the test quick; the width, heads and
            // vocabulary are the real model's.
            let spec = wire::synthetic::spec_for(like, Some(1)).unwrap();
            let path = dir.join(format!("{like}.gguf"));
            write_model(&path, &fixture(), &spec, GgmlType::F16, 11).unwrap();
            assert_eq!(
                std::fs::metadata(&path).unwrap().len(),
                expected_len(&spec),
                "{like}: streamed size"
            );
            let mut model = LoadedModel::load(&path, 64, 2).unwrap();
            assert_eq!(model.facts().n_layer, 1, "{like}");
            assert_eq!(model.n_vocab(), spec.n_vocab, "{like}");
            let logits = model.decode(&[1, 2, 3], 0, false).unwrap();
            assert_eq!(logits.len(), spec.n_vocab, "{like}");
            assert!(
                logits.iter().all(|v| v.is_finite()),
                "{like}: finite logits"
            );
            drop(model);
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn a_synthetic_model_is_the_same_bytes_every_time_and_says_what_it_is() {
        let dir = tempfile_dir();
        let spec = wire::synthetic::spec_for("distilgpt2", None).unwrap();
        let (a, b) = (dir.join("a.gguf"), dir.join("b.gguf"));
        write_model(&a, &fixture(), &spec, GgmlType::F32, 3).unwrap();
        write_model(&b, &fixture(), &spec, GgmlType::F32, 3).unwrap();
        let bytes = std::fs::read(&a).unwrap();
        assert!(bytes == std::fs::read(&b).unwrap(), "deterministic");
        let text = String::from_utf8_lossy(&bytes[..4 << 20]);
        for key in [
            "quantbench.synthetic",
            "quantbench.seed",
            "quantbench.like",
            "distilgpt2",
        ] {
            assert!(text.contains(key), "{key}");
        }
        // Every matrix F32, the vocabulary padded to GPT-2's 50257.
        assert!(gguf_tensor_types(&a)
            .unwrap()
            .iter()
            .all(|(_, t)| t == "f32"));
        let model = LoadedModel::load(&a, 64, 2).unwrap();
        assert_eq!(model.facts().n_layer, 6);
        assert_eq!(model.n_vocab(), 50257);
        drop(model);
        std::fs::remove_file(&a).unwrap();
        std::fs::remove_file(&b).unwrap();
    }

    /// The file size the plan predicts: metadata, then each tensor padded.
    fn expected_len(spec: &SyntheticSpec) -> u64 {
        // The metadata's own length is what the data section follows;
        // compare the data part exactly and bound the metadata.
        let data: u64 = spec
            .tensors()
            .iter()
            .map(|t| {
                let per = if t.role == TensorRole::Matrix { 2 } else { 4 };
                ((t.rows * t.cols) as u64 * per).next_multiple_of(32)
            })
            .sum();
        data + metadata_len(spec)
    }

    fn metadata_len(spec: &SyntheticSpec) -> u64 {
        // Written for this spec with no tensors' data: the prefix length.
        let path = tempfile_dir().join(format!("meta-{}.gguf", spec.like));
        let vocab = read_vocab(&fixture())
            .unwrap()
            .padded(spec.n_vocab)
            .unwrap();
        write_metadata(
            &path,
            &fixture(),
            spec,
            GgmlType::F16,
            11,
            &vocab,
            &spec.tensors(),
        )
        .unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::remove_file(&path).unwrap();
        len
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("qb-synthetic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

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
