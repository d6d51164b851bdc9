//! The launcher end to end: it compiles the real CLI (up to date after the
//! workspace's test build, so seconds) and becomes it, with the arguments,
//! the output and the exit status passed through untouched.

use std::process::Command;

#[test]
fn the_launcher_becomes_the_cli_with_its_arguments_output_and_exit_status() {
    let help = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("--help")
        .output()
        .expect("run the launcher");
    let stdout = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success(), "{help:?}");
    assert!(
        stdout.contains("Usage: cargo xtask <COMMAND>") && stdout.contains("bisect"),
        "the CLI's own help: {stdout}"
    );

    let dir = tempfile_dir();
    let refused = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["plot", dir.to_str().expect("utf-8 temp path")])
        .output()
        .expect("run the launcher");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not a run directory"),
        "the CLI's own error for its arguments: {stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("xtask-launcher-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("make a temp folder");
    dir
}
