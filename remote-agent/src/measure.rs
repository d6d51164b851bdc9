//! Measuring a cell: its weights made and staged, its output error, one
//! invocation warmed up and timed (with what else used the CPU), and
//! `JobOutput`, which records invocations, repetitions and each cell's row.

use crate::multiply::{Multiply, PreparedWeights};
use anyhow::{Context, Result};
use kernels::codebook::CodebookMatrix;
use kernels::lut::LutMatrix;
use kernels::weights::{activation_second_moments, activations, weights, Distribution};
use kernels::{quantize, quantize_with_importance, KernelError, StagedMatrix};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use wire::child::{CellPrep, InvocationResult, InvocationTiming};
use wire::files::{CsvAppender, INVOCATIONS_FILE, KERNEL_ROWS_FILE, SAMPLES_FILE};
use wire::kernel_job::{Cell, Cooldown, JobSpec, TimingPolicy};
use wire::probe::BoardProbe;
use wire::progress::ProgressEvent;
use wire::rows::{CellStatus, InvocationRow, KernelRow, SampleRow};
use wire::stats::{geometric_mean, invocation_medians, invocation_spread, nmse, Summary};
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

/// How a cell's preparation or measurement ended when it produced no timing.
pub enum Refusal {
    Unsupported(String),
    Failed(String),
}

/// Weights of the shape being measured, kept while consecutive cells share it
/// (cells arrive grouped by shape, then type), since generating an lm head
/// takes seconds; and the quantized matrix placed as a model load places it,
/// kept while consecutive cells share the type, so each (shape, type) is
/// quantized and written once. With invocations in child processes the
/// quantized matrix is also written to a staged file they map afresh.
pub struct WeightCache<'a> {
    scratch_dir: &'a Path,
    key: Option<(String, u64, Distribution)>,
    values: Vec<f32>,
    /// The format and staged file of `staged`: an A/B job stages one file
    /// per build, so the same type for another build is staged again.
    staged_for: Option<(WeightFormat, Option<PathBuf>)>,
    staged: Option<PreparedWeights>,
    /// Wall time the quantizer took to make `staged` from the f32 weights
    /// (on every core: each quantizer splits the rows across them), ms.
    quantize_ms: f64,
}

impl<'a> WeightCache<'a> {
    pub fn new(scratch_dir: &'a Path) -> Self {
        WeightCache {
            scratch_dir,
            key: None,
            values: Vec::new(),
            staged_for: None,
            staged: None,
            quantize_ms: 0.0,
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
    /// the activations' channel second moments as sensitivities. With
    /// `staged_file`, the quantized matrix is also written there (once per
    /// shape and type) and the GGML weights are placed from that file.
    fn get(
        &mut self,
        cell: &Cell,
        job: &JobSpec,
        staged_file: Option<&Path>,
    ) -> Result<(&[f32], &PreparedWeights, f64), KernelError> {
        let key = (cell.shape.name.clone(), job.seed, job.distribution);
        let (m, k) = (cell.shape.rows, cell.shape.cols);
        if self.key.as_ref() != Some(&key) {
            // Free the old shape before allocating the new one.
            self.values = Vec::new();
            self.staged = None;
            self.values = weights(job.distribution, m, k, job.seed);
            self.key = Some(key);
        }
        let wanted = (cell.ty, staged_file.map(Path::to_path_buf));
        let staged = match self.staged.take() {
            Some(staged) if self.staged_for.as_ref() == Some(&wanted) => staged,
            stale => {
                drop(stale);
                self.staged_for = None;
                let sensitivity = || activation_second_moments(job.distribution, k, job.seed);
                let started = std::time::Instant::now();
                let prepared = match cell.ty {
                    WeightFormat::Ggml { ty, importance } => {
                        let quantized = if importance {
                            quantize_with_importance(ty, m, k, &self.values, &sensitivity())?
                        } else {
                            quantize(ty, m, k, &self.values)?
                        };
                        self.quantize_ms = started.elapsed().as_secs_f64() * 1e3;
                        match staged_file {
                            Some(path) => {
                                StagedMatrix::write_file(&quantized, path)?;
                                drop(quantized);
                                PreparedWeights::Ggml(StagedMatrix::open(
                                    path,
                                    ty,
                                    m,
                                    k,
                                    job.load_mode,
                                )?)
                            }
                            None => PreparedWeights::Ggml(StagedMatrix::stage(
                                quantized,
                                job.load_mode,
                                self.scratch_dir,
                            )?),
                        }
                    }
                    WeightFormat::Codebook(ty) => {
                        let matrix =
                            CodebookMatrix::quantize(ty, &self.values, m, k, Some(&sensitivity()))?;
                        self.quantize_ms = started.elapsed().as_secs_f64() * 1e3;
                        if let Some(path) = staged_file {
                            matrix.write_file(path)?;
                        }
                        PreparedWeights::Codebook(Box::new(matrix))
                    }
                    WeightFormat::Lut(ty) => {
                        let matrix =
                            LutMatrix::quantize(ty, &self.values, m, k, Some(&sensitivity()))?;
                        self.quantize_ms = started.elapsed().as_secs_f64() * 1e3;
                        if let Some(path) = staged_file {
                            matrix.write_file(path)?;
                        }
                        PreparedWeights::Lut(Box::new(matrix))
                    }
                };
                self.staged_for = Some(wanted);
                prepared
            }
        };
        let staged = self.staged.insert(staged);
        Ok((&self.values, staged, self.quantize_ms))
    }
}

/// A prepared cell: its figures and the multiplication ready to time.
pub struct ReadyCell<'a> {
    pub prep: CellPrep,
    pub multiply: Box<dyn Multiply + 'a>,
}

/// Checks the cell can run on this board, makes its weights (written to
/// `staged_file` too, when given) and computes its output error once.
pub fn prepare_cell<'c>(
    cell: &Cell,
    threads: usize,
    job: &JobSpec,
    cache: &'c mut WeightCache,
    staged_file: Option<&Path>,
) -> Result<ReadyCell<'c>, Refusal> {
    if let Some(reason) = cell.ty.unsupported_reason(cell.shape.cols) {
        return Err(Refusal::Unsupported(reason));
    }
    let available = crate::sysinfo::available_memory_bytes().map(|free| free + cache.held_bytes());
    if let Some(reason) =
        memory_refusal(cell.peak_memory_bytes(), available, job.memory_limit_bytes)
    {
        // Freed now: the next cell may be smaller and fit.
        cache.release();
        return Err(Refusal::Unsupported(reason));
    }
    let refusal = |e: KernelError| match e {
        KernelError::Unsupported { reason, .. } => Refusal::Unsupported(reason),
        e => Refusal::Failed(e.to_string()),
    };
    let (m, k, n) = (cell.shape.rows, cell.shape.cols, cell.batch_tokens);
    let (w, prepared, quantize_ms) = cache.get(cell, job, staged_file).map_err(refusal)?;
    let x = activations(job.distribution, n, k, job.seed);
    let mut multiply = prepared
        .multiply(&x, n, threads, job.repack)
        .map_err(refusal)?;
    multiply.compute().map_err(refusal)?;
    let error = output_nmse(w, &x, &multiply.output(), m, k, n);
    Ok(ReadyCell {
        prep: CellPrep {
            nmse: error,
            weight_bytes: prepared.bytes() as u64,
            bits_per_weight: prepared.measured_bits_per_weight(),
            quantize_ms: Some(quantize_ms),
        },
        multiply,
    })
}

/// Cools down (when the job asks), reads thermals, warms up and times one
/// invocation of a cell.
pub fn measure_invocation(
    multiply: &mut dyn Multiply,
    job: &JobSpec,
) -> Result<InvocationResult, KernelError> {
    let cooldown_seconds = job.cooldown.map(cool_down);
    let before = crate::sysinfo::thermal_reading();
    let meter = crate::power::board_meter(&job.power, job.emulated);
    let timing = time_invocation(multiply, &job.timing, !job.emulated, meter)?;
    let after = crate::sysinfo::thermal_reading();
    Ok(InvocationResult {
        timing,
        kernel_path: multiply.kernel_path(),
        weight_placement: multiply.weight_placement(),
        cooldown_seconds,
        before,
        after,
        pid: std::process::id(),
    })
}

/// Repetitions an invocation stops at once it has `min_reps`, even before
/// `min_time_ms`: more of one process's repetitions add little once its
/// invocations are the unit (the spread between processes dominates), and
/// a 7 us GEMV would otherwise write 100 000 rows a second.
const MAX_REPS_PER_INVOCATION: usize = 1000;

/// Warm-up calls are compared in windows of this many.
const WARMUP_WINDOW: usize = 5;
/// Least warm-up time: a thread pool's workers and the caches wake up in
/// milliseconds, longer than a small GEMV takes.
const MIN_WARMUP: Duration = Duration::from_millis(20);
/// A drop of the level inside the timed repetitions that counts as the
/// end of a warm-up.
const WARM_DROP: f64 = 0.10;
/// A window of warm-up calls at most this much faster than the one before
/// counts as steady.
const STEADY_TOLERANCE: f64 = 0.02;

/// Warms the cell up until its timings are steady (Barrett et al., "Virtual
/// Machine Warmup Blows Hot and Cold": a fixed count of warm-up calls
/// measures start-up on some cells), then times repetitions. Steady: after
/// the policy's `warmup` calls and [`MIN_WARMUP`], the median of the last
/// [`WARMUP_WINDOW`] calls is no more than [`STEADY_TOLERANCE`] below the
/// median of the window before. A cell still getting faster at
/// `max_warmup_ms` is timed anyway and recorded as not settled; a cell too
/// slow for two windows within it is warmed by count and time only.
///
/// With a power source, a sampling thread runs beside the timed calls;
/// where they end before it has enough readings, untimed calls go on
/// until it has (see `power::Sampling::enough`).
fn time_invocation(
    matmul: &mut dyn Multiply,
    policy: &TimingPolicy,
    measure_others: bool,
    meter: Option<&crate::power::Meter>,
) -> Result<InvocationTiming, KernelError> {
    let cpu_before = measure_others.then(crate::sysinfo::CpuTimes::now).flatten();
    let warm = Instant::now();
    let least_warmup = MIN_WARMUP.max(matmul.warmup_time());
    let max_warmup = Duration::from_millis(policy.max_warmup_ms).max(least_warmup);
    let mut warmup_ns: Vec<f64> = Vec::new();
    let settled = loop {
        let t = Instant::now();
        matmul.compute()?;
        warmup_ns.push(t.elapsed().as_nanos() as f64);
        let elapsed = warm.elapsed();
        if warmup_ns.len() < policy.warmup.max(1) as usize || elapsed < least_warmup {
            continue;
        }
        if warmup_ns.len() >= 2 * WARMUP_WINDOW {
            let median = |w: &[f64]| Summary::of(w).map_or(0.0, |s| s.median);
            let n = warmup_ns.len();
            let last = median(&warmup_ns[n - WARMUP_WINDOW..]);
            let before = median(&warmup_ns[n - 2 * WARMUP_WINDOW..n - WARMUP_WINDOW]);
            if last >= before * (1.0 - STEADY_TOLERANCE) {
                break true;
            }
        }
        if elapsed >= max_warmup {
            break warmup_ns.len() < 2 * WARMUP_WINDOW;
        }
    };
    let warmup_ms = warm.elapsed().as_secs_f64() * 1e3;
    let min_time = Duration::from_millis(policy.min_time_ms);
    let max_time = Duration::from_millis(policy.max_time_ms);
    let start = Instant::now();
    let sampling = meter.map(crate::power::Meter::start);
    let mut samples = Vec::new();
    loop {
        let t = Instant::now();
        matmul.compute()?;
        samples.push(t.elapsed().as_nanos() as u64);
        let elapsed = start.elapsed();
        let enough = samples.len() >= policy.min_reps as usize
            && (elapsed >= min_time || samples.len() >= MAX_REPS_PER_INVOCATION);
        if enough || elapsed >= max_time {
            break;
        }
    }
    let energy = match sampling {
        Some(s) => s.extend_and_finish(samples.len(), 1.0, || matmul.compute())?,
        None => None,
    };
    // A level that drops clearly inside the timed repetitions (a pool that
    // kept waking up after the warm-up looked flat) is warm-up too: the
    // repetitions before the drop are dropped.
    let mut warmup_reps = warmup_ns.len() as u32;
    if let Some(start) = steady_start(&samples) {
        samples.drain(..start);
        warmup_reps += start as u32;
    }
    let window = warm.elapsed().as_secs_f64();
    let other_cpu_cores = cpu_before
        .zip(crate::sysinfo::CpuTimes::now())
        .map(|(before, after)| after.others_since(&before) / window.max(1e-9));
    Ok(InvocationTiming {
        samples_ns: samples,
        warmup_reps,
        warmup_ms,
        settled,
        other_cpu_cores,
        energy,
    })
}

/// Where the timed repetitions' last level starts, when it is at least
/// [`WARM_DROP`] below the level before it and holds for at least the last
/// third of them (still warming up when timing began): change points
/// (asv's L1 step fit, `wire::stats::change_points`) of the repetitions,
/// binned to at most 60 medians so a long series costs little. `None`: one
/// level, a short dip at the end (noise, not warm-up), or a last level that
/// is slower (heat, a neighbour: not warm-up, kept).
fn steady_start(samples: &[u64]) -> Option<usize> {
    const BINS: usize = 60;
    let per_bin = samples.len().div_ceil(BINS).max(1);
    let bins: Vec<f64> = samples
        .chunks(per_bin)
        .filter_map(|chunk| {
            let values: Vec<f64> = chunk.iter().map(|&ns| ns as f64).collect();
            Summary::of(&values).map(|s| s.median)
        })
        .collect();
    let points = wire::stats::change_points(&bins, None);
    let &last = points.last()?;
    let before = points.iter().rev().nth(1).copied().unwrap_or(0);
    let level = |seg: &[f64]| Summary::of(seg).map_or(0.0, |s| s.median);
    let (old, new) = (level(&bins[before..last]), level(&bins[last..]));
    if new >= old * (1.0 - WARM_DROP) || 3 * (bins.len() - last) < bins.len() {
        return None;
    }
    // The step lies within a bin of the boundary: cut after the last
    // repetition there that is nearer the old level.
    let boundary = last * per_bin;
    let window = boundary.saturating_sub(per_bin)..(boundary + per_bin).min(samples.len());
    let midpoint = (old + new) / 2.0;
    let cut = window
        .clone()
        .rev()
        .find(|&i| samples[i] as f64 > midpoint)
        .map_or(window.start, |i| i + 1);
    Some(cut)
}

/// Where a kernel job's results go: the rows, repetitions and invocation
/// records (appended and synced as each arrives), progress on stdout, and
/// each cell's invocations until its row is written.
pub struct JobOutput<'a> {
    job: &'a JobSpec,
    pub probe: &'a BoardProbe,
    rows: CsvAppender<KernelRow>,
    samples: CsvAppender<SampleRow>,
    invocations: CsvAppender<InvocationRow>,
    /// Finished invocations by cell: their records and repetitions.
    pub done: HashMap<String, Vec<(InvocationRow, Vec<u64>)>>,
    /// Cells whose row is written.
    finished: HashSet<String>,
    pub tally: Tally,
}

impl<'a> JobOutput<'a> {
    /// Opens the job's files; invocations a previous agent finished for
    /// this run (a resumed job) are read back and count.
    pub fn open(job: &'a JobSpec, probe: &'a BoardProbe, out_dir: &Path) -> Result<Self> {
        let invocations_path = out_dir.join(INVOCATIONS_FILE);
        let mut done: HashMap<String, Vec<(InvocationRow, Vec<u64>)>> = HashMap::new();
        if invocations_path.exists() {
            let cells: HashSet<&str> = job.cells.iter().map(|c| c.id.as_str()).collect();
            let mut samples: HashMap<(String, u32), Vec<u64>> = HashMap::new();
            for s in wire::files::read_csv_lenient::<SampleRow>(&out_dir.join(SAMPLES_FILE)) {
                if s.run_id == job.run_id && cells.contains(s.cell_id.as_str()) {
                    samples
                        .entry((s.cell_id, s.invocation))
                        .or_default()
                        .push(s.ns);
                }
            }
            for r in wire::files::read_csv_lenient::<InvocationRow>(&invocations_path) {
                if r.run_id == job.run_id
                    && r.status == CellStatus::Ok
                    && cells.contains(r.cell_id.as_str())
                {
                    let reps = samples
                        .remove(&(r.cell_id.clone(), r.invocation))
                        .unwrap_or_default();
                    done.entry(r.cell_id.clone()).or_default().push((r, reps));
                }
            }
        }
        Ok(JobOutput {
            job,
            probe,
            rows: CsvAppender::open(&out_dir.join(KERNEL_ROWS_FILE))?,
            samples: CsvAppender::open(&out_dir.join(SAMPLES_FILE))?,
            invocations: CsvAppender::open(&invocations_path)?,
            done,
            finished: HashSet::new(),
            tally: Tally::default(),
        })
    }

    pub fn emit(&self, event: ProgressEvent) {
        // A closed stdout (host gone) must not stop the measurement: rows
        // are on disk and the host collects them when it reconnects.
        let mut stdout = std::io::stdout();
        let _ = writeln!(stdout, "{}", event.to_line());
        let _ = stdout.flush();
    }

    pub fn is_finished(&self, cell_id: &str) -> bool {
        self.finished.contains(cell_id)
    }

    /// Invocations of `cell_id` finished so far.
    pub fn invocations_done(&self, cell_id: &str) -> u32 {
        self.done.get(cell_id).map_or(0, |d| d.len() as u32)
    }

    /// How precisely the cell's time is known from its invocations so
    /// far: the relative half-width of its 95% interval (`None` below two
    /// invocations).
    pub fn precision(&self, cell_id: &str) -> Option<f64> {
        let groups: Vec<Vec<f64>> = self
            .done
            .get(cell_id)?
            .iter()
            .map(|(_, reps)| reps.iter().map(|&n| n as f64).collect())
            .collect();
        wire::stats::relative_half_width(&groups, 0.95)
    }

    /// Writes one finished invocation: its repetitions, then its record.
    pub fn record_invocation(
        &mut self,
        cell: &Cell,
        invocation: u32,
        round: u32,
        position: u32,
        result: &InvocationResult,
    ) -> Result<()> {
        for (i, &ns) in result.timing.samples_ns.iter().enumerate() {
            self.samples.append_unsynced(&SampleRow {
                run_id: self.job.run_id.clone(),
                board: self.job.board.clone(),
                cell_id: cell.id.clone(),
                repetition: i as u32,
                ns,
                invocation,
                round,
            })?;
        }
        // Repetitions reach the disk before the record that says they are done.
        self.samples.sync()?;
        let times: Vec<f64> = result.timing.samples_ns.iter().map(|&n| n as f64).collect();
        let real = !self.job.emulated;
        let energy = result.timing.energy.as_ref();
        let record = InvocationRow {
            run_id: self.job.run_id.clone(),
            board: self.job.board.clone(),
            cell_id: cell.id.clone(),
            invocation,
            round,
            position,
            status: CellStatus::Ok,
            note: String::new(),
            kernel_path: result.kernel_path.clone(),
            weight_placement: result.weight_placement.clone(),
            repetitions: times.len() as u32,
            median_ns: Summary::of(&times).map(|s| s.median),
            warmup_reps: result.timing.warmup_reps,
            warmup_ms: result.timing.warmup_ms,
            settled: result.timing.settled,
            other_cpu_cores: result.timing.other_cpu_cores,
            cooldown_seconds: result.cooldown_seconds,
            // Under qemu-user these files are the host's: an emulated
            // board reports no thermals rather than someone else's.
            temp_before_c: result.before.temperature_c.filter(|_| real),
            temp_after_c: result.after.temperature_c.filter(|_| real),
            freq_before_mhz: result.before.freq_mhz.filter(|_| real),
            freq_after_mhz: result.after.freq_mhz.filter(|_| real),
            governor: result
                .before
                .governor
                .clone()
                .filter(|_| real)
                .unwrap_or_default(),
            throttled: wire::probe::throttled_between(&result.before, &result.after)
                .filter(|_| real),
            thermal_noisy: real && wire::probe::thermally_noisy(&result.before, &result.after),
            finished_at: wire::utc_now_rfc3339(),
            pid: result.pid,
            power_source: energy.map(|e| e.source.clone()).unwrap_or_default(),
            energy_j: energy.map(|e| e.joules),
            energy_seconds: energy.map(|e| e.seconds),
            power_samples: energy.map_or(0, |e| e.samples),
            energy_calls: energy.map(|e| e.work),
        };
        self.invocations
            .append(&record)
            .with_context(|| format!("recording an invocation of {}", cell.id))?;
        self.done
            .entry(cell.id.clone())
            .or_default()
            .push((record, result.timing.samples_ns.clone()));
        Ok(())
    }

    /// Writes the cell's row: from its finished invocations and `prep`, or
    /// the reason it has none.
    pub fn finish_cell(
        &mut self,
        index: usize,
        cell: &Cell,
        threads: usize,
        prep: Result<CellPrep, Refusal>,
    ) -> Result<()> {
        let done = self.done.remove(&cell.id).unwrap_or_default();
        self.finished.insert(cell.id.clone());
        let row = build_row(self.job, self.probe, cell, threads, prep, &done);
        self.rows
            .append(&row)
            .with_context(|| format!("writing the row of {}", cell.id))?;
        match row.status {
            CellStatus::Ok => self.tally.ok += 1,
            CellStatus::Unsupported => self.tally.unsupported += 1,
            CellStatus::Failed => self.tally.failed += 1,
        }
        self.emit(ProgressEvent::CellFinished {
            index,
            cell_id: cell.id.clone(),
            status: row.status,
            median_ns: row.median_ns,
        });
        Ok(())
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
pub fn cool_down(cooldown: Cooldown) -> f64 {
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

/// A cell's row from its invocations: `median_ns` is the geometric mean of
/// the invocations' medians (what `compare` compares), the other time
/// columns are over every repetition; warm-up and disturbance are the worst
/// invocation's, thermals span the first to the last.
fn build_row(
    job: &JobSpec,
    probe: &BoardProbe,
    cell: &Cell,
    threads: usize,
    prep: Result<CellPrep, Refusal>,
    invocations: &[(InvocationRow, Vec<u64>)],
) -> KernelRow {
    let (m, k, n) = (cell.shape.rows, cell.shape.cols, cell.batch_tokens);
    // A cell of another build (A/B) was measured by that build's binary.
    let agent = job.build_of(cell).map_or(&probe.agent, |b| &b.agent);
    let mut row = KernelRow::unmeasured(job, cell, threads, agent, CellStatus::Ok, String::new());
    let prep = match prep {
        Ok(prep) => prep,
        Err(Refusal::Unsupported(reason)) => {
            row.status = CellStatus::Unsupported;
            row.note = reason;
            return row;
        }
        Err(Refusal::Failed(reason)) => {
            row.status = CellStatus::Failed;
            row.note = reason;
            return row;
        }
    };
    let (Some((first, _)), Some((last, _))) = (invocations.first(), invocations.last()) else {
        row.status = CellStatus::Failed;
        row.note = "no invocation finished".into();
        return row;
    };
    row.kernel_path = last.kernel_path.clone();
    row.weight_placement = last.weight_placement.clone();
    row.weight_bytes = prep.weight_bytes;
    if let Some(bits) = prep.bits_per_weight {
        row.bits_per_weight = bits;
    }
    row.nmse = Some(prep.nmse);
    row.quantize_ms = prep.quantize_ms;
    let groups: Vec<Vec<f64>> = invocations
        .iter()
        .map(|(_, reps)| reps.iter().map(|&ns| ns as f64).collect())
        .collect();
    let all: Vec<f64> = groups.iter().flatten().copied().collect();
    row.repetitions = all.len() as u32;
    row.invocations = invocations.len() as u32;
    row.invocation_spread = invocation_spread(&groups);
    row.precision = wire::stats::relative_half_width(&groups, 0.95);
    let timing = &job.timing;
    if timing.most_invocations() > timing.invocations
        && row.precision.is_some_and(|p| p > timing.precision)
    {
        row.note = format!(
            "time known to +-{:.1}% after {} invocations, short of the +-{:.1}% asked: {}",
            row.precision.unwrap_or(0.0) * 100.0,
            invocations.len(),
            timing.precision * 100.0,
            if invocations.len() as u32 >= timing.most_invocations() {
                "max_invocations reached"
            } else {
                "the run's --budget left no time for more"
            }
        );
    }
    row.warmup_reps = invocations
        .iter()
        .map(|(r, _)| r.warmup_reps)
        .max()
        .unwrap_or(0);
    row.warmup_ms = invocations
        .iter()
        .map(|(r, _)| r.warmup_ms)
        .reduce(f64::max);
    row.settled = invocations.iter().all(|(r, _)| r.settled);
    row.other_cpu_cores = invocations
        .iter()
        .filter_map(|(r, _)| r.other_cpu_cores)
        .reduce(f64::max);
    row.disturbed = row
        .other_cpu_cores
        .is_some_and(|cores| cores > wire::rows::DISTURBED_OTHER_CORES);
    row.temp_before_c = first.temp_before_c;
    row.freq_before_mhz = first.freq_before_mhz;
    row.governor = first.governor.clone();
    row.temp_after_c = last.temp_after_c;
    row.freq_after_mhz = last.freq_after_mhz;
    row.throttled = invocations
        .iter()
        .filter_map(|(r, _)| r.throttled)
        .reduce(|a, b| a || b);
    row.thermal_noisy = invocations.iter().any(|(r, _)| r.thermal_noisy);
    row.cooldown_seconds = invocations
        .iter()
        .filter_map(|(r, _)| r.cooldown_seconds)
        .reduce(|a, b| a + b);
    if let (Some(s), Some(median)) = (
        Summary::of(&all),
        geometric_mean(&invocation_medians(&groups)),
    ) {
        row.median_ns = Some(median);
        row.min_ns = Some(s.min);
        row.max_ns = Some(s.max);
        row.mean_ns = Some(s.mean);
        row.stddev_ns = Some(s.stddev);
        row.gflops = Some(2.0 * (m * k * n) as f64 / median);
        let gbps = prep.weight_bytes as f64 / median;
        row.weight_gbps = Some(gbps);
        row.bandwidth_share = probe.read_bandwidth_gbps.map(|bw| gbps / bw);
    }
    let windows: Vec<_> = invocations.iter().filter_map(|(r, _)| r.energy()).collect();
    let energy = wire::power::EnergyFigures::of(&windows, None);
    row.power_source = energy.source;
    row.power_samples = energy.samples;
    row.power_few_samples = energy.few_samples;
    row.power_w = energy.watts;
    row.j_per_call = energy.joules_per_work;
    row.gflops_per_j = energy
        .joules_per_work
        .filter(|j| *j > 0.0)
        .map(|j| 2.0 * (m * k * n) as f64 / 1e9 / j);
    row
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::kernel_job::{LoadMode, Shape, ThreadCount};
    use wire::probe::{ThermalReading, ThrottleState};

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
            power: Default::default(),
            memory_limit_bytes: None,
            timing: TimingPolicy {
                warmup: 0,
                min_reps: 1,
                min_time_ms: 0,
                max_time_ms: 1,
                invocations: 1,
                max_warmup_ms: 100,
                max_invocations: 0,
                precision: wire::kernel_job::DEFAULT_PRECISION,
            },
            cooldown: None,
            round_seed: 0,
            adaptive_seconds: None,
            builds: Vec::new(),
            runner: Vec::new(),
            cells: vec![Cell::new(
                wire::ggml_type::GgmlType::Q4_0,
                shape,
                1,
                ThreadCount::Fixed(1),
            )],
        }
    }

    fn probe() -> BoardProbe {
        serde_json::from_value(serde_json::json!({
            "arch": "aarch64", "cpu_model": "Cortex-A76", "cpu_features": [],
            "ggml_features": [], "cores": 4, "memory_bytes": 0, "page_size": 4096,
            "os": "", "kernel": "", "cpufreq_governor": null, "cpu_freq_mhz": null,
            "cpu_max_freq_mhz": null, "temperature_c": null,
            "read_bandwidth_gbps": null, "agent_build": "h"
        }))
        .unwrap()
    }

    fn result(
        samples_ns: Vec<u64>,
        before: ThermalReading,
        after: ThermalReading,
    ) -> InvocationResult {
        InvocationResult {
            timing: InvocationTiming {
                samples_ns,
                warmup_reps: 7,
                warmup_ms: 2.0,
                settled: true,
                other_cpu_cores: Some(0.01),
                energy: None,
            },
            kernel_path: "CPU".into(),
            weight_placement: "mmap/4k".into(),
            cooldown_seconds: None,
            before,
            after,
            pid: 1,
        }
    }

    const PREP: CellPrep = CellPrep {
        nmse: 1e-3,
        weight_bytes: 1000,
        bits_per_weight: None,
        quantize_ms: Some(12.5),
    };

    #[test]
    fn thermals_are_recorded_on_real_boards_and_left_empty_on_emulated_ones() {
        let probe = probe();
        let hot = |bits| ThermalReading {
            temperature_c: Some(81.0),
            freq_mhz: Some(1500.0),
            governor: Some("ondemand".into()),
            throttle: Some(ThrottleState::PiFirmware(bits)),
            fan: None,
        };
        for emulated in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let job = job(emulated);
            let mut out = JobOutput::open(&job, &probe, dir.path()).unwrap();
            let cell = &job.cells[0];
            out.record_invocation(cell, 0, 0, 0, &result(vec![100, 110], hot(0), hot(0x8)))
                .unwrap();
            out.finish_cell(0, cell, 1, Ok(PREP)).unwrap();
            let rows: Vec<KernelRow> =
                wire::files::read_csv(&dir.path().join(KERNEL_ROWS_FILE)).unwrap();
            let row = &rows[0];
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
    fn a_row_summarises_its_invocations_and_a_resumed_job_reads_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let (job, probe) = (job(false), probe());
        let cell = &job.cells[0];
        let cool = ThermalReading::default();
        // Each invocation's calls cost energy: 3 J over 1000 calls, then
        // 5 J over 1000 (the second with too few readings).
        let window = |joules: f64, samples: u32| wire::power::EnergyMeasure {
            source: "rapl:package-0".into(),
            joules,
            wall_joules: None,
            seconds: 1.0,
            samples,
            work: 1000.0,
        };
        {
            let mut out = JobOutput::open(&job, &probe, dir.path()).unwrap();
            let mut first = result(vec![100, 100, 100], cool.clone(), cool.clone());
            first.timing.energy = Some(window(3.0, 10));
            out.record_invocation(cell, 0, 0, 3, &first).unwrap();
        }
        // A new agent (a resumed job) knows the cell has one invocation.
        let mut out = JobOutput::open(&job, &probe, dir.path()).unwrap();
        assert_eq!(out.invocations_done(&cell.id), 1);
        let mut busy = result(vec![400, 400], cool.clone(), cool);
        busy.timing.other_cpu_cores = Some(0.9);
        busy.timing.settled = false;
        busy.timing.energy = Some(window(5.0, 2));
        out.record_invocation(cell, 1, 1, 0, &busy).unwrap();
        out.finish_cell(0, cell, 1, Ok(PREP)).unwrap();
        let rows: Vec<KernelRow> =
            wire::files::read_csv(&dir.path().join(KERNEL_ROWS_FILE)).unwrap();
        let row = &rows[0];
        assert_eq!((row.invocations, row.repetitions), (2, 5));
        // Geometric mean of the medians 100 and 400.
        assert!((row.median_ns.unwrap() - 200.0).abs() < 1e-9, "{row:?}");
        assert!(row.disturbed && !row.settled);
        assert!((row.invocation_spread.unwrap() - (4f64.ln() / 2f64.sqrt())).abs() < 1e-9);
        // Energy over both invocations, the first read back from disk.
        assert_eq!(row.power_source, "rapl:package-0");
        assert_eq!((row.power_samples, row.power_few_samples), (12, true));
        assert!((row.j_per_call.unwrap() - 0.004).abs() < 1e-12, "{row:?}");
        assert!((row.power_w.unwrap() - 4.0).abs() < 1e-12);
        let flop = 2.0 * (row.m * row.k * row.n) as f64;
        assert!((row.gflops_per_j.unwrap() - flop / 1e9 / 0.004).abs() < 1e-9);
        let samples: Vec<SampleRow> =
            wire::files::read_csv(&dir.path().join(SAMPLES_FILE)).unwrap();
        assert_eq!(samples.iter().filter(|s| s.invocation == 1).count(), 2);
    }

    /// A multiplication that takes `delays[i]` on its i-th call (the last
    /// one from then on).
    struct Scripted {
        delays: Vec<Duration>,
        calls: usize,
    }

    impl Multiply for Scripted {
        fn compute(&mut self) -> Result<(), KernelError> {
            let d = self.delays[self.calls.min(self.delays.len() - 1)];
            self.calls += 1;
            let start = Instant::now();
            while start.elapsed() < d {
                std::hint::spin_loop();
            }
            Ok(())
        }
        fn output(&self) -> Vec<f32> {
            Vec::new()
        }
        fn kernel_path(&self) -> String {
            String::new()
        }
        fn weight_placement(&self) -> String {
            String::new()
        }
    }

    #[test]
    fn warm_up_runs_until_the_timings_stop_falling_and_says_when_they_never_do() {
        let policy = TimingPolicy {
            warmup: 1,
            min_reps: 3,
            min_time_ms: 80,
            max_time_ms: 200,
            invocations: 1,
            max_warmup_ms: 400,
            max_invocations: 0,
            precision: wire::kernel_job::DEFAULT_PRECISION,
        };
        // Slow for 60 calls (a pool waking up), then steady.
        let mut delays = vec![Duration::from_micros(900); 60];
        delays.push(Duration::from_micros(100));
        let mut cold = Scripted { delays, calls: 0 };
        let t = time_invocation(&mut cold, &policy, false, None).unwrap();
        assert!(t.settled);
        assert!(t.warmup_reps >= 50, "{}", t.warmup_reps);
        // The slow calls are all warm-up: the first timed ones are fast (one
        // may be preempted on a loaded machine, never a run of them).
        let slow_at_start = t
            .samples_ns
            .iter()
            .take(20)
            .filter(|&&ns| ns > 500_000)
            .count();
        assert!(slow_at_start <= 1, "{:?}", &t.samples_ns[..20]);
        // Ever faster: 3% per call, never steady within the budget.
        let delays = (0..2000)
            .map(|i| Duration::from_nanos((2_000_000.0 * 0.97f64.powi(i)) as u64 + 1))
            .collect();
        let mut falling = Scripted { delays, calls: 0 };
        let policy = TimingPolicy {
            max_warmup_ms: 60,
            ..policy
        };
        let t = time_invocation(&mut falling, &policy, false, None).unwrap();
        assert!(!t.settled, "{} warm-up calls", t.warmup_reps);
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
