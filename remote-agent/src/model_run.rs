//! Whole-model work: quantizing with a recipe, measuring layer importance,
//! and running a model job (speed, memory, quality, generated text).

use anyhow::{bail, Context, Result};
use kernels::model::{gguf_tensor_types, quantize_model, BatchEntry, LoadedModel, QuantizeRequest};
use std::io::Write;
use std::path::Path;
use std::time::Instant;
use wire::child::{JudgedLine, ModelFacts, ModelTiming, Quality, RecipeJudgement};
use wire::files::{CsvAppender, MODEL_ROWS_FILE, SAMPLES_FILE};
use wire::kernel_job::JobBuild;
use wire::model_job::{repetition_score, ModelJob, ModelJobBuild, RecipeFile};
use wire::probe::BoardProbe;
use wire::progress::ProgressEvent;
use wire::rows::CellStatus;
use wire::rows::{ModelRow, SampleRow};
use wire::stats::Summary;

/// Quantizes `input` to `output`: a uniform llama.cpp file type, or with
/// `layer_types` one GGML type per transformer block (`blk.N.*`), the token
/// embedding and output matrices at `other_type`. Per-layer recipes pass a
/// quantized `ftype` (llama.cpp ignores overrides for an F32 file type).
/// Returns the tensors that ended in another type than asked.
/// Per weight in an importance-matrix file, the mean square of each input
/// column (what llama.cpp's quantizer and the codebooks weight errors by);
/// nothing without a file.
pub fn imatrix_importance(imatrix: Option<&Path>) -> Result<Vec<(String, Vec<f32>)>> {
    Ok(match imatrix {
        Some(path) => kernels::calibration::read_imatrix(path)?
            .entries
            .into_iter()
            .map(|(name, stats)| {
                let values = stats.mean_squares();
                (name, values)
            })
            .collect(),
        None => Vec::new(),
    })
}

pub fn quantize(
    input: &Path,
    output: &Path,
    ftype: &str,
    layer_types: &[String],
    other_type: Option<&str>,
    threads: usize,
    imatrix: Option<&Path>,
) -> Result<Vec<String>> {
    let importance = imatrix_importance(imatrix)?;
    let mut overrides: Vec<(String, String)> = layer_types
        .iter()
        .enumerate()
        .map(|(i, ty)| (format!("^blk\\.{i}\\."), ty.clone()))
        .collect();
    if let Some(other) = other_type {
        overrides.push(("^token_embd\\.".into(), other.to_string()));
        overrides.push(("^output\\.".into(), other.to_string()));
    }
    quantize_model(
        input,
        output,
        &QuantizeRequest {
            ftype,
            overrides: &overrides,
            threads,
            importance: &importance,
        },
    )?;
    if layer_types.is_empty() {
        check_recipe_applied(output, ftype)?;
    }
    fallbacks(output, ftype, layer_types, other_type)
}

/// A uniform recipe the model's shapes cannot take (every matrix fell back
/// to another type, e.g. K-quants on a model whose rows are not multiples of
/// 256) is an error, not a silently different model.
fn check_recipe_applied(output: &Path, ftype: &str) -> Result<()> {
    let ftype = ftype.to_ascii_lowercase();
    if matches!(ftype.as_str(), "f32" | "f16" | "bf16") {
        return Ok(());
    }
    // q4_k_m -> "q4_k" family "_k"; q8_0 -> "q8_0".
    let family = if ftype.contains("_k") {
        "_k".to_string()
    } else {
        ftype.clone()
    };
    let matrices: Vec<(String, String)> = gguf_tensor_types(output)?
        .into_iter()
        .filter(|(name, _)| name.ends_with(".weight") && !name.contains("norm"))
        .collect();
    let applied = matrices
        .iter()
        .any(|(_, ty)| ty.to_ascii_lowercase().contains(&family));
    if !applied && !matrices.is_empty() {
        let _ = std::fs::remove_file(output);
        bail!(
            "recipe `{ftype}` cannot be applied to this model: none of its {} matrices can be stored in it (every one fell back to another type; K-quants need rows that are a multiple of 256 elements)",
            matrices.len()
        );
    }
    Ok(())
}

/// Tensors of `output` stored in another type than the recipe named:
/// block-size fallbacks (rows not a multiple of the block) and llama.cpp's
/// own choices (e.g. a higher-precision output tensor). Norms and other 1-D
/// tensors stay F32 by design and are not listed; mixes such as q4_k_m pick
/// types per tensor, so they are not judged.
fn fallbacks(
    output: &Path,
    ftype: &str,
    layer_types: &[String],
    other_type: Option<&str>,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    if ftype.to_ascii_lowercase().contains("_k_") && layer_types.is_empty() {
        return Ok(out);
    }
    for (name, got) in gguf_tensor_types(output)? {
        if !name.ends_with(".weight") || name.contains("norm") {
            continue;
        }
        let layer_type = name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
            .and_then(|i| layer_types.get(i));
        let wanted = match (layer_type, other_type) {
            (Some(t), _) => t.clone(),
            (None, Some(other)) => other.to_string(),
            (None, None) => ftype.to_string(),
        };
        if !got.eq_ignore_ascii_case(&wanted) {
            out.push(format!("{name}:{}->{got}", wanted.to_ascii_lowercase()));
        }
    }
    Ok(out)
}

/// Base model's log-probabilities at the scored positions, and the targets.
pub struct Reference {
    pub log_probs: Vec<Vec<f32>>,
    pub targets: Vec<i32>,
}

/// Sequences llama-perplexity evaluates at once with its default batch of
/// 2048 tokens (`n_seq = n_batch / n_ctx`).
pub fn eval_sequences(ctx: usize) -> usize {
    (2048 / ctx).max(1)
}

/// Evaluates `tokens` as llama-perplexity does: chunks of `ctx` tokens, up
/// to `eval_sequences(ctx)` chunks per batch as parallel sequences, each
/// chunk's first token replaced by BOS when the model uses one, logits of the
/// second half of each chunk scored against the next token. The model must
/// be loaded with `LoadedModel::load_with(path, ctx, eval_sequences(ctx), ..)`.
pub fn score_positions(model: &mut LoadedModel, tokens: &[i32], ctx: usize) -> Result<Reference> {
    let n_chunks = tokens.len() / ctx;
    if n_chunks == 0 {
        bail!("the text has {} tokens, fewer than one context of {ctx}: use a longer text or a smaller ctx", tokens.len());
    }
    let first = ctx / 2;
    let n_vocab = model.n_vocab();
    let n_seq = eval_sequences(ctx);
    let mut reference = Reference {
        log_probs: Vec::new(),
        targets: Vec::new(),
    };
    for group_start in (0..n_chunks).step_by(n_seq) {
        let group: Vec<usize> = (group_start..n_chunks.min(group_start + n_seq)).collect();
        let mut entries = Vec::with_capacity(group.len() * ctx);
        for (seq, &chunk) in group.iter().enumerate() {
            let start = chunk * ctx;
            for k in 0..ctx {
                let token = if k == 0 && model.adds_bos() {
                    model.bos()
                } else {
                    tokens[start + k]
                };
                entries.push(BatchEntry {
                    token,
                    pos: k,
                    seq,
                    logits: k >= first,
                });
            }
        }
        model.clear();
        let logits = model.decode_batch(&entries)?;
        let per_chunk = ctx - first;
        for (g, &chunk) in group.iter().enumerate() {
            let start = chunk * ctx;
            // Of the chunk's `per_chunk` outputs, the last has no next token.
            for j in 0..per_chunk - 1 {
                let row = g * per_chunk + j;
                reference
                    .log_probs
                    .push(log_softmax(&logits[row * n_vocab..(row + 1) * n_vocab]));
                reference.targets.push(tokens[start + first + j + 1]);
            }
        }
    }
    Ok(reference)
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::MIN, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let log_sum = sum.ln() as f32 + max;
    logits.iter().map(|&l| l - log_sum).collect()
}

/// Quality of `candidate` against `base` at the same positions.
pub fn compare(base: &Reference, candidate: &Reference) -> Quality {
    let n = candidate.targets.len();
    let mut nll = 0.0;
    let mut klds = Vec::with_capacity(n);
    let mut same_top = 0usize;
    for i in 0..n {
        let lp = &candidate.log_probs[i];
        nll -= lp[candidate.targets[i] as usize] as f64;
        let bp = &base.log_probs[i];
        let kld: f64 = bp
            .iter()
            .zip(lp)
            .map(|(&b, &q)| (b as f64).exp() * (b as f64 - q as f64))
            .sum();
        klds.push(kld.max(0.0));
        if argmax(bp) == argmax(lp) {
            same_top += 1;
        }
    }
    let mut sorted = klds.clone();
    sorted.sort_by(f64::total_cmp);
    let p99 = sorted[((sorted.len() as f64 * 0.99).ceil() as usize)
        .saturating_sub(1)
        .min(sorted.len() - 1)];
    Quality {
        ppl: (nll / n as f64).exp(),
        kld_mean: klds.iter().sum::<f64>() / n as f64,
        kld_p99: p99,
        top1_agreement: same_top as f64 / n as f64,
    }
}

fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold(
            (0, f32::MIN),
            |best, (i, &v)| if v > best.1 { (i, v) } else { best },
        )
        .0
}

/// KL rise when only layer L is quantized to `low`, for every layer: the
/// importance the `adaptive` recipe ranks layers by.
pub fn layer_importance(
    model_path: &Path,
    text: &str,
    ctx: usize,
    low: &str,
    threads: usize,
    scratch: &Path,
) -> Result<Vec<f64>> {
    let mut base_model = LoadedModel::load_with(model_path, ctx, eval_sequences(ctx), threads)?;
    let tokens = base_model.tokenize(text, base_model.adds_bos());
    let base = score_positions(&mut base_model, &tokens, ctx)?;
    let n_layers = base_model.facts().n_layer;
    drop(base_model);
    let mut scores = Vec::with_capacity(n_layers);
    for layer in 0..n_layers {
        let mut layer_types = vec!["f32".to_string(); n_layers];
        layer_types[layer] = low.to_string();
        let path = scratch.join(format!("importance-layer{layer}.gguf"));
        quantize(
            model_path,
            &path,
            &low.to_ascii_uppercase(),
            &layer_types,
            Some("f32"),
            threads,
            None,
        )?;
        let mut model = LoadedModel::load_with(&path, ctx, eval_sequences(ctx), threads)?;
        let candidate = score_positions(&mut model, &tokens, ctx)?;
        scores.push(compare(&base, &candidate).kld_mean);
        let _ = std::fs::remove_file(&path);
    }
    Ok(scores)
}

fn peak_rss_reset() {
    // Writing 5 resets VmHWM (Linux >= 4.0); best effort elsewhere.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// llama-bench's tests: pp = one batch of `n` tokens from an empty cache;
/// tg = `n` single-token decodes. Returns seconds per repetition.
fn time_test(model: &mut LoadedModel, prompt: bool, n: usize, reps: u32) -> Result<Vec<f64>> {
    let mut rng = kernels::weights::SplitMix64::new(7, n as u64);
    let vocab = model.n_vocab() as u64;
    let mut run = |model: &mut LoadedModel| -> Result<f64> {
        let tokens: Vec<i32> = (0..n).map(|_| (rng.next_u64() % vocab) as i32).collect();
        model.clear();
        let started = Instant::now();
        if prompt {
            for (i, chunk) in tokens.chunks(model.n_ctx()).enumerate() {
                model.decode(chunk, i * model.n_ctx(), false)?;
            }
        } else {
            for (pos, &t) in tokens.iter().enumerate() {
                model.decode(&[t], pos, false)?;
            }
        }
        Ok(started.elapsed().as_secs_f64())
    };
    run(model)?; // warm-up, as llama-bench does
    (0..reps).map(|_| run(model)).collect()
}

/// The job's tests in order: (threads, prompt?, tokens).
fn tests(job: &ModelJob, cores: usize) -> Vec<(usize, bool, usize)> {
    job.threads
        .iter()
        .flat_map(|t| {
            let threads = t.resolve(cores);
            [(threads, true, job.n_prompt), (threads, false, job.n_gen)]
        })
        .collect()
}

/// The most threads any test uses: what a recipe is loaded with.
fn max_threads(job: &ModelJob, cores: usize) -> usize {
    tests(job, cores).iter().map(|t| t.0).max().unwrap_or(1)
}

/// Times every test on `model`.
fn time_tests(job: &ModelJob, cores: usize, model: &mut LoadedModel) -> Result<Vec<Vec<f64>>> {
    let mut out = Vec::new();
    for (threads, prompt, n) in tests(job, cores) {
        model.set_threads(threads)?;
        out.push(time_test(model, prompt, n, job.repetitions)?);
    }
    Ok(out)
}

fn timing_ctx(job: &ModelJob) -> usize {
    job.ctx.max(job.n_prompt).max(job.n_gen + 1)
}

/// Recipe `index` of `build`'s files (the job's own without a build).
fn recipe_of<'a>(job: &'a ModelJob, build: Option<&str>, index: usize) -> Result<&'a RecipeFile> {
    job.recipes_of(build)
        .with_context(|| {
            format!(
                "the model job names no build `{}`",
                build.unwrap_or_default()
            )
        })?
        .get(index)
        .with_context(|| format!("the model job has no recipe {index}"))
}

/// A decoded scheme runs llama.cpp's F32 kernels: its times and memory
/// would be F32's, not the scheme's, so it is not timed.
fn timed(recipe: &RecipeFile) -> bool {
    recipe.scheme_bits_per_weight.is_none()
}

/// The child of a further invocation (`quantbench-agent model-time`):
/// loads recipe `index` (of `build`'s files in an A/B job) afresh, times
/// every test and prints the result as one JSON line.
pub fn time_invocation(
    job: &ModelJob,
    build: Option<&str>,
    index: usize,
    cores: usize,
) -> Result<()> {
    let recipe = recipe_of(job, build, index)?;
    peak_rss_reset();
    let started = Instant::now();
    let mut model = LoadedModel::load(
        Path::new(&recipe.path),
        timing_ctx(job),
        max_threads(job, cores),
    )?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let seconds = time_tests(job, cores, &mut model)?;
    let timing = ModelTiming {
        load_ms,
        peak_rss_bytes: peak_rss_bytes(),
        seconds,
    };
    println!("{}", serde_json::to_string(&timing)?);
    Ok(())
}

/// A recipe's invocations so far, each with the round it ran in.
type Timings = Vec<(u32, ModelTiming)>;

/// Whether every test's time is known to `precision` from `timings`.
fn precise_enough(timings: &Timings, precision: f64) -> bool {
    let tests = timings.first().map_or(0, |(_, t)| t.seconds.len());
    (0..tests).all(|test| {
        let groups: Vec<Vec<f64>> = timings
            .iter()
            .map(|(_, t)| t.seconds.get(test).cloned().unwrap_or_default())
            .collect();
        wire::stats::relative_half_width(&groups, 0.95).is_some_and(|p| p <= precision)
    })
}

/// Whether a recipe needs another invocation: fewer than the job's
/// `invocations`, or (adaptive) fewer than `max_invocations` while some
/// test's time is imprecise.
fn wants_more(job: &ModelJob, timings: &Timings) -> bool {
    let n = timings.len() as u32;
    n < job.invocations || (n < job.max_invocations && !precise_enough(timings, job.precision))
}

/// Starts `exe` (this binary, or an A/B build's) as a child with
/// `subcommand` on the job's recipe or build, and returns its stdout.
fn run_child(
    job: &ModelJob,
    exe: &Path,
    subcommand: &str,
    args: &[String],
) -> Result<(std::process::ExitStatus, String)> {
    let output = crate::child::command(&job.runner, exe)
        .arg(subcommand)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("starting `{subcommand}` ({})", exe.display()))?;
    Ok((
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
    ))
}

/// A further invocation of recipe `index` (of `build`'s files) in a fresh
/// child process of `exe`.
fn invoke_child(
    job: &ModelJob,
    exe: &Path,
    job_path: &Path,
    build: Option<&str>,
    (index, cores): (usize, usize),
) -> Result<ModelTiming> {
    let mut args = vec![
        "--job".to_string(),
        job_path.display().to_string(),
        "--recipe".into(),
        index.to_string(),
        "--cores".into(),
        cores.to_string(),
    ];
    if let Some(build) = build {
        args.extend(["--build".to_string(), build.to_string()]);
    }
    let (status, text) = run_child(job, exe, "model-time", &args)?;
    if !status.success() {
        bail!(
            "a further invocation {}",
            crate::rounds::describe_exit(&status)
        );
    }
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("reading an invocation's result `{line}`"))
}

fn greedy(model: &mut LoadedModel, prompt: &str, n: usize) -> Result<String> {
    let mut tokens = model.tokenize(prompt, model.adds_bos());
    model.clear();
    let mut logits = model.decode(&tokens, 0, false)?;
    let mut text = String::new();
    for _ in 0..n {
        if tokens.len() >= model.n_ctx() {
            break;
        }
        let next = argmax(&logits) as i32;
        text.push_str(&model.token_text(next));
        tokens.push(next);
        logits = model.decode(&[next], tokens.len() - 1, false)?;
    }
    Ok(text)
}

/// Accuracy on HellaSwag-layout tasks, scored as llama.cpp's perplexity
/// tool scores HellaSwag: each ending's mean log-probability given the
/// context; the most likely ending is the model's answer.
fn multiple_choice_accuracy(model: &mut LoadedModel, path: &Path) -> Result<f64> {
    let tasks = wire::model_job::read_choice_tasks(path)?;
    let mut correct = 0usize;
    for task in &tasks {
        let context = model.tokenize(&task.ctx, model.adds_bos());
        let mut best = (f64::MIN, 0usize);
        for (choice, ending) in task.endings.iter().enumerate() {
            let full = model.tokenize(&format!("{} {}", task.ctx, ending.trim()), model.adds_bos());
            // Tokenization may merge across the boundary; score whatever
            // follows the shared prefix.
            let shared = context
                .iter()
                .zip(&full)
                .take_while(|(a, b)| a == b)
                .count()
                .max(1);
            if full.len() <= shared || full.len() > model.n_ctx() {
                continue;
            }
            model.clear();
            let logits = model.decode(&full, 0, true)?;
            let n_vocab = model.n_vocab();
            let mut sum = 0.0;
            for i in shared..full.len() {
                let row = log_softmax(&logits[(i - 1) * n_vocab..i * n_vocab]);
                sum += row[full[i] as usize] as f64;
            }
            let mean = sum / (full.len() - shared) as f64;
            if mean > best.0 {
                best = (mean, choice);
            }
        }
        if best.1 == task.label {
            correct += 1;
        }
    }
    Ok(correct as f64 / tasks.len() as f64)
}

/// The text's tokens and the base model's reference at the scored
/// positions; nothing for a synthetic model (random weights have no
/// quality to measure).
fn reference(job: &ModelJob, threads: usize) -> Result<(Vec<i32>, Option<Reference>)> {
    if job.synthetic {
        return Ok((Vec::new(), None));
    }
    let text =
        std::fs::read_to_string(&job.text).with_context(|| format!("reading {}", job.text))?;
    let mut base_model = LoadedModel::load_with(
        Path::new(&job.base.path),
        job.ctx,
        eval_sequences(job.ctx),
        threads,
    )?;
    let tokens = base_model.tokenize(&text, base_model.adds_bos());
    let base = score_positions(&mut base_model, &tokens, job.ctx)?;
    Ok((tokens, Some(base)))
}

/// Everything but speed of `recipe`, loaded as `model` for timing:
/// llama.cpp's facts and, against `base`, quality (in a context of
/// exactly `ctx`, like the reference), the greedy continuation and the
/// multiple-choice accuracy.
fn judge(
    job: &ModelJob,
    recipe: &RecipeFile,
    model: &mut LoadedModel,
    (tokens, base): (&[i32], Option<&Reference>),
    threads: usize,
) -> Result<RecipeJudgement> {
    let facts = model.facts();
    let mut judged = RecipeJudgement {
        facts: ModelFacts {
            description: facts.description,
            size_bytes: facts.size_bytes,
            n_params: facts.n_params,
        },
        quality: None,
        generated_text: None,
        mc_accuracy: None,
    };
    let Some(base) = base else {
        return Ok(judged);
    };
    let mut eval_model = LoadedModel::load_with(
        Path::new(&recipe.path),
        job.ctx,
        eval_sequences(job.ctx),
        threads,
    )?;
    judged.quality = Some(compare(
        base,
        &score_positions(&mut eval_model, tokens, job.ctx)?,
    ));
    drop(eval_model);
    judged.generated_text = Some(greedy(model, &job.prompt, job.generate_tokens)?);
    judged.mc_accuracy = match &job.multiple_choice {
        Some(path) => Some(multiple_choice_accuracy(model, Path::new(path))?),
        None => None,
    };
    Ok(judged)
}

/// The child that judges one build of an A/B job (`quantbench-agent
/// model-quality`): the base model's reference with this binary's
/// llama.cpp, then each recipe the build made, one `JudgedLine` a recipe
/// on stdout as it is done.
pub fn judge_build(job: &ModelJob, build: &str, cores: usize) -> Result<()> {
    let recipes = job
        .recipes_of(Some(build))
        .with_context(|| format!("the model job names no build `{build}`"))?;
    let threads = max_threads(job, cores);
    let (tokens, base) = reference(job, threads)?;
    let mut stdout = std::io::stdout();
    for (index, recipe) in recipes.iter().enumerate() {
        if recipe.unmade.is_some() {
            continue;
        }
        let judged = LoadedModel::load(Path::new(&recipe.path), timing_ctx(job), threads)
            .map_err(anyhow::Error::from)
            .and_then(|mut model| judge(job, recipe, &mut model, (&tokens, base.as_ref()), threads))
            .map_err(|e| format!("{e:#}"));
        let line = JudgedLine {
            recipe: index,
            judged,
        };
        writeln!(stdout, "{}", serde_json::to_string(&line)?)?;
        stdout.flush()?;
    }
    Ok(())
}

/// A recipe's rows (one per thread count and test), each with its
/// repetitions (ns) by invocation and the round each invocation ran in.
type RecipeRows = Vec<(ModelRow, Vec<(u32, Vec<f64>)>)>;

/// What measuring one recipe with one build came to.
enum Measured {
    Rows(RecipeRows),
    /// The build could not make the recipe (its quantizer's words).
    Unsupported(String),
    Failed(String),
}

/// The row of `recipe` before any figure: the job's, build's and recipe's
/// columns, `note` saying why it has none.
fn base_row(
    job: &ModelJob,
    probe: &BoardProbe,
    build: Option<&JobBuild>,
    recipe: &RecipeFile,
    note: &str,
) -> ModelRow {
    let mut row = ModelRow::failed(job, recipe, build.map_or(&probe.agent, |b| &b.agent), note);
    if let Some(build) = build {
        row.build = build.name.clone();
    }
    row
}

/// The rows of `recipe` as `build` measured it: `judged` and the
/// invocations in `timings` (none for a recipe that is not timed).
fn recipe_rows(
    job: &ModelJob,
    probe: &BoardProbe,
    build: Option<&JobBuild>,
    recipe: &RecipeFile,
    judged: &RecipeJudgement,
    timings: &Timings,
) -> RecipeRows {
    let timed = !timings.is_empty();
    let facts = &judged.facts;
    let load_ms =
        Summary::of(&timings.iter().map(|(_, t)| t.load_ms).collect::<Vec<_>>()).map(|s| s.mean);
    let peak_rss = timings.iter().filter_map(|(_, t)| t.peak_rss_bytes).max();
    let mut out = Vec::new();
    for (test_index, (threads, prompt, n)) in tests(job, probe.cores).into_iter().enumerate() {
        let seconds: Vec<Vec<f64>> = timings
            .iter()
            .map(|(_, t)| t.seconds.get(test_index).cloned().unwrap_or_default())
            .collect();
        let all: Vec<f64> = seconds.iter().flatten().copied().collect();
        let ns: Vec<f64> = all.iter().map(|s| s * 1e9).collect();
        let ts: Vec<f64> = all.iter().map(|s| n as f64 / s).collect();
        let (summary_ns, ts) = (Summary::of(&ns), Summary::of(&ts));
        let quality = judged.quality.as_ref();
        let row = ModelRow {
            status: CellStatus::Ok,
            model_type: facts.description.clone(),
            model_size: recipe
                .scheme_bits_per_weight
                .map_or(facts.size_bytes, |bits| {
                    (bits * facts.n_params as f64 / 8.0).round() as u64
                }),
            model_n_params: facts.n_params,
            bits_per_weight: recipe
                .scheme_bits_per_weight
                .unwrap_or(facts.size_bytes as f64 * 8.0 / facts.n_params.max(1) as f64),
            n_threads: threads,
            n_prompt: if prompt { n } else { 0 },
            n_gen: if prompt { 0 } else { n },
            test: format!("{}{n}", if prompt { "pp" } else { "tg" }),
            avg_ns: summary_ns.map(|s| s.mean),
            stddev_ns: summary_ns.map(|s| s.stddev),
            avg_ts: ts.map(|s| s.mean),
            stddev_ts: ts.map(|s| s.stddev),
            load_ms: load_ms.filter(|_| timed),
            peak_rss_bytes: peak_rss.filter(|_| timed),
            invocations: timings.len() as u32,
            precision: wire::stats::relative_half_width(&seconds, 0.95),
            ppl: quality.map(|q| q.ppl),
            kld_mean: quality.map(|q| q.kld_mean),
            kld_p99: quality.map(|q| q.kld_p99),
            top1_agreement: quality.map(|q| q.top1_agreement),
            mc_accuracy: judged.mc_accuracy,
            repetition_score: judged.generated_text.as_deref().map(repetition_score),
            generated_text: judged.generated_text.clone().unwrap_or_default(),
            note: match (quality.is_none(), recipe.note.is_empty()) {
                (true, true) => {
                    "synthetic model (seeded random weights): speed and memory only".into()
                }
                (true, false) => format!(
                    "synthetic model (seeded random weights): speed and memory only; {}",
                    recipe.note
                ),
                (false, _) => recipe.note.clone(),
            },
            ..base_row(job, probe, build, recipe, "")
        };
        let ns_by_invocation = timings
            .iter()
            .zip(&seconds)
            .map(|((round, _), s)| (*round, s.iter().map(|x| x * 1e9).collect()))
            .collect();
        out.push((row, ns_by_invocation));
    }
    out
}

/// A one-build job's recipe: quality and the first invocation's speed in
/// this process, further invocations in fresh children, one after another.
fn measure_recipe(
    job: &ModelJob,
    (job_path, index): (&Path, usize),
    probe: &BoardProbe,
    reference: (&[i32], Option<&Reference>),
    threads: usize,
) -> Result<RecipeRows> {
    let recipe = &job.recipes[index];
    peak_rss_reset();
    let load_started = Instant::now();
    let mut model = LoadedModel::load(Path::new(&recipe.path), timing_ctx(job), threads)?;
    let load_ms = load_started.elapsed().as_secs_f64() * 1e3;
    let judged = judge(job, recipe, &mut model, reference, threads)?;
    let mut timings: Timings = Vec::new();
    if timed(recipe) {
        let seconds = time_tests(job, probe.cores, &mut model)?;
        timings.push((
            0,
            ModelTiming {
                load_ms,
                peak_rss_bytes: peak_rss_bytes(),
                seconds,
            },
        ));
        drop(model);
        let own = std::env::current_exe().context("finding the agent's own binary")?;
        while wants_more(job, &timings) {
            let timing = invoke_child(job, &own, job_path, None, (index, probe.cores))?;
            // Invocations of a recipe run one after another.
            timings.push((timings.len() as u32, timing));
        }
    }
    Ok(recipe_rows(job, probe, None, recipe, &judged, &timings))
}

/// One build of an A/B job: its binary and what its judging said of
/// each of its recipes (`None`: nothing).
struct JudgedBuild<'a> {
    build: &'a ModelJobBuild,
    exe: std::path::PathBuf,
    judged: Vec<Option<Result<RecipeJudgement, String>>>,
}

/// Judges every build of an A/B job, each in a child of its own binary
/// (`model-quality`): its quantizer made its files, its llama.cpp
/// computes its own reference and evaluates them.
fn judge_builds<'a>(
    job: &'a ModelJob,
    job_path: &Path,
    cores: usize,
) -> Result<Vec<JudgedBuild<'a>>> {
    let mut out = Vec::new();
    for build in &job.builds {
        let exe = crate::rounds::check_agent(&build.build)?;
        let args = [
            "--job".to_string(),
            job_path.display().to_string(),
            "--build".into(),
            build.build.name.clone(),
            "--cores".into(),
            cores.to_string(),
        ];
        let (status, text) = run_child(job, &exe, "model-quality", &args)?;
        let mut judged: Vec<Option<Result<RecipeJudgement, String>>> =
            vec![None; build.recipes.len()];
        for line in text.lines() {
            if let Ok(line) = serde_json::from_str::<JudgedLine>(line) {
                if let Some(slot) = judged.get_mut(line.recipe) {
                    *slot = Some(line.judged);
                }
            }
        }
        if !status.success() {
            let why = format!(
                "build `{}`: its judging process {} before this recipe",
                build.build.name,
                crate::rounds::describe_exit(&status)
            );
            for (slot, recipe) in judged.iter_mut().zip(&build.recipes) {
                if slot.is_none() && recipe.unmade.is_none() {
                    *slot = Some(Err(why.clone()));
                }
            }
        }
        out.push(JudgedBuild { build, exe, judged });
    }
    Ok(out)
}

/// Recipe `index` of an A/B job: each build's invocations in shared
/// rounds, the builds back to back in each (a paired measurement: what
/// drifts between rounds falls on both), which goes first turning with
/// the round; every build gets as many rounds as the one that wants most.
fn measure_ab<'a>(
    job: &ModelJob,
    (job_path, index): (&Path, usize),
    probe: &BoardProbe,
    builds: &'a [JudgedBuild<'a>],
) -> Vec<(&'a JudgedBuild<'a>, Measured)> {
    let mut sides: Vec<Result<(&RecipeJudgement, Timings), Measured>> = builds
        .iter()
        .map(|b| {
            let recipe = &b.build.recipes[index];
            if let Some(reason) = &recipe.unmade {
                return Err(Measured::Unsupported(reason.clone()));
            }
            match &b.judged[index] {
                Some(Ok(judged)) => Ok((judged, Vec::new())),
                Some(Err(reason)) => Err(Measured::Failed(reason.clone())),
                None => Err(Measured::Failed(format!(
                    "build `{}`: its judging process said nothing of this recipe",
                    b.build.build.name
                ))),
            }
        })
        .collect();
    let mut round = 0u32;
    loop {
        let mut order: Vec<usize> = (0..builds.len())
            .filter(|&s| sides[s].is_ok() && timed(&builds[s].build.recipes[index]))
            .collect();
        let more = order
            .iter()
            .any(|&s| matches!(&sides[s], Ok((_, t)) if wants_more(job, t)));
        if order.is_empty() || !more {
            break;
        }
        let turn = (round as usize + index) % order.len();
        order.rotate_left(turn);
        for s in order {
            let build = &builds[s];
            let name = build.build.build.name.as_str();
            let measured =
                invoke_child(job, &build.exe, job_path, Some(name), (index, probe.cores));
            match (measured, &mut sides[s]) {
                (Ok(timing), Ok((_, timings))) => timings.push((round, timing)),
                (Err(e), side) => *side = Err(Measured::Failed(format!("build `{name}`: {e:#}"))),
                (Ok(_), Err(_)) => {}
            }
        }
        round += 1;
    }
    builds
        .iter()
        .zip(sides)
        .map(|(b, side)| {
            let measured = match side {
                Ok((judged, timings)) => Measured::Rows(recipe_rows(
                    job,
                    probe,
                    Some(&b.build.build),
                    &b.build.recipes[index],
                    judged,
                    &timings,
                )),
                Err(measured) => measured,
            };
            (b, measured)
        })
        .collect()
}

/// Runs a model job: every recipe's quality, speed and memory, rows
/// appended to `models.csv` (repetitions to `samples.csv` first) recipe by
/// recipe. Returns how many recipes failed.
pub fn run_model_job(
    job: &ModelJob,
    job_path: &Path,
    probe: &BoardProbe,
    out_dir: &Path,
) -> Result<usize> {
    let started = Instant::now();
    let mut rows = CsvAppender::<ModelRow>::open(&out_dir.join(MODEL_ROWS_FILE))?;
    // Every repetition is kept, as llama-bench's JSON keeps `samples_ns`, so
    // model cells can be compared between runs like kernel cells.
    let mut samples = CsvAppender::<SampleRow>::open(&out_dir.join(SAMPLES_FILE))?;
    let threads = max_threads(job, probe.cores);
    // One build: the reference in this process. A/B: each build judges
    // its own recipes in a child of its own before any is timed.
    let (tokens, base) = if job.builds.is_empty() {
        reference(job, threads)?
    } else {
        (Vec::new(), None)
    };
    let judged_builds = judge_builds(job, job_path, probe.cores)?;
    let mut stdout = std::io::stdout();
    let total = job.recipes.len();
    let _ = writeln!(
        stdout,
        "{}",
        ProgressEvent::Started {
            total,
            bandwidth_gbps: probe.read_bandwidth_gbps
        }
        .to_line()
    );
    let (mut failed, mut unsupported) = (0, 0);
    for (index, recipe) in job.recipes.iter().enumerate() {
        let cell_id = format!("{}/{}", job.model_name, recipe.recipe);
        let _ = writeln!(
            stdout,
            "{}",
            ProgressEvent::CellStarted {
                index,
                cell_id: cell_id.clone()
            }
            .to_line()
        );
        let measured: Vec<(Option<&JobBuild>, &RecipeFile, Measured)> = if job.builds.is_empty() {
            let measured = match &recipe.unmade {
                Some(reason) => Measured::Unsupported(reason.clone()),
                None => measure_recipe(
                    job,
                    (job_path, index),
                    probe,
                    (&tokens, base.as_ref()),
                    threads,
                )
                .map_or_else(|e| Measured::Failed(format!("{e:#}")), Measured::Rows),
            };
            vec![(None, recipe, measured)]
        } else {
            measure_ab(job, (job_path, index), probe, &judged_builds)
                .into_iter()
                .map(|(b, m)| (Some(&b.build.build), &b.build.recipes[index], m))
                .collect()
        };
        // A recipe's status is its worst build's.
        let mut status = CellStatus::Ok;
        for (build, recipe, measured) in measured {
            match measured {
                Measured::Rows(recipe_rows) => {
                    for (row, by_invocation) in &recipe_rows {
                        for (invocation, (round, samples_ns)) in by_invocation.iter().enumerate() {
                            for (repetition, &ns) in samples_ns.iter().enumerate() {
                                samples.append_unsynced(&SampleRow {
                                    run_id: job.run_id.clone(),
                                    board: job.board.clone(),
                                    cell_id: row.cell_id(),
                                    repetition: repetition as u32,
                                    ns: ns as u64,
                                    invocation: invocation as u32,
                                    round: *round,
                                })?;
                            }
                        }
                        // Repetitions reach the disk before their row.
                        samples.sync()?;
                        rows.append(row)?;
                    }
                }
                Measured::Unsupported(reason) => {
                    rows.append(&ModelRow {
                        status: CellStatus::Unsupported,
                        ..base_row(job, probe, build, recipe, &reason)
                    })?;
                    if status == CellStatus::Ok {
                        status = CellStatus::Unsupported;
                    }
                }
                Measured::Failed(reason) => {
                    rows.append(&base_row(job, probe, build, recipe, &reason))?;
                    status = CellStatus::Failed;
                }
            }
        }
        match status {
            CellStatus::Failed => failed += 1,
            CellStatus::Unsupported => unsupported += 1,
            _ => {}
        }
        let _ = writeln!(
            stdout,
            "{}",
            ProgressEvent::CellFinished {
                index,
                cell_id,
                status,
                median_ns: None
            }
            .to_line()
        );
        let _ = stdout.flush();
    }
    // The host's `agent_seconds`: the agent's own time, without upload and
    // polling.
    let _ = writeln!(
        stdout,
        "{}",
        ProgressEvent::Finished {
            ok: total - failed - unsupported,
            unsupported,
            failed,
            elapsed_seconds: started.elapsed().as_secs_f64(),
        }
        .to_line()
    );
    let _ = stdout.flush();
    Ok(failed)
}
