//! The on-board agent links only what runs on the board: the wire types
//! and GGML. Host code (the harness with its SSH, plotting, progress bars
//! and set-up) must never reach it, or every board carries it.

use std::process::Command;

#[test]
fn agent_links_no_host_library_ssh_plotting_or_progress_bars() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(harness::builds::build::workspace_root())
        .args([
            "tree",
            "--package",
            "remote-agent",
            "--edges",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let crates: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        crates.contains(&"wire") && crates.contains(&"kernels"),
        "{tree}"
    );
    for forbidden in ["harness", "ssh2", "plotters", "indicatif", "openssl-sys"] {
        assert!(
            !crates.contains(&forbidden),
            "the agent depends on {forbidden}:\n{tree}"
        );
    }
}
