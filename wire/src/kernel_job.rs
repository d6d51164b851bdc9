//! The kernel job the host sends an agent: a matrix's cells for one board,
//! with the timing policy and the synthetic data to use.

use crate::ggml_type::Distribution;
use crate::weight_format::WeightFormat;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A weight matrix shape: `rows` (M, outputs) x `cols` (K, the inner
/// dimension every block quantizer splits into blocks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
}

/// Worker threads for a cell: a number, every core of the board (`"all"`),
/// or (model matrices) its fastest cores only (`"big"`: on a big.LITTLE
/// board such as an RK3588 the big cores, on a Pi 5 all four).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadCount {
    Fixed(usize),
    All,
    Big,
}

impl Serialize for ThreadCount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ThreadCount::Fixed(n) => s.serialize_u64(*n as u64),
            ThreadCount::All => s.serialize_str("all"),
            ThreadCount::Big => s.serialize_str("big"),
        }
    }
}

impl<'de> Deserialize<'de> for ThreadCount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Spec {
            Number(usize),
            Text(String),
        }
        match Spec::deserialize(d)? {
            Spec::Number(n) => Ok(ThreadCount::Fixed(n)),
            Spec::Text(t) if t == "all" => Ok(ThreadCount::All),
            Spec::Text(t) if t == "big" => Ok(ThreadCount::Big),
            Spec::Text(t) => Err(serde::de::Error::custom(format!(
                "threads must be a number, \"all\" or \"big\" (the board's fastest cores), not \"{t}\""
            ))),
        }
    }
}

impl ThreadCount {
    /// Threads on a board of `cores` CPUs (`"big"`: as many as it has
    /// cores of its fastest kind; kernel cells, which have no topology,
    /// take every core).
    pub fn resolve(self, cores: usize) -> usize {
        self.resolve_on(cores, &[])
    }

    /// Threads on a board of `cores` CPUs whose fastest are `big` (empty:
    /// unknown, all alike).
    pub fn resolve_on(self, cores: usize, big: &[usize]) -> usize {
        match self {
            ThreadCount::Fixed(n) => n,
            ThreadCount::All => cores.max(1),
            ThreadCount::Big if big.is_empty() => cores.max(1),
            ThreadCount::Big => big.len(),
        }
    }
}

impl fmt::Display for ThreadCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ThreadCount::Fixed(n) => write!(f, "{n}"),
            ThreadCount::All => f.write_str("all"),
            ThreadCount::Big => f.write_str("big"),
        }
    }
}

/// One measurement: a weight format, a shape, a batch and a thread count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// Stable within a run: `<shape>/<type>/n<batch>/t<threads>`, with
    /// `@<build>` after it in a job that measures several builds (A/B).
    pub id: String,
    pub ty: WeightFormat,
    pub shape: Shape,
    pub batch_tokens: usize,
    pub threads: ThreadCount,
    /// The build (of the job's `builds`) whose agent prepares and measures
    /// this cell; `None`: the agent that runs the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
}

impl Cell {
    pub fn new(
        ty: impl Into<WeightFormat>,
        shape: Shape,
        batch_tokens: usize,
        threads: ThreadCount,
    ) -> Self {
        let ty = ty.into();
        let id = format!("{}/{}/n{}/t{}", shape.name, ty, batch_tokens, threads);
        Self {
            id,
            ty,
            shape,
            batch_tokens,
            threads,
            build: None,
        }
    }

    /// This cell as measured by build `name`: its id gains `@<name>`.
    pub fn for_build(mut self, name: &str) -> Cell {
        self.id = format!("{}@{name}", self.id);
        self.build = Some(name.to_string());
        self
    }
}

/// The build a cell id names after `@`, and the id without it.
pub fn split_build(cell_id: &str) -> (&str, Option<&str>) {
    match cell_id.rsplit_once('@') {
        Some((id, build)) => (id, Some(build)),
        None => (cell_id, None),
    }
}

/// An agent build a job measures (A/B, `cargo xtask ab`): the cells that
/// name it are prepared and measured by its own binary, as separate
/// processes in the same shuffled rounds as the other build's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobBuild {
    pub name: String,
    #[serde(flatten)]
    pub agent: crate::probe::AgentIdentity,
    /// Its binary on the board; `None`: where boards keep agents by hash,
    /// `<agents folder>/<agent_build>/quantbench-agent`, beside the
    /// running agent's own folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Fixed memory a cell needs besides its matrices: GGML's thread pool and
/// graph, the reference rows for NMSE, allocator slack.
pub const CELL_OVERHEAD_BYTES: u64 = 16 << 20;

impl Cell {
    /// The quantized matrix's bytes: the file the agent stages it in, in
    /// its output folder, when the job loads weights by mmap.
    pub fn weight_bytes(&self) -> u64 {
        self.ty.matrix_bytes(self.shape.rows, self.shape.cols) as u64
    }

    /// The most memory the agent holds at once while measuring this cell:
    /// the f32 weights (`4*M*K`), the quantized matrix twice (while it is
    /// staged: written to a mapped file or copied to GGML's buffer, and in
    /// the repack buffer when repacked), f32 and quantized activations
    /// (`2 x 4*N*K`, a bound), the output twice (`2 x 4*N*M`: GGML's and the
    /// copy read back), plus [`CELL_OVERHEAD_BYTES`]. A codebook's
    /// quantizer also holds a flag per weight, and with a sparse part a
    /// 4-byte rank per weight while it picks the outliers.
    pub fn peak_memory_bytes(&self) -> u64 {
        let (m, k, n) = (
            self.shape.rows as u64,
            self.shape.cols as u64,
            self.batch_tokens as u64,
        );
        let quantized = self.weight_bytes();
        let quantizer = match self.ty {
            WeightFormat::Ggml { .. } | WeightFormat::Lut(_) => 0,
            WeightFormat::Codebook(ty) if ty.outlier_percent.is_some() => 5 * m * k,
            WeightFormat::Codebook(_) => m * k,
        };
        4 * m * k + 2 * quantized + quantizer + 8 * n * k + 8 * n * m + CELL_OVERHEAD_BYTES
    }
}

/// Invocations (agent processes) per cell on a real board unless a matrix
/// says otherwise (see docs/nightly.md, "Invocations and verdicts", for the
/// dimensioning measurement behind it).
pub const DEFAULT_INVOCATIONS: u32 = 10;

/// Most time an invocation warms a cell up for before timing it anyway
/// (and calling it unsettled), unless a matrix says otherwise.
pub const DEFAULT_MAX_WARMUP_MS: u64 = 1000;

/// Precision a cell's time is measured to when more invocations are
/// allowed (`TimingPolicy::max_invocations`): the half-width of its 95%
/// interval, relative (2%: two runs measured so are judged `same` within a
/// 5% threshold when nothing changed).
pub const DEFAULT_PRECISION: f64 = 0.02;

/// Timing policy shared by every cell of a job. Repetition counts and
/// times are per invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimingPolicy {
    /// Least untimed calls; warm-up goes on until the timings are steady.
    pub warmup: u32,
    pub min_reps: u32,
    pub min_time_ms: u64,
    pub max_time_ms: u64,
    /// Separate agent processes each cell is measured in, spread over the
    /// job in shuffled rounds; 1 measures in the agent's own process.
    #[serde(default = "one")]
    pub invocations: u32,
    /// Most warm-up per invocation of a cell, ms.
    #[serde(default = "default_max_warmup_ms")]
    pub max_warmup_ms: u64,
    /// Adaptive repetition: a cell whose time is not yet known to
    /// `precision` after `invocations` gets more, a round at a time, up to
    /// this many (0 or `invocations`: none), while the job's
    /// `adaptive_seconds` last.
    #[serde(default)]
    pub max_invocations: u32,
    /// Relative half-width of the 95% interval of a cell's time (Student's
    /// t on its invocations' log medians) that ends its adaptive rounds.
    #[serde(default = "default_precision")]
    pub precision: f64,
}

impl TimingPolicy {
    /// The most invocations a cell may get.
    pub fn most_invocations(&self) -> u32 {
        self.max_invocations.max(self.invocations)
    }
}

fn default_precision() -> f64 {
    DEFAULT_PRECISION
}

fn one() -> u32 {
    1
}
fn default_max_warmup_ms() -> u64 {
    DEFAULT_MAX_WARMUP_MS
}

/// How the agent places a cell's weights in memory, named after llama.cpp's
/// load modes so a cell sees the pages a model load would give it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadMode {
    /// llama.cpp's default: the weights are written to a file and mapped
    /// read-only (`MAP_SHARED | MAP_POPULATE`), so the kernel reads page-cache
    /// pages; repacked types are copied into the CPU backend's repack buffer.
    #[default]
    Mmap,
    /// llama.cpp's `--no-mmap`: the weights are copied into a buffer the CPU
    /// backend allocates (anonymous memory).
    NoMmap,
}

impl fmt::Display for LoadMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoadMode::Mmap => "mmap",
            LoadMode::NoMmap => "no-mmap",
        })
    }
}

/// Everything an agent needs to run a matrix on one board.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub run_id: String,
    pub board: String,
    /// True when the board is an emulator: its timings measure the
    /// emulator, and every row and plot says so.
    pub emulated: bool,
    pub git_commit: String,
    pub seed: u64,
    pub repack: bool,
    #[serde(default)]
    pub load_mode: LoadMode,
    pub distribution: Distribution,
    /// Memory the agent may plan for on this board (its `max_memory_mb`);
    /// the agent also never plans beyond what the board has available.
    #[serde(default)]
    pub memory_limit_bytes: Option<u64>,
    pub timing: TimingPolicy,
    /// Wait before each cell until the board has cooled (real boards only).
    #[serde(default)]
    pub cooldown: Option<Cooldown>,
    /// Where the board's power is read: each invocation's timed calls are
    /// sampled for joules per GEMV.
    #[serde(default)]
    pub power: crate::power::PowerSettings,
    /// Seed of the order of cells in each round of invocations (recorded in
    /// `run.json`, so a run's order can be reproduced).
    #[serde(default)]
    pub round_seed: u64,
    /// Seconds from the agent's start after which no adaptive round starts
    /// (the run's `--budget`, less what the board's later jobs need);
    /// `None`: adaptive rounds run until `max_invocations`.
    #[serde(default)]
    pub adaptive_seconds: Option<u64>,
    /// The builds the cells name (empty: one build, the running agent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub builds: Vec<JobBuild>,
    /// The command the board runs the agent under (an emulator such as
    /// `qemu-aarch64 -cpu cortex-a76`, the board's `runner`): the agent
    /// starts its child processes under it too (under qemu-user a program
    /// cannot start another of its architecture directly).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runner: Vec<String>,

    pub cells: Vec<Cell>,
}

/// Before each cell, wait until the SoC is below `below_c`, for at most
/// `max_seconds` (a board in a hot room may never get there).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Cooldown {
    pub below_c: f64,
    pub max_seconds: u64,
}

/// Room for a job's rows, repetitions, progress and log on a board.
pub const ROWS_ALLOWANCE_BYTES: u64 = 4 << 20;

impl JobSpec {
    /// The build that measures `cell`, when the job names builds.
    pub fn build_of(&self, cell: &Cell) -> Option<&JobBuild> {
        let name = cell.build.as_ref()?;
        self.builds.iter().find(|b| &b.name == name)
    }

    /// The most disk the agent uses at once in its output folder: the
    /// largest cell's staged weights (mmap load mode; one cell's at a time)
    /// plus its rows.
    pub fn disk_need_bytes(&self) -> u64 {
        let staged = match self.load_mode {
            LoadMode::Mmap => self.cells.iter().map(Cell::weight_bytes).max(),
            LoadMode::NoMmap => None,
        };
        staged.unwrap_or(0) + ROWS_ALLOWANCE_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml_type::GgmlType;

    #[test]
    fn peak_memory_counts_weights_quantized_twice_and_batch_buffers() {
        let shape = Shape {
            name: "llama3-8b.ffn_down".into(),
            rows: 4096,
            cols: 14336,
        };
        let cell = Cell::new(GgmlType::Q8_0, shape, 1, ThreadCount::Fixed(1));
        let f32_weights = 4 * 4096 * 14336u64;
        let q8 = 4096 * (14336 / 32) * 34u64;
        let batch = 8 * 14336 + 8 * 4096u64;
        assert_eq!(
            cell.peak_memory_bytes(),
            f32_weights + 2 * q8 + batch + CELL_OVERHEAD_BYTES
        );
        // About 376 MB: too much for a board told to plan for 256 MB.
        assert!(cell.peak_memory_bytes() > 256_000_000);
    }

    #[test]
    fn thread_count_resolves_all_to_cores() {
        assert_eq!(ThreadCount::All.resolve(4), 4);
        assert_eq!(ThreadCount::Fixed(2).resolve(4), 2);
    }

    #[test]
    fn thread_counts_read_numbers_all_and_big() {
        let parsed: Vec<ThreadCount> = serde_json::from_str("[2, \"all\", \"big\"]").unwrap();
        assert_eq!(
            parsed,
            vec![ThreadCount::Fixed(2), ThreadCount::All, ThreadCount::Big]
        );
        assert_eq!(
            serde_json::to_string(&parsed).unwrap(),
            "[2,\"all\",\"big\"]"
        );
        let e = serde_json::from_str::<ThreadCount>("\"many\"").unwrap_err();
        assert!(e.to_string().contains("\"big\""), "{e}");
        // An RK3588: four small cores, then four big ones.
        assert_eq!(ThreadCount::Big.resolve_on(8, &[4, 5, 6, 7]), 4);
        assert_eq!(ThreadCount::Big.resolve_on(4, &[]), 4);
    }
}
