//! Helpers the end-to-end test files share: run the real CLI, show its output.
// Each test file compiles this module on its own and uses part of it.
#![allow(dead_code)]

pub mod fleet;

use std::path::Path;
use std::process::{Command, Output};

/// Runs `cargo xtask <args>` (the built binary) in `dir`.
pub fn xtask(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_quantbench"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("xtask starts")
}

/// A file of the repository's `fixtures/`, as a path string.
pub fn fixture(name: &str) -> String {
    harness::builds::build::workspace_root()
        .join("fixtures")
        .join(name)
        .display()
        .to_string()
}

/// Status, stdout and stderr, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `cargo xtask bench --target local --matrix <matrix>` in `dir`, which must succeed.
pub fn bench_local(dir: &Path, matrix: &str) {
    let out = xtask(dir, &["bench", "--target", "local", "--matrix", matrix]);
    assert!(out.status.success(), "{}", text(&out));
}

/// The one run directory under `dir/results`.
pub fn only_run_dir(dir: &Path) -> std::path::PathBuf {
    let runs: Vec<std::path::PathBuf> = std::fs::read_dir(dir.join("results"))
        .unwrap()
        .map(|e| e.unwrap().path())
        // Run directories only: the history index sits beside them.
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    runs[0].clone()
}

/// Rewrites a run's CSV of `T` rows through `change` (for tests that
/// inject a condition into a copy of a real run).
pub fn rewrite_csv<T: serde::Serialize + serde::de::DeserializeOwned>(
    path: &Path,
    change: impl Fn(&mut T),
) {
    let mut rows: Vec<T> = wire::files::read_csv(path).unwrap();
    rows.iter_mut().for_each(change);
    std::fs::remove_file(path).unwrap();
    let mut out = wire::files::CsvAppender::open(path).unwrap();
    for row in &rows {
        out.append(row).unwrap();
    }
}
