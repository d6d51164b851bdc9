//! A kernel job from start to end: the job's progress framing (started,
//! finished with the agent's own time) around its cells, measured in this
//! process when each cell has one invocation and in shuffled rounds of
//! child processes (`rounds`) when it has more; both record through
//! `measure::JobOutput`.

use crate::measure::{measure_invocation, prepare_cell, JobOutput, Refusal, Tally, WeightCache};
use anyhow::Result;
use std::path::Path;
use std::time::Instant;
use wire::kernel_job::JobSpec;
use wire::probe::BoardProbe;
use wire::progress::ProgressEvent;

/// Runs every cell of the job: in this process with one invocation, in
/// shuffled rounds of child processes with more (`crate::rounds`).
pub fn run_job(job: &JobSpec, probe: &BoardProbe, out_dir: &Path) -> Result<Tally> {
    let started = Instant::now();
    let mut out = JobOutput::open(job, probe, out_dir)?;
    out.emit(ProgressEvent::Started {
        total: job.cells.len(),
        bandwidth_gbps: probe.read_bandwidth_gbps,
    });
    // Several builds (A/B) are measured by their own binaries: always in
    // rounds of child processes.
    if job.timing.most_invocations() > 1 || !job.builds.is_empty() {
        crate::rounds::run_rounds(job, &mut out, out_dir)?;
    } else {
        run_in_process(job, &mut out, out_dir)?;
    }
    let tally = std::mem::take(&mut out.tally);
    out.emit(ProgressEvent::Finished {
        ok: tally.ok,
        unsupported: tally.unsupported,
        failed: tally.failed,
        elapsed_seconds: started.elapsed().as_secs_f64(),
    });
    Ok(tally)
}

/// One invocation per cell, in the agent's own process.
fn run_in_process(job: &JobSpec, out: &mut JobOutput, out_dir: &Path) -> Result<()> {
    // Mapped weights are written to an unnamed file beside the rows: the
    // board's own disk, as a model file would be.
    let mut cache = WeightCache::new(out_dir);
    for (index, cell) in job.cells.iter().enumerate() {
        out.emit(ProgressEvent::CellStarted {
            index,
            cell_id: cell.id.clone(),
        });
        let threads = cell.threads.resolve(out.probe.cores);
        let measured = prepare_cell(cell, threads, job, &mut cache, None).and_then(|ready| {
            let mut multiply = crate::slowdown::for_cell(ready.multiply, &cell.id);
            let result = measure_invocation(multiply.as_mut(), job)
                .map_err(|e| Refusal::Failed(e.to_string()))?;
            Ok((ready.prep, result))
        });
        match measured {
            Ok((prep, result)) => {
                out.record_invocation(cell, 0, 0, 0, &result)?;
                out.finish_cell(index, cell, threads, Ok(prep))?;
            }
            Err(refusal) => out.finish_cell(index, cell, threads, Err(refusal))?,
        }
    }
    Ok(())
}
