//! Model recipes on the host: which recipe names exist (every llama.cpp
//! file type with llama-quantize's options, `adaptive`, and the calibrated
//! `<type>+imatrix`, `gptq-<type>` and codebook `sq<bits>[+s<percent>]`),
//! the layer assignment behind `adaptive`, and checking a model file before
//! any work. Producing each recipe's file, cached, is `cache`.

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

/// Recipe names that are llama.cpp file types (`llama-quantize` names, any
/// case): every type it offers for a dense model. (Its aliases `q3_k`,
/// `q4_k`, `q5_k` and `q3_k_xs` name files listed here; `mxfp4_moe` is for
/// mixture-of-experts weights.)
pub const UNIFORM_RECIPES: &[&str] = &[
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_1", "q5_0", "q5_k_m", "q5_k_s", "q4_1", "q4_0",
    "q4_k_m", "q4_k_s", "iq4_nl", "iq4_xs", "q3_k_l", "q3_k_m", "q3_k_s", "iq3_m", "iq3_s",
    "iq3_xs", "iq3_xxs", "q2_k", "q2_k_s", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s",
    "tq2_0", "tq1_0",
];

/// File types llama.cpp's quantizer refuses without an importance matrix
/// (their grids are too coarse to round onto unweighted): those whose
/// matrices are stored in a type of `NEEDS_IMATRIX_TYPES`, and Q2_K_S.
pub const NEEDS_IMATRIX: &[&str] = &[
    "iq3_xxs", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s", "q2_k_s",
];

/// Tensor types llama.cpp writes only with an importance matrix
/// (`tensor_requires_imatrix` in llama-quant.cpp).
pub const NEEDS_IMATRIX_TYPES: &[&str] =
    &["iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s", "iq1_m", "iq1_s"];

/// Ternary file types: weights that are -1, 0 or +1 times a scale, for
/// models trained that way (BitNet); any other model's weights are lost.
pub const TERNARY_TYPES: &[&str] = &["tq1_0", "tq2_0"];

/// GGML's names of the types a weight tensor can be stored in (what
/// llama-quantize's `--tensor-type` takes).
pub const GGML_TENSOR_TYPES: &[&str] = &[
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_0", "q5_1", "q5_k", "q4_0", "q4_1", "q4_k", "q3_k",
    "q2_k", "iq4_nl", "iq4_xs", "iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_s", "iq1_m",
    "tq1_0", "tq2_0", "mxfp4",
];

/// Model architectures trained for ternary weights.
pub const TERNARY_ARCHITECTURES: &[&str] = &["bitnet", "bitnet-25", "bitnet-b1.58"];

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

/// The file types AWQ's search rounds onto (`awq-<type>`): those whose
/// main tensor type GGML can quantize without an importance matrix.
pub const AWQ_TYPES: &[&str] = &[
    "q8_0", "q6_k", "q5_0", "q5_1", "q5_k_m", "q5_k_s", "q4_0", "q4_1", "q4_k_m", "q4_k_s",
    "iq4_nl", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k",
];

/// The block formats GPTQ is implemented for (`gptq-<type>`).
pub const GPTQ_TYPES: &[&str] = &["q4_0", "q8_0"];

/// A llama.cpp file type with llama-quantize's options:
/// `<type>[+imatrix | +imatrix=<file stem>][ [<option>,...] ]`, e.g.
/// `q4_k_m[ffn_down=q6_k,output=q8_0]`, `q4_0[pure]`,
/// `iq2_xs+imatrix=bartowski-imatrix`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeRecipe {
    /// The file type (`q4_0`, `iq2_xs`, ...), lower case.
    pub ftype: String,
    pub imatrix: Option<ImatrixSource>,
    pub options: QuantizeOptions,
}

/// Where an importance matrix comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ImatrixSource {
    /// Ours, made from the matrix's calibration text (`+imatrix`).
    Calibrated,
    /// The matrix's `imatrix` file, named by its stem (`+imatrix=<stem>`):
    /// one made by stock `llama-imatrix`, say.
    File(String),
}

/// llama-quantize's per-run options, in a recipe's brackets.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QuantizeOptions {
    /// `--tensor-type PATTERN=TYPE`: a regex searched in tensor names
    /// (`ffn_down`, `blk\.[0-3]\.attn_v`), first match wins; `output` and
    /// `token_embd` are `--output-tensor-type` and
    /// `--token-embedding-type` (those two tensors only).
    pub tensor_types: Vec<(String, String)>,
    /// `--pure`: every matrix the file type, none of llama.cpp's mixes.
    pub pure: bool,
}

impl QuantizeOptions {
    /// The overrides the agent passes to llama.cpp: regex -> GGML type,
    /// `output`/`token_embd` anchored to those tensors.
    pub fn overrides(&self) -> Vec<(String, String)> {
        self.tensor_types
            .iter()
            .map(|(pattern, ty)| match pattern.as_str() {
                "output" | "token_embd" => (format!("^{pattern}\\.weight$"), ty.clone()),
                _ => (pattern.clone(), ty.clone()),
            })
            .collect()
    }

    fn parse(name: &str, inside: &str) -> Result<QuantizeOptions, String> {
        let mut options = QuantizeOptions::default();
        for option in inside.split(',').map(str::trim) {
            if option == "pure" {
                options.pure = true;
                continue;
            }
            let Some((pattern, ty)) = option.split_once('=') else {
                return Err(format!(
                    "recipe `{name}`: option `{option}` is not `pure` or `<tensor pattern>=<type>` (e.g. `ffn_down=q6_k`, `output=q8_0`, `token_embd=q8_0`)"
                ));
            };
            let (pattern, ty) = (pattern.trim(), ty.trim().to_ascii_lowercase());
            if pattern.is_empty() {
                return Err(format!(
                    "recipe `{name}`: option `{option}` has no tensor pattern"
                ));
            }
            if !GGML_TENSOR_TYPES.contains(&ty.as_str()) {
                return Err(format!(
                    "recipe `{name}`: `{ty}` is not a GGML tensor type (one of {})",
                    GGML_TENSOR_TYPES.join(", ")
                ));
            }
            options.tensor_types.push((pattern.to_string(), ty));
        }
        Ok(options)
    }
}

/// A model recipe, parsed from its name.
#[derive(Debug, Clone, PartialEq)]
pub enum Recipe {
    /// A llama.cpp file type, optionally with an importance matrix and
    /// llama-quantize's options.
    Quantize(QuantizeRecipe),
    /// `adaptive`: layers by importance (see `AdaptiveParams`).
    Adaptive,
    /// `gptq-<type>`: GPTQ's error-compensating rounding onto the type's grid.
    Gptq(String),
    /// `awq-<type>`: AWQ's activation-aware scales, searched on the
    /// calibration text and folded into the model, then llama.cpp's
    /// quantizer.
    Awq(String),
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
        if lower.starts_with("sq") {
            return CodebookType::parse(&lower)
                .map(Recipe::Codebook)
                .map_err(|e| format!("recipe {e}"));
        }
        if let Some(recipe) = QuantizeRecipe::parse(name)? {
            return Ok(Recipe::Quantize(recipe));
        }
        if let Some(base) = lower.strip_prefix("awq-") {
            if AWQ_TYPES.contains(&base) {
                return Ok(Recipe::Awq(base.to_string()));
            }
            return Err(format!(
                "recipe `{name}`: AWQ is implemented for {}",
                AWQ_TYPES.join(", ")
            ));
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
            "unknown recipe `{name}` (known: adaptive, {}, <type>+imatrix for a quantized type, <type>[ffn_down=q6_k,output=q8_0,pure], gptq-q4_0, gptq-q8_0, awq-<type>, sq4, sq3, sq4+s0.45)",
            UNIFORM_RECIPES.join(", ")
        ))
    }

    /// Whether the recipe is made from the calibration text's activations.
    pub fn is_calibrated(&self) -> bool {
        match self {
            Recipe::Quantize(q) => q.imatrix == Some(ImatrixSource::Calibrated),
            Recipe::Gptq(_) | Recipe::Awq(_) | Recipe::Codebook(_) => true,
            Recipe::Adaptive => false,
        }
    }
}

impl QuantizeRecipe {
    /// `None` when `name` does not start with a file type (another kind of
    /// recipe); an error when it does but the rest is wrong.
    fn parse(name: &str) -> Result<Option<QuantizeRecipe>, String> {
        let (head, options) = match name.split_once('[') {
            Some((head, rest)) => match rest.strip_suffix(']') {
                Some(inside) => (head, Some(inside)),
                None => return Err(format!("recipe `{name}`: options go in brackets at the end, `q4_k_m[ffn_down=q6_k,pure]`")),
            },
            None => (name, None),
        };
        let head = head.to_ascii_lowercase();
        let (ftype, imatrix) = match head.split_once('+') {
            Some((ftype, "imatrix")) => (ftype, Some(ImatrixSource::Calibrated)),
            Some((ftype, rest)) => match rest.strip_prefix("imatrix=") {
                Some(stem) if !stem.is_empty() => (ftype, Some(ImatrixSource::File(stem.to_string()))),
                _ if is_uniform_recipe(ftype) => {
                    return Err(format!(
                        "recipe `{name}`: after `{ftype}` comes `+imatrix` (ours, from the calibration text) or `+imatrix=<file stem>` (the matrix's `imatrix` file), not `+{rest}`"
                    ))
                }
                _ => return Ok(None),
            },
            None => (head.as_str(), None),
        };
        if !is_uniform_recipe(ftype) {
            return Ok(None);
        }
        if imatrix.is_some() && matches!(ftype, "f32" | "f16" | "bf16") {
            return Err(format!(
                "recipe `{name}`: an importance matrix weights a quantized type's rounding; `{ftype}` is not one (use one of {})",
                quantized_types().join(", ")
            ));
        }
        if imatrix.is_none() && NEEDS_IMATRIX.contains(&ftype) {
            return Err(format!(
                "recipe `{name}`: llama.cpp quantizes `{ftype}` only with an importance matrix (its grid is too coarse to round onto unweighted): use `{ftype}+imatrix` (ours, from the calibration text) or `{ftype}+imatrix=<stem>` with the matrix's `imatrix` file"
            ));
        }
        let options = match options {
            Some(inside) => QuantizeOptions::parse(name, inside)?,
            None => QuantizeOptions::default(),
        };
        if let (None, Some((pattern, ty))) = (
            &imatrix,
            options
                .tensor_types
                .iter()
                .find(|(_, ty)| NEEDS_IMATRIX_TYPES.contains(&ty.as_str())),
        ) {
            return Err(format!(
                "recipe `{name}`: `{pattern}={ty}` needs an importance matrix (llama.cpp writes {ty} only with one): add `+imatrix` or `+imatrix=<stem>` after `{ftype}`"
            ));
        }
        Ok(Some(QuantizeRecipe {
            ftype: ftype.to_string(),
            imatrix,
            options,
        }))
    }

    /// Whether the recipe is one of llama.cpp's plain file types with
    /// llama-quantize's defaults.
    pub fn is_plain(&self) -> bool {
        self.imatrix.is_none() && self.options == QuantizeOptions::default()
    }
}

/// A ternary recipe on a model not trained for it is refused: say so.
pub fn check_ternary(recipe: &str, model: &str, architecture: Option<&str>) -> Result<(), String> {
    let Ok(Recipe::Quantize(q)) = Recipe::parse(recipe) else {
        return Ok(());
    };
    if !TERNARY_TYPES.contains(&q.ftype.as_str()) {
        return Ok(());
    }
    match architecture {
        Some(arch) if TERNARY_ARCHITECTURES.contains(&arch) => Ok(()),
        arch => Err(format!(
            "recipe `{recipe}` stores every weight as -1, 0 or +1 times a scale, which only models trained that way survive (architectures {}); {model} is `{}`: its weights would be destroyed, so the row would measure a broken model. Use a ternary model, or another type",
            TERNARY_ARCHITECTURES.join(", "),
            arch.unwrap_or("of no stated architecture")
        )),
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
    /// AWQ only: per group of matrices sharing an input, the alpha chosen
    /// (0: plain rounding was best) and what its scales were folded into.
    #[serde(default)]
    pub alphas: Vec<AwqAlpha>,
    pub seconds: f64,
}

/// One AWQ group's chosen alpha.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AwqAlpha {
    pub folded_into: String,
    pub alpha: f64,
}

/// `0.15-0.6 (median 0.35)` for a note.
fn alpha_range(alphas: &[AwqAlpha]) -> String {
    let mut sorted: Vec<f64> = alphas.iter().map(|a| a.alpha).collect();
    sorted.sort_by(f64::total_cmp);
    match (sorted.first(), sorted.last()) {
        (Some(lo), Some(hi)) => format!("{lo}-{hi} (median {})", sorted[sorted.len() / 2]),
        _ => "none".into(),
    }
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
            ("awq", Some(rtn), Some(awq)) => format!(
                "AWQ calibrated on {text} (ctx {}, {} chunks): scales over {} groups, alpha {}; mean relative output error {awq:.3e} vs {rtn:.3e} rounding to nearest",
                self.ctx,
                self.chunks,
                self.alphas.len(),
                alpha_range(&self.alphas),
            ),
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
        let quantize = |ftype: &str, imatrix, tensor_types: &[(&str, &str)], pure| {
            Recipe::Quantize(QuantizeRecipe {
                ftype: ftype.into(),
                imatrix,
                options: QuantizeOptions {
                    tensor_types: tensor_types
                        .iter()
                        .map(|(p, t)| (p.to_string(), t.to_string()))
                        .collect(),
                    pure,
                },
            })
        };
        assert_eq!(
            Recipe::parse("Q4_0").unwrap(),
            quantize("q4_0", None, &[], false)
        );
        assert_eq!(
            Recipe::parse("iq4_nl+imatrix").unwrap(),
            quantize("iq4_nl", Some(ImatrixSource::Calibrated), &[], false)
        );
        assert!(Recipe::parse("iq4_nl+imatrix").unwrap().is_calibrated());
        let with_options = Recipe::parse("q4_k_m[ffn_down=Q6_K, output=q8_0,pure]").unwrap();
        assert_eq!(
            with_options,
            quantize(
                "q4_k_m",
                None,
                &[("ffn_down", "q6_k"), ("output", "q8_0")],
                true
            )
        );
        let Recipe::Quantize(q) = with_options else {
            unreachable!()
        };
        assert_eq!(
            q.options.overrides(),
            vec![
                ("ffn_down".to_string(), "q6_k".to_string()),
                ("^output\\.weight$".to_string(), "q8_0".to_string())
            ]
        );
        assert_eq!(
            Recipe::parse("iq2_xs+imatrix=stock-imatrix").unwrap(),
            quantize(
                "iq2_xs",
                Some(ImatrixSource::File("stock-imatrix".into())),
                &[],
                false
            )
        );
        let e = Recipe::parse("iq2_xxs").unwrap_err();
        assert!(
            e.contains("only with an importance matrix") && e.contains("iq2_xxs+imatrix"),
            "{e}"
        );
        let e = Recipe::parse("q4_0[ffn_down=q9_k]").unwrap_err();
        assert!(e.contains("`q9_k` is not a GGML tensor type"), "{e}");
        let e = Recipe::parse("q4_k_m[ffn_down=iq2_xs]").unwrap_err();
        assert!(
            e.contains("`ffn_down=iq2_xs` needs an importance matrix"),
            "{e}"
        );
        assert!(Recipe::parse("q4_k_m+imatrix[ffn_down=iq2_xs]").is_ok());
        let e = Recipe::parse("q4_0[everything]").unwrap_err();
        assert!(e.contains("`everything` is not `pure`"), "{e}");
        let e = Recipe::parse("q4_0+imatrx").unwrap_err();
        assert!(e.contains("not `+imatrx`"), "{e}");
        let e = check_ternary("tq1_0", "stories260K.gguf", Some("llama")).unwrap_err();
        assert!(e.contains("-1, 0 or +1") && e.contains("`llama`"), "{e}");
        assert!(check_ternary("tq1_0", "b.gguf", Some("bitnet")).is_ok());
        assert!(check_ternary("q4_0", "a.gguf", Some("llama")).is_ok());
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
