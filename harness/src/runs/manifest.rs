//! `run.json`: how a run was made, one schema for every kind of job. It is
//! written (temp-then-rename) when the run starts and rewritten as each
//! board starts and finishes a job, so an interrupted run still says what it
//! was, which boards it reached and when.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use wire::files::{write_json, ResultsError};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunManifest {
    pub run_id: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    /// The `--matrix` list as given, e.g. `smoke,model-quick`.
    pub matrix: String,
    /// Each matrix of the list as it ran.
    pub matrices: Vec<MatrixRecord>,
    pub config_path: String,
    /// Seed of the synthetic weights and activations.
    pub seed: u64,
    pub git_commit: String,
    /// The `--target` as given (or the default's board).
    pub target: String,
    pub versions: Versions,
    pub host: HostInfo,
    /// One entry per board, present from the start (not started yet: no
    /// `started_at`).
    pub boards: Vec<BoardOutcome>,
    /// When `bench --resume` picked the run up again, one entry each.
    #[serde(default)]
    pub resumed_at: Vec<String>,
    /// Rows a board wrote that named another board or run, left out of
    /// the merged files: one line per job file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected_rows: Vec<String>,
}

impl RunManifest {
    /// Which llama.cpp the run's agents contain, in one line (the summary,
    /// every plot's header, the report and `compare` show this): each
    /// build's source and tree hash, or the crate version for runs from
    /// before builds were recorded.
    pub fn llama_cpp(&self) -> String {
        let mut labels: Vec<String> = Vec::new();
        for build in &self.versions.agent_builds {
            let label = match &build.llama_cpp {
                Some(id) if id.source == "vendored" => {
                    format!("llama-cpp-sys-2 {} (tree {})", id.crate_version, id.tree)
                }
                Some(id) => id.label(),
                None => continue,
            };
            let label = match &build.quantbench {
                Some(revision) => format!("{label}; {}", revision.label()),
                None => label,
            };
            let label = if build.build == "default" || build.build == label {
                label
            } else {
                format!("{label} [build {}]", build.build)
            };
            if !labels.contains(&label) {
                labels.push(label);
            }
        }
        if labels.is_empty() {
            format!("llama-cpp-sys-2 {}", self.versions.llama_cpp_sys_2)
        } else {
            labels.join("; ")
        }
    }
}

/// One matrix of a run: its kind (`kernel`, `model`) and its spec as run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MatrixRecord {
    pub name: String,
    pub kind: String,
    pub spec: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Versions {
    pub quantbench: String,
    pub llama_cpp_sys_2: String,
    pub rustc: String,
    pub agent_builds: Vec<BuildRecord>,
}

/// One agent build of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildRecord {
    /// `local` or the board profile (`pi5`, ...).
    pub profile: String,
    pub hash: String,
    pub target_triple: String,
    /// Wall time of the build step (a warm build is cargo's up-to-date check).
    pub seconds: f64,
    /// The build's name (`default`, a `[builds.<name>]`, or a source).
    #[serde(default = "default_build")]
    pub build: String,
    /// The llama.cpp it contains (absent in runs from before builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llama_cpp: Option<crate::builds::llama_source::LlamaIdentity>,
    /// The commit of this repository the agent was built from, when not
    /// the run's working tree (`quantbench_revision`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantbench: Option<crate::builds::quantbench_revision::QuantbenchRevision>,
}

fn default_build() -> String {
    "default".into()
}

impl BuildRecord {
    /// This build written so that it names exactly what was measured
    /// again, for keeping an accepted build (`ab --accept-to`): a llama.cpp
    /// source pinned to its commit (`path:...@<commit>`, with the working
    /// tree's quantbench, as a nightly following llama.cpp wants), or
    /// `quantbench@<commit>` for the default llama.cpp with this
    /// repository at a commit (`run_commit`, the run's `git_commit`, when
    /// the build was the working tree). `None` when one source cannot say
    /// it: patches or CMake options, uncommitted changes, or a commit of
    /// this repository with another llama.cpp (write that in bench.toml).
    pub fn pinned_source(&self, run_commit: &str) -> Option<String> {
        let llama = match &self.llama_cpp {
            Some(identity) => identity.pinned()?,
            None => crate::builds::llama_source::LlamaSource::Vendored.describe(),
        };
        let vendored = llama == crate::builds::llama_source::LlamaSource::Vendored.describe();
        match (&self.quantbench, vendored) {
            (None, false) => Some(llama),
            (Some(revision), true) => Some(format!("quantbench@{}", revision.commit)),
            (None, true) => {
                let clean = !run_commit.is_empty()
                    && !run_commit.ends_with("-dirty")
                    && run_commit != "nogit";
                clean.then(|| format!("quantbench@{run_commit}"))
            }
            (Some(_), false) => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub cores: usize,
}

impl HostInfo {
    pub fn current() -> Self {
        let os = std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    l.strip_prefix("PRETTY_NAME=")
                        .map(|v| v.trim_matches('"').to_string())
                })
            })
            .unwrap_or_else(|| std::env::consts::OS.to_string());
        HostInfo {
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            os,
            arch: std::env::consts::ARCH.to_string(),
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }
}

/// What happened on one board, over all its jobs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BoardOutcome {
    pub board: String,
    pub emulated: bool,
    /// UTC, RFC 3339 with milliseconds; absent until the board starts.
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Units (kernel cells, model recipes) by how they ended, over all jobs.
    pub ok: usize,
    pub unsupported: usize,
    pub failed: usize,
    /// The first job failure on this board, if any.
    pub error: Option<String>,
    pub wall_seconds: f64,
    /// Sum of the agent's timed kernel repetitions.
    pub measured_seconds: f64,
    /// The agents' own run time; `wall_seconds` minus this is the host-side
    /// overhead (build check, connect, upload, polling, collection).
    pub agent_seconds: f64,
    /// Bytes uploaded to the board in this run (0: everything was there).
    pub uploaded_bytes: u64,
    pub jobs: Vec<JobOutcome>,
    /// Set when a labgrid coordinator handed the board out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labgrid: Option<FarmRecord>,
}

/// Which labgrid place a board was, so a result names the exact board it
/// came from, and what was done to it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FarmRecord {
    pub place: String,
    pub coordinator: String,
    /// The place's tags when the run started (`board=pi5`, ...).
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
    /// labgrid's reservation token the place was allocated under.
    pub token: Option<String>,
    /// `user@address:port` from the place's NetworkService.
    pub reached_at: Option<String>,
    pub acquired_at: Option<String>,
    pub released_at: Option<String>,
    /// Why the place could not be taken or given back, if so.
    pub error: Option<String>,
    #[serde(default)]
    pub power_cycles: Vec<PowerCycleRecord>,
}

/// One power cycle of a board that did not answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PowerCycleRecord {
    pub at: String,
    /// The failure that led to it.
    pub reason: String,
    /// Seconds from the power cycle until SSH answered; `None`: it did not
    /// within `boot_seconds`.
    pub ssh_after_seconds: Option<f64>,
    pub error: Option<String>,
}

impl BoardOutcome {
    pub fn succeeded(&self) -> bool {
        self.error.is_none() && self.failed == 0
    }
}

/// One job on one board: a kernel matrix, or one model of a model matrix.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobOutcome {
    /// `kernel` or `model`.
    pub kind: String,
    pub matrix: String,
    /// The job's name on the board (its job file and run folder).
    pub job: String,
    pub started_at: String,
    pub finished_at: String,
    pub ok: usize,
    pub unsupported: usize,
    pub failed: usize,
    pub error: Option<String>,
    pub agent_seconds: f64,
    pub measured_seconds: f64,
}

/// The manifest of a running run, rewritten whole on every change.
pub struct ManifestWriter {
    path: PathBuf,
    manifest: Mutex<RunManifest>,
}

impl ManifestWriter {
    /// Writes the manifest for the first time.
    pub fn create(path: &Path, manifest: RunManifest) -> Result<Self, ResultsError> {
        write_json(path, &manifest)?;
        Ok(ManifestWriter {
            path: path.to_path_buf(),
            manifest: Mutex::new(manifest),
        })
    }

    /// Changes the manifest and writes it; a failed write is returned but
    /// the change is kept for the next write.
    pub fn update(&self, change: impl FnOnce(&mut RunManifest)) -> Result<(), ResultsError> {
        let mut manifest = self.manifest.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut manifest);
        write_json(&self.path, &*manifest)
    }

    /// Changes one board's entry.
    pub fn update_board(
        &self,
        board: &str,
        change: impl FnOnce(&mut BoardOutcome),
    ) -> Result<(), ResultsError> {
        self.update(|m| {
            if let Some(entry) = m.boards.iter_mut().find(|b| b.board == board) {
                change(entry);
            }
        })
    }

    pub fn snapshot(&self) -> RunManifest {
        self.manifest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builds::llama_source::LlamaIdentity;
    use crate::builds::quantbench_revision::QuantbenchRevision;

    #[test]
    fn an_accepted_build_is_pinned_to_what_was_measured() {
        let identity = |source: &str, commit: Option<&str>| LlamaIdentity {
            source: source.into(),
            crate_version: "0.1.161".into(),
            commit: commit.map(str::to_string),
            tree: "t".into(),
            patches: Vec::new(),
            cmake: Default::default(),
            lacks: Vec::new(),
        };
        let record = |llama: Option<LlamaIdentity>, quantbench: Option<&str>| BuildRecord {
            profile: "local".into(),
            hash: "h".into(),
            target_triple: "x".into(),
            seconds: 0.0,
            build: "new".into(),
            llama_cpp: llama,
            quantbench: quantbench.map(|c| QuantbenchRevision {
                rev: "HEAD~1".into(),
                commit: c.into(),
                tree: "t".into(),
            }),
        };
        // A llama.cpp checkout followed at a branch: pinned to its commit.
        let followed = record(
            Some(identity(
                "path:/srv/llama.cpp@origin/master",
                Some("0c1e57098bba"),
            )),
            None,
        );
        assert_eq!(
            followed.pinned_source("abc1234").as_deref(),
            Some("path:/srv/llama.cpp@0c1e57098bba")
        );
        // Its working tree with uncommitted changes names no one tree.
        let dirty = record(
            Some(identity("path:/srv/llama.cpp", Some("0c1e57098bba-dirty"))),
            None,
        );
        assert_eq!(dirty.pinned_source("abc1234"), None);
        // The default build: this repository at the run's commit.
        let default = record(Some(identity("vendored", None)), None);
        assert_eq!(
            default.pinned_source("abc1234").as_deref(),
            Some("quantbench@abc1234")
        );
        assert_eq!(default.pinned_source("abc1234-dirty"), None);
        assert_eq!(default.pinned_source("nogit"), None);
        // A commit of this repository: that commit.
        let commit = record(Some(identity("vendored", None)), Some("1a2b3c4d5e6f"));
        assert_eq!(
            commit.pinned_source("abc1234").as_deref(),
            Some("quantbench@1a2b3c4d5e6f")
        );
        // A commit with another llama.cpp: bench.toml has to say it.
        let both = record(Some(identity("crate:0.1.140", None)), Some("1a2b3c4d5e6f"));
        assert_eq!(both.pinned_source("abc1234"), None);
        // Runs from before builds were recorded: the default.
        assert_eq!(
            record(None, None).pinned_source("abc1234").as_deref(),
            Some("quantbench@abc1234")
        );
    }

    fn manifest() -> RunManifest {
        RunManifest {
            run_id: "r".into(),
            started_at: "2026-11-25T00:00:00Z".into(),
            finished_at: None,
            matrix: "smoke".into(),
            matrices: Vec::new(),
            config_path: "bench.toml".into(),
            seed: 42,
            git_commit: "abc".into(),
            target: "sim1".into(),
            versions: Versions {
                quantbench: "0".into(),
                llama_cpp_sys_2: "0".into(),
                rustc: "r".into(),
                agent_builds: Vec::new(),
            },
            host: HostInfo::current(),
            boards: vec![BoardOutcome {
                board: "sim1".into(),
                ..Default::default()
            }],
            resumed_at: Vec::new(),
            rejected_rows: Vec::new(),
        }
    }

    #[test]
    fn board_updates_reach_the_file_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.json");
        let writer = ManifestWriter::create(&path, manifest()).unwrap();
        let on_disk: RunManifest = wire::files::read_json(&path).unwrap();
        assert!(on_disk.boards[0].started_at.is_none());
        writer
            .update_board("sim1", |b| b.started_at = Some("t0".into()))
            .unwrap();
        writer
            .update_board("nope", |b| b.started_at = Some("never".into()))
            .unwrap();
        let on_disk: RunManifest = wire::files::read_json(&path).unwrap();
        assert_eq!(on_disk.boards[0].started_at.as_deref(), Some("t0"));
        assert_eq!(on_disk.boards.len(), 1);
    }
}
