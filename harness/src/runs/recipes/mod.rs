//! Model recipes on the host: which recipe names exist (llama.cpp file
//! types, `adaptive`, and the calibrated `<type>+imatrix`, `gptq-<type>` and
//! codebook `sq<bits>[+s<percent>]`), the layer assignment behind
//! `adaptive`, and checking a model file before any work. Producing each
//! recipe's file, cached, is `cache`.

pub mod cache;

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use thiserror::Error;
use wire::weight_format::CodebookType;

#[derive(Debug, Error)]
pub enum RecipeError {
    #[error("model {path}: {reason}")]
    BadModel { path: PathBuf, reason: String },
    #[error("running {path}: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`quantbench-agent {subcommand}` failed: {message}")]
    AgentFailed { subcommand: String, message: String },
    #[error("`quantbench-agent {subcommand}` printed unreadable JSON: {source}")]
    AgentOutput {
        subcommand: String,
        source: serde_json::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Recipe names that are llama.cpp file types (`llama-quantize` names, any case).
pub const UNIFORM_RECIPES: &[&str] = &[
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_1", "q5_0", "q5_k_m", "q4_1", "q4_0", "q4_k_m",
    "q4_k_s", "iq4_nl", "q3_k_m", "q2_k",
];

/// `adaptive`: layers ranked by measured importance; the most important
/// `high_fraction` keep `high`, the next `mid_fraction` get `mid`, the rest `low`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveParams {
    #[serde(default = "default_high")]
    pub high: String,
    #[serde(default = "default_mid")]
    pub mid: String,
    #[serde(default = "default_low")]
    pub low: String,
    #[serde(default = "default_fraction")]
    pub high_fraction: f64,
    #[serde(default = "default_fraction")]
    pub mid_fraction: f64,
}

impl Default for AdaptiveParams {
    fn default() -> Self {
        AdaptiveParams {
            high: default_high(),
            mid: default_mid(),
            low: default_low(),
            high_fraction: default_fraction(),
            mid_fraction: default_fraction(),
        }
    }
}

fn default_high() -> String {
    "f32".into()
}
fn default_mid() -> String {
    "q8_0".into()
}
fn default_low() -> String {
    "q4_0".into()
}
fn default_fraction() -> f64 {
    0.3
}

pub fn is_uniform_recipe(name: &str) -> bool {
    UNIFORM_RECIPES.iter().any(|r| r.eq_ignore_ascii_case(name))
}

/// The block formats GPTQ is implemented for (`gptq-<type>`).
pub const GPTQ_TYPES: &[&str] = &["q4_0", "q8_0"];

/// A model recipe, parsed from its name.
#[derive(Debug, Clone, PartialEq)]
pub enum Recipe {
    /// A llama.cpp file type (`q4_0`, `q4_k_m`, ...).
    Uniform(String),
    /// `adaptive`: layers by importance (see `AdaptiveParams`).
    Adaptive,
    /// `<type>+imatrix`: llama.cpp's quantizer weighted by the importance
    /// matrix of the calibration text.
    Imatrix(String),
    /// `gptq-<type>`: GPTQ's error-compensating rounding onto the type's grid.
    Gptq(String),
    /// `sq4`, `sq3`, `sq4+s0.45`: per-row codebooks (see
    /// `kernels::codebook`) with the calibration text's importance matrix
    /// as sensitivities, evaluated on the decoded weights.
    Codebook(CodebookType),
}

impl Recipe {
    pub fn parse(name: &str) -> Result<Recipe, String> {
        let lower = name.to_ascii_lowercase();
        if lower == "adaptive" {
            return Ok(Recipe::Adaptive);
        }
        if is_uniform_recipe(&lower) {
            return Ok(Recipe::Uniform(lower));
        }
        if let Some(base) = lower.strip_suffix("+imatrix") {
            if is_uniform_recipe(base) && !matches!(base, "f32" | "f16" | "bf16") {
                return Ok(Recipe::Imatrix(base.to_string()));
            }
            return Err(format!(
                "recipe `{name}`: `+imatrix` calibrates a quantized type; `{base}` is not one (use one of {})",
                quantized_types().join(", ")
            ));
        }
        if lower.starts_with("sq") {
            return CodebookType::parse(&lower)
                .map(Recipe::Codebook)
                .map_err(|e| format!("recipe {e}"));
        }
        if let Some(base) = lower.strip_prefix("gptq-") {
            if GPTQ_TYPES.contains(&base) {
                return Ok(Recipe::Gptq(base.to_string()));
            }
            return Err(format!(
                "recipe `{name}`: GPTQ is implemented for {} (block formats with one scale per 32 weights)",
                GPTQ_TYPES.join(", ")
            ));
        }
        Err(format!(
            "unknown recipe `{name}` (known: adaptive, {}, <type>+imatrix for a quantized type, gptq-q4_0, gptq-q8_0, sq4, sq3, sq4+s0.45)",
            UNIFORM_RECIPES.join(", ")
        ))
    }

    /// Whether the recipe is made from the calibration text's activations.
    pub fn is_calibrated(&self) -> bool {
        matches!(
            self,
            Recipe::Imatrix(_) | Recipe::Gptq(_) | Recipe::Codebook(_)
        )
    }
}

fn quantized_types() -> Vec<&'static str> {
    UNIFORM_RECIPES
        .iter()
        .copied()
        .filter(|r| !matches!(*r, "f32" | "f16" | "bf16"))
        .collect()
}

/// What calibrating a recipe did, kept with the run (`calibration.json`)
/// and in the recipe cache beside the GGUF.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationRecord {
    pub model: String,
    pub recipe: String,
    /// `imatrix` or `gptq`.
    pub method: String,
    pub text: String,
    pub ctx: usize,
    pub chunks: usize,
    /// GPTQ's dampening (fraction of the Hessian's mean diagonal).
    #[serde(default)]
    pub damp: Option<f64>,
    /// GPTQ only: per weight matrix, the relative output error on the
    /// calibration activations of plain rounding and of GPTQ.
    #[serde(default)]
    pub matrices: Vec<wire::model_job::MatrixError>,
    #[serde(default)]
    pub mean_error_rtn: Option<f64>,
    #[serde(default)]
    pub mean_error_gptq: Option<f64>,
    pub seconds: f64,
}

/// Layers per precision for `adaptive`: of `n_layers`, the top
/// round(high_fraction * n) by importance are high, the next
/// round(mid_fraction * n) mid, the rest low.
pub fn adaptive_assignment(scores: &[f64], params: &AdaptiveParams) -> Vec<String> {
    let n = scores.len();
    let n_high = ((params.high_fraction * n as f64).round() as usize).min(n);
    let n_mid = ((params.mid_fraction * n as f64).round() as usize).min(n - n_high);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut types = vec![params.low.clone(); n];
    for (rank, &layer) in order.iter().enumerate() {
        if rank < n_high {
            types[layer] = params.high.clone();
        } else if rank < n_high + n_mid {
            types[layer] = params.mid.clone();
        }
    }
    types
}

/// Checks a model file before anything is built or uploaded.
pub fn check_model_file(path: &Path) -> Result<u64, RecipeError> {
    let bad = |reason: String| RecipeError::BadModel {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    let mut magic = [0u8; 4];
    use std::io::Read;
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|_| {
            bad(format!(
                "too short to be a GGUF file ({} bytes)",
                meta.len()
            ))
        })?;
    if &magic != b"GGUF" {
        return Err(bad(format!(
            "not a GGUF file (starts with {:?}, expected \"GGUF\")",
            String::from_utf8_lossy(&magic)
        )));
    }
    // The whole header, before GGML (which trusts it) ever reads the file.
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    wire::gguf::check(std::io::BufReader::new(file), meta.len())
        .map_err(|e| bad(format!("not a GGUF file GGML can read safely: {e}")))?;
    Ok(meta.len())
}

/// Per-layer importance of one model, stored with the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerImportance {
    pub model: String,
    /// How it was measured.
    pub method: String,
    /// Mean KL divergence per layer (index = layer).
    pub scores: Vec<f64>,
    /// The type each layer got in the `adaptive` recipe.
    pub assignment: Vec<String>,
}

impl CalibrationRecord {
    /// The row note of a recipe made this way.
    pub fn note(&self) -> String {
        let text = Path::new(&self.text)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.text.clone());
        match (self.method.as_str(), self.mean_error_rtn, self.mean_error_gptq) {
            ("gptq", Some(rtn), Some(gptq)) => format!(
                "GPTQ calibrated on {text} (ctx {}, {} chunks, damp {}): mean relative output error {gptq:.3e} vs {rtn:.3e} rounding to nearest, over {} matrices",
                self.ctx,
                self.chunks,
                self.damp.unwrap_or(0.01),
                self.matrices.len()
            ),
            _ => format!(
                "importance matrix from {text} (ctx {}, {} chunks)",
                self.ctx, self.chunks
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_assigns_fractions_by_rank() {
        let params = AdaptiveParams::default();
        // 10 layers, importance = layer index: 9,8,7 high; 6,5,4 mid; rest low.
        let scores: Vec<f64> = (0..10).map(|i| i as f64).collect();
        let types = adaptive_assignment(&scores, &params);
        assert_eq!(types[9], "f32");
        assert_eq!(types[7], "f32");
        assert_eq!(types[6], "q8_0");
        assert_eq!(types[4], "q8_0");
        assert_eq!(types[3], "q4_0");
        assert_eq!(types.iter().filter(|t| *t == "q4_0").count(), 4);
    }

    #[test]
    fn recipe_names_parse_and_bad_ones_say_what_is_allowed() {
        assert_eq!(
            Recipe::parse("Q4_0").unwrap(),
            Recipe::Uniform("q4_0".into())
        );
        assert_eq!(
            Recipe::parse("iq4_nl+imatrix").unwrap(),
            Recipe::Imatrix("iq4_nl".into())
        );
        assert_eq!(
            Recipe::parse("gptq-q8_0").unwrap(),
            Recipe::Gptq("q8_0".into())
        );
        assert!(Recipe::parse("gptq-q4_0").unwrap().is_calibrated());
        assert!(!Recipe::parse("adaptive").unwrap().is_calibrated());
        let e = Recipe::parse("f16+imatrix").unwrap_err();
        assert!(e.contains("quantized type") && e.contains("q4_k_m"), "{e}");
        let e = Recipe::parse("gptq-q4_k_m").unwrap_err();
        assert!(e.contains("q4_0, q8_0"), "{e}");
        assert_eq!(
            Recipe::parse("SQ4+S0.45").unwrap(),
            Recipe::Codebook(CodebookType {
                bits: 4,
                outlier_percent: Some(0.45)
            })
        );
        assert!(Recipe::parse("sq3").unwrap().is_calibrated());
        let e = Recipe::parse("sq4+s11").unwrap_err();
        assert!(e.contains("sq4+s11") && e.contains("(0, 10]"), "{e}");
        let e = Recipe::parse("sq2").unwrap_err();
        assert!(e.contains("SQ4 or SQ3"), "{e}");
        let e = Recipe::parse("q9_9").unwrap_err();
        assert!(
            e.contains("unknown recipe `q9_9`") && e.contains("gptq-q4_0"),
            "{e}"
        );
    }

    #[test]
    fn model_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let not_gguf = dir.path().join("x.gguf");
        std::fs::write(&not_gguf, b"PK\x03\x04zip").unwrap();
        assert!(check_model_file(&not_gguf)
            .unwrap_err()
            .to_string()
            .contains("not a GGUF file"));
        std::fs::write(&not_gguf, b"GG").unwrap();
        assert!(check_model_file(&not_gguf)
            .unwrap_err()
            .to_string()
            .contains("too short"));
        assert!(check_model_file(&dir.path().join("missing.gguf")).is_err());
    }
}
