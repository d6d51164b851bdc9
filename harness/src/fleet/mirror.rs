//! Following a board's growing files into the host's copies.
//!
//! The host appends what the board's copy of a file has beyond what the
//! host already took, a bounded chunk at a time (a backlog after a long
//! reconnect is streamed, never held whole). Before appending, it checks
//! the board's file still is the one it was copying: not shorter than what
//! was taken, and with the same bytes just before the point it goes on
//! from. A board's file can be shorter or different (its run folder
//! pruned or cleaned, a re-imaged board, a tmpfs after a reboot, then a
//! fresh agent writing again): the host then keeps every byte it has, says
//! so, and follows the board's new file from its start, skipping a CSV
//! header it already has. Where each board file's bytes start in the
//! host's copy is kept in `.mirror.json` beside the copies, written before
//! the first byte of a new board file is appended, so a host killed at any
//! point resumes at the right byte.

use crate::fleet::transport::{Connection, FileWindow, TransportError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use thiserror::Error;
use wire::files::ResultsError;

/// Where each board file's current stream starts in the host's copy.
pub const MIRROR_STATE_FILE: &str = ".mirror.json";
/// The most read from a board file at once.
pub const CHUNK_BYTES: u64 = 8 << 20;
/// The most bytes one call returns to its caller.
pub const MAX_KEPT_BYTES: usize = 4 << 20;
/// How many bytes before the read point are compared with the host's.
const CHECK_BYTES: u64 = 4096;
/// The longest CSV header looked for at the start of a new board file.
const MAX_HEADER_BYTES: u64 = 64 << 10;

#[derive(Debug, Error)]
pub enum MirrorError {
    #[error(transparent)]
    Board(#[from] TransportError),
    #[error(transparent)]
    Host(#[from] ResultsError),
}

/// Reads parts of a board's files (the SSH connection; a folder in tests).
pub trait BoardFiles {
    fn read_window(
        &self,
        path: &str,
        offset: u64,
        back: u64,
        max: u64,
    ) -> Result<Option<FileWindow>, TransportError>;
}

impl BoardFiles for Connection {
    fn read_window(
        &self,
        path: &str,
        offset: u64,
        back: u64,
        max: u64,
    ) -> Result<Option<FileWindow>, TransportError> {
        Connection::read_window(self, path, offset, back, max)
    }
}

/// One board file's current stream: the host's copy holds its bytes from
/// board offset `start` on, beginning at host offset `base`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct Stream {
    base: u64,
    start: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct MirrorState {
    #[serde(default)]
    streams: BTreeMap<String, Stream>,
}

/// What one call of [`follow`] did.
#[derive(Debug, Default)]
pub struct Followed {
    /// The bytes appended (only when asked for: progress lines), at most
    /// `MAX_KEPT_BYTES` of them.
    pub bytes: Vec<u8>,
    /// Bytes appended but not returned, past `MAX_KEPT_BYTES`.
    pub cut: u64,
    /// Set when the board's file was no longer the one being copied.
    pub note: Option<String>,
}

/// Appends to `local` what the board's `remote` has beyond the host's copy.
/// `keep_bytes` returns the appended bytes too.
pub fn follow(
    board: &dyn BoardFiles,
    remote: &str,
    local: &Path,
    keep_bytes: bool,
) -> Result<Followed, MirrorError> {
    let state_path = local
        .parent()
        .unwrap_or(Path::new("."))
        .join(MIRROR_STATE_FILE);
    let key = local
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut state: MirrorState = wire::files::read_json(&state_path).unwrap_or_default();
    let mut stream = state.streams.get(&key).copied().unwrap_or_default();
    let mut followed = Followed::default();
    let mut restarted = false;
    loop {
        let host_len = file_len(local)?;
        if host_len < stream.base {
            // The host's copy was cut by hand: go on from its length.
            stream = Stream::default();
        }
        let offset = host_len - stream.base + stream.start;
        let back = CHECK_BYTES.min(offset - stream.start);
        let Some(window) = board.read_window(remote, offset, back, CHUNK_BYTES)? else {
            break;
        };
        let replaced = if window.size < offset {
            Some(format!(
                "is shorter than what the host already copied ({} < {offset} bytes)",
                window.size
            ))
        } else if window.before != read_tail(local, back)? {
            Some(format!(
                "no longer holds the bytes the host copied (the {back} bytes before byte {offset} differ)"
            ))
        } else {
            None
        };
        if let Some(how) = replaced {
            if restarted {
                // Replaced again while being read: the next poll looks again.
                break;
            }
            let Some(skip) = header_to_skip(board, remote, local)? else {
                // The new file's header is not whole yet.
                break;
            };
            end_line(local)?;
            stream = Stream {
                base: file_len(local)?,
                start: skip,
            };
            state.streams.insert(key.clone(), stream);
            wire::files::write_json(&state_path, &state)?;
            followed.note = Some(format!(
                "the board's {remote} {how}: its run folder was cleaned, replaced or re-imaged. The host keeps the {host_len} bytes it has and follows the board's new file from its start"
            ));
            restarted = true;
            continue;
        }
        if window.bytes.is_empty() {
            break;
        }
        append_synced(local, &window.bytes)?;
        if keep_bytes {
            let room = MAX_KEPT_BYTES.saturating_sub(followed.bytes.len());
            let kept = room.min(window.bytes.len());
            followed.bytes.extend_from_slice(&window.bytes[..kept]);
            followed.cut += (window.bytes.len() - kept) as u64;
        }
        if (window.bytes.len() as u64) < CHUNK_BYTES {
            break;
        }
    }
    Ok(followed)
}

/// How many bytes of the board's new file to skip: its CSV header when the
/// host's copy already starts with the same one; `None` while the board's
/// first line is not whole yet.
fn header_to_skip(
    board: &dyn BoardFiles,
    remote: &str,
    local: &Path,
) -> Result<Option<u64>, MirrorError> {
    let is_csv = local.extension().is_some_and(|e| e == "csv");
    if !is_csv || file_len(local)? == 0 {
        return Ok(Some(0));
    }
    let Some(window) = board.read_window(remote, 0, 0, MAX_HEADER_BYTES)? else {
        return Ok(None);
    };
    let Some(newline) = window.bytes.iter().position(|&b| b == b'\n') else {
        return Ok(if window.size >= MAX_HEADER_BYTES {
            // No header is that long: these are rows, keep them all.
            Some(0)
        } else {
            None
        });
    };
    let header = &window.bytes[..=newline];
    let mut host_start = vec![0u8; header.len()];
    let host_has_it = std::fs::File::open(local)
        .and_then(|mut f| f.read_exact(&mut host_start))
        .is_ok()
        && host_start == header;
    Ok(Some(if host_has_it { header.len() as u64 } else { 0 }))
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ResultsError + '_ {
    move |source| ResultsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn file_len(path: &Path) -> Result<u64, ResultsError> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io(path)(e)),
    }
}

/// The last `n` bytes of `path` (fewer when it is shorter; none when absent).
pub fn read_tail(path: &Path, n: u64) -> Result<Vec<u8>, ResultsError> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(path)(e)),
    };
    let len = file.metadata().map_err(io(path))?.len();
    file.seek(SeekFrom::Start(len - n.min(len)))
        .map_err(io(path))?;
    let mut bytes = Vec::new();
    file.take(n).read_to_end(&mut bytes).map_err(io(path))?;
    Ok(bytes)
}

/// Ends the host's copy with a newline, so the next stream's first line is
/// never spliced onto a cut one (which the row reader then names).
fn end_line(path: &Path) -> Result<(), ResultsError> {
    match read_tail(path, 1)?.as_slice() {
        [] | [b'\n'] => Ok(()),
        _ => append_synced(path, b"\n"),
    }
}

/// Appends `bytes` to `path` and syncs them to disk.
pub fn append_synced(path: &Path, bytes: &[u8]) -> Result<(), ResultsError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_data()))
        .map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A board whose files are a folder here.
    struct Folder(PathBuf);
    impl BoardFiles for Folder {
        fn read_window(
            &self,
            path: &str,
            offset: u64,
            back: u64,
            max: u64,
        ) -> Result<Option<FileWindow>, TransportError> {
            let Ok(all) = std::fs::read(self.0.join(path)) else {
                return Ok(None);
            };
            let size = all.len() as u64;
            if size < offset {
                return Ok(Some(FileWindow {
                    size,
                    before: Vec::new(),
                    bytes: Vec::new(),
                }));
            }
            let back = back.min(offset);
            let end = (offset + max).min(size);
            Ok(Some(FileWindow {
                size,
                before: all[(offset - back) as usize..offset as usize].to_vec(),
                bytes: all[offset as usize..end as usize].to_vec(),
            }))
        }
    }

    fn setup() -> (tempfile::TempDir, Folder, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("board")).unwrap();
        std::fs::create_dir_all(dir.path().join("host")).unwrap();
        let board = Folder(dir.path().join("board"));
        let local = dir.path().join("host/kernels.csv");
        (dir, board, local)
    }

    #[test]
    fn a_growing_file_is_copied_as_it_grows() {
        let (dir, board, local) = setup();
        let remote = dir.path().join("board/kernels.csv");
        std::fs::write(&remote, "h\na,1\nb,").unwrap();
        follow(&board, "kernels.csv", &local, false).unwrap();
        std::fs::write(&remote, "h\na,1\nb,2\nc,3\n").unwrap();
        let f = follow(&board, "kernels.csv", &local, true).unwrap();
        assert_eq!(f.bytes, b"2\nc,3\n");
        assert!(f.note.is_none());
        assert_eq!(std::fs::read(&local).unwrap(), b"h\na,1\nb,2\nc,3\n");
    }

    #[test]
    fn a_board_file_that_shrinks_keeps_the_host_rows_and_follows_the_new_one() {
        let (dir, board, local) = setup();
        let remote = dir.path().join("board/kernels.csv");
        std::fs::write(&remote, "h\na,1\nb,2\nc,").unwrap();
        follow(&board, "kernels.csv", &local, false).unwrap();
        // The folder is cleaned; a fresh agent writes its header and a row
        // (shorter than what the host has).
        std::fs::write(&remote, "h\nd,4\n").unwrap();
        let f = follow(&board, "kernels.csv", &local, false).unwrap();
        assert!(f.note.unwrap().contains("shorter"));
        assert_eq!(std::fs::read(&local).unwrap(), b"h\na,1\nb,2\nc,\nd,4\n");
        // It goes on growing, and is followed from where it is.
        std::fs::write(&remote, "h\nd,4\ne,5\n").unwrap();
        let f = follow(&board, "kernels.csv", &local, false).unwrap();
        assert!(f.note.is_none());
        assert_eq!(
            std::fs::read(&local).unwrap(),
            b"h\na,1\nb,2\nc,\nd,4\ne,5\n"
        );
    }

    #[test]
    fn a_board_file_replaced_by_a_longer_one_is_not_spliced_mid_line() {
        let (dir, board, local) = setup();
        let remote = dir.path().join("board/kernels.csv");
        std::fs::write(&remote, "h\na,1\n").unwrap();
        follow(&board, "kernels.csv", &local, false).unwrap();
        std::fs::write(&remote, "h\nxx,10\nyy,20\n").unwrap();
        let f = follow(&board, "kernels.csv", &local, false).unwrap();
        assert!(f.note.unwrap().contains("no longer holds"));
        assert_eq!(std::fs::read(&local).unwrap(), b"h\na,1\nxx,10\nyy,20\n");
    }

    #[test]
    fn a_new_file_whose_header_is_not_whole_yet_is_read_later() {
        let (dir, board, local) = setup();
        let remote = dir.path().join("board/kernels.csv");
        std::fs::write(&remote, "h\na,1\n").unwrap();
        follow(&board, "kernels.csv", &local, false).unwrap();
        std::fs::write(&remote, "").unwrap();
        let f = follow(&board, "kernels.csv", &local, false).unwrap();
        assert!(f.note.is_none());
        std::fs::write(&remote, "h\nb,2\n").unwrap();
        let f = follow(&board, "kernels.csv", &local, false).unwrap();
        assert!(f.note.is_some());
        assert_eq!(std::fs::read(&local).unwrap(), b"h\na,1\nb,2\n");
    }

    #[test]
    fn a_backlog_larger_than_a_chunk_is_read_in_chunks() {
        let (dir, board, local) = setup();
        let remote = dir.path().join("board/agent.log");
        let local = local.with_file_name("agent.log");
        let big = vec![b'x'; (CHUNK_BYTES * 2 + 5) as usize];
        std::fs::write(&remote, &big).unwrap();
        follow(&board, "agent.log", &local, false).unwrap();
        assert_eq!(std::fs::metadata(&local).unwrap().len(), big.len() as u64);
    }
}
