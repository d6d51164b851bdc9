//! The unquantized model's reference on the evaluation text: the text's
//! tokens and, at every scored position (llama-perplexity's second half of
//! each chunk), the next-token log-probabilities over the vocabulary and
//! the token that came. The host computes it once per model, text and
//! context and ships it, so a board measures only its recipes (a 3B F16
//! model never has to fit on a Pi) and KL divergence needs no second
//! evaluation there.
//!
//! Layout, little-endian: `QBREF1\0\0`, u64 vocabulary size, u64 tokens,
//! u64 scored positions, the tokens (i32), the targets (i32), then the
//! log-probabilities (f32, one vocabulary row per position).

use std::io::{Read, Write};
use std::path::Path;

const MAGIC: &[u8; 8] = b"QBREF1\0\0";

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ReferenceError {
    pub path: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceFile {
    pub n_vocab: usize,
    pub tokens: Vec<i32>,
    pub targets: Vec<i32>,
    /// `targets.len()` rows of `n_vocab` values.
    pub log_probs: Vec<f32>,
}

impl ReferenceFile {
    /// The log-probabilities at scored position `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.log_probs[i * self.n_vocab..(i + 1) * self.n_vocab]
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        out.write_all(MAGIC)?;
        for n in [self.n_vocab, self.tokens.len(), self.targets.len()] {
            out.write_all(&(n as u64).to_le_bytes())?;
        }
        for t in self.tokens.iter().chain(&self.targets) {
            out.write_all(&t.to_le_bytes())?;
        }
        for v in &self.log_probs {
            out.write_all(&v.to_le_bytes())?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()
    }

    /// Reads a reference file; one cut short or of another layout is an
    /// error saying so.
    pub fn read(path: &Path) -> Result<ReferenceFile, ReferenceError> {
        let fail = |message: String| ReferenceError {
            path: path.display().to_string(),
            message,
        };
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| fail(e.to_string()))?;
        if bytes.len() < 32 || &bytes[..8] != MAGIC {
            return Err(fail(
                "not a quantbench reference file (made by `quantbench-agent reference`)".into(),
            ));
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[8 + 8 * i..16 + 8 * i]);
            u64::from_le_bytes(w) as usize
        };
        let (n_vocab, n_tokens, n_targets) = (word(0), word(1), word(2));
        let expected = n_tokens
            .checked_add(n_targets)
            .and_then(|n| n.checked_mul(4))
            .and_then(|n| n.checked_add(n_targets.checked_mul(n_vocab)?.checked_mul(4)?))
            .and_then(|n| n.checked_add(32));
        if expected != Some(bytes.len()) {
            return Err(fail(format!(
                "{} bytes, not the {} its header says ({n_tokens} tokens, {n_targets} positions of {n_vocab}): cut short or damaged; delete it to have it made again",
                bytes.len(),
                expected.map_or("(overflowing)".to_string(), |e| e.to_string())
            )));
        }
        let words = |from: usize, n: usize| -> Vec<[u8; 4]> {
            bytes[from..from + 4 * n]
                .chunks_exact(4)
                .map(|c| [c[0], c[1], c[2], c[3]])
                .collect()
        };
        let ints = |from, n| words(from, n).into_iter().map(i32::from_le_bytes).collect();
        let tokens = ints(32, n_tokens);
        let targets = ints(32 + 4 * n_tokens, n_targets);
        let log_probs = words(32 + 4 * (n_tokens + n_targets), n_targets * n_vocab)
            .into_iter()
            .map(f32::from_le_bytes)
            .collect();
        Ok(ReferenceFile {
            n_vocab,
            tokens,
            targets,
            log_probs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_round_trips_and_a_cut_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ref.bin");
        let reference = ReferenceFile {
            n_vocab: 3,
            tokens: vec![1, 2, 3, 4],
            targets: vec![3, 4],
            log_probs: vec![-0.1, -2.0, -3.0, -1.5, -0.5, -2.5],
        };
        reference.write(&path).unwrap();
        let back = ReferenceFile::read(&path).unwrap();
        assert_eq!(back, reference);
        assert_eq!(back.row(1), &[-1.5, -0.5, -2.5]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let e = ReferenceFile::read(&path).unwrap_err().to_string();
        assert!(e.contains("cut short"), "{e}");
        std::fs::write(&path, b"GGUF and more bytes than thirty-two").unwrap();
        let e = ReferenceFile::read(&path).unwrap_err().to_string();
        assert!(e.contains("not a quantbench reference file"), "{e}");
    }
}
