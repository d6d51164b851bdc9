//! The model-level matrix: GGUF models x recipes x threads, its job spec and
//! its result rows (`models.csv`).
//!
//! ```toml
//! [model_matrices.model-quick]
//! models = ["fixtures/stories260K.gguf"]      # GGUF files on the host
//! recipes = ["f32", "q8_0", "q4_0", "adaptive"]
//! threads = ["all"]
//! text = "fixtures/stories-eval.txt"          # perplexity / KL text
//! ctx = 128                                   # tokens per evaluation chunk
//! prompt = "The future of artificial intelligence is"
//! generate_tokens = 32                        # greedy continuation
//! n_prompt = 64                               # llama-bench pp<N>
//! n_gen = 16                                  # llama-bench tg<N>
//! repetitions = 3
//! adaptive = { high = "f32", mid = "q8_0", low = "q4_0", high_fraction = 0.3, mid_fraction = 0.3 }
//! ```

use crate::matrix::ThreadCount;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const MODEL_ROWS_FILE: &str = "models.csv";

/// Recipe names that are llama.cpp file types (`llama-quantize` names, any case).
pub const UNIFORM_RECIPES: &[&str] = &[
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_1", "q5_0", "q5_k_m", "q4_1", "q4_0", "q4_k_m",
    "q4_k_s", "iq4_nl", "q3_k_m", "q2_k",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMatrixSpec {
    pub models: Vec<PathBuf>,
    pub recipes: Vec<String>,
    #[serde(default = "default_threads")]
    pub threads: Vec<ThreadCount>,
    pub text: PathBuf,
    #[serde(default = "default_ctx")]
    pub ctx: usize,
    #[serde(default = "default_prompt")]
    pub prompt: String,
    #[serde(default = "default_generate")]
    pub generate_tokens: usize,
    #[serde(default = "default_n_prompt")]
    pub n_prompt: usize,
    #[serde(default = "default_n_gen")]
    pub n_gen: usize,
    #[serde(default = "default_reps")]
    pub repetitions: u32,
    #[serde(default)]
    pub adaptive: AdaptiveParams,
    /// Multiple-choice tasks, JSONL in the HellaSwag layout: one object per
    /// line with `ctx`, `endings` (list of strings) and `label` (index of
    /// the right ending, number or string). Scored by log-likelihood.
    #[serde(default)]
    pub multiple_choice: Option<PathBuf>,
}

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

fn default_threads() -> Vec<ThreadCount> {
    vec![ThreadCount::All]
}
fn default_ctx() -> usize {
    128
}
fn default_prompt() -> String {
    "The future of artificial intelligence is".into()
}
fn default_generate() -> usize {
    32
}
fn default_n_prompt() -> usize {
    64
}
fn default_n_gen() -> usize {
    16
}
fn default_reps() -> u32 {
    3
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

impl ModelMatrixSpec {
    /// Checks names and fractions; paths are checked by `check_model_file`.
    pub fn validate(&self) -> Result<(), String> {
        if self.models.is_empty() || self.recipes.is_empty() {
            return Err("`models` and `recipes` must not be empty".into());
        }
        for recipe in &self.recipes {
            if recipe != "adaptive" && !is_uniform_recipe(recipe) {
                return Err(format!(
                    "unknown recipe `{recipe}` (known: adaptive, {})",
                    UNIFORM_RECIPES.join(", ")
                ));
            }
        }
        let a = &self.adaptive;
        for ty in [&a.high, &a.mid, &a.low] {
            if !is_uniform_recipe(ty) {
                return Err(format!(
                    "adaptive type `{ty}` is not one of {}",
                    UNIFORM_RECIPES.join(", ")
                ));
            }
        }
        if !(0.0..=1.0).contains(&(a.high_fraction + a.mid_fraction))
            || a.high_fraction < 0.0
            || a.mid_fraction < 0.0
        {
            return Err("adaptive fractions must be >= 0 and sum to at most 1".into());
        }
        if self.ctx < 8 || self.repetitions == 0 {
            return Err("`ctx` must be at least 8 and `repetitions` at least 1".into());
        }
        Ok(())
    }
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
pub fn check_model_file(path: &Path) -> Result<u64, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("model {}: {e}", path.display()))?;
    let mut magic = [0u8; 4];
    use std::io::Read;
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|_| {
            format!(
                "model {}: too short to be a GGUF file ({} bytes)",
                path.display(),
                meta.len()
            )
        })?;
    if &magic != b"GGUF" {
        return Err(format!(
            "model {}: not a GGUF file (starts with {:?}, expected \"GGUF\")",
            path.display(),
            String::from_utf8_lossy(&magic)
        ));
    }
    Ok(meta.len())
}

/// One recipe's file, ready for the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecipeFile {
    pub recipe: String,
    /// Path on the machine that runs the agent.
    pub path: String,
    /// `tensor:wanted->got` for tensors the quantizer stored in another
    /// type than the recipe asked (e.g. rows not a multiple of the block).
    pub fallbacks: Vec<String>,
    pub file_bytes: u64,
}

/// Everything an agent needs to run the model matrix for one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelJob {
    pub run_id: String,
    pub board: String,
    pub emulated: bool,
    pub git_commit: String,
    pub model_name: String,
    /// The unquantized model: the reference for KL divergence and top-1.
    pub base: RecipeFile,
    pub recipes: Vec<RecipeFile>,
    pub threads: Vec<ThreadCount>,
    pub text: String,
    pub ctx: usize,
    pub prompt: String,
    pub generate_tokens: usize,
    pub n_prompt: usize,
    pub n_gen: usize,
    pub repetitions: u32,
    /// Multiple-choice JSONL on the machine that runs the agent.
    #[serde(default)]
    pub multiple_choice: Option<String>,
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

/// One multiple-choice task in the HellaSwag layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceTask {
    pub ctx: String,
    pub endings: Vec<String>,
    #[serde(deserialize_with = "label_number")]
    pub label: usize,
}

fn label_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Label {
        Number(usize),
        Text(String),
    }
    match Label::deserialize(d)? {
        Label::Number(n) => Ok(n),
        Label::Text(t) => t.trim().parse().map_err(serde::de::Error::custom),
    }
}

/// Reads HellaSwag-layout JSONL; errors name the line.
pub fn read_choice_tasks(path: &Path) -> Result<Vec<ChoiceTask>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut tasks = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let task: ChoiceTask = serde_json::from_str(line)
            .map_err(|e| format!("{} line {}: not a HellaSwag task ({e}); expected {{\"ctx\": ..., \"endings\": [...], \"label\": n}}", path.display(), i + 1))?;
        if task.label >= task.endings.len() {
            return Err(format!(
                "{} line {}: label {} but only {} endings",
                path.display(),
                i + 1,
                task.label,
                task.endings.len()
            ));
        }
        tasks.push(task);
    }
    if tasks.is_empty() {
        return Err(format!("{}: no tasks", path.display()));
    }
    Ok(tasks)
}

/// One row of `models.csv`: a model x recipe x threads x test (pp or tg).
/// Columns named like llama-bench's mean what llama-bench's mean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRow {
    pub run_id: String,
    pub board: String,
    pub emulated: bool,
    pub agent_build: String,
    pub git_commit: String,
    pub status: crate::results::CellStatus,
    pub note: String,
    /// llama-bench: model file name.
    pub model_filename: String,
    pub recipe: String,
    /// llama-bench: model description (architecture, size, type).
    pub model_type: String,
    /// llama-bench: bytes of weights.
    pub model_size: u64,
    /// llama-bench: parameter count.
    pub model_n_params: u64,
    pub file_bytes: u64,
    pub bits_per_weight: f64,
    /// Tensors stored in another type than asked, `name:wanted->got;...`.
    pub fallbacks: String,
    /// llama-bench: threads.
    pub n_threads: usize,
    /// llama-bench: prompt tokens of this test (0 for tg).
    pub n_prompt: usize,
    /// llama-bench: generated tokens of this test (0 for pp).
    pub n_gen: usize,
    /// `pp<N>` or `tg<N>`.
    pub test: String,
    /// llama-bench: mean time of one repetition, ns.
    pub avg_ns: Option<f64>,
    pub stddev_ns: Option<f64>,
    /// llama-bench: tokens per second, mean and stddev over repetitions.
    pub avg_ts: Option<f64>,
    pub stddev_ts: Option<f64>,
    pub load_ms: Option<f64>,
    /// Peak resident memory of the agent during this recipe (VmHWM), bytes.
    pub peak_rss_bytes: Option<u64>,
    /// Perplexity on the text, llama-perplexity's method (second half of
    /// each `ctx`-token chunk scored).
    pub ppl: Option<f64>,
    /// KL divergence from the base model's next-token distribution.
    pub kld_mean: Option<f64>,
    pub kld_p99: Option<f64>,
    /// Share of positions where the top token equals the base model's.
    pub top1_agreement: Option<f64>,
    /// Multiple-choice accuracy (share of tasks whose most likely ending,
    /// by mean token log-likelihood, is the labelled one); empty without tasks.
    pub mc_accuracy: Option<f64>,
    /// Greedy continuation of the prompt, verbatim.
    pub generated_text: String,
    /// Share of repeated word 3-grams in the continuation (0 = none).
    pub repetition_score: Option<f64>,
    pub finished_at: String,
}

impl ModelRow {
    /// A row for a recipe that produced no measurement, with the reason.
    pub fn failed(job: &ModelJob, recipe: &RecipeFile, agent_build: &str, note: &str) -> ModelRow {
        ModelRow {
            run_id: job.run_id.clone(),
            board: job.board.clone(),
            emulated: job.emulated,
            agent_build: agent_build.to_string(),
            git_commit: job.git_commit.clone(),
            status: crate::results::CellStatus::Failed,
            note: note.to_string(),
            model_filename: job.model_name.clone(),
            recipe: recipe.recipe.clone(),
            model_type: String::new(),
            model_size: 0,
            model_n_params: 0,
            file_bytes: recipe.file_bytes,
            bits_per_weight: 0.0,
            fallbacks: recipe.fallbacks.join(";"),
            n_threads: 0,
            n_prompt: 0,
            n_gen: 0,
            test: String::new(),
            avg_ns: None,
            stddev_ns: None,
            avg_ts: None,
            stddev_ts: None,
            load_ms: None,
            peak_rss_bytes: None,
            ppl: None,
            kld_mean: None,
            kld_p99: None,
            top1_agreement: None,
            mc_accuracy: None,
            generated_text: String::new(),
            repetition_score: None,
            finished_at: crate::utc_now_rfc3339(),
        }
    }
}

/// Share of word trigrams that repeat an earlier one: 0 for varied text,
/// close to 1 for "in in in in ...".
pub fn repetition_score(text: &str) -> f64 {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() < 3 {
        return 0.0;
    }
    let grams: Vec<&[&str]> = words.windows(3).collect();
    let unique: std::collections::HashSet<&[&str]> = grams.iter().copied().collect();
    1.0 - unique.len() as f64 / grams.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_columns_are_documented_in_the_readme() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MODEL_ROWS_FILE);
        let job: ModelJob = serde_json::from_str(
            r#"{"run_id":"r","board":"b","emulated":false,"git_commit":"c","model_name":"m",
            "base":{"recipe":"original","path":"p","fallbacks":[],"file_bytes":1},
            "recipes":[],"threads":["all"],"text":"t","ctx":128,"prompt":"p",
            "generate_tokens":1,"n_prompt":1,"n_gen":1,"repetitions":1}"#,
        )
        .unwrap();
        let row = ModelRow::failed(&job, &job.base, "h", "n");
        crate::results::CsvAppender::open(&path)
            .unwrap()
            .append(&row)
            .unwrap();
        let back: Vec<ModelRow> = crate::results::read_csv(&path).unwrap();
        assert_eq!(back, vec![row]);
        let header = std::fs::read_to_string(&path).unwrap();
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        for column in header.lines().next().unwrap().split(',') {
            assert!(
                readme.contains(&format!("| `{column}` |")),
                "models.csv column `{column}` undocumented"
            );
        }
    }

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
    fn repetition_score_flags_degenerate_text() {
        assert_eq!(repetition_score("once upon a time there was a girl"), 0.0);
        assert!(repetition_score("in in in in in in in in in in") > 0.8);
    }

    #[test]
    fn choice_tasks_accept_string_labels_and_name_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mc.jsonl");
        std::fs::write(
            &path,
            "{\"ctx\":\"a\",\"endings\":[\"b\",\"c\"],\"label\":\"1\"}\n\n",
        )
        .unwrap();
        assert_eq!(read_choice_tasks(&path).unwrap()[0].label, 1);
        std::fs::write(
            &path,
            "{\"ctx\":\"a\",\"endings\":[\"b\"],\"label\":0}\n{\"ctx\":1}\n",
        )
        .unwrap();
        assert!(read_choice_tasks(&path).unwrap_err().contains("line 2"));
        std::fs::write(&path, "{\"ctx\":\"a\",\"endings\":[\"b\"],\"label\":3}\n").unwrap();
        assert!(read_choice_tasks(&path).unwrap_err().contains("label 3"));
    }

    #[test]
    fn recipes_and_model_files_are_checked() {
        let spec: ModelMatrixSpec =
            toml::from_str("models=['m.gguf']\nrecipes=['q4_0','q9_9']\ntext='t.txt'\n").unwrap();
        assert!(spec.validate().unwrap_err().contains("q9_9"));
        let dir = tempfile::tempdir().unwrap();
        let not_gguf = dir.path().join("x.gguf");
        std::fs::write(&not_gguf, b"PK\x03\x04zip").unwrap();
        assert!(check_model_file(&not_gguf)
            .unwrap_err()
            .contains("not a GGUF file"));
        std::fs::write(&not_gguf, b"GG").unwrap();
        assert!(check_model_file(&not_gguf)
            .unwrap_err()
            .contains("too short"));
        assert!(check_model_file(&dir.path().join("missing.gguf")).is_err());
    }
}
