//! Measuring a job's cells: weights, quantization, timing, error, rows.

use crate::multiply::{Multiply, PreparedWeights};
use anyhow::{Context, Result};
use kernels::codebook::CodebookMatrix;
use kernels::weights::{activation_second_moments, activations, weights, Distribution};
use kernels::{quantize, KernelError, StagedMatrix};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};
use wire::files::{CsvAppender, KERNEL_ROWS_FILE, SAMPLES_FILE};
use wire::kernel_job::{Cell, Cooldown, JobSpec, TimingPolicy};
use wire::probe::{BoardProbe, ThermalReading};
use wire::progress::ProgressEvent;
use wire::rows::{CellStatus, KernelRow, SampleRow};
use wire::stats::{nmse, Summary};
use wire::weight_format::WeightFormat;

/// The f64 reference is computed on at most this many weight rows and
/// tokens: enough for a stable NMSE, cheap even for a 128256-row lm head.
const REFERENCE_ROWS: usize = 256;
const REFERENCE_TOKENS: usize = 4;

#[derive(Debug, Default)]
pub struct Tally {
    pub ok: usize,
    pub unsupported: usize,
    pub failed: usize,
}

struct Measured {
    samples_ns: Vec<u64>,
    nmse: f64,
    weight_bytes: u64,
    /// The exact storage cost when it depends on the data.
    bits_per_weight: Option<f64>,
    kernel_path: String,
    weight_placement: String,
}

enum Outcome {
    Measured(Measured),
    Unsupported(String),
    Failed(String),
}

/// Weights of the shape being measured, kept while consecutive cells share it
/// (cells arrive grouped by shape, then type), since generating an lm head
/// takes seconds; and the quantized matrix placed as a model load places it,
/// kept while consecutive cells share the type, so each (shape, type) is
/// quantized and written once.
struct WeightCache<'a> {
    scratch_dir: &'a Path,
    key: Option<(String, u64, Distribution)>,
    values: Vec<f32>,
    staged_type: Option<WeightFormat>,
    staged: Option<PreparedWeights>,
}

impl<'a> WeightCache<'a> {
    fn new(scratch_dir: &'a Path) -> Self {
        WeightCache {
            scratch_dir,
            key: None,
            values: Vec::new(),
            staged_type: None,
            staged: None,
        }
    }

    /// Bytes this cache holds that a new cell may reuse or free.
    fn held_bytes(&self) -> u64 {
        (self.values.len() * 4 + self.staged.as_ref().map_or(0, |s| s.bytes())) as u64
    }

    fn release(&mut self) {
        self.values = Vec::new();
        self.staged = None;
        self.key = None;
    }

    /// The f32 weights of the cell's shape and the cell's format: a GGML
    /// type placed in memory by `load_mode`, or a codebook quantized with
    /// the activations' channel second moments as sensitivities.
    fn get(
        &mut self,
        cell: &Cell,
        job: &JobSpec,
    ) -> Result<(&[f32], &PreparedWeights), KernelError> {
        let key = (cell.shape.name.clone(), job.seed, job.distribution);
        let (m, k) = (cell.shape.rows, cell.shape.cols);
        if self.key.as_ref() != Some(&key) {
            // Free the old shape before allocating the new one.
            self.values = Vec::new();
            self.staged = None;
            self.values = weights(job.distribution, m, k, job.seed);
            self.key = Some(key);
        }
        let staged = match self.staged.take() {
            Some(staged) if self.staged_type == Some(cell.ty) => staged,
            stale => {
                drop(stale);
                self.staged_type = None;
                let prepared = match cell.ty {
                    WeightFormat::Ggml(ty) => {
                        let quantized = quantize(ty, m, k, &self.values)?;
                        PreparedWeights::Ggml(StagedMatrix::stage(
                            quantized,
                            job.load_mode,
                            self.scratch_dir,
                        )?)
                    }
                    WeightFormat::Codebook(ty) => {
                        let sensitivity = activation_second_moments(job.distribution, k, job.seed);
                        let matrix =
                            CodebookMatrix::quantize(ty, &self.values, m, k, Some(&sensitivity))?;
                        PreparedWeights::Codebook(Box::new(matrix))
                    }
                };
                self.staged_type = Some(cell.ty);
                prepared
            }
        };
        let staged = self.staged.insert(staged);
        Ok((&self.values, staged))
    }
}

pub fn run_job(job: &JobSpec, probe: &BoardProbe, out_dir: &Path) -> Result<Tally> {
    let started = Instant::now();
    let mut rows = CsvAppender::<KernelRow>::open(&out_dir.join(KERNEL_ROWS_FILE))?;
    let mut samples = CsvAppender::<SampleRow>::open(&out_dir.join(SAMPLES_FILE))?;
    let mut stdout = std::io::stdout();
    let mut emit = |event: ProgressEvent| {
        // A closed stdout (host gone) must not stop the measurement: rows
        // are on disk and the host collects them when it reconnects.
        let _ = writeln!(stdout, "{}", event.to_line());
        let _ = stdout.flush();
    };
    emit(ProgressEvent::Started {
        total: job.cells.len(),
        bandwidth_gbps: probe.read_bandwidth_gbps,
    });
    // Mapped weights are written to an unnamed file beside the rows: the
    // board's own disk, as a model file would be.
    let mut cache = WeightCache::new(out_dir);
    let mut tally = Tally::default();
    for (index, cell) in job.cells.iter().enumerate() {
        emit(ProgressEvent::CellStarted {
            index,
            cell_id: cell.id.clone(),
        });
        let threads = cell.threads.resolve(probe.cores);
        let cooled = job.cooldown.map(cool_down);
        let before = crate::sysinfo::thermal_reading();
        let outcome = measure_cell(cell, threads, job, &mut cache);
        let after = crate::sysinfo::thermal_reading();
        let mut row = build_row(job, probe, cell, threads, &outcome, &before, &after);
        row.cooldown_seconds = cooled;
        if let Outcome::Measured(m) = &outcome {
            for (i, &ns) in m.samples_ns.iter().enumerate() {
                samples.append_unsynced(&SampleRow {
                    run_id: job.run_id.clone(),
                    board: job.board.clone(),
                    cell_id: cell.id.clone(),
                    repetition: i as u32,
                    ns,
                })?;
            }
        }
        // Repetitions reach the disk before the row that says the cell is done.
        samples.sync()?;
        rows.append(&row)
            .with_context(|| format!("writing the row of {}", cell.id))?;
        match row.status {
            CellStatus::Ok => tally.ok += 1,
            CellStatus::Unsupported => tally.unsupported += 1,
            CellStatus::Failed => tally.failed += 1,
        }
        emit(ProgressEvent::CellFinished {
            index,
            cell_id: cell.id.clone(),
            status: row.status,
            median_ns: row.median_ns,
        });
    }
    emit(ProgressEvent::Finished {
        ok: tally.ok,
        unsupported: tally.unsupported,
        failed: tally.failed,
        elapsed_seconds: started.elapsed().as_secs_f64(),
    });
    Ok(tally)
}

fn measure_cell(cell: &Cell, threads: usize, job: &JobSpec, cache: &mut WeightCache) -> Outcome {
    if let Some(reason) = cell.ty.unsupported_reason(cell.shape.cols) {
        return Outcome::Unsupported(reason);
    }
    let available = crate::sysinfo::available_memory_bytes().map(|free| free + cache.held_bytes());
    if let Some(reason) =
        memory_refusal(cell.peak_memory_bytes(), available, job.memory_limit_bytes)
    {
        // Freed now: the next cell may be smaller and fit.
        cache.release();
        return Outcome::Unsupported(reason);
    }
    match try_measure(cell, threads, job, cache) {
        Ok(m) => Outcome::Measured(m),
        Err(KernelError::Unsupported { reason, .. }) => Outcome::Unsupported(reason),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

fn try_measure(
    cell: &Cell,
    threads: usize,
    job: &JobSpec,
    cache: &mut WeightCache,
) -> Result<Measured, KernelError> {
    let (m, k, n) = (cell.shape.rows, cell.shape.cols, cell.batch_tokens);
    let (w, prepared) = cache.get(cell, job)?;
    let x = activations(job.distribution, n, k, job.seed);
    let mut multiply = prepared.multiply(&x, n, threads, job.repack)?;
    multiply.compute()?;
    let error = output_nmse(w, &x, &multiply.output(), m, k, n);
    let samples_ns = time_repetitions(multiply.as_mut(), &job.timing)?;
    Ok(Measured {
        samples_ns,
        nmse: error,
        weight_bytes: prepared.bytes() as u64,
        bits_per_weight: prepared.measured_bits_per_weight(),
        kernel_path: multiply.kernel_path(),
        weight_placement: multiply.weight_placement(),
    })
}

fn time_repetitions(
    matmul: &mut dyn Multiply,
    policy: &TimingPolicy,
) -> Result<Vec<u64>, KernelError> {
    let warm = Instant::now();
    for _ in 0..policy.warmup {
        matmul.compute()?;
    }
    while warm.elapsed() < matmul.warmup_time() {
        matmul.compute()?;
    }
    let min_time = Duration::from_millis(policy.min_time_ms);
    let max_time = Duration::from_millis(policy.max_time_ms);
    let start = Instant::now();
    let mut samples = Vec::new();
    loop {
        let t = Instant::now();
        matmul.compute()?;
        samples.push(t.elapsed().as_nanos() as u64);
        let elapsed = start.elapsed();
        let enough = samples.len() >= policy.min_reps as usize && elapsed >= min_time;
        if enough || elapsed >= max_time {
            return Ok(samples);
        }
    }
}

/// Why a cell needing `need` bytes must not run: more than the board has
/// available (`MemAvailable` plus what the agent already holds and would
/// reuse) or than the board's `max_memory_mb`. Running it anyway would get
/// the agent OOM-killed and every later cell lost.
fn memory_refusal(need: u64, available: Option<u64>, limit: Option<u64>) -> Option<String> {
    let mb = |bytes: u64| bytes as f64 / 1e6;
    if let Some(limit) = limit.filter(|&limit| need > limit) {
        return Some(format!(
            "needs about {:.0} MB of memory; the board's max_memory_mb allows {:.0} MB (raise it, or drop this shape on this board)",
            mb(need),
            mb(limit)
        ));
    }
    if let Some(available) = available.filter(|&available| need > available) {
        return Some(format!(
            "needs about {:.0} MB of memory; the board has {:.0} MB available (free some memory on the board, or drop this shape on this board)",
            mb(need),
            mb(available)
        ));
    }
    None
}

/// NMSE of GGML's output against an f64 product with the *unquantized*
/// weights, on evenly spaced rows and the first tokens: the error a model
/// would see, from weight and activation quantization together.
fn output_nmse(weights: &[f32], x: &[f32], y: &[f32], m: usize, k: usize, n: usize) -> f64 {
    let row_stride = m.div_ceil(REFERENCE_ROWS).max(1);
    let mut reference = Vec::new();
    let mut approx = Vec::new();
    for t in 0..n.min(REFERENCE_TOKENS) {
        let xt = &x[t * k..(t + 1) * k];
        for r in (0..m).step_by(row_stride) {
            let w = &weights[r * k..(r + 1) * k];
            reference.push(w.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum());
            approx.push(y[t * m + r] as f64);
        }
    }
    nmse(&reference, &approx)
}

/// Waits until the SoC is below the cool-down temperature (bounded);
/// returns the seconds waited. A board without a temperature is not waited
/// for.
fn cool_down(cooldown: Cooldown) -> f64 {
    let started = std::time::Instant::now();
    let limit = std::time::Duration::from_secs(cooldown.max_seconds);
    while started.elapsed() < limit {
        match crate::sysinfo::thermal_reading().temperature_c {
            Some(t) if t >= cooldown.below_c => {
                std::thread::sleep(std::time::Duration::from_millis(500))
            }
            _ => break,
        }
    }
    started.elapsed().as_secs_f64()
}

fn build_row(
    job: &JobSpec,
    probe: &BoardProbe,
    cell: &Cell,
    threads: usize,
    outcome: &Outcome,
    before: &ThermalReading,
    after: &ThermalReading,
) -> KernelRow {
    let (m, k, n) = (cell.shape.rows, cell.shape.cols, cell.batch_tokens);
    let mut row = KernelRow::unmeasured(
        job,
        cell,
        threads,
        &probe.agent_build,
        CellStatus::Ok,
        String::new(),
    );
    // Under qemu-user these files are the host's: an emulated board
    // reports no thermals rather than someone else's.
    if !job.emulated {
        row.temp_before_c = before.temperature_c;
        row.temp_after_c = after.temperature_c;
        row.freq_before_mhz = before.freq_mhz;
        row.freq_after_mhz = after.freq_mhz;
        row.governor = before.governor.clone().unwrap_or_default();
        row.throttled = wire::probe::throttled_between(before, after);
        row.thermal_noisy = wire::probe::thermally_noisy(before, after);
    }
    match outcome {
        Outcome::Unsupported(reason) => {
            row.status = CellStatus::Unsupported;
            row.note = reason.clone();
        }
        Outcome::Failed(reason) => {
            row.status = CellStatus::Failed;
            row.note = reason.clone();
        }
        Outcome::Measured(measured) => {
            let times: Vec<f64> = measured.samples_ns.iter().map(|&ns| ns as f64).collect();
            row.kernel_path = measured.kernel_path.clone();
            row.weight_placement = measured.weight_placement.clone();
            row.repetitions = times.len() as u32;
            row.weight_bytes = measured.weight_bytes;
            if let Some(bits) = measured.bits_per_weight {
                row.bits_per_weight = bits;
            }
            row.nmse = Some(measured.nmse);
            if let Some(s) = Summary::of(&times) {
                row.median_ns = Some(s.median);
                row.min_ns = Some(s.min);
                row.max_ns = Some(s.max);
                row.mean_ns = Some(s.mean);
                row.stddev_ns = Some(s.stddev);
                row.gflops = Some(2.0 * (m * k * n) as f64 / s.median);
                let gbps = measured.weight_bytes as f64 / s.median;
                row.weight_gbps = Some(gbps);
                row.bandwidth_share = probe.read_bandwidth_gbps.map(|bw| gbps / bw);
            }
        }
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::kernel_job::{LoadMode, Shape, ThreadCount};
    use wire::probe::ThrottleState;

    fn job(emulated: bool) -> JobSpec {
        let shape = Shape {
            name: "s".into(),
            rows: 32,
            cols: 64,
        };
        JobSpec {
            run_id: "r".into(),
            board: "b".into(),
            emulated,
            git_commit: "c".into(),
            seed: 1,
            repack: false,
            load_mode: LoadMode::Mmap,
            distribution: Distribution::LlmLike,
            memory_limit_bytes: None,
            timing: TimingPolicy {
                warmup: 0,
                min_reps: 1,
                min_time_ms: 0,
                max_time_ms: 1,
            },
            cooldown: None,
            cells: vec![Cell::new(
                wire::ggml_type::GgmlType::Q4_0,
                shape,
                1,
                ThreadCount::Fixed(1),
            )],
        }
    }

    #[test]
    fn thermals_are_recorded_on_real_boards_and_left_empty_on_emulated_ones() {
        let probe: BoardProbe = serde_json::from_value(serde_json::json!({
            "arch": "aarch64", "cpu_model": "Cortex-A76", "cpu_features": [],
            "ggml_features": [], "cores": 4, "memory_bytes": 0, "page_size": 4096,
            "os": "", "kernel": "", "cpufreq_governor": null, "cpu_freq_mhz": null,
            "cpu_max_freq_mhz": null, "temperature_c": null,
            "read_bandwidth_gbps": null, "agent_build": "h"
        }))
        .unwrap();
        let hot = |bits| ThermalReading {
            temperature_c: Some(81.0),
            freq_mhz: Some(1500.0),
            governor: Some("ondemand".into()),
            throttle: Some(ThrottleState::PiFirmware(bits)),
        };
        let outcome = Outcome::Unsupported("test".into());
        for emulated in [false, true] {
            let job = job(emulated);
            let row = build_row(&job, &probe, &job.cells[0], 1, &outcome, &hot(0), &hot(0x8));
            if emulated {
                assert_eq!(row.temp_before_c, None);
                assert_eq!(row.governor, "");
                assert_eq!(row.throttled, None);
                assert!(!row.thermal_noisy);
            } else {
                assert_eq!(row.temp_after_c, Some(81.0));
                assert_eq!(row.governor, "ondemand");
                assert_eq!(row.throttled, Some(true));
                assert!(row.thermal_noisy);
            }
        }
    }

    #[test]
    fn a_cell_over_the_limit_or_the_free_memory_is_refused_with_both_figures() {
        assert_eq!(memory_refusal(100_000_000, Some(200_000_000), None), None);
        let by_limit =
            memory_refusal(376_000_000, Some(20_000_000_000), Some(256_000_000)).unwrap();
        assert!(
            by_limit.contains("376 MB") && by_limit.contains("max_memory_mb allows 256 MB"),
            "{by_limit}"
        );
        let by_free = memory_refusal(3_000_000_000, Some(1_500_000_000), None).unwrap();
        assert!(
            by_free.contains("3000 MB") && by_free.contains("1500 MB available"),
            "{by_free}"
        );
        assert_eq!(
            memory_refusal(3_000_000_000, None, None),
            None,
            "unknown memory: run"
        );
    }
}
