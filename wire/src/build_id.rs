//! The identity of an agent build (or any file the host ships): the first 12
//! hex digits of its SHA-256. The host deploys the agent under this name and
//! the agent stamps it on every row, so a row names the exact binary that
//! measured it.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// SHA-256 prefix (12 hex digits) of a file's content, read in chunks so
/// multi-gigabyte models do not have to fit in memory.
pub fn content_hash(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_the_sha256_prefix_of_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        // sha256("abc") = ba7816bf8f01cfea...
        assert_eq!(content_hash(&path).unwrap(), "ba7816bf8f01");
        assert!(content_hash(&dir.path().join("missing")).is_err());
    }
}
