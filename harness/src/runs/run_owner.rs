//! One host process per run directory.
//!
//! `bench --resume latest` typed while the original run is still alive (or
//! aimed at someone else's live run) would append the same rows twice,
//! take over the boards' locks of the same run id and start a second agent
//! in the same folder. So a run holds `<run_dir>/.owner.lock` with an
//! exclusive `flock` for as long as its process lives; the file says who
//! (pid, host, user, since when, what command) for the refusal. The kernel
//! drops the lock when the process dies however it dies, so a killed run
//! never leaves a stale owner behind.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use thiserror::Error;

pub const OWNER_FILE: &str = ".owner.lock";

#[derive(Debug, Error)]
pub enum OwnerError {
    #[error("run directory {dir} is in use by another quantbench process: {holder}. Wait for it to end (or stop it), then resume; two processes on one run would measure and append the same rows twice")]
    Held { dir: PathBuf, holder: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct RunOwner {
    _file: File,
}

impl RunOwner {
    /// Takes `run_dir`'s owner lock for this process, or says who holds it.
    pub fn take(run_dir: &Path) -> Result<RunOwner, OwnerError> {
        let path = run_dir.join(OWNER_FILE);
        let io = |source| OwnerError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "a process that has not written its name yet".to_string(),
                    text => text.to_string(),
                };
                return Err(OwnerError::Held {
                    dir: run_dir.to_path_buf(),
                    holder,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let command: Vec<String> = std::env::args().collect();
        let who = format!(
            "pid {} on host {} (user {}), since {}, running `{}`\n",
            std::process::id(),
            crate::fleet::board_lock::local_hostname(),
            std::env::var("USER").unwrap_or_else(|_| "unknown".into()),
            wire::utc_now_rfc3339(),
            command.join(" ")
        );
        file.set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(who.as_bytes()))
            .map_err(io)?;
        Ok(RunOwner { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_owner_is_refused_with_the_holder_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunOwner::take(dir.path()).unwrap();
        // flock locks belong to the open file description: a second open
        // in this process conflicts as another process's would.
        let refused = RunOwner::take(dir.path()).unwrap_err().to_string();
        assert!(
            refused.contains(&format!("pid {}", std::process::id())) && refused.contains("in use"),
            "{refused}"
        );
        drop(first);
        RunOwner::take(dir.path()).expect("free once the holder is gone");
    }
}
