//! The result files: one row per cell (`kernels.csv`), one row per timed
//! repetition (`samples.csv`), and the run manifest (`run.json`).
//!
//! Rows are appended and flushed one at a time, so whatever finished is on
//! disk however a run ends.

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

pub const KERNEL_ROWS_FILE: &str = "kernels.csv";
pub const SAMPLES_FILE: &str = "samples.csv";
pub const PROBE_FILE: &str = "probe.json";
pub const MANIFEST_FILE: &str = "run.json";

#[derive(Debug, Error)]
pub enum ResultsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Csv { path: PathBuf, source: csv::Error },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// How a cell ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CellStatus {
    /// Measured.
    Ok,
    /// The type cannot store this shape (reason in `note`).
    Unsupported,
    /// The agent failed or died on this cell (reason in `note`).
    Failed,
}

/// One row of `kernels.csv`. The field order is the column order; every
/// column is documented in the README ("CSV columns").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelRow {
    pub run_id: String,
    pub board: String,
    /// True when timings come from an emulator (qemu), not the hardware.
    pub emulated: bool,
    /// SHA-256 prefix of the agent binary that measured this row.
    pub agent_build: String,
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
    pub repetitions: u32,
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
    pub temp_before_c: Option<f64>,
    pub temp_after_c: Option<f64>,
    pub freq_before_mhz: Option<f64>,
    pub freq_after_mhz: Option<f64>,
    /// UTC time the cell finished, RFC 3339.
    pub finished_at: String,
}

impl KernelRow {
    /// A row with the cell's identity and no measurement yet; the agent fills
    /// in the figures, the host uses it as is for cells an agent never finished.
    pub fn unmeasured(
        job: &crate::matrix::JobSpec,
        cell: &crate::matrix::Cell,
        threads: usize,
        agent_build: &str,
        status: CellStatus,
        note: String,
    ) -> KernelRow {
        KernelRow {
            run_id: job.run_id.clone(),
            board: job.board.clone(),
            emulated: job.emulated,
            agent_build: agent_build.to_string(),
            git_commit: job.git_commit.clone(),
            cell_id: cell.id.clone(),
            status,
            note,
            ty: cell.ty.to_string(),
            bits_per_weight: cell.ty.bits_per_weight(),
            shape: cell.shape.name.clone(),
            m: cell.shape.rows,
            k: cell.shape.cols,
            n: cell.batch_tokens,
            threads,
            distribution: job.distribution,
            kernel_path: String::new(),
            repetitions: 0,
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
            temp_before_c: None,
            temp_after_c: None,
            freq_before_mhz: None,
            freq_after_mhz: None,
            finished_at: crate::utc_now_rfc3339(),
        }
    }
}

/// One row of `samples.csv`: a single timed repetition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRow {
    pub run_id: String,
    pub board: String,
    pub cell_id: String,
    pub repetition: u32,
    pub ns: u64,
}

/// Appends serde rows to a CSV file, flushing after each one. Writes the
/// header only when the file is new or empty, so a resumed run appends.
pub struct CsvAppender<T> {
    path: PathBuf,
    writer: csv::Writer<File>,
    _row: std::marker::PhantomData<T>,
}

impl<T: Serialize> CsvAppender<T> {
    pub fn open(path: &Path) -> Result<Self, ResultsError> {
        let io = |source| ResultsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        let is_empty = file.metadata().map_err(io)?.len() == 0;
        let writer = csv::WriterBuilder::new()
            .has_headers(is_empty)
            .from_writer(file);
        Ok(Self {
            path: path.to_path_buf(),
            writer,
            _row: std::marker::PhantomData,
        })
    }

    pub fn append(&mut self, row: &T) -> Result<(), ResultsError> {
        self.writer
            .serialize(row)
            .map_err(|source| ResultsError::Csv {
                path: self.path.clone(),
                source,
            })?;
        self.writer.flush().map_err(|source| ResultsError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

pub fn read_csv<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, ResultsError> {
    let csv_err = |source| ResultsError::Csv {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = csv::Reader::from_path(path).map_err(csv_err)?;
    reader
        .deserialize()
        .collect::<Result<Vec<T>, _>>()
        .map_err(csv_err)
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ResultsError> {
    let text = serde_json::to_string_pretty(value).map_err(|source| ResultsError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let mut file = File::create(path).map_err(|source| ResultsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    file.write_all(text.as_bytes())
        .and_then(|_| file.write_all(b"\n"))
        .map_err(|source| ResultsError::Io {
            path: path.to_path_buf(),
            source,
        })
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ResultsError> {
    let text = std::fs::read_to_string(path).map_err(|source| ResultsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ResultsError::Json {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
pub(crate) fn example_row(cell_id: &str) -> KernelRow {
    KernelRow {
        run_id: "20261122T120000Z-abc1234".into(),
        board: "local".into(),
        emulated: false,
        agent_build: "0123456789ab".into(),
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
        repetitions: 10,
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
        temp_before_c: None,
        temp_after_c: Some(51.5),
        freq_before_mhz: None,
        freq_after_mhz: None,
        finished_at: "2026-11-22T12:00:01Z".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        for column in header.split(',') {
            assert!(
                readme.contains(&format!("| `{column}` |")),
                "column `{column}` is not documented in README.md"
            );
        }
    }
}
