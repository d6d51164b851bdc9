//! Building the agent binary for a target, identified by its content hash.

use std::path::{Path, PathBuf};
use std::process::Command;
use thiserror::Error;

pub const AGENT_BIN: &str = "quantbench-agent";

#[derive(Debug, Error)]
pub enum BuildError {
    #[error("could not start `{program}`: {source}. Is it installed and on PATH?")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("building the agent failed (`{command}` exited with {status}); its output is above")]
    Failed { command: String, status: String },
    #[error("the build finished but {0} is missing")]
    Missing(PathBuf),
    #[error("{0}")]
    Tool(String),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A built agent: where it is and what it is.
#[derive(Debug, Clone)]
pub struct AgentBuild {
    pub path: PathBuf,
    /// First 12 hex digits of the binary's SHA-256, the name it is deployed
    /// under and the `agent_build` column of every row it measures.
    pub hash: String,
    pub target_triple: String,
}

/// The workspace root, found from this crate's manifest directory.
pub use crate::setup::workspace_root;

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

/// Builds the agent for the host (the `local` target), optimised for the
/// host CPU (see `.cargo/config.toml`). Incremental: a second call with no
/// source change costs only cargo's up-to-date check.
pub fn build_host_agent(workspace: &Path) -> Result<AgentBuild, BuildError> {
    let mut command = Command::new(cargo());
    command.current_dir(workspace).args([
        "build",
        "--release",
        "--package",
        "remote-agent",
        "--bin",
        AGENT_BIN,
    ]);
    run_build(command)?;
    let path = workspace.join("target/release").join(AGENT_BIN);
    identify(&path, host_triple())
}

pub(crate) fn run_build(mut command: Command) -> Result<(), BuildError> {
    let described = format!("{command:?}");
    let status = command.status().map_err(|source| BuildError::Spawn {
        program: command.get_program().to_string_lossy().into_owned(),
        source,
    })?;
    if !status.success() {
        return Err(BuildError::Failed {
            command: described,
            status: status.to_string(),
        });
    }
    Ok(())
}

pub fn identify(path: &Path, target_triple: String) -> Result<AgentBuild, BuildError> {
    if !path.exists() {
        return Err(BuildError::Missing(path.to_path_buf()));
    }
    Ok(AgentBuild {
        path: path.to_path_buf(),
        hash: file_hash(path)?,
        target_triple,
    })
}

pub fn file_hash(path: &Path) -> Result<String, BuildError> {
    wire::build_id::content_hash(path).map_err(|source| BuildError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn host_triple() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

/// How to compile for a kind of board. GGML's C/C++ gets `-march`/`-mtune`
/// through a compiler wrapper because llama-cpp-sys-2 pins
/// `GGML_CPU_ARM_ARCH=armv8-a` for non-native aarch64 builds and ignores the
/// environment (a plain cross-build has no `sdot`); the wrapper's flags come
/// last on gcc's command line, so they win. Rust code gets the matching
/// target features (`-C target-cpu=cortex-a76` would make the crate hand
/// `-march=cortex-a76` to gcc, which rejects it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BoardProfile {
    /// Raspberry Pi 5: Cortex-A76, Armv8.2-A with dotprod and fp16.
    Pi5,
    /// Raspberry Pi 4: Cortex-A72, Armv8-A with CRC.
    Pi4,
    /// Any 64-bit Arm board: baseline Armv8-A.
    GenericAarch64,
}

impl BoardProfile {
    pub const ALL: [BoardProfile; 3] = [
        BoardProfile::Pi5,
        BoardProfile::Pi4,
        BoardProfile::GenericAarch64,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BoardProfile::Pi5 => "pi5",
            BoardProfile::Pi4 => "pi4",
            BoardProfile::GenericAarch64 => "generic-aarch64",
        }
    }

    pub fn from_name(name: &str) -> Option<BoardProfile> {
        BoardProfile::ALL.into_iter().find(|p| p.name() == name)
    }

    pub fn target_triple(self) -> &'static str {
        crate::setup::AARCH64_TARGET
    }

    /// Flags appended to every GGML C/C++ compile.
    pub fn ggml_arch_flags(self) -> &'static str {
        match self {
            BoardProfile::Pi5 => "-march=armv8.2-a+dotprod+fp16 -mtune=cortex-a76",
            BoardProfile::Pi4 => "-march=armv8-a+crc -mtune=cortex-a72",
            BoardProfile::GenericAarch64 => "-march=armv8-a",
        }
    }

    /// Rust target features; `crt-static` links glibc statically so the agent
    /// runs on any Raspberry Pi OS whatever its glibc.
    pub fn rust_target_features(self) -> &'static str {
        match self {
            BoardProfile::Pi5 => "+crt-static,+dotprod,+fp16,+rcpc",
            BoardProfile::Pi4 => "+crt-static,+crc",
            BoardProfile::GenericAarch64 => "+crt-static",
        }
    }

    /// The CPU qemu should emulate for a board of this profile.
    pub fn qemu_cpu(self) -> &'static str {
        match self {
            BoardProfile::Pi5 => "cortex-a76",
            BoardProfile::Pi4 => "cortex-a72",
            BoardProfile::GenericAarch64 => "cortex-a53",
        }
    }
}

/// Which tool drives the cross-build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builder {
    /// cargo with Debian's aarch64 cross gcc: no container engine needed.
    Cargo,
    /// `cross` (cross-rs) in a container, configured by Cross.toml.
    Cross,
}

/// Cross-builds a fully static agent for `profile`. Each profile has its own
/// target directory, so switching profiles never rebuilds GGML from scratch
/// and a warm build costs only cargo's up-to-date check.
pub fn build_board_agent(
    workspace: &Path,
    profile: BoardProfile,
    builder: Builder,
) -> Result<AgentBuild, BuildError> {
    let triple = profile.target_triple();
    let target_dir = workspace.join("target/boards").join(profile.name());
    let env_triple = triple.replace('-', "_");
    let rustflags = format!("-C target-feature={}", profile.rust_target_features());
    let mut command = match builder {
        Builder::Cargo => {
            let wrappers = write_compiler_wrappers(&target_dir, profile)?;
            let mut c = Command::new(cargo());
            c.env(format!("CC_{env_triple}"), &wrappers.0)
                .env(format!("CXX_{env_triple}"), &wrappers.1)
                .env(
                    "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
                    "aarch64-linux-gnu-gcc",
                );
            c
        }
        Builder::Cross => {
            check_container_engine()?;
            let mut c = Command::new("cross");
            // Cross.toml's pre-build creates these wrappers in the image; they
            // append QUANTBENCH_GGML_ARCH_FLAGS (passed through) to gcc.
            c.env(format!("CC_{env_triple}"), "quantbench-aarch64-gcc")
                .env(format!("CXX_{env_triple}"), "quantbench-aarch64-g++");
            c
        }
    };
    command
        .current_dir(workspace)
        .env("QUANTBENCH_GGML_ARCH_FLAGS", profile.ggml_arch_flags())
        .env(
            format!("CARGO_TARGET_{}_RUSTFLAGS", env_triple.to_uppercase()),
            rustflags,
        )
        .args([
            "build",
            "--release",
            "--package",
            "remote-agent",
            "--bin",
            AGENT_BIN,
        ])
        .args(["--features", "static-stdcxx", "--target", triple])
        .arg("--target-dir")
        .arg(&target_dir);
    run_build(command)?;
    let path = target_dir.join(triple).join("release").join(AGENT_BIN);
    identify(&path, triple.to_string())
}

/// gcc/g++ wrappers that append the profile's arch flags after the crate's.
fn write_compiler_wrappers(
    target_dir: &Path,
    profile: BoardProfile,
) -> Result<(PathBuf, PathBuf), BuildError> {
    let dir = target_dir.join("cc-wrapper");
    let io = |source| BuildError::Read {
        path: dir.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(io)?;
    let mut paths = Vec::new();
    for (name, real) in [
        ("gcc", "aarch64-linux-gnu-gcc"),
        ("g++", "aarch64-linux-gnu-g++"),
    ] {
        let path = dir.join(format!("quantbench-aarch64-{name}"));
        let script = format!(
            "#!/bin/sh\nexec {real} \"$@\" {}\n",
            profile.ggml_arch_flags()
        );
        // Rewrite only on change so cargo's fingerprints stay valid.
        if std::fs::read_to_string(&path).ok().as_deref() != Some(script.as_str()) {
            std::fs::write(&path, script).map_err(io)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
        }
        paths.push(path);
    }
    Ok((paths[0].clone(), paths[1].clone()))
}

/// `cross` runs the build in a container; without a working engine it fails
/// deep inside with a confusing message, so say it up front.
fn check_container_engine() -> Result<(), BuildError> {
    if !crate::setup::on_path("cross") {
        return Err(BuildError::Tool(
            "`--builder cross` needs cross-rs: cargo install cross (and a container engine); the default builder needs neither".into(),
        ));
    }
    let engine = std::env::var("CROSS_CONTAINER_ENGINE").unwrap_or_else(|_| {
        if crate::setup::on_path("docker") {
            "docker".into()
        } else {
            "podman".into()
        }
    });
    let works = Command::new(&engine)
        .arg("info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if works {
        Ok(())
    } else {
        Err(BuildError::Tool(format!(
            "`--builder cross` needs a running container engine, but `{engine} info` fails (no Docker/Podman daemon?); use the default builder (`--builder cargo`), which needs none"
        )))
    }
}

/// Static-link and instruction checks on a cross-built agent.
pub fn inspect_aarch64_binary(path: &Path) -> Result<BinaryFacts, BuildError> {
    let output = |program: &str, args: &[&str]| -> Result<String, BuildError> {
        let out = Command::new(program)
            .args(args)
            .arg(path)
            .output()
            .map_err(|source| BuildError::Spawn {
                program: program.to_string(),
                source,
            })?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let dynamic = output(
        "aarch64-linux-gnu-readelf",
        &["--dynamic", "--program-headers"],
    )?;
    let needed: Vec<String> = dynamic
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .map(|l| l.trim().to_string())
        .collect();
    let has_interpreter = dynamic.contains("INTERP");
    let disassembly = output("aarch64-linux-gnu-objdump", &["-d", "--no-show-raw-insn"])?;
    let sdot_count = disassembly
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("sdot"))
        .count();
    Ok(BinaryFacts {
        needed,
        has_interpreter,
        sdot_count,
    })
}

#[derive(Debug, Clone)]
pub struct BinaryFacts {
    /// Shared libraries the binary asks for (empty when fully static).
    pub needed: Vec<String>,
    /// True when it names a dynamic loader.
    pub has_interpreter: bool,
    /// Arm dot-product instructions: GGML's fast quantized paths on a Pi 5.
    pub sdot_count: usize,
}
