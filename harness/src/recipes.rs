//! Model recipes on the host: which recipe names exist (llama.cpp file
//! types and `adaptive`), the layer assignment behind `adaptive`, checking a
//! model file before any work, and producing each recipe's GGUF with the
//! host agent (`quantize`, `importance`), cached by model hash and recipe.

use crate::build::AgentBuild;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;
use thiserror::Error;
use wire::model_job::RecipeFile;

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

/// Runs the host agent and reads the JSON it prints; a failure carries the
/// agent's own one-line message (anyhow's `Error: ...`), not a backtrace.
pub(crate) fn agent_json(
    agent: &AgentBuild,
    args: &[String],
) -> Result<serde_json::Value, RecipeError> {
    let subcommand = args.first().cloned().unwrap_or_default();
    let out = Command::new(&agent.path)
        .args(args)
        .output()
        .map_err(|source| RecipeError::Spawn {
            path: agent.path.clone(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let message = stderr
            .lines()
            .find_map(|l| l.strip_prefix("Error: "))
            .or_else(|| stderr.lines().last())
            .unwrap_or("no message")
            .to_string();
        return Err(RecipeError::AgentFailed {
            subcommand,
            message,
        });
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|source| RecipeError::AgentOutput { subcommand, source })
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RecipeError + '_ {
    move |source| RecipeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A name part no other process or thread is using right now.
fn unique_suffix() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Writes `text` to `path` through a temporary file of this process and a
/// rename, so a concurrent reader sees the old file or the new, never half.
fn write_whole(path: &Path, text: &str) -> Result<(), RecipeError> {
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".part-{}", unique_suffix()));
    let temp = PathBuf::from(temp);
    std::fs::write(&temp, text).map_err(io_err(&temp))?;
    std::fs::rename(&temp, path).map_err(io_err(path))
}

/// The host-side recipe cache of one model:
/// `target/quantbench-models/<model hash>/`.
pub struct RecipeCache {
    pub dir: PathBuf,
    pub threads: usize,
}

impl RecipeCache {
    pub fn open(workspace: &Path, model: &Path) -> Result<Self, RecipeError> {
        let hash = wire::build_id::content_hash(model).map_err(io_err(model))?;
        let dir = workspace.join("target/quantbench-models").join(hash);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Ok(RecipeCache { dir, threads })
    }

    /// Quantizes once per (model hash, recipe): the output and its fallback
    /// list are kept in the cache. Files are written under a temporary name
    /// and renamed, so a cache entry is never partial.
    pub fn quantize(
        &self,
        agent: &AgentBuild,
        model: &Path,
        recipe: &str,
        ftype: &str,
        layer_types: &[String],
        other_type: Option<&str>,
    ) -> Result<RecipeFile, RecipeError> {
        let key = if layer_types.is_empty() {
            recipe.to_string()
        } else {
            format!(
                "{recipe}-{}-{}",
                layer_types.join("_"),
                other_type.unwrap_or("")
            )
        };
        let path = self.dir.join(format!("{key}.gguf"));
        let meta_path = self.dir.join(format!("{key}.json"));
        if !(path.exists() && meta_path.exists()) {
            // Two runs may quantize the same recipe at once (a nightly and a
            // manual run, or tests): each writes its own temporary file and
            // the renames replace whole files with identical content.
            let temp = self
                .dir
                .join(format!("{key}.gguf.part-{}", unique_suffix()));
            let mut args = vec![
                "quantize".to_string(),
                "--input".into(),
                model.display().to_string(),
                "--output".into(),
                temp.display().to_string(),
                "--ftype".into(),
                ftype.to_ascii_uppercase(),
                "--threads".into(),
                self.threads.to_string(),
            ];
            if !layer_types.is_empty() {
                args.push("--layer-types".into());
                args.push(layer_types.join(","));
            }
            if let Some(other) = other_type {
                args.push("--other-type".into());
                args.push(other.to_string());
            }
            let meta = agent_json(agent, &args).inspect_err(|_| {
                let _ = std::fs::remove_file(&temp);
            })?;
            std::fs::rename(&temp, &path).map_err(io_err(&path))?;
            write_whole(&meta_path, &meta.to_string())?;
        }
        let meta_text = std::fs::read_to_string(&meta_path).map_err(io_err(&meta_path))?;
        let meta: QuantizeOutput =
            serde_json::from_str(&meta_text).map_err(|source| RecipeError::AgentOutput {
                subcommand: "quantize".into(),
                source,
            })?;
        Ok(RecipeFile {
            recipe: recipe.to_string(),
            path: path.display().to_string(),
            fallbacks: meta.fallbacks,
            file_bytes: std::fs::metadata(&path).map_err(io_err(&path))?.len(),
        })
    }

    /// Each layer's importance (mean KL divergence from the unquantized
    /// model when only that layer is quantized to `low`), cached by text,
    /// context and low type.
    pub fn importance(
        &self,
        agent: &AgentBuild,
        model: &Path,
        text: &Path,
        ctx: usize,
        low: &str,
    ) -> Result<Vec<f64>, RecipeError> {
        let text_hash = wire::build_id::content_hash(text).map_err(io_err(text))?;
        let path = self
            .dir
            .join(format!("importance-{low}-{ctx}-{text_hash}.json"));
        if !path.exists() {
            // Each measurement gets its own trial folder: two runs may
            // measure the same model at once.
            let scratch = self.dir.join(format!("scratch-{}", unique_suffix()));
            let value = agent_json(
                agent,
                &[
                    "importance".into(),
                    "--model".into(),
                    model.display().to_string(),
                    "--text".into(),
                    text.display().to_string(),
                    "--ctx".into(),
                    ctx.to_string(),
                    "--low".into(),
                    low.to_string(),
                    "--threads".into(),
                    self.threads.to_string(),
                    "--scratch".into(),
                    scratch.display().to_string(),
                ],
            );
            // The per-layer trial files are of no use afterwards.
            let _ = std::fs::remove_dir_all(&scratch);
            let value = value?;
            write_whole(&path, &value.to_string())?;
        }
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let scores: ImportanceOutput =
            serde_json::from_str(&text).map_err(|source| RecipeError::AgentOutput {
                subcommand: "importance".into(),
                source,
            })?;
        Ok(scores.scores)
    }
}

/// What `quantbench-agent quantize` prints.
#[derive(Deserialize)]
struct QuantizeOutput {
    #[serde(default)]
    fallbacks: Vec<String>,
}

/// What `quantbench-agent importance` prints.
#[derive(Deserialize)]
struct ImportanceOutput {
    scores: Vec<f64>,
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
