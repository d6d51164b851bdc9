//! Making a fresh Debian machine ready: the system libraries the CLI
//! links, the packages GGML's build, the cross-build and the emulated
//! boards need, and the Rust target. As root it installs them with apt;
//! otherwise it says the exact command.
//!
//! std only: `cargo xtask` (the launcher) runs this before anything else
//! is compiled, so it must compile in seconds on a bare machine.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

pub mod cargo_build;

#[derive(Debug)]
pub enum SetupError {
    NotRoot {
        missing: String,
        why: String,
        packages: String,
    },
    CommandFailed {
        command: String,
        status: String,
    },
    Spawn {
        command: String,
        source: std::io::Error,
    },
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetupError::NotRoot {
                missing,
                why,
                packages,
            } => write!(
                f,
                "missing {missing} (needed for {why}); install with: sudo apt-get install -y {packages}"
            ),
            SetupError::CommandFailed { command, status } => {
                write!(f, "`{command}` failed ({status}); run it by hand to see why")
            }
            SetupError::Spawn { command, source } => {
                write!(f, "could not run `{command}`: {source}")
            }
        }
    }
}

impl std::error::Error for SetupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SetupError::Spawn { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// What the coming work needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Compiling quantbench's CLI, which links the system's OpenSSL (for
    /// SSH), SQLite (the history index) and zlib rather than compiling
    /// vendored copies (minutes on a 2-core machine).
    CliBuild,
    /// Building GGML for the host (cmake, a C++ compiler, libclang for bindgen).
    HostBuild,
    /// Cross-building the agent for aarch64 boards.
    CrossBuild,
    /// Emulated boards: qemu-user, sshd, network namespaces.
    Testbed,
    /// Faults injected into emulated boards' links by the tests: packet
    /// loss with nftables (this kernel kind has no netem).
    FaultInjection,
    /// labgrid's client, for boards of a labgrid farm (and its coordinator
    /// and exporter, for the tests): from PyPI, in a venv of its own.
    Labgrid,
    /// A headless browser to check the HTML report renders (tests only).
    Browser,
    /// `cycles`: llvm-19's objdump and machine-code analyzer (Debian 12's
    /// default LLVM is 14).
    CycleModel,
}

struct Requirement {
    need: Need,
    /// Present when this returns true.
    present: fn() -> bool,
    what: &'static str,
    package: &'static str,
}

const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        need: Need::CliBuild,
        present: || on_path("pkg-config"),
        what: "pkg-config",
        package: "pkg-config",
    },
    Requirement {
        need: Need::CliBuild,
        present: || pkg_config_has("openssl"),
        what: "OpenSSL's headers",
        package: "libssl-dev",
    },
    Requirement {
        need: Need::CliBuild,
        present: || pkg_config_has("sqlite3"),
        what: "SQLite's headers",
        package: "libsqlite3-dev",
    },
    Requirement {
        need: Need::CliBuild,
        present: || pkg_config_has("zlib"),
        what: "zlib's headers",
        package: "zlib1g-dev",
    },
    Requirement {
        need: Need::HostBuild,
        present: || on_path("cmake"),
        what: "cmake",
        package: "cmake",
    },
    Requirement {
        need: Need::HostBuild,
        present: || on_path("g++"),
        what: "g++",
        package: "g++",
    },
    Requirement {
        need: Need::HostBuild,
        present: libclang_present,
        what: "libclang (for bindgen)",
        package: "libclang-dev",
    },
    Requirement {
        need: Need::HostBuild,
        present: || on_path("patch"),
        what: "patch (builds with patch files)",
        package: "patch",
    },
    Requirement {
        need: Need::CrossBuild,
        present: || on_path("aarch64-linux-gnu-gcc"),
        what: "aarch64-linux-gnu-gcc",
        package: "gcc-aarch64-linux-gnu",
    },
    Requirement {
        need: Need::CrossBuild,
        present: || on_path("aarch64-linux-gnu-g++"),
        what: "aarch64-linux-gnu-g++",
        package: "g++-aarch64-linux-gnu",
    },
    Requirement {
        need: Need::CrossBuild,
        present: || on_path("aarch64-linux-gnu-objdump"),
        what: "aarch64-linux-gnu-objdump",
        package: "binutils-aarch64-linux-gnu",
    },
    Requirement {
        need: Need::Testbed,
        present: || on_path("qemu-aarch64"),
        what: "qemu-aarch64",
        package: "qemu-user",
    },
    Requirement {
        need: Need::Testbed,
        present: || Path::new("/usr/sbin/sshd").exists(),
        what: "sshd",
        package: "openssh-server",
    },
    Requirement {
        need: Need::Testbed,
        present: || on_path("ssh-keygen"),
        what: "ssh-keygen",
        package: "openssh-client",
    },
    Requirement {
        need: Need::Testbed,
        present: || on_path("ip"),
        what: "ip (iproute2)",
        package: "iproute2",
    },
    Requirement {
        need: Need::FaultInjection,
        present: || on_path("nft") || Path::new("/usr/sbin/nft").exists(),
        what: "nft (nftables)",
        package: "nftables",
    },
    Requirement {
        need: Need::Labgrid,
        present: python_venv_present,
        what: "python3 with venv",
        package: "python3-venv",
    },
    Requirement {
        need: Need::CycleModel,
        present: || on_path("llvm-mca-19") && on_path("llvm-objdump-19"),
        what: "llvm-mca-19 and llvm-objdump-19",
        package: "llvm-19",
    },
    Requirement {
        need: Need::Browser,
        present: || on_path("chromium"),
        what: "chromium",
        package: "chromium",
    },
];

/// Where the set-up's apt output goes, under the workspace.
pub const SETUP_LOG: &str = "target/xtask/setup.log";

pub const AARCH64_TARGET: &str = "aarch64-unknown-linux-gnu";

/// The labgrid release set-up installs and the tests run.
pub const LABGRID_VERSION: &str = "26.0.1";
/// Where set-up puts labgrid, under the workspace.
pub const LABGRID_VENV_DIR: &str = "target/labgrid-venv";

/// The quantbench checkout this binary was built from.
pub fn workspace_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| std::path::PathBuf::from("."))
}

/// `labgrid-client`: the one `QUANTBENCH_LABGRID_CLIENT` names, else the
/// first on PATH, else the one set-up installed.
pub fn labgrid_client() -> Option<std::path::PathBuf> {
    let on_path = || {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("labgrid-client"))
                .find(|p| p.is_file())
        })
    };
    let installed = || {
        Some(
            workspace_root()
                .join(LABGRID_VENV_DIR)
                .join("bin/labgrid-client"),
        )
        .filter(|p| p.is_file())
    };
    match std::env::var_os("QUANTBENCH_LABGRID_CLIENT") {
        Some(named) => Some(std::path::PathBuf::from(named)).filter(|p| p.is_file()),
        None => on_path().or_else(installed),
    }
}

/// Installs what `needs` lack. Prints one line per action taken.
pub fn ensure(needs: &[Need]) -> Result<(), SetupError> {
    let missing: Vec<&Requirement> = REQUIREMENTS
        .iter()
        .filter(|r| needs.contains(&r.need) && !(r.present)())
        .collect();
    if !missing.is_empty() {
        let packages: Vec<&str> = missing.iter().map(|r| r.package).collect();
        // QUANTBENCH_NO_INSTALL=1: report, never install (for machines whose
        // packages are managed elsewhere, and for tests).
        if !may_install() {
            return Err(SetupError::NotRoot {
                missing: missing
                    .iter()
                    .map(|r| r.what)
                    .collect::<Vec<_>>()
                    .join(", "),
                why: needs
                    .iter()
                    .map(|n| format!("{n:?}"))
                    .collect::<Vec<_>>()
                    .join(" + "),
                packages: packages.join(" "),
            });
        }
        let log = workspace_root().join(SETUP_LOG);
        eprintln!(
            "setup: installing {} with apt-get (its output in {})",
            packages.join(" "),
            log.display()
        );
        // One package-list refresh per process is enough.
        static UPDATED: AtomicBool = AtomicBool::new(false);
        if !UPDATED.swap(true, Ordering::SeqCst) {
            run_logged(Command::new("apt-get").args(["update", "-qq"]), &log)?;
        }
        run_logged(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&packages),
            &log,
        )?;
    }
    // Without leave to install, a missing client is reported where it is
    // needed, with how to install it.
    if needs.contains(&Need::Labgrid) && may_install() && labgrid_client().is_none() {
        install_labgrid()?;
    }
    if needs.contains(&Need::CrossBuild) && !rust_target_installed(AARCH64_TARGET) {
        eprintln!("setup: adding the Rust target {AARCH64_TARGET}");
        run(Command::new("rustup").args(["target", "add", AARCH64_TARGET]))?;
    }
    Ok(())
}

/// labgrid from PyPI into the workspace's own venv (never the system's
/// Python): the version the tests were written against.
fn install_labgrid() -> Result<(), SetupError> {
    let venv = workspace_root().join(LABGRID_VENV_DIR);
    eprintln!(
        "setup: installing labgrid {LABGRID_VERSION} from PyPI into {}",
        venv.display()
    );
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .arg(format!("labgrid=={LABGRID_VERSION}")))
}

/// The packages `needs` lack, as apt names them.
pub fn missing_packages(needs: &[Need]) -> Vec<&'static str> {
    REQUIREMENTS
        .iter()
        .filter(|r| needs.contains(&r.need) && !(r.present)())
        .map(|r| r.package)
        .collect()
}

/// Whether `ensure` installs what is missing (root, and not told not to).
pub fn may_install() -> bool {
    is_root() && std::env::var_os("QUANTBENCH_NO_INSTALL").is_none()
}

fn python_venv_present() -> bool {
    Command::new("python3")
        .args(["-c", "import venv, ensurepip"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `command` with its output appended to `log`; a failure says the
/// command and the log's last lines.
fn run_logged(command: &mut Command, log: &Path) -> Result<(), SetupError> {
    let described = format!("{command:?}");
    let spawn_error = |source| SetupError::Spawn {
        command: described.clone(),
        source,
    };
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(spawn_error)?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(spawn_error)?;
    let err = out.try_clone().map_err(spawn_error)?;
    let status = command
        .stdout(out)
        .stderr(err)
        .status()
        .map_err(spawn_error)?;
    if status.success() {
        return Ok(());
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    Err(SetupError::CommandFailed {
        command: described,
        status: format!(
            "{status}; the end of its output, from {}:\n{}",
            log.display(),
            lines[lines.len().saturating_sub(20)..].join("\n")
        ),
    })
}

fn run(command: &mut Command) -> Result<(), SetupError> {
    let described = format!("{command:?}");
    let status = command.status().map_err(|source| SetupError::Spawn {
        command: described.clone(),
        source,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(SetupError::CommandFailed {
            command: described,
            status: status.to_string(),
        })
    }
}

/// Whether pkg-config knows `library` (its headers are installed).
fn pkg_config_has(library: &str) -> bool {
    Command::new("pkg-config")
        .args(["--exists", library])
        .status()
        .is_ok_and(|s| s.success())
}

pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

fn libclang_present() -> bool {
    if std::env::var_os("LIBCLANG_PATH").is_some() {
        return true;
    }
    let dirs = [
        "/usr/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/local/lib",
    ];
    let llvm_dirs = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("llvm-"))
        .map(|e| e.path().join("lib"));
    dirs.iter()
        .map(Path::new)
        .map(Path::to_path_buf)
        .chain(llvm_dirs)
        .any(|dir| {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.starts_with("libclang")
                        && name.contains(".so")
                        && !name.starts_with("libclang-cpp")
                })
        })
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn rust_target_installed(target: &str) -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == target)
        })
        // Without rustup (a distro toolchain) we cannot add targets anyway;
        // the build will say what is missing.
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_path_finds_sh_and_not_nonsense() {
        assert!(on_path("sh"));
        assert!(!on_path("definitely-not-a-quantbench-tool"));
    }

    #[test]
    fn not_root_error_gives_the_exact_command() {
        let e = SetupError::NotRoot {
            missing: "cmake".into(),
            why: "HostBuild".into(),
            packages: "cmake libclang-dev".into(),
        };
        assert!(e
            .to_string()
            .ends_with("sudo apt-get install -y cmake libclang-dev"));
    }
}
