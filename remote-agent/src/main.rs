//! quantbench's on-board agent: `probe` describes the board, `run` measures a
//! job's kernel cells and streams progress. The same binary runs on the host
//! (`local` target) and on remote boards.

mod bandwidth;
mod child;
mod kernel_run;
mod measure;
mod model_run;
mod multiply;
mod power;
mod rounds;
mod slowdown;
mod sysinfo;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use wire::files::{read_json, write_json, PROBE_FILE};
use wire::kernel_job::JobSpec;

#[derive(Parser)]
#[command(
    name = "quantbench-agent",
    about = "Measures GGML quantized kernels on this machine (started by `cargo xtask bench`)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// What `run` tells a child process of a kernel job (`measure-round`,
/// `prepare-cells`).
#[derive(clap::Args)]
struct ChildArgs {
    #[arg(long)]
    job: PathBuf,
    #[arg(long)]
    out_dir: PathBuf,
    /// This round's number (for the record only).
    #[arg(long)]
    round: u32,
    /// Indices of the job's cells, in the order to measure them.
    #[arg(long, value_delimiter = ',')]
    cells: Vec<usize>,
    /// The board's cores, as `run` resolved `threads = "all"`.
    #[arg(long)]
    cores: usize,
}

#[derive(Subcommand)]
enum Command {
    /// Print this board's description as JSON (CPU, features, memory, clocks).
    Probe {
        /// Also measure read memory bandwidth (takes a few seconds).
        #[arg(long)]
        bandwidth: bool,
    },
    /// Run every cell of a job; rows are appended to <out-dir>/kernels.csv as
    /// each cell finishes, progress goes to stdout as JSON lines.
    Run {
        /// Job spec written by the host (JSON).
        #[arg(long)]
        job: PathBuf,
        /// Directory for kernels.csv, samples.csv and probe.json.
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// One round of invocations (started by `run` itself): measure each
    /// listed cell once from the weights `run` staged, in the given order,
    /// reporting each on stdout.
    MeasureRound(ChildArgs),
    /// Prepare listed cells of an A/B job (started by `run` of another
    /// build): make and stage their weights with this build's quantizer and
    /// measure their output error, reporting each on stdout.
    PrepareCells(ChildArgs),
    /// Print the agent's build hash (SHA-256 prefix of this binary).
    Version,
    /// Quantize a GGUF model with llama.cpp's quantizer; prints JSON with
    /// the tensors that fell back to another type and the file size.
    Quantize {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// llama.cpp file type for tensors without a per-layer type (F32, Q8_0, Q4_K_M, ...).
        #[arg(long)]
        ftype: String,
        /// One GGML type per transformer block, comma-separated (adaptive recipes).
        #[arg(long, value_delimiter = ',')]
        layer_types: Vec<String>,
        /// Type for the token embedding and output matrices (with --layer-types).
        #[arg(long)]
        other_type: Option<String>,
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// An importance matrix GGUF (ours or `llama-imatrix`'s) to
        /// calibrate the quantizer with.
        #[arg(long)]
        imatrix: Option<PathBuf>,
        /// llama-quantize's `--tensor-type PATTERN=TYPE` (repeatable): a
        /// regex searched in tensor names, first match wins.
        #[arg(long = "tensor-type")]
        tensor_types: Vec<String>,
        /// llama-quantize's `--pure`: no per-tensor mixes.
        #[arg(long)]
        pure: bool,
    },
    /// AWQ: activation-aware scales searched on the model's activations on
    /// `text`, folded into an F32 copy of `input`, which llama.cpp then
    /// quantizes to `ftype` (see `kernels::awq`).
    Awq {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        #[arg(long)]
        ftype: String,
        #[arg(long)]
        text: PathBuf,
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// GPTQ: quantizes `input` to `ftype` (q4_0 or q8_0) with llama.cpp,
    /// then replaces each matrix's blocks with GPTQ's, the Hessian from the
    /// model's activations on `text`.
    Gptq {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        #[arg(long)]
        ftype: String,
        #[arg(long)]
        text: PathBuf,
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        #[arg(long, default_value_t = 0.01)]
        damp: f64,
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// A codebook recipe: `input` written in F16 by llama.cpp (output
    /// matrix Q8_0), then every other weight matrix coded to `format` (SQ4,
    /// SQ3, SQ4+S0.45, ...) with the importance matrix's mean squares as
    /// sensitivities and written back decoded, for llama.cpp to evaluate.
    /// Prints the sizes of the scheme.
    Codebook {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        #[arg(long)]
        format: String,
        /// An importance matrix GGUF; without one every input channel
        /// counts the same.
        #[arg(long)]
        imatrix: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Runs the model over a calibration text and writes its importance
    /// matrix (per weight, per input column, the sum of squared
    /// activations) as the GGUF `llama-quantize --imatrix` reads.
    Imatrix {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        text: PathBuf,
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        #[arg(long, default_value_t = 0)]
        threads: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Evaluates the unquantized model on a text as llama-perplexity does
    /// and writes its reference (the tokens, and at every scored position
    /// the next-token log-probabilities): what a model job's `reference`
    /// names, so boards need not evaluate the base model themselves.
    Reference {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        text: PathBuf,
        #[arg(long, default_value_t = 128)]
        ctx: usize,
        #[arg(long, default_value_t = 0)]
        threads: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Measure each layer's importance: the mean KL divergence from the
    /// unquantized model when only that layer is quantized to `low`.
    Importance {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        text: PathBuf,
        #[arg(long, default_value_t = 128)]
        ctx: usize,
        #[arg(long, default_value = "q4_0")]
        low: String,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Folder for the per-layer trial files.
        #[arg(long)]
        scratch: PathBuf,
    },
    /// Write a synthetic GGUF model: a seed study's architecture at its real
    /// sizes with seeded LLM-like weights; prints JSON with its size, the
    /// seconds it took and this process's peak memory.
    MakeModel {
        /// `distilgpt2`, `llama3.2-1b`, `gemma3-1b`, `exaone3.5-2.4b`.
        #[arg(long)]
        like: String,
        /// Keep only the first N blocks (default: all of them).
        #[arg(long)]
        layers: Option<usize>,
        /// Weight type of the matrices: F32 or F16.
        #[arg(long, default_value = "F16")]
        weights: String,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// A GGUF whose tokenizer is borrowed (padded to the vocabulary size).
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Run a model job: speed, memory, quality and generated text per recipe.
    ModelRun {
        #[arg(long)]
        job: PathBuf,
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// One further invocation of a model job's recipe (started by
    /// `model-run`): load it afresh, time every test, print the result as
    /// a JSON line.
    ModelTime {
        #[arg(long)]
        job: PathBuf,
        /// Index of the recipe in the job.
        #[arg(long)]
        recipe: usize,
        /// The board's cores, as `model-run` resolved `threads = "all"`.
        #[arg(long)]
        cores: usize,
        /// The A/B job's build whose recipe files to load.
        #[arg(long)]
        build: Option<String>,
    },
    /// Judges one build of an A/B model job (started by `model-run`):
    /// the base model's reference with this binary's llama.cpp, then each
    /// of the build's recipes (quality, continuation, multiple choice),
    /// one JSON line each.
    ModelQuality {
        #[arg(long)]
        job: PathBuf,
        #[arg(long)]
        build: String,
        /// The board's cores, as `model-run` resolved `threads = "all"`.
        #[arg(long)]
        cores: usize,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Probe { bandwidth } => {
            let probe = sysinfo::probe(bandwidth);
            println!("{}", serde_json::to_string_pretty(&probe)?);
        }
        Command::Version => println!("{}", sysinfo::agent_build()),
        Command::Quantize {
            input,
            output,
            ftype,
            layer_types,
            other_type,
            threads,
            imatrix,
            tensor_types,
            pure,
        } => {
            let threads = if threads == 0 { num_cores() } else { threads };
            let tensor_types = tensor_types
                .iter()
                .map(|t| {
                    t.split_once('=')
                        .map(|(p, ty)| (p.to_string(), ty.to_string()))
                        .with_context(|| format!("--tensor-type {t}: not PATTERN=TYPE"))
                })
                .collect::<Result<Vec<_>>>()?;
            let fallbacks = model_run::quantize(
                &input,
                &output,
                &model_run::QuantizeOrder {
                    ftype: &ftype,
                    layer_types: &layer_types,
                    other_type: other_type.as_deref(),
                    tensor_types: &tensor_types,
                    pure,
                    threads,
                    imatrix: imatrix.as_deref(),
                },
            )?;
            let file_bytes = std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0);
            println!(
                "{}",
                serde_json::json!({ "fallbacks": fallbacks, "file_bytes": file_bytes })
            );
        }
        Command::Gptq {
            input,
            output,
            ftype,
            text,
            ctx,
            damp,
            threads,
        } => {
            let threads = if threads == 0 { num_cores() } else { threads };
            let format = kernels::gptq::GptqFormat::from_name(&ftype)?;
            let started = std::time::Instant::now();
            let calibration = calibrate_on(&input, &text, ctx, threads, true)?;
            let calibrated_s = started.elapsed().as_secs_f64();
            let fallbacks = model_run::quantize(
                &input,
                &output,
                &model_run::QuantizeOrder {
                    ftype: &ftype.to_ascii_uppercase(),
                    threads,
                    ..Default::default()
                },
            )?;
            let grams = calibration
                .entries
                .into_iter()
                .filter_map(|(name, stats)| {
                    let cols = stats.sums.len();
                    stats.gram.map(|g| (name, (g, cols)))
                })
                .collect();
            let reports = kernels::gptq::apply_to_model(
                &input,
                &output,
                &grams,
                format,
                kernels::gptq::GptqOptions { damp, threads },
            )?;
            let mean = |f: fn(&kernels::gptq::MatrixError) -> f64| {
                reports.iter().map(f).sum::<f64>() / reports.len().max(1) as f64
            };
            println!(
                "{}",
                serde_json::json!({
                    "fallbacks": fallbacks,
                    "file_bytes": std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0),
                    "chunks": calibration.chunk_count,
                    "damp": damp,
                    "matrices": reports,
                    "mean_error_rtn": mean(|r| r.error_rtn),
                    "mean_error_gptq": mean(|r| r.error_gptq),
                    "calibration_seconds": calibrated_s,
                    "seconds": started.elapsed().as_secs_f64(),
                })
            );
        }
        Command::Awq {
            input,
            output,
            ftype,
            text,
            ctx,
            threads,
        } => {
            let threads = if threads == 0 { num_cores() } else { threads };
            let ty = kernels::awq::search_type(&ftype)?;
            let started = std::time::Instant::now();
            let calibration = calibrate_on(&input, &text, ctx, threads, true)?;
            // The scales are folded into an F32 copy beside the output,
            // which llama.cpp then quantizes.
            let folded = output.with_extension("awq-f32.gguf");
            let made = (|| -> Result<_> {
                model_run::quantize(
                    &input,
                    &folded,
                    &model_run::QuantizeOrder {
                        ftype: "F32",
                        threads,
                        ..Default::default()
                    },
                )?;
                let groups = kernels::awq::apply_to_model(
                    &folded,
                    &calibration,
                    ty,
                    kernels::awq::AwqOptions {
                        threads,
                        ..Default::default()
                    },
                )?;
                let fallbacks = model_run::quantize(
                    &folded,
                    &output,
                    &model_run::QuantizeOrder {
                        ftype: &ftype.to_ascii_uppercase(),
                        threads,
                        ..Default::default()
                    },
                )?;
                Ok((groups, fallbacks))
            })();
            let _ = std::fs::remove_file(&folded);
            let (groups, fallbacks) = made?;
            let matrices: Vec<kernels::gptq::MatrixError> = groups
                .iter()
                .map(|g| kernels::gptq::MatrixError {
                    name: g.matrices.join("+"),
                    rows: g.matrices.len(),
                    cols: g.cols,
                    error_rtn: g.error_plain,
                    error_gptq: g.error_awq,
                })
                .collect();
            let alphas: Vec<serde_json::Value> = groups
                .iter()
                .map(|g| serde_json::json!({ "folded_into": g.folded_into, "alpha": g.alpha }))
                .collect();
            let mean = |f: fn(&kernels::awq::AwqGroup) -> f64| {
                groups.iter().map(f).sum::<f64>() / groups.len().max(1) as f64
            };
            println!(
                "{}",
                serde_json::json!({
                    "fallbacks": fallbacks,
                    "file_bytes": std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0),
                    "chunks": calibration.chunk_count,
                    "matrices": matrices,
                    "alphas": alphas,
                    "mean_error_rtn": mean(|g| g.error_plain),
                    "mean_error_gptq": mean(|g| g.error_awq),
                    "seconds": started.elapsed().as_secs_f64(),
                })
            );
        }
        Command::Codebook {
            input,
            output,
            format,
            imatrix,
            threads,
        } => {
            let threads = if threads == 0 { num_cores() } else { threads };
            let ty = kernels::codebook::CodebookType::parse(&format)?;
            let sensitivities = model_run::imatrix_importance(imatrix.as_deref())?
                .into_iter()
                .collect();
            let report =
                kernels::codebook_model::make_model(&input, &output, ty, &sensitivities, threads)?;
            let mut value = serde_json::to_value(&report)?;
            // What was not coded is in the report's `left`.
            value["fallbacks"] = serde_json::json!([]);
            value["file_bytes"] =
                serde_json::json!(std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0));
            println!("{value}");
        }
        Command::Imatrix {
            model,
            text,
            ctx,
            threads,
            out,
        } => {
            let threads = if threads == 0 { num_cores() } else { threads };
            let started = std::time::Instant::now();
            let calibration = calibrate_on(&model, &text, ctx, threads, false)?;
            kernels::calibration::write_imatrix(&out, &calibration)?;
            println!(
                "{}",
                serde_json::json!({
                    "entries": calibration.entries.len(),
                    "chunks": calibration.chunk_count,
                    "chunk_size": calibration.chunk_size,
                    "seconds": started.elapsed().as_secs_f64(),
                })
            );
        }
        Command::Reference {
            model,
            text,
            ctx,
            threads,
            out,
        } => {
            let threads = if threads == 0 { num_cores() } else { threads };
            let started = std::time::Instant::now();
            let file = model_run::compute_reference(&model, &text, ctx, threads)?;
            file.write(&out)
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "{}",
                serde_json::json!({
                    "tokens": file.tokens.len(),
                    "positions": file.targets.len(),
                    "n_vocab": file.n_vocab,
                    "seconds": started.elapsed().as_secs_f64(),
                })
            );
        }
        Command::Importance {
            model,
            text,
            ctx,
            low,
            threads,
            scratch,
        } => {
            let text = std::fs::read_to_string(&text)
                .with_context(|| format!("reading {}", text.display()))?;
            std::fs::create_dir_all(&scratch)?;
            let scores = model_run::layer_importance(&model, &text, ctx, &low, threads, &scratch)?;
            println!("{}", serde_json::json!({ "scores": scores }));
        }
        Command::MakeModel {
            like,
            layers,
            weights,
            seed,
            tokenizer,
            out,
        } => {
            let spec = wire::synthetic::spec_for(&like, layers)?;
            let ty = match weights.to_ascii_uppercase().as_str() {
                "F32" => kernels::GgmlType::F32,
                "F16" => kernels::GgmlType::F16,
                other => anyhow::bail!("--weights {other}: F32 or F16"),
            };
            let started = std::time::Instant::now();
            kernels::synthetic::write_model(&out, &tokenizer, &spec, ty, seed)?;
            println!(
                "{}",
                serde_json::json!({
                    "file_bytes": std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0),
                    "parameters": spec.parameters(),
                    "seconds": started.elapsed().as_secs_f64(),
                    "peak_rss_bytes": model_run::peak_rss_bytes(),
                })
            );
        }
        Command::ModelTime {
            job,
            recipe,
            cores,
            build,
        } => {
            let job: wire::model_job::ModelJob =
                read_json(&job).context("reading the model job")?;
            model_run::time_invocation(&job, build.as_deref(), recipe, cores)?;
        }
        Command::ModelQuality { job, build, cores } => {
            let job: wire::model_job::ModelJob =
                read_json(&job).context("reading the model job")?;
            model_run::judge_build(&job, &build, cores)?;
        }
        Command::ModelRun { job, out_dir } => {
            let job_path = job;
            let job: wire::model_job::ModelJob =
                read_json(&job_path).context("reading the model job")?;
            std::fs::create_dir_all(&out_dir)?;
            // A kernel job in the same folder may have left a probe with the
            // measured bandwidth: keep that one, with the power added.
            let probe_path = out_dir.join(PROBE_FILE);
            let mut probe = read_json::<wire::probe::BoardProbe>(&probe_path)
                .unwrap_or_else(|_| sysinfo::probe(false));
            let power = model_run::power_report(&job);
            eprintln!("{}", power.describe());
            probe.power = Some(power);
            write_json(&probe_path, &probe)?;
            let failed = model_run::run_model_job(&job, &job_path, &probe, &out_dir)?;
            if failed > 0 {
                anyhow::bail!(
                    "{failed} of {} recipes failed (see models.csv)",
                    job.recipes.len()
                );
            }
        }
        Command::MeasureRound(child) => {
            let job: JobSpec = read_json(&child.job).context("reading the job spec")?;
            rounds::measure_round(&job, &child.out_dir, &child.cells, child.cores)?;
        }
        Command::PrepareCells(child) => {
            let job: JobSpec = read_json(&child.job).context("reading the job spec")?;
            rounds::prepare_cells(&job, &child.out_dir, &child.cells, child.cores)?;
        }
        Command::Run { job, out_dir } => {
            let job: JobSpec = read_json(&job).context("reading the job spec")?;
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("creating {}", out_dir.display()))?;
            let probe = sysinfo::probe(true);
            write_json(&out_dir.join(PROBE_FILE), &probe)?;
            let tally = kernel_run::run_job(&job, &probe, &out_dir)?;
            if tally.failed > 0 {
                anyhow::bail!(
                    "{} of {} cells failed (see kernels.csv)",
                    tally.failed,
                    job.cells.len()
                );
            }
        }
    }
    Ok(())
}

fn num_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The model's activations on a calibration text (and X^T X per matrix
/// when `gram`): what the importance matrix, GPTQ and AWQ learn from.
fn calibrate_on(
    model: &std::path::Path,
    text: &std::path::Path,
    ctx: usize,
    threads: usize,
    gram: bool,
) -> Result<kernels::calibration::Calibration> {
    let body = std::fs::read_to_string(text)
        .with_context(|| format!("reading the calibration text {}", text.display()))?;
    Ok(kernels::calibration::calibrate(
        model,
        &body,
        &text.display().to_string(),
        ctx,
        threads,
        gram,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_parses_the_command_line_its_parent_writes() {
        let request = wire::child::ChildRequest {
            job: PathBuf::from("/tmp/job.json"),
            out_dir: PathBuf::from("/tmp/out"),
            round: 3,
            cells: vec![4, 0, 2],
            cores: 8,
        };
        let mut line: Vec<std::ffi::OsString> = vec!["agent".into(), "measure-round".into()];
        line.extend(request.args());
        let Command::MeasureRound(args) = Cli::try_parse_from(line).expect("parses").command else {
            panic!("not measure-round");
        };
        assert_eq!(args.job, request.job);
        assert_eq!(args.out_dir, request.out_dir);
        assert_eq!(args.round, 3);
        assert_eq!(args.cells, vec![4, 0, 2]);
        assert_eq!(args.cores, 8);
    }
}
