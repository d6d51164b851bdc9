//! The host-side recipe cache: each recipe's GGUF (and importance
//! matrices, GPTQ and codebook records) produced with the host agent
//! (`quantize`, `importance`, `imatrix`, `gptq`, `codebook`), cached by
//! model hash, build, recipe and (for calibrated recipes) calibration text
//! and context; every file written whole and its SHA-256 recorded, so a
//! file cut short is made again rather than used.

use super::{CalibrationRecord, RecipeError};
use crate::builds::build::AgentBuild;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use wire::model_job::{CodebookReport, RecipeFile};
use wire::weight_format::CodebookType;

/// Runs the host agent and reads the JSON it prints; a failure carries the
/// agent's own one-line message (anyhow's `Error: ...`), not a backtrace.
pub(crate) fn agent_json(
    agent: &AgentBuild,
    args: &[String],
) -> Result<serde_json::Value, RecipeError> {
    let subcommand = args.first().cloned().unwrap_or_default();
    let out = Command::new(&agent.path)
        .args(args)
        .output()
        .map_err(|source| RecipeError::Spawn {
            path: agent.path.clone(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut message = stderr
            .lines()
            .find_map(|l| l.strip_prefix("Error: "))
            .or_else(|| stderr.lines().last())
            .unwrap_or("no message")
            .to_string();
        // llama.cpp's quantizer says why on its own stderr, after
        // `failed to quantize:` (on the same line or the next).
        let lines: Vec<&str> = stderr.lines().collect();
        if let Some(at) = lines.iter().position(|l| l.contains("failed to quantize:")) {
            let same = lines[at]
                .split("failed to quantize:")
                .nth(1)
                .unwrap_or("")
                .trim();
            let why = if same.is_empty() {
                lines.get(at + 1).map_or("", |l| l.trim())
            } else {
                same
            };
            if !why.is_empty() {
                message.push_str(&format!(" (llama.cpp: {why})"));
            }
        }
        return Err(RecipeError::AgentFailed {
            subcommand,
            message,
        });
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|source| RecipeError::AgentOutput { subcommand, source })
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RecipeError + '_ {
    move |source| RecipeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A name part no other process or thread is using right now.
fn unique_suffix() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Writes `text` to `path` through a temporary file of this process and a
/// rename, so a concurrent reader sees the old file or the new, never half.
/// Synced before and after the rename: a power cut leaves the old file or
/// the new one, whole.
fn write_whole(path: &Path, text: &str) -> Result<(), RecipeError> {
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".part-{}", unique_suffix()));
    let temp = PathBuf::from(temp);
    std::fs::write(&temp, text).map_err(io_err(&temp))?;
    sync_file(&temp)?;
    std::fs::rename(&temp, path).map_err(io_err(path))?;
    sync_parent(path)
}

fn sync_file(path: &Path) -> Result<(), RecipeError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(path))
}

/// Makes a rename in `path`'s folder durable.
fn sync_parent(path: &Path) -> Result<(), RecipeError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

/// Where the SHA-256 (prefix) of a cached file made by the agent is kept.
fn recorded_hash_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".sha256");
    PathBuf::from(name)
}

/// Why a cached file cannot be used as it is, or `None` when its content
/// still matches the hash recorded when it was made (a file cut short by a
/// power loss or a full disk keeps its name but not its hash).
fn cache_damage(path: &Path) -> Option<String> {
    let Ok(recorded) = std::fs::read_to_string(recorded_hash_path(path)) else {
        return Some(
            "has no recorded SHA-256 (made by an older quantbench, or cut off while being made)"
                .into(),
        );
    };
    match wire::build_id::content_hash(path) {
        Ok(hash) if hash == recorded.trim() => None,
        Ok(hash) => Some(format!(
            "does not match the SHA-256 recorded when it was made ({hash} instead of {}: cut short by a power loss or a full disk?)",
            recorded.trim()
        )),
        Err(e) => Some(format!("cannot be read ({e})")),
    }
}

/// One quantization of a model: llama.cpp file type `ftype`, optionally
/// per-layer types (`adaptive`), a type for the embedding and output
/// matrices, and an importance matrix.
#[derive(Debug, Clone, Copy)]
pub struct QuantizeSpec<'a> {
    /// The recipe's name, which names the cached file.
    pub recipe: &'a str,
    pub ftype: &'a str,
    pub layer_types: &'a [String],
    pub other_type: Option<&'a str>,
    pub imatrix: Option<&'a Path>,
    /// llama-quantize's `--tensor-type`s: regex -> GGML type, first match wins.
    pub tensor_types: &'a [(String, String)],
    /// llama-quantize's `--pure`.
    pub pure: bool,
}

impl<'a> QuantizeSpec<'a> {
    /// A uniform recipe: every matrix `ftype`, llama.cpp's own exceptions.
    pub fn uniform(recipe: &'a str, ftype: &'a str) -> Self {
        QuantizeSpec {
            recipe,
            ftype,
            layer_types: &[],
            other_type: None,
            imatrix: None,
            tensor_types: &[],
            pure: false,
        }
    }
}

/// A recipe name as a file name: kept when it is plain, else made safe
/// and told apart by a hash of the whole name (options may hold regexes).
fn file_key(recipe: &str) -> String {
    let safe: String = recipe
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._+-=".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if safe == recipe {
        return safe;
    }
    use sha2::Digest;
    let hash = sha2::Sha256::digest(recipe.as_bytes());
    let short: String = hash.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("{safe}-{short}")
}

/// Where recipe caches live, under the workspace.
pub const RECIPE_CACHE_DIR: &str = "target/quantbench-models";
/// Rewritten in a model's cache folder each time it is opened: its last
/// use, which retention (`cargo xtask prune`) goes by.
pub const LAST_USED_FILE: &str = "last-used";

/// The host-side recipe cache of one model:
/// `target/quantbench-models/<model hash>/`, with a folder
/// `llama-<tree hash>/` inside for each build that is not the default
/// (`llama-<tree>+quantbench-<commit tree>/` for a commit of this
/// repository): each build quantizes with its own llama.cpp and our own
/// code (a quantizer change is a change under test), so its files are its
/// own.
pub struct RecipeCache {
    pub dir: PathBuf,
    pub threads: usize,
}

impl RecipeCache {
    pub fn open(
        workspace: &Path,
        model: &Path,
        build: &crate::builds::llama_source::PreparedSource,
    ) -> Result<Self, RecipeError> {
        let hash = wire::build_id::content_hash(model).map_err(io_err(model))?;
        let model_dir = workspace.join(RECIPE_CACHE_DIR).join(hash);
        // A commit of this repository quantizes with its own code too
        // (the codebook recipes are ours).
        let dir = match (&build.crate_dir, &build.revision) {
            (None, None) => model_dir.clone(),
            (Some(_), None) => model_dir.join(format!("llama-{}", build.identity.tree)),
            (_, Some(revision)) => model_dir.join(format!(
                "llama-{}+quantbench-{}",
                build.identity.tree, revision.tree
            )),
        };
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        // When the model's folder (every build's files) was last used, for
        // retention (`cargo xtask prune`).
        let stamp = model_dir.join(LAST_USED_FILE);
        std::fs::write(&stamp, wire::utc_now_rfc3339()).map_err(io_err(&stamp))?;
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Ok(RecipeCache { dir, threads })
    }

    /// Quantizes once per (model hash, recipe): the output and its fallback
    /// list are kept in the cache. Files are written under a temporary name,
    /// synced and renamed, with the output's SHA-256 beside it, checked
    /// whenever the entry is used again.
    pub fn quantize(
        &self,
        agent: &AgentBuild,
        model: &Path,
        spec: &QuantizeSpec,
    ) -> Result<RecipeFile, RecipeError> {
        let QuantizeSpec {
            recipe,
            ftype,
            layer_types,
            other_type,
            imatrix,
            tensor_types,
            pure,
        } = *spec;
        // The recipe's name says its options (`q4_k_m[ffn_down=q6_k]`).
        let recipe_key = file_key(recipe);
        let key = if let Some(imatrix) = imatrix {
            // The importance matrix's name carries its text and context
            // (or, for a file made elsewhere, its content hash).
            format!(
                "{recipe_key}-{}",
                imatrix
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            )
        } else if layer_types.is_empty() {
            recipe_key
        } else {
            format!(
                "{recipe_key}-{}-{}",
                layer_types.join("_"),
                other_type.unwrap_or("")
            )
        };
        let path = self.dir.join(format!("{key}.gguf"));
        let meta_path = self.dir.join(format!("{key}.json"));
        let made = self.make_once(agent, &path, &[&meta_path], |temp| {
            let mut args = vec![
                "quantize".to_string(),
                "--input".into(),
                model.display().to_string(),
                "--output".into(),
                temp.display().to_string(),
                "--ftype".into(),
                ftype.to_ascii_uppercase(),
                "--threads".into(),
                self.threads.to_string(),
            ];
            if !layer_types.is_empty() {
                args.push("--layer-types".into());
                args.push(layer_types.join(","));
            }
            if let Some(other) = other_type {
                args.push("--other-type".into());
                args.push(other.to_string());
            }
            if let Some(imatrix) = imatrix {
                args.push("--imatrix".into());
                args.push(imatrix.display().to_string());
            }
            for (pattern, ty) in tensor_types {
                args.push("--tensor-type".into());
                args.push(format!("{pattern}={ty}"));
            }
            if pure {
                args.push("--pure".into());
            }
            args
        })?;
        if let Some(meta) = made {
            write_whole(&meta_path, &meta.to_string())?;
        }
        let meta_text = std::fs::read_to_string(&meta_path).map_err(io_err(&meta_path))?;
        let meta: QuantizeOutput =
            serde_json::from_str(&meta_text).map_err(|source| RecipeError::AgentOutput {
                subcommand: "quantize".into(),
                source,
            })?;
        Ok(RecipeFile {
            recipe: recipe.to_string(),
            path: path.display().to_string(),
            fallbacks: meta.fallbacks,
            file_bytes: std::fs::metadata(&path).map_err(io_err(&path))?.len(),
            note: String::new(),
            scheme_bits_per_weight: None,
            unmade: None,
        })
    }

    /// Makes `path` with the agent unless it and `beside` (the files its
    /// caller writes next to it) are cached. `args` gets the temporary name
    /// the agent must write: two runs may make the same file at once (a
    /// nightly and a manual run, or tests), each into its own temporary
    /// file, and the renames replace whole files with identical content.
    /// Returns the agent's JSON when it ran.
    fn make_once(
        &self,
        agent: &AgentBuild,
        path: &Path,
        beside: &[&Path],
        args: impl FnOnce(&Path) -> Vec<String>,
    ) -> Result<Option<serde_json::Value>, RecipeError> {
        if path.exists() && beside.iter().all(|p| p.exists()) {
            match cache_damage(path) {
                None => return Ok(None),
                Some(why) => eprintln!("recipe cache: {} {why}: making it again", path.display()),
            }
        }
        let mut temp = path.as_os_str().to_owned();
        temp.push(format!(".part-{}", unique_suffix()));
        let temp = PathBuf::from(temp);
        let out = agent_json(agent, &args(&temp)).inspect_err(|_| {
            let _ = std::fs::remove_file(&temp);
        })?;
        // The hash first, then the file under its name: a power cut in
        // between leaves a hash the old file does not match, so it is made
        // again next time, never used cut short.
        sync_file(&temp)?;
        let hash = wire::build_id::content_hash(&temp).map_err(io_err(&temp))?;
        write_whole(&recorded_hash_path(path), &hash)?;
        std::fs::rename(&temp, path).map_err(io_err(path))?;
        sync_parent(path)?;
        Ok(Some(out))
    }

    /// The agent's arguments for `subcommand` (`reference`, `imatrix`) of
    /// `model` over `text` in chunks of `ctx`, written to `out`.
    fn model_text_args(
        &self,
        subcommand: &str,
        model: &Path,
        (text, ctx): (&Path, usize),
        out: &Path,
    ) -> Vec<String> {
        vec![
            subcommand.into(),
            "--model".into(),
            model.display().to_string(),
            "--text".into(),
            text.display().to_string(),
            "--ctx".into(),
            ctx.to_string(),
            "--threads".into(),
            self.threads.to_string(),
            "--out".into(),
            out.display().to_string(),
        ]
    }

    /// The unquantized model's reference on `text` at context `ctx`
    /// (`wire::reference`: what boards judge recipes against), made once
    /// per (text, ctx, agent) by the host's agent.
    pub fn reference(
        &self,
        agent: &AgentBuild,
        model: &Path,
        text: &Path,
        ctx: usize,
    ) -> Result<PathBuf, RecipeError> {
        let text_hash = wire::build_id::content_hash(text).map_err(io_err(text))?;
        let path = self
            .dir
            .join(format!("reference-{ctx}-{text_hash}-{}.bin", agent.hash));
        self.make_once(agent, &path, &[], |temp| {
            self.model_text_args("reference", model, (text, ctx), temp)
        })?;
        Ok(path)
    }

    /// The model's importance matrix on `text` at context `ctx` (the GGUF
    /// `llama-quantize --imatrix` reads), made once per (text, ctx, agent).
    pub fn imatrix(
        &self,
        agent: &AgentBuild,
        model: &Path,
        text: &Path,
        ctx: usize,
    ) -> Result<(PathBuf, CalibrationRecord), RecipeError> {
        let text_hash = wire::build_id::content_hash(text).map_err(io_err(text))?;
        // Our own code computes it: a new agent makes it again.
        let stem = format!("imatrix-{ctx}-{text_hash}-{}", agent.hash);
        let path = self.dir.join(format!("{stem}.gguf"));
        let meta_path = self.dir.join(format!("{stem}.json"));
        let made = self.make_once(agent, &path, &[&meta_path], |temp| {
            self.model_text_args("imatrix", model, (text, ctx), temp)
        })?;
        if let Some(out) = made {
            let record = CalibrationRecord {
                model: String::new(),
                recipe: String::new(),
                method: "imatrix".into(),
                text: text.display().to_string(),
                ctx,
                chunks: out["chunks"].as_u64().unwrap_or(0) as usize,
                damp: None,
                matrices: Vec::new(),
                mean_error_rtn: None,
                mean_error_gptq: None,
                alphas: Vec::new(),
                seconds: out["seconds"].as_f64().unwrap_or(0.0),
            };
            write_whole(&meta_path, &json_text(&record)?)?;
        }
        Ok((path, read_record(&meta_path)?))
    }

    /// `<method>-<base>`, `method` `gptq` (GPTQ onto `base`'s grid with
    /// the Hessian from `text`) or `awq` (AWQ's scales searched on `text`'s
    /// activations, folded in, then llama.cpp's `base`), at context `ctx`,
    /// made once per (base, text, ctx, agent); the per-matrix errors (and
    /// AWQ's alphas) are kept beside it.
    pub fn calibrated(
        &self,
        agent: &AgentBuild,
        model: &Path,
        method: &str,
        base: &str,
        text: &Path,
        ctx: usize,
    ) -> Result<(RecipeFile, CalibrationRecord), RecipeError> {
        let text_hash = wire::build_id::content_hash(text).map_err(io_err(text))?;
        let recipe = format!("{method}-{base}");
        // Our own code computes it: a new agent makes it again.
        let key = format!("{recipe}-{ctx}-{text_hash}-{}", agent.hash);
        let path = self.dir.join(format!("{key}.gguf"));
        let meta_path = self.dir.join(format!("{key}.json"));
        let record_path = self.dir.join(format!("{key}.calibration.json"));
        let made = self.make_once(agent, &path, &[&meta_path, &record_path], |temp| {
            vec![
                method.into(),
                "--input".into(),
                model.display().to_string(),
                "--output".into(),
                temp.display().to_string(),
                "--ftype".into(),
                base.to_string(),
                "--text".into(),
                text.display().to_string(),
                "--ctx".into(),
                ctx.to_string(),
                "--threads".into(),
                self.threads.to_string(),
            ]
        })?;
        if let Some(out) = made {
            let parse = |source| RecipeError::AgentOutput {
                subcommand: method.into(),
                source,
            };
            let record = CalibrationRecord {
                model: String::new(),
                recipe: recipe.clone(),
                method: method.into(),
                text: text.display().to_string(),
                ctx,
                chunks: out["chunks"].as_u64().unwrap_or(0) as usize,
                damp: out["damp"].as_f64(),
                matrices: serde_json::from_value(out["matrices"].clone()).map_err(parse)?,
                mean_error_rtn: out["mean_error_rtn"].as_f64(),
                mean_error_gptq: out["mean_error_gptq"].as_f64(),
                alphas: match out.get("alphas") {
                    Some(alphas) => serde_json::from_value(alphas.clone()).map_err(parse)?,
                    None => Vec::new(),
                },
                seconds: out["seconds"].as_f64().unwrap_or(0.0),
            };
            write_whole(
                &meta_path,
                &serde_json::json!({ "fallbacks": out["fallbacks"] }).to_string(),
            )?;
            write_whole(&record_path, &json_text(&record)?)?;
        }
        let meta_text = std::fs::read_to_string(&meta_path).map_err(io_err(&meta_path))?;
        let meta: QuantizeOutput =
            serde_json::from_str(&meta_text).map_err(|source| RecipeError::AgentOutput {
                subcommand: method.into(),
                source,
            })?;
        let record = read_record(&record_path)?;
        let file = RecipeFile {
            recipe,
            path: path.display().to_string(),
            fallbacks: meta.fallbacks,
            file_bytes: std::fs::metadata(&path).map_err(io_err(&path))?.len(),
            note: String::new(),
            scheme_bits_per_weight: None,
            unmade: None,
        };
        Ok((file, record))
    }

    /// An importance matrix made elsewhere (the matrix's `imatrix` file),
    /// copied into the cache under its content hash, so a recipe made with
    /// it is made again when the file changes.
    pub fn external_imatrix(&self, file: &Path) -> Result<PathBuf, RecipeError> {
        let hash = wire::build_id::content_hash(file).map_err(io_err(file))?;
        let path = self.dir.join(format!("imatrix-file-{hash}.gguf"));
        if !path.is_file() {
            let temp = self
                .dir
                .join(format!("imatrix-file-{hash}.{}", unique_suffix()));
            std::fs::copy(file, &temp).map_err(io_err(file))?;
            sync_file(&temp)?;
            std::fs::rename(&temp, &path).map_err(io_err(&path))?;
        }
        Ok(path)
    }

    /// A codebook recipe (`sq4`, ...) with `imatrix`'s sensitivities, made
    /// once per (format, importance matrix, agent): llama.cpp's F32 file
    /// with every matrix coded and decoded; the scheme's sizes beside it.
    pub fn codebook(
        &self,
        agent: &AgentBuild,
        model: &Path,
        recipe: &str,
        format: CodebookType,
        imatrix: &Path,
    ) -> Result<(RecipeFile, CodebookReport), RecipeError> {
        let stem = imatrix
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        // The importance matrix's name carries its text, context and agent.
        let key = format!("{}-{stem}", format.to_string().to_ascii_lowercase());
        let path = self.dir.join(format!("{key}.gguf"));
        let meta_path = self.dir.join(format!("{key}.json"));
        let made = self.make_once(agent, &path, &[&meta_path], |temp| {
            vec![
                "codebook".into(),
                "--input".into(),
                model.display().to_string(),
                "--output".into(),
                temp.display().to_string(),
                "--format".into(),
                format.to_string(),
                "--imatrix".into(),
                imatrix.display().to_string(),
                "--threads".into(),
                self.threads.to_string(),
            ]
        })?;
        if let Some(out) = made {
            write_whole(&meta_path, &out.to_string())?;
        }
        let meta_text = std::fs::read_to_string(&meta_path).map_err(io_err(&meta_path))?;
        let parse = |source| RecipeError::AgentOutput {
            subcommand: "codebook".into(),
            source,
        };
        let report: CodebookReport = serde_json::from_str(&meta_text).map_err(parse)?;
        let meta: QuantizeOutput = serde_json::from_str(&meta_text).map_err(parse)?;
        let file = RecipeFile {
            recipe: recipe.to_string(),
            path: path.display().to_string(),
            fallbacks: meta.fallbacks,
            file_bytes: std::fs::metadata(&path).map_err(io_err(&path))?.len(),
            note: String::new(),
            scheme_bits_per_weight: Some(report.bits_per_weight()),
            unmade: None,
        };
        Ok((file, report))
    }

    /// Each layer's importance (mean KL divergence from the unquantized
    /// model when only that layer is quantized to `low`), cached by text,
    /// context and low type.
    pub fn importance(
        &self,
        agent: &AgentBuild,
        model: &Path,
        text: &Path,
        ctx: usize,
        low: &str,
    ) -> Result<Vec<f64>, RecipeError> {
        let text_hash = wire::build_id::content_hash(text).map_err(io_err(text))?;
        let path = self
            .dir
            .join(format!("importance-{low}-{ctx}-{text_hash}.json"));
        if !path.exists() {
            // Each measurement gets its own trial folder: two runs may
            // measure the same model at once.
            let scratch = self.dir.join(format!("scratch-{}", unique_suffix()));
            let value = agent_json(
                agent,
                &[
                    "importance".into(),
                    "--model".into(),
                    model.display().to_string(),
                    "--text".into(),
                    text.display().to_string(),
                    "--ctx".into(),
                    ctx.to_string(),
                    "--low".into(),
                    low.to_string(),
                    "--threads".into(),
                    self.threads.to_string(),
                    "--scratch".into(),
                    scratch.display().to_string(),
                ],
            );
            // The per-layer trial files are of no use afterwards.
            let _ = std::fs::remove_dir_all(&scratch);
            let value = value?;
            write_whole(&path, &value.to_string())?;
        }
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let scores: ImportanceOutput =
            serde_json::from_str(&text).map_err(|source| RecipeError::AgentOutput {
                subcommand: "importance".into(),
                source,
            })?;
        Ok(scores.scores)
    }
}

fn json_text(record: &CalibrationRecord) -> Result<String, RecipeError> {
    serde_json::to_string_pretty(record).map_err(|source| RecipeError::AgentOutput {
        subcommand: "calibration record".into(),
        source,
    })
}

fn read_record(path: &Path) -> Result<CalibrationRecord, RecipeError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|source| RecipeError::AgentOutput {
        subcommand: "calibration record".into(),
        source,
    })
}

/// What `quantbench-agent quantize` prints.
#[derive(Deserialize)]
struct QuantizeOutput {
    #[serde(default)]
    fallbacks: Vec<String>,
}

/// What `quantbench-agent importance` prints.
#[derive(Deserialize)]
struct ImportanceOutput {
    scores: Vec<f64>,
}
