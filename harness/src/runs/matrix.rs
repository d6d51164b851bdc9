//! Planning a kernel matrix: a named `MatrixSpec` expanded into cells (the
//! deduplicated cross product of types, shapes, batches and threads) and the
//! job spec one board's agent runs.

use crate::runs::catalog::{ShapeCatalog, UnknownShape};
use crate::runs::config::{BenchConfig, ConfigError, MatrixSpec};
use wire::kernel_job::{Cell, JobSpec, Shape, TimingPolicy};

impl MatrixSpec {
    /// Cells in an order that keeps one shape's weights generated once:
    /// shape, then type, then batch, then threads.
    pub fn expand(&self, catalog: &ShapeCatalog) -> Result<Vec<Cell>, UnknownShape> {
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

    /// The timing policy on a board: `invocations` as the matrix says, or
    /// `DEFAULT_INVOCATIONS` on a real board and one on an emulated board
    /// (its timings mean nothing; one keeps the embedded default fast).
    pub fn timing(&self, emulated: bool) -> TimingPolicy {
        TimingPolicy {
            warmup: self.warmup,
            min_reps: self.min_reps,
            min_time_ms: self.min_time_ms,
            max_time_ms: self.max_time_ms,
            invocations: self.invocations_on(emulated),
            max_warmup_ms: self
                .max_warmup_ms
                .unwrap_or(wire::kernel_job::DEFAULT_MAX_WARMUP_MS),
            max_invocations: if emulated {
                0
            } else {
                self.max_invocations.unwrap_or(0)
            },
            precision: self
                .precision
                .unwrap_or(wire::kernel_job::DEFAULT_PRECISION),
        }
    }

    pub fn invocations_on(&self, emulated: bool) -> u32 {
        self.invocations.unwrap_or(if emulated {
            1
        } else {
            wire::kernel_job::DEFAULT_INVOCATIONS
        })
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
        .map_err(|e| ConfigError::Invalid {
            path: config.source.clone(),
            matrix: matrix_name.to_string(),
            message: e.to_string(),
        })?;
    Ok(JobSpec {
        run_id: run_id.to_string(),
        board: board.to_string(),
        emulated,
        git_commit: git_commit.to_string(),
        seed: config.seed,
        repack: spec.repack,
        load_mode: spec.load_mode,
        distribution: spec.distribution,
        memory_limit_bytes: None,
        power: Default::default(),
        // An emulated board's temperature is the host's: no cool-down.
        cooldown: spec.cooldown_below_c.filter(|_| !emulated).map(|below_c| {
            wire::kernel_job::Cooldown {
                below_c,
                max_seconds: spec.cooldown_max_seconds,
            }
        }),
        timing: spec.timing(emulated),
        round_seed: round_seed(run_id, board),
        adaptive_seconds: None,
        builds: Vec::new(),
        runner: Vec::new(),
        cells,
    })
}

/// The seed of a board's shuffled rounds: from the run id and the board,
/// so every run orders its cells differently and the job spec kept in the
/// run directory reproduces the order.
fn round_seed(run_id: &str, board: &str) -> u64 {
    run_id
        .bytes()
        .chain([0])
        .chain(board.bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

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
}
