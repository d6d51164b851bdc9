//! `cargo xtask`: the launcher. It makes the machine ready (apt packages,
//! the aarch64 Rust target), a line per step, while quantbench's real CLI
//! (the `quantbench` crate in `cli/`) compiles beside it, then becomes that
//! CLI with the same arguments (`exec`: the CLI takes over this process,
//! so Ctrl-C and other signals reach it directly, and its handler releases
//! labgrid places as before).
//!
//! It depends on `bootstrap` alone (std only), so on a bare machine it
//! compiles in seconds and its first line comes before any C library is
//! compiled. Avoid adding more dependencies to this crate.

use bootstrap::Need;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

/// The real CLI's package (and binary).
const CLI_PACKAGE: &str = "quantbench";
/// cargo's output while compiling the CLI.
const CLI_BUILD_LOG: &str = "target/xtask/cli-build.log";

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let error = match launch(&args) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    eprintln!("error: {error}");
    ExitCode::FAILURE
}

/// Comes back only on failure: on success this process is the CLI.
fn launch(args: &[OsString]) -> Result<std::convert::Infallible, String> {
    let workspace = bootstrap::workspace_root();
    let subcommand = args.first().and_then(|a| a.to_str()).unwrap_or("");

    // The CLI links the system's OpenSSL, SQLite and zlib: they come
    // first, or it cannot compile.
    bootstrap::ensure(&[Need::CliBuild]).map_err(|e| match e {
        bootstrap::SetupError::NotRoot { missing, .. } => without_root(&missing),
        e => e.to_string(),
    })?;

    // The rest of a first run's set-up goes beside the compile: apt and
    // rustup wait on the network and the disk, the compile on the CPU.
    // Without root the CLI says what its command lacks when it needs it
    // (`--target local` needs no emulator).
    let setup = (sets_up_everything(subcommand) && bootstrap::may_install()).then(|| {
        std::thread::spawn(|| {
            bootstrap::ensure(&[Need::HostBuild, Need::CrossBuild, Need::Testbed])
                .map_err(|e| e.to_string())
        })
    });

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build.current_dir(&workspace).args([
        "build",
        "--release",
        "--package",
        CLI_PACKAGE,
        "--bin",
        CLI_PACKAGE,
    ]);
    let built = bootstrap::cargo_build::follow(
        build,
        "xtask: compiling quantbench's CLI (once; a few minutes on 2 cores)",
        &workspace.join(CLI_BUILD_LOG),
    )
    .map_err(|e| e.to_string())?;

    if let Some(setup) = setup {
        setup
            .join()
            .map_err(|_| "the set-up thread panicked".to_string())??;
    }
    let cli = built.executable.ok_or_else(|| {
        format!(
            "cargo compiled quantbench's CLI but named no binary; see {}",
            workspace.join(CLI_BUILD_LOG).display()
        )
    })?;
    let error = Command::new(&cli).args(args).exec();
    Err(format!("could not start {}: {error}", cli.display()))
}

/// What a user who cannot install packages is told: one `sudo` line for
/// everything a first run needs, and what works without root.
fn without_root(missing: &str) -> String {
    let first_run = [
        Need::CliBuild,
        Need::HostBuild,
        Need::CrossBuild,
        Need::Testbed,
    ];
    format!(
        "quantbench's CLI cannot be compiled without {missing}. As root, `cargo xtask` installs what it needs itself; as this user, run once\n  sudo apt-get install -y {}\nthen `cargo xtask` again. Without root, `--target local` (this machine) and real boards (`--target pi5.local`) work; the default target, an emulated Pi 5, also needs root to run (network namespaces and sshd).",
        bootstrap::missing_packages(&first_run).join(" ")
    )
}

/// Commands a newcomer starts with, which build agents and may bring up
/// an emulated board: their whole set-up is done while the CLI compiles.
/// Other commands (compare, report, history...) set up what they use.
fn sets_up_everything(subcommand: &str) -> bool {
    matches!(
        subcommand,
        "bench" | "ab" | "bisect" | "test" | "setup" | "testbed" | "build-agent"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_commands_set_everything_up_and_reading_results_does_not() {
        assert!(sets_up_everything("bench"));
        assert!(sets_up_everything("test"));
        assert!(!sets_up_everything("compare"));
        assert!(!sets_up_everything(""));
    }
}
