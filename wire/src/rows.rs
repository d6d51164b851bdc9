//! The rows an agent returns, one type per CSV schema: `KernelRow`
//! (`kernels.csv`), `SampleRow` (`samples.csv`, one timed repetition each)
//! and `ModelRow` (`models.csv`). The field order is the column order; every
//! column is documented in docs/results.md, which the tests check.

use crate::model_job::{ModelJob, RecipeFile};
use serde::{Deserialize, Serialize};

/// How a cell ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CellStatus {
    /// Measured.
    Ok,
    /// The type cannot store this shape (reason in `note`).
    Unsupported,
    /// The agent failed or died on this cell (reason in `note`); what a
    /// row is until something was measured.
    #[default]
    Failed,
}

/// One row of `kernels.csv`. The field order is the column order; every
/// column is documented in docs/results.md ("CSV columns").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelRow {
    pub run_id: String,
    pub board: String,
    /// True when timings come from an emulator (qemu), not the hardware.
    pub emulated: bool,
    /// SHA-256 prefix of the agent binary that measured this row.
    pub agent_build: String,
    /// The llama.cpp that binary contains, as it names itself
    /// (`vendored`, `crate:0.1.140 tree ...`, `path:...`); empty in rows
    /// from before builds were an axis.
    #[serde(default)]
    pub llama_cpp: String,
    pub git_commit: String,
    pub cell_id: String,
    pub status: CellStatus,
    /// Why a cell is unsupported or failed; empty when ok.
    pub note: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub bits_per_weight: f64,
    pub shape: String,
    /// Weight rows (output features).
    pub m: usize,
    /// Inner dimension (input features).
    pub k: usize,
    /// Batch tokens (1 = GEMV, decode).
    pub n: usize,
    pub threads: usize,
    /// Synthetic data the cell ran on: `llm-like` or `uniform`.
    pub distribution: crate::ggml_type::Distribution,
    /// GGML path: weight buffer type and activation type, e.g. `CPU_REPACK+act:q8_0`.
    pub kernel_path: String,
    /// Where the weights sat and on which pages: `mmap/4k` (read in place
    /// from a mapped file, llama.cpp's default load), `heap/4k` (copied into
    /// an anonymous buffer, `--no-mmap`) or `repack/4k` (the CPU backend's
    /// repack buffer); `+thpN%` when N% of them were on huge pages.
    #[serde(default)]
    pub weight_placement: String,
    /// Whether GGML could repack the weights for its CPU kernels (the
    /// matrix's `repack`): part of the cell's identity (`CellKey`).
    #[serde(default = "default_true")]
    pub repack: bool,
    /// `mmap` or `no-mmap` (the matrix's `load_mode`): part of the cell's identity.
    #[serde(default)]
    pub load_mode: crate::kernel_job::LoadMode,
    /// Timed repetitions, over every invocation.
    pub repetitions: u32,
    /// Separate agent processes the cell was measured in (1 for runs from
    /// before invocations, and on emulated boards).
    #[serde(default = "default_one")]
    pub invocations: u32,
    /// Spread between invocations: standard deviation of their log median
    /// times (0.05 is about 5%); empty with one invocation.
    #[serde(default)]
    pub invocation_spread: Option<f64>,
    /// How precisely the invocations know the cell's time: relative
    /// half-width of its 95% interval (Student's t on their log medians;
    /// 0.02 is +-2%); empty below two invocations. Adaptive repetition
    /// measures until it is at most the matrix's `precision`.
    #[serde(default)]
    pub precision: Option<f64>,
    /// Untimed calls before the timing, most over the invocations: warm-up
    /// runs until the timings stop falling (`settled`).
    #[serde(default)]
    pub warmup_reps: u32,
    /// Longest warm-up of an invocation, ms.
    #[serde(default)]
    pub warmup_ms: Option<f64>,
    /// Every invocation's timings settled within the warm-up budget; a cell
    /// that never settles is `noisy` in `compare`.
    #[serde(default = "default_true")]
    pub settled: bool,
    pub median_ns: Option<f64>,
    pub min_ns: Option<f64>,
    pub max_ns: Option<f64>,
    pub mean_ns: Option<f64>,
    pub stddev_ns: Option<f64>,
    /// 2*M*K*N / median time.
    pub gflops: Option<f64>,
    /// Weight bytes / median time (GB/s, 1e9 bytes).
    pub weight_gbps: Option<f64>,
    /// `weight_gbps` over the board's measured read bandwidth.
    pub bandwidth_share: Option<f64>,
    /// Output error against an f64 reference with the unquantized weights.
    pub nmse: Option<f64>,
    pub weight_bytes: u64,
    /// Wall time quantizing the cell's f32 weights into its type took, ms,
    /// on every core of the board (GGML's quantizer for its types, ours
    /// for SQ and LUT; each splits the rows across the cores); the same
    /// for every cell of one shape and type. Empty in rows from before it.
    #[serde(default)]
    pub quantize_ms: Option<f64>,
    pub temp_before_c: Option<f64>,
    pub temp_after_c: Option<f64>,
    pub freq_before_mhz: Option<f64>,
    pub freq_after_mhz: Option<f64>,
    /// CPU 0's cpufreq governor before the cell; empty when unknown.
    #[serde(default)]
    pub governor: String,
    /// Throttled before, during or after the cell, by the board's own
    /// flags; empty when the board does not say (and on emulated boards).
    #[serde(default)]
    pub throttled: Option<bool>,
    /// Seconds waited before the cell for the board to cool below the
    /// matrix's `cooldown_below_c`; empty without a cool-down.
    #[serde(default)]
    pub cooldown_seconds: Option<f64>,
    /// Throttled, or measured under a governor other than `performance`:
    /// the summary and plots flag it and `compare` calls it noisy.
    #[serde(default)]
    pub thermal_noisy: bool,
    /// CPU time other processes used while the cell was timed, in cores
    /// (0.5: half a core's worth), most over the invocations; from every
    /// other process's `/proc/<pid>/stat`. Empty where not measured
    /// (emulated boards share the host with every other qemu).
    #[serde(default)]
    pub other_cpu_cores: Option<f64>,
    /// Something else used the board's CPU while the cell was timed
    /// (`other_cpu_cores` above `DISTURBED_OTHER_CORES`): `compare` calls it
    /// `disturbed`, not regressed.
    #[serde(default)]
    pub disturbed: bool,
    /// Where the energy columns come from (as in `ModelRow`); empty where
    /// the board has no power source ...
    #[serde(default)]
    pub power_source: String,
    /// ... the readings they rest on, fewer than 5 in some invocation ...
    #[serde(default)]
    pub power_samples: u32,
    #[serde(default)]
    pub power_few_samples: bool,
    /// ... the mean power while the cell's calls ran (W) ...
    #[serde(default)]
    pub power_w: Option<f64>,
    /// ... joules per call (one GEMV at batch 1) ...
    #[serde(default)]
    pub j_per_call: Option<f64>,
    /// ... and GFLOP per joule (`2*M*K*N / 1e9 / j_per_call`).
    #[serde(default)]
    pub gflops_per_j: Option<f64>,
    /// UTC time the cell finished, RFC 3339.
    pub finished_at: String,
}

/// Other processes' CPU use during a cell, in cores, above which the cell
/// is `disturbed`: a busy neighbour (a compile, another benchmark) takes
/// a core or shares the memory bus; idle daemons stay far below.
pub const DISTURBED_OTHER_CORES: f64 = 0.2;

fn default_true() -> bool {
    true
}
fn default_one() -> u32 {
    1
}

/// A row that names the board and run that produced it: the host keeps a
/// row only where both match the board folder and the run it came from.
pub trait Stamped {
    fn board(&self) -> &str;
    fn run_id(&self) -> &str;
}

macro_rules! stamped {
    ($($row:ty),*) => {$(
        impl Stamped for $row {
            fn board(&self) -> &str {
                &self.board
            }
            fn run_id(&self) -> &str {
                &self.run_id
            }
        }
    )*};
}
stamped!(KernelRow, ModelRow, SampleRow, InvocationRow, SustainRow);

/// What identifies a measured cell across runs: what is measured (the
/// cell id: shape, type, batch, threads; a model row's model, recipe,
/// test, threads) and every setting that changes its timing. `compare`,
/// the history and noise floors match on this and nothing else, so rows
/// measured under other settings are never judged against each other. A
/// new setting that moves timings extends `settings`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CellKey {
    pub board: String,
    /// `kernel` or `model`.
    pub kind: String,
    pub cell_id: String,
    /// `distribution/load_mode/repack` for kernel cells; empty for model cells.
    pub settings: String,
}

impl std::fmt::Display for CellKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.settings.is_empty() {
            write!(f, "{}", self.cell_id)
        } else {
            write!(f, "{} [{}]", self.cell_id, self.settings)
        }
    }
}

impl KernelRow {
    /// `distribution/load_mode/repack|no-repack`.
    pub fn settings(&self) -> String {
        let distribution = match self.distribution {
            crate::ggml_type::Distribution::LlmLike => "llm-like",
            crate::ggml_type::Distribution::Uniform => "uniform",
        };
        let repack = if self.repack { "repack" } else { "no-repack" };
        format!("{distribution}/{}/{repack}", self.load_mode)
    }

    pub fn key(&self) -> CellKey {
        CellKey {
            board: self.board.clone(),
            kind: "kernel".into(),
            cell_id: self.cell_id.clone(),
            settings: self.settings(),
        }
    }
}

impl KernelRow {
    /// A row with the cell's identity and no measurement yet; the agent fills
    /// in the figures, the host uses it as is for cells an agent never finished.
    pub fn unmeasured(
        job: &crate::kernel_job::JobSpec,
        cell: &crate::kernel_job::Cell,
        threads: usize,
        agent: &crate::probe::AgentIdentity,
        status: CellStatus,
        note: String,
    ) -> KernelRow {
        KernelRow {
            run_id: job.run_id.clone(),
            board: job.board.clone(),
            emulated: job.emulated,
            agent_build: agent.agent_build.clone(),
            llama_cpp: agent.llama_cpp.clone(),
            git_commit: job.git_commit.clone(),
            cell_id: cell.id.clone(),
            status,
            note,
            ty: cell.ty.to_string(),
            bits_per_weight: cell.ty.bits_per_weight(cell.shape.rows, cell.shape.cols),
            shape: cell.shape.name.clone(),
            m: cell.shape.rows,
            k: cell.shape.cols,
            n: cell.batch_tokens,
            threads,
            distribution: job.distribution,
            kernel_path: String::new(),
            weight_placement: String::new(),
            repack: job.repack,
            load_mode: job.load_mode,
            repetitions: 0,
            invocations: 0,
            invocation_spread: None,
            precision: None,
            warmup_reps: 0,
            warmup_ms: None,
            settled: true,
            median_ns: None,
            min_ns: None,
            max_ns: None,
            mean_ns: None,
            stddev_ns: None,
            gflops: None,
            weight_gbps: None,
            bandwidth_share: None,
            nmse: None,
            weight_bytes: 0,
            quantize_ms: None,
            temp_before_c: None,
            temp_after_c: None,
            freq_before_mhz: None,
            freq_after_mhz: None,
            governor: String::new(),
            throttled: None,
            cooldown_seconds: None,
            thermal_noisy: false,
            other_cpu_cores: None,
            disturbed: false,
            power_source: String::new(),
            power_samples: 0,
            power_few_samples: false,
            power_w: None,
            j_per_call: None,
            gflops_per_j: None,
            finished_at: crate::utc_now_rfc3339(),
        }
    }
}

/// One row of `samples.csv`: a single timed repetition of a kernel cell
/// (`cell_id` as in `kernels.csv`) or of a model test (`ModelRow::cell_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRow {
    pub run_id: String,
    pub board: String,
    pub cell_id: String,
    /// Index of the repetition within its invocation.
    pub repetition: u32,
    pub ns: u64,
    /// Which agent process (invocation) measured it: repetitions of one
    /// invocation share its memory placement, clocks and neighbours, so
    /// statistics treat the invocation as the unit (0 in older runs).
    #[serde(default)]
    pub invocation: u32,
    /// The shuffled round the invocation ran in (see `run.json`'s
    /// `round_seed`); 0 in older runs.
    #[serde(default)]
    pub round: u32,
}

/// One row of `invocations.csv`: one invocation (agent process) of a
/// kernel cell, written as it finishes, so a resumed run knows which
/// invocations a cell still needs; the cell's row in `kernels.csv`
/// summarises them once all are done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvocationRow {
    pub run_id: String,
    pub board: String,
    pub cell_id: String,
    pub invocation: u32,
    /// The shuffled round it ran in.
    pub round: u32,
    /// Its place in the round's shuffled order.
    pub position: u32,
    pub status: CellStatus,
    pub note: String,
    pub kernel_path: String,
    pub weight_placement: String,
    pub repetitions: u32,
    pub median_ns: Option<f64>,
    pub warmup_reps: u32,
    pub warmup_ms: f64,
    pub settled: bool,
    pub other_cpu_cores: Option<f64>,
    pub cooldown_seconds: Option<f64>,
    pub temp_before_c: Option<f64>,
    pub temp_after_c: Option<f64>,
    pub freq_before_mhz: Option<f64>,
    pub freq_after_mhz: Option<f64>,
    pub governor: String,
    pub throttled: Option<bool>,
    pub thermal_noisy: bool,
    pub finished_at: String,
    /// The process that measured it (each invocation is its own; in an A/B
    /// job each build's are its own binary's); 0 in older files.
    #[serde(default)]
    pub pid: u32,
    /// What its timed calls cost, where the board has a power source: the
    /// source, joules, seconds, readings and calls of the window.
    #[serde(default)]
    pub power_source: String,
    #[serde(default)]
    pub energy_j: Option<f64>,
    #[serde(default)]
    pub energy_seconds: Option<f64>,
    #[serde(default)]
    pub power_samples: u32,
    #[serde(default)]
    pub energy_calls: Option<f64>,
}

impl InvocationRow {
    /// The invocation's energy window, where it has one.
    pub fn energy(&self) -> Option<crate::power::EnergyMeasure> {
        Some(crate::power::EnergyMeasure {
            source: self.power_source.clone(),
            joules: self.energy_j?,
            wall_joules: None,
            seconds: self.energy_seconds?,
            samples: self.power_samples,
            work: self.energy_calls?,
        })
    }
}

/// One row of `models.csv`: a model x recipe x threads x test (pp or tg).
/// Columns named like llama-bench's mean what llama-bench's mean.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelRow {
    pub run_id: String,
    pub board: String,
    pub emulated: bool,
    pub agent_build: String,
    /// The llama.cpp the agent contains, as in `KernelRow`.
    #[serde(default)]
    pub llama_cpp: String,
    pub git_commit: String,
    pub status: CellStatus,
    pub note: String,
    /// llama-bench: model file name.
    pub model_filename: String,
    pub recipe: String,
    /// The build that measured the row in an A/B run (`cargo xtask ab`),
    /// also at the end of its cell id (`...@<build>`); empty otherwise.
    #[serde(default)]
    pub build: String,
    /// llama-bench: model description (architecture, size, type).
    pub model_type: String,
    /// llama-bench: bytes of weights (for a codebook recipe, as the
    /// scheme stores them, not as its decoded file holds them).
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
    /// `pp<N>` or `tg<N>`, `+d<depth>` on a KV cache that already held
    /// tokens (`tg128+d4096`).
    pub test: String,
    /// llama-bench: tokens in the KV cache before the test.
    #[serde(default)]
    pub n_depth: usize,
    /// llama-bench: KV-cache types (empty in rows from before they were
    /// recorded: f16).
    #[serde(default)]
    pub type_k: String,
    #[serde(default)]
    pub type_v: String,
    /// llama-bench: flash attention as the matrix set it (`auto`, `on`,
    /// `off`; empty in older rows: auto) ...
    #[serde(default)]
    pub flash_attn: String,
    /// ... and whether the context ran it (`on`, `off`; empty when
    /// llama.cpp did not say what `auto` resolved to).
    #[serde(default)]
    pub flash_attn_used: String,
    /// llama-bench: batch and micro-batch (0 in older rows: 2048 and 512).
    #[serde(default)]
    pub n_batch: usize,
    #[serde(default)]
    pub n_ubatch: usize,
    /// llama-bench: GGML's threads' CPU mask (`0x0`: the OS places them;
    /// empty in older rows: 0x0), one thread per CPU of it, how long idle
    /// threads spin (0-100; 0 in older rows: 50) ...
    #[serde(default)]
    pub cpu_mask: String,
    #[serde(default)]
    pub cpu_strict: bool,
    #[serde(default)]
    pub poll: Option<u32>,
    /// ... and the scheduling priority (`low` .. `realtime`; empty in older
    /// rows: normal).
    #[serde(default)]
    pub priority: String,
    /// How the recipe was loaded: `mmap` (empty in older rows), `no-mmap`,
    /// `mlock` ...
    #[serde(default)]
    pub load_mode: String,
    /// ... and the load's time with none of the file in the page cache
    /// (as after a reboot; `load_ms` is the load right after it, from the
    /// page cache), mean over invocations; empty where the file's pages
    /// could not be dropped.
    #[serde(default)]
    pub load_cold_ms: Option<f64>,
    /// Time to first token: from a repetition's start (its KV cache at the
    /// depth) to the first new token's logits (the prompt decoded, or one
    /// token for tg), mean over repetitions and invocations, ms.
    #[serde(default)]
    pub ttft_ms: Option<f64>,
    /// Bytes the KV cache held at the end of a repetition (depth plus the
    /// test's tokens; `peak_rss_bytes` counts what llama.cpp allocated).
    #[serde(default)]
    pub kv_bytes: Option<u64>,
    /// llama-bench: mean time of one repetition, ns.
    pub avg_ns: Option<f64>,
    pub stddev_ns: Option<f64>,
    /// llama-bench: tokens per second, mean and stddev over repetitions.
    pub avg_ts: Option<f64>,
    pub stddev_ts: Option<f64>,
    pub load_ms: Option<f64>,
    /// Peak resident memory of the agent while this test's context
    /// existed (VmHWM: weights, KV cache, compute buffers), bytes.
    pub peak_rss_bytes: Option<u64>,
    /// Processes the speed was measured in (each loads the recipe afresh
    /// and runs every repetition); `avg_ns` is over all their repetitions,
    /// `load_ms` their mean, `peak_rss_bytes` their most.
    #[serde(default = "default_one")]
    pub invocations: u32,
    /// How precisely the invocations know the test's time: relative
    /// half-width of its 95% interval (Student's t on their log medians);
    /// empty below two invocations.
    #[serde(default)]
    pub precision: Option<f64>,
    /// Perplexity on the text, llama-perplexity's method (second half of
    /// each `ctx`-token chunk scored).
    pub ppl: Option<f64>,
    /// KL divergence from the base model's next-token distribution.
    pub kld_mean: Option<f64>,
    pub kld_p99: Option<f64>,
    /// Share of positions where the top token equals the base model's.
    pub top1_agreement: Option<f64>,
    /// Standard errors of `ppl`, `kld_mean` and `top1_agreement` and the
    /// KL divergence's 90th percentile and maximum, as `llama-perplexity
    /// --kl-divergence` reports them.
    #[serde(default)]
    pub ppl_stderr: Option<f64>,
    #[serde(default)]
    pub kld_stderr: Option<f64>,
    #[serde(default)]
    pub kld_p90: Option<f64>,
    #[serde(default)]
    pub kld_max: Option<f64>,
    #[serde(default)]
    pub top1_stderr: Option<f64>,
    /// Multiple-choice accuracy (share of tasks whose most likely ending,
    /// by mean token log-likelihood, is the labelled one); empty without tasks.
    pub mc_accuracy: Option<f64>,
    /// Its standard error over the tasks, `sqrt(p(1-p)/(n-1))` as
    /// llama-perplexity prints it.
    #[serde(default)]
    pub mc_stderr: Option<f64>,
    /// Greedy continuation of the prompt, verbatim.
    pub generated_text: String,
    /// Share of repeated word 3-grams in the continuation (0 = none).
    pub repetition_score: Option<f64>,
    /// A synthetic model (seeded random weights at a real architecture's
    /// sizes): the quality columns are empty.
    #[serde(default)]
    pub synthetic: bool,
    /// Seconds waited before the test for the board to cool below the
    /// matrix's `cooldown_below_c`, most over invocations; empty without one.
    #[serde(default)]
    pub cooldown_seconds: Option<f64>,
    /// Heat from the first invocation's start of the test to the last
    /// one's end (empty on emulated boards and where the board does not
    /// say): SoC temperature and CPU 0's clock ...
    #[serde(default)]
    pub temp_before_c: Option<f64>,
    #[serde(default)]
    pub temp_after_c: Option<f64>,
    #[serde(default)]
    pub freq_before_mhz: Option<f64>,
    #[serde(default)]
    pub freq_after_mhz: Option<f64>,
    /// ... the cpufreq governor, the fan at the end (`3100 rpm`,
    /// `level 2/4`) ...
    #[serde(default)]
    pub governor: String,
    #[serde(default)]
    pub fan: String,
    /// ... throttled and under-voltage by the board's own flags in any
    /// invocation ...
    #[serde(default)]
    pub throttled: Option<bool>,
    #[serde(default)]
    pub under_voltage: Option<bool>,
    /// ... and the kernel cells' rule (`probe::thermally_noisy`): throttled
    /// or off the `performance` governor; `compare` calls it noisy.
    #[serde(default)]
    pub thermal_noisy: bool,
    /// The power source the energy columns come from (`pi5-pmic`,
    /// `rapl:package-0`, `hwmon:<device>`, `command`); empty where the
    /// board has none (the summary says which were looked for and why
    /// each was unusable). On emulated boards the source is a stand-in.
    #[serde(default)]
    pub power_source: String,
    /// Readings the energy figures rest on, over every invocation ...
    #[serde(default)]
    pub power_samples: u32,
    /// ... fewer than 5 in some invocation, even after the test was
    /// repeated for up to 10 s more to gather them.
    #[serde(default)]
    pub power_few_samples: bool,
    /// Mean power while the test ran (W; a Pi 5's PMIC: the rails' sum) ...
    #[serde(default)]
    pub power_w: Option<f64>,
    /// ... at the wall, where the source estimates it (a Pi 5: `1.1451 x
    /// rails + 0.5879`) ...
    #[serde(default)]
    pub wall_power_w: Option<f64>,
    /// ... and the board's idle power measured before the job.
    #[serde(default)]
    pub idle_power_w: Option<f64>,
    /// Joules per token of this test (pp and tg rows apart), its standard
    /// error over invocations (empty below two) ...
    #[serde(default)]
    pub j_per_token: Option<f64>,
    #[serde(default)]
    pub j_per_token_stderr: Option<f64>,
    /// ... at the wall ...
    #[serde(default)]
    pub wall_j_per_token: Option<f64>,
    /// ... above the idle power (what decoding itself cost) ...
    #[serde(default)]
    pub j_per_token_above_idle: Option<f64>,
    /// ... and tokens per joule (`1 / j_per_token`).
    #[serde(default)]
    pub tokens_per_j: Option<f64>,
    pub finished_at: String,
}

/// One row of `sustained.csv`: a recipe decoding without pause (the model
/// matrix's `sustain_seconds`), one row per interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SustainRow {
    pub run_id: String,
    pub board: String,
    pub emulated: bool,
    pub model_filename: String,
    pub recipe: String,
    /// The build in an A/B run; empty otherwise.
    pub build: String,
    pub n_threads: usize,
    /// Seconds from the start of the sustained decode to the end of this
    /// interval.
    pub elapsed_s: f64,
    /// Tokens generated in the interval, one at a time, and their rate.
    pub tokens: u64,
    pub tokens_per_s: f64,
    /// CPU 0's clock and the SoC's temperature at the interval's end
    /// (empty on emulated boards and where the board does not say).
    pub freq_mhz: Option<f64>,
    pub temp_c: Option<f64>,
    /// Throttled during the interval by the board's own flags.
    pub throttled: Option<bool>,
    /// Mean power over the interval and its source; empty without one.
    pub power_w: Option<f64>,
    pub power_source: String,
    pub finished_at: String,
}

impl ModelRow {
    /// The row's cell: `<model>/<recipe>/<test>/t<threads>`, with its
    /// context settings in brackets where they are not llama.cpp's
    /// defaults (`[ctk=q8_0/ctv=q8_0/fa=on/b=2048/ub=512]`) and `@<build>`
    /// in an A/B run: the key its repetitions carry in `samples.csv` and
    /// comparisons match on, so two settings' repetitions never mix.
    pub fn cell_id(&self) -> String {
        let settings = self.settings_key();
        let id = format!(
            "{}/{}/{}/t{}{}",
            self.model_filename,
            self.recipe,
            self.test,
            self.n_threads,
            if settings.is_empty() {
                String::new()
            } else {
                format!("[{settings}]")
            }
        );
        if self.build.is_empty() {
            id
        } else {
            format!("{id}@{}", self.build)
        }
    }

    pub fn key(&self) -> CellKey {
        CellKey {
            board: self.board.clone(),
            kind: "model".into(),
            cell_id: self.cell_id(),
            settings: self.settings_key(),
        }
    }

    /// The row's settings as part of its identity
    /// (`model_settings::settings_key`).
    pub fn settings_key(&self) -> String {
        crate::model_settings::settings_key(&self.context_settings(), self.load())
    }

    /// How the recipe was loaded (older rows and unknown names: mmap).
    pub fn load(&self) -> crate::model_settings::ModelLoad {
        crate::model_settings::ModelLoad::from_name(&self.load_mode).unwrap_or_default()
    }

    /// The context the row's test ran in, older rows' empty columns read
    /// as llama.cpp's defaults.
    pub fn context_settings(&self) -> crate::model_settings::ContextSettings {
        use crate::model_settings::{
            ContextSettings, CpuSettings, FlashAttn, KvCacheType, Priority, DEFAULT_N_BATCH,
            DEFAULT_N_UBATCH,
        };
        let kv = |t: &str| {
            if t.is_empty() {
                "f16".to_string()
            } else {
                t.to_string()
            }
        };
        ContextSettings {
            kv_type: KvCacheType {
                k: kv(&self.type_k),
                v: kv(&self.type_v),
            },
            flash_attn: match self.flash_attn.as_str() {
                "on" => FlashAttn::On,
                "off" => FlashAttn::Off,
                _ => FlashAttn::Auto,
            },
            n_batch: if self.n_batch == 0 {
                DEFAULT_N_BATCH
            } else {
                self.n_batch
            },
            n_ubatch: if self.n_ubatch == 0 {
                DEFAULT_N_UBATCH
            } else {
                self.n_ubatch
            },
            cpu: CpuSettings {
                cpu_mask: if self.cpu_mask.is_empty() {
                    CpuSettings::default().cpu_mask
                } else {
                    self.cpu_mask.clone()
                },
                cpu_strict: self.cpu_strict,
                poll: self.poll.unwrap_or(CpuSettings::default().poll),
                priority: Priority::ALL
                    .into_iter()
                    .find(|p| p.name() == self.priority)
                    .unwrap_or_default(),
            },
        }
    }

    /// A row for a recipe that produced no measurement, with the reason.
    pub fn failed(
        job: &ModelJob,
        recipe: &RecipeFile,
        agent: &crate::probe::AgentIdentity,
        note: &str,
    ) -> ModelRow {
        ModelRow {
            run_id: job.run_id.clone(),
            board: job.board.clone(),
            emulated: job.emulated,
            agent_build: agent.agent_build.clone(),
            llama_cpp: agent.llama_cpp.clone(),
            git_commit: job.git_commit.clone(),
            status: CellStatus::Failed,
            note: note.to_string(),
            model_filename: job.model_name.clone(),
            recipe: recipe.recipe.clone(),
            build: String::new(),
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
            n_depth: 0,
            type_k: String::new(),
            type_v: String::new(),
            flash_attn: String::new(),
            flash_attn_used: String::new(),
            n_batch: 0,
            n_ubatch: 0,
            cpu_mask: String::new(),
            cpu_strict: false,
            poll: None,
            priority: String::new(),
            load_mode: String::new(),
            load_cold_ms: None,
            ttft_ms: None,
            kv_bytes: None,
            avg_ns: None,
            stddev_ns: None,
            avg_ts: None,
            stddev_ts: None,
            load_ms: None,
            peak_rss_bytes: None,
            invocations: 0,
            precision: None,
            ppl: None,
            kld_mean: None,
            kld_p99: None,
            top1_agreement: None,
            ppl_stderr: None,
            kld_stderr: None,
            kld_p90: None,
            kld_max: None,
            top1_stderr: None,
            mc_accuracy: None,
            mc_stderr: None,
            generated_text: String::new(),
            repetition_score: None,
            synthetic: job.synthetic,
            cooldown_seconds: None,
            temp_before_c: None,
            temp_after_c: None,
            freq_before_mhz: None,
            freq_after_mhz: None,
            governor: String::new(),
            fan: String::new(),
            throttled: None,
            under_voltage: None,
            thermal_noisy: false,
            power_source: String::new(),
            power_samples: 0,
            power_few_samples: false,
            power_w: None,
            wall_power_w: None,
            idle_power_w: None,
            j_per_token: None,
            j_per_token_stderr: None,
            wall_j_per_token: None,
            j_per_token_above_idle: None,
            tokens_per_j: None,
            finished_at: crate::utc_now_rfc3339(),
        }
    }

    /// Sets the heat and energy columns from each invocation's facts of
    /// the test (`work`: tokens decoded in its energy window) and the
    /// board's idle power.
    pub fn set_heat_and_energy(
        &mut self,
        facts: &[&crate::child::TestFacts],
        idle: Option<&crate::power::IdlePower>,
    ) {
        let windows: Vec<_> = facts
            .iter()
            .filter_map(|f| f.thermal.as_ref().map(|(b, a)| (b, a)))
            .collect();
        let heat = crate::probe::HeatFigures::over(&windows);
        self.temp_before_c = heat.temp_before_c;
        self.temp_after_c = heat.temp_after_c;
        self.freq_before_mhz = heat.freq_before_mhz;
        self.freq_after_mhz = heat.freq_after_mhz;
        self.governor = heat.governor;
        self.fan = heat.fan;
        self.throttled = heat.throttled;
        self.under_voltage = heat.under_voltage;
        self.thermal_noisy = heat.thermal_noisy;
        self.cooldown_seconds = facts
            .iter()
            .filter_map(|f| f.cooldown_seconds)
            .reduce(f64::max);
        let energy: Vec<crate::power::EnergyMeasure> =
            facts.iter().filter_map(|f| f.energy.clone()).collect();
        let figures = crate::power::EnergyFigures::of(&energy, idle);
        self.power_source = figures.source.clone();
        self.power_samples = figures.samples;
        self.power_few_samples = figures.few_samples;
        self.power_w = figures.watts;
        self.wall_power_w = figures.wall_watts;
        self.idle_power_w = figures.idle_watts;
        self.j_per_token = figures.joules_per_work;
        self.wall_j_per_token = figures.wall_joules_per_work;
        self.j_per_token_above_idle = figures.joules_per_work_above_idle;
        self.tokens_per_j = figures.work_per_joule();
        let per_invocation: Vec<f64> = energy
            .iter()
            .filter(|w| w.work > 0.0)
            .map(|w| w.joules / w.work)
            .collect();
        self.j_per_token_stderr = (per_invocation.len() >= 2)
            .then(|| crate::stats::Summary::of(&per_invocation))
            .flatten()
            .map(|s| s.stddev / (per_invocation.len() as f64).sqrt());
    }
}

/// A realistic kernel row, for tests of code that reads rows.
#[doc(hidden)]
pub fn example_row(cell_id: &str) -> KernelRow {
    KernelRow {
        run_id: "20261122T120000Z-abc1234".into(),
        board: "local".into(),
        emulated: false,
        agent_build: "0123456789ab".into(),
        llama_cpp: "vendored".into(),
        git_commit: "abc1234".into(),
        cell_id: cell_id.into(),
        status: CellStatus::Ok,
        note: String::new(),
        ty: "Q4_0".into(),
        bits_per_weight: 4.5,
        shape: "llama3.2-1b.attn_q".into(),
        m: 2048,
        k: 2048,
        n: 1,
        threads: 2,
        distribution: crate::ggml_type::Distribution::LlmLike,
        kernel_path: "CPU_REPACK+act:q8_0".into(),
        weight_placement: "repack/4k".into(),
        repack: true,
        load_mode: crate::kernel_job::LoadMode::Mmap,
        repetitions: 10,
        invocations: 1,
        invocation_spread: None,
        precision: None,
        warmup_reps: 3,
        warmup_ms: Some(1.5),
        settled: true,
        median_ns: Some(150_000.0),
        min_ns: Some(140_000.0),
        max_ns: Some(190_000.0),
        mean_ns: Some(155_000.0),
        stddev_ns: Some(5_000.0),
        gflops: Some(55.9),
        weight_gbps: Some(15.7),
        bandwidth_share: Some(0.8),
        nmse: Some(1.2e-3),
        weight_bytes: 2_359_296,
        quantize_ms: Some(38.5),
        temp_before_c: None,
        temp_after_c: Some(51.5),
        freq_before_mhz: None,
        freq_after_mhz: None,
        governor: "performance".into(),
        throttled: Some(false),
        cooldown_seconds: None,
        thermal_noisy: false,
        other_cpu_cores: Some(0.01),
        disturbed: false,
        power_source: String::new(),
        power_samples: 0,
        power_few_samples: false,
        power_w: None,
        j_per_call: None,
        gflops_per_j: None,
        finished_at: "2026-11-22T12:00:01Z".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::{read_csv, CsvAppender, KERNEL_ROWS_FILE, MODEL_ROWS_FILE};

    #[test]
    fn kernel_rows_round_trip_through_csv_with_empty_optionals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KERNEL_ROWS_FILE);
        let mut unsupported = example_row("gemma3-1b.attn_q/Q4_K/n1/t2");
        unsupported.status = CellStatus::Unsupported;
        unsupported.note =
            "Q4_K stores 256-element blocks and K=1152 is not a multiple of 256".into();
        unsupported.median_ns = None;
        unsupported.nmse = None;
        let rows = vec![example_row("a"), unsupported];
        {
            let mut w = CsvAppender::open(&path).unwrap();
            w.append(&rows[0]).unwrap();
        }
        // Reopening appends without a second header.
        CsvAppender::open(&path).unwrap().append(&rows[1]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches("run_id").count(), 1);
        assert!(text
            .lines()
            .next()
            .unwrap()
            .starts_with("run_id,board,emulated,agent_build"));
        let back: Vec<KernelRow> = read_csv(&path).unwrap();
        assert_eq!(back, rows);
    }

    #[test]
    fn header_names_are_the_documented_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.csv");
        CsvAppender::open(&path)
            .unwrap()
            .append(&example_row("a"))
            .unwrap();
        let header = std::fs::read_to_string(&path).unwrap();
        let header = header.lines().next().unwrap();
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/results.md"))
                .unwrap();
        for column in header.split(',') {
            assert!(
                readme.contains(&format!("| `{column}` |")),
                "column `{column}` is not documented in docs/results.md"
            );
        }
    }

    #[test]
    fn invocation_columns_are_documented_in_the_results_guide() {
        let row = InvocationRow {
            run_id: "r".into(),
            board: "b".into(),
            cell_id: "c".into(),
            invocation: 2,
            round: 2,
            position: 7,
            status: CellStatus::Ok,
            note: String::new(),
            kernel_path: "CPU".into(),
            weight_placement: "mmap/4k".into(),
            repetitions: 5,
            median_ns: Some(1e5),
            warmup_reps: 12,
            warmup_ms: 3.5,
            settled: true,
            other_cpu_cores: None,
            cooldown_seconds: None,
            temp_before_c: None,
            temp_after_c: None,
            freq_before_mhz: None,
            freq_after_mhz: None,
            governor: String::new(),
            throttled: None,
            thermal_noisy: false,
            finished_at: "t".into(),
            pid: 4242,
            power_source: "rapl:package-0".into(),
            energy_j: Some(0.5),
            energy_seconds: Some(0.25),
            power_samples: 6,
            energy_calls: Some(1000.0),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(crate::files::INVOCATIONS_FILE);
        CsvAppender::open(&path).unwrap().append(&row).unwrap();
        let back: Vec<InvocationRow> = read_csv(&path).unwrap();
        assert_eq!(back, vec![row]);
        let header = std::fs::read_to_string(&path).unwrap();
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/results.md"))
                .unwrap();
        let section = readme
            .split("### invocations.csv")
            .nth(1)
            .expect("docs/results.md has a section `### invocations.csv`");
        for column in header.lines().next().unwrap().split(',') {
            assert!(
                section.contains(&format!("`{column}`")),
                "invocations.csv column `{column}` undocumented"
            );
        }
    }

    #[test]
    fn model_columns_are_documented_in_the_results_guide() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MODEL_ROWS_FILE);
        let job: ModelJob = serde_json::from_str(
            r#"{"run_id":"r","board":"b","emulated":false,"git_commit":"c","model_name":"m",
            "base":{"recipe":"original","path":"p","fallbacks":[],"file_bytes":1},
            "recipes":[],"threads":["all"],"text":"t","ctx":128,"prompt":"p",
            "generate_tokens":1,"n_prompt":1,"n_gen":1,"repetitions":1}"#,
        )
        .unwrap();
        let row = ModelRow::failed(
            &job,
            &job.base,
            &crate::probe::AgentIdentity {
                agent_build: "h".into(),
                llama_cpp: "vendored".into(),
            },
            "n",
        );
        CsvAppender::open(&path).unwrap().append(&row).unwrap();
        let back: Vec<ModelRow> = read_csv(&path).unwrap();
        assert_eq!(back, vec![row]);
        let header = std::fs::read_to_string(&path).unwrap();
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/results.md"))
                .unwrap();
        for column in header.lines().next().unwrap().split(',') {
            assert!(
                readme.contains(&format!("| `{column}` |")),
                "models.csv column `{column}` undocumented"
            );
        }
    }

    #[test]
    fn model_rows_from_before_the_settings_columns_keep_their_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MODEL_ROWS_FILE);
        let job: ModelJob = serde_json::from_str(
            r#"{"run_id":"r","board":"b","emulated":false,"git_commit":"c","model_name":"m",
            "base":{"recipe":"original","path":"p","fallbacks":[],"file_bytes":1},
            "recipes":[],"threads":["all"],"text":"t","ctx":128,"prompt":"p",
            "generate_tokens":1,"n_prompt":1,"n_gen":1,"repetitions":1}"#,
        )
        .unwrap();
        let mut row = ModelRow::failed(
            &job,
            &job.base,
            &crate::probe::AgentIdentity {
                agent_build: "h".into(),
                llama_cpp: "vendored".into(),
            },
            "n",
        );
        row.test = "tg8".into();
        row.n_threads = 2;
        CsvAppender::open(&path).unwrap().append(&row).unwrap();
        // The same row as an older quantbench wrote it: no settings columns.
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(',').collect()).collect();
        let dropped = [
            "n_depth",
            "type_k",
            "type_v",
            "flash_attn",
            "flash_attn_used",
            "n_batch",
            "n_ubatch",
            "cpu_mask",
            "cpu_strict",
            "poll",
            "priority",
            "load_mode",
            "load_cold_ms",
            "ttft_ms",
            "kv_bytes",
            "ppl_stderr",
            "kld_stderr",
            "kld_p90",
            "kld_max",
            "top1_stderr",
            "mc_stderr",
        ];
        let keep: Vec<usize> = (0..lines[0].len())
            .filter(|&i| !dropped.contains(&lines[0][i]))
            .collect();
        assert_eq!(keep.len(), lines[0].len() - dropped.len());
        let old: String = lines
            .iter()
            .map(|l| keep.iter().map(|&i| l[i]).collect::<Vec<_>>().join(",") + "\n")
            .collect();
        std::fs::write(&path, old).unwrap();
        let back: Vec<ModelRow> = read_csv(&path).unwrap();
        assert_eq!(back[0].key(), row.key());
        assert_eq!(back[0].key().settings, "");
        assert_eq!(back[0].cell_id(), "m/original/tg8/t2");
        // A row under other settings is another cell, and its repetitions
        // in samples.csv carry another id (they were pooled with the
        // default settings' before: an A/A compared f16 and bf16 caches'
        // samples together).
        row.type_k = "q8_0".into();
        row.type_v = "q8_0".into();
        row.flash_attn = "on".into();
        assert_eq!(
            row.cell_id(),
            "m/original/tg8/t2[ctk=q8_0/ctv=q8_0/fa=on/b=2048/ub=512]"
        );
        assert_ne!(row.key(), back[0].key());
    }
}
