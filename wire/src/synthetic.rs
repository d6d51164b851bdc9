//! Synthetic models: the seed studies' architectures and sizes, and the
//! tensor plan of a GGUF that stock llama.cpp loads as one of them. The
//! host plans with it (sizes, checks, cache keys) and the agent writes the
//! file from the same plan, so both agree on every byte count.

use serde::{Deserialize, Serialize};
use std::fmt;

/// llama.cpp's architecture names for the models quantbench can make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// GPT-2: learned positions, LayerNorm with biases, fused QKV, GELU MLP.
    Gpt2,
    /// Llama: RoPE, RMSNorm, grouped-query attention, SwiGLU MLP.
    Llama,
    /// Gemma 3: Llama's blocks plus Q/K norms, post-norms, sliding windows.
    Gemma3,
    /// EXAONE: Llama's blocks under LG's names.
    Exaone,
}

impl Arch {
    /// `general.architecture` and the prefix of the model's metadata keys.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Gpt2 => "gpt2",
            Arch::Llama => "llama",
            Arch::Gemma3 => "gemma3",
            Arch::Exaone => "exaone",
        }
    }
}

/// One model's architecture and sizes, as its Hugging Face config gives them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyntheticSpec {
    /// The name `--like` and `synthetic:<name>` use.
    pub like: String,
    pub arch: Arch,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_layer: usize,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    /// The output head shares the token embedding (no `output.weight`).
    pub tied_embeddings: bool,
    pub rope_freq_base: f32,
    /// Gemma 3's local-attention window (every sixth layer is global).
    pub sliding_window: Option<usize>,
}

/// The architectures quantbench can make, at their real sizes.
pub fn known_models() -> Vec<SyntheticSpec> {
    let spec = |like: &str, arch, dims: [usize; 8], tied, rope, window| SyntheticSpec {
        like: like.to_string(),
        arch,
        n_embd: dims[0],
        n_ff: dims[1],
        n_head: dims[2],
        n_head_kv: dims[3],
        head_dim: dims[4],
        n_layer: dims[5],
        n_vocab: dims[6],
        n_ctx_train: dims[7],
        tied_embeddings: tied,
        rope_freq_base: rope,
        sliding_window: window,
    };
    vec![
        // distilgpt2: the first study's model.
        spec(
            "distilgpt2",
            Arch::Gpt2,
            [768, 3072, 12, 12, 64, 6, 50257, 1024],
            true,
            10_000.0,
            None,
        ),
        spec(
            "llama3.2-1b",
            Arch::Llama,
            [2048, 8192, 32, 8, 64, 16, 128_256, 131_072],
            true,
            500_000.0,
            None,
        ),
        spec(
            "gemma3-1b",
            Arch::Gemma3,
            [1152, 6912, 4, 1, 256, 26, 262_144, 32_768],
            true,
            1_000_000.0,
            Some(512),
        ),
        spec(
            "exaone3.5-2.4b",
            Arch::Exaone,
            [2560, 7168, 32, 8, 80, 30, 102_400, 32_768],
            true,
            1_000_000.0,
            None,
        ),
    ]
}

/// Why a synthetic model cannot be made as asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecError {
    UnknownModel(String),
    Layers {
        like: String,
        asked: usize,
        has: usize,
    },
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpecError::UnknownModel(name) => write!(
                f,
                "no synthetic model like `{name}`; known: {}",
                known_models()
                    .iter()
                    .map(|m| m.like.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            SpecError::Layers { like, asked, has } => write!(
                f,
                "--layers {asked}: {like} has {has} layers; give 1 to {has}"
            ),
        }
    }
}

impl std::error::Error for SpecError {}

/// The model `like` names, with `layers` of its blocks (all when `None`).
pub fn spec_for(like: &str, layers: Option<usize>) -> Result<SyntheticSpec, SpecError> {
    let mut spec = known_models()
        .into_iter()
        .find(|m| m.like == like)
        .ok_or_else(|| SpecError::UnknownModel(like.to_string()))?;
    if let Some(asked) = layers {
        if asked == 0 || asked > spec.n_layer {
            return Err(SpecError::Layers {
                like: spec.like,
                asked,
                has: spec.n_layer,
            });
        }
        spec.n_layer = asked;
    }
    Ok(spec)
}

/// What a tensor of the plan holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    /// A weight matrix (or embedding): seeded LLM-like values in the
    /// model's weight type.
    Matrix,
    /// A norm's scale: ones, F32.
    NormScale,
    /// A bias (or a norm's shift): zeros, F32.
    Bias,
}

/// One tensor of the file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTensor {
    pub name: String,
    /// Output features (GGML's ne1); 1 for vectors.
    pub rows: usize,
    /// Input features (GGML's ne0).
    pub cols: usize,
    pub role: TensorRole,
}

impl SyntheticSpec {
    pub fn n_embd_q(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn n_embd_kv(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Every tensor llama.cpp's loader asks for, in file order.
    pub fn tensors(&self) -> Vec<PlannedTensor> {
        let (e, q, kv, ff) = (self.n_embd, self.n_embd_q(), self.n_embd_kv(), self.n_ff);
        let mut plan = Vec::new();
        let mut add = |name: String, rows: usize, cols: usize, role| {
            plan.push(PlannedTensor {
                name,
                rows,
                cols,
                role,
            })
        };
        add(
            "token_embd.weight".into(),
            self.n_vocab,
            e,
            TensorRole::Matrix,
        );
        if self.arch == Arch::Gpt2 {
            add(
                "position_embd.weight".into(),
                self.n_ctx_train,
                e,
                TensorRole::Matrix,
            );
        }
        for l in 0..self.n_layer {
            let b = |part: &str| format!("blk.{l}.{part}");
            match self.arch {
                Arch::Gpt2 => {
                    add(b("attn_norm.weight"), 1, e, TensorRole::NormScale);
                    add(b("attn_norm.bias"), 1, e, TensorRole::Bias);
                    add(b("attn_qkv.weight"), q + 2 * kv, e, TensorRole::Matrix);
                    add(b("attn_qkv.bias"), 1, q + 2 * kv, TensorRole::Bias);
                    add(b("attn_output.weight"), e, q, TensorRole::Matrix);
                    add(b("attn_output.bias"), 1, e, TensorRole::Bias);
                    add(b("ffn_norm.weight"), 1, e, TensorRole::NormScale);
                    add(b("ffn_norm.bias"), 1, e, TensorRole::Bias);
                    add(b("ffn_up.weight"), ff, e, TensorRole::Matrix);
                    add(b("ffn_up.bias"), 1, ff, TensorRole::Bias);
                    add(b("ffn_down.weight"), e, ff, TensorRole::Matrix);
                    add(b("ffn_down.bias"), 1, e, TensorRole::Bias);
                }
                Arch::Llama | Arch::Gemma3 | Arch::Exaone => {
                    add(b("attn_norm.weight"), 1, e, TensorRole::NormScale);
                    add(b("attn_q.weight"), q, e, TensorRole::Matrix);
                    add(b("attn_k.weight"), kv, e, TensorRole::Matrix);
                    add(b("attn_v.weight"), kv, e, TensorRole::Matrix);
                    if self.arch == Arch::Gemma3 {
                        let d = self.head_dim;
                        add(b("attn_q_norm.weight"), 1, d, TensorRole::NormScale);
                        add(b("attn_k_norm.weight"), 1, d, TensorRole::NormScale);
                    }
                    add(b("attn_output.weight"), e, q, TensorRole::Matrix);
                    if self.arch == Arch::Gemma3 {
                        add(b("post_attention_norm.weight"), 1, e, TensorRole::NormScale);
                    }
                    add(b("ffn_norm.weight"), 1, e, TensorRole::NormScale);
                    add(b("ffn_gate.weight"), ff, e, TensorRole::Matrix);
                    add(b("ffn_up.weight"), ff, e, TensorRole::Matrix);
                    add(b("ffn_down.weight"), e, ff, TensorRole::Matrix);
                    if self.arch == Arch::Gemma3 {
                        add(b("post_ffw_norm.weight"), 1, e, TensorRole::NormScale);
                    }
                }
            }
        }
        add("output_norm.weight".into(), 1, e, TensorRole::NormScale);
        if self.arch == Arch::Gpt2 {
            add("output_norm.bias".into(), 1, e, TensorRole::Bias);
        }
        if !self.tied_embeddings {
            add("output.weight".into(), self.n_vocab, e, TensorRole::Matrix);
        }
        plan
    }

    /// Parameters in the file.
    pub fn parameters(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|t| (t.rows * t.cols) as u64)
            .sum()
    }

    /// The file's size with matrices stored at `bytes_per_weight` (4 for
    /// F32, 2 for F16) and vectors in F32, plus room for the metadata
    /// (the padded vocabulary dominates it).
    pub fn file_bytes(&self, bytes_per_weight: u64) -> u64 {
        let tensors: u64 = self
            .tensors()
            .iter()
            .map(|t| {
                let per = match t.role {
                    TensorRole::Matrix => bytes_per_weight,
                    _ => 4,
                };
                (t.rows * t.cols) as u64 * per + 32
            })
            .sum();
        tensors + self.n_vocab as u64 * 32 + (1 << 20)
    }

    /// The most host memory writing it takes: the largest matrix as f32
    /// values plus its converted bytes.
    pub fn peak_write_bytes(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|t| (t.rows * t.cols) as u64 * 8)
            .max()
            .unwrap_or(0)
            + (64 << 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_models_have_their_published_sizes() {
        // Parameter counts as published (tied embeddings counted once).
        let published = [
            ("distilgpt2", 81.9e6),
            ("llama3.2-1b", 1.236e9),
            ("gemma3-1b", 1.0e9),
            ("exaone3.5-2.4b", 2.405e9),
        ];
        for (like, params) in published {
            let spec = spec_for(like, None).unwrap();
            let ratio = spec.parameters() as f64 / params;
            assert!(
                (0.97..1.03).contains(&ratio),
                "{like}: {}",
                spec.parameters()
            );
        }
    }

    #[test]
    fn unknown_names_and_impossible_layer_counts_are_refused_in_one_line() {
        let unknown = spec_for("gpt5", None).unwrap_err().to_string();
        assert!(
            unknown.contains("gpt5") && unknown.contains("llama3.2-1b"),
            "{unknown}"
        );
        for layers in [0, 17] {
            let e = spec_for("llama3.2-1b", Some(layers))
                .unwrap_err()
                .to_string();
            assert!(e.contains("has 16 layers") && e.contains("1 to 16"), "{e}");
        }
        assert_eq!(spec_for("llama3.2-1b", Some(2)).unwrap().n_layer, 2);
    }

    #[test]
    fn plans_name_what_llama_cpp_loads() {
        let gpt2 = spec_for("distilgpt2", Some(1)).unwrap().tensors();
        assert!(gpt2
            .iter()
            .any(|t| t.name == "blk.0.attn_qkv.weight" && t.rows == 2304));
        assert!(gpt2.iter().any(|t| t.name == "position_embd.weight"));
        let gemma = spec_for("gemma3-1b", Some(1)).unwrap().tensors();
        let q = gemma
            .iter()
            .find(|t| t.name == "blk.0.attn_q.weight")
            .unwrap();
        assert_eq!((q.rows, q.cols), (1024, 1152));
        assert!(gemma.iter().any(|t| t.name == "blk.0.post_ffw_norm.weight"));
        assert!(!gemma.iter().any(|t| t.name == "output.weight"), "tied");
    }
}
