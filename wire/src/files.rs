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

/// Writes pretty JSON to `path` through `<path>.tmp` and a rename.
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
    temp.push(".tmp");
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
