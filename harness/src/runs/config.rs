//! `bench.toml`: named kernel matrices, named model matrices, custom shapes,
//! boards and groups, read into typed structs with every default in one
//! place; errors name the file, the key or value, and what is allowed.
//!
//! ```toml
//! [matrices.quick]
//! types   = ["F32", "Q8_0", "Q4_0", "SQ4"] # GGML type names, any case, or
//!                                        # codebooks: SQ4, SQ3, SQ4+S0.45
//! shapes  = ["llama3.2-1b.*"]            # catalog names, `model.*` or "all"
//! batches = [1, 16]                      # activation tokens (N)
//! threads = [1, "all"]                   # "all" = every core of the board
//!
//! [model_matrices.model-quick]
//! models = ["fixtures/stories260K.gguf"]
//! recipes = ["f32", "q8_0", "q4_0", "adaptive", "q4_0+imatrix", "gptq-q4_0"]
//! text = "fixtures/stories-eval.txt"
//! calibration = "fixtures/stories-calib.txt"  # for +imatrix and gptq- recipes
//!
//! [shapes."mymodel.ffn_up"]              # extra shapes, rows (M) x cols (K)
//! rows = 4096
//! cols = 1024
//! ```

use crate::runs::catalog::{CustomShape, ShapeCatalog};
use crate::runs::recipes::{AdaptiveParams, Recipe, GGML_TENSOR_TYPES};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;
use wire::ggml_type::Distribution;
use wire::kernel_job::{LoadMode, ThreadCount};
use wire::model_settings::{
    ContextSettings, CpuSettings, FlashAttn, KvCacheType, ModelLoad, Priority,
};
use wire::weight_format::WeightFormat;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: matrix `{matrix}`: {message}")]
    Invalid {
        path: PathBuf,
        matrix: String,
        message: String,
    },
    #[error("{path}: no matrix named `{name}` (defined: {known})")]
    UnknownMatrix {
        path: PathBuf,
        name: String,
        known: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchConfig {
    #[serde(default)]
    pub matrices: BTreeMap<String, MatrixSpec>,
    #[serde(default)]
    pub shapes: BTreeMap<String, CustomShape>,
    /// Whole-model matrices (see `models`).
    #[serde(default)]
    pub model_matrices: BTreeMap<String, ModelMatrixSpec>,
    /// Remote boards by name (see `boards`).
    #[serde(default)]
    pub boards: BTreeMap<String, crate::fleet::boards::BoardConfig>,
    /// Named lists of boards, usable as `--target <group>`.
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
    /// Defaults for boards of a labgrid farm (see `boards`).
    #[serde(default)]
    pub labgrid: crate::fleet::boards::LabgridSettings,
    /// Named agent builds: which llama.cpp, patches and CMake options
    /// (see `llama_source::BuildSpec`); `bench --build <name>` picks one.
    #[serde(default)]
    pub builds: BTreeMap<String, crate::builds::llama_source::BuildSpec>,
    /// Seed of the synthetic weights and activations.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Where this config came from, for error messages.
    #[serde(skip)]
    pub source: PathBuf,
}

/// One named kernel matrix: the cross product of its lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatrixSpec {
    pub types: Vec<WeightFormat>,
    pub shapes: Vec<String>,
    #[serde(default = "default_batches")]
    pub batches: Vec<usize>,
    #[serde(default = "default_threads")]
    pub threads: Vec<ThreadCount>,
    #[serde(default = "default_warmup")]
    pub warmup: u32,
    #[serde(default = "default_min_reps")]
    pub min_reps: u32,
    #[serde(default = "default_min_time_ms")]
    pub min_time_ms: u64,
    /// Cap per cell: stop repeating after this long even below `min_reps`
    /// (at least one timed repetition always runs).
    #[serde(default = "default_max_time_ms")]
    pub max_time_ms: u64,
    /// Separate agent processes each cell is measured in, in shuffled
    /// rounds (repetition counts and times above are per invocation).
    /// Default: 10 on real boards, 1 on emulated ones.
    #[serde(default)]
    pub invocations: Option<u32>,
    /// Most warm-up per invocation of a cell, ms (default 1000): warm-up
    /// runs until the timings stop falling; a cell still falling then is
    /// recorded as not settled, and `compare` calls it noisy.
    #[serde(default)]
    pub max_warmup_ms: Option<u64>,
    /// Adaptive repetition: cells whose time is not yet known to
    /// `precision` after `invocations` get more, a round at a time, up to
    /// this many. Default: none, or 3 x `invocations` when `bench` is
    /// given a `--budget` (which then bounds the extra rounds).
    #[serde(default)]
    pub max_invocations: Option<u32>,
    /// Relative half-width of the 95% interval of a cell's time that ends
    /// its adaptive rounds (default 0.02).
    #[serde(default)]
    pub precision: Option<f64>,
    #[serde(default = "default_repack")]
    pub repack: bool,
    /// How weights are placed in memory: `mmap` (default, as llama.cpp
    /// loads a model: a mapped file read in place) or `no-mmap` (copied into
    /// an anonymous buffer, as `llama-bench --mmap 0`).
    #[serde(default)]
    pub load_mode: LoadMode,
    /// Synthetic data: `llm-like` (default) or `uniform` (as test-backend-ops).
    #[serde(default = "default_distribution")]
    pub distribution: Distribution,
    /// Stop a board's agent after this long (default: derived from the
    /// cells, see `MatrixSpec::deadline`).
    #[serde(default)]
    pub deadline_seconds: Option<u64>,
    /// Before each cell, wait until the board's SoC is below this
    /// temperature (°C), for at most `cooldown_max_seconds`; a Pi 5
    /// without a fan throttles within minutes of a sustained matrix.
    #[serde(default)]
    pub cooldown_below_c: Option<f64>,
    #[serde(default = "default_cooldown_max_seconds")]
    pub cooldown_max_seconds: u64,
    /// Reference types (each one of `types`): the summary gives every
    /// other type's time as a ratio to each, per shape, batch and thread
    /// count, with its 95% interval over invocations (e.g. `["Q4_0",
    /// "Q3_K"]` beside our own formats).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versus: Vec<WeightFormat>,
}

fn default_cooldown_max_seconds() -> u64 {
    120
}

/// Letters, digits, `.`, `_` and `-`, not starting with `.` or `-`.
pub fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl MatrixSpec {
    /// The job's deadline: `deadline_seconds`, or 5 minutes plus, per cell,
    /// 30 s for making its weights (an lm head takes seconds to generate; an
    /// emulated board is tens of times slower) and, per invocation, twice
    /// its `max_time_ms`, the longest warm-up and the longest cool-down.
    pub fn deadline(&self, cells: usize, invocations: u32) -> std::time::Duration {
        let cooldown = match self.cooldown_below_c {
            Some(_) => self.cooldown_max_seconds,
            None => 0,
        };
        let per_invocation = 2 * self.max_time_ms.div_ceil(1000)
            + self
                .max_warmup_ms
                .unwrap_or(wire::kernel_job::DEFAULT_MAX_WARMUP_MS)
                .div_ceil(1000)
            + cooldown;
        let seconds = self.deadline_seconds.unwrap_or_else(|| {
            300 + cells as u64 * (30 + invocations.max(1) as u64 * per_invocation)
        });
        std::time::Duration::from_secs(seconds)
    }
}

/// One named model matrix: GGUF models x recipes x threads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMatrixSpec {
    pub models: Vec<PathBuf>,
    pub recipes: Vec<String>,
    #[serde(default = "default_threads")]
    pub threads: Vec<ThreadCount>,
    pub text: PathBuf,
    /// The text calibrated recipes (`<type>+imatrix`, `gptq-<type>`) learn
    /// from; default `text`, which flatters them: they are then judged on
    /// what they were fitted to.
    #[serde(default)]
    pub calibration: Option<PathBuf>,
    /// An importance-matrix file made elsewhere (stock `llama-imatrix`'s
    /// GGUF, or ours), used by recipes `<type>+imatrix=<its file stem>`
    /// beside our own `<type>+imatrix`.
    #[serde(default)]
    pub imatrix: Option<PathBuf>,
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
    /// Tokens already in the KV cache when each test starts (llama-bench's
    /// `-d`): the cache is filled once per context and depth, and every
    /// repetition of pp and tg runs on top of it. Default `[0]`.
    #[serde(default = "default_depths")]
    pub n_depth: Vec<usize>,
    /// Prompt-then-generation tests (llama-bench's `-pg`), `[[512, 128]]`:
    /// the prompt as a batch then the tokens one at a time, timed together
    /// (`pp512+tg128`: the time to an answer). Default none.
    #[serde(default)]
    pub pg: Vec<[usize; 2]>,
    /// KV-cache types (llama-bench's `-ctk`/`-ctv`): `"q8_0"` for K and V,
    /// `"q8_0/f16"` for K `q8_0` and V `f16`. Quality is measured with
    /// each, beside its speed. Default `["f16"]`.
    #[serde(default = "default_kv_types")]
    pub kv_type: Vec<KvCacheType>,
    /// Flash attention (llama-bench's `-fa`): `"auto"` (llama.cpp decides;
    /// rows record what it decided), `"on"`, `"off"`. Default `["auto"]`.
    #[serde(default = "default_flash_attn")]
    pub flash_attn: Vec<FlashAttn>,
    /// Batch and micro-batch (llama-bench's `-b`/`-ub`). Default `[2048]`
    /// and `[512]`.
    #[serde(default = "default_n_batch")]
    pub n_batch: Vec<usize>,
    #[serde(default = "default_n_ubatch")]
    pub n_ubatch: Vec<usize>,
    /// llama-bench's `-C`: hex masks of the CPUs GGML's threads may run on
    /// (default `["0x0"]`: the OS places them).
    #[serde(default = "default_cpu_mask")]
    pub cpu_mask: Vec<String>,
    /// llama-bench's `--cpu-strict`: one thread per CPU of the mask.
    #[serde(default = "default_cpu_strict")]
    pub cpu_strict: Vec<bool>,
    /// llama-bench's `--poll` (0-100): how long an idle worker spins before
    /// it sleeps (default `[50]`).
    #[serde(default = "default_poll")]
    pub poll: Vec<u32>,
    /// llama-bench's `--prio`: `low`, `normal` (default), `medium`, `high`,
    /// `realtime`. Above normal needs CAP_SYS_NICE on the board.
    #[serde(default = "default_priority")]
    pub priority: Vec<Priority>,
    /// How each recipe is loaded, each a pass of every test (llama-bench's
    /// `-mmp`, llama.cpp's `--mlock`): `mmap` (default), `no-mmap`,
    /// `mlock`. Each load is timed twice: cold (the file dropped from the
    /// page cache first) and warm.
    #[serde(default = "default_load_mode")]
    pub load_mode: Vec<ModelLoad>,
    #[serde(default = "default_reps")]
    pub repetitions: u32,
    /// Separate processes each recipe's speed is measured in (each loads
    /// the recipe afresh and runs every repetition), so `compare` sees the
    /// spread between processes. Default: 3 on real boards, 1 on emulated.
    #[serde(default)]
    pub invocations: Option<u32>,
    /// Adaptive repetition: a recipe whose tests are not yet known to
    /// `precision` after `invocations` gets more, up to this many (real
    /// boards only; default none).
    #[serde(default)]
    pub max_invocations: Option<u32>,
    /// Relative half-width of the 95% interval of a test's time that ends
    /// a recipe's adaptive invocations (default 0.02).
    #[serde(default)]
    pub precision: Option<f64>,
    #[serde(default)]
    pub adaptive: AdaptiveParams,
    /// Multiple-choice tasks, JSONL in the HellaSwag layout: one object per
    /// line with `ctx`, `endings` (list of strings) and `label` (index of
    /// the right ending, number or string). Scored by log-likelihood.
    #[serde(default)]
    pub multiple_choice: Option<PathBuf>,
    /// Stop a board's agent after this long (default: 10 minutes plus 10
    /// per recipe and thread count).
    #[serde(default)]
    pub deadline_seconds: Option<u64>,
    /// Before each test, wait until the board's SoC is below this
    /// temperature (°C), for at most `cooldown_max_seconds` (real boards).
    #[serde(default)]
    pub cooldown_below_c: Option<f64>,
    #[serde(default = "default_cooldown_max_seconds")]
    pub cooldown_max_seconds: u64,
    /// After its tests, each recipe decodes without pause for this long,
    /// its tokens/s, clock, temperature and power recorded every
    /// `sustain_interval_seconds` (`sustained.csv`, plot
    /// `model_sustained`): does it keep its speed in this case? 0: not.
    #[serde(default)]
    pub sustain_seconds: f64,
    #[serde(default = "default_sustain_interval")]
    pub sustain_interval_seconds: f64,
    /// Seconds the board's idle power is measured before the job, where
    /// it has a power source (default 3; 0: none, no `..._above_idle`).
    #[serde(default = "default_idle_seconds")]
    pub idle_seconds: f64,
}

fn default_sustain_interval() -> f64 {
    5.0
}

fn default_idle_seconds() -> f64 {
    3.0
}

fn default_seed() -> u64 {
    42
}
fn default_batches() -> Vec<usize> {
    vec![1]
}
fn default_threads() -> Vec<ThreadCount> {
    vec![ThreadCount::All]
}
fn default_warmup() -> u32 {
    2
}
fn default_min_reps() -> u32 {
    5
}
fn default_min_time_ms() -> u64 {
    200
}
fn default_max_time_ms() -> u64 {
    5000
}
fn default_repack() -> bool {
    true
}
fn default_distribution() -> Distribution {
    Distribution::LlmLike
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
fn default_depths() -> Vec<usize> {
    vec![0]
}
fn default_kv_types() -> Vec<KvCacheType> {
    vec![KvCacheType::default()]
}
fn default_flash_attn() -> Vec<FlashAttn> {
    vec![FlashAttn::Auto]
}
fn default_n_batch() -> Vec<usize> {
    vec![wire::model_settings::DEFAULT_N_BATCH]
}
fn default_cpu_mask() -> Vec<String> {
    vec![CpuSettings::default().cpu_mask]
}

fn default_cpu_strict() -> Vec<bool> {
    vec![false]
}

fn default_poll() -> Vec<u32> {
    vec![CpuSettings::default().poll]
}

fn default_load_mode() -> Vec<ModelLoad> {
    vec![ModelLoad::Mmap]
}

fn default_priority() -> Vec<Priority> {
    vec![Priority::Normal]
}

fn default_n_ubatch() -> Vec<usize> {
    vec![wire::model_settings::DEFAULT_N_UBATCH]
}

impl BenchConfig {
    /// A path from the config, relative to the config file's folder,
    /// falling back to the workspace for the repository's own fixtures.
    pub fn relative_path(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            return path.to_path_buf();
        }
        let base = self
            .source
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let joined = base.join(path);
        if joined.exists() {
            joined
        } else {
            crate::builds::build::workspace_root().join(path)
        }
    }

    /// Every model file the config's model matrices name.
    pub fn model_files(&self) -> Vec<PathBuf> {
        self.model_matrices
            .values()
            .flat_map(|m| m.models.iter())
            .map(|m| self.relative_path(m))
            .filter(|p| p.is_file())
            .collect()
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: BenchConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            // toml's message already names the key and line; keep it on one line.
            message: e.message().replace('\n', " ")
                + &e.span()
                    .map(|s| format!(" (at line {})", line_of(text, s.start)))
                    .unwrap_or_default(),
        })?;
        config.source = path.to_path_buf();
        config.validate()?;
        Ok(config)
    }

    /// The build `--build` names: a `[builds.<name>]` entry, `default`
    /// (the pinned crate's own llama.cpp), a source written directly
    /// (`crate:0.1.140`, `path:../llama.cpp@<rev>`), or this repository
    /// at a commit with the default llama.cpp (`quantbench@HEAD~1`).
    pub fn build(
        &self,
        name: &str,
    ) -> Result<(String, crate::builds::llama_source::BuildSpec), ConfigError> {
        use crate::builds::llama_source::{BuildSpec, LlamaSource};
        if let Some(spec) = self.builds.get(name) {
            return Ok((name.to_string(), spec.clone()));
        }
        if name == "default" {
            return Ok((name.to_string(), BuildSpec::default()));
        }
        if let Some(rev) = name.strip_prefix("quantbench@") {
            return Ok((
                name.to_string(),
                BuildSpec {
                    quantbench: Some(rev.to_string()),
                    ..BuildSpec::default()
                },
            ));
        }
        match LlamaSource::parse(name) {
            Ok(llama) => Ok((
                name.to_string(),
                BuildSpec {
                    llama,
                    ..BuildSpec::default()
                },
            )),
            Err(why) => Err(ConfigError::Parse {
                path: self.source.clone(),
                message: format!(
                    "no build named `{name}` (defined: {}), and {why}",
                    if self.builds.is_empty() {
                        "none; add [builds.<name>]".to_string()
                    } else {
                        self.builds.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                ),
            }),
        }
    }

    pub fn catalog(&self) -> ShapeCatalog {
        ShapeCatalog::with_custom(&self.shapes)
    }

    /// The matrix called `name`, or an error listing the defined ones.
    pub fn matrix(&self, name: &str) -> Result<&MatrixSpec, ConfigError> {
        self.matrices
            .get(name)
            .ok_or_else(|| ConfigError::UnknownMatrix {
                path: self.source.clone(),
                name: name.to_string(),
                known: self
                    .matrices
                    .keys()
                    .chain(self.model_matrices.keys())
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// `--matrix quick,model-quick`: each name looked up as a kernel or a
    /// model matrix, in the order given, duplicates dropped.
    pub fn matrix_list(&self, names: &str) -> Result<Vec<NamedMatrix<'_>>, ConfigError> {
        let mut out: Vec<NamedMatrix<'_>> = Vec::new();
        for name in names.split(',').map(str::trim) {
            if name.is_empty() || out.iter().any(|m| m.name() == name) {
                continue;
            }
            out.push(if let Some(spec) = self.model_matrices.get(name) {
                NamedMatrix::Model(name.to_string(), spec)
            } else {
                NamedMatrix::Kernel(name.to_string(), self.matrix(name)?)
            });
        }
        if out.is_empty() {
            return Err(self.matrix("").unwrap_err());
        }
        Ok(out)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        // A matrix name becomes a job folder on boards and the host, and
        // shell scripts list those folders: letters, digits, `.`, `_`, `-`.
        for name in self
            .matrices
            .keys()
            .chain(self.model_matrices.keys())
            .chain(self.builds.keys())
        {
            if !is_safe_name(name) {
                return Err(ConfigError::Invalid {
                    path: self.source.clone(),
                    matrix: name.clone(),
                    message: "a matrix name may hold only letters, digits, `.`, `_` and `-` (it names folders on boards): rename it".into(),
                });
            }
        }
        let catalog = self.catalog();
        for (name, spec) in &self.matrices {
            let invalid = |message: String| ConfigError::Invalid {
                path: self.source.clone(),
                matrix: name.clone(),
                message,
            };
            for (what, empty) in [
                ("types", spec.types.is_empty()),
                ("shapes", spec.shapes.is_empty()),
                ("batches", spec.batches.is_empty()),
                ("threads", spec.threads.is_empty()),
            ] {
                if empty {
                    return Err(invalid(format!("`{what}` is empty")));
                }
            }
            if spec.precision.is_some_and(|p| !(p.is_finite() && p > 0.0)) {
                return Err(invalid(
                    "`precision` must be a positive number (0.02: time known to +-2%)".into(),
                ));
            }
            if spec.batches.contains(&0) {
                return Err(invalid("`batches` must be at least 1".into()));
            }
            if spec.threads.contains(&ThreadCount::Fixed(0)) {
                return Err(invalid("`threads` must be at least 1 or \"all\"".into()));
            }
            if spec.threads.contains(&ThreadCount::Big) {
                return Err(invalid(
                    "`threads = \"big\"` (the board's fastest cores) is for model matrices; a kernel matrix takes numbers or \"all\"".into(),
                ));
            }
            if spec.min_reps == 0 {
                return Err(invalid("`min_reps` must be at least 1".into()));
            }
            if let Some(missing) = spec.versus.iter().find(|v| !spec.types.contains(v)) {
                return Err(invalid(format!(
                    "`versus` names {missing}, which is not one of the matrix's `types`: add it there or drop it from `versus`"
                )));
            }
            for pattern in &spec.shapes {
                catalog
                    .resolve(pattern)
                    .map_err(|e| invalid(e.to_string()))?;
            }
        }
        for (name, spec) in &self.model_matrices {
            spec.validate().map_err(|message| ConfigError::Invalid {
                path: self.source.clone(),
                matrix: name.clone(),
                message,
            })?;
        }
        for name in self.matrices.keys() {
            if self.model_matrices.contains_key(name) {
                return Err(ConfigError::Parse {
                    path: self.source.clone(),
                    message: format!(
                        "`{name}` is both a kernel matrix and a model matrix; rename one"
                    ),
                });
            }
        }
        for (name, shape) in &self.shapes {
            if shape.rows == 0 || shape.cols == 0 {
                return Err(ConfigError::Parse {
                    path: self.source.clone(),
                    message: format!("shape `{name}` has a zero dimension"),
                });
            }
        }
        Ok(())
    }
}

/// A matrix named on the command line: kernel or model.
#[derive(Debug, Clone)]
pub enum NamedMatrix<'a> {
    Kernel(String, &'a MatrixSpec),
    Model(String, &'a ModelMatrixSpec),
}

impl NamedMatrix<'_> {
    pub fn name(&self) -> &str {
        match self {
            NamedMatrix::Kernel(name, _) | NamedMatrix::Model(name, _) => name,
        }
    }
}

impl ModelMatrixSpec {
    /// Every context the matrix's tests run in: its KV-cache types x flash
    /// attention x batches x micro-batches x CPU settings, in that order.
    pub fn contexts(&self) -> Vec<ContextSettings> {
        let mut out = Vec::new();
        for kv_type in &self.kv_type {
            for &flash_attn in &self.flash_attn {
                for &n_batch in &self.n_batch {
                    for &n_ubatch in &self.n_ubatch {
                        for cpu in self.cpu_settings() {
                            out.push(ContextSettings {
                                kv_type: kv_type.clone(),
                                flash_attn,
                                n_batch,
                                n_ubatch,
                                cpu,
                            });
                        }
                    }
                }
            }
        }
        out
    }

    /// Every combination of the CPU axes: masks x strict x poll x priority.
    fn cpu_settings(&self) -> Vec<CpuSettings> {
        let mut out = Vec::new();
        for cpu_mask in &self.cpu_mask {
            for &cpu_strict in &self.cpu_strict {
                for &poll in &self.poll {
                    for &priority in &self.priority {
                        out.push(CpuSettings {
                            cpu_mask: cpu_mask.clone(),
                            cpu_strict,
                            poll,
                            priority,
                        });
                    }
                }
            }
        }
        out
    }

    /// How each recipe is loaded (`load_mode`).
    pub fn load_modes(&self) -> Vec<ModelLoad> {
        self.load_mode.clone()
    }

    /// The settings parts of the matrix's cell ids
    /// (`model_settings::settings_key`), one per load mode and context.
    pub fn settings_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        for load in self.load_modes() {
            for context in self.contexts() {
                keys.push(wire::model_settings::settings_key(&context, load));
            }
        }
        keys
    }

    /// The most tokens a test's KV cache holds: its depth and its tokens.
    pub fn most_context(&self) -> usize {
        let longest = self
            .pg
            .iter()
            .map(|[p, g]| p + g)
            .chain([self.n_prompt, self.n_gen])
            .max()
            .unwrap_or(0);
        self.n_depth.iter().copied().max().unwrap_or(0) + longest
    }

    /// The names of the tests of one thread count and context, in the
    /// agent's order (`ModelJob::tests`).
    pub fn test_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for &depth in &self.n_depth {
            let pp_tg = [(self.n_prompt, 0), (0, self.n_gen)];
            for (p, g) in pp_tg
                .into_iter()
                .chain(self.pg.iter().map(|[p, g]| (*p, *g)))
            {
                names.push(wire::model_settings::test_name(p, g, depth));
            }
        }
        names
    }

    /// The job's deadline for `recipes` recipes on this board.
    pub fn deadline(&self, recipes: usize, invocations: u32) -> std::time::Duration {
        let settings = self.load_mode.len().max(1)
            * self.contexts().len().max(1)
            * self.n_depth.len().max(1)
            * (1 + self.pg.len());
        let units = (recipes * self.threads.len().max(1) * settings) as u64;
        // Each further invocation loads the recipe and runs its tests again.
        let more = 300 * units * u64::from(invocations.saturating_sub(1));
        let invocations = invocations.max(self.max_invocations.unwrap_or(0));
        let more = more.max(300 * units * u64::from(invocations.saturating_sub(1)));
        // Waits and measurements that do not scale with the board's speed:
        // cool-downs and power windows per test and invocation, the
        // sustained decodes, the idle power.
        let cooldown = self
            .cooldown_below_c
            .map_or(0, |_| self.cooldown_max_seconds);
        let waits = units * u64::from(invocations.max(1)) * (cooldown + 10)
            + recipes as u64 * self.sustain_seconds.ceil() as u64
            + self.idle_seconds.ceil() as u64;
        std::time::Duration::from_secs(
            self.deadline_seconds
                .unwrap_or(600 + 600 * units + more + waits),
        )
    }

    /// Checks names and fractions; paths are checked by `check_model_file`.
    pub fn validate(&self) -> Result<(), String> {
        if self.models.is_empty() || self.recipes.is_empty() {
            return Err("`models` and `recipes` must not be empty".into());
        }
        for recipe in &self.recipes {
            Recipe::parse(recipe)?;
        }
        let a = &self.adaptive;
        for ty in [&a.high, &a.mid, &a.low] {
            if !GGML_TENSOR_TYPES.contains(&ty.to_ascii_lowercase().as_str()) {
                return Err(format!(
                    "adaptive type `{ty}` is not a GGML tensor type (one of {})",
                    GGML_TENSOR_TYPES.join(", ")
                ));
            }
        }
        if !(0.0..=1.0).contains(&(a.high_fraction + a.mid_fraction))
            || a.high_fraction < 0.0
            || a.mid_fraction < 0.0
        {
            return Err("adaptive fractions must be >= 0 and sum to at most 1".into());
        }
        if self.precision.is_some_and(|p| !(p.is_finite() && p > 0.0)) {
            return Err("`precision` must be a positive number (0.02: time known to +-2%)".into());
        }
        if self.ctx < 8 || self.repetitions == 0 {
            return Err("`ctx` must be at least 8 and `repetitions` at least 1".into());
        }
        let seconds = [
            ("sustain_seconds", self.sustain_seconds, 0.0),
            (
                "sustain_interval_seconds",
                self.sustain_interval_seconds,
                0.5,
            ),
            ("idle_seconds", self.idle_seconds, 0.0),
        ];
        for (key, value, least) in seconds {
            if !(value.is_finite() && value >= least && value <= 86_400.0) {
                return Err(format!(
                    "`{key}` must be a number of seconds from {least} to 86400 (it is {value})"
                ));
            }
        }
        self.validate_settings()
    }

    /// The llama-bench axes: each list non-empty, batches that llama.cpp
    /// can run, and no quantized V cache without flash attention (llama.cpp
    /// refuses that context).
    fn validate_settings(&self) -> Result<(), String> {
        for (key, empty) in [
            ("n_depth", self.n_depth.is_empty()),
            ("kv_type", self.kv_type.is_empty()),
            ("flash_attn", self.flash_attn.is_empty()),
            ("n_batch", self.n_batch.is_empty()),
            ("n_ubatch", self.n_ubatch.is_empty()),
            ("cpu_mask", self.cpu_mask.is_empty()),
            ("cpu_strict", self.cpu_strict.is_empty()),
            ("poll", self.poll.is_empty()),
            ("priority", self.priority.is_empty()),
            ("load_mode", self.load_mode.is_empty()),
        ] {
            if empty {
                return Err(format!(
                    "`{key}` is empty: list at least one value, or leave it out for llama-bench's default"
                ));
            }
        }
        if let Some([p, g]) = self.pg.iter().find(|[p, g]| *p == 0 || *g == 0) {
            return Err(format!(
                "pg [{p}, {g}]: a prompt-then-generation test needs both a prompt and tokens to generate (a pp or tg test alone is `n_prompt`/`n_gen`)"
            ));
        }
        for mask in &self.cpu_mask {
            CpuSettings::mask_cpus(mask)?;
        }
        if let Some(poll) = self.poll.iter().find(|&&p| p > 100) {
            return Err(format!(
                "poll {poll}: llama.cpp's polling level is 0 (sleep at once) to 100 (spin longest)"
            ));
        }
        if self.cpu_strict.contains(&true)
            && self.cpu_mask.iter().any(|m| {
                m.trim_start_matches("0x")
                    .trim_start_matches('0')
                    .is_empty()
            })
        {
            return Err("cpu_strict = true pins one thread per CPU of a mask: give `cpu_mask` (e.g. [\"0x0f\"]) with it".into());
        }
        if let Some(b) = self.n_batch.iter().find(|&&b| b == 0) {
            return Err(format!("n_batch {b}: a batch holds at least one token"));
        }
        for &ub in &self.n_ubatch {
            if ub == 0 || self.n_batch.iter().any(|&b| ub > b) {
                return Err(format!(
                    "n_ubatch {ub}: a micro-batch must hold at least one token and no more than the batch ({}); llama.cpp would shrink it to the batch",
                    self.n_batch
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        if self.flash_attn.contains(&FlashAttn::Off) {
            if let Some(kv) = self.kv_type.iter().find(|kv| kv.v_is_quantized()) {
                return Err(format!(
                    "kv_type `{kv}` quantizes the V cache, which llama.cpp runs only with flash attention, and flash_attn lists `off`: drop `off`, or keep V in f16 (`{}/f16`)",
                    kv.k
                ));
            }
        }
        Ok(())
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<BenchConfig, ConfigError> {
        BenchConfig::parse(text, Path::new("bench.toml"))
    }

    #[test]
    fn a_matrix_name_that_would_split_in_a_shell_or_climb_folders_is_refused() {
        for bad in ["x agents", "../up", "a/b", "$(rm)", ".hidden", ""] {
            let e = parse(&format!(
                "[matrices.{bad:?}]\ntypes=[\"q4_0\"]\nshapes=[\"all\"]\n"
            ))
            .unwrap_err();
            assert!(e.to_string().contains("only letters, digits"), "{bad}: {e}");
        }
        let e = parse(
            "[model_matrices.\"m m\"]\nmodels=[\"x.gguf\"]\nrecipes=[\"q4_0\"]\ntext=\"t\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("only letters, digits"), "{e}");
        parse("[matrices.\"quick-2.b_c\"]\ntypes=[\"q4_0\"]\nshapes=[\"all\"]\n").unwrap();
    }

    #[test]
    fn repo_bench_toml_parses_with_quick_and_full() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench.toml");
        let config = BenchConfig::load(&path).unwrap();
        config.matrix("quick").unwrap();
        config.matrix("full").unwrap();
    }

    #[test]
    fn defaults_fill_in_omitted_keys() {
        let c = parse("[matrices.m]\ntypes=[\"q4_0\"]\nshapes=[\"llama3.2-1b.attn_q\"]\n").unwrap();
        let m = c.matrix("m").unwrap();
        assert_eq!(m.types, vec![wire::ggml_type::GgmlType::Q4_0.into()]);
        assert_eq!(m.batches, vec![1]);
        assert_eq!(m.threads, vec![ThreadCount::All]);
        assert!(m.repack);
        assert_eq!(m.load_mode, LoadMode::Mmap, "llama.cpp's default load");
        assert_eq!(c.seed, 42);
    }

    #[test]
    fn deadline_grows_with_cells_and_can_be_set() {
        let base = "[matrices.m]\ntypes=[\"q4_0\"]\nshapes=[\"all\"]\nmax_time_ms = 1500\n";
        let c = parse(base).unwrap();
        // 5 min + per cell 30 s + per invocation 2 x 2 s + 1 s of warm-up.
        assert_eq!(
            c.matrix("m").unwrap().deadline(10, 1).as_secs(),
            300 + 10 * 35
        );
        let c = parse(&format!("{base}deadline_seconds = 60\n")).unwrap();
        assert_eq!(c.matrix("m").unwrap().deadline(10, 5).as_secs(), 60);
    }

    #[test]
    fn load_mode_reads_llama_cpp_names_and_refuses_others() {
        let base = "[matrices.m]\ntypes=[\"q4_0\"]\nshapes=[\"all\"]\n";
        let c = parse(&format!("{base}load_mode = \"no-mmap\"\n")).unwrap();
        assert_eq!(c.matrix("m").unwrap().load_mode, LoadMode::NoMmap);
        let e = parse(&format!("{base}load_mode = \"mlock\"\n")).unwrap_err();
        assert!(e.to_string().contains("no-mmap"), "{e}");
    }

    #[test]
    fn unknown_type_is_named_with_the_known_ones() {
        let e = parse("[matrices.m]\ntypes=[\"q4_x\"]\nshapes=[\"all\"]\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("q4_x") && msg.contains("Q4_K"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn an_i_quant_that_needs_an_importance_matrix_is_refused_naming_the_spelling_that_has_one() {
        let e = parse("[matrices.m]\ntypes=[\"IQ2_XS\"]\nshapes=[\"all\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("IQ2_XS+imatrix") && e.contains("line 2"), "{e}");
        let ok = parse("[matrices.m]\ntypes=[\"iq2_xs+imatrix\", \"Q2_K+imatrix\", \"IQ3_S\"]\nshapes=[\"all\"]\nversus=[\"Q2_K+imatrix\"]\n")
            .unwrap();
        let types: Vec<String> = ok.matrices["m"]
            .types
            .iter()
            .map(|t| t.to_string())
            .collect();
        assert_eq!(types, ["IQ2_XS+imatrix", "Q2_K+imatrix", "IQ3_S"]);
    }

    #[test]
    fn a_versus_type_outside_the_matrix_types_is_refused_saying_so() {
        let ok =
            parse("[matrices.m]\ntypes=[\"Q4_0\", \"SQ4\"]\nshapes=[\"all\"]\nversus=[\"Q4_0\"]\n")
                .unwrap();
        assert_eq!(ok.matrices["m"].versus.len(), 1);
        let e = parse("[matrices.m]\ntypes=[\"SQ4\"]\nshapes=[\"all\"]\nversus=[\"Q4_0\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`versus` names Q4_0") && e.contains("`types`"),
            "{e}"
        );
    }

    #[test]
    fn unknown_shape_is_named() {
        let e = parse("[matrices.m]\ntypes=[\"f32\"]\nshapes=[\"llama9.attn\"]\n").unwrap_err();
        assert!(e.to_string().contains("llama9.attn"), "{e}");
        assert!(e.to_string().contains("matrix `m`"), "{e}");
    }

    #[test]
    fn unknown_key_and_malformed_toml_are_errors() {
        let e = parse("[matrices.m]\ntypes=[\"f32\"]\nshapes=[\"all\"]\nbatch=[1]\n").unwrap_err();
        assert!(e.to_string().contains("batch"), "{e}");
        let e = parse("[matrices.m\n").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
    }

    #[test]
    fn unknown_matrix_lists_defined_ones() {
        let c = parse("[matrices.a]\ntypes=[\"f32\"]\nshapes=[\"all\"]\n").unwrap();
        let e = c.matrix("b").unwrap_err().to_string();
        assert!(e.contains("`b`") && e.contains("a"), "{e}");
    }

    #[test]
    fn zero_threads_or_batch_is_rejected() {
        assert!(parse("[matrices.m]\ntypes=[\"f32\"]\nshapes=[\"all\"]\nthreads=[0]\n").is_err());
        assert!(parse("[matrices.m]\ntypes=[\"f32\"]\nshapes=[\"all\"]\nbatches=[0]\n").is_err());
        assert!(
            parse("[matrices.m]\ntypes=[\"f32\"]\nshapes=[\"all\"]\nthreads=[\"many\"]\n").is_err()
        );
    }

    #[test]
    fn custom_shapes_join_the_catalog() {
        let c = parse(
            "[shapes.\"mine.ffn\"]\nrows=64\ncols=256\n[matrices.m]\ntypes=[\"f32\"]\nshapes=[\"mine.*\"]\n",
        )
        .unwrap();
        assert_eq!(c.catalog().resolve("mine.*").unwrap().len(), 1);
    }

    #[test]
    fn unknown_recipes_are_named() {
        let e = parse(
            "[model_matrices.mq]\nmodels=['m.gguf']\nrecipes=['q4_0','q9_9']\ntext='t.txt'\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("q9_9") && e.contains("matrix `mq`"), "{e}");
    }

    #[test]
    fn model_settings_multiply_into_contexts_and_bad_ones_are_one_line() {
        let matrix = |extra: &str| {
            parse(&format!(
                "[model_matrices.mq]\nmodels=['m.gguf']\nrecipes=['q4_0']\ntext='t.txt'\n{extra}"
            ))
        };
        let c = matrix(
            "kv_type=['f16','q8_0','q4_0/f16']\nflash_attn=['on','auto']\nn_depth=[0,512]\npg=[[32,8]]\n",
        )
        .unwrap();
        let NamedMatrix::Model(_, spec) = &c.matrix_list("mq").unwrap()[0] else {
            panic!("not a model matrix");
        };
        let contexts = spec.contexts();
        assert_eq!(contexts.len(), 6);
        assert_eq!(contexts[0].key(), "ctk=f16/ctv=f16/fa=on/b=2048/ub=512");
        assert_eq!(
            contexts[1].key(),
            "",
            "f16 with auto is llama.cpp's default"
        );
        assert_eq!(contexts[4].kv_type.to_string(), "q4_0/f16");
        assert_eq!(spec.most_context(), 512 + 64);
        assert_eq!(
            spec.test_names(),
            [
                "pp64",
                "tg16",
                "pp32+tg8",
                "pp64+d512",
                "tg16+d512",
                "pp32+tg8+d512"
            ]
        );
        // Values serde refuses say where (line); combinations the matrix
        // refuses say which matrix.
        for (extra, says) in [
            ("kv_type=['q4_k']\n", "`q4_k` is not a KV-cache type"),
            ("kv_type=['q8_0']\nflash_attn=['off']\n", "matrix `mq`: kv_type `q8_0` quantizes the V cache, which llama.cpp runs only with flash attention"),
            ("flash_attn=['maybe']\n", "`maybe`"),
            ("n_ubatch=[4096]\n", "matrix `mq`: n_ubatch 4096"),
            ("n_depth=[]\n", "matrix `mq`: `n_depth` is empty"),
            ("pg=[[64,0]]\n", "matrix `mq`: pg [64, 0]"),
            ("sustain_seconds=-5\n", "matrix `mq`: `sustain_seconds` must be a number of seconds from 0"),
            ("sustain_interval_seconds=0.1\n", "`sustain_interval_seconds` must be a number of seconds from 0.5"),
            ("idle_seconds=nan\n", "`idle_seconds`"),
        ] {
            let e = matrix(extra).unwrap_err().to_string();
            assert!(e.contains(says), "{extra}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        // A quantized K with an f16 V runs without flash attention.
        matrix("kv_type=['q8_0/f16']\nflash_attn=['off']\n").unwrap();
    }

    #[test]
    fn matrix_lists_mix_kernel_and_model_matrices_in_order() {
        let c = parse("[matrices.k]\ntypes=['f32']\nshapes=['all']\n[model_matrices.mq]\nmodels=['m.gguf']\nrecipes=['q4_0']\ntext='t.txt'\n").unwrap();
        let list = c.matrix_list("k, mq,k").unwrap();
        assert_eq!(list.len(), 2);
        assert!(matches!(list[0], NamedMatrix::Kernel(ref n, _) if n == "k"));
        assert!(matches!(list[1], NamedMatrix::Model(ref n, _) if n == "mq"));
        let e = c.matrix_list("k,nope").unwrap_err().to_string();
        assert!(e.contains("`nope`") && e.contains("mq"), "{e}");
    }
}
