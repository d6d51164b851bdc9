//! Importance matrices from users, fuzzed through the whole read: the
//! pure-Rust header check, then GGML's parser and typed getters (which
//! abort the process on a key of another type: an abort here fails the
//! test binary). Inputs are mutated from the fixture imatrix and a file
//! whose `imatrix.chunk_count` is a string (issue 23).
//! `QUANTBENCH_FUZZ_CASES=20000 cargo test --release -p kernels --test
//! fuzz_imatrix -- --nocapture` runs longer.

use std::path::Path;
use wire::fuzzing::{cases, mutated, run};

/// The fixture with `imatrix.chunk_count` turned from a u32 into a string
/// ("1234"), as a hostile file would have it.
fn mistyped(fixture: &[u8]) -> Vec<u8> {
    let key = b"imatrix.chunk_count";
    let at = fixture
        .windows(key.len())
        .position(|w| w == key)
        .expect("the fixture has imatrix.chunk_count");
    let mut out = fixture[..at + key.len()].to_vec();
    out.extend(8u32.to_le_bytes()); // GGUF string
    out.extend(4u64.to_le_bytes());
    out.extend(b"1234");
    // Skip the original type (4 bytes) and u32 value (4 bytes).
    out.extend(&fixture[at + key.len() + 8..]);
    out
}

#[test]
fn imatrix_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let fixture = std::fs::read(root.join("stories260K-calib.imatrix.gguf")).unwrap();
    let header = wire::gguf::check(&fixture[..], fixture.len() as u64)
        .unwrap()
        .data_offset as usize;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzzed.imatrix.gguf");
    let seeds = vec![fixture.clone(), mistyped(&fixture)];
    let tally = run(
        "imatrix (check, then GGML)",
        cases(400),
        mutated(seeds, header),
        &["read", "refused by the header check", "refused after it"],
        |bytes| {
            std::fs::write(&path, &bytes).unwrap();
            match kernels::calibration::read_imatrix(&path) {
                Ok(_) => "read".into(),
                Err(e) if e.to_string().contains("GGML can read safely") => {
                    "refused by the header check".into()
                }
                Err(_) => "refused after it".into(),
            }
        },
    );
    assert!(tally.contains_key("read") && tally.contains_key("refused by the header check"));
    // The mistyped key alone is refused in one line, where GGML would abort.
    std::fs::write(&path, mistyped(&fixture)).unwrap();
    let e = kernels::calibration::read_imatrix(&path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("imatrix.chunk_count is String"), "{e}");
}
