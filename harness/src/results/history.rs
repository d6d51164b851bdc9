//! The history index: one SQLite file (`results/history.sqlite`) listing
//! every run with its rows and repetitions, for finding runs by commit,
//! trend plots and llama.cpp's `compare-llama-bench.py` (table
//! `llama_bench`, llama-bench's own schema). Run directories stay the
//! source of truth: the index is updated from them after every run and by
//! `cargo xtask history`, rebuilt whole when it is missing, corrupt or of
//! another schema, and deleting it loses nothing.

use crate::results::run_dir::{list_runs, BoardState, RunData, RunDirError};
use rusqlite::{params, Connection};
use std::path::{Path, PathBuf};
use thiserror::Error;
use wire::rows::{CellKey, CellStatus};

pub const HISTORY_FILE: &str = "history.sqlite";
/// Bumped when the tables change; an index of another version is rebuilt.
const SCHEMA_VERSION: i32 = 5;

#[derive(Debug, Error)]
pub enum HistoryError {
    #[error("history index {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no run `{reference}` in {root} (a run directory, `latest`, `previous`, or a commit prefix of a run in the history; {known} runs known)")]
    UnknownRun {
        reference: String,
        root: PathBuf,
        known: usize,
    },
}

/// llama-bench's SQL fields, in its order, as llama.cpp's
/// `scripts/compare-llama-bench.py` (the copy in llama-cpp-python 0.3.36)
/// declares them.
pub const LLAMA_BENCH_FIELDS: [(&str, &str); 38] = [
    ("build_commit", "TEXT"),
    ("build_number", "INTEGER"),
    ("cpu_info", "TEXT"),
    ("gpu_info", "TEXT"),
    ("backends", "TEXT"),
    ("model_filename", "TEXT"),
    ("model_type", "TEXT"),
    ("model_size", "INTEGER"),
    ("model_n_params", "INTEGER"),
    ("n_batch", "INTEGER"),
    ("n_ubatch", "INTEGER"),
    ("n_threads", "INTEGER"),
    ("cpu_mask", "TEXT"),
    ("cpu_strict", "INTEGER"),
    ("poll", "INTEGER"),
    ("type_k", "TEXT"),
    ("type_v", "TEXT"),
    ("n_gpu_layers", "INTEGER"),
    ("split_mode", "TEXT"),
    ("main_gpu", "INTEGER"),
    ("no_kv_offload", "INTEGER"),
    ("flash_attn", "INTEGER"),
    ("tensor_split", "TEXT"),
    ("tensor_buft_overrides", "TEXT"),
    ("load_mode", "TEXT"),
    ("embeddings", "INTEGER"),
    ("no_op_offload", "INTEGER"),
    ("n_prompt", "INTEGER"),
    ("n_gen", "INTEGER"),
    ("n_depth", "INTEGER"),
    ("test_time", "TEXT"),
    ("avg_ns", "INTEGER"),
    ("stddev_ns", "INTEGER"),
    ("avg_ts", "REAL"),
    ("stddev_ts", "REAL"),
    ("n_cpu_moe", "INTEGER"),
    ("fit_target", "INTEGER"),
    ("fit_min_ctx", "INTEGER"),
];

/// A run as the index lists it.
#[derive(Debug, Clone)]
pub struct IndexedRun {
    pub run_id: String,
    pub dir: PathBuf,
    pub started_at: String,
    pub git_commit: String,
    /// Board names, comma-separated, in name order.
    pub boards: String,
    /// The matrices and target it ran (a series of comparable runs).
    pub matrix: String,
    pub target: String,
}

/// One point of a trend: a cell's median in one run.
#[derive(Debug, Clone)]
pub struct TrendPoint {
    pub run_id: String,
    pub started_at: String,
    pub git_commit: String,
    /// Geometric mean of the invocations' medians.
    pub median_ns: f64,
    /// Every repetition.
    pub samples: Vec<f64>,
    /// Repetitions by invocation.
    pub invocations: Vec<Vec<f64>>,
}

pub struct History {
    conn: Connection,
    path: PathBuf,
    root: PathBuf,
}

/// What an update did.
#[derive(Debug, Default, Clone, Copy)]
pub struct UpdateReport {
    pub added: usize,
    pub removed: usize,
    pub total: usize,
    /// True when the index was missing, corrupt or outdated and was rebuilt.
    pub rebuilt: bool,
}

impl History {
    /// Opens the index of `results_root` and brings it up to date with the
    /// run directories; a missing, unreadable or outdated index is rebuilt.
    pub fn open(results_root: &Path) -> Result<(History, UpdateReport), HistoryError> {
        let path = results_root.join(HISTORY_FILE);
        std::fs::create_dir_all(results_root).map_err(|source| HistoryError::Io {
            path: results_root.to_path_buf(),
            source,
        })?;
        let mut rebuilt = !path.exists();
        let conn = match Self::open_trusted(&path) {
            Some(conn) => conn,
            None => {
                rebuilt = true;
                for suffix in ["", "-journal", "-wal", "-shm"] {
                    let mut p = path.as_os_str().to_owned();
                    p.push(suffix);
                    let _ = std::fs::remove_file(PathBuf::from(p));
                }
                let conn = Connection::open(&path).map_err(|source| HistoryError::Sqlite {
                    path: path.clone(),
                    source,
                })?;
                create_schema(&conn).map_err(|source| HistoryError::Sqlite {
                    path: path.clone(),
                    source,
                })?;
                conn
            }
        };
        let mut history = History {
            conn,
            path,
            root: results_root.to_path_buf(),
        };
        let mut report = history.update()?;
        report.rebuilt = rebuilt;
        Ok((history, report))
    }

    /// The index at `path` when it opens, passes SQLite's check and has
    /// this schema version; `None` means "rebuild it".
    fn open_trusted(path: &Path) -> Option<Connection> {
        if !path.exists() {
            return None;
        }
        let conn = Connection::open(path).ok()?;
        let version: i32 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .ok()?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .ok()?;
        (version == SCHEMA_VERSION && check == "ok").then_some(conn)
    }

    fn sqlite_err(&self) -> impl Fn(rusqlite::Error) -> HistoryError + '_ {
        move |source| HistoryError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Adds runs that are new on disk (or whose manifest changed since
    /// they were indexed) and drops runs whose directory is gone.
    pub fn update(&mut self) -> Result<UpdateReport, HistoryError> {
        let on_disk = list_runs(&self.root);
        let mut report = UpdateReport::default();
        let known: Vec<(String, i64)> = {
            let mut stmt = self
                .conn
                .prepare("SELECT run_id, manifest_mtime FROM runs")
                .map_err(self.sqlite_err())?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(self.sqlite_err())?;
            rows.collect::<Result<_, _>>().map_err(self.sqlite_err())?
        };
        let path = self.path.clone();
        let err = |source| HistoryError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        for (run_id, _) in &known {
            if !on_disk.iter().any(|d| {
                d.file_name()
                    .is_some_and(|n| n.to_string_lossy() == *run_id)
            }) {
                delete_run(&tx, run_id).map_err(err)?;
                report.removed += 1;
            }
        }
        for dir in &on_disk {
            let run_id = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mtime = manifest_mtime(dir);
            if known.iter().any(|(id, m)| *id == run_id && *m == mtime) {
                continue;
            }
            // A directory without rows (a run that failed before any board
            // reported) is not a run to compare or plot.
            let run = match RunData::load(dir) {
                Ok(run) => run,
                Err(RunDirError::NotARunDir(_)) => continue,
                Err(e) => {
                    eprintln!("history: skipping {}: {e}", dir.display());
                    continue;
                }
            };
            delete_run(&tx, &run_id).map_err(err)?;
            ingest(&tx, &run_id, dir, &run, mtime).map_err(err)?;
            report.added += 1;
        }
        tx.commit().map_err(err)?;
        report.total = self.runs()?.len();
        Ok(report)
    }

    /// Every indexed run, oldest first.
    pub fn runs(&self) -> Result<Vec<IndexedRun>, HistoryError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT run_id, dir, started_at, git_commit, boards, matrix, target FROM runs ORDER BY started_at, run_id",
            )
            .map_err(self.sqlite_err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok(IndexedRun {
                    run_id: r.get(0)?,
                    dir: PathBuf::from(r.get::<_, String>(1)?),
                    started_at: r.get(2)?,
                    git_commit: r.get(3)?,
                    boards: r.get(4)?,
                    matrix: r.get(5)?,
                    target: r.get(6)?,
                })
            })
            .map_err(self.sqlite_err())?;
        rows.collect::<Result<_, _>>().map_err(self.sqlite_err())
    }

    /// (run id, board, the board as it was) of every indexed run: runs
    /// whose states are the same share history noise floors.
    pub fn board_states(&self) -> Result<Vec<(String, String, BoardState)>, HistoryError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT run_id, board, agent_build, cpu_model, kernel, governor, cpu_max_freq_mhz FROM board_states",
            )
            .map_err(self.sqlite_err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    BoardState {
                        agent_build: r.get(2)?,
                        cpu_model: r.get(3)?,
                        kernel: r.get(4)?,
                        governor: r.get(5)?,
                        cpu_max_freq_mhz: r.get(6)?,
                    },
                ))
            })
            .map_err(self.sqlite_err())?;
        rows.collect::<Result<_, _>>().map_err(self.sqlite_err())
    }

    /// A run directory from a reference: a path, `latest`, `previous`, or
    /// the prefix of a commit (the latest run of that commit).
    pub fn resolve(&self, reference: &str) -> Result<PathBuf, HistoryError> {
        let as_path = Path::new(reference);
        if as_path.is_dir() {
            return Ok(as_path.to_path_buf());
        }
        let runs = self.runs()?;
        let found = match reference {
            "latest" => runs.last(),
            "previous" => runs.len().checked_sub(2).and_then(|i| runs.get(i)),
            prefix if prefix.len() >= 4 && prefix.chars().all(|c| c.is_ascii_hexdigit()) => {
                runs.iter().rev().find(|r| r.git_commit.starts_with(prefix))
            }
            _ => None,
        };
        found
            .map(|r| r.dir.clone())
            .ok_or(HistoryError::UnknownRun {
                reference: reference.to_string(),
                root: self.root.clone(),
                known: runs.len(),
            })
    }

    /// The latest run before `run_id` measured on the same boards.
    pub fn previous_of_same_boards(
        &self,
        run_id: &str,
    ) -> Result<Option<IndexedRun>, HistoryError> {
        let runs = self.runs()?;
        let Some(at) = runs.iter().position(|r| r.run_id == run_id) else {
            return Ok(None);
        };
        let boards = &runs[at].boards;
        Ok(runs[..at]
            .iter()
            .rev()
            .find(|r| &r.boards == boards)
            .cloned())
    }

    /// The cells measured on `board` in the last run that has it: (kind, cell).
    pub fn cells(&self, board: &str) -> Result<Vec<(String, String)>, HistoryError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT DISTINCT 'kernel', cell_id FROM kernel_cells WHERE board = ?1 AND status = 'ok'
                 UNION SELECT DISTINCT 'model', cell_id FROM model_cells WHERE board = ?1 AND status = 'ok'
                 ORDER BY 1, 2",
            )
            .map_err(self.sqlite_err())?;
        let rows = stmt
            .query_map([board], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.sqlite_err())?;
        rows.collect::<Result<_, _>>().map_err(self.sqlite_err())
    }

    /// Board names in the index.
    pub fn boards(&self) -> Result<Vec<String>, HistoryError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT DISTINCT board FROM kernel_cells UNION SELECT DISTINCT board FROM model_cells ORDER BY 1",
            )
            .map_err(self.sqlite_err())?;
        let rows = stmt
            .query_map([], |r| r.get(0))
            .map_err(self.sqlite_err())?;
        rows.collect::<Result<_, _>>().map_err(self.sqlite_err())
    }

    /// One cell's time (the geometric mean of its invocations' medians)
    /// and repetitions in every run that measured it under the same
    /// settings (`CellKey`), oldest first.
    pub fn trend(&self, key: &CellKey) -> Result<Vec<TrendPoint>, HistoryError> {
        let sql = if key.kind == "model" {
            "SELECT c.run_id, r.started_at, r.git_commit, c.avg_ns FROM model_cells c JOIN runs r ON r.run_id = c.run_id
             WHERE c.board = ?1 AND c.cell_id = ?2 AND c.settings = ?3 AND c.status = 'ok' AND c.avg_ns IS NOT NULL
             ORDER BY r.started_at, r.run_id"
        } else {
            "SELECT c.run_id, r.started_at, r.git_commit, c.median_ns FROM kernel_cells c JOIN runs r ON r.run_id = c.run_id
             WHERE c.board = ?1 AND c.cell_id = ?2 AND c.settings = ?3 AND c.status = 'ok' AND c.median_ns IS NOT NULL
             ORDER BY r.started_at, r.run_id"
        };
        let mut stmt = self.conn.prepare(sql).map_err(self.sqlite_err())?;
        let points: Vec<TrendPoint> = stmt
            .query_map(params![key.board, key.cell_id, key.settings], |r| {
                Ok(TrendPoint {
                    run_id: r.get(0)?,
                    started_at: r.get(1)?,
                    git_commit: r.get(2)?,
                    median_ns: r.get(3)?,
                    samples: Vec::new(),
                    invocations: Vec::new(),
                })
            })
            .map_err(self.sqlite_err())?
            .collect::<Result<_, _>>()
            .map_err(self.sqlite_err())?;
        let mut samples_stmt = self
            .conn
            .prepare(
                "SELECT invocation, ns FROM samples WHERE run_id = ?1 AND board = ?2 AND cell_id = ?3",
            )
            .map_err(self.sqlite_err())?;
        let mut out = Vec::with_capacity(points.len());
        for mut p in points {
            let mut by_invocation: std::collections::BTreeMap<i64, Vec<f64>> = Default::default();
            let rows = samples_stmt
                .query_map(params![p.run_id, key.board, key.cell_id], |r| {
                    Ok((
                        r.get::<_, Option<i64>>(0)?.unwrap_or(0),
                        r.get::<_, f64>(1)?,
                    ))
                })
                .map_err(self.sqlite_err())?;
            for row in rows {
                let (invocation, ns) = row.map_err(self.sqlite_err())?;
                by_invocation.entry(invocation).or_default().push(ns);
            }
            p.invocations = by_invocation.into_values().collect();
            p.samples = p.invocations.iter().flatten().copied().collect();
            if let Some(time) =
                wire::stats::geometric_mean(&wire::stats::invocation_medians(&p.invocations))
            {
                p.median_ns = time;
            }
            out.push(p);
        }
        Ok(out)
    }

    /// Every cell's time (kernel: geometric mean of invocation medians;
    /// model: mean) in the last `max_runs` runs that started before
    /// `before` (RFC 3339) on `board` with the board as `state` says (same
    /// agent build, CPU, kernel, governor, maximum clock), newest first.
    /// Real boards only; disturbed kernel cells are left out.
    pub fn same_state_times(
        &self,
        board: &str,
        state: &BoardState,
        before: &str,
        max_runs: usize,
    ) -> Result<Vec<(String, CellKey, f64)>, HistoryError> {
        let mut runs_stmt = self
            .conn
            .prepare(
                "SELECT s.run_id FROM board_states s JOIN runs r ON r.run_id = s.run_id
                 WHERE s.board = ?1 AND s.agent_build = ?2 AND s.cpu_model = ?3 AND s.kernel = ?4
                   AND s.governor IS ?5 AND s.cpu_max_freq_mhz IS ?6 AND r.started_at < ?7
                 ORDER BY r.started_at DESC, r.run_id DESC LIMIT ?8",
            )
            .map_err(self.sqlite_err())?;
        let run_ids: Vec<String> = runs_stmt
            .query_map(
                params![
                    board,
                    state.agent_build,
                    state.cpu_model,
                    state.kernel,
                    state.governor,
                    state.cpu_max_freq_mhz,
                    before,
                    max_runs as i64
                ],
                |r| r.get(0),
            )
            .map_err(self.sqlite_err())?
            .collect::<Result<_, _>>()
            .map_err(self.sqlite_err())?;
        let mut kernel = self
            .conn
            .prepare(
                "SELECT cell_id, settings, median_ns FROM kernel_cells
                 WHERE run_id = ?1 AND board = ?2 AND status = 'ok' AND emulated = 0
                   AND NOT disturbed AND median_ns > 0",
            )
            .map_err(self.sqlite_err())?;
        let mut model = self
            .conn
            .prepare(
                "SELECT cell_id, settings, avg_ns FROM model_cells
                 WHERE run_id = ?1 AND board = ?2 AND status = 'ok' AND emulated = 0 AND avg_ns > 0",
            )
            .map_err(self.sqlite_err())?;
        let mut out = Vec::new();
        for run_id in run_ids {
            let key = |kind: &str, cell_id: String, settings: String| CellKey {
                board: board.to_string(),
                kind: kind.to_string(),
                cell_id,
                settings,
            };
            let rows = kernel
                .query_map(params![run_id, board], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?))
                })
                .map_err(self.sqlite_err())?;
            for row in rows {
                let (cell, settings, time) = row.map_err(self.sqlite_err())?;
                out.push((run_id.clone(), key("kernel", cell, settings), time));
            }
            let rows = model
                .query_map(params![run_id, board], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?))
                })
                .map_err(self.sqlite_err())?;
            for row in rows {
                let (cell, settings, time) = row.map_err(self.sqlite_err())?;
                out.push((run_id.clone(), key("model", cell, settings), time));
            }
        }
        Ok(out)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn manifest_mtime(dir: &Path) -> i64 {
    std::fs::metadata(dir.join(wire::files::MANIFEST_FILE))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn create_schema(conn: &Connection) -> rusqlite::Result<()> {
    let llama_bench: Vec<String> = LLAMA_BENCH_FIELDS
        .iter()
        .map(|(name, ty)| format!("{name} {ty}"))
        .collect();
    conn.execute_batch(&format!(
        "CREATE TABLE runs(run_id TEXT PRIMARY KEY, dir TEXT, started_at TEXT, finished_at TEXT,
            git_commit TEXT, matrix TEXT, target TEXT, boards TEXT, manifest_mtime INTEGER);
         CREATE TABLE kernel_cells(run_id TEXT, board TEXT, emulated INTEGER, cell_id TEXT,
            type TEXT, shape TEXT, m INTEGER, k INTEGER, n INTEGER, threads INTEGER,
            kernel_path TEXT, agent_build TEXT, status TEXT, repetitions INTEGER,
            median_ns REAL, gflops REAL, weight_gbps REAL, nmse REAL, finished_at TEXT,
            settings TEXT, invocations INTEGER, invocation_spread REAL, disturbed INTEGER);
         CREATE INDEX kernel_cells_cell ON kernel_cells(board, cell_id);
         CREATE INDEX kernel_cells_run ON kernel_cells(run_id);
         CREATE TABLE model_cells(run_id TEXT, board TEXT, emulated INTEGER, cell_id TEXT,
            model_filename TEXT, recipe TEXT, test TEXT, n_threads INTEGER, status TEXT,
            avg_ns REAL, avg_ts REAL, stddev_ts REAL, ppl REAL, kld_mean REAL,
            top1_agreement REAL, mc_accuracy REAL, peak_rss_bytes INTEGER, finished_at TEXT,
            agent_build TEXT, settings TEXT);
         CREATE TABLE board_states(run_id TEXT, board TEXT, agent_build TEXT, cpu_model TEXT,
            kernel TEXT, governor TEXT, cpu_max_freq_mhz REAL);
         CREATE INDEX board_states_board ON board_states(board, agent_build);
         CREATE INDEX model_cells_cell ON model_cells(board, cell_id);
         CREATE INDEX model_cells_run ON model_cells(run_id);
         CREATE TABLE samples(run_id TEXT, board TEXT, cell_id TEXT, repetition INTEGER, ns INTEGER,
            invocation INTEGER);
         CREATE INDEX samples_cell ON samples(run_id, board, cell_id);
         CREATE TABLE llama_bench({}, quantbench_run_id TEXT);
         PRAGMA user_version = {SCHEMA_VERSION};",
        llama_bench.join(", ")
    ))
}

fn delete_run(conn: &Connection, run_id: &str) -> rusqlite::Result<()> {
    for table in [
        "runs",
        "kernel_cells",
        "model_cells",
        "samples",
        "board_states",
    ] {
        conn.execute(&format!("DELETE FROM {table} WHERE run_id = ?1"), [run_id])?;
    }
    conn.execute(
        "DELETE FROM llama_bench WHERE quantbench_run_id = ?1",
        [run_id],
    )?;
    Ok(())
}

fn status_name(status: CellStatus) -> &'static str {
    match status {
        CellStatus::Ok => "ok",
        CellStatus::Unsupported => "unsupported",
        CellStatus::Failed => "failed",
    }
}

fn ingest(
    conn: &Connection,
    run_id: &str,
    dir: &Path,
    run: &RunData,
    mtime: i64,
) -> rusqlite::Result<()> {
    let m = &run.manifest;
    let boards: Vec<&str> = m
        .boards
        .iter()
        .map(|b| b.board.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    conn.execute(
        "INSERT INTO runs VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            run_id,
            dir.display().to_string(),
            m.started_at,
            m.finished_at,
            m.git_commit,
            m.matrix,
            m.target,
            boards.join(","),
            mtime
        ],
    )?;
    for board in run.boards() {
        let state = run.board_state(board);
        conn.execute(
            "INSERT INTO board_states VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                run_id,
                board,
                state.agent_build,
                state.cpu_model,
                state.kernel,
                state.governor,
                state.cpu_max_freq_mhz
            ],
        )?;
    }
    let mut k = conn.prepare(
        "INSERT INTO kernel_cells VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)",
    )?;
    for r in &run.kernel_rows {
        k.execute(params![
            run_id,
            r.board,
            r.emulated,
            r.cell_id,
            r.ty,
            r.shape,
            r.m as i64,
            r.k as i64,
            r.n as i64,
            r.threads as i64,
            r.kernel_path,
            r.agent_build,
            status_name(r.status),
            r.repetitions,
            r.median_ns,
            r.gflops,
            r.weight_gbps,
            r.nmse,
            r.finished_at,
            r.settings(),
            r.invocations,
            r.invocation_spread,
            r.disturbed
        ])?;
    }
    let mut md = conn.prepare(
        "INSERT INTO model_cells VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)",
    )?;
    let placeholders: Vec<String> = (1..=LLAMA_BENCH_FIELDS.len() + 1)
        .map(|i| format!("?{i}"))
        .collect();
    let mut lb = conn.prepare(&format!(
        "INSERT INTO llama_bench VALUES ({})",
        placeholders.join(", ")
    ))?;
    for r in &run.model_rows {
        md.execute(params![
            run_id,
            r.board,
            r.emulated,
            r.cell_id(),
            r.model_filename,
            r.recipe,
            r.test,
            r.n_threads as i64,
            status_name(r.status),
            r.avg_ns,
            r.avg_ts,
            r.stddev_ts,
            r.ppl,
            r.kld_mean,
            r.top1_agreement,
            r.mc_accuracy,
            r.peak_rss_bytes.map(|b| b as i64),
            r.finished_at,
            r.agent_build,
            r.key().settings
        ])?;
        if r.status != CellStatus::Ok {
            continue;
        }
        let cpu = run
            .probes
            .get(&r.board)
            .map(|p| p.cpu_model.clone())
            .unwrap_or_default();
        // llama-bench's key columns: the board and recipe go where the
        // script tells results apart (CPU and file), the rest are the
        // settings our timing context uses.
        let settings = r.context_settings();
        lb.execute(params![
            m.git_commit,
            0,
            format!(
                "{}{}: {cpu}",
                r.board,
                if r.emulated { " (EMULATED)" } else { "" }
            ),
            "",
            "CPU",
            format!("{} {}", r.model_filename, r.recipe),
            r.model_type,
            r.model_size as i64,
            r.model_n_params as i64,
            settings.n_batch as i64,
            settings.n_ubatch as i64,
            r.n_threads as i64,
            settings.cpu.cpu_mask.clone(),
            i64::from(settings.cpu.cpu_strict),
            i64::from(settings.cpu.poll),
            settings.kv_type.k,
            settings.kv_type.v,
            0,
            "layer",
            0,
            0,
            // llama-bench's integer: what ran (1 on, 0 off), -1 when
            // llama.cpp did not say what `auto` resolved to.
            match r.flash_attn_used.as_str() {
                "on" => 1,
                "off" => 0,
                _ => -1,
            },
            "0.00",
            "none",
            if r.load_mode.is_empty() {
                "mmap"
            } else {
                r.load_mode.as_str()
            },
            0,
            0,
            r.n_prompt as i64,
            r.n_gen as i64,
            r.n_depth as i64,
            r.finished_at,
            r.avg_ns.map(|v| v as i64),
            r.stddev_ns.map(|v| v as i64),
            r.avg_ts,
            r.stddev_ts,
            0,
            0,
            0,
            run_id
        ])?;
    }
    let mut s = conn.prepare("INSERT INTO samples VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?;
    for x in &run.samples {
        s.execute(params![
            run_id,
            x.board,
            x.cell_id,
            x.repetition,
            x.ns as i64,
            x.invocation
        ])?;
    }
    Ok(())
}
