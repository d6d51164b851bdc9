//! Whole-model work: quantizing with a recipe, measuring layer importance,
//! and running a model job (speed, memory, quality, generated text).

use anyhow::{bail, Context, Result};
use kernels::model::{gguf_tensor_types, quantize_model, BatchEntry, LoadedModel, QuantizeRequest};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;
use std::time::Instant;
use wire::files::{CsvAppender, MODEL_ROWS_FILE, SAMPLES_FILE};
use wire::model_job::{repetition_score, ModelJob, RecipeFile};
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
pub struct Quality {
    pub ppl: f64,
    pub kld_mean: f64,
    pub kld_p99: f64,
    pub top1_agreement: f64,
}

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

/// One invocation's speed of a recipe: every test (per thread count, pp
/// then tg) as seconds per repetition, with the load time and peak memory
/// of the process that measured it.
#[derive(Debug, Serialize, Deserialize)]
pub struct InvocationTiming {
    pub load_ms: f64,
    pub peak_rss_bytes: Option<u64>,
    /// `[threads][pp, tg]` flattened, as `tests` lists them.
    pub seconds: Vec<Vec<f64>>,
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

/// The child of a further invocation (`quantbench-agent model-time`):
/// loads recipe `index` afresh, times every test and prints the result as
/// one JSON line.
pub fn time_invocation(job: &ModelJob, index: usize, cores: usize) -> Result<()> {
    let recipe = job
        .recipes
        .get(index)
        .with_context(|| format!("the model job has no recipe {index}"))?;
    peak_rss_reset();
    let started = Instant::now();
    let max_threads = tests(job, cores).iter().map(|t| t.0).max().unwrap_or(1);
    let mut model = LoadedModel::load(Path::new(&recipe.path), timing_ctx(job), max_threads)?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let seconds = time_tests(job, cores, &mut model)?;
    let timing = InvocationTiming {
        load_ms,
        peak_rss_bytes: peak_rss_bytes(),
        seconds,
    };
    println!("{}", serde_json::to_string(&timing)?);
    Ok(())
}

/// Whether every test's time is known to `precision` from `invocations`.
fn precise_enough(invocations: &[InvocationTiming], precision: f64) -> bool {
    let tests = invocations.first().map_or(0, |i| i.seconds.len());
    (0..tests).all(|t| {
        let groups: Vec<Vec<f64>> = invocations
            .iter()
            .map(|i| i.seconds.get(t).cloned().unwrap_or_default())
            .collect();
        wire::stats::relative_half_width(&groups, 0.95).is_some_and(|p| p <= precision)
    })
}

/// A further invocation of recipe `index` in a fresh child process.
fn invoke_child(
    runner: &[String],
    job_path: &Path,
    index: usize,
    cores: usize,
) -> Result<InvocationTiming> {
    let exe = std::env::current_exe().context("finding the agent's own binary")?;
    let output = crate::child::command(runner, &exe)
        .arg("model-time")
        .arg("--job")
        .arg(job_path)
        .arg("--recipe")
        .arg(index.to_string())
        .arg("--cores")
        .arg(cores.to_string())
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("starting an invocation ({})", exe.display()))?;
    if !output.status.success() {
        anyhow::bail!("a further invocation ended with {}", output.status);
    }
    let text = String::from_utf8_lossy(&output.stdout);
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
    let text =
        std::fs::read_to_string(&job.text).with_context(|| format!("reading {}", job.text))?;
    let max_threads = job
        .threads
        .iter()
        .map(|t| t.resolve(probe.cores))
        .max()
        .unwrap_or(1);
    // Random weights have no quality to measure: no reference either.
    let (tokens, base) = if job.synthetic {
        (Vec::new(), None)
    } else {
        let mut base_model = LoadedModel::load_with(
            Path::new(&job.base.path),
            job.ctx,
            eval_sequences(job.ctx),
            max_threads,
        )?;
        let tokens = base_model.tokenize(&text, base_model.adds_bos());
        let base = score_positions(&mut base_model, &tokens, job.ctx)?;
        (tokens, Some(base))
    };
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
    let mut failed = 0;
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
        // A recipe this build's quantizer could not make: unsupported by
        // this build, like a kernel cell its GGML cannot run.
        let produced = match &recipe.unmade {
            Some(reason) => Err(reason.clone()),
            None => Ok(measure_recipe(
                job,
                (job_path, index),
                probe,
                &tokens,
                base.as_ref(),
                max_threads,
            )),
        };
        let status = match produced {
            Err(reason) => {
                rows.append(&ModelRow {
                    status: CellStatus::Unsupported,
                    ..failed_row(job, probe, recipe, &reason)
                })?;
                CellStatus::Unsupported
            }
            Ok(produced) => match produced {
                Ok(recipe_rows) => {
                    for (row, by_invocation) in &recipe_rows {
                        for (invocation, samples_ns) in by_invocation.iter().enumerate() {
                            for (repetition, &ns) in samples_ns.iter().enumerate() {
                                samples.append_unsynced(&SampleRow {
                                    run_id: job.run_id.clone(),
                                    board: job.board.clone(),
                                    cell_id: row.cell_id(),
                                    repetition: repetition as u32,
                                    ns: ns as u64,
                                    invocation: invocation as u32,
                                    // Invocations of a recipe run one after another.
                                    round: invocation as u32,
                                })?;
                            }
                        }
                        // Repetitions reach the disk before their row.
                        samples.sync()?;
                        rows.append(row)?;
                    }
                    CellStatus::Ok
                }
                Err(e) => {
                    failed += 1;
                    rows.append(&failed_row(job, probe, recipe, &format!("{e:#}")))?;
                    CellStatus::Failed
                }
            },
        };
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
            ok: total - failed,
            unsupported: 0,
            failed,
            elapsed_seconds: started.elapsed().as_secs_f64(),
        }
        .to_line()
    );
    let _ = stdout.flush();
    Ok(failed)
}

/// A recipe's rows (one per thread count and test), each with its
/// repetitions (ns) by invocation: quality and the first invocation's
/// speed in this process, further invocations in fresh children.
fn measure_recipe(
    job: &ModelJob,
    (job_path, index): (&Path, usize),
    probe: &BoardProbe,
    tokens: &[i32],
    base: Option<&Reference>,
    max_threads: usize,
) -> Result<Vec<(ModelRow, Vec<Vec<f64>>)>> {
    let recipe = &job.recipes[index];
    peak_rss_reset();
    let load_started = Instant::now();
    let mut model = LoadedModel::load(Path::new(&recipe.path), timing_ctx(job), max_threads)?;
    let load_ms = load_started.elapsed().as_secs_f64() * 1e3;
    let facts = model.facts();
    // Quality needs a context of exactly `ctx` like the reference.
    let judged = match base {
        Some(base) => {
            let mut eval_model = LoadedModel::load_with(
                Path::new(&recipe.path),
                job.ctx,
                eval_sequences(job.ctx),
                max_threads,
            )?;
            let quality = compare(base, &score_positions(&mut eval_model, tokens, job.ctx)?);
            drop(eval_model);
            let generated = greedy(&mut model, &job.prompt, job.generate_tokens)?;
            let mc_accuracy = match &job.multiple_choice {
                Some(path) => Some(multiple_choice_accuracy(&mut model, Path::new(path))?),
                None => None,
            };
            Some((quality, generated, mc_accuracy))
        }
        None => None,
    };
    // A decoded scheme runs llama.cpp's F32 kernels: its times and memory
    // would be F32's, not the scheme's.
    let timed = recipe.scheme_bits_per_weight.is_none();
    let mut invocations: Vec<InvocationTiming> = Vec::new();
    if timed {
        invocations.push(InvocationTiming {
            load_ms,
            peak_rss_bytes: None,
            seconds: time_tests(job, probe.cores, &mut model)?,
        });
        let own_peak = peak_rss_bytes();
        invocations[0].peak_rss_bytes = own_peak;
        drop(model);
        for _ in 1..job.invocations {
            invocations.push(invoke_child(&job.runner, job_path, index, probe.cores)?);
        }
        // Adaptive: more invocations while any test's time is imprecise.
        while (invocations.len() as u32) < job.max_invocations
            && !precise_enough(&invocations, job.precision)
        {
            invocations.push(invoke_child(&job.runner, job_path, index, probe.cores)?);
        }
    }
    let load_ms =
        Summary::of(&invocations.iter().map(|i| i.load_ms).collect::<Vec<_>>()).map(|s| s.mean);
    let peak_rss = invocations.iter().filter_map(|i| i.peak_rss_bytes).max();
    let mut out = Vec::new();
    for (test_index, (threads, prompt, n)) in tests(job, probe.cores).into_iter().enumerate() {
        let seconds: Vec<Vec<f64>> = invocations
            .iter()
            .map(|i| i.seconds.get(test_index).cloned().unwrap_or_default())
            .collect();
        let all: Vec<f64> = seconds.iter().flatten().copied().collect();
        let ns: Vec<f64> = all.iter().map(|s| s * 1e9).collect();
        let ts: Vec<f64> = all.iter().map(|s| n as f64 / s).collect();
        let (summary_ns, ts) = (Summary::of(&ns), Summary::of(&ts));
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
            invocations: invocations.len() as u32,
            precision: wire::stats::relative_half_width(&seconds, 0.95),
            ppl: judged.as_ref().map(|j| j.0.ppl),
            kld_mean: judged.as_ref().map(|j| j.0.kld_mean),
            kld_p99: judged.as_ref().map(|j| j.0.kld_p99),
            top1_agreement: judged.as_ref().map(|j| j.0.top1_agreement),
            mc_accuracy: judged.as_ref().and_then(|j| j.2),
            repetition_score: judged.as_ref().map(|j| repetition_score(&j.1)),
            generated_text: judged.as_ref().map(|j| j.1.clone()).unwrap_or_default(),
            note: match (judged.is_none(), recipe.note.is_empty()) {
                (true, true) => {
                    "synthetic model (seeded random weights): speed and memory only".into()
                }
                (true, false) => format!(
                    "synthetic model (seeded random weights): speed and memory only; {}",
                    recipe.note
                ),
                (false, _) => recipe.note.clone(),
            },
            ..failed_row(job, probe, recipe, "")
        };
        let ns_by_invocation = seconds
            .iter()
            .map(|s| s.iter().map(|x| x * 1e9).collect())
            .collect();
        out.push((row, ns_by_invocation));
    }
    Ok(out)
}

fn failed_row(job: &ModelJob, probe: &BoardProbe, recipe: &RecipeFile, note: &str) -> ModelRow {
    ModelRow::failed(job, recipe, &probe.agent, note)
}
