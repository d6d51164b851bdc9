//! Making a fresh Debian machine ready: the system packages GGML's build,
//! the cross-build and the emulated boards need, and the Rust target.
//! As root it installs them with apt; otherwise it says the exact command.

use std::path::Path;
use std::process::Command;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SetupError {
    #[error(
        "missing {missing} (needed for {why}); install with: sudo apt-get install -y {packages}"
    )]
    NotRoot {
        missing: String,
        why: String,
        packages: String,
    },
    #[error("`{command}` failed ({status}); run it by hand to see why")]
    CommandFailed { command: String, status: String },
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
}

/// What the coming work needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Building GGML for the host (cmake, a C++ compiler, libclang for bindgen).
    HostBuild,
    /// Cross-building the agent for aarch64 boards.
    CrossBuild,
    /// Emulated boards: qemu-user, sshd, network namespaces.
    Testbed,
    /// Faults injected into emulated boards' links by the tests: packet
    /// loss with nftables (this kernel kind has no netem).
    FaultInjection,
    /// A headless browser to check the HTML report renders (tests only).
    Browser,
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
        need: Need::Browser,
        present: || on_path("chromium"),
        what: "chromium",
        package: "chromium",
    },
];

pub const AARCH64_TARGET: &str = "aarch64-unknown-linux-gnu";

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
        let may_install = is_root() && std::env::var_os("QUANTBENCH_NO_INSTALL").is_none();
        if !may_install {
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
        eprintln!("setup: installing {} with apt-get", packages.join(" "));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&packages))?;
    }
    if needs.contains(&Need::CrossBuild) && !rust_target_installed(AARCH64_TARGET) {
        eprintln!("setup: adding the Rust target {AARCH64_TARGET}");
        run(Command::new("rustup").args(["target", "add", AARCH64_TARGET]))?;
    }
    Ok(())
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
