//! The model matrix end to end on the `local` target: recipes quantized on
//! the host (cached by model hash and recipe), layer importance measured for
//! `adaptive`, the agent's `model-run`, rows in `models.csv`, plots.

#[cfg(feature = "plot")]
use crate::bench::plot_dir;
use crate::bench::{known_boards, target_or_default, unique_run_id, BenchError};
use crate::boards::{resolve_targets, ResolvedBoard, SshConfig};
use crate::build::{
    build_board_agent, build_host_agent, file_hash, workspace_root, AgentBuild, Builder,
};
use crate::config::{BenchConfig, ConfigError};
use crate::deploy::SshRunner;
use crate::models::{
    adaptive_assignment, check_model_file, is_uniform_recipe, LayerImportance, ModelJob,
    ModelMatrixSpec, ModelRow, RecipeFile, MODEL_ROWS_FILE,
};
use crate::progress::ProgressEvent;
use crate::results::CsvAppender;
use crate::results::{read_csv, write_json, ResultsError};
use crate::run::{git_commit, HostInfo};
use crate::setup::Need;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelRunManifest {
    pub run_id: String,
    pub started_at: String,
    pub matrix: String,
    pub spec: ModelMatrixSpec,
    pub git_commit: String,
    pub agent_build: String,
    pub host: HostInfo,
    pub importance: Vec<LayerImportance>,
}

pub struct ModelReport {
    pub run_dir: PathBuf,
    pub rows: Vec<ModelRow>,
    pub summary_markdown: String,
    pub plots: Vec<PathBuf>,
    pub succeeded: bool,
}

fn invalid(config: &BenchConfig, matrix: &str, message: String) -> BenchError {
    BenchError::Config(ConfigError::Invalid {
        path: config.source.clone(),
        matrix: matrix.to_string(),
        message,
    })
}

/// Resolves a path from the config relative to the config file's folder.
fn config_relative(config: &BenchConfig, path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    let base = config
        .source
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let joined = base.join(path);
    // Fall back to the workspace for the repository's own fixtures.
    if joined.exists() {
        joined
    } else {
        workspace_root().join(path)
    }
}

/// Runs a model matrix on `target` (`None`: the embedded default, one
/// emulated Pi 5). Quantization always happens on the host.
pub fn run_model_bench(
    config: &BenchConfig,
    matrix: &str,
    target: Option<&str>,
    results_root: &Path,
    builder: Builder,
    accept_new_host_key: bool,
) -> Result<ModelReport, BenchError> {
    let spec = config
        .model_matrices
        .get(matrix)
        .ok_or_else(|| invalid(config, matrix, "no such model matrix".into()))?
        .clone();
    spec.validate().map_err(|m| invalid(config, matrix, m))?;
    // Every input is checked before anything is built.
    let models: Vec<PathBuf> = spec
        .models
        .iter()
        .map(|m| config_relative(config, m))
        .collect();
    for model in &models {
        check_model_file(model).map_err(|m| invalid(config, matrix, m))?;
    }
    let text = config_relative(config, &spec.text);
    if !text.is_file() {
        return Err(invalid(
            config,
            matrix,
            format!("text {} does not exist", text.display()),
        ));
    }
    let mc_file = spec
        .multiple_choice
        .as_ref()
        .map(|p| config_relative(config, p));
    if let Some(mc) = &mc_file {
        crate::models::read_choice_tasks(mc).map_err(|m| invalid(config, matrix, m))?;
    }
    let workspace = workspace_root();
    let target = target_or_default(target, &workspace)?;
    let boards = resolve_targets(
        &target,
        &known_boards(config, &workspace)?,
        &SshConfig::load_default(),
    )?;
    let mut needs = vec![Need::HostBuild];
    if boards.iter().any(|b| matches!(b, ResolvedBoard::Remote(_))) {
        needs.push(Need::CrossBuild);
    }
    crate::setup::ensure(&needs)?;
    // The host agent quantizes and measures importance whatever the target.
    let agent = build_host_agent(&workspace)?;
    let mut board_agents: BTreeMap<&'static str, AgentBuild> = BTreeMap::new();
    for board in &boards {
        if let ResolvedBoard::Remote(r) = board {
            if !board_agents.contains_key(r.profile.name()) {
                board_agents.insert(
                    r.profile.name(),
                    build_board_agent(&workspace, r.profile, builder)?,
                );
            }
        }
    }
    let commit = git_commit(&workspace);
    let run_id = unique_run_id(results_root, &commit);
    // Created when the first board runs: a recipe the model cannot take
    // fails during quantization, before any results (or uploads) exist.
    let run_dir = results_root.join(&run_id);
    let log: Arc<dyn Fn(String) + Send + Sync> = Arc::new(|line: String| eprintln!("{line}"));

    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut importance = Vec::new();
    let mut all_ok = true;
    for model in &models {
        let hash = file_hash(model)?;
        let cache = workspace.join("target/quantbench-models").join(&hash);
        std::fs::create_dir_all(&cache).map_err(|source| ResultsError::Io {
            path: cache.clone(),
            source,
        })?;
        let model_name = model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut recipes = Vec::new();
        for recipe in &spec.recipes {
            let (file, layer_importance) = if recipe == "adaptive" {
                let scores = measure_importance(&agent, model, &text, &spec, &cache, threads)?;
                let assignment = adaptive_assignment(&scores, &spec.adaptive);
                let file = quantize_cached(
                    &agent,
                    model,
                    &cache,
                    "adaptive",
                    &spec.adaptive.low,
                    &assignment,
                    Some(&spec.adaptive.high),
                    threads,
                )?;
                let li = LayerImportance {
                    model: model_name.clone(),
                    method: format!(
                        "mean KL divergence from the unquantized model on {} (ctx {}) when only that layer is quantized to {}",
                        spec.text.display(),
                        spec.ctx,
                        spec.adaptive.low
                    ),
                    scores,
                    assignment,
                };
                (file, Some(li))
            } else {
                debug_assert!(is_uniform_recipe(recipe));
                (
                    quantize_cached(&agent, model, &cache, recipe, recipe, &[], None, threads)?,
                    None,
                )
            };
            importance.extend(layer_importance);
            recipes.push(file);
        }
        let template = ModelJob {
            run_id: run_id.clone(),
            board: String::new(),
            emulated: false,
            git_commit: commit.clone(),
            model_name,
            base: RecipeFile {
                recipe: "original".into(),
                path: model.display().to_string(),
                fallbacks: Vec::new(),
                file_bytes: check_model_file(model).unwrap_or(0),
            },
            recipes,
            threads: spec.threads.clone(),
            text: text.display().to_string(),
            ctx: spec.ctx,
            prompt: spec.prompt.clone(),
            generate_tokens: spec.generate_tokens,
            n_prompt: spec.n_prompt,
            n_gen: spec.n_gen,
            repetitions: spec.repetitions,
            multiple_choice: mc_file.as_ref().map(|p| p.display().to_string()),
        };
        for board in &boards {
            let board_dir = run_dir.join("boards").join(board.name());
            std::fs::create_dir_all(&board_dir).map_err(|source| ResultsError::Io {
                path: board_dir.clone(),
                source,
            })?;
            let mut job = template.clone();
            job.board = board.name().to_string();
            let result = match board {
                ResolvedBoard::Local => run_model_job_local(&agent, &job, &board_dir),
                ResolvedBoard::Remote(r) => {
                    job.emulated = r.emulated;
                    let mut runner = SshRunner {
                        board: r.clone(),
                        agent: board_agents[r.profile.name()].clone(),
                        accept_new_host_key,
                        uploaded_bytes: Default::default(),
                        log: log.clone(),
                    };
                    let bar = indicatif::ProgressBar::new(job.recipes.len() as u64);
                    bar.set_prefix(r.name.clone());
                    let outcome = runner
                        .run_model_job(&job, &board_dir, &mut |event| {
                            if let ProgressEvent::CellFinished { index, .. } = event {
                                bar.set_position(*index as u64 + 1);
                            }
                        })
                        .map_err(|e| e.to_string());
                    bar.finish_and_clear();
                    outcome
                }
            };
            if let Err(reason) = result {
                // The board's finished rows stay; every recipe it did not
                // finish gets a failed row with the reason.
                all_ok = false;
                eprintln!("board {} failed: {reason}", board.name());
                complete_model_rows(&job, &board_dir, &reason)?;
            }
        }
    }
    let manifest = ModelRunManifest {
        run_id: run_id.clone(),
        started_at: crate::utc_now_rfc3339(),
        matrix: matrix.to_string(),
        spec,
        git_commit: commit,
        agent_build: agent.hash.clone(),
        host: HostInfo::current(),
        importance: importance.clone(),
    };
    write_json(&run_dir.join("run.json"), &manifest)?;
    write_json(&run_dir.join("importance.json"), &importance)?;
    let mut rows: Vec<ModelRow> = Vec::new();
    let mut merged = CsvAppender::<ModelRow>::open(&run_dir.join(MODEL_ROWS_FILE))?;
    for board in &boards {
        let board_rows = run_dir
            .join("boards")
            .join(board.name())
            .join(MODEL_ROWS_FILE);
        if board_rows.exists() {
            for row in read_csv::<ModelRow>(&board_rows)? {
                merged.append(&row)?;
                rows.push(row);
            }
        }
    }
    let summary_markdown = crate::summary::model_table(&rows);
    std::fs::write(
        run_dir.join("summary.md"),
        format!("# quantbench model run {run_id}\n{summary_markdown}"),
    )
    .map_err(|source| ResultsError::Io {
        path: run_dir.join("summary.md"),
        source,
    })?;
    #[cfg(feature = "plot")]
    let plots = {
        let (plot_dir, ctx) = plot_dir(&run_dir, &manifest.started_at, &manifest.git_commit)?;
        crate::plot::draw_models(&rows, &importance, &ctx, &plot_dir)?
    };
    #[cfg(not(feature = "plot"))]
    let plots = Vec::new();
    Ok(ModelReport {
        run_dir,
        succeeded: all_ok
            && rows
                .iter()
                .all(|r| r.status == crate::results::CellStatus::Ok),
        rows,
        summary_markdown,
        plots,
    })
}

fn agent_json(agent: &AgentBuild, args: &[String]) -> Result<serde_json::Value, BenchError> {
    let out = Command::new(&agent.path)
        .args(args)
        .output()
        .map_err(|e| BenchError::Model(format!("running {}: {e}", agent.path.display())))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // anyhow's message, not a backtrace line, when RUST_BACKTRACE is set.
        let message = stderr
            .lines()
            .find_map(|l| l.strip_prefix("Error: "))
            .or_else(|| stderr.lines().last())
            .unwrap_or("no message");
        return Err(BenchError::Model(format!(
            "`quantbench-agent {}` failed: {message}",
            args.first().map(String::as_str).unwrap_or("")
        )));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| BenchError::Model(format!("agent output: {e}")))
}

/// Quantizes once per (model hash, recipe): the output and its fallback
/// list are kept under target/quantbench-models/<hash>/. Files are written
/// under a temporary name and renamed, so a cache entry is never partial.
#[allow(clippy::too_many_arguments)]
fn quantize_cached(
    agent: &AgentBuild,
    model: &Path,
    cache: &Path,
    recipe: &str,
    ftype: &str,
    layer_types: &[String],
    other_type: Option<&str>,
    threads: usize,
) -> Result<RecipeFile, BenchError> {
    let key = if layer_types.is_empty() {
        recipe.to_string()
    } else {
        format!(
            "{recipe}-{}-{}",
            layer_types.join("_"),
            other_type.unwrap_or("")
        )
    };
    let path = cache.join(format!("{key}.gguf"));
    let meta_path = cache.join(format!("{key}.json"));
    if !(path.exists() && meta_path.exists()) {
        let temp = cache.join(format!("{key}.gguf.part"));
        let mut args = vec![
            "quantize".to_string(),
            "--input".into(),
            model.display().to_string(),
            "--output".into(),
            temp.display().to_string(),
            "--ftype".into(),
            ftype.to_ascii_uppercase(),
            "--threads".into(),
            threads.to_string(),
        ];
        if !layer_types.is_empty() {
            args.push("--layer-types".into());
            args.push(layer_types.join(","));
        }
        if let Some(other) = other_type {
            args.push("--other-type".into());
            args.push(other.to_string());
        }
        let meta = agent_json(agent, &args)?;
        std::fs::rename(&temp, &path).map_err(|source| ResultsError::Io {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&meta_path, meta.to_string()).map_err(|source| ResultsError::Io {
            path: meta_path.clone(),
            source,
        })?;
    }
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap_or_default())
            .unwrap_or_default();
    Ok(RecipeFile {
        recipe: recipe.to_string(),
        path: path.display().to_string(),
        fallbacks: meta["fallbacks"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        file_bytes: std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
    })
}

fn measure_importance(
    agent: &AgentBuild,
    model: &Path,
    text: &Path,
    spec: &ModelMatrixSpec,
    cache: &Path,
    threads: usize,
) -> Result<Vec<f64>, BenchError> {
    let text_hash = file_hash(text)?;
    let path = cache.join(format!(
        "importance-{}-{}-{text_hash}.json",
        spec.adaptive.low, spec.ctx
    ));
    if !path.exists() {
        let value = agent_json(
            agent,
            &[
                "importance".into(),
                "--model".into(),
                model.display().to_string(),
                "--text".into(),
                text.display().to_string(),
                "--ctx".into(),
                spec.ctx.to_string(),
                "--low".into(),
                spec.adaptive.low.clone(),
                "--threads".into(),
                threads.to_string(),
                "--scratch".into(),
                cache.join("scratch").display().to_string(),
            ],
        )?;
        std::fs::write(&path, value.to_string()).map_err(|source| ResultsError::Io {
            path: path.clone(),
            source,
        })?;
    }
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_default())
            .unwrap_or_default();
    Ok(value["scores"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
        .unwrap_or_default())
}

/// Adds a failed row for every recipe of `job` without one on this board.
fn complete_model_rows(job: &ModelJob, board_dir: &Path, reason: &str) -> Result<(), BenchError> {
    let path = board_dir.join(MODEL_ROWS_FILE);
    let done: Vec<ModelRow> = if path.exists() {
        read_csv(&path)?
    } else {
        Vec::new()
    };
    let mut out = CsvAppender::<ModelRow>::open(&path)?;
    for recipe in &job.recipes {
        if !done
            .iter()
            .any(|r| r.recipe == recipe.recipe && r.model_filename == job.model_name)
        {
            out.append(&ModelRow::failed(job, recipe, "", reason))?;
        }
    }
    Ok(())
}

/// Runs `model-run` on this machine with a progress bar.
fn run_model_job_local(agent: &AgentBuild, job: &ModelJob, board_dir: &Path) -> Result<(), String> {
    let job_path = board_dir.join(format!("model-job-{}.json", job.model_name));
    write_json(&job_path, job).map_err(|e| e.to_string())?;
    let bar = indicatif::ProgressBar::new(job.recipes.len() as u64);
    bar.set_prefix(job.model_name.clone());
    let result = crate::run::run_local_agent(
        &agent.path,
        "model-run",
        &job_path,
        board_dir,
        &mut |event| match event {
            ProgressEvent::CellStarted { cell_id, .. } => bar.set_message(cell_id.clone()),
            ProgressEvent::CellFinished { index, .. } => bar.set_position(*index as u64 + 1),
            _ => {}
        },
    );
    bar.finish_and_clear();
    result.map_err(|e| e.to_string())
}
