//! The model matrix as a job kind: recipes quantized on the host once per
//! run (cached by model hash and recipe; `adaptive` from measured layer
//! importance), then one job per model and board, run by the agent's
//! `model-run`; rows in `models.csv`, importance in `importance.json`.

use super::{
    from_spec, merge_rows, rows_in, to_spec, JobError, JobFailure, JobKind, MemoryNeed, PlannedJob,
    Tally, Upload,
};
use crate::runs::config::{BenchConfig, ConfigError, ModelMatrixSpec};
use crate::runs::recipes::cache::{QuantizeSpec, RecipeCache};
use crate::runs::recipes::{
    adaptive_assignment, check_model_file, check_ternary, CalibrationRecord, ImatrixSource,
    LayerImportance, Recipe, RecipeError,
};
use crate::runs::session::{BoardSlot, Session};
use crate::runs::synthetic::{self, SyntheticModel};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use wire::choice_tasks::read_choice_tasks;
use wire::files::{
    write_json, CsvAppender, ResultsError, MODEL_ROWS_FILE, SAMPLES_FILE, SUSTAINED_FILE,
};
use wire::model_job::{ModelJob, ModelJobBuild, RecipeFile};
use wire::rows::{CellStatus, ModelRow, SampleRow, SustainRow};

pub const IMPORTANCE_FILE: &str = "importance.json";
/// How each calibrated recipe of the run was made (`CalibrationRecord`s).
pub const CALIBRATION_FILE: &str = "calibration.json";

/// The host files a model job names, by where the job names them: the
/// base model, the text, each recipe's file and the multiple-choice tasks.
fn uploads_of(job: &ModelJob) -> Vec<Upload> {
    // With the host's reference the board never opens the base model.
    let base = match &job.reference {
        Some(reference) => Upload {
            pointer: "/reference".into(),
            local: PathBuf::from(reference),
        },
        None => Upload {
            pointer: "/base/path".into(),
            local: PathBuf::from(&job.base.path),
        },
    };
    let mut uploads = vec![
        base,
        Upload {
            pointer: "/text".into(),
            local: PathBuf::from(&job.text),
        },
    ];
    for (i, recipe) in job.recipes.iter().enumerate() {
        if recipe.unmade.is_some() {
            continue;
        }
        uploads.push(Upload {
            pointer: format!("/recipes/{i}/path"),
            local: PathBuf::from(&recipe.path),
        });
    }
    for (b, build) in job.builds.iter().enumerate() {
        for (i, recipe) in build.recipes.iter().enumerate() {
            if recipe.unmade.is_none() {
                uploads.push(Upload {
                    pointer: format!("/builds/{b}/recipes/{i}/path"),
                    local: PathBuf::from(&recipe.path),
                });
            }
        }
    }
    if let Some(mc) = &job.multiple_choice {
        uploads.push(Upload {
            pointer: "/multiple_choice".into(),
            local: PathBuf::from(mc),
        });
    }
    uploads
}

/// A recipe's file, or, when the build's llama.cpp quantizer refused to
/// make it (llama-cpp-sys-2 0.1.140 stops on a tensor size the pinned one
/// handles by falling back), a recipe the agent reports as unsupported
/// with the quantizer's words: one recipe a build cannot make is a row of
/// the comparison, not the end of the matrix. With the default build the
/// error stands (the matrix asks for what the model cannot take).
fn made_or_refused(
    recipe: &str,
    build: &crate::builds::llama_source::PreparedSource,
    made: Result<RecipeFile, RecipeError>,
) -> Result<RecipeFile, RecipeError> {
    match made {
        // With the default build a recipe the model cannot take is a
        // mistake in the matrix: one line, nothing measured.
        Err(RecipeError::AgentFailed {
            subcommand,
            message,
        }) if subcommand == "quantize" && !build.is_default() => {
            let reason = format!(
                "not made: build `{}` (llama.cpp {}) could not quantize it: {}",
                build.name,
                build.identity.source,
                message.trim()
            );
            eprintln!("{recipe}: {reason}");
            Ok(RecipeFile::unmade(recipe, reason))
        }
        other => other,
    }
}

/// Every recipe file a job names: its own and each A/B build's.
fn all_recipes(job: &ModelJob) -> impl Iterator<Item = &RecipeFile> {
    job.recipes
        .iter()
        .chain(job.builds.iter().flat_map(|b| &b.recipes))
}

/// The builds whose rows a job writes, by the name its rows carry (empty
/// for a one-build job).
fn sides(job: &ModelJob) -> Vec<String> {
    if job.builds.is_empty() {
        vec![String::new()]
    } else {
        job.builds.iter().map(|b| b.build.name.clone()).collect()
    }
}

/// Processes a recipe's speed is measured in on a real board unless the
/// matrix says (docs/nightly.md, "Invocations and verdicts").
pub const DEFAULT_MODEL_INVOCATIONS: u32 = 3;

pub struct ModelMatrix {
    name: String,
    /// The config file the matrix came from (named in its errors).
    config_path: PathBuf,
    spec: ModelMatrixSpec,
    models: Vec<ModelSource>,
    text: PathBuf,
    /// What calibrated recipes learn from (`calibration`, default `text`).
    calibration: PathBuf,
    /// The matrix's `imatrix` file, for `<type>+imatrix=<stem>` recipes.
    imatrix_file: Option<PathBuf>,
    multiple_choice: Option<PathBuf>,
    /// Filled by `prepare`: per model, its recipe files and importance.
    prepared: Vec<PreparedModel>,
}

/// Where a model of the matrix comes from.
enum ModelSource {
    File(PathBuf),
    /// Made on the host (`synthetic:<name>`), seeded random weights.
    Synthetic(SyntheticModel),
}

impl ModelSource {
    /// The name its rows carry: the file name, or the synthetic model's.
    fn name(&self) -> String {
        match self {
            ModelSource::File(path) => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            ModelSource::Synthetic(wanted) => wanted.file_name(),
        }
    }
}

/// A model name made safe for a job folder.
fn job_name_part(model_name: &str) -> String {
    model_name.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
}

struct PreparedModel {
    path: PathBuf,
    name: String,
    synthetic: bool,
    file_bytes: u64,
    /// The base build's recipe files.
    recipes: Vec<RecipeFile>,
    /// In an A/B session, each other build's, in the same order.
    versus_recipes: Vec<Vec<RecipeFile>>,
    importance: Option<LayerImportance>,
    calibrations: Vec<CalibrationRecord>,
    /// The unquantized model's reference on the text, computed here for
    /// one-build jobs (`None` for a synthetic model).
    reference: Option<PathBuf>,
}

impl ModelMatrix {
    /// Checks every input (model files, text, tasks) before anything is built.
    pub fn new(config: &BenchConfig, name: &str, spec: &ModelMatrixSpec) -> Result<Self, JobError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: config.source.clone(),
            matrix: name.to_string(),
            message,
        };
        let mut models = Vec::new();
        for entry in &spec.models {
            let text = entry.display().to_string();
            models.push(match SyntheticModel::from_entry(&text, config.seed) {
                Some(made) => ModelSource::Synthetic(made.map_err(|e| invalid(e.to_string()))?),
                None => {
                    let path = config.relative_path(entry);
                    check_model_file(&path).map_err(|e| invalid(e.to_string()))?;
                    ModelSource::File(path)
                }
            });
        }
        // A model's file name names its rows (llama-bench's
        // `model_filename`) and, made file-safe, its job folder: two
        // models sharing either would share cells and a folder.
        let mut seen: Vec<(String, String, String)> = Vec::new();
        for (entry, source) in spec.models.iter().zip(&models) {
            let name = source.name();
            let folder = job_name_part(&name);
            if let Some((other, _, _)) = seen.iter().find(|(_, n, f)| *n == name || *f == folder) {
                return Err(invalid(format!(
                    "models `{other}` and `{}` would share the name `{name}` (their rows and job folder `{folder}`): give one of the files another name",
                    entry.display()
                ))
                .into());
            }
            seen.push((entry.display().to_string(), name, folder));
        }
        let calibrated = spec
            .recipes
            .iter()
            .find(|r| Recipe::parse(r).is_ok_and(|r| r.is_calibrated()));
        let synthetic = models
            .iter()
            .any(|m| matches!(m, ModelSource::Synthetic(_)));
        if let (Some(recipe), true) = (calibrated, synthetic) {
            return Err(invalid(format!(
                "recipe `{recipe}` calibrates on what a trained model's layers do to a text; a synthetic model's random weights have nothing to calibrate, and its speed is its base type's: keep calibrated recipes to model files"
            ))
            .into());
        }
        let text = config.relative_path(&spec.text);
        if !text.is_file() {
            return Err(invalid(format!("text {} does not exist", text.display())).into());
        }
        let calibration = match &spec.calibration {
            Some(path) => {
                let path = config.relative_path(path);
                if !path.is_file() {
                    return Err(invalid(format!(
                        "calibration text {} does not exist (the text calibrated recipes learn from; at least one context of {} tokens)",
                        path.display(),
                        spec.ctx
                    ))
                    .into());
                }
                path
            }
            None => text.clone(),
        };
        let imatrix_file = spec.imatrix.as_ref().map(|p| config.relative_path(p));
        if let Some(path) = &imatrix_file {
            wire::gguf::check_file(path).map_err(|e| {
                invalid(format!(
                    "`imatrix` {e} (an importance matrix GGUF, as stock llama-imatrix writes)"
                ))
            })?;
        }
        for recipe in &spec.recipes {
            let Ok(Recipe::Quantize(q)) = Recipe::parse(recipe) else {
                continue;
            };
            if let Some(ImatrixSource::File(stem)) = &q.imatrix {
                let named = imatrix_file
                    .as_ref()
                    .and_then(|p| p.file_stem())
                    .map(|s| s.to_string_lossy().to_ascii_lowercase());
                if named.as_deref() != Some(stem.as_str()) {
                    return Err(invalid(format!(
                        "recipe `{recipe}` names the importance file `{stem}`, but the matrix's `imatrix` is {}: set `imatrix = \"<path to {stem}.gguf>\"` in the matrix, or name its stem",
                        imatrix_file.as_ref().map_or("not set".to_string(), |p| format!("`{}`", p.display()))
                    ))
                    .into());
                }
            }
            for source in &models {
                let architecture = match source {
                    ModelSource::File(path) => wire::gguf::check_file(path)
                        .ok()
                        .and_then(|h| h.architecture),
                    ModelSource::Synthetic(made) => {
                        Some(format!("{:?}", made.spec.arch).to_ascii_lowercase())
                    }
                };
                check_ternary(recipe, &source.name(), architecture.as_deref()).map_err(invalid)?;
            }
        }
        let multiple_choice = spec
            .multiple_choice
            .as_ref()
            .map(|p| config.relative_path(p));
        if let Some(mc) = &multiple_choice {
            read_choice_tasks(mc).map_err(|e| invalid(e.to_string()))?;
        }
        let matrix = ModelMatrix {
            name: name.to_string(),
            config_path: config.source.clone(),
            spec: spec.clone(),
            models,
            text,
            calibration,
            imatrix_file,
            multiple_choice,
            prepared: Vec::new(),
        };
        // A synthetic model's file is made later; its trained context is
        // checked then.
        for source in &matrix.models {
            if let ModelSource::File(path) = source {
                matrix.check_context_length(path, &source.name())?;
            }
        }
        Ok(matrix)
    }
}

/// The model a build quantizes recipes of.
struct ModelToQuantize<'a> {
    path: &'a Path,
    name: &'a str,
    /// A synthetic model's layers (its importance is the layer order).
    synthetic_layers: Option<usize>,
}

/// A build's recipe files of one model, the layer importance its
/// `adaptive` recipe used and how its calibrated recipes were made.
type BuildRecipes = (
    Vec<RecipeFile>,
    Option<LayerImportance>,
    Vec<CalibrationRecord>,
);

impl ModelMatrix {
    /// Checks that `cell` is one of the matrix's model tests
    /// (`<model file>/<recipe>/<test>/t<threads>`, `<test>` as
    /// `ModelMatrixSpec::test_names` names it: `pp64`, `tg16+d512`; any
    /// thread count for `"all"`); otherwise says which there are.
    pub fn check_test(&self, cell: &str) -> Result<(), String> {
        // A row under other settings than llama.cpp's defaults carries
        // them in brackets (`.../t2[ctk=q8_0/...]`): one of the matrix's.
        let (cell, settings) = match cell.split_once('[') {
            Some((test, rest)) => (test, rest.strip_suffix(']').unwrap_or(rest)),
            None => (cell, ""),
        };
        let keys = self.spec.settings_keys();
        if !keys.iter().any(|k| k == settings) {
            return Err(format!(
                "model matrix `{}` has no settings `[{settings}]` (its settings: {})",
                self.name,
                keys.iter()
                    .map(|k| if k.is_empty() {
                        "(defaults: no brackets)".to_string()
                    } else {
                        format!("[{k}]")
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let mut known = Vec::new();
        for source in &self.models {
            let model = source.name();
            for recipe in &self.spec.recipes {
                for test in self.spec.test_names() {
                    for threads in &self.spec.threads {
                        let id = format!("{model}/{recipe}/{test}/t");
                        let matched = match threads {
                            wire::kernel_job::ThreadCount::Fixed(n) => {
                                known.push(format!("{id}{n}"));
                                cell == format!("{id}{n}")
                            }
                            wire::kernel_job::ThreadCount::All
                            | wire::kernel_job::ThreadCount::Big => {
                                known.push(format!("{id}<cores>"));
                                cell.strip_prefix(&id).is_some_and(|n| {
                                    !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
                                })
                            }
                        };
                        if matched {
                            return Ok(());
                        }
                    }
                }
            }
        }
        Err(format!(
            "model matrix `{}` has no test `{cell}` (its tests include: {})",
            self.name,
            known.into_iter().take(12).collect::<Vec<_>>().join(", ")
        ))
    }

    /// A depth and test longer than the context the model was trained for
    /// is a mistake in the matrix (llama.cpp would run past what the model
    /// knows): one line, before anything is quantized or measured.
    fn check_context_length(&self, model: &Path, name: &str) -> Result<(), JobError> {
        let header = wire::gguf::check_file(model).map_err(|message| ConfigError::Invalid {
            path: self.config_path.clone(),
            matrix: self.name.clone(),
            message,
        })?;
        let needed = self.spec.most_context() as u64;
        match header.context_length {
            Some(trained) if needed > trained => Err(ConfigError::Invalid {
                path: self.config_path.clone(),
                matrix: self.name.clone(),
                message: format!(
                    "n_depth {} plus a test of {} tokens needs a context of {needed}, but {name} was trained for {trained}: lower `n_depth`, `n_prompt` or `n_gen`",
                    self.spec.n_depth.iter().max().unwrap_or(&0),
                    self.spec.n_prompt.max(self.spec.n_gen),
                ),
            }
            .into()),
            _ => Ok(()),
        }
    }

    /// How long a job may run: each build of an A/B job measures every
    /// recipe.
    fn deadline(&self, job: &ModelJob) -> std::time::Duration {
        let recipes = job.recipes.len() * job.builds.len().max(1);
        self.spec.deadline(recipes, job.invocations)
    }

    /// Makes the matrix's recipes of `model` with `build`'s quantizer (its
    /// own recipe cache). A recipe the build's llama.cpp lacks a feature
    /// for is left out of a one-build session with a note; in an A/B
    /// session it stays in the list, unmade, so each build's files line up
    /// with the job's recipes and the row says why.
    fn recipes_for_build(
        &self,
        session: &Session,
        build: &crate::runs::session::BuildUnderTest,
        model: &ModelToQuantize,
    ) -> Result<BuildRecipes, JobError> {
        let agent = build.host_agent.as_ref().ok_or_else(|| {
            JobError::MissingHostAgent(format!(
                "build `{}` has no host agent to quantize with",
                build.name()
            ))
        })?;
        let spec = &self.spec;
        let (name, synthetic_layers) = (model.name.to_string(), model.synthetic_layers);
        let synthetic = synthetic_layers.is_some();
        let model = model.path;
        let cache = RecipeCache::open(&session.workspace, model, &build.source)?;
        let mut recipes = Vec::new();
        let mut importance = None;
        let mut calibrations = Vec::new();
        for recipe in &spec.recipes {
            // `bisect --cell <model>/<recipe>/<test>/t<threads>`: that
            // recipe only.
            let only = &session.options.only_cells;
            if !only.is_empty()
                && !only
                    .iter()
                    .any(|cell| cell.starts_with(&format!("{name}/{recipe}/")))
            {
                continue;
            }
            let parsed = Recipe::parse(recipe).map_err(|message| ConfigError::Invalid {
                path: self.config_path.clone(),
                matrix: self.name.clone(),
                message,
            })?;
            if let Some(missing) = switched_off(&parsed, &build.source) {
                let reason = format!(
                    "switched off for build `{}` (llama.cpp {} has no {missing})",
                    build.name(),
                    build.source.identity.source
                );
                eprintln!("{recipe}: {reason}");
                if !session.versus().is_empty() {
                    recipes.push(RecipeFile::unmade(recipe, reason));
                }
                continue;
            }
            if parsed.is_calibrated() && self.calibration == self.text {
                eprintln!(
                    "warning: {recipe} is calibrated on {}, the text it is judged on: its quality figures flatter it. Set `calibration` in model matrix `{}` to another text",
                    self.text.display(),
                    self.name
                );
            }
            if let Recipe::Quantize(q) = &parsed {
                let (imatrix, record) = match &q.imatrix {
                    Some(ImatrixSource::Calibrated) => {
                        let (path, mut record) =
                            cache.imatrix(agent, model, &self.calibration, spec.ctx)?;
                        record.model = name.clone();
                        record.recipe = recipe.clone();
                        (Some(path), Some(record))
                    }
                    Some(ImatrixSource::File(_)) => {
                        // `new` checked the matrix names one.
                        let file =
                            self.imatrix_file
                                .as_ref()
                                .ok_or_else(|| ConfigError::Invalid {
                                    path: self.config_path.clone(),
                                    matrix: self.name.clone(),
                                    message: format!(
                                        "recipe `{recipe}` needs the matrix's `imatrix` file"
                                    ),
                                })?;
                        (Some(cache.external_imatrix(file)?), None)
                    }
                    None => (None, None),
                };
                let overrides = q.options.overrides();
                let made = cache.quantize(
                    agent,
                    model,
                    &QuantizeSpec {
                        imatrix: imatrix.as_deref(),
                        tensor_types: &overrides,
                        pure: q.options.pure,
                        ..QuantizeSpec::uniform(recipe, &q.ftype)
                    },
                );
                let mut file = made_or_refused(recipe, &build.source, made)?;
                if let Some(record) = record {
                    file.note = record.note();
                    calibrations.push(record);
                } else if let (Some(ImatrixSource::File(_)), Some(path)) =
                    (&q.imatrix, &self.imatrix_file)
                {
                    file.note = format!("importance matrix from {}", path.display());
                }
                recipes.push(file);
            } else if let Recipe::Codebook(format) = &parsed {
                let (imatrix, mut record) =
                    cache.imatrix(agent, model, &self.calibration, spec.ctx)?;
                let (mut file, report) = cache.codebook(agent, model, recipe, *format, &imatrix)?;
                record.model = name.clone();
                record.recipe = recipe.clone();
                file.note = codebook_note(&report, &record);
                recipes.push(file);
                calibrations.push(record);
            } else if let Recipe::Gptq(base) | Recipe::Awq(base) = &parsed {
                let method = if matches!(parsed, Recipe::Gptq(_)) {
                    "gptq"
                } else {
                    "awq"
                };
                let (mut file, mut record) =
                    cache.calibrated(agent, model, method, base, &self.calibration, spec.ctx)?;
                record.model = name.clone();
                file.note = record.note();
                recipes.push(file);
                calibrations.push(record);
            } else if recipe == "adaptive" {
                let a = &spec.adaptive;
                // Random weights have no importance to measure: the
                // layer order stands in for it, and the method says so.
                let scores = if let Some(n) = synthetic_layers {
                    (0..n).map(|i| (n - i) as f64).collect()
                } else {
                    cache.importance(agent, model, &self.text, spec.ctx, &a.low)?
                };
                let assignment = adaptive_assignment(&scores, a);
                recipes.push(cache.quantize(
                    agent,
                    model,
                    &QuantizeSpec {
                        layer_types: &assignment,
                        other_type: Some(&a.high),
                        ..QuantizeSpec::uniform("adaptive", &a.low)
                    },
                )?);
                importance = Some(LayerImportance {
                    model: name.clone(),
                    method: if synthetic {
                        "layer order, earlier layers first (a synthetic model's random weights have no importance to measure)".to_string()
                    } else {
                        format!(
                            "mean KL divergence from the unquantized model on {} (ctx {}) when only that layer is quantized to {}",
                            spec.text.display(),
                            spec.ctx,
                            a.low
                        )
                    },
                    scores,
                    assignment,
                });
            }
        }
        Ok((recipes, importance, calibrations))
    }
}

impl JobKind for ModelMatrix {
    fn kind(&self) -> &'static str {
        "model"
    }

    fn matrix(&self) -> &str {
        &self.name
    }

    fn spec(&self) -> serde_json::Value {
        to_spec(&self.spec)
    }

    fn needs_host_agent(&self) -> bool {
        true
    }

    /// Quantization always happens on the host, whatever the target; in
    /// an A/B session each build quantizes with its own quantizer.
    fn prepare(&mut self, session: &Session) -> Result<(), JobError> {
        let agent = session.base().host_agent.as_ref().ok_or_else(|| {
            JobError::MissingHostAgent("the model matrix needs the host agent to quantize".into())
        })?;
        self.prepared.clear();
        for source in &self.models {
            let (model, name, synthetic_layers) = match source {
                ModelSource::File(path) => (path.clone(), source.name(), None),
                ModelSource::Synthetic(wanted) => {
                    let made = synthetic::make(agent, &session.workspace, wanted, None)
                        .map_err(|e| JobError::Synthetic(e.to_string()))?;
                    match made.seconds {
                        Some(seconds) => eprintln!(
                            "{}: made in {seconds:.1} s ({:.2} GB, peak memory {:.2} GB)",
                            wanted.file_name(),
                            made.file_bytes as f64 / 1e9,
                            made.peak_rss_bytes.unwrap_or(0) as f64 / 1e9
                        ),
                        None => eprintln!("{}: from the cache", wanted.file_name()),
                    }
                    (made.path, wanted.file_name(), Some(wanted.spec.n_layer))
                }
            };
            self.check_context_length(&model, &name)?;
            let target = ModelToQuantize {
                path: &model,
                name: &name,
                synthetic_layers,
            };
            let mut by_build = Vec::new();
            for build in &session.under_test {
                by_build.push(self.recipes_for_build(session, build, &target)?);
            }
            // What the base build measured and learnt is the run's record.
            let (recipes, importance, calibrations) = by_build.remove(0);
            // The reference is computed here once, so a board measures only
            // its recipes and never needs the unquantized model.
            let reference = match synthetic_layers {
                Some(_) => None,
                None => Some(
                    RecipeCache::open(&session.workspace, &model, &session.base().source)?
                        .reference(agent, &model, &self.text, self.spec.ctx)?,
                ),
            };
            self.prepared.push(PreparedModel {
                reference,
                file_bytes: check_model_file(&model)?,
                path: model,
                name,
                synthetic: synthetic_layers.is_some(),
                recipes,
                versus_recipes: by_build.into_iter().map(|(r, _, _)| r).collect(),
                importance,
                calibrations,
            });
        }
        Ok(())
    }

    fn plan(&self, session: &Session, board: &BoardSlot) -> Result<Vec<PlannedJob>, JobError> {
        let mut jobs = Vec::new();
        // A model none of whose recipes a `bisect --cell` names has no job.
        for model in self.prepared.iter().filter(|m| !m.recipes.is_empty()) {
            let mut job = ModelJob {
                run_id: session.run_id.clone(),
                board: board.name.clone(),
                emulated: board.emulated,
                git_commit: session.commit.clone(),
                model_name: model.name.clone(),
                base: RecipeFile {
                    recipe: "original".into(),
                    path: model.path.display().to_string(),
                    fallbacks: Vec::new(),
                    file_bytes: model.file_bytes,
                    note: String::new(),
                    scheme_bits_per_weight: None,
                    unmade: None,
                },
                recipes: model.recipes.clone(),
                threads: self.spec.threads.clone(),
                text: self.text.display().to_string(),
                ctx: self.spec.ctx,
                prompt: self.spec.prompt.clone(),
                generate_tokens: self.spec.generate_tokens,
                n_prompt: self.spec.n_prompt,
                n_gen: self.spec.n_gen,
                depths: self.spec.n_depth.clone(),
                pg: self.spec.pg.clone(),
                contexts: self.spec.contexts(),
                load_modes: self.spec.load_modes(),
                reference: None,
                memory_limit_bytes: match &board.board {
                    crate::fleet::boards::ResolvedBoard::Remote(remote) => remote.max_memory_bytes,
                    crate::fleet::boards::ResolvedBoard::Local => None,
                },
                repetitions: self.spec.repetitions,
                invocations: self
                    .spec
                    .invocations
                    .unwrap_or(if board.emulated {
                        1
                    } else {
                        DEFAULT_MODEL_INVOCATIONS
                    })
                    .max(1),
                max_invocations: if board.emulated {
                    0
                } else {
                    self.spec.max_invocations.unwrap_or(0)
                },
                precision: self
                    .spec
                    .precision
                    .unwrap_or(wire::kernel_job::DEFAULT_PRECISION),
                multiple_choice: self
                    .multiple_choice
                    .as_ref()
                    .filter(|_| !model.synthetic)
                    .map(|p| p.display().to_string()),
                synthetic: model.synthetic,
                runner: match &board.board {
                    crate::fleet::boards::ResolvedBoard::Remote(remote) => remote.runner.clone(),
                    crate::fleet::boards::ResolvedBoard::Local => Vec::new(),
                },
                builds: Vec::new(),
                power: wire::power::PowerSettings {
                    idle_seconds: self.spec.idle_seconds,
                    ..match &board.board {
                        crate::fleet::boards::ResolvedBoard::Remote(remote) => remote.power.clone(),
                        crate::fleet::boards::ResolvedBoard::Local => Default::default(),
                    }
                },
                cooldown: self
                    .spec
                    .cooldown_below_c
                    .filter(|_| !board.emulated)
                    .map(|below_c| wire::kernel_job::Cooldown {
                        below_c,
                        max_seconds: self.spec.cooldown_max_seconds,
                    }),
                sustain_seconds: self.spec.sustain_seconds,
                sustain_interval_seconds: self.spec.sustain_interval_seconds,
            };
            // An A/B session: each build measures its own files of every
            // recipe, its binary beside the board's own.
            let (builds, agents) = super::job_builds(session, board)?;
            let files = std::iter::once(&model.recipes).chain(&model.versus_recipes);
            job.builds = builds
                .into_iter()
                .zip(files)
                .map(|(build, recipes)| ModelJobBuild {
                    build,
                    recipes: recipes.clone(),
                })
                .collect();
            // An A/B job's builds each judge with their own llama.cpp.
            if job.builds.is_empty() {
                job.reference = model.reference.as_ref().map(|p| p.display().to_string());
            }
            let uploads = uploads_of(&job);
            // The agent loads the base alone (unless the reference comes
            // from here), then each recipe twice (a timing context and an
            // evaluation context) with mmap sharing the weights; count both
            // copies to stay on the safe side, plus 20%.
            let largest = all_recipes(&job).map(|r| r.file_bytes).max().unwrap_or(0);
            let base = if job.reference.is_some() {
                0
            } else {
                job.base.file_bytes
            };
            let needed = ((2 * largest).max(base) as f64 * 1.2) as u64;
            jobs.push(PlannedJob {
                kind_index: 0,
                name: format!("{}-{}", self.name, job_name_part(&model.name)),
                subcommand: "model-run",
                units: job.recipes.len(),
                spec: to_spec(&job),
                uploads,
                memory_need: Some(MemoryNeed {
                    bytes: needed,
                    what: format!("model {} (twice the largest recipe + 20%)", model.name),
                    advice: "use a smaller model or fewer high-precision recipes".into(),
                }),
                // Rows only: the models are uploads, checked as they go.
                disk_bytes: wire::kernel_job::ROWS_ALLOWANCE_BYTES,
                outputs: &[MODEL_ROWS_FILE, SAMPLES_FILE, SUSTAINED_FILE],
                deadline: self.deadline(&job),
                agents,
            });
        }
        Ok(jobs)
    }

    fn complete(
        &self,
        job: &PlannedJob,
        job_dir: &Path,
        failure: Option<&JobFailure>,
    ) -> Result<Tally, JobError> {
        let job: ModelJob = from_spec(job)?;
        let path = job_dir.join(MODEL_ROWS_FILE);
        let mut rows: Vec<ModelRow> = rows_in(&path)?;
        rows.retain(|r| r.run_id == job.run_id && r.model_filename == job.model_name);
        let mut out = CsvAppender::<ModelRow>::open(&path)?;
        let reason = failure
            .map(|f| f.reason.as_str())
            .unwrap_or("the agent ended without a row for this recipe");
        // One status per recipe (a recipe's pp and tg rows share it; the
        // worst wins), each recipe counted once.
        let mut by_recipe: BTreeMap<&str, CellStatus> = BTreeMap::new();
        for (index, recipe) in job.recipes.iter().enumerate() {
            let mut worst = CellStatus::Ok;
            for build in sides(&job) {
                let statuses: Vec<CellStatus> = rows
                    .iter()
                    .filter(|r| r.recipe == recipe.recipe && r.build == build)
                    .map(|r| r.status)
                    .collect();
                let status = if statuses.is_empty() {
                    let (agent, file) = match job.builds.iter().find(|b| b.build.name == build) {
                        Some(b) => (b.build.agent.clone(), &b.recipes[index]),
                        None => (Default::default(), recipe),
                    };
                    let mut row = ModelRow::failed(&job, file, &agent, reason);
                    row.build = build;
                    out.append(&row)?;
                    CellStatus::Failed
                } else {
                    statuses
                        .into_iter()
                        .find(|s| *s != CellStatus::Ok)
                        .unwrap_or(CellStatus::Ok)
                };
                if worst == CellStatus::Ok || status == CellStatus::Failed {
                    worst = status;
                }
            }
            by_recipe.insert(&recipe.recipe, worst);
        }
        let mut tally = Tally::default();
        by_recipe.values().for_each(|s| tally.count(*s));
        Ok(tally)
    }

    fn remaining(&self, job: &PlannedJob, job_dir: &Path) -> Result<Option<PlannedJob>, JobError> {
        let mut spec: ModelJob = from_spec(job)?;
        let rows: Vec<ModelRow> = rows_in(&job_dir.join(MODEL_ROWS_FILE))?;
        // A recipe is done when every build has its rows.
        let done: Vec<bool> = spec
            .recipes
            .iter()
            .map(|recipe| {
                sides(&spec).iter().all(|build| {
                    rows.iter().any(|r| {
                        r.run_id == spec.run_id
                            && r.model_filename == spec.model_name
                            && r.recipe == recipe.recipe
                            && r.build == *build
                    })
                })
            })
            .collect();
        let keep = |recipes: &mut Vec<RecipeFile>| {
            let mut done = done.iter();
            recipes.retain(|_| !done.next().copied().unwrap_or(false));
        };
        keep(&mut spec.recipes);
        spec.builds.iter_mut().for_each(|b| keep(&mut b.recipes));
        if spec.recipes.is_empty() {
            return Ok(None);
        }
        Ok(Some(PlannedJob {
            units: spec.recipes.len(),
            deadline: self.deadline(&spec),
            uploads: uploads_of(&spec),
            spec: to_spec(&spec),
            ..job.clone()
        }))
    }

    fn merge(
        &self,
        run_dir: &Path,
        run_id: &str,
        boards: &[String],
    ) -> Result<Vec<String>, ResultsError> {
        let mut rejected = merge_rows::<ModelRow>(run_dir, run_id, boards, MODEL_ROWS_FILE)?;
        // Kernel and model repetitions share the file; rebuilding it is
        // idempotent, whichever kind does it.
        rejected.extend(merge_rows::<SampleRow>(
            run_dir,
            run_id,
            boards,
            SAMPLES_FILE,
        )?);
        rejected.extend(merge_rows::<SustainRow>(
            run_dir,
            run_id,
            boards,
            SUSTAINED_FILE,
        )?);
        Ok(rejected)
    }

    fn finish(&self, run_dir: &Path) -> Result<(), ResultsError> {
        // Several model matrices in one run share the file.
        let path = run_dir.join(IMPORTANCE_FILE);
        let mut all: Vec<LayerImportance> = if path.exists() {
            wire::files::read_json(&path)?
        } else {
            Vec::new()
        };
        for model in &self.prepared {
            if let Some(li) = &model.importance {
                if !all
                    .iter()
                    .any(|x| x.model == li.model && x.method == li.method)
                {
                    all.push(li.clone());
                }
            }
        }
        write_json(&path, &all)?;
        let calibrated: Vec<&CalibrationRecord> =
            self.prepared.iter().flat_map(|m| &m.calibrations).collect();
        if calibrated.is_empty() {
            return Ok(());
        }
        let path = run_dir.join(CALIBRATION_FILE);
        let mut all: Vec<CalibrationRecord> = if path.exists() {
            wire::files::read_json(&path)?
        } else {
            Vec::new()
        };
        for record in calibrated {
            if !all.contains(record) {
                all.push(record.clone());
            }
        }
        write_json(&path, &all)
    }
}

/// The row note of a codebook recipe: what was coded, with what, and why
/// the row has no speed.
fn codebook_note(report: &wire::model_job::CodebookReport, record: &CalibrationRecord) -> String {
    let mut note = format!(
        "{} codebooks on {} matrices ({} with sensitivities from the {}); weighted weight NMSE {:.2e}; {:.3} bits per weight as stored. llama.cpp ran the decoded weights in F16 (output matrix Q8_0): quality only, speed in the kernel matrix's {} rows",
        report.format,
        report.coded,
        report.with_importance,
        record.note(),
        report.mean_weighted_nmse,
        report.bits_per_weight(),
        report.format
    );
    if !report.left.is_empty() {
        note.push_str(&format!("; left as they were: {}", report.left.join(", ")));
    }
    note
}

/// What a recipe needs that the build's llama.cpp lacks, if anything: such
/// a recipe is left out of that build's runs (the rest still run).
fn switched_off(
    recipe: &Recipe,
    build: &crate::builds::llama_source::PreparedSource,
) -> Option<&'static str> {
    use crate::builds::llama_source::Capability;
    match recipe {
        // Codebook files keep some tensors at q8_0 through an override.
        Recipe::Adaptive | Recipe::Codebook(_)
            if build.identity.lacks(Capability::TensorOverrides) =>
        {
            Some("per-tensor quantize overrides (llama_model_tensor_override)")
        }
        Recipe::Quantize(q)
            if q.imatrix.is_some() && build.identity.lacks(Capability::ImatrixData) =>
        {
            Some("importance data in the quantize parameters (llama_model_imatrix_data)")
        }
        Recipe::Quantize(q)
            if !q.options.tensor_types.is_empty()
                && build.identity.lacks(Capability::TensorOverrides) =>
        {
            Some("per-tensor quantize overrides (llama_model_tensor_override)")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bisect_cell_carries_its_settings_in_brackets_and_must_be_one_of_the_matrix() {
        let root = crate::builds::build::workspace_root();
        let text = format!(
            "[model_matrices.m]\nmodels = [{:?}]\nrecipes = [\"q8_0\"]\ntext = {:?}\nctx = 128\nprompt = \"Once\"\ngenerate_tokens = 4\nn_prompt = 32\nn_gen = 8\nthreads = [2, \"big\"]\nkv_type = [\"f16\", \"q8_0\"]\nflash_attn = [\"on\"]\nload_mode = [\"mmap\", \"no-mmap\"]\n",
            root.join("fixtures/stories260K.gguf"),
            root.join("fixtures/stories-eval.txt")
        );
        let config = BenchConfig::parse(&text, &root.join("bench.toml")).unwrap();
        let matrix = ModelMatrix::new(&config, "m", &config.model_matrices["m"]).unwrap();
        let cell = "stories260K.gguf/q8_0/tg8/t2";
        matrix
            .check_test(&format!("{cell}[ctk=q8_0/ctv=q8_0/fa=on/b=2048/ub=512]"))
            .unwrap();
        matrix
            .check_test(&format!(
                "{cell}[ctk=f16/ctv=f16/fa=on/b=2048/ub=512/load=no-mmap]"
            ))
            .unwrap();
        // "big" is a thread count the board decides.
        matrix
            .check_test("stories260K.gguf/q8_0/pp32/t4[ctk=f16/ctv=f16/fa=on/b=2048/ub=512]")
            .unwrap();
        // This matrix runs no test at llama.cpp's defaults (flash attention
        // is on), nor with a bf16 cache: each is refused naming the ones it has.
        for wrong in ["", "[ctk=bf16/ctv=bf16/fa=on/b=2048/ub=512]"] {
            let e = matrix.check_test(&format!("{cell}{wrong}")).unwrap_err();
            assert!(
                e.contains("has no settings")
                    && e.contains("[ctk=q8_0/ctv=q8_0/fa=on/b=2048/ub=512/load=no-mmap]"),
                "{e}"
            );
        }
        let e = matrix
            .check_test("stories260K.gguf/q4_0/tg8/t2[ctk=f16/ctv=f16/fa=on/b=2048/ub=512]")
            .unwrap_err();
        assert!(e.contains("has no test"), "{e}");
    }
}
