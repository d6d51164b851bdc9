//! What an agent says to another agent process: the kernel job's
//! children (`measure-round`, `prepare-cells`), which may be another
//! build's binary (A/B, a commit of this repository): the command line a
//! child is started with (`ChildRequest`) and the lines it answers on its
//! stdout (`ChildLine`), with the figures they carry; and the model job's
//! children (`model-time`, `model-quality`) with theirs. Being in this
//! crate makes it part of the job format a build must share with the host.

use crate::probe::ThermalReading;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The command line of a child after its subcommand: which job, where
/// its files are, which round, which of the job's cells in which order,
/// and the board's cores as the parent resolved `threads = "all"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildRequest {
    pub job: PathBuf,
    pub out_dir: PathBuf,
    pub round: u32,
    pub cells: Vec<usize>,
    pub cores: usize,
}

impl ChildRequest {
    /// `--job J --out-dir D --round R --cells 3,1,2 --cores C`: what the
    /// agent's `ChildArgs` parse.
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        let cells: Vec<String> = self.cells.iter().map(usize::to_string).collect();
        vec![
            "--job".into(),
            self.job.clone().into(),
            "--out-dir".into(),
            self.out_dir.clone().into(),
            "--round".into(),
            self.round.to_string().into(),
            "--cells".into(),
            cells.join(",").into(),
            "--cores".into(),
            self.cores.to_string().into(),
        ]
    }
}

/// What preparing a cell found, once per cell whatever its invocations:
/// the output error against the f64 reference and the storage figures.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct CellPrep {
    pub nmse: f64,
    pub weight_bytes: u64,
    /// The exact storage cost when it depends on the data.
    pub bits_per_weight: Option<f64>,
    /// Wall time quantizing the weights took (every core), ms.
    #[serde(default)]
    pub quantize_ms: Option<f64>,
}

/// One invocation's timing of a cell: its repetitions, its warm-up and
/// what else used the CPU meanwhile.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InvocationTiming {
    pub samples_ns: Vec<u64>,
    pub warmup_reps: u32,
    pub warmup_ms: f64,
    pub settled: bool,
    pub other_cpu_cores: Option<f64>,
    /// What the timed calls cost (`work`: calls), where the board has a
    /// power source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy: Option<crate::power::EnergyMeasure>,
}

/// One invocation of a cell as measured (in this process or a child).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InvocationResult {
    pub timing: InvocationTiming,
    pub kernel_path: String,
    pub weight_placement: String,
    pub cooldown_seconds: Option<f64>,
    pub before: ThermalReading,
    pub after: ThermalReading,
    /// The process that measured it.
    #[serde(default)]
    pub pid: u32,
}

/// What a `measure-round` child says on stdout, one JSON object a line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "child", rename_all = "snake_case")]
pub enum ChildLine {
    /// It starts measuring the job's cell `index`.
    Started {
        index: usize,
    },
    Measured {
        index: usize,
        result: Box<InvocationResult>,
    },
    Failed {
        index: usize,
        reason: String,
    },
    /// `prepare-cells`: the cell is staged and these are its figures.
    Prepared {
        index: usize,
        prep: CellPrep,
    },
    /// `prepare-cells`: the cell cannot run.
    Refused {
        index: usize,
        unsupported: bool,
        reason: String,
    },
}

/// One invocation of a model recipe (`model-time`): every test (per thread
/// count, pp then tg) as seconds per repetition, with the load time and
/// peak memory of the process that measured it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelTiming {
    pub load_ms: f64,
    pub peak_rss_bytes: Option<u64>,
    /// Each repetition's seconds, by test in the order of
    /// `ModelJob::tests`.
    pub seconds: Vec<Vec<f64>>,
    /// What each test ran with, in the same order.
    #[serde(default)]
    pub tests: Vec<TestFacts>,
}

/// What one timed test ran with, as llama.cpp reported it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TestFacts {
    /// Peak resident memory while its context existed (weights, KV
    /// cache, compute buffers), bytes.
    pub peak_rss_bytes: Option<u64>,
    /// Bytes the KV cache held at the end of a repetition (its depth
    /// plus the test's tokens).
    pub kv_bytes: Option<u64>,
    /// Whether the context ran flash attention (`None`: llama.cpp did
    /// not say what `auto` resolved to).
    pub flash_attn_used: Option<bool>,
    /// Set when llama.cpp cannot run the test's context for this model
    /// (a quantized KV cache whose blocks split its attention heads):
    /// why; the test has no times and its row is `unsupported`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// The load of the recipe the test ran on, from the page cache
    /// (right after the cold one), ms ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_ms: Option<f64>,
    /// ... and with none of the file in the page cache (`None` where its
    /// pages could not be dropped), ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_cold_ms: Option<f64>,
    /// Mean time from a repetition's start to its first new token's
    /// logits (time to first token), ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
    /// Heat before and after the test's repetitions (real boards only) ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thermal: Option<(crate::probe::ThermalReading, crate::probe::ThermalReading)>,
    /// ... the seconds waited before it for the board to cool ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_seconds: Option<f64>,
    /// ... and what its repetitions cost, where the board has a power source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy: Option<crate::power::EnergyMeasure>,
}

/// What llama.cpp says of a loaded recipe file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelFacts {
    pub description: String,
    pub size_bytes: u64,
    pub n_params: u64,
}

/// A recipe's output quality against the base model at the same positions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    pub ppl: f64,
    pub kld_mean: f64,
    pub kld_p99: f64,
    pub top1_agreement: f64,
    /// Standard errors and percentiles as `llama-perplexity
    /// --kl-divergence` reports them (0 in lines from older agents).
    #[serde(default)]
    pub ppl_stderr: f64,
    #[serde(default)]
    pub kld_stderr: f64,
    #[serde(default)]
    pub kld_p90: f64,
    #[serde(default)]
    pub kld_max: f64,
    #[serde(default)]
    pub top1_stderr: f64,
}

/// Everything but speed of one recipe: llama.cpp's facts of the file and,
/// for a trained model, its quality, greedy continuation and
/// multiple-choice accuracy (`None` for a synthetic model's random weights).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecipeJudgement {
    pub facts: ModelFacts,
    pub quality: Option<Quality>,
    pub generated_text: Option<String>,
    pub mc_accuracy: Option<f64>,
    /// Its standard error, as llama-perplexity prints it.
    #[serde(default)]
    pub mc_stderr: Option<f64>,
}

/// What a `model-quality` child says on stdout, one JSON object a line:
/// per recipe of its build, its judgement in each of the job's contexts
/// (`ModelJob::contexts`, in order) or why there is none.
#[derive(Debug, Serialize, Deserialize)]
pub struct JudgedLine {
    pub recipe: usize,
    pub judged: Result<Vec<RecipeJudgement>, String>,
}
