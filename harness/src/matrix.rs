//! Weight shapes, matrix cells and the job spec sent to an agent.

use crate::config::{BenchConfig, ConfigError, CustomShape, MatrixSpec};
use crate::ggml_type::GgmlType;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// A weight matrix shape: `rows` (M, outputs) x `cols` (K, the inner
/// dimension every block quantizer splits into blocks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
}

/// Projections of the models the seed studies used, from their published
/// configs. Rows are the output features, cols the input features (K).
/// DistilGPT-2's fused qkv maps 768 inputs to 2304 outputs, so it is
/// 2304x768 here (the issue text wrote it the other way round).
pub const BUILTIN_SHAPES: &[(&str, usize, usize)] = &[
    ("distilgpt2.attn_qkv", 2304, 768),
    ("distilgpt2.attn_out", 768, 768),
    ("distilgpt2.ffn_up", 3072, 768),
    ("distilgpt2.ffn_down", 768, 3072),
    ("distilgpt2.lm_head", 50257, 768),
    ("llama3.2-1b.attn_q", 2048, 2048),
    ("llama3.2-1b.attn_kv", 512, 2048),
    ("llama3.2-1b.ffn_up", 8192, 2048),
    ("llama3.2-1b.ffn_down", 2048, 8192),
    ("llama3.2-1b.lm_head", 128256, 2048),
    ("gemma3-1b.attn_q", 1024, 1152),
    ("gemma3-1b.attn_kv", 256, 1152),
    ("gemma3-1b.ffn_up", 6912, 1152),
    ("gemma3-1b.ffn_down", 1152, 6912),
    ("exaone3.5-2.4b.attn_q", 2560, 2560),
    ("exaone3.5-2.4b.attn_kv", 640, 2560),
    ("exaone3.5-2.4b.ffn_up", 7168, 2560),
    ("exaone3.5-2.4b.ffn_down", 2560, 7168),
    // The shape llama.cpp's `test-backend-ops perf -o MUL_MAT` reports
    // (Llama-3-8B's ffn_down), for checking our figures against its own.
    ("llama3-8b.ffn_down", 4096, 14336),
];

/// Built-in shapes plus the config's own, by name.
#[derive(Debug, Clone)]
pub struct ShapeCatalog {
    shapes: BTreeMap<String, Shape>,
}

impl ShapeCatalog {
    pub fn with_custom(custom: &BTreeMap<String, CustomShape>) -> Self {
        let builtin = BUILTIN_SHAPES
            .iter()
            .map(|&(name, rows, cols)| (name.to_string(), rows, cols));
        let extra = custom.iter().map(|(n, s)| (n.clone(), s.rows, s.cols));
        let shapes = builtin
            .chain(extra)
            .map(|(name, rows, cols)| (name.clone(), Shape { name, rows, cols }))
            .collect();
        Self { shapes }
    }

    /// Shapes matching `pattern`: an exact name, `model.*`, or `all`.
    pub fn resolve(&self, pattern: &str) -> Result<Vec<Shape>, String> {
        let found: Vec<Shape> = if pattern == "all" {
            self.shapes.values().cloned().collect()
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            self.shapes
                .values()
                .filter(|s| s.name.starts_with(prefix))
                .cloned()
                .collect()
        } else {
            self.shapes.get(pattern).cloned().into_iter().collect()
        };
        if found.is_empty() {
            let names: Vec<&str> = self.shapes.keys().map(String::as_str).collect();
            return Err(format!(
                "unknown shape `{pattern}` (known: {}; or `model.*`, `all`)",
                names.join(", ")
            ));
        }
        Ok(found)
    }
}

/// Worker threads for a cell: a number, or every core of the board.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ThreadCount {
    Fixed(usize),
    #[serde(with = "all_literal")]
    All,
}

mod all_literal {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("all")
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<(), D::Error> {
        let text = String::deserialize(d)?;
        if text == "all" {
            Ok(())
        } else {
            Err(serde::de::Error::custom(format!(
                "threads must be a number or \"all\", not \"{text}\""
            )))
        }
    }
}

impl ThreadCount {
    pub fn resolve(self, cores: usize) -> usize {
        match self {
            ThreadCount::Fixed(n) => n,
            ThreadCount::All => cores.max(1),
        }
    }
}

impl fmt::Display for ThreadCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ThreadCount::Fixed(n) => write!(f, "{n}"),
            ThreadCount::All => f.write_str("all"),
        }
    }
}

/// One measurement: a type, a shape, a batch and a thread count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// Stable within a run: `<shape>/<type>/n<batch>/t<threads>`.
    pub id: String,
    pub ty: GgmlType,
    pub shape: Shape,
    pub batch_tokens: usize,
    pub threads: ThreadCount,
}

impl Cell {
    pub fn new(ty: GgmlType, shape: Shape, batch_tokens: usize, threads: ThreadCount) -> Self {
        let id = format!("{}/{}/n{}/t{}", shape.name, ty, batch_tokens, threads);
        Self {
            id,
            ty,
            shape,
            batch_tokens,
            threads,
        }
    }
}

/// Timing policy shared by every cell of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimingPolicy {
    pub warmup: u32,
    pub min_reps: u32,
    pub min_time_ms: u64,
    pub max_time_ms: u64,
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
    pub distribution: crate::ggml_type::Distribution,
    pub timing: TimingPolicy,
    pub cells: Vec<Cell>,
}

impl MatrixSpec {
    /// Cells in an order that keeps one shape's weights generated once:
    /// shape, then type, then batch, then threads.
    pub fn expand(&self, catalog: &ShapeCatalog) -> Result<Vec<Cell>, String> {
        let mut shapes: Vec<Shape> = Vec::new();
        for pattern in &self.shapes {
            for shape in catalog.resolve(pattern)? {
                if !shapes.contains(&shape) {
                    shapes.push(shape);
                }
            }
        }
        let mut cells = Vec::new();
        for shape in &shapes {
            for &ty in &dedup(&self.types) {
                for &batch in &dedup(&self.batches) {
                    for &threads in &dedup(&self.threads) {
                        cells.push(Cell::new(ty, shape.clone(), batch, threads));
                    }
                }
            }
        }
        Ok(cells)
    }

    pub fn timing(&self) -> TimingPolicy {
        TimingPolicy {
            warmup: self.warmup,
            min_reps: self.min_reps,
            min_time_ms: self.min_time_ms,
            max_time_ms: self.max_time_ms,
        }
    }
}

fn dedup<T: PartialEq + Copy>(items: &[T]) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for &item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// Builds the job for one board from a named matrix.
pub fn job_for_board(
    config: &BenchConfig,
    matrix_name: &str,
    run_id: &str,
    board: &str,
    emulated: bool,
    git_commit: &str,
) -> Result<JobSpec, ConfigError> {
    let spec = config.matrix(matrix_name)?;
    let cells = spec
        .expand(&config.catalog())
        .map_err(|message| ConfigError::Invalid {
            path: config.source.clone(),
            matrix: matrix_name.to_string(),
            message,
        })?;
    Ok(JobSpec {
        run_id: run_id.to_string(),
        board: board.to_string(),
        emulated,
        git_commit: git_commit.to_string(),
        seed: config.seed,
        repack: spec.repack,
        distribution: spec.distribution,
        timing: spec.timing(),
        cells,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn catalog() -> ShapeCatalog {
        ShapeCatalog::with_custom(&BTreeMap::new())
    }

    #[test]
    fn model_wildcard_expands_to_that_models_shapes() {
        let gemma = catalog().resolve("gemma3-1b.*").unwrap();
        assert_eq!(gemma.len(), 4);
        // Gemma's hidden size 1152 is not a multiple of 256: K-quants cannot hold it.
        assert_eq!(gemma.iter().filter(|s| s.cols == 1152).count(), 3);
        assert_eq!(
            catalog().resolve("all").unwrap().len(),
            BUILTIN_SHAPES.len()
        );
    }

    #[test]
    fn expansion_is_the_deduplicated_cross_product() {
        let config = BenchConfig::parse(
            "[matrices.m]\ntypes=[\"f32\",\"q4_0\",\"F32\"]\nshapes=[\"gemma3-1b.attn_q\",\"gemma3-1b.*\"]\nbatches=[1,16]\nthreads=[1,\"all\"]\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let job = job_for_board(&config, "m", "r", "local", false, "abc").unwrap();
        // 4 shapes x 2 types x 2 batches x 2 thread counts.
        assert_eq!(job.cells.len(), 4 * 2 * 2 * 2);
        let ids: std::collections::HashSet<_> = job.cells.iter().map(|c| &c.id).collect();
        assert_eq!(ids.len(), job.cells.len(), "cell ids are unique");
        assert_eq!(job.cells[0].id, "gemma3-1b.attn_q/F32/n1/t1");
        assert_eq!(job.cells[1].id, "gemma3-1b.attn_q/F32/n1/tall");
    }

    #[test]
    fn job_spec_round_trips_through_json() {
        let config = BenchConfig::parse(
            "[matrices.m]\ntypes=[\"q4_k\"]\nshapes=[\"llama3.2-1b.attn_q\"]\nthreads=[2,\"all\"]\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let job = job_for_board(&config, "m", "r1", "pi", true, "abc").unwrap();
        let text = serde_json::to_string(&job).unwrap();
        assert!(text.contains("\"all\""));
        let back: JobSpec = serde_json::from_str(&text).unwrap();
        assert_eq!(back, job);
    }

    #[test]
    fn thread_count_resolves_all_to_cores() {
        assert_eq!(ThreadCount::All.resolve(4), 4);
        assert_eq!(ThreadCount::Fixed(2).resolve(4), 2);
    }
}
