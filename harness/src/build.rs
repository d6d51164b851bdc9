//! Building the agent binary for a target, identified by its content hash.

use sha2::{Digest, Sha256};
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
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

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
    let bytes = std::fs::read(path).map_err(|source| BuildError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let digest = Sha256::digest(&bytes);
    Ok(digest.iter().take(6).map(|b| format!("{b:02x}")).collect())
}

fn host_triple() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}
