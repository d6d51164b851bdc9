//! Whole-model work: quantizing with a recipe, measuring layer importance,
//! and running a model job (speed, memory, quality, generated text).

use crate::power::Meter;
use anyhow::{bail, Context, Result};
use kernels::model::{
    gguf_tensor_types, quantize_model, BatchEntry, ContextSettings, ContextShape, LoadedModel,
    ModelError, ModelLoad, QuantizeRequest,
};
use std::io::Write;
use std::path::Path;
use std::time::Instant;
use wire::child::{JudgedLine, ModelFacts, ModelTiming, Quality, RecipeJudgement, TestFacts};
use wire::files::{CsvAppender, MODEL_ROWS_FILE, SAMPLES_FILE, SUSTAINED_FILE};
use wire::kernel_job::JobBuild;
use wire::model_job::{repetition_score, ModelJob, ModelJobBuild, ModelTest, RecipeFile};
use wire::power::{EnergyMeasure, PowerReport};
use wire::probe::BoardProbe;
use wire::progress::ProgressEvent;
use wire::rows::CellStatus;
use wire::rows::{ModelRow, SampleRow, SustainRow};
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

/// What `quantize` makes, beside its files.
#[derive(Debug, Clone, Copy, Default)]
pub struct QuantizeOrder<'a> {
    /// llama.cpp file type by llama-quantize's name (`Q4_K_M`, `IQ2_XS`).
    pub ftype: &'a str,
    /// One GGML type per transformer block (adaptive recipes).
    pub layer_types: &'a [String],
    /// The token embedding and output matrices' type (with `layer_types`).
    pub other_type: Option<&'a str>,
    /// llama-quantize's `--tensor-type`: regex -> GGML type, first match
    /// wins, before the per-layer types.
    pub tensor_types: &'a [(String, String)],
    /// llama-quantize's `--pure`.
    pub pure: bool,
    pub threads: usize,
    pub imatrix: Option<&'a Path>,
}

pub fn quantize(input: &Path, output: &Path, order: &QuantizeOrder) -> Result<Vec<String>> {
    let QuantizeOrder {
        ftype,
        layer_types,
        other_type,
        tensor_types,
        pure,
        threads,
        imatrix,
    } = *order;
    let importance = imatrix_importance(imatrix)?;
    let mut overrides: Vec<(String, String)> = tensor_types.to_vec();
    overrides.extend(
        layer_types
            .iter()
            .enumerate()
            .map(|(i, ty)| (format!("^blk\\.{i}\\."), ty.clone())),
    );
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
            pure,
        },
    )?;
    if layer_types.is_empty() {
        check_recipe_applied(output, ftype)?;
    }
    if !tensor_types.is_empty() {
        // The user chose types per tensor: what is not the file type is
        // their choice, not a fallback.
        return Ok(Vec::new());
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
    // Types stored in super-blocks of 256 (K-quants, the IQ types but
    // IQ4_NL, the ternary types) fall back to 32-wide ones on shorter rows:
    // a mix such as q4_k_m or iq2_m counts as applied when any matrix is
    // in a super-block type; q8_0 when any matrix is q8_0.
    let super_block = |ty: &str| {
        ty.contains("_k") || (ty.starts_with("iq") && ty != "iq4_nl") || ty.starts_with("tq")
    };
    let matrices: Vec<(String, String)> = gguf_tensor_types(output)?
        .into_iter()
        .filter(|(name, _)| name.ends_with(".weight") && !name.contains("norm"))
        .collect();
    let applied = matrices.iter().any(|(_, ty)| {
        let ty = ty.to_ascii_lowercase();
        if super_block(&ftype) {
            super_block(&ty)
        } else {
            ty == ftype
        }
    });
    if !applied && !matrices.is_empty() {
        let _ = std::fs::remove_file(output);
        bail!(
            "recipe `{ftype}` cannot be applied to this model: none of its {} matrices can be stored in it (every one fell back to another type; K-quants, IQ and TQ types need rows that are a multiple of 256 elements)",
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
    // A file type that is a mix (q4_k_m, iq2_m, iq3_xs) names no single
    // tensor type to judge against.
    if layer_types.is_empty() && !kernels::model::is_ggml_type(ftype) {
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
    let percentile = |p: f64| {
        sorted[((sorted.len() as f64 * p).ceil() as usize)
            .saturating_sub(1)
            .min(sorted.len() - 1)]
    };
    let nlls: Vec<f64> = (0..n)
        .map(|i| -(candidate.log_probs[i][candidate.targets[i] as usize] as f64))
        .collect();
    let (mean_nll, nll_se) = mean_and_uncertainty(&nlls);
    let (kld_mean, kld_se) = mean_and_uncertainty(&klds);
    let ppl = (nll / n as f64).exp();
    let top1 = same_top as f64 / n as f64;
    debug_assert!((mean_nll - nll / n as f64).abs() < 1e-9);
    Quality {
        ppl,
        kld_mean,
        kld_p99: percentile(0.99),
        top1_agreement: top1,
        // llama-perplexity: PPL's error is PPL times the standard error of
        // the mean log-probability; top-1's the binomial one.
        ppl_stderr: ppl * nll_se,
        kld_stderr: kld_se,
        kld_p90: percentile(0.90),
        kld_max: sorted[sorted.len() - 1],
        top1_stderr: (top1 * (1.0 - top1) / (n.max(2) - 1) as f64).sqrt(),
    }
}

/// Mean and standard error of the mean, as llama-perplexity computes them
/// (`sqrt(var / (n - 1))`, the population variance).
fn mean_and_uncertainty(values: &[f64]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| v * v).sum::<f64>() / n - mean * mean;
    (mean, (var.max(0.0) / (n - 1.0).max(1.0)).sqrt())
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
            &QuantizeOrder {
                ftype: &low.to_ascii_uppercase(),
                layer_types: &layer_types,
                other_type: Some("f32"),
                threads,
                ..Default::default()
            },
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

/// Random tokens for a test: the same for every repetition and recipe.
fn random_tokens(model: &LoadedModel, n: usize, seed: u64) -> Vec<i32> {
    let mut rng = kernels::weights::SplitMix64::new(7, seed);
    let vocab = model.n_vocab() as u64;
    (0..n).map(|_| (rng.next_u64() % vocab) as i32).collect()
}

/// Decodes `tokens` from position `first` on, in batches of `n_batch`.
fn decode_prompt(
    model: &mut LoadedModel,
    tokens: &[i32],
    first: usize,
    n_batch: usize,
) -> Result<()> {
    for (i, chunk) in tokens.chunks(n_batch.max(1)).enumerate() {
        model.decode(chunk, first + i * n_batch.max(1), false)?;
    }
    Ok(())
}

/// llama-bench's tests on a KV cache holding `test.depth` tokens: pp = the
/// prompt in batches, tg = one token at a time, pg = a prompt then tokens
/// one at a time, timed together. Before each repetition the
/// cache forgets what the last one added, so every repetition starts at the
/// depth. Returns seconds per repetition and the KV cache's bytes at the
/// end of one.
///
/// With a power source, a sampling thread runs beside the timed
/// repetitions; where they end before it has `MIN_POWER_SAMPLES`
/// readings, the test is repeated (untimed) until it has, for at most
/// `power::MAX_EXTENSION`, so the energy is over enough of the work.
fn time_test(
    model: &mut LoadedModel,
    test: &ModelTest,
    n_batch: usize,
    reps: u32,
    meter: Option<&Meter>,
) -> Result<TestTimes> {
    let tokens = random_tokens(model, test.tokens(), test.tokens() as u64);
    let (prompt, generated) = tokens.split_at(test.n_prompt);
    // Seconds of the repetition, and to its first new token's logits (the
    // prompt's last, or the first generated one's): time to first token.
    let run = |model: &mut LoadedModel| -> Result<(f64, f64)> {
        model.forget_from(test.depth);
        let started = Instant::now();
        decode_prompt(model, prompt, test.depth, n_batch)?;
        let mut first_token = (!prompt.is_empty()).then(|| started.elapsed().as_secs_f64());
        let first = test.depth + prompt.len();
        for (i, &t) in generated.iter().enumerate() {
            model.decode(&[t], first + i, false)?;
            first_token.get_or_insert_with(|| started.elapsed().as_secs_f64());
        }
        let total = started.elapsed().as_secs_f64();
        Ok((total, first_token.unwrap_or(total)))
    };
    run(model)?; // warm-up, as llama-bench does
    let sampling = meter.map(Meter::start);
    let times = (0..reps)
        .map(|_| run(model))
        .collect::<Result<Vec<(f64, f64)>>>()?;
    let energy = match sampling {
        Some(s) => s.extend_and_finish(reps as usize, test.tokens() as f64, || {
            run(model).map(|_| ())
        })?,
        None => None,
    };
    Ok(TestTimes {
        energy,
        seconds: times.iter().map(|t| t.0).collect(),
        first_token_ms: Summary::of(&times.iter().map(|t| t.1 * 1e3).collect::<Vec<_>>())
            .map(|s| s.mean),
        kv_bytes: model.kv_bytes(),
    })
}

/// What one test's repetitions took.
struct TestTimes {
    seconds: Vec<f64>,
    /// What the repetitions cost, where the board has a power source.
    energy: Option<EnergyMeasure>,
    /// Mean time to the first new token's logits.
    first_token_ms: Option<f64>,
    /// The KV cache's bytes at the end of a repetition.
    kv_bytes: u64,
}

/// The job's tests on this board (`"big"` from its CPU topology).
fn tests_on(job: &ModelJob, cores: usize) -> Vec<ModelTest> {
    job.tests(cores, &crate::sysinfo::fastest_cores())
}

/// The most threads any test uses: what a recipe is loaded with.
fn max_threads(job: &ModelJob, cores: usize) -> usize {
    tests_on(job, cores)
        .iter()
        .map(|t| t.threads)
        .max()
        .unwrap_or(1)
}

/// The memory a test may plan for and what sets it: the board's own
/// (`MemTotal`), the agent's cgroup's limit (`memory.max`) or the board's
/// `max_memory_mb`, whichever is least.
fn memory_budget(job: &ModelJob) -> Option<(u64, &'static str)> {
    [
        (crate::sysinfo::total_memory_bytes(), "the board has"),
        (
            crate::sysinfo::cgroup_memory_limit(),
            "the agent's cgroup allows (memory.max)",
        ),
        (job.memory_limit_bytes, "the board's max_memory_mb allows"),
    ]
    .into_iter()
    .filter_map(|(bytes, what)| Some((bytes?, what)))
    .min_by_key(|(bytes, _)| *bytes)
}

/// Why a test whose weights take `weight_bytes` and whose KV cache takes
/// `kv_bytes` at its depth must not run on a board with `budget` (`None`:
/// it fits). Running it would get the agent killed and the recipes after
/// it lost.
fn memory_refusal(
    weight_bytes: u64,
    kv_bytes: u64,
    (test_tokens, settings): (usize, &ContextSettings),
    budget: Option<(u64, &str)>,
) -> Option<String> {
    let (budget, what) = budget?;
    let need = weight_bytes + kv_bytes;
    let mb = |b: u64| b as f64 / 1e6;
    (need > budget).then(|| {
        format!(
            "does not fit: the weights ({:.1} MB) and a KV cache of {test_tokens} tokens in {} ({:.1} MB) need {:.1} MB, but {what} {:.1} MB; use a smaller depth, a smaller KV type or a smaller recipe on this board",
            mb(weight_bytes),
            settings.kv_type,
            mb(kv_bytes),
            mb(need),
            mb(budget)
        )
    })
}

/// Times every test of `recipe`: for each load mode the recipe is loaded
/// twice, first with none of its file in the page cache (the cold load),
/// then again (the warm load), and its tests timed on the second (see
/// `time_loaded`). A load mode the board cannot give (`mlock` past its
/// memlock limit) times nothing; its tests' facts say why.
fn time_tests(
    job: &ModelJob,
    cores: usize,
    recipe: &RecipeFile,
) -> Result<(Vec<Vec<f64>>, Vec<TestFacts>, f64)> {
    let tests = tests_on(job, cores);
    // What the recipe is loaded with: the most threads any test uses.
    let threads = tests.iter().map(|t| t.threads).max().unwrap_or(1);
    let path = Path::new(&recipe.path);
    let shape = ContextShape::evaluation(timing_ctx(job), 1, &ContextSettings::default());
    let (mut seconds, mut facts) = (Vec::new(), Vec::new());
    let mut first_load_ms = None;
    for block in tests.chunk_by(|a, b| a.load == b.load) {
        let load = block[0].load;
        let refused = (load == ModelLoad::Mlock)
            .then(|| kernels::model::mlock_refusal(recipe.file_bytes))
            .flatten();
        if let Some(why) = refused {
            refuse(block, &why, (&mut seconds, &mut facts));
            continue;
        }
        peak_rss_reset();
        let dropped = kernels::placement::drop_file_pages(path).unwrap_or(false);
        let started = Instant::now();
        drop(LoadedModel::load_as(path, &shape, threads, load)?);
        let load_cold_ms = dropped.then(|| started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        let mut model = LoadedModel::load_as(path, &shape, threads, load)?;
        let load_ms = started.elapsed().as_secs_f64() * 1e3;
        first_load_ms.get_or_insert(load_ms);
        let (block_seconds, block_facts) = time_loaded(job, block, &mut model, recipe)?;
        seconds.extend(block_seconds);
        facts.extend(block_facts.into_iter().map(|f| TestFacts {
            load_ms: Some(load_ms),
            load_cold_ms,
            ..f
        }));
    }
    Ok((seconds, facts, first_load_ms.unwrap_or(0.0)))
}

/// `tests` time nothing: each has no times and facts saying `why`.
fn refuse(
    tests: &[ModelTest],
    why: &str,
    (seconds, facts): (&mut Vec<Vec<f64>>, &mut Vec<TestFacts>),
) {
    for _ in tests {
        seconds.push(Vec::new());
        facts.push(TestFacts {
            refused: Some(why.to_string()),
            ..TestFacts::default()
        });
    }
}

/// Times `tests` (of one load mode) on `model`: for each context and
/// depth, a context of those settings on the loaded weights with room for
/// the depth and the tests (llama-bench's `n_depth + n_prompt + n_gen`),
/// its KV cache filled to the depth once, then each test on top. A context
/// llama.cpp cannot run for this model, or that would not fit the board's
/// memory, times nothing; its tests' facts say why.
fn time_loaded(
    job: &ModelJob,
    tests: &[ModelTest],
    model: &mut LoadedModel,
    recipe: &RecipeFile,
) -> Result<(Vec<Vec<f64>>, Vec<TestFacts>)> {
    let contexts = job.contexts();
    let budget = memory_budget(job);
    let (mut seconds, mut facts) = (Vec::new(), Vec::new());
    for group in tests.chunk_by(|a, b| (a.context, a.depth) == (b.context, b.depth)) {
        let (context, depth) = (group[0].context, group[0].depth);
        let settings = &contexts[context];
        let n_ctx = depth
            + group
                .iter()
                .map(ModelTest::tokens)
                .max()
                .unwrap_or(1)
                .max(1);
        // Checked before the context is made: a KV cache past the board's
        // memory would get the agent killed.
        let too_big = memory_refusal(
            recipe.file_bytes,
            model.kv_bytes_needed(n_ctx, &settings.kv_type),
            (n_ctx, settings),
            budget,
        );
        // The group's scheduling priority first: one the board's user may
        // not set refuses the group's tests (the others still run).
        let made = match too_big {
            Some(why) => Err(ModelError::ContextRefused(why)),
            None => kernels::model::set_process_priority(settings.cpu.priority)
                .map_err(ModelError::ContextRefused)
                .and_then(|()| model.recontext(&ContextShape::timing(n_ctx, settings))),
        };
        match made {
            Err(ModelError::ContextRefused(why)) => {
                refuse(group, &why, (&mut seconds, &mut facts));
                continue;
            }
            other => other?,
        }
        // From here on the peak is this context's: the previous one is
        // freed (after the new one was made, so a refused context leaves
        // the model usable).
        peak_rss_reset();
        if depth > 0 {
            let widest = group.iter().max_by_key(|t| t.threads).unwrap_or(&group[0]);
            model.set_threads_on(widest.threads, &widest.cpu(settings))?;
            let fill = random_tokens(model, depth, depth as u64 + 1);
            decode_prompt(model, &fill, 0, settings.n_batch)?;
        }
        let group_facts = facts.len();
        for test in group {
            model.set_threads_on(test.threads, &test.cpu(settings))?;
            // Heat is the board's: an emulator's host says nothing of it.
            let real = !job.emulated;
            let cooldown_seconds = job.cooldown.filter(|_| real).map(crate::measure::cool_down);
            let before = real.then(crate::sysinfo::thermal_reading);
            let times = time_test(model, test, settings.n_batch, job.repetitions, meter(job))?;
            let thermal = before.map(|b| (b, crate::sysinfo::thermal_reading()));
            seconds.push(times.seconds);
            facts.push(TestFacts {
                kv_bytes: Some(times.kv_bytes),
                ttft_ms: times.first_token_ms,
                flash_attn_used: model.flash_attn_used(),
                thermal,
                cooldown_seconds,
                energy: times.energy,
                ..TestFacts::default()
            });
        }
        let peak = peak_rss_bytes();
        for f in &mut facts[group_facts..] {
            f.peak_rss_bytes = peak;
        }
    }
    // Back to normal for what follows (lowering a raised priority needs
    // no privilege).
    let _ = kernels::model::set_process_priority(wire::model_settings::Priority::Normal);
    Ok((seconds, facts))
}

/// Tokens of a sustained decode's KV cache before it starts again from
/// empty, as a run of short answers would.
const SUSTAIN_CTX: usize = 512;

/// Decodes one token at a time without pause for `job.sustain_seconds`
/// on the job's first context and the most threads of its tests,
/// recording every `sustain_interval_seconds` the tokens per second, the
/// clock, the temperature, throttling and the power: whether a recipe
/// keeps its speed on this board in its case. Each interval's row reaches
/// the disk as it ends.
fn sustain(
    job: &ModelJob,
    probe: &BoardProbe,
    recipe: &RecipeFile,
    out: &mut CsvAppender<SustainRow>,
) -> Result<()> {
    let threads = max_threads(job, probe.cores);
    let settings = job.contexts().swap_remove(0);
    let shape = ContextShape::timing(SUSTAIN_CTX, &settings);
    let mut model =
        LoadedModel::load_as(Path::new(&recipe.path), &shape, threads, ModelLoad::Mmap)?;
    let tokens = random_tokens(&model, SUSTAIN_CTX, 99);
    let real = !job.emulated;
    let interval = std::time::Duration::from_secs_f64(job.sustain_interval_seconds.max(0.5));
    let started = Instant::now();
    let over = |started: Instant| started.elapsed().as_secs_f64() >= job.sustain_seconds;
    let mut pos = 0;
    while !over(started) {
        let begun = Instant::now();
        let before = real.then(crate::sysinfo::thermal_reading);
        let sampling = meter(job).map(Meter::start);
        let mut decoded = 0u64;
        while begun.elapsed() < interval && !over(started) {
            if pos == SUSTAIN_CTX {
                model.forget_from(0);
                pos = 0;
            }
            model.decode(&[tokens[pos]], pos, false)?;
            pos += 1;
            decoded += 1;
        }
        let seconds = begun.elapsed().as_secs_f64();
        let energy = sampling.and_then(|s| s.finish(decoded as f64));
        let after = real.then(crate::sysinfo::thermal_reading);
        out.append(&SustainRow {
            run_id: job.run_id.clone(),
            board: job.board.clone(),
            emulated: job.emulated,
            model_filename: job.model_name.clone(),
            recipe: recipe.recipe.clone(),
            build: String::new(),
            n_threads: threads,
            elapsed_s: started.elapsed().as_secs_f64(),
            tokens: decoded,
            tokens_per_s: decoded as f64 / seconds,
            freq_mhz: after.as_ref().and_then(|a| a.freq_mhz),
            temp_c: after.as_ref().and_then(|a| a.temperature_c),
            throttled: before
                .as_ref()
                .zip(after.as_ref())
                .and_then(|(b, a)| wire::probe::throttled_between(b, a)),
            power_w: energy
                .as_ref()
                .filter(|e| e.seconds > 0.0)
                .map(|e| e.joules / e.seconds),
            power_source: energy.map(|e| e.source).unwrap_or_default(),
            finished_at: wire::utc_now_rfc3339(),
        })?;
    }
    Ok(())
}

/// The board's power source, found once per process (`None`: none).
fn meter(job: &ModelJob) -> Option<&'static Meter> {
    crate::power::board_meter(&job.power, job.emulated)
}

/// What the board's power sources are, and its idle power before the job
/// (`power.idle_seconds` of sampling while the agent does nothing).
pub fn power_report(job: &ModelJob) -> PowerReport {
    let (meter, report) = crate::power::board_power(&job.power, job.emulated);
    let mut report = report.clone();
    if let Some(meter) = meter.as_ref().filter(|_| job.power.idle_seconds > 0.0) {
        report.idle = meter.idle(job.power.idle_seconds);
    }
    report
}

/// The context a recipe is loaded in for greedy text and multiple choice.
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
    let (seconds, tests, load_ms) = time_tests(job, cores, recipe)?;
    let timing = ModelTiming {
        load_ms,
        peak_rss_bytes: most_memory(&tests),
        seconds,
        tests,
    };
    println!("{}", serde_json::to_string(&timing)?);
    Ok(())
}

/// The process's peak memory over its tests (each test's is measured
/// while its context existed).
fn most_memory(tests: &[TestFacts]) -> Option<u64> {
    tests
        .iter()
        .filter_map(|t| t.peak_rss_bytes)
        .max()
        .or_else(peak_rss_bytes)
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
        // A test whose context llama.cpp refused has no times to refine.
        groups.iter().all(Vec::is_empty)
            || wire::stats::relative_half_width(&groups, 0.95).is_some_and(|p| p <= precision)
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

/// Multiple-choice accuracy and its standard error (`None` below two
/// tasks).
type ChoiceScore = (f64, Option<f64>);

/// Accuracy on a task file (`wire::choice_tasks`), scored as
/// llama-perplexity scores its tasks: each choice's mean log-probability
/// of its scored tokens after its prefix; the most likely choice is the
/// model's answer.
fn multiple_choice_accuracy(model: &mut LoadedModel, path: &Path) -> Result<ChoiceScore> {
    let (_, tasks) = wire::choice_tasks::read_choice_tasks(path)?;
    let mut correct = 0usize;
    for task in &tasks {
        let mut best = (f64::MIN, usize::MAX);
        for (index, choice) in task.choices.iter().enumerate() {
            let prefix = model.tokenize(&choice.prefix, model.adds_bos());
            let full = model.tokenize(
                &format!("{}{}", choice.prefix, choice.scored),
                model.adds_bos(),
            );
            // Tokenization may merge across the boundary; score whatever
            // follows the shared prefix.
            let shared = prefix
                .iter()
                .zip(&full)
                .take_while(|(a, b)| a == b)
                .count()
                .max(1);
            if full.len() <= shared || full.len() > model.n_ctx() {
                continue;
            }
            let end = if !choice.score_last_token && full.len() - shared > 1 {
                full.len() - 1
            } else {
                full.len()
            };
            model.clear();
            let logits = model.decode(&full, 0, true)?;
            let n_vocab = model.n_vocab();
            let mut sum = 0.0;
            for i in shared..end {
                let row = log_softmax(&logits[(i - 1) * n_vocab..i * n_vocab]);
                sum += row[full[i] as usize] as f64;
            }
            let mean = sum / (end - shared) as f64;
            if mean > best.0 {
                best = (mean, index);
            }
        }
        if best.1 == task.label {
            correct += 1;
        }
    }
    let accuracy = correct as f64 / tasks.len() as f64;
    Ok((
        accuracy,
        wire::choice_tasks::accuracy_stderr(accuracy, tasks.len()),
    ))
}

/// The text's tokens and the base model's reference at the scored
/// positions; nothing for a synthetic model (random weights have no
/// quality to measure).
fn reference(job: &ModelJob, threads: usize) -> Result<(Vec<i32>, Option<Reference>)> {
    if job.synthetic {
        return Ok((Vec::new(), None));
    }
    // Computed on the host and shipped: the base model is not here.
    let file = match &job.reference {
        Some(path) => {
            let file = wire::reference::ReferenceFile::read(Path::new(path))?;
            eprintln!(
                "reference: the host's, {path} ({} scored positions)",
                file.targets.len()
            );
            file
        }
        None => {
            eprintln!("reference: computed here from {}", job.base.path);
            compute_reference(
                Path::new(&job.base.path),
                Path::new(&job.text),
                job.ctx,
                threads,
            )?
        }
    };
    let reference = Reference {
        log_probs: (0..file.targets.len())
            .map(|i| file.row(i).to_vec())
            .collect(),
        targets: file.targets,
    };
    Ok((file.tokens, Some(reference)))
}

/// The base model at `model`'s reference on `text` with chunks of `ctx`
/// tokens (`score_positions`), as a `quantbench-agent reference` file
/// holds it.
pub fn compute_reference(
    model: &Path,
    text: &Path,
    ctx: usize,
    threads: usize,
) -> Result<wire::reference::ReferenceFile> {
    let text =
        std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    let mut base_model = LoadedModel::load_with(model, ctx, eval_sequences(ctx), threads)?;
    let tokens = base_model.tokenize(&text, base_model.adds_bos());
    let base = score_positions(&mut base_model, &tokens, ctx)?;
    Ok(wire::reference::ReferenceFile {
        n_vocab: base_model.n_vocab(),
        tokens,
        targets: base.targets,
        log_probs: base.log_probs.concat(),
    })
}

/// Everything but speed of `recipe`, in each of the job's contexts (in
/// order): llama.cpp's facts and, against `base`, quality (in a context of
/// exactly `ctx`, like the reference, with the context's KV cache and
/// attention, so a KV type that breaks the output shows it beside its
/// speed), the greedy continuation and the multiple-choice accuracy.
/// Contexts that differ only in batch sizes share one judgement; one
/// llama.cpp cannot run for this model has facts only (its rows say why).
fn judge(
    job: &ModelJob,
    recipe: &RecipeFile,
    (tokens, base): (&[i32], Option<&Reference>),
    threads: usize,
) -> Result<Vec<RecipeJudgement>> {
    let contexts = job.contexts();
    let path = Path::new(&recipe.path);
    let facts = {
        let model = LoadedModel::load(path, timing_ctx(job), threads)?;
        let facts = model.facts();
        ModelFacts {
            description: facts.description,
            size_bytes: facts.size_bytes,
            n_params: facts.n_params,
        }
    };
    let facts_only = RecipeJudgement {
        facts,
        quality: None,
        generated_text: None,
        mc_accuracy: None,
        mc_stderr: None,
    };
    let mut judged: Vec<RecipeJudgement> = Vec::new();
    for (i, settings) in contexts.iter().enumerate() {
        let same = contexts[..i]
            .iter()
            .position(|earlier| earlier.same_quality_as(settings));
        let judgement = match (same, base) {
            (Some(earlier), _) => judged[earlier].clone(),
            (None, None) => facts_only.clone(),
            (None, Some(base)) => match judge_in(job, path, settings, (tokens, base), threads) {
                Err(ModelError::ContextRefused(_)) => facts_only.clone(),
                other => {
                    let (quality, generated_text, mc) = other?;
                    RecipeJudgement {
                        quality: Some(quality),
                        generated_text: Some(generated_text),
                        mc_accuracy: mc.map(|(accuracy, _)| accuracy),
                        mc_stderr: mc.and_then(|(_, stderr)| stderr),
                        ..facts_only.clone()
                    }
                }
            },
        };
        judged.push(judgement);
    }
    Ok(judged)
}

/// Quality, greedy continuation and multiple-choice accuracy of the file
/// at `path` with `settings`' KV cache and attention.
fn judge_in(
    job: &ModelJob,
    path: &Path,
    settings: &ContextSettings,
    (tokens, base): (&[i32], &Reference),
    threads: usize,
) -> std::result::Result<(Quality, String, Option<ChoiceScore>), ModelError> {
    let evaluation = ContextShape::evaluation(job.ctx, eval_sequences(job.ctx), settings);
    let mut model = LoadedModel::load_shaped(path, &evaluation, threads)?;
    let reference_vocab = base.log_probs.first().map_or(0, Vec::len);
    if reference_vocab != model.n_vocab() {
        return Err(ModelError::Llama(format!(
            "the reference has a vocabulary of {reference_vocab} tokens but this recipe's model has {}: the reference is of another model",
            model.n_vocab()
        )));
    }
    let scored = score_positions(&mut model, tokens, job.ctx).map_err(as_model_error)?;
    let quality = compare(base, &scored);
    model.recontext(&ContextShape::timing(timing_ctx(job), settings))?;
    let text = greedy(&mut model, &job.prompt, job.generate_tokens).map_err(as_model_error)?;
    let mc = match &job.multiple_choice {
        Some(mc) => {
            Some(multiple_choice_accuracy(&mut model, Path::new(mc)).map_err(as_model_error)?)
        }
        None => None,
    };
    Ok((quality, text, mc))
}

/// An evaluation's error, kept apart from a refused context.
fn as_model_error(e: anyhow::Error) -> ModelError {
    ModelError::Llama(format!("{e:#}"))
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
        let judged =
            judge(job, recipe, (&tokens, base.as_ref()), threads).map_err(|e| format!("{e:#}"));
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
    judged: &[RecipeJudgement],
    timings: &Timings,
) -> RecipeRows {
    let timed = !timings.is_empty();
    // A job from before per-test facts: the process's peak for every test.
    let process_peak = timings.iter().filter_map(|(_, t)| t.peak_rss_bytes).max();
    let contexts = job.contexts();
    let mut out = Vec::new();
    for (test_index, test) in tests_on(job, probe.cores).into_iter().enumerate() {
        let Some(judged) = judged.get(test.context).or(judged.first()) else {
            continue;
        };
        let facts = &judged.facts;
        let settings = &contexts[test.context];
        let (threads, n) = (test.threads, test.tokens());
        let seconds: Vec<Vec<f64>> = timings
            .iter()
            .map(|(_, t)| t.seconds.get(test_index).cloned().unwrap_or_default())
            .collect();
        let test_facts: Vec<&TestFacts> = timings
            .iter()
            .filter_map(|(_, t)| t.tests.get(test_index))
            .collect();
        let refused = test_facts.iter().find_map(|f| f.refused.clone());
        // Each invocation's loads (older agents: the one load per process).
        let mean_of = |values: Vec<f64>| Summary::of(&values).map(|s| s.mean);
        let load_ms = mean_of(
            timings
                .iter()
                .zip(&test_facts)
                .map(|((_, t), f)| f.load_ms.unwrap_or(t.load_ms))
                .collect(),
        );
        let load_cold_ms = mean_of(test_facts.iter().filter_map(|f| f.load_cold_ms).collect());
        let ttft_ms = mean_of(test_facts.iter().filter_map(|f| f.ttft_ms).collect());
        let cpu = test.cpu(settings);
        let peak_rss = test_facts
            .iter()
            .filter_map(|f| f.peak_rss_bytes)
            .max()
            .or(process_peak);
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
            n_prompt: test.n_prompt,
            n_gen: test.n_gen,
            test: test.name(),
            n_depth: test.depth,
            type_k: settings.kv_type.k.clone(),
            type_v: settings.kv_type.v.clone(),
            flash_attn: settings.flash_attn.name().into(),
            flash_attn_used: match test_facts.iter().find_map(|f| f.flash_attn_used) {
                Some(true) => "on".into(),
                Some(false) => "off".into(),
                None => String::new(),
            },
            n_batch: settings.n_batch,
            n_ubatch: settings.n_ubatch,
            cpu_mask: cpu.cpu_mask.clone(),
            cpu_strict: cpu.cpu_strict,
            poll: Some(cpu.poll),
            priority: cpu.priority.name().into(),
            load_mode: test.load.name().into(),
            load_cold_ms: load_cold_ms.filter(|_| timed),
            ttft_ms,
            kv_bytes: test_facts.iter().filter_map(|f| f.kv_bytes).max(),
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
            ppl_stderr: quality.map(|q| q.ppl_stderr),
            kld_stderr: quality.map(|q| q.kld_stderr),
            kld_p90: quality.map(|q| q.kld_p90),
            kld_max: quality.map(|q| q.kld_max),
            top1_stderr: quality.map(|q| q.top1_stderr),
            mc_accuracy: judged.mc_accuracy,
            mc_stderr: judged.mc_stderr,
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
        // A context llama.cpp cannot run for this model: its rows say why.
        let mut row = match refused {
            Some(why) => ModelRow {
                status: CellStatus::Unsupported,
                note: why,
                ..row
            },
            None => row,
        };
        row.set_heat_and_energy(
            &test_facts,
            probe.power.as_ref().and_then(|p| p.idle.as_ref()),
        );
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
    let judged = judge(job, recipe, reference, threads)?;
    let mut timings: Timings = Vec::new();
    if timed(recipe) {
        let (seconds, tests, load_ms) = time_tests(job, probe.cores, recipe)?;
        timings.push((
            0,
            ModelTiming {
                load_ms,
                peak_rss_bytes: most_memory(&tests),
                seconds,
                tests,
            },
        ));
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
    judged: Vec<Option<Result<Vec<RecipeJudgement>, String>>>,
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
        let mut judged: Vec<Option<Result<Vec<RecipeJudgement>, String>>> =
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
    let mut sides: Vec<Result<(&[RecipeJudgement], Timings), Measured>> = builds
        .iter()
        .map(|b| {
            let recipe = &b.build.recipes[index];
            if let Some(reason) = &recipe.unmade {
                return Err(Measured::Unsupported(reason.clone()));
            }
            match &b.judged[index] {
                Some(Ok(judged)) => Ok((judged.as_slice(), Vec::new())),
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

/// Refuses a job whose CPU masks name a CPU the agent cannot run on,
/// before anything is measured (GGML would place a thread there and fail,
/// or silently run elsewhere).
fn check_cpu_masks(job: &ModelJob) -> Result<()> {
    let allowed = crate::sysinfo::allowed_cpus();
    for settings in job.contexts() {
        let mask = &settings.cpu.cpu_mask;
        let cpus =
            wire::model_settings::CpuSettings::mask_cpus(mask).map_err(anyhow::Error::msg)?;
        if let Some(cpu) = cpus.iter().find(|c| !allowed.contains(c)) {
            bail!(
                "cpu_mask {mask} names CPU {cpu}, which board {} lacks (the agent may run on CPUs {}): give masks of those CPUs in bench.toml",
                job.board,
                allowed
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
    }
    Ok(())
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
    check_cpu_masks(job)?;
    let mut rows = CsvAppender::<ModelRow>::open(&out_dir.join(MODEL_ROWS_FILE))?;
    // Every repetition is kept, as llama-bench's JSON keeps `samples_ns`, so
    // model cells can be compared between runs like kernel cells.
    let mut samples = CsvAppender::<SampleRow>::open(&out_dir.join(SAMPLES_FILE))?;
    let mut sustained = (job.sustain_seconds > 0.0)
        .then(|| CsvAppender::<SustainRow>::open(&out_dir.join(SUSTAINED_FILE)))
        .transpose()?;
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
        // The sustained decode of a measured recipe (one-build jobs: an
        // A/B job compares builds, not how long a board keeps its speed).
        if let Some(out) = sustained.as_mut().filter(|_| {
            job.builds.is_empty()
                && status != CellStatus::Failed
                && recipe.unmade.is_none()
                && timed(recipe)
        }) {
            if let Err(e) = sustain(job, probe, recipe, out) {
                eprintln!("the sustained decode of {cell_id} failed: {e:#}");
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
