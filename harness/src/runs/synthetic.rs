//! Synthetic models on the host: a seed study's architecture at its real
//! sizes, made once by the host agent (`make-model`) and cached under a name
//! that carries everything that decides its bytes (model, layers, weight
//! type, seed, quantbench version, tokenizer), so a cached file is reused
//! only when it would come out the same. Too large for the host's free disk
//! or memory is refused before anything is written.

use crate::builds::build::AgentBuild;
use crate::runs::recipes::cache::agent_json;
use crate::runs::recipes::RecipeError;
use std::path::{Path, PathBuf};
use thiserror::Error;
use wire::synthetic::{spec_for, SpecError, SyntheticSpec};

/// Where `models = ["synthetic:<name>"]` entries start.
pub const PREFIX: &str = "synthetic:";

/// Room kept beside a model being written.
const DISK_MARGIN_BYTES: u64 = 256 << 20;

#[derive(Debug, Error)]
pub enum SyntheticError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("`{0}`: write synthetic:<name> or synthetic:<name>:<layers>, e.g. synthetic:llama3.2-1b or synthetic:gemma3-1b:2")]
    BadEntry(String),
    #[error("{what} needs {need_mb:.0} MB of {resource} but {free_mb:.0} MB are free{place}; free some, or make it smaller with --layers")]
    NoRoom {
        what: String,
        resource: &'static str,
        need_mb: f64,
        free_mb: f64,
        place: String,
    },
    #[error(transparent)]
    Agent(#[from] RecipeError),
}

/// Matrix storage of a synthetic model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    F32,
    F16,
}

impl Weights {
    pub fn parse(text: &str) -> Option<Weights> {
        match text.to_ascii_lowercase().as_str() {
            "f32" => Some(Weights::F32),
            "f16" => Some(Weights::F16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Weights::F32 => "f32",
            Weights::F16 => "f16",
        }
    }

    fn bytes_per_weight(self) -> u64 {
        match self {
            Weights::F32 => 4,
            Weights::F16 => 2,
        }
    }
}

/// A synthetic model to make.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticModel {
    pub spec: SyntheticSpec,
    pub weights: Weights,
    pub seed: u64,
}

impl SyntheticModel {
    /// The model `like` names, with `layers` of its blocks (all when `None`).
    pub fn named(
        like: &str,
        layers: Option<usize>,
        weights: Weights,
        seed: u64,
    ) -> Result<SyntheticModel, SyntheticError> {
        Ok(SyntheticModel {
            spec: spec_for(like, layers)?,
            weights,
            seed,
        })
    }

    /// `synthetic:<name>` or `synthetic:<name>:<layers>` from a model
    /// matrix's `models`; `None` for anything else (a file path).
    pub fn from_entry(entry: &str, seed: u64) -> Option<Result<SyntheticModel, SyntheticError>> {
        let rest = entry.strip_prefix(PREFIX)?;
        let (like, layers) = match rest.split_once(':') {
            Some((like, layers)) => match layers.parse::<usize>() {
                Ok(n) => (like, Some(n)),
                Err(_) => return Some(Err(SyntheticError::BadEntry(entry.to_string()))),
            },
            None => (rest, None),
        };
        Some(
            spec_for(like, layers)
                .map(|spec| SyntheticModel {
                    spec,
                    // F16: what the seed models ship as; the `f32` recipe
                    // widens it (speed depends on the storage, not the values).
                    weights: Weights::F16,
                    seed,
                })
                .map_err(SyntheticError::from),
        )
    }

    /// The file name a run shows for it.
    pub fn file_name(&self) -> String {
        format!(
            "synthetic-{}-{}l-{}-s{}.gguf",
            self.spec.like,
            self.spec.n_layer,
            self.weights.name(),
            self.seed
        )
    }
}

/// What making (or finding) a model gave.
#[derive(Debug, Clone)]
pub struct MadeModel {
    pub path: PathBuf,
    pub file_bytes: u64,
    /// `None` when it came from the cache.
    pub seconds: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
}

/// The borrowed tokenizer: the repository's fixture model.
fn tokenizer(workspace: &Path) -> PathBuf {
    workspace.join("fixtures/stories260K.gguf")
}

/// Makes `model` with the host agent unless the cache has it; `out` (a
/// copy's destination) is optional.
pub fn make(
    agent: &AgentBuild,
    workspace: &Path,
    model: &SyntheticModel,
    out: Option<&Path>,
) -> Result<MadeModel, SyntheticError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RecipeError::Io { path, source }
    };
    let tokenizer = tokenizer(workspace);
    let tokenizer_hash = wire::build_id::content_hash(&tokenizer).map_err(io(&tokenizer))?;
    let cache = workspace.join("target/quantbench-models/synthetic");
    std::fs::create_dir_all(&cache).map_err(io(&cache))?;
    let cached = cache.join(format!(
        "{}-v{}-t{}.gguf",
        model.file_name().trim_end_matches(".gguf"),
        env!("CARGO_PKG_VERSION"),
        tokenizer_hash
    ));
    let path = out.map(Path::to_path_buf).unwrap_or_else(|| cached.clone());
    if path == cached && cached.is_file() {
        return Ok(MadeModel {
            file_bytes: std::fs::metadata(&cached).map_err(io(&cached))?.len(),
            path: cached,
            seconds: None,
            peak_rss_bytes: None,
        });
    }
    check_room(model, &path)?;
    let mut args = vec![
        "make-model".to_string(),
        "--like".into(),
        model.spec.like.clone(),
        "--layers".into(),
        model.spec.n_layer.to_string(),
        "--weights".into(),
        model.weights.name().into(),
        "--seed".into(),
        model.seed.to_string(),
        "--tokenizer".into(),
        tokenizer.display().to_string(),
        "--out".into(),
        path.display().to_string(),
    ];
    if model.spec.n_layer == spec_for(&model.spec.like, None)?.n_layer {
        args.drain(3..5);
    }
    let made = agent_json(agent, &args)?;
    Ok(MadeModel {
        file_bytes: std::fs::metadata(&path).map_err(io(&path))?.len(),
        path,
        seconds: made["seconds"].as_f64(),
        peak_rss_bytes: made["peak_rss_bytes"].as_u64(),
    })
}

/// Refuses a model the host has no disk or memory for, before writing.
fn check_room(model: &SyntheticModel, path: &Path) -> Result<(), SyntheticError> {
    let what = format!(
        "synthetic {} ({} layers, {})",
        model.spec.like,
        model.spec.n_layer,
        model.weights.name()
    );
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let disk_need = model.spec.file_bytes(model.weights.bytes_per_weight()) + DISK_MARGIN_BYTES;
    let checks = [
        (
            "disk",
            disk_need,
            free_disk_bytes(dir),
            format!(" under {}", dir.display()),
        ),
        (
            "memory",
            model.spec.peak_write_bytes(),
            available_memory_bytes(),
            String::new(),
        ),
    ];
    for (resource, need, free, place) in checks {
        // A machine that cannot say is not refused.
        if let Some(free) = free.filter(|&free| free < need) {
            return Err(SyntheticError::NoRoom {
                what,
                resource,
                need_mb: need as f64 / 1e6,
                free_mb: free as f64 / 1e6,
                place,
            });
        }
    }
    Ok(())
}

/// Free bytes for this user on the filesystem holding `dir` (`df`).
fn free_disk_bytes(dir: &Path) -> Option<u64> {
    let out = std::process::Command::new("df")
        .arg("-Pk")
        .arg(dir)
        .output()
        .ok()?;
    wire::probe::df_free_bytes(&String::from_utf8_lossy(&out.stdout))
}

/// `MemAvailable` of this machine.
fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    wire::probe::meminfo_kib(&text, "MemAvailable").map(|kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_entries_name_a_known_model_and_optionally_its_layers() {
        assert!(SyntheticModel::from_entry("fixtures/x.gguf", 1).is_none());
        let full = SyntheticModel::from_entry("synthetic:llama3.2-1b", 1)
            .unwrap()
            .unwrap();
        assert_eq!(full.spec.n_layer, 16);
        let two = SyntheticModel::from_entry("synthetic:gemma3-1b:2", 1)
            .unwrap()
            .unwrap();
        assert_eq!(two.spec.n_layer, 2);
        assert_eq!(two.file_name(), "synthetic-gemma3-1b-2l-f16-s1.gguf");
        for bad in [
            "synthetic:gpt9",
            "synthetic:gemma3-1b:x",
            "synthetic:gemma3-1b:99",
        ] {
            assert!(
                SyntheticModel::from_entry(bad, 1).unwrap().is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_model_larger_than_the_free_disk_is_refused_before_anything_is_written() {
        // A vocabulary of 2^40 tokens makes a file no disk holds.
        let mut model = SyntheticModel::from_entry("synthetic:exaone3.5-2.4b", 1)
            .unwrap()
            .unwrap();
        model.spec.n_vocab = 1 << 40;
        let dir = std::env::temp_dir();
        let e = check_room(&model, &dir.join("never.gguf"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("MB of disk") && e.contains("--layers"), "{e}");
        assert!(!dir.join("never.gguf").exists());
    }
}
