//! Invocations in shuffled rounds: each cell of a kernel job is measured
//! in `invocations` separate processes, so what differs between processes
//! (memory placement, clocks, a worker's wake-ups) shows up as spread
//! between invocations instead of hiding inside one (Kalibera and Jones).
//!
//! The agent prepares the cells (weights made, quantized and written to
//! staged files once, output error measured once), then runs rounds: in
//! each, one child process of itself (`measure-round`) measures every cell
//! that still needs an invocation, in an order shuffled with the job's
//! `round_seed`, so slow drifts (heat, a neighbour) fall on every cell
//! alike. A child maps each cell's staged weights afresh, as a model load
//! would, and reports each finished invocation on its stdout; this process
//! records it. Staged files live in `<out_dir>/staged/` for the rounds and
//! are deleted after; when they would not all fit on the board's disk, the
//! cells are taken in consecutive groups that fit, each with its own rounds.
//!
//! A job that names several builds (A/B, `cargo xtask ab`) has each cell
//! once per build: a cell is prepared (`prepare-cells`) and measured
//! (`measure-round`) by its build's own binary, so each build quantizes
//! with its own GGML and times its own kernels; in a round, the cells come
//! in the round's shuffled order and each cell's builds back to back, one
//! child process each, the first build turning with the round.

use crate::measure::{measure_invocation, prepare_cell, JobOutput, Refusal, WeightCache};
use crate::multiply::PreparedWeights;
use anyhow::{Context, Result};
use kernels::codebook::CodebookMatrix;
use kernels::lut::LutMatrix;
use kernels::weights::activations;
use kernels::StagedMatrix;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use wire::child::{CellPrep, ChildLine, ChildRequest, InvocationResult};
use wire::kernel_job::{Cell, JobBuild, JobSpec};
use wire::progress::ProgressEvent;
use wire::stats::SeededRng;
use wire::weight_format::WeightFormat;

/// Folder of the staged weight files, inside the job's output folder.
const STAGED_DIR: &str = "staged";

/// The binary that prepares and measures `cell`: its build's (A/B), or
/// this one.
fn agent_of(job: &JobSpec, cell: &Cell) -> Result<PathBuf> {
    agent_path(job.build_of(cell))
}

/// The binary of `build` (an A/B job's; `None`: this one): this binary
/// when it is that build, the job's path for it on this machine, or on a
/// board the folder beside this one named by its hash.
pub fn agent_path(build: Option<&JobBuild>) -> Result<PathBuf> {
    let own = std::env::current_exe().context("finding the agent's own binary")?;
    let Some(build) = build else {
        return Ok(own);
    };
    if build.agent.agent_build == own_hash() {
        return Ok(own);
    }
    if let Some(path) = &build.path {
        return Ok(PathBuf::from(path));
    }
    // Boards keep agents as `agents/<hash>/<binary>`, side by side.
    let name = own.file_name().context("the agent's own file name")?;
    let folder = own
        .parent()
        .and_then(Path::parent)
        .context("the agent's folder has no parent")?;
    Ok(folder.join(&build.agent.agent_build).join(name))
}

fn own_hash() -> String {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(crate::sysinfo::agent_build).clone()
}

/// Checks a build's binary once before it measures anything: it must be
/// there and be the build the job names (a board's copy replaced or cut
/// short would measure other code under that build's name).
pub fn check_agent(build: &JobBuild) -> Result<PathBuf> {
    let path = agent_path(Some(build))?;
    let hash = wire::build_id::content_hash(&path).with_context(|| {
        format!(
            "build `{}`: its agent {} cannot be read",
            build.name,
            path.display()
        )
    })?;
    anyhow::ensure!(
        hash == build.agent.agent_build,
        "build `{}`: {} is agent {hash}, not {} as the job says",
        build.name,
        path.display(),
        build.agent.agent_build
    );
    Ok(path)
}

/// Each build that measures a cell of the job, checked (`check_agent`).
fn check_agents(job: &JobSpec) -> Result<()> {
    for build in &job.builds {
        if job
            .cells
            .iter()
            .any(|c| c.build.as_ref() == Some(&build.name))
        {
            check_agent(build)?;
        }
    }
    Ok(())
}

/// The staged file of a cell's weights: one per shape and format (cells of
/// other batches and thread counts share it).
pub fn staged_path(out_dir: &Path, cell: &Cell) -> PathBuf {
    let build = cell
        .build
        .as_ref()
        .map(|b| format!("@{b}"))
        .unwrap_or_default();
    let name: String = format!("{}-{}{build}", cell.shape.name, cell.ty)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    out_dir.join(STAGED_DIR).join(format!("{name}.bin"))
}

/// Runs the job's cells in rounds of child processes (see the module).
pub fn run_rounds(job: &JobSpec, out: &mut JobOutput, out_dir: &Path) -> Result<()> {
    let staged_dir = out_dir.join(STAGED_DIR);
    std::fs::create_dir_all(&staged_dir)
        .with_context(|| format!("creating {}", staged_dir.display()))?;
    wire::files::write_json(&out_dir.join(JOB_COPY), job)?;
    check_agents(job)?;
    let budget = crate::sysinfo::free_disk_bytes(out_dir)
        .map(|free| free / 2)
        .unwrap_or(u64::MAX);
    let mut round = 0u32;
    for group in groups_within(&job.cells, budget) {
        let prepared = prepare_group(job, out, out_dir, &group)?;
        round = measure_group(job, out, out_dir, &prepared, round)?;
        for &index in &group {
            let _ = std::fs::remove_file(staged_path(out_dir, &job.cells[index]));
        }
    }
    let _ = std::fs::remove_dir(&staged_dir);
    let _ = std::fs::remove_file(out_dir.join(JOB_COPY));
    Ok(())
}

/// Consecutive groups of cell indices whose distinct staged files together
/// take at most `budget` bytes (a group has at least one cell).
fn groups_within(cells: &[Cell], budget: u64) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut files: Vec<(&str, WeightFormat, Option<&String>)> = Vec::new();
    let mut bytes = 0u64;
    for (index, cell) in cells.iter().enumerate() {
        let file = (cell.shape.name.as_str(), cell.ty, cell.build.as_ref());
        if !files.contains(&file) {
            let need = cell.weight_bytes();
            if !current.is_empty() && bytes + need > budget {
                groups.push(std::mem::take(&mut current));
                files.clear();
                bytes = 0;
            }
            files.push(file);
            bytes += need;
        }
        current.push(index);
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
}

/// Prepares each cell of the group that still needs invocations; cells that
/// cannot run get their row now. Returns the prepared cells' figures.
fn prepare_group(
    job: &JobSpec,
    out: &mut JobOutput,
    out_dir: &Path,
    group: &[usize],
) -> Result<HashMap<usize, CellPrep>> {
    let own = std::env::current_exe().context("finding the agent's own binary")?;
    let mut cache = WeightCache::new(out_dir);
    let mut prepared = HashMap::new();
    let mut elsewhere: Vec<(PathBuf, Vec<usize>)> = Vec::new();
    for &index in group {
        let cell = &job.cells[index];
        let agent = agent_of(job, cell)?;
        if agent != own {
            match elsewhere.iter_mut().find(|(a, _)| *a == agent) {
                Some((_, cells)) => cells.push(index),
                None => elsewhere.push((agent, vec![index])),
            }
            continue;
        }
        out.emit(ProgressEvent::CellStarted {
            index,
            cell_id: cell.id.clone(),
        });
        let threads = cell.threads.resolve(out.probe.cores);
        let path = staged_path(out_dir, cell);
        match prepare_cell(cell, threads, job, &mut cache, Some(&path)) {
            Ok(ready) => {
                prepared.insert(index, ready.prep);
            }
            Err(refusal) => out.finish_cell(index, cell, threads, Err(refusal))?,
        }
    }
    drop(cache);
    // Another build's cells: quantized, staged and judged by its binary.
    for (agent, cells) in elsewhere {
        let mut reported = std::collections::HashSet::new();
        let outcome = run_child(
            Child {
                runner: &job.runner,
                exe: &agent,
                subcommand: "prepare-cells",
            },
            out_dir,
            out.probe.cores,
            &cells,
            0,
            |line| {
                match line {
                    ChildLine::Started { index } => out.emit(ProgressEvent::CellStarted {
                        index,
                        cell_id: job.cells[index].id.clone(),
                    }),
                    ChildLine::Prepared { index, prep } => {
                        reported.insert(index);
                        prepared.insert(index, prep);
                    }
                    ChildLine::Refused {
                        index,
                        unsupported,
                        reason,
                    } => {
                        reported.insert(index);
                        let cell = &job.cells[index];
                        let threads = cell.threads.resolve(out.probe.cores);
                        let refusal = if unsupported {
                            Refusal::Unsupported(reason)
                        } else {
                            Refusal::Failed(reason)
                        };
                        out.finish_cell(index, cell, threads, Err(refusal))?;
                    }
                    ChildLine::Measured { .. } | ChildLine::Failed { .. } => {}
                }
                Ok(())
            },
        )?;
        // A child that died leaves its remaining cells without a row.
        for index in cells.into_iter().filter(|i| !reported.contains(i)) {
            let cell = &job.cells[index];
            let threads = cell.threads.resolve(out.probe.cores);
            let reason = match &outcome.died_in {
                Some((at, why)) if *at == index => {
                    format!("preparing it, {} died: {why}", agent.display())
                }
                Some((_, why)) => format!("not prepared: {} died earlier ({why})", agent.display()),
                None => format!("{} did not prepare it", agent.display()),
            };
            out.finish_cell(index, cell, threads, Err(Refusal::Failed(reason)))?;
        }
    }
    share_identical_staged_files(job, out_dir, group, &prepared);
    Ok(prepared)
}

/// Where the builds of an A/B job staged identical bytes for a cell (their
/// quantizers agree), every build maps one file: the first build's, the
/// others' made hard links to it. A file's page cache keeps its physical
/// pages for the whole session, and two copies of the same weights sat in
/// different ones: an A/A (one binary under two names) measured an F32
/// cell 27% faster on the copy written second (interval +-6%), a bias no
/// number of invocations averages out. Different bytes (a quantizer under
/// test) keep their own files.
fn share_identical_staged_files(
    job: &JobSpec,
    out_dir: &Path,
    group: &[usize],
    prepared: &HashMap<usize, CellPrep>,
) {
    if job.builds.is_empty() {
        return;
    }
    let mut first_of: HashMap<(String, String), (PathBuf, String)> = HashMap::new();
    for &index in group.iter().filter(|i| prepared.contains_key(i)) {
        let cell = &job.cells[index];
        let path = staged_path(out_dir, cell);
        let Ok(hash) = wire::build_id::content_hash(&path) else {
            continue;
        };
        match first_of.entry((cell.shape.name.clone(), cell.ty.to_string())) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert((path, hash));
            }
            std::collections::hash_map::Entry::Occupied(first) => {
                let (first_path, first_hash) = first.get();
                if *first_hash != hash || *first_path == path {
                    continue;
                }
                // Linked under a temporary name, then renamed over: the
                // cell always has a complete file.
                let temp = path.with_extension("link");
                let _ = std::fs::remove_file(&temp);
                if std::fs::hard_link(first_path, &temp).is_ok() {
                    let _ = std::fs::rename(&temp, &path);
                }
            }
        }
    }
}

/// A child's line to its parent, on stdout, flushed at once.
fn say(line: &ChildLine) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", serde_json::to_string(line)?)?;
    stdout.flush()?;
    Ok(())
}

/// The child `prepare-cells` of a build's binary: prepares each listed
/// cell (weights made with this build's quantizer, staged, output error
/// measured) and reports each on stdout.
pub fn prepare_cells(job: &JobSpec, out_dir: &Path, cells: &[usize], cores: usize) -> Result<()> {
    let mut cache = WeightCache::new(out_dir);
    for &index in cells {
        let cell = job
            .cells
            .get(index)
            .with_context(|| format!("the job has no cell {index}"))?;
        say(&ChildLine::Started { index })?;
        let path = staged_path(out_dir, cell);
        let line = match prepare_cell(
            cell,
            cell.threads.resolve(cores),
            job,
            &mut cache,
            Some(&path),
        ) {
            Ok(ready) => ChildLine::Prepared {
                index,
                prep: ready.prep,
            },
            Err(Refusal::Unsupported(reason)) => ChildLine::Refused {
                index,
                unsupported: true,
                reason,
            },
            Err(Refusal::Failed(reason)) => ChildLine::Refused {
                index,
                unsupported: false,
                reason,
            },
        };
        say(&line)?;
    }
    Ok(())
}

/// Rounds over the prepared cells until each has its invocations (and,
/// with adaptive repetition, until its time is known to the policy's
/// precision, its most invocations are spent, or the job's
/// `adaptive_seconds` have passed); returns the next round's number.
fn measure_group(
    job: &JobSpec,
    out: &mut JobOutput,
    out_dir: &Path,
    prepared: &HashMap<usize, CellPrep>,
    mut round: u32,
) -> Result<u32> {
    let wanted = job.timing.invocations;
    let started = std::time::Instant::now();
    let adding_allowed = || {
        job.adaptive_seconds
            .is_none_or(|s| started.elapsed().as_secs() < s)
    };
    let mut pending: Vec<usize> = prepared.keys().copied().collect();
    pending.sort_unstable();
    while !pending.is_empty() {
        // Cells with enough invocations (a previous agent's, or this
        // one's) get their row; the rest measure another round.
        let open = adding_allowed();
        for &index in &pending {
            let cell = &job.cells[index];
            if !out.is_finished(&cell.id) && sides_enough(job, out, &pending, index, open) {
                let threads = cell.threads.resolve(out.probe.cores);
                out.finish_cell(index, cell, threads, Ok(prepared[&index]))?;
            }
        }
        pending.retain(|&i| !out.is_finished(&job.cells[i].id));
        if pending.is_empty() {
            break;
        }
        let mut order = pending.clone();
        let mut rng =
            SeededRng::new(job.round_seed ^ u64::from(round).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        rng.shuffle(&mut order);
        let children = children_of_round(job, &order, round)?;
        for (agent, cells) in children {
            let outcome = run_child(
                Child {
                    runner: &job.runner,
                    exe: &agent,
                    subcommand: "measure-round",
                },
                out_dir,
                out.probe.cores,
                &cells,
                round,
                |line| match line {
                    ChildLine::Started { index } => {
                        out.emit(ProgressEvent::CellStarted {
                            index,
                            cell_id: job.cells[index].id.clone(),
                        });
                        Ok(())
                    }
                    ChildLine::Measured { index, result } => {
                        let cell = &job.cells[index];
                        let invocation = out.invocations_done(&cell.id);
                        let position = order.iter().position(|&i| i == index).unwrap_or(0) as u32;
                        out.record_invocation(cell, invocation, round, position, &result)?;
                        out.emit(ProgressEvent::InvocationFinished {
                            cell_id: cell.id.clone(),
                            done: invocation + 1,
                            invocations: wanted.max(invocation + 1),
                            round,
                        });
                        Ok(())
                    }
                    ChildLine::Failed { index, reason } => {
                        let cell = &job.cells[index];
                        let threads = cell.threads.resolve(out.probe.cores);
                        out.finish_cell(index, cell, threads, Err(Refusal::Failed(reason)))?;
                        Ok(())
                    }
                    ChildLine::Prepared { .. } | ChildLine::Refused { .. } => Ok(()),
                },
            )?;
            if let Some((index, reason)) = outcome.died_in {
                let cell = &job.cells[index];
                if !out.is_finished(&cell.id) {
                    let threads = cell.threads.resolve(out.probe.cores);
                    let note = format!(
                        "invocation {} died in this cell: {reason}",
                        out.invocations_done(&cell.id) + 1
                    );
                    out.finish_cell(index, cell, threads, Err(Refusal::Failed(note)))?;
                }
            }
        }
        round += 1;
    }
    Ok(round)
}

/// Whether cell `index` has invocations enough and, in an A/B job, so has
/// every other build's side of it still being measured (not finished): a pair's sides
/// stop together, so each build's invocations come from the same rounds.
/// (Left to stop on its own, a precise side stopped at 5 invocations while
/// the other went on alone to 15 in later rounds, meeting neighbours the
/// first never met: an A/B on a 2-core VM flagged a Q4_0 cell no build
/// changed +37% [+20%, +58%].)
fn sides_enough(
    job: &JobSpec,
    out: &JobOutput,
    pending: &[usize],
    index: usize,
    open: bool,
) -> bool {
    let id = &job.cells[index].id;
    if job.builds.is_empty() {
        return enough(job, out, id, open);
    }
    let (cell, _) = wire::kernel_job::split_build(id);
    pending
        .iter()
        .map(|&i| job.cells[i].id.as_str())
        .filter(|other| wire::kernel_job::split_build(other).0 == cell)
        // A side finished a moment ago in this check was enough.
        .filter(|other| !out.is_finished(other))
        .all(|other| enough(job, out, other, open))
}

/// Whether a cell has invocations enough: the policy's `invocations`, and
/// with adaptive repetition either its most invocations, its precision,
/// or (`open` false) no time left for another round.
fn enough(job: &JobSpec, out: &JobOutput, cell_id: &str, open: bool) -> bool {
    let done = out.invocations_done(cell_id);
    let timing = &job.timing;
    if done < timing.invocations {
        return false;
    }
    if done >= timing.most_invocations() || !open {
        return true;
    }
    out.precision(cell_id)
        .is_some_and(|p| p <= timing.precision)
}

/// The child processes of a round, in order, each with its cells. One
/// build: one child measuring the round's order. Several builds (A/B): a
/// child per cell and build, the builds of one cell back to back (a paired
/// measurement: whatever drifts between cells falls on both), which build
/// goes first turning with the round, so neither side is always first.
/// (With one child per build and round instead, two names of one binary
/// measured an F32 cell 12% apart, interval +-1%, on a 2-core VM.)
fn children_of_round(
    job: &JobSpec,
    order: &[usize],
    round: u32,
) -> Result<Vec<(PathBuf, Vec<usize>)>> {
    if job.builds.is_empty() {
        let own = std::env::current_exe().context("finding the agent's own binary")?;
        return Ok(vec![(own, order.to_vec())]);
    }
    let mut pairs: Vec<(&str, Vec<usize>)> = Vec::new();
    for &index in order {
        let (cell, _) = wire::kernel_job::split_build(&job.cells[index].id);
        match pairs.iter_mut().find(|(c, _)| *c == cell) {
            Some((_, indices)) => indices.push(index),
            None => pairs.push((cell, vec![index])),
        }
    }
    let mut children = Vec::new();
    for (pair, (_, mut indices)) in pairs.into_iter().enumerate() {
        // Builds in the job's order, turned by the round and the pair.
        indices.sort_by_key(|&i| {
            job.builds
                .iter()
                .position(|b| Some(&b.name) == job.cells[i].build.as_ref())
        });
        let turn = (round as usize + pair) % indices.len();
        indices.rotate_left(turn);
        for index in indices {
            children.push((agent_of(job, &job.cells[index])?, vec![index]));
        }
    }
    Ok(children)
}

struct ChildOutcome {
    /// The cell a child that did not exit cleanly was measuring, and why.
    died_in: Option<(usize, String)>,
}

/// Which binary a child runs, with which subcommand, under which runner.
struct Child<'a> {
    runner: &'a [String],
    exe: &'a Path,
    subcommand: &'a str,
}

/// Starts `<agent> <subcommand>` (`measure-round`, `prepare-cells`) on the
/// job's cells in `order` and hands each of its lines to `on_line`.
fn run_child(
    child: Child,
    out_dir: &Path,
    cores: usize,
    order: &[usize],
    round: u32,
    mut on_line: impl FnMut(ChildLine) -> Result<()>,
) -> Result<ChildOutcome> {
    let Child {
        runner,
        exe,
        subcommand,
    } = child;
    let request = ChildRequest {
        job: out_dir.join(JOB_COPY),
        out_dir: out_dir.to_path_buf(),
        round,
        cells: order.to_vec(),
        cores,
    };
    let mut child = crate::child::command(runner, exe)
        .arg(subcommand)
        .args(request.args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting an invocation ({})", exe.display()))?;
    let mut current: Option<usize> = None;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let Ok(parsed) = serde_json::from_str::<ChildLine>(&line) else {
                continue;
            };
            current = match &parsed {
                ChildLine::Started { index } => Some(*index),
                _ => None,
            };
            on_line(parsed)?;
        }
    }
    let status = child.wait().context("waiting for an invocation")?;
    let died_in = if status.success() {
        None
    } else {
        current.map(|index| (index, describe_exit(&status)))
    };
    Ok(ChildOutcome { died_in })
}

pub(crate) fn describe_exit(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (_, Some(9)) => "killed by SIGKILL (out of memory?)".to_string(),
        (_, Some(signal)) => format!("killed by signal {signal}"),
        (Some(code), _) => format!("exited with status {code}"),
        _ => "ended".to_string(),
    }
}

/// The job spec as the children read it, written by the agent beside its rows.
pub const JOB_COPY: &str = "job-rounds.json";

/// The child: measures one invocation of each listed cell, in order, from
/// the staged files, and reports each on stdout.
pub fn measure_round(job: &JobSpec, out_dir: &Path, cells: &[usize], cores: usize) -> Result<()> {
    for &index in cells {
        let cell = job
            .cells
            .get(index)
            .with_context(|| format!("the job has no cell {index}"))?;
        say(&ChildLine::Started { index })?;
        match measure_staged(job, out_dir, cell, cell.threads.resolve(cores)) {
            Ok(result) => say(&ChildLine::Measured {
                index,
                result: Box::new(result),
            })?,
            Err(reason) => say(&ChildLine::Failed { index, reason })?,
        }
    }
    Ok(())
}

/// One invocation of a cell whose weights the parent staged.
fn measure_staged(
    job: &JobSpec,
    out_dir: &Path,
    cell: &Cell,
    threads: usize,
) -> Result<InvocationResult, String> {
    let path = staged_path(out_dir, cell);
    let (m, k, n) = (cell.shape.rows, cell.shape.cols, cell.batch_tokens);
    let weights = match cell.ty {
        WeightFormat::Ggml { ty, .. } => PreparedWeights::Ggml(
            StagedMatrix::open(&path, ty, m, k, job.load_mode).map_err(|e| e.to_string())?,
        ),
        WeightFormat::Codebook(_) => PreparedWeights::Codebook(Box::new(
            CodebookMatrix::read_file(&path).map_err(|e| e.to_string())?,
        )),
        WeightFormat::Lut(_) => PreparedWeights::Lut(Box::new(
            LutMatrix::read_file(&path).map_err(|e| e.to_string())?,
        )),
    };
    let x = activations(job.distribution, n, k, job.seed);
    let multiply = weights
        .multiply(&x, n, threads, job.repack)
        .map_err(|e| e.to_string())?;
    let mut multiply = crate::slowdown::for_cell(multiply, &cell.id);
    measure_invocation(multiply.as_mut(), job).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::ggml_type::GgmlType;
    use wire::kernel_job::{Shape, ThreadCount};

    #[test]
    fn groups_keep_each_within_the_disk_budget_and_shapes_together() {
        let shape = |name: &str| Shape {
            name: name.into(),
            rows: 1024,
            cols: 1024,
        };
        let mut cells = Vec::new();
        for s in ["a", "b", "c"] {
            for ty in [GgmlType::F32, GgmlType::Q8_0] {
                for t in [1, 2] {
                    cells.push(Cell::new(ty, shape(s), 1, ThreadCount::Fixed(t)));
                }
            }
        }
        // Everything fits: one group, the rounds span the whole job.
        assert_eq!(
            groups_within(&cells, u64::MAX),
            vec![(0..12).collect::<Vec<_>>()]
        );
        // Room for one shape's two files at a time.
        let per_shape = cells[0].weight_bytes() + cells[2].weight_bytes();
        let groups = groups_within(&cells, per_shape);
        assert_eq!(groups.len(), 3, "{groups:?}");
        assert!(groups.iter().all(|g| g.len() == 4));
        // Less than one file: still one cell's file per group.
        assert_eq!(groups_within(&cells, 1).len(), 6);
    }
}
