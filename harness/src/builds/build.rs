//! Building the agent binary for a target, identified by its content hash.

use crate::builds::llama_source::PreparedSource;
use std::path::{Path, PathBuf};
use std::process::Command;
use thiserror::Error;

pub const AGENT_BIN: &str = "quantbench-agent";

/// `target/builds/<source folder>/`: cargo folders of non-default builds.
pub const BUILDS_DIR: &str = "target/builds";
/// `target/agents/<hash>/`: non-default builds' agents, kept by hash.
pub const AGENTS_DIR: &str = "target/agents";
/// Rewritten in a build folder and a kept agent's folder on every use:
/// retention (`cargo xtask prune`) goes by it.
pub const LAST_USED_FILE: &str = "last-used";

fn stamp_used(dir: &Path) {
    // A lost stamp only makes the folder look older to `prune`.
    let _ = std::fs::create_dir_all(dir);
    let _ = std::fs::write(dir.join(LAST_USED_FILE), wire::utc_now_rfc3339());
}

#[derive(Debug, Error)]
pub enum BuildError {
    #[error("could not start `{program}`: {source}. Is it installed and on PATH?")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cargo(#[from] bootstrap::cargo_build::BuildFailed),
    #[error("the build finished but {0} is missing")]
    Missing(PathBuf),
    #[error("{0}")]
    Tool(String),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Source(#[from] crate::builds::llama_source::SourceError),
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

/// `rustc --version`, recorded with a run and part of a build's reuse key.
pub fn rustc_version() -> String {
    Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The workspace root, found from this crate's manifest directory.
pub use bootstrap::workspace_root;

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

/// Builds the agent for the host (the `local` target), optimised for the
/// host CPU (see `.cargo/config.toml`). Incremental: a second call with no
/// source change costs only cargo's up-to-date check.
pub fn build_host_agent(
    workspace: &Path,
    source: &PreparedSource,
) -> Result<AgentBuild, BuildError> {
    let mut command = Command::new(cargo());
    command.current_dir(workspace).args([
        "build",
        "--release",
        "--package",
        "remote-agent",
        "--bin",
        AGENT_BIN,
    ]);
    let target_dir = match source.is_default() {
        true => workspace.join("target"),
        false => build_folder(workspace, source).join("host"),
    };
    if !source.is_default() {
        command.arg("--target-dir").arg(&target_dir);
    }
    let reuse = ReuseKey::of(workspace, source, "local", "cc", &[]);
    if let Some(agent) = reuse
        .as_ref()
        .and_then(|k| k.lookup(workspace, host_triple()))
    {
        return Ok(agent);
    }
    source.materialize()?;
    with_source(&mut command, source);
    let path = target_dir.join("release").join(AGENT_BIN);
    let what = "      compiling the agent for this machine (GGML for its CPU: 2-3 minutes on 2 cores, once)";
    let agent = run_agent_build(command, workspace, source, &path, host_triple(), what)?;
    if let Some(key) = reuse {
        key.record(workspace, &agent);
    }
    Ok(agent)
}

/// What a non-default build's agent is made from, as a key: the llama.cpp
/// tree (patches and CMake options included), the profile's flags, the
/// compiler, and quantbench's own agent sources and build settings. An
/// agent recorded under the same key is reused without running cargo (a
/// bisect comes back to the same revisions; an A/B rebuilds neither side).
struct ReuseKey(String);

impl ReuseKey {
    fn of(
        workspace: &Path,
        source: &PreparedSource,
        profile: &str,
        compiler: &str,
        flags: &[&str],
    ) -> Option<ReuseKey> {
        if source.is_default() {
            return None;
        }
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        let identity = serde_json::to_string(&source.identity).ok()?;
        hasher.update(identity.as_bytes());
        hasher.update(crate::builds::llama_source::copy_rules().as_bytes());
        hasher.update(profile.as_bytes());
        for flag in flags {
            hasher.update(flag.as_bytes());
        }
        let version = Command::new(compiler).arg("--version").output().ok()?;
        hasher.update(&version.stdout);
        for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CFLAGS", "CXXFLAGS"] {
            hasher.update(std::env::var(var).unwrap_or_default().as_bytes());
        }
        hasher.update(rustc_version().as_bytes());
        // Cargo's configuration is this checkout's, whatever is built.
        for file in [".cargo/config.toml", "rust-toolchain.toml"] {
            hasher.update(std::fs::read(workspace.join(file)).unwrap_or_default());
        }
        if let Some(revision) = &source.revision {
            // A commit's git tree names every file it builds from.
            hasher.update(b"quantbench tree ");
            hasher.update(revision.tree.as_bytes());
            let digest: String = hasher.finalize()[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            return Some(ReuseKey(digest));
        }
        for file in ["Cargo.lock", "Cargo.toml"] {
            hasher.update(std::fs::read(workspace.join(file)).unwrap_or_default());
        }
        for dir in ["wire", "kernels", "remote-agent"] {
            let mut files = Vec::new();
            let mut stack = vec![workspace.join(dir)];
            while let Some(d) = stack.pop() {
                for entry in std::fs::read_dir(&d).ok()?.flatten() {
                    let path = entry.path();
                    if path.is_dir() {
                        stack.push(path);
                    } else {
                        files.push(path);
                    }
                }
            }
            files.sort();
            for file in files {
                hasher.update(
                    file.strip_prefix(workspace)
                        .ok()?
                        .to_string_lossy()
                        .as_bytes(),
                );
                hasher.update(std::fs::read(&file).ok()?);
            }
        }
        let digest: String = hasher.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Some(ReuseKey(digest))
    }

    fn record_path(&self, workspace: &Path) -> PathBuf {
        workspace.join(AGENTS_DIR).join("built").join(&self.0)
    }

    /// The agent recorded under this key, when it is still there intact.
    fn lookup(&self, workspace: &Path, triple: String) -> Option<AgentBuild> {
        let hash = std::fs::read_to_string(self.record_path(workspace)).ok()?;
        let dir = workspace.join(AGENTS_DIR).join(hash.trim());
        let path = dir.join(AGENT_BIN);
        if file_hash(&path).ok()?.as_str() != hash.trim() {
            return None;
        }
        stamp_used(&dir);
        Some(AgentBuild {
            path,
            hash: hash.trim().to_string(),
            target_triple: triple,
        })
    }

    fn record(&self, workspace: &Path, agent: &AgentBuild) {
        let path = self.record_path(workspace);
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        // A lost record costs a cargo run next time, nothing more.
        let _ = std::fs::write(path, &agent.hash);
    }
}

/// A non-default build's agent, copied to `target/agents/<hash>/`: builds
/// of one source share their cargo folders (the next revision builds
/// incrementally over the last), so the binary a session measures must
/// not be the one the next build overwrites.
fn kept(
    workspace: &Path,
    source: &PreparedSource,
    agent: AgentBuild,
) -> Result<AgentBuild, BuildError> {
    if source.is_default() {
        return Ok(agent);
    }
    let dir = workspace.join(AGENTS_DIR).join(&agent.hash);
    let path = dir.join(AGENT_BIN);
    if file_hash(&path).ok().as_deref() != Some(agent.hash.as_str()) {
        let io = |source| BuildError::Read {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let temp = dir.join(format!(".{AGENT_BIN}.tmp-{}", std::process::id()));
        std::fs::copy(&agent.path, &temp).map_err(io)?;
        std::fs::rename(&temp, &path).map_err(io)?;
    }
    stamp_used(&dir);
    stamp_used(&build_folder(workspace, source));
    Ok(AgentBuild { path, ..agent })
}

/// `target/builds/<source folder>/`: a non-default build's cargo output,
/// one folder per source and profile so a new revision rebuilds only what
/// changed. A commit of this repository has folders of its own
/// (`<source folder>+quantbench`): cargo names a workspace crate's output
/// by its path within the workspace, so the exported commit's `kernels`
/// and the working tree's would overwrite each other's in one folder.
pub fn build_folder(workspace: &Path, source: &PreparedSource) -> PathBuf {
    let folder = match source.revision {
        None => source.folder.clone(),
        Some(_) => format!("{}+quantbench", source.folder),
    };
    workspace.join(BUILDS_DIR).join(folder)
}

fn with_source(command: &mut Command, source: &PreparedSource) {
    if source.revision.is_some() {
        command
            .arg("--manifest-path")
            .arg(source.manifest_dir().join("Cargo.toml"));
    }
    command.args(source.cargo_args());
    for (key, value) in source.cargo_env() {
        command.env(key, value);
    }
}

/// Runs cargo for `source` and returns the agent it made at `built`,
/// leaving the user's files as they were whatever the outcome: a build
/// that patches in another llama-cpp-sys-2 makes cargo write it into
/// Cargo.lock, so the lock file is put back.
fn run_agent_build(
    command: Command,
    workspace: &Path,
    source: &PreparedSource,
    built: &Path,
    triple: String,
    what: &str,
) -> Result<AgentBuild, BuildError> {
    let lock = source.manifest_dir().join("Cargo.lock");
    // Two such builds at once (two runs, a bisect beside a bench) would
    // each put back the lock file the other had changed: they take turns
    // (cargo serialises builds in one folder anyway).
    let _turn = match source.crate_dir {
        Some(_) => Some(take_turn(workspace)?),
        None => None,
    };
    let saved_lock = std::fs::read(&lock).ok();
    let result = run_build(command, built, what)
        .and_then(|()| identify(built, triple))
        .and_then(|agent| kept(workspace, source, agent));
    if let Some(bytes) = saved_lock {
        if std::fs::read(&lock).ok().as_ref() != Some(&bytes) {
            std::fs::write(&lock, bytes).map_err(|source| BuildError::Read {
                path: lock.clone(),
                source,
            })?;
        }
    }
    result
}

/// An exclusive lock on `target/.quantbench-build.lock`, held until the
/// returned file is dropped.
fn take_turn(workspace: &Path) -> Result<std::fs::File, BuildError> {
    let path = workspace.join("target").join(".quantbench-build.lock");
    let io = |source| BuildError::Read {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(workspace.join("target")).map_err(io)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io)?;
    file.lock().map_err(io)?;
    Ok(file)
}

/// Runs an agent build, cargo's output in a log beside the binary and a
/// line saying how far it is while it compiles (a first GGML build takes
/// minutes on a small machine; a reused one says nothing).
fn run_build(command: Command, built: &Path, what: &str) -> Result<(), BuildError> {
    let log = built.with_file_name(format!("{AGENT_BIN}-build.log"));
    bootstrap::cargo_build::follow(command, what, &log)?;
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
        bootstrap::AARCH64_TARGET
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

/// `cargo` set up to cross-compile for `profile` with Debian's gcc as the
/// agent is built (compiler wrappers in `target_dir`, GGML's arch flags,
/// Rust's target features); add the subcommand, `--target` and
/// `--target-dir target_dir`. Other builds for the board (the kernels'
/// tests under qemu) use it so they share the agent's compiled GGML.
pub fn board_cargo(target_dir: &Path, profile: BoardProfile) -> Result<Command, BuildError> {
    let env_triple = profile.target_triple().replace('-', "_");
    let wrappers = write_compiler_wrappers(target_dir, profile)?;
    let mut c = Command::new(cargo());
    c.env(format!("CC_{env_triple}"), &wrappers.0)
        .env(format!("CXX_{env_triple}"), &wrappers.1)
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
            "aarch64-linux-gnu-gcc",
        )
        .env("QUANTBENCH_GGML_ARCH_FLAGS", profile.ggml_arch_flags())
        .env(
            format!("CARGO_TARGET_{}_RUSTFLAGS", env_triple.to_uppercase()),
            format!("-C target-feature={}", profile.rust_target_features()),
        );
    Ok(c)
}

/// The default source's target directory for `profile`'s agent.
pub fn board_target_dir(workspace: &Path, profile: BoardProfile) -> PathBuf {
    workspace.join("target/boards").join(profile.name())
}

/// Cross-builds a fully static agent for `profile`. Each profile has its own
/// target directory, so switching profiles never rebuilds GGML from scratch
/// and a warm build costs only cargo's up-to-date check.
pub fn build_board_agent(
    workspace: &Path,
    profile: BoardProfile,
    builder: Builder,
    source: &PreparedSource,
) -> Result<AgentBuild, BuildError> {
    let triple = profile.target_triple();
    let target_dir = match source.is_default() {
        true => board_target_dir(workspace, profile),
        false => build_folder(workspace, source).join(profile.name()),
    };
    let env_triple = triple.replace('-', "_");
    let mut command = match builder {
        Builder::Cargo => board_cargo(&target_dir, profile)?,
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
            format!("-C target-feature={}", profile.rust_target_features()),
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
    let reuse = ReuseKey::of(
        workspace,
        source,
        profile.name(),
        "aarch64-linux-gnu-gcc",
        &[
            profile.ggml_arch_flags(),
            profile.rust_target_features(),
            match builder {
                Builder::Cargo => "cargo",
                Builder::Cross => "cross",
            },
        ],
    );
    if let Some(agent) = reuse
        .as_ref()
        .and_then(|k| k.lookup(workspace, triple.to_string()))
    {
        return Ok(agent);
    }
    source.materialize()?;
    with_source(&mut command, source);
    let path = target_dir.join(triple).join("release").join(AGENT_BIN);
    let what = format!(
        "      compiling the agent for {} boards (GGML cross-compiled for {triple}: 2-3 minutes on 2 cores, once)",
        profile.name()
    );
    let agent = run_agent_build(command, workspace, source, &path, triple.to_string(), &what)?;
    if let Some(key) = reuse {
        key.record(workspace, &agent);
    }
    Ok(agent)
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
    if !bootstrap::on_path("cross") {
        return Err(BuildError::Tool(
            "`--builder cross` needs cross-rs: cargo install cross (and a container engine); the default builder needs neither".into(),
        ));
    }
    let engine = std::env::var("CROSS_CONTAINER_ENGINE").unwrap_or_else(|_| {
        if bootstrap::on_path("docker") {
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
