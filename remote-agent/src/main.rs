//! quantbench's on-board agent: `probe` describes the board, `run` measures a
//! job's kernel cells and streams progress. The same binary runs on the host
//! (`local` target) and on remote boards.

mod bandwidth;
mod measure;
mod sysinfo;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use harness::matrix::JobSpec;
use harness::results::{read_json, write_json, PROBE_FILE};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "quantbench-agent",
    about = "Measures GGML quantized kernels on this machine (started by `cargo xtask bench`)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    /// Print the agent's build hash (SHA-256 prefix of this binary).
    Version,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Probe { bandwidth } => {
            let probe = sysinfo::probe(bandwidth);
            println!("{}", serde_json::to_string_pretty(&probe)?);
        }
        Command::Version => println!("{}", sysinfo::agent_build()),
        Command::Run { job, out_dir } => {
            let job: JobSpec = read_json(&job).context("reading the job spec")?;
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("creating {}", out_dir.display()))?;
            let probe = sysinfo::probe(true);
            write_json(&out_dir.join(PROBE_FILE), &probe)?;
            let tally = measure::run_job(&job, &probe, &out_dir)?;
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
