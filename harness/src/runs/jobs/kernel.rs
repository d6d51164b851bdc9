//! The kernel matrix as a job kind: one job per board (the matrix's cells),
//! run by the agent's `run`; rows in `kernels.csv`, repetitions in
//! `samples.csv`, each invocation's record in `invocations.csv`.

use super::{
    from_spec, merge_rows, rows_in, to_spec, JobError, JobFailure, JobKind, PlannedJob, Tally,
};
use crate::fleet::boards::ResolvedBoard;
use crate::runs::budget::BudgetNeed;
use crate::runs::config::{BenchConfig, MatrixSpec};
use crate::runs::matrix::job_for_board;
use crate::runs::session::{BoardSlot, Session};
use std::collections::HashSet;
use std::path::Path;
use wire::files::{
    read_json, CsvAppender, ResultsError, INVOCATIONS_FILE, KERNEL_ROWS_FILE, PROBE_FILE,
    SAMPLES_FILE,
};
use wire::kernel_job::JobSpec;
use wire::probe::BoardProbe;
use wire::rows::{CellStatus, InvocationRow, KernelRow, SampleRow};

pub struct KernelMatrix {
    name: String,
    spec: MatrixSpec,
    config: BenchConfig,
}

impl KernelMatrix {
    pub fn new(config: &BenchConfig, name: &str) -> Result<Self, JobError> {
        let spec = config.matrix(name)?.clone();
        // Expanding once here makes an impossible matrix fail before any build.
        job_for_board(config, name, "check", "check", false, "check")?;
        Ok(KernelMatrix {
            name: name.to_string(),
            spec,
            config: config.clone(),
        })
    }
}

impl JobKind for KernelMatrix {
    fn kind(&self) -> &'static str {
        "kernel"
    }

    fn matrix(&self) -> &str {
        &self.name
    }

    fn spec(&self) -> serde_json::Value {
        to_spec(&self.spec)
    }

    fn plan(&self, session: &Session, board: &BoardSlot) -> Result<Vec<PlannedJob>, JobError> {
        let mut job = job_for_board(
            &self.config,
            &self.name,
            &session.run_id,
            &board.name,
            board.emulated,
            &session.commit,
        )?;
        // The agent checks each cell against this and the board's available
        // memory, so a shape too large becomes one `unsupported` row.
        if let ResolvedBoard::Remote(remote) = &board.board {
            job.memory_limit_bytes = remote.max_memory_bytes;
            job.runner = remote.runner.clone();
            job.power = remote.power.clone();
        }
        // With a budget, imprecise cells may get up to three times their
        // invocations (the budget bounds the time they take).
        if session.options.budget.is_some()
            && self.spec.max_invocations.is_none()
            && !board.emulated
        {
            job.timing.max_invocations = 3 * job.timing.invocations;
        }
        if !session.options.only_cells.is_empty() {
            job.cells
                .retain(|c| session.options.only_cells.contains(&c.id));
            // `bisect --cell` naming a model test: nothing here to run.
            if job.cells.is_empty() {
                return Ok(Vec::new());
            }
        }
        let agents = measure_builds(&mut job, session, board)?;
        let deadline = self.job_deadline(&job);
        Ok(vec![PlannedJob {
            kind_index: 0,
            name: self.name.clone(),
            subcommand: "run",
            units: job.cells.len(),
            spec: to_spec(&job),
            uploads: Vec::new(),
            memory_need: None,
            disk_bytes: job.disk_need_bytes(),
            outputs: &[KERNEL_ROWS_FILE, SAMPLES_FILE, INVOCATIONS_FILE],
            deadline,
            agents,
        }])
    }

    fn complete(
        &self,
        job: &PlannedJob,
        job_dir: &Path,
        failure: Option<&JobFailure>,
    ) -> Result<Tally, JobError> {
        let spec: JobSpec = from_spec(job)?;
        let rows = complete_rows(&spec, job_dir, failure)?;
        let cells: HashSet<&str> = spec.cells.iter().map(|c| c.id.as_str()).collect();
        let mut tally = Tally::default();
        for row in rows
            .iter()
            .filter(|r| r.run_id == spec.run_id && cells.contains(r.cell_id.as_str()))
        {
            tally.count(row.status);
        }
        let samples: Vec<SampleRow> = rows_in(&job_dir.join(SAMPLES_FILE)).unwrap_or_default();
        tally.measured_seconds = samples
            .iter()
            .filter(|s| s.run_id == spec.run_id && cells.contains(s.cell_id.as_str()))
            .map(|s| s.ns as f64)
            .sum::<f64>()
            / 1e9;
        Ok(tally)
    }

    fn remaining(&self, job: &PlannedJob, job_dir: &Path) -> Result<Option<PlannedJob>, JobError> {
        let mut spec: JobSpec = from_spec(job)?;
        let done = finished_cells(&spec, job_dir)?;
        spec.cells.retain(|c| !done.contains(&c.id));
        if spec.cells.is_empty() {
            return Ok(None);
        }
        Ok(Some(PlannedJob {
            units: spec.cells.len(),
            disk_bytes: spec.disk_need_bytes(),
            deadline: self.job_deadline(&spec),
            spec: to_spec(&spec),
            ..job.clone()
        }))
    }

    fn budget_need(&self, job: &PlannedJob) -> Result<Option<BudgetNeed>, JobError> {
        let spec: JobSpec = from_spec(job)?;
        // Each invocation of a cell times for at least `min_time_ms` after
        // at least the agent's shortest warm-up.
        let per_cell_ms = spec.timing.min_time_ms + MIN_WARMUP_MS;
        Ok(Some(BudgetNeed {
            seconds_per_invocation: spec.cells.len() as f64 * per_cell_ms as f64 / 1000.0,
            invocations: spec.timing.invocations,
            what: format!(
                "kernel matrix {}: {} cells x ({} ms timed + {MIN_WARMUP_MS} ms warm-up)",
                self.name,
                spec.cells.len(),
                spec.timing.min_time_ms
            ),
        }))
    }

    fn fit_budget(
        &self,
        job: &PlannedJob,
        invocations: u32,
        adaptive_seconds: Option<u64>,
    ) -> Result<PlannedJob, JobError> {
        let mut spec: JobSpec = from_spec(job)?;
        if invocations < spec.timing.invocations {
            // Not even the matrix's invocations fit: no adaptive rounds.
            spec.timing.invocations = invocations.max(1);
            spec.timing.max_invocations = 0;
        }
        spec.adaptive_seconds = adaptive_seconds;
        Ok(PlannedJob {
            deadline: self.job_deadline(&spec),
            spec: to_spec(&spec),
            ..job.clone()
        })
    }

    fn merge(
        &self,
        run_dir: &Path,
        run_id: &str,
        boards: &[String],
    ) -> Result<Vec<String>, ResultsError> {
        let mut rejected = merge_rows::<KernelRow>(run_dir, run_id, boards, KERNEL_ROWS_FILE)?;
        rejected.extend(merge_rows::<SampleRow>(
            run_dir,
            run_id,
            boards,
            SAMPLES_FILE,
        )?);
        rejected.extend(merge_rows::<InvocationRow>(
            run_dir,
            run_id,
            boards,
            INVOCATIONS_FILE,
        )?);
        Ok(rejected)
    }
}

/// The agent's shortest warm-up of an invocation (`remote-agent`'s
/// `MIN_WARMUP`).
const MIN_WARMUP_MS: u64 = 20;

impl KernelMatrix {
    /// The job's deadline: the matrix's for its cells and invocations, and
    /// the time its adaptive rounds may take.
    fn job_deadline(&self, spec: &JobSpec) -> std::time::Duration {
        self.spec
            .deadline(spec.cells.len(), spec.timing.invocations)
            + self.adaptive_allowance(spec)
    }

    /// Time a job's adaptive rounds may add to its deadline: its
    /// `adaptive_seconds`, or without a budget, a deadline's worth per
    /// extra invocation.
    fn adaptive_allowance(&self, spec: &JobSpec) -> std::time::Duration {
        let extra = spec
            .timing
            .most_invocations()
            .saturating_sub(spec.timing.invocations);
        if extra == 0 {
            return std::time::Duration::ZERO;
        }
        match spec.adaptive_seconds {
            Some(seconds) => std::time::Duration::from_secs(seconds),
            None => self
                .spec
                .deadline(spec.cells.len(), extra + 1)
                .saturating_sub(self.spec.deadline(spec.cells.len(), 1)),
        }
    }
}

/// Ids of the job's cells that have a row in `job_dir`.
fn finished_cells(job: &JobSpec, job_dir: &Path) -> Result<HashSet<String>, ResultsError> {
    let rows: Vec<KernelRow> = rows_in(&job_dir.join(KERNEL_ROWS_FILE))?;
    Ok(rows
        .into_iter()
        .filter(|r| r.run_id == job.run_id)
        .map(|r| r.cell_id)
        .collect())
}

/// An A/B session (`ab <base> <new>`): every cell once per build, the
/// cell of each build beside the other's (`<cell>@<build>`), each build's
/// agent named in the job so the agent runs its cells with it in the same
/// shuffled rounds. Returns the agents the board needs besides its own.
fn measure_builds(
    job: &mut JobSpec,
    session: &Session,
    board: &BoardSlot,
) -> Result<Vec<crate::builds::build::AgentBuild>, JobError> {
    let (builds, agents) = super::job_builds(session, board)?;
    if builds.is_empty() {
        return Ok(agents);
    }
    job.builds = builds;
    job.cells = std::mem::take(&mut job.cells)
        .into_iter()
        .flat_map(|cell| {
            session
                .under_test
                .iter()
                .map(move |b| cell.clone().for_build(b.name()))
        })
        .collect();
    Ok(agents)
}

/// Adds a `failed` row for each cell the agent did not finish: the cell it
/// died in gets the reason, later ones say they were not reached. Returns
/// every row of the job's file.
pub fn complete_rows(
    job: &JobSpec,
    job_dir: &Path,
    failure: Option<&JobFailure>,
) -> Result<Vec<KernelRow>, ResultsError> {
    let path = job_dir.join(KERNEL_ROWS_FILE);
    let mut rows: Vec<KernelRow> = rows_in(&path)?;
    let done = finished_cells(job, job_dir)?;
    let missing: Vec<_> = job.cells.iter().filter(|c| !done.contains(&c.id)).collect();
    if missing.is_empty() {
        return Ok(rows);
    }
    let probe: Option<BoardProbe> = read_json(&job_dir.join(PROBE_FILE)).ok();
    let cores = probe.as_ref().map(|p| p.cores).unwrap_or(0);
    let agent = probe.map(|p| p.agent).unwrap_or_default();
    let reason = failure.map(|f| f.reason.as_str());
    let died_in = failure.and_then(|f| f.died_in.as_deref());
    let mut appender = CsvAppender::open(&path)?;
    for cell in missing {
        let note = if Some(cell.id.as_str()) == died_in {
            format!(
                "agent died in this cell: {}",
                reason.unwrap_or("unknown reason")
            )
        } else {
            format!(
                "not reached: the board's run ended early ({})",
                reason.unwrap_or("no reason given")
            )
        };
        let row = KernelRow::unmeasured(
            job,
            cell,
            cell.threads.resolve(cores),
            job.build_of(cell).map_or(&agent, |b| &b.agent),
            CellStatus::Failed,
            note,
        );
        appender.append(&row)?;
        rows.push(row);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::files::read_csv;

    #[test]
    fn unfinished_cells_become_failed_rows_and_finished_ones_are_kept() {
        let config = BenchConfig::parse(
            "[matrices.m]\ntypes=[\"f32\",\"q8_0\",\"q4_0\"]\nshapes=[\"llama3.2-1b.attn_kv\"]\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let job = job_for_board(&config, "m", "r", "b", false, "c").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut finished = KernelRow::unmeasured(
            &job,
            &job.cells[0],
            2,
            &Default::default(),
            CellStatus::Ok,
            String::new(),
        );
        finished.median_ns = Some(1.0);
        CsvAppender::open(&dir.path().join(KERNEL_ROWS_FILE))
            .unwrap()
            .append(&finished)
            .unwrap();
        let failure = JobFailure {
            died_in: Some(job.cells[1].id.clone()),
            reason: "killed by SIGKILL".into(),
        };
        let rows = complete_rows(&job, dir.path(), Some(&failure)).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0], finished);
        assert_eq!(rows[1].status, CellStatus::Failed);
        assert!(rows[1].note.contains("died in this cell") && rows[1].note.contains("SIGKILL"));
        assert!(rows[2].note.contains("not reached"));
        // The completed file on disk says the same.
        let on_disk: Vec<KernelRow> = read_csv(&dir.path().join(KERNEL_ROWS_FILE)).unwrap();
        assert_eq!(on_disk, rows);
    }
}
