//! Which llama.cpp an agent is built from: the pinned crate's own copy
//! (`vendored`), another `llama-cpp-sys-2` version's copy (`crate:0.1.140`),
//! or a local checkout (`path:../llama.cpp`, at a git revision with
//! `path:../llama.cpp@<rev>`), plus patch files and GGML CMake options.
//!
//! `llama-cpp-sys-2`'s build script compiles the `llama.cpp/` folder beside
//! it and reads nothing that points it elsewhere, so a non-default source is
//! built through a copy of the crate (`target/llama-sources/<key>/`) whose
//! `llama.cpp/` is the chosen tree, given to cargo with
//! `--config patch.crates-io.llama-cpp-sys-2.path=...`. The copy's folder
//! depends on where the source comes from, not on its revision, and files
//! are rewritten only when their bytes change: a new revision of one
//! checkout is an incremental GGML build in the same folders.
//!
//! Before cargo runs, the tree's headers are checked for what our FFI
//! (`kernels`) calls: a missing required function is one line naming it
//! and the sources known to work; a missing optional one (per-tensor
//! quantize overrides, importance data) becomes a capability the build
//! lacks, compiled out of `kernels` and switched off in the recipes.

use crate::builds::quantbench_revision::QuantbenchRevision;
use crate::builds::source_tree::{
    copy_tree, git_export, git_head, resolve_rev, sync_tree, tree_hash,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use thiserror::Error;

/// The crate our FFI is written against; the copy of another source says
/// this version so that it satisfies the workspace's `=` requirement.
const SYS_CRATE: &str = "llama-cpp-sys-2";

/// The pinned llama-cpp-sys-2 version, read from the workspace manifest.
pub fn llama_cpp_sys_version(workspace: &Path) -> String {
    std::fs::read_to_string(workspace.join("Cargo.toml"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("llama-cpp-sys-2"))
                .and_then(|l| l.split("version = \"").nth(1))
                .and_then(|v| v.split('"').next())
                .map(|v| v.trim_start_matches('=').to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// `target/llama-sources/<source folder>/`: the crate copies.
pub const SOURCES_DIR: &str = "target/llama-sources";

/// Oldest and newest sources a build has been made from and measured.
pub const KNOWN_TO_WORK: &str = "llama-cpp-sys-2 0.1.140 (oldest checked) to 0.1.161 (pinned)";

/// Functions and types `kernels` calls; a source without one of them
/// cannot be built.
const REQUIRED: &[&str] = &[
    "gguf_init_from_file",
    "gguf_init_empty",
    "gguf_get_n_tensors",
    "gguf_get_tensor_name",
    "gguf_get_tensor_type",
    "gguf_find_key",
    "gguf_get_arr_n",
    "gguf_get_arr_str",
    "gguf_set_val_u32",
    "gguf_set_val_f32",
    "gguf_set_val_str",
    "gguf_set_arr_str",
    "gguf_set_arr_data",
    "gguf_add_tensor",
    "gguf_write_to_file",
    "gguf_free",
    "ggml_init",
    "ggml_new_tensor_2d",
    "ggml_get_type_traits",
    "ggml_threadpool_new",
    "ggml_threadpool_params_default",
    "ggml_backend_alloc_ctx_tensors_from_buft",
    "ggml_backend_tensor_set",
    "llama_model_quantize",
    "llama_model_quantize_default_params",
    "llama_model_load_from_file",
    "llama_init_from_model",
    "llama_model_get_vocab",
    "llama_vocab_n_tokens",
    "llama_vocab_bos",
    "llama_get_memory",
    "llama_memory_clear",
    "llama_memory_seq_rm",
    "llama_state_seq_get_size",
    "ggml_blck_size",
    "llama_model_n_embd",
    "llama_model_n_head",
    "flash_attn_type",
    "type_k",
    "type_v",
    "llama_decode",
    "llama_get_logits_ith",
    "llama_tokenize",
    "llama_token_to_piece",
    "llama_model_n_params",
    "llama_model_size",
];

/// Parts of the API `kernels` can do without, each switching off what
/// needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// `llama_model_tensor_override`: per-tensor types when quantizing
    /// (the adaptive recipes and explicit layer types).
    TensorOverrides,
    /// `llama_model_imatrix_data`: importance data given to the quantizer
    /// (the `+imatrix` recipes).
    ImatrixData,
    /// `llama_load_mode`: the load mode as one enum (newer llama.cpp);
    /// without it the same modes are `use_mmap`/`use_mlock` flags, so
    /// nothing is switched off.
    LoadModeEnum,
}

impl Capability {
    pub const ALL: [Capability; 3] = [
        Capability::TensorOverrides,
        Capability::ImatrixData,
        Capability::LoadModeEnum,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Capability::TensorOverrides => "tensor-overrides",
            Capability::ImatrixData => "imatrix-data",
            Capability::LoadModeEnum => "load-mode-enum",
        }
    }

    /// The header name whose absence means the source lacks it.
    fn symbol(self) -> &'static str {
        match self {
            Capability::TensorOverrides => "llama_model_tensor_override",
            Capability::ImatrixData => "llama_model_imatrix_data",
            Capability::LoadModeEnum => "llama_load_mode",
        }
    }
}

#[derive(Debug, Error)]
pub enum SourceError {
    #[error("build `{build}`: {message}")]
    Invalid { build: String, message: String },
    #[error("build `{build}`: {path}: {source}")]
    Io {
        build: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where a build's llama.cpp comes from, written `vendored`,
/// `crate:<version>`, `path:<dir>` or `path:<dir>@<git revision>`, in
/// `bench.toml` and on the command line alike.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LlamaSource {
    #[default]
    Vendored,
    Crate(String),
    Checkout {
        path: PathBuf,
        rev: Option<String>,
    },
}

impl LlamaSource {
    pub fn parse(text: &str) -> Result<LlamaSource, String> {
        let text = text.trim();
        if text == "vendored" {
            return Ok(LlamaSource::Vendored);
        }
        if let Some(version) = text.strip_prefix("crate:") {
            let valid = !version.is_empty()
                && version
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+'));
            return if valid {
                Ok(LlamaSource::Crate(version.to_string()))
            } else {
                Err(format!(
                    "`{text}`: a crate version looks like `crate:0.1.140`"
                ))
            };
        }
        if let Some(rest) = text.strip_prefix("path:") {
            // The revision follows the last `@` and may hold `/`
            // (`origin/master`); a folder whose own name has an `@` is
            // taken whole when it exists as written.
            let (path, rev) = match rest.rsplit_once('@') {
                Some((path, rev)) if !rev.is_empty() && !Path::new(rest).is_dir() => {
                    (path, Some(rev.to_string()))
                }
                _ => (rest, None),
            };
            if path.is_empty() {
                return Err(format!(
                    "`{text}`: give the folder of a llama.cpp checkout after `path:`"
                ));
            }
            return Ok(LlamaSource::Checkout {
                path: PathBuf::from(path),
                rev,
            });
        }
        Err(format!(
            "`{text}` is not a llama.cpp source: use `vendored`, `crate:<llama-cpp-sys-2 version>`, `path:<llama.cpp checkout>` or `path:<checkout>@<git revision>`"
        ))
    }

    pub fn describe(&self) -> String {
        match self {
            LlamaSource::Vendored => "vendored".into(),
            LlamaSource::Crate(v) => format!("crate:{v}"),
            LlamaSource::Checkout { path, rev: None } => format!("path:{}", path.display()),
            LlamaSource::Checkout {
                path,
                rev: Some(rev),
            } => format!("path:{}@{rev}", path.display()),
        }
    }
}

impl Serialize for LlamaSource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.describe())
    }
}

impl<'de> Deserialize<'de> for LlamaSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        LlamaSource::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// One named build in `bench.toml`:
///
/// ```toml
/// [builds.upstream]
/// llama = "path:../llama.cpp@master"   # or "crate:0.1.140", "vendored"
/// patches = ["patches/q4_0-kernel.patch"] # applied with `patch -p1` in llama.cpp/
/// cmake = { GGML_CPU_REPACK = "OFF" }   # GGML/llama.cpp CMake options
/// quantbench = "HEAD~1"                  # our agent from a commit of this repository
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildSpec {
    #[serde(default)]
    pub llama: LlamaSource,
    #[serde(default)]
    pub patches: Vec<PathBuf>,
    #[serde(default)]
    pub cmake: BTreeMap<String, String>,
    /// A git revision of this repository whose agent (kernels, remote
    /// agent) is built instead of the working tree's
    /// (`quantbench_revision`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantbench: Option<String>,
}

impl BuildSpec {
    pub fn is_default(&self) -> bool {
        *self == BuildSpec::default()
    }
}

/// A patch file of a build, by name and content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchRecord {
    pub file: String,
    pub sha256: String,
}

/// What a build's llama.cpp is: recorded in `run.json`, compiled into the
/// agent (`kernels::llama_source`, the rows' `llama_cpp` column) and shown
/// wherever figures are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LlamaIdentity {
    /// The source as written (`vendored`, `crate:0.1.140`, `path:...@rev`).
    pub source: String,
    /// The `llama-cpp-sys-2` whose build script compiled it.
    pub crate_version: String,
    /// The checkout's commit, when it is a git checkout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// SHA-256 (12 hex digits) of the llama.cpp tree as built: every file's
    /// path and bytes after patches and CMake options.
    pub tree: String,
    #[serde(default)]
    pub patches: Vec<PatchRecord>,
    #[serde(default)]
    pub cmake: BTreeMap<String, String>,
    /// Optional parts of the API the source lacks.
    #[serde(default)]
    pub lacks: Vec<Capability>,
}

impl LlamaIdentity {
    /// One short line: `crate:0.1.140 tree 1a2b3c4d5e6f`, with the commit
    /// and the patch count when there are any.
    pub fn label(&self) -> String {
        let mut label = self.source.clone();
        if let Some(commit) = &self.commit {
            if !label.contains(commit.as_str()) {
                label.push_str(&format!(" ({commit})"));
            }
        }
        label.push_str(&format!(" tree {}", self.tree));
        if !self.patches.is_empty() {
            label.push_str(&format!(" +{} patch(es)", self.patches.len()));
        }
        label
    }

    pub fn lacks(&self, capability: Capability) -> bool {
        self.lacks.contains(&capability)
    }

    /// The source written so that it names exactly this tree again (a
    /// checkout at its commit), for keeping an accepted build; `None` when
    /// a source string cannot say it (patches, CMake options, a working
    /// tree with uncommitted changes).
    pub fn pinned(&self) -> Option<String> {
        if !self.patches.is_empty() || !self.cmake.is_empty() {
            return None;
        }
        match LlamaSource::parse(&self.source).ok()? {
            LlamaSource::Checkout { path, .. } => {
                let commit = self.commit.as_ref().filter(|c| !c.ends_with("-dirty"))?;
                Some(format!("path:{}@{commit}", path.display()))
            }
            other => Some(other.describe()),
        }
    }
}

/// A build ready for cargo.
#[derive(Debug, Clone)]
pub struct PreparedSource {
    pub name: String,
    pub identity: LlamaIdentity,
    /// The crate copy to patch in, `None` for the vendored default.
    pub crate_dir: Option<PathBuf>,
    /// A folder name for this build's crate copy and cargo target folders:
    /// one per source location, whatever its revision or build name, so a
    /// new revision of a checkout is an incremental build.
    pub folder: String,
    /// How to write the crate copy (`materialize`), `None` for the default.
    plan: Option<std::sync::Arc<SourcePlan>>,
    /// The commit of this repository the agent is built from, `None` for
    /// the working tree.
    pub revision: Option<QuantbenchRevision>,
    /// Where `revision` is exported and built.
    pub workspace: PathBuf,
}

impl PreparedSource {
    /// The build in one line: its llama.cpp, and the commit of this
    /// repository when it is not the working tree.
    pub fn label(&self) -> String {
        match &self.revision {
            None => self.identity.label(),
            Some(revision) => format!("{}; {}", self.identity.label(), revision.label()),
        }
    }

    /// The working tree with the pinned crate's own llama.cpp: built in
    /// cargo's usual folder, shared with `cargo build` and `cargo test`.
    pub fn is_default(&self) -> bool {
        self.crate_dir.is_none() && self.revision.is_none()
    }

    /// The manifest cargo builds: the workspace's, or the exported
    /// revision's.
    pub fn manifest_dir(&self) -> PathBuf {
        match &self.revision {
            None => self.workspace.clone(),
            Some(_) => QuantbenchRevision::checkout(&self.workspace),
        }
    }

    /// How the agent binary names its llama.cpp (`kernels::llama_source`,
    /// the rows' `llama_cpp` column): `vendored`, or the identity's label.
    pub fn agent_label(&self) -> String {
        match self.crate_dir {
            None => "vendored".into(),
            Some(_) => self.identity.label(),
        }
    }

    /// Environment for cargo: what `kernels/build.rs` reads. The default
    /// build sets none, so it shares cargo's output with plain
    /// `cargo build` and `cargo test`.
    pub fn cargo_env(&self) -> Vec<(String, String)> {
        if self.crate_dir.is_none() {
            return Vec::new();
        }
        let lacks: Vec<&str> = self.identity.lacks.iter().map(|c| c.name()).collect();
        vec![
            ("QUANTBENCH_LLAMA_LACKS".into(), lacks.join(",")),
            ("QUANTBENCH_LLAMA_ID".into(), self.agent_label()),
        ]
    }

    /// Arguments that make cargo build against this source.
    pub fn cargo_args(&self) -> Vec<String> {
        match &self.crate_dir {
            None => Vec::new(),
            Some(dir) => vec![
                "--config".into(),
                format!(
                    "patch.crates-io.{SYS_CRATE}.path={}",
                    toml_string(&dir.display().to_string())
                ),
            ],
        }
    }
}

fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// Prepares build `name`: finds or fetches its source, checks its headers,
/// applies its patches and CMake options in a staging copy, and brings
/// the build's crate copy up to date with it. `base` resolves the spec's
/// relative paths (the config's folder).
pub fn prepare(
    workspace: &Path,
    name: &str,
    spec: &BuildSpec,
    base: &Path,
) -> Result<PreparedSource, SourceError> {
    let invalid = |message: String| SourceError::Invalid {
        build: name.to_string(),
        message,
    };
    if let Some(rev) = &spec.quantbench {
        // The commit is checked first (seconds), then its llama.cpp.
        let revision = QuantbenchRevision::resolve(workspace, rev).map_err(invalid)?;
        let llama = BuildSpec {
            quantbench: None,
            ..spec.clone()
        };
        let source = prepare(workspace, name, &llama, base)?;
        return Ok(PreparedSource {
            revision: Some(revision),
            ..source
        });
    }
    let pinned = llama_cpp_sys_version(workspace);
    if spec.is_default() {
        return vendored_named(workspace, name, &pinned).map_err(|e| match e {
            VendoredError::Io(path, source) => SourceError::Io {
                build: name.to_string(),
                path,
                source,
            },
            VendoredError::Other(message) => invalid(message),
        });
    }
    let (crate_version, tree_from, commit) = match &spec.llama {
        LlamaSource::Vendored => {
            let dir = registry_crate(&pinned).map_err(invalid)?;
            (
                pinned.clone(),
                TreeFrom::Folder(dir.join("llama.cpp")),
                None,
            )
        }
        LlamaSource::Crate(version) => {
            let dir = registry_crate(version).map_err(invalid)?;
            (
                version.clone(),
                TreeFrom::Folder(dir.join("llama.cpp")),
                None,
            )
        }
        LlamaSource::Checkout { path, rev } => {
            let path = if path.is_absolute() {
                path.clone()
            } else {
                base.join(path)
            };
            check_llama_tree(&path).map_err(invalid)?;
            let commit = match rev {
                Some(rev) => Some(resolve_rev(&path, rev).map_err(invalid)?),
                None => git_head(&path),
            };
            let from = match rev {
                Some(_) => TreeFrom::GitRev {
                    repo: path.clone(),
                    commit: commit.clone().unwrap_or_default(),
                },
                None => TreeFrom::Folder(path.clone()),
            };
            (pinned.clone(), from, commit)
        }
    };
    let patches: Vec<(PathBuf, PatchRecord)> = spec
        .patches
        .iter()
        .map(|p| {
            let path = if p.is_absolute() {
                p.clone()
            } else {
                base.join(p)
            };
            let hash = wire::build_id::content_hash(&path)
                .map_err(|e| invalid(format!("patch {}: {e}", path.display())))?;
            Ok((
                path.clone(),
                PatchRecord {
                    file: p.display().to_string(),
                    sha256: hash,
                },
            ))
        })
        .collect::<Result<_, SourceError>>()?;
    for key in spec.cmake.keys() {
        if !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || key.is_empty() {
            return Err(invalid(format!(
                "CMake option `{key}`: names are letters, digits and `_` (e.g. GGML_CPU_REPACK)"
            )));
        }
    }

    let plan = SourcePlan {
        build: name.to_string(),
        describe: spec.llama.describe(),
        pinned: pinned.clone(),
        crate_version,
        tree_from,
        commit,
        patches,
        cmake: spec.cmake.clone(),
    };
    let folder = folder_name(&spec.llama);
    let sources = workspace.join(SOURCES_DIR);
    // Staged once now, so every check (revision, patches, headers) runs
    // before any build; the build stages it again into its folder.
    let staging = sources.join(format!("{folder}.check-{}", std::process::id()));
    let identity = plan.stage(&staging);
    let _ = std::fs::remove_dir_all(&staging);
    Ok(PreparedSource {
        name: name.to_string(),
        identity: identity?,
        crate_dir: Some(sources.join(&folder)),
        folder,
        plan: Some(std::sync::Arc::new(plan)),
        revision: None,
        workspace: workspace.to_path_buf(),
    })
}

/// How to make a source's crate copy: resolved paths, revision and patches.
#[derive(Debug)]
struct SourcePlan {
    build: String,
    describe: String,
    pinned: String,
    crate_version: String,
    tree_from: TreeFrom,
    commit: Option<String>,
    patches: Vec<(PathBuf, PatchRecord)>,
    cmake: BTreeMap<String, String>,
}

impl SourcePlan {
    fn invalid(&self, message: String) -> SourceError {
        SourceError::Invalid {
            build: self.build.clone(),
            message,
        }
    }

    fn io(&self, path: &Path) -> impl Fn(std::io::Error) -> SourceError {
        let (build, path) = (self.build.clone(), path.to_path_buf());
        move |source| SourceError::Io {
            build: build.clone(),
            path: path.clone(),
            source,
        }
    }

    /// Writes the crate copy into `staging` (created afresh): the crate's
    /// files, the llama.cpp tree, patches applied, headers checked, CMake
    /// options and the manifest's version set. Returns what it is.
    fn stage(&self, staging: &Path) -> Result<LlamaIdentity, SourceError> {
        let _ = std::fs::remove_dir_all(staging);
        let crate_dir = registry_crate(&self.crate_version).map_err(|m| self.invalid(m))?;
        copy_tree(&crate_dir, staging, &|rel| rel == Path::new("llama.cpp"))
            .map_err(self.io(staging))?;
        let llama = staging.join("llama.cpp");
        match &self.tree_from {
            TreeFrom::Folder(dir) => {
                copy_tree(dir, &llama, &|rel| is_checkout_clutter(rel)).map_err(self.io(dir))?
            }
            TreeFrom::GitRev { repo, commit } => {
                git_export(repo, commit, &llama).map_err(|m| self.invalid(m))?
            }
        }
        for (path, record) in &self.patches {
            apply_patch(path, &llama)
                .map_err(|m| self.invalid(format!("patch {}: {m}", record.file)))?;
        }
        let lacks = check_headers(&llama).map_err(|missing| {
            self.invalid(format!(
                "{} lacks {missing}, which quantbench's FFI calls; sources known to work: {KNOWN_TO_WORK}",
                self.describe
            ))
        })?;
        set_cmake_options(&llama, &self.cmake).map_err(self.io(&llama))?;
        set_manifest_version(staging, &self.pinned).map_err(|m| self.invalid(m))?;
        Ok(LlamaIdentity {
            source: self.describe.clone(),
            crate_version: self.crate_version.clone(),
            commit: self.commit.clone(),
            tree: tree_hash(&llama).map_err(self.io(&llama))?,
            patches: self.patches.iter().map(|(_, r)| r.clone()).collect(),
            cmake: self.cmake.clone(),
            lacks,
        })
    }
}

/// Which tree the crate copy holds now: written after each sync.
const TREE_MARKER: &str = ".quantbench-tree";

impl PreparedSource {
    /// Brings the build's crate copy to this source, rewriting only the
    /// files that differ (several builds of one checkout share the copy and
    /// its cargo folders, so the next revision is an incremental build).
    /// Nothing to do for the default build, or when the copy holds it.
    pub fn materialize(&self) -> Result<(), SourceError> {
        if let Some(revision) = &self.revision {
            revision
                .materialize(&self.workspace)
                .map_err(|message| SourceError::Invalid {
                    build: self.name.clone(),
                    message,
                })?;
        }
        let (Some(plan), Some(dir)) = (&self.plan, &self.crate_dir) else {
            return Ok(());
        };
        let marker = dir.join(TREE_MARKER);
        // The tree and the rules the copy was written by.
        let mut hasher = Sha256::new();
        hasher.update(self.identity.tree.as_bytes());
        hasher.update(copy_rules().as_bytes());
        let written: String = hasher.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if std::fs::read_to_string(&marker).ok().as_deref() == Some(written.as_str()) {
            return Ok(());
        }
        let staging = dir.with_extension(format!("staging-{}", std::process::id()));
        let staged = plan.stage(&staging);
        let result = staged.and_then(|identity| {
            if identity.tree != self.identity.tree {
                return Err(plan.invalid(format!(
                    "{} changed while quantbench was using it (tree {} then {}); run again once it is settled",
                    plan.describe, self.identity.tree, identity.tree
                )));
            }
            let _ = std::fs::remove_file(&marker);
            sync_tree(&staging, dir).map_err(plan.io(dir))?;
            std::fs::write(&marker, &written).map_err(plan.io(&marker))
        });
        let _ = std::fs::remove_dir_all(&staging);
        result
    }
}

/// The default build: the pinned crate's own llama.cpp, used in place.
pub fn vendored(workspace: &Path) -> Result<PreparedSource, SourceError> {
    prepare(workspace, "default", &BuildSpec::default(), workspace)
}

enum VendoredError {
    Io(PathBuf, std::io::Error),
    Other(String),
}

fn vendored_named(
    workspace: &Path,
    name: &str,
    pinned: &str,
) -> Result<PreparedSource, VendoredError> {
    let dir = registry_crate(pinned).map_err(VendoredError::Other)?;
    let llama = dir.join("llama.cpp");
    let lacks = check_headers(&llama).map_err(|missing| {
        VendoredError::Other(format!(
            "the pinned llama-cpp-sys-2 {pinned} lacks {missing}, which quantbench's FFI calls"
        ))
    })?;
    let tree = tree_hash(&llama).map_err(|e| VendoredError::Io(llama.clone(), e))?;
    Ok(PreparedSource {
        name: name.to_string(),
        identity: LlamaIdentity {
            source: LlamaSource::Vendored.describe(),
            crate_version: pinned.to_string(),
            commit: None,
            tree,
            patches: Vec::new(),
            cmake: BTreeMap::new(),
            lacks,
        },
        crate_dir: None,
        folder: "default".into(),
        plan: None,
        revision: None,
        workspace: workspace.to_path_buf(),
    })
}

#[derive(Debug)]
enum TreeFrom {
    Folder(PathBuf),
    GitRev { repo: PathBuf, commit: String },
}

/// `<kind>-<hash of where its source is>`: one folder per source location,
/// whatever its revision, patches or build name.
fn folder_name(source: &LlamaSource) -> String {
    let location = match source {
        LlamaSource::Checkout { path, .. } => format!("path:{}", path.display()),
        other => other.describe(),
    };
    let mut hasher = Sha256::new();
    hasher.update(location.as_bytes());
    let digest: String = hasher.finalize()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let kind = match source {
        LlamaSource::Vendored => "vendored",
        LlamaSource::Crate(_) => "crate",
        LlamaSource::Checkout { .. } => "checkout",
    };
    format!("{kind}-{digest}")
}

/// The registry's copy of `llama-cpp-sys-2` at `version`, downloaded by
/// `cargo info` when it is not there yet.
pub fn registry_crate(version: &str) -> Result<PathBuf, String> {
    let find = || -> Option<PathBuf> {
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
        let registries = std::fs::read_dir(home.join("registry/src")).ok()?;
        registries
            .flatten()
            .map(|r| r.path().join(format!("{SYS_CRATE}-{version}")))
            .find(|p| p.join("Cargo.toml").is_file() && p.join("llama.cpp").is_dir())
    };
    if let Some(dir) = find() {
        return Ok(dir);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args(["info", &format!("{SYS_CRATE}@{version}")])
        .current_dir(std::env::temp_dir())
        .output()
        .map_err(|e| format!("could not run `{cargo} info`: {e}"))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr);
        let line = said
            .lines()
            .find(|l| l.contains("error"))
            .unwrap_or("no reason given")
            .trim();
        return Err(format!(
            "{SYS_CRATE} {version} could not be fetched ({line}); check the version on crates.io and the network"
        ));
    }
    find().ok_or_else(|| {
        format!("{SYS_CRATE} {version} was fetched but its source is not in the cargo registry")
    })
}

/// A folder that holds llama.cpp: its public header and its CMake build.
fn check_llama_tree(path: &Path) -> Result<(), String> {
    if !path.is_dir() {
        return Err(format!(
            "{} is not a folder: give the folder of a llama.cpp checkout",
            path.display()
        ));
    }
    let needed = ["include/llama.h", "CMakeLists.txt", "ggml/include/ggml.h"];
    match needed.iter().find(|n| !path.join(n).is_file()) {
        Some(missing) => Err(format!(
            "{} is not a llama.cpp tree (it has no {missing}); give the top folder of a llama.cpp checkout",
            path.display()
        )),
        None => Ok(()),
    }
}

/// Hidden entries and build output of a checkout are not its source.
fn is_checkout_clutter(rel: &Path) -> bool {
    let first = rel.components().next();
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.starts_with('.')
        || matches!(
            first
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .as_deref(),
            Some("build") | Some("target")
        ) && rel.components().count() == 1
}

/// `patch -p1` in the llama.cpp folder; a patch that does not apply
/// cleanly is refused with patch's own first complaint.
fn apply_patch(patch_file: &Path, tree: &Path) -> Result<(), String> {
    let run = |dry: bool| {
        let mut command = Command::new("patch");
        command
            .args(["-p1", "--batch", "--forward", "--silent", "-d"])
            .arg(tree)
            .arg("-i")
            .arg(patch_file);
        if dry {
            command.arg("--dry-run");
        }
        command.output()
    };
    let out = run(true).map_err(|e| format!("could not run `patch`: {e}"))?;
    if !out.status.success() {
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let reason = said
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("patch failed")
            .to_string();
        return Err(format!(
            "does not apply to this llama.cpp tree ({reason}); make it with `git diff` from the top of a llama.cpp checkout of the same revision"
        ));
    }
    let out = run(false).map_err(|e| format!("could not run `patch`: {e}"))?;
    if !out.status.success() {
        return Err("applied in a dry run but not for real".into());
    }
    Ok(())
}

/// The capabilities the tree lacks, or the first required names it lacks.
fn check_headers(tree: &Path) -> Result<Vec<Capability>, String> {
    let mut text = String::new();
    for header in [
        "include/llama.h",
        "ggml/include/ggml.h",
        "ggml/include/gguf.h",
        "ggml/include/ggml-backend.h",
        "ggml/include/ggml-cpu.h",
        "ggml/include/ggml-alloc.h",
    ] {
        if let Ok(t) = std::fs::read_to_string(tree.join(header)) {
            text.push_str(&t);
            text.push('\n');
        }
    }
    let words: std::collections::HashSet<&str> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .collect();
    let missing: Vec<&str> = REQUIRED
        .iter()
        .copied()
        .filter(|name| !words.contains(name))
        .collect();
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().copied().take(4).collect();
        let more = missing.len().saturating_sub(shown.len());
        return Err(if more > 0 {
            format!("{} and {more} more", shown.join(", "))
        } else {
            shown.join(", ")
        });
    }
    Ok(Capability::ALL
        .into_iter()
        .filter(|c| !words.contains(c.symbol()))
        .collect())
}

/// GGML/llama.cpp CMake options, forced into the cache at the top of the
/// tree's CMakeLists.txt (whatever the crate's build script passes, and
/// whichever crate version's build script it is).
fn set_cmake_options(tree: &Path, options: &BTreeMap<String, String>) -> std::io::Result<()> {
    if options.is_empty() {
        return Ok(());
    }
    let path = tree.join("CMakeLists.txt");
    let text = std::fs::read_to_string(&path)?;
    let mut head = String::from("# quantbench build options\n");
    for (key, value) in options {
        let value = value.replace('\\', "\\\\").replace('"', "\\\"");
        head.push_str(&format!(
            "set({key} \"{value}\" CACHE STRING \"set by quantbench\" FORCE)\n"
        ));
    }
    std::fs::write(&path, format!("{head}{text}"))
}

/// The copy says it is the pinned version, so it satisfies the
/// workspace's requirement whatever version its build script is.
fn set_manifest_version(crate_dir: &Path, pinned: &str) -> Result<(), String> {
    let path = crate_dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut in_package = false;
    let mut replaced = false;
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            in_package = trimmed == "[package]";
        }
        if in_package && !replaced && trimmed.starts_with("version") && trimmed.contains('=') {
            out.push_str(&format!("version = \"{pinned}\"\n"));
            replaced = true;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if !replaced {
        return Err(format!("{}: no [package] version to set", path.display()));
    }
    if !out.contains("\nstatic-stdcxx") {
        // The feature our agent asks for must exist (the build script
        // below is what makes it link statically).
        out = out.replacen("[features]\n", "[features]\nstatic-stdcxx = []\n", 1);
    }
    std::fs::write(&path, out).map_err(|e| format!("{}: {e}", path.display()))?;
    link_stdcxx_statically(crate_dir)
}

/// The line older build scripts (0.1.140) link libstdc++ with on Linux,
/// whatever `static-stdcxx` says: the board agent then asked for
/// `ld-linux-aarch64.so.1` and `libstdc++.so.6`, which a Pi's OS may lack
/// (and qemu-user here has not).
const DYNAMIC_STDCXX: &str = "println!(\"cargo:rustc-link-lib=dylib=stdc++\");";

/// What it becomes: static with `static-stdcxx`, as later versions do (the
/// archive's folder found by asking the compiler, so rustc can bundle it).
const STATIC_STDCXX: &str = r#"if cfg!(feature = "static-stdcxx") {
                // Added by quantbench: libstdc++ linked statically, as later
                // versions of this crate do.
                let compiler = cc::Build::new().cpp(true).get_compiler();
                if let Ok(out) = std::process::Command::new(compiler.path())
                    .arg("--print-file-name=libstdc++.a")
                    .output()
                {
                    let path = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                    if let Some(dir) = path.parent().filter(|_| path.is_file()) {
                        println!("cargo:rustc-link-search=native={}", dir.display());
                    }
                }
                println!("cargo:rustc-link-lib=static=stdc++");
            } else {
                println!("cargo:rustc-link-lib=dylib=stdc++");
            }"#;

/// What quantbench changes in a crate copy besides its `llama.cpp/`, as
/// text: part of a build's reuse key, so a change here rebuilds.
pub fn copy_rules() -> String {
    format!("version=pinned;{DYNAMIC_STDCXX}->{STATIC_STDCXX}")
}

/// Makes an older build script honour `static-stdcxx` (see above); a
/// build script that already links it statically is left as it is.
fn link_stdcxx_statically(crate_dir: &Path) -> Result<(), String> {
    let path = crate_dir.join("build.rs");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if text.contains("static=stdc++") || !text.contains(DYNAMIC_STDCXX) {
        return Ok(());
    }
    std::fs::write(&path, text.replace(DYNAMIC_STDCXX, STATIC_STDCXX))
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_from_one_syntax() {
        assert_eq!(LlamaSource::parse("vendored"), Ok(LlamaSource::Vendored));
        assert_eq!(
            LlamaSource::parse("crate:0.1.140"),
            Ok(LlamaSource::Crate("0.1.140".into()))
        );
        assert_eq!(
            LlamaSource::parse("path:../llama.cpp@b1234"),
            Ok(LlamaSource::Checkout {
                path: "../llama.cpp".into(),
                rev: Some("b1234".into())
            })
        );
        assert_eq!(
            LlamaSource::parse("path:/x/llama.cpp"),
            Ok(LlamaSource::Checkout {
                path: "/x/llama.cpp".into(),
                rev: None
            })
        );
        assert!(LlamaSource::parse("crate:0.1;rm")
            .unwrap_err()
            .contains("crate:0.1.140"));
        assert!(LlamaSource::parse("master").unwrap_err().contains("path:"));
        // A revision with a `/` (a remote's branch), as the nightly follows.
        assert_eq!(
            LlamaSource::parse("path:/srv/llama.cpp@origin/master"),
            Ok(LlamaSource::Checkout {
                path: PathBuf::from("/srv/llama.cpp"),
                rev: Some("origin/master".into())
            })
        );
        // A folder with an `@` in its name, written without a revision.
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("llama@work");
        std::fs::create_dir_all(&odd).unwrap();
        let written = format!("path:{}", odd.display());
        assert_eq!(
            LlamaSource::parse(&written),
            Ok(LlamaSource::Checkout {
                path: odd.clone(),
                rev: None
            })
        );
        for text in ["vendored", "crate:0.1.140", "path:/a/b@v1"] {
            assert_eq!(LlamaSource::parse(text).unwrap().describe(), text);
        }
    }

    #[test]
    fn headers_without_optional_parts_become_capabilities_and_without_required_parts_fail() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path();
        std::fs::create_dir_all(tree.join("include")).unwrap();
        std::fs::create_dir_all(tree.join("ggml/include")).unwrap();
        let all = REQUIRED.join("();\n");
        std::fs::write(tree.join("ggml/include/ggml.h"), &all).unwrap();
        std::fs::write(
            tree.join("include/llama.h"),
            "struct llama_model_imatrix_data;\nenum llama_load_mode {};",
        )
        .unwrap();
        assert_eq!(check_headers(tree), Ok(vec![Capability::TensorOverrides]));
        let without: String = REQUIRED
            .iter()
            .filter(|n| **n != "llama_memory_clear")
            .map(|n| format!("{n}();\n"))
            .collect();
        std::fs::write(tree.join("ggml/include/ggml.h"), without).unwrap();
        assert_eq!(check_headers(tree), Err("llama_memory_clear".into()));
    }

    #[test]
    fn sync_rewrites_only_changed_files_and_removes_gone_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("from"), dir.path().join("to"));
        std::fs::create_dir_all(from.join("sub")).unwrap();
        std::fs::write(from.join("same.c"), "same").unwrap();
        std::fs::write(from.join("sub/changed.c"), "v1").unwrap();
        std::fs::write(from.join("gone.c"), "x").unwrap();
        sync_tree(&from, &to).unwrap();
        let old_time = std::fs::metadata(to.join("same.c"))
            .unwrap()
            .modified()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(from.join("sub/changed.c"), "v2").unwrap();
        std::fs::remove_file(from.join("gone.c")).unwrap();
        sync_tree(&from, &to).unwrap();
        assert_eq!(
            std::fs::metadata(to.join("same.c"))
                .unwrap()
                .modified()
                .unwrap(),
            old_time
        );
        assert_eq!(
            std::fs::read_to_string(to.join("sub/changed.c")).unwrap(),
            "v2"
        );
        assert!(!to.join("gone.c").exists());
        assert_eq!(tree_hash(&from).unwrap(), tree_hash(&to).unwrap());
    }

    #[test]
    fn cmake_options_are_forced_into_the_cache_and_the_manifest_says_the_pinned_version() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("CMakeLists.txt"), "project(llama)\n").unwrap();
        let options = BTreeMap::from([("GGML_CPU_REPACK".to_string(), "OFF".to_string())]);
        set_cmake_options(dir.path(), &options).unwrap();
        let text = std::fs::read_to_string(dir.path().join("CMakeLists.txt")).unwrap();
        assert!(text.starts_with("# quantbench"), "{text}");
        assert!(
            text.contains("set(GGML_CPU_REPACK \"OFF\" CACHE STRING"),
            "{text}"
        );
        assert!(text.ends_with("project(llama)\n"));
        std::fs::write(
            dir.path().join("Cargo.toml"),
            "[package]\nname = \"llama-cpp-sys-2\"\nversion = \"0.1.140\"\n[dependencies.x]\nversion = \"1\"\n[features]\ncuda = []\n",
        )
        .unwrap();
        let linux = format!(
            "match os {{\n        Linux => {{\n            {DYNAMIC_STDCXX}\n        }}\n}}\n"
        );
        std::fs::write(dir.path().join("build.rs"), &linux).unwrap();
        set_manifest_version(dir.path(), "0.1.161").unwrap();
        // An older build script links libstdc++ statically when asked.
        let script = std::fs::read_to_string(dir.path().join("build.rs")).unwrap();
        assert!(
            script.contains("if cfg!(feature = \"static-stdcxx\")"),
            "{script}"
        );
        assert!(script.contains("static=stdc++") && script.contains(DYNAMIC_STDCXX));
        // One already static is left alone.
        set_manifest_version(dir.path(), "0.1.161").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("build.rs")).unwrap(),
            script
        );
        let text = std::fs::read_to_string(dir.path().join("Cargo.toml")).unwrap();
        assert!(
            text.contains("version = \"0.1.161\"\n[dependencies.x]\nversion = \"1\""),
            "{text}"
        );
        assert!(
            text.contains("[features]\nstatic-stdcxx = []\ncuda"),
            "{text}"
        );
    }

    #[test]
    fn a_folder_that_is_not_llama_cpp_and_an_unknown_revision_are_one_line_each() {
        let dir = tempfile::tempdir().unwrap();
        let message = check_llama_tree(dir.path()).unwrap_err();
        assert!(message.contains("is not a llama.cpp tree"), "{message}");
        assert!(message.contains("include/llama.h"), "{message}");
        let repo = dir.path();
        let git = |args: &[&str]| {
            Command::new("git")
                .arg("-C")
                .arg(repo)
                .args(args)
                .output()
                .unwrap()
        };
        git(&["init", "-q"]);
        std::fs::write(repo.join("a"), "a").unwrap();
        git(&["add", "a"]);
        git(&[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "a",
        ]);
        let message = resolve_rev(repo, "no-such-branch").unwrap_err();
        assert!(
            message.contains("has no revision `no-such-branch`"),
            "{message}"
        );
        assert!(!message.contains('\n'));
        assert_eq!(resolve_rev(repo, "HEAD").unwrap().len(), 12);
    }

    #[test]
    fn a_patch_that_does_not_apply_is_refused_and_one_that_does_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("src")).unwrap();
        std::fs::write(tree.join("src/a.c"), "int a = 1;\n").unwrap();
        let good = dir.path().join("good.patch");
        std::fs::write(
            &good,
            "--- a/src/a.c\n+++ b/src/a.c\n@@ -1 +1 @@\n-int a = 1;\n+int a = 2;\n",
        )
        .unwrap();
        let bad = dir.path().join("bad.patch");
        std::fs::write(
            &bad,
            "--- a/src/a.c\n+++ b/src/a.c\n@@ -1 +1 @@\n-int a = 7;\n+int a = 8;\n",
        )
        .unwrap();
        let message = apply_patch(&bad, &tree).unwrap_err();
        assert!(message.contains("does not apply"), "{message}");
        assert_eq!(
            std::fs::read_to_string(tree.join("src/a.c")).unwrap(),
            "int a = 1;\n"
        );
        apply_patch(&good, &tree).unwrap();
        assert_eq!(
            std::fs::read_to_string(tree.join("src/a.c")).unwrap(),
            "int a = 2;\n"
        );
    }
}
