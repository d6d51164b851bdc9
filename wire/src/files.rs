//! Reading and writing the files rows travel in: CSV appended and flushed
//! one row at a time (so whatever finished is on disk however a run ends),
//! JSON written under a temporary name and renamed (so a reader never sees
//! half a file), and the names of the files a run directory holds.

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

pub const KERNEL_ROWS_FILE: &str = "kernels.csv";
pub const SAMPLES_FILE: &str = "samples.csv";
pub const INVOCATIONS_FILE: &str = "invocations.csv";
pub const PROBE_FILE: &str = "probe.json";
pub const MODEL_ROWS_FILE: &str = "models.csv";
/// A model job's sustained decodes (`rows::SustainRow`).
pub const SUSTAINED_FILE: &str = "sustained.csv";
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

/// Appends serde rows to a CSV file, flushed and fsynced after each one (a
/// row reported finished survives a power cut). Writes the header only
/// when the file is new or empty, so a resumed run appends.
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
        let len = file.metadata().map_err(io)?.len();
        let is_empty = len == 0;
        if !is_empty && !ends_with_newline(path, len).map_err(io)? {
            // A line cut short (a full disk, a killed writer): end it, so
            // the rows appended now start on a line of their own and the
            // cut one stays a single bad line that readers skip.
            (&file).write_all(b"\n").map_err(io)?;
        }
        let writer = csv::WriterBuilder::new()
            .has_headers(is_empty)
            .from_writer(file);
        Ok(Self {
            path: path.to_path_buf(),
            writer,
            _row: std::marker::PhantomData,
        })
    }

    /// Appends one row, flushed and synced to disk.
    pub fn append(&mut self, row: &T) -> Result<(), ResultsError> {
        self.append_unsynced(row)?;
        self.sync()
    }

    /// Appends one row, flushed to the OS but not yet synced: for many
    /// small rows (repetitions) followed by one `sync`.
    pub fn append_unsynced(&mut self, row: &T) -> Result<(), ResultsError> {
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

    /// Syncs every row appended so far to disk.
    pub fn sync(&mut self) -> Result<(), ResultsError> {
        self.writer
            .flush()
            .and_then(|_| self.writer.get_ref().sync_data())
            .map_err(|source| ResultsError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

fn ends_with_newline(path: &Path, len: u64) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// Rows read line-complete from a file another process may still be
/// writing (or a board wrote badly).
#[derive(Debug)]
pub struct RowsRead<T> {
    pub rows: Vec<T>,
    /// Lines that are not rows, `line N: why`, skipped.
    pub skipped: Vec<String>,
    /// The file ends in a line without its newline: not read (a writer may
    /// still finish it; an appender ends it before adding rows).
    pub partial_tail: bool,
}

/// The complete lines of `path` as rows: a last line without its newline
/// is left for later, a line that is not a row is skipped and named.
/// Missing file: no rows. Only an unreadable file is an error.
pub fn read_rows<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<RowsRead<T>, ResultsError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(ResultsError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let partial_tail = complete < bytes.len();
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(&bytes[..complete]);
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    let headers = match reader.headers() {
        Ok(h) => h.clone(),
        Err(e) => {
            skipped.push(format!("line 1: {e}"));
            return Ok(RowsRead {
                rows,
                skipped,
                partial_tail,
            });
        }
    };
    for record in reader.records() {
        match record {
            Ok(record) => {
                let line = record.position().map_or(0, |p| p.line());
                match record.deserialize::<T>(Some(&headers)) {
                    Ok(row) => rows.push(row),
                    Err(e) => skipped.push(format!("line {line}: {e}")),
                }
            }
            Err(e) => skipped.push(format!(
                "line {}: {e}",
                e.position().map_or(0, |p| p.line())
            )),
        }
    }
    Ok(RowsRead {
        rows,
        skipped,
        partial_tail,
    })
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

/// The rows of `path` that parse, skipping a line that does not (a
/// partial last line after a crash); empty when the file is missing. For
/// an agent picking up its own earlier records, where a lost record only
/// means measuring that invocation again.
pub fn read_csv_lenient<T: for<'de> Deserialize<'de>>(path: &Path) -> Vec<T> {
    match csv::Reader::from_path(path) {
        Ok(mut reader) => reader.deserialize().filter_map(Result::ok).collect(),
        Err(_) => Vec::new(),
    }
}

/// Writes pretty JSON to `path` through `<path>.tmp-<pid>` and a rename
/// (a temporary name of this process's own: two writers never share one).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ResultsError> {
    let io = |source| ResultsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let text = serde_json::to_string_pretty(value).map_err(|source| ResultsError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".tmp-{}", std::process::id()));
    let temp = PathBuf::from(temp);
    let mut file = File::create(&temp).map_err(io)?;
    file.write_all(text.as_bytes())
        .and_then(|_| file.write_all(b"\n"))
        .and_then(|_| file.sync_data())
        .map_err(io)?;
    std::fs::rename(&temp, path).map_err(io)
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
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Row {
        name: String,
        value: u32,
    }

    #[test]
    fn a_cut_line_is_left_a_bad_line_skipped_and_an_appender_ends_the_cut_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.csv");
        let mut out = CsvAppender::open(&path).unwrap();
        for (name, value) in [("a", 1), ("b", 2)] {
            out.append(&Row {
                name: name.into(),
                value,
            })
            .unwrap();
        }
        drop(out);
        // A hostile line, then a write cut short.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"c,not-a-number\nd,4").unwrap();
        drop(file);
        let read: RowsRead<Row> = read_rows(&path).unwrap();
        assert_eq!(read.rows.len(), 2);
        assert!(read.partial_tail);
        assert_eq!(read.skipped.len(), 1, "{:?}", read.skipped);
        assert!(read.skipped[0].starts_with("line 4:"), "{:?}", read.skipped);
        // A resumed writer ends the cut line before its rows.
        let mut out = CsvAppender::open(&path).unwrap();
        out.append(&Row {
            name: "e".into(),
            value: 5,
        })
        .unwrap();
        let read: RowsRead<Row> = read_rows(&path).unwrap();
        let names: Vec<&str> = read.rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "d", "e"], "{:?}", read.skipped);
        assert!(!read.partial_tail);
        assert!(read_rows::<Row>(&dir.path().join("missing.csv"))
            .unwrap()
            .rows
            .is_empty());
    }

    #[test]
    fn json_is_replaced_whole_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.json");
        write_json(&path, &vec![1, 2, 3]).unwrap();
        write_json(&path, &vec![4]).unwrap();
        assert_eq!(read_json::<Vec<i32>>(&path).unwrap(), vec![4]);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
