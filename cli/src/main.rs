//! `cargo xtask`: the thin command line over the `harness` library.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use harness::pipeline::run_bench;
use harness::runs::session::SessionOptions;
use std::path::PathBuf;
use std::process::ExitCode;

const ALL_NEEDS: [bootstrap::Need; 7] = [
    bootstrap::Need::CliBuild,
    bootstrap::Need::HostBuild,
    bootstrap::Need::CrossBuild,
    bootstrap::Need::Testbed,
    bootstrap::Need::FaultInjection,
    bootstrap::Need::Labgrid,
    bootstrap::Need::CycleModel,
];

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "quantbench: which GGML quantization should I ship on this board, and did my change make it slower?",
    after_help = "Start with `cargo xtask bench --target local --matrix quick`; results land in results/<time>-<commit>/."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum BoardAction {
    /// Keep the newest `--keep` run folders and agent builds on each board of
    /// the target, and only the models those runs use. Refuses a board
    /// another run is measuring on.
    Clean {
        /// Boards, groups, ssh aliases or user@host:port, comma separated.
        target: String,
        #[arg(long, default_value_t = 20)]
        keep: usize,
        /// The matrix config file, for its [boards] and [groups].
        #[arg(long, default_value = "bench.toml")]
        config: PathBuf,
        /// Trust and record a board's unknown SSH host key.
        #[arg(long)]
        accept_new_host_key: bool,
    },
}

#[derive(Subcommand)]
enum TestbedAction {
    /// Create boards sim1..simN and write .testbed/boards.toml (needs root).
    Up {
        #[arg(long, default_value_t = 2)]
        boards: usize,
    },
    /// Remove every namespace, process and file the testbed made.
    Down,
}

#[derive(Subcommand)]
enum ImportSource {
    /// Stock llama.cpp's `llama-bench -o jsonl` (or `-o json`) output, as
    /// model rows. Run llama-bench on quantbench's recipe files
    /// (target/quantbench-models/<hash>/<recipe>.gguf) and `compare` the
    /// imported run with a quantbench model run.
    LlamaBench {
        /// The llama-bench output file.
        file: PathBuf,
        /// Board name for the rows (the machine llama-bench ran on).
        #[arg(long, default_value = "local")]
        board: String,
        /// Model name for the rows (the original GGUF's file name, as
        /// quantbench's rows name it); default: llama-bench's file path.
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value = "results")]
        results: PathBuf,
    },
}

/// Where and what to measure: the arguments `bench`, `ab` and `bisect`
/// share.
#[derive(clap::Args)]
struct RunArgs {
    /// Where to measure: `local` (this machine), a board or group from the
    /// config, an ~/.ssh/config alias, user@host:port, `labgrid:<place>`
    /// (a place of a labgrid farm, taken for the run and released after;
    /// coordinator from the config or LG_COORDINATOR), or a comma list.
    /// Without it: one emulated Pi 5 on this machine (board sim1).
    #[arg(long)]
    target: Option<String>,
    /// Matrices from the config, kernel or model, one name or a comma
    /// list run into one run directory (`quick`, `smoke,model-quick`, ...).
    #[arg(long, default_value = "quick")]
    matrix: String,
    /// The matrix config file.
    #[arg(long, default_value = "bench.toml")]
    config: PathBuf,
    /// Parent folder of run directories.
    #[arg(long, default_value = "results")]
    results: PathBuf,
    /// Cross-build with `cargo` (Debian's aarch64 gcc, the default) or
    /// `cross` (cross-rs; needs Docker or Podman).
    #[arg(long, default_value = "cargo")]
    builder: String,
    /// Trust a board's unknown SSH host key for this run (a changed key is
    /// always refused).
    #[arg(long)]
    accept_new_host_key: bool,
    /// Seconds to wait for a board that another run (another host, a
    /// colleague, last night's agent still going) is measuring on, or a
    /// labgrid place someone else holds, before failing that board with
    /// who holds it.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    lock_wait: u64,
    /// Bound the whole run's time, e.g. `45m`, `2h`, `1h30m`. Kernel
    /// cells whose time is not yet known to the matrix's `precision`
    /// (default +-2%) after their invocations get more, a round at a
    /// time (up to 3x, or the matrix's `max_invocations`), while the
    /// budget lasts; a budget too small for the matrix's invocations
    /// lowers them, one too small for one invocation of every cell is
    /// refused. Each job's `deadline_seconds` still stops a hung board.
    #[arg(long, value_name = "DURATION")]
    budget: Option<String>,
}

impl RunArgs {
    /// The session these arguments ask for, with `build` (and `versus`).
    fn options(&self, build: &str, versus: Vec<String>) -> Result<SessionOptions> {
        Ok(SessionOptions {
            config_path: self.config.clone(),
            matrix: self.matrix.clone(),
            target: self.target.clone(),
            results_root: self.results.clone(),
            builder: parse_builder(&self.builder)?,
            accept_new_host_key: self.accept_new_host_key,
            board_lock_wait: std::time::Duration::from_secs(self.lock_wait),
            resume: None,
            budget: self
                .budget
                .as_deref()
                .map(harness::runs::budget::parse_duration)
                .transpose()?,
            build: build.to_string(),
            versus,
            defined_builds: Default::default(),
            only_cells: Vec::new(),
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Build the agent, run kernel and/or model matrices on a target, write
    /// CSVs, run.json, plots and a summary into one run directory.
    Bench {
        #[command(flatten)]
        run: RunArgs,
        /// Pick up an interrupted run instead of starting one: a run
        /// directory, a run id under --results, or `latest`. Agents still
        /// running on boards are followed, finished ones collected, jobs
        /// that never started are started; cells with a row are never
        /// measured again. Config, matrices and target come from the run's
        /// run.json; the agents must be the same builds (same commit).
        #[arg(long, value_name = "RUN", conflicts_with_all = ["target", "matrix"])]
        resume: Option<String>,
        /// Which llama.cpp the agents are built from: `default` (the pinned
        /// llama-cpp-sys-2's own copy), a `[builds.<name>]` of the config
        /// (source, patches, CMake options), or a source written directly:
        /// `crate:0.1.140` (another llama-cpp-sys-2 version's copy, fetched
        /// by cargo) or `path:../llama.cpp` / `path:../llama.cpp@<git rev>`
        /// (a local checkout), or `quantbench@<git rev>` (this repository's
        /// agent at a commit, with the default llama.cpp). Recorded in
        /// run.json and every row.
        #[arg(long, default_value = "default", conflicts_with = "resume")]
        build: String,
    },
    /// What quantbench keeps on boards: `board clean <target>` prunes old
    /// run folders, agent builds and unused models (also done after every
    /// job, keeping each board's `keep_runs`).
    Board {
        #[command(subcommand)]
        action: BoardAction,
    },
    /// Emulated Pi 5 boards on this machine (network namespaces + sshd + qemu).
    Testbed {
        #[command(subcommand)]
        action: TestbedAction,
    },
    /// Install what a fresh Debian machine lacks (apt packages as root, the
    /// aarch64 Rust target); prints the exact command when not root.
    Setup,
    /// Set up, then run the whole test suite (`cargo test --release --workspace`).
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Static cycle estimates of the kernels' hot loops from llvm-mca (a
    /// model estimate, not a measurement): cycles per 32 weights for ours
    /// (LUT2, LUT3, SQ4, SQ3) and GGML's Q4_0 loops, as the board's agent is built.
    /// Needs Debian's llvm-19 (`apt-get install llvm-19`): older LLVMs have
    /// no Cortex-A76 model of their own, which the command checks.
    Cycles {
        /// `pi5`: the cross-built Pi 5 agent under LLVM's Neoverse N1 model
        /// (the server core built on the Cortex-A76; LLVM's `cortex-a76`
        /// is its Cortex-A57 model, which the command shows beside it). `local`: the host agent under LLVM's model of this CPU,
        /// to check the method against measured times (`--measured`).
        #[arg(long, default_value = "pi5")]
        board: String,
        /// A run folder of a kernel matrix measured on `local` (1 thread,
        /// batch 1; e.g. `--matrix lut` with `repack = false` for GGML's
        /// plain Q4_0 loop): its cycles per 32 weights are printed beside
        /// the estimates.
        #[arg(long)]
        measured: Option<PathBuf>,
        /// The clock that turns measured nanoseconds into cycles (default:
        /// /proc/cpuinfo's first `cpu MHz`).
        #[arg(long)]
        ghz: Option<f64>,
    },
    /// Write a synthetic GGUF model that stock llama.cpp loads: a seed study's
    /// architecture at its real sizes (dimensions, heads, vocabulary, layers)
    /// with seeded LLM-like weights. Speed and memory only: it has no quality.
    /// The same command gives the same bytes. A model matrix can name one as
    /// `models = ["synthetic:llama3.2-1b"]` instead.
    MakeModel {
        /// distilgpt2, llama3.2-1b, gemma3-1b or exaone3.5-2.4b.
        #[arg(long)]
        like: String,
        /// Keep only the first N blocks (default: all, as the real model).
        #[arg(long)]
        layers: Option<usize>,
        /// Weight type of the matrices: f16 (as the models ship) or f32.
        #[arg(long, default_value = "f16")]
        weights: String,
        /// Seed of the weights.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Output file (default: synthetic-<name>-<layers>l-<weights>-s<seed>.gguf
        /// in the current folder).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Cross-build the on-board agent for a board profile and report what it is
    /// (path, content hash, static or not, Arm dot-product instructions).
    BuildAgent {
        /// Board profile: pi5, pi4 or generic-aarch64.
        #[arg(long, default_value = "pi5")]
        profile: String,
        /// `cargo` (default, Debian's cross gcc) or `cross` (needs a container engine).
        #[arg(long, default_value = "cargo")]
        builder: String,
        /// Which build: `default`, a `[builds.<name>]` of the config, or a
        /// source (`crate:0.1.140`, `path:../llama.cpp@<rev>`,
        /// `quantbench@<rev>`); see `bench --build`.
        #[arg(long, default_value = "default")]
        build: String,
        /// The config file holding `[builds]`.
        #[arg(long, default_value = "bench.toml")]
        config: PathBuf,
    },
    /// A/B of two builds in one session: both agents measure every cell of
    /// the kernel matrices in the same shuffled rounds, and every recipe of
    /// the model matrices (each build quantizing with its own quantizer) in
    /// shared rounds, each as its own processes, on every board of the
    /// target; then the verdict table of
    /// <new> against <base> is printed, with the statistics of `compare`.
    /// A build is `default`, a `[builds.<name>]` of the config, or a source
    /// (`crate:0.1.140`, `path:../llama.cpp@<rev>`, `quantbench@<rev>` for
    /// this repository at a commit: `ab quantbench@HEAD default` measures
    /// your uncommitted change); see `bench --build`. The run directory
    /// keeps both (`compare <run>@<base> <run>@<new>`).
    Ab {
        /// The baseline build.
        base: String,
        /// The build judged against it.
        new: String,
        #[command(flatten)]
        run: RunArgs,
        /// Output: `table`, `md`, `json` or `junit`.
        #[arg(long, default_value = "table")]
        format: String,
        /// Smallest relative change of the median that counts (0.05 = 5%).
        #[arg(long, default_value_t = 0.05)]
        threshold: f64,
        /// False discovery rate over all judged cells (Benjamini-Hochberg).
        #[arg(long, default_value_t = 0.05)]
        fdr: f64,
        /// Judge against the threshold alone, without the boards' noise
        /// floors (results/noise/<board>.json).
        #[arg(long)]
        no_noise_floors: bool,
        /// Exit with status 1 when any cell regressed.
        #[arg(long)]
        fail_on_regression: bool,
        /// When no cell regressed (and every board finished), write <new>'s
        /// source pinned to its exact tree (`path:<checkout>@<commit>`) to
        /// this file: the nightly's accepted build, tomorrow's base.
        #[arg(long, value_name = "FILE")]
        accept_to: Option<PathBuf>,
    },
    /// Find the commit of a llama.cpp checkout (--llama), or of this
    /// repository (--quantbench), that made a kernel cell or a model test
    /// slower: builds the midpoints of --good..--bad (first-parent history)
    /// and measures each against its nearest known-good and known-bad
    /// commits in one A/B session on the target, measuring again while a
    /// step is undecided; prints the first bad commit with each step's
    /// evidence, or that the range is not monotonic. Every revision builds
    /// in the same folders, so a step is an incremental GGML build; each
    /// step's run is in --results and the history.
    Bisect {
        /// The llama.cpp checkout (a git repository) whose commits to
        /// bisect, built with this working tree's quantbench.
        #[arg(
            long,
            required_unless_present = "quantbench",
            conflicts_with = "quantbench"
        )]
        llama: Option<PathBuf>,
        /// Bisect this repository's own commits instead (our kernels and
        /// agent, with the default llama.cpp); every commit must share
        /// this checkout's wire/ (the job format).
        #[arg(long)]
        quantbench: bool,
        /// A revision where the cell was fast.
        #[arg(long)]
        good: String,
        /// A later revision where it is slow.
        #[arg(long)]
        bad: String,
        /// The kernel cell, as its id in kernels.csv
        /// (`<shape>/<type>/n<batch>/t<threads>`), of the kernel --matrix
        /// (whose timing settings each step uses; --budget bounds each
        /// step); or a model test of a model --matrix,
        /// `<model file>/<recipe>/<pp|tg><N>/t<threads>` (only that
        /// recipe is quantized and measured by each build).
        #[arg(long)]
        cell: String,
        /// Sessions a step may take before it is called inconclusive.
        #[arg(long, default_value_t = 3)]
        attempts: u32,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Compare two runs cell by cell: did the new one get slower or worse?
    /// Each side is a run directory, `latest`, `previous`, or a commit prefix.
    Compare {
        /// The baseline run; `<run>@<build>` is one build's side of an A/B
        /// run (`cargo xtask ab`), e.g. `latest@base latest@new`.
        base: String,
        /// The run to judge against it (`<run>@<build>` likewise).
        new: String,
        /// Output: `table` (terminal), `md`, `json` or `junit` (JUnit XML).
        #[arg(long, default_value = "table")]
        format: String,
        /// Smallest relative change of the median that counts (0.05 = 5%).
        #[arg(long, default_value_t = 0.05)]
        threshold: f64,
        /// False discovery rate over all judged cells (Benjamini-Hochberg):
        /// of the cells called regressed or improved, at most this share
        /// is expected to be noise.
        #[arg(long, alias = "alpha", default_value_t = 0.05)]
        fdr: f64,
        /// Cells whose spread within an invocation (robust coefficient of
        /// variation) exceeds this are `noisy`.
        #[arg(long, default_value_t = 0.25)]
        max_cv: f64,
        /// Worsening of a quality column that counts as a quality regression
        /// (relative for NMSE, perplexity, KLD; absolute for agreement and accuracy).
        #[arg(long, default_value_t = 0.02)]
        quality_tolerance: f64,
        /// Exit with status 1 on a confirmed regression: a timing
        /// regression seen twice (see --confirm-against) or a quality
        /// regression.
        #[arg(long)]
        fail_on_regression: bool,
        /// Exit with status 1 on any regression, suspects (seen once) too.
        #[arg(long)]
        fail_on_suspect: bool,
        /// The second look that confirms a timing regression: `auto` (the
        /// run before the base on the same boards, judged against both the
        /// base and the new run: a cell regressed in both is confirmed),
        /// `none`, or a run (directory, `previous`, commit prefix).
        #[arg(long, default_value = "auto", value_name = "RUN|auto|none")]
        confirm_against: String,
        /// Parent folder of run directories (and of the history index).
        #[arg(long, default_value = "results")]
        results: PathBuf,
        /// Judge every cell against the threshold alone, ignoring the noise
        /// floors `cargo xtask noise` measured (results/noise/<board>.json).
        #[arg(long)]
        no_noise_floors: bool,
        /// Keep each run's round effects in (by default a drift that hit
        /// every cell of a round alike, such as a machine warming up, is
        /// divided out of its invocations).
        #[arg(long)]
        no_round_adjustment: bool,
        /// Match cells across a setting the runs differ in, to judge the
        /// setting itself: `repack` (on against off), `load_mode` or
        /// `distribution`; comma list.
        #[arg(long, value_delimiter = ',')]
        across: Vec<String>,
    },
    /// Measure a board's noise: run a matrix as pairs of same-build runs
    /// (A, B, A, B, ...), judge each pair with `compare` and print the
    /// board's false-alarm table (what a night where nothing changed looks
    /// like); keep each cell's run-to-run spread as its noise floor in
    /// results/noise/<board>.json, which `compare` then uses for runs of the
    /// same agent build on the board as it was. The runs themselves go to
    /// results/noise/<time>/, out of the nightly history.
    Noise {
        /// Where to measure, as for `bench` (default: one emulated Pi 5,
        /// whose timings mean nothing: use a real board or `local`).
        #[arg(long)]
        target: Option<String>,
        /// Matrices from the config, as for `bench`.
        #[arg(long, default_value = "quick")]
        matrix: String,
        /// Same-build pairs to run (each pair is two whole runs).
        #[arg(long, default_value_t = 3)]
        pairs: usize,
        #[arg(long, default_value = "bench.toml")]
        config: PathBuf,
        #[arg(long, default_value = "results")]
        results: PathBuf,
        /// Smallest relative change that counts, as for `compare`.
        #[arg(long, default_value_t = 0.05)]
        threshold: f64,
        /// False discovery rate, as for `compare`.
        #[arg(long, default_value_t = 0.05)]
        fdr: f64,
        /// Trust a board's unknown SSH host key for this run.
        #[arg(long)]
        accept_new_host_key: bool,
        #[arg(long, value_name = "SECONDS", default_value_t = 600)]
        lock_wait: u64,
    },
    /// Bring the history index (results/history.sqlite) up to date with the
    /// run directories, rebuilding it when missing or corrupt, and list runs.
    History {
        #[arg(long, default_value = "results")]
        results: PathBuf,
        /// Throw the index away and rebuild it from the run directories.
        #[arg(long)]
        rebuild: bool,
    },
    /// Remove run directories nothing needs any more, and recipe caches not
    /// used for a while. A run is kept while it is one of the newest
    /// --keep-runs of its series (matrices and target), younger than
    /// --keep-days, part of a board's history noise floor, pinned (its run
    /// id a line of <results>/keep.txt: a baseline), or in use; each kept
    /// run is listed with why. Noise runs (<results>/noise/) are never
    /// removed. Try --dry-run first.
    Prune {
        #[arg(long, default_value = "results")]
        results: PathBuf,
        /// The config whose models' recipe caches are always kept.
        #[arg(long, default_value = "bench.toml")]
        config: PathBuf,
        /// Newest runs kept per series (at least 3).
        #[arg(long, default_value_t = 30)]
        keep_runs: usize,
        /// Runs younger than this many days are kept.
        #[arg(long, default_value_t = 90)]
        keep_days: u64,
        /// Recipe caches (target/quantbench-models/<model>) unused for this
        /// many days are removed, unless the config names the model.
        #[arg(long, default_value_t = 30)]
        models_unused_days: u64,
        /// Builds of other llama.cpp sources (target/llama-sources,
        /// target/builds) and kept agents (target/agents) unused for this
        /// many days are removed.
        #[arg(long, default_value_t = 14)]
        builds_unused_days: u64,
        /// Say what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Write the static HTML report (results/site/index.html): latest run
    /// against the previous run of the same boards, its plots and CSVs, and
    /// trend plots with change points from the history.
    Report {
        #[arg(long, default_value = "results")]
        results: PathBuf,
        /// Output folder (default: <results>/site).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Bring other tools' results into a run directory, to compare with ours.
    Import {
        #[command(subcommand)]
        source: ImportSource,
    },
    /// Redraw the plots and summary of a run directory (kernel, model or both).
    Plot {
        /// A run directory, e.g. results/20261122T170000Z-abc1234.
        run_dir: PathBuf,
        /// Draw only these plot kinds (comma list, e.g.
        /// `speedup_vs_f32,model_kld_vs_bits`); all when absent.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
}

fn main() -> ExitCode {
    // Ctrl-C, or SIGTERM from a CI runner cancelling a job: give back the
    // labgrid places this run holds before dying, or they stay taken. Agents
    // on boards keep running; `bench --resume` takes the places again and
    // collects them.
    let installed = ctrlc::set_handler(|| {
        harness::fleet::labgrid::release_all_held();
        std::process::exit(130);
    });
    if let Err(e) = installed {
        eprintln!("warning: no interrupt handler ({e}): an interrupted run leaves its labgrid places taken");
    }
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench { run, resume, build } => {
            let report = run_bench(&SessionOptions {
                resume: resume.clone(),
                ..run.options(&build, Vec::new())?
            })
            .with_context(|| match &resume {
                Some(resumed) => format!("resuming run `{resumed}`"),
                None => format!(
                    "bench of `{}` on `{}`",
                    run.matrix,
                    run.target.as_deref().unwrap_or("the default emulated Pi 5")
                ),
            })?;
            println!("{}", report.rendered.tables);
            for board in &report.boards {
                println!(
                    "board {}: {} ok, {} unsupported, {} failed; wall {:.1} s, agent {:.1} s (host overhead {:.1} s), uploaded {} bytes{}",
                    board.board,
                    board.ok,
                    board.unsupported,
                    board.failed,
                    board.wall_seconds,
                    board.agent_seconds,
                    board.wall_seconds - board.agent_seconds,
                    board.uploaded_bytes,
                    board.error.as_ref().map(|e| format!("; FAILED: {e}")).unwrap_or_default()
                );
            }
            println!(
                "results: {} ({} plots; {} has every row)",
                report.run_dir.display(),
                report.rendered.plots.len(),
                report.rendered.summary_path.display()
            );
            Ok(if report.all_succeeded() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Board {
            action:
                BoardAction::Clean {
                    target,
                    keep,
                    config,
                    accept_new_host_key,
                },
        } => {
            let workspace = harness::builds::build::workspace_root();
            let config = harness::runs::config::BenchConfig::load(&config)?;
            let boards = harness::fleet::boards::resolve_targets(
                &target,
                &harness::runs::session::known_boards(&config, &workspace)?,
                &harness::fleet::boards::SshConfig::load_default(),
            )?;
            let mut failed = false;
            for board in boards {
                match board {
                    harness::fleet::boards::ResolvedBoard::Local => {
                        println!("local: nothing kept on boards to clean")
                    }
                    harness::fleet::boards::ResolvedBoard::Remote(remote)
                        if remote.farm.is_some() =>
                    {
                        eprintln!(
                            "{}: a labgrid place is cleaned by the runs that take it (each prunes the board to its `keep_runs` after every job); `board clean` does not take places",
                            remote.name
                        );
                        failed = true;
                    }
                    harness::fleet::boards::ResolvedBoard::Remote(remote) => {
                        match harness::runs::deploy::clean_board(&remote, keep, accept_new_host_key)
                        {
                            Ok(line) => println!("{line}"),
                            Err(e) => {
                                eprintln!("{e}");
                                failed = true;
                            }
                        }
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Testbed { action } => {
            let workspace = harness::builds::build::workspace_root();
            match action {
                TestbedAction::Up { boards } => {
                    let file = harness::fleet::testbed::up(&workspace, boards)?;
                    println!(
                        "testbed: {boards} emulated Pi 5 board(s) up (sim1..sim{boards}, group `testbed`); config in {}",
                        file.display()
                    );
                }
                TestbedAction::Down => {
                    harness::fleet::testbed::down(&workspace)?;
                    println!("testbed: down, nothing left behind");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Setup => {
            bootstrap::ensure(&ALL_NEEDS)?;
            ensure_browser();
            println!("setup: everything quantbench needs is installed");
            Ok(ExitCode::SUCCESS)
        }
        Command::Test { cargo_test_args } => {
            bootstrap::ensure(&ALL_NEEDS)?;
            ensure_browser();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = std::process::Command::new(cargo)
                .current_dir(harness::builds::build::workspace_root())
                .args(["test", "--release", "--workspace"])
                .args(&cargo_test_args)
                .status()
                .context("starting cargo test")?;
            Ok(if status.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Cycles {
            board,
            measured,
            ghz,
        } => {
            use harness::builds::{build, cycles};
            bootstrap::ensure(&[
                bootstrap::Need::HostBuild,
                bootstrap::Need::CrossBuild,
                bootstrap::Need::CycleModel,
            ])?;
            let workspace = build::workspace_root();
            let source = harness::builds::llama_source::vendored(&workspace)?;
            let host_loops = if cfg!(target_arch = "aarch64") {
                cycles::AARCH64_LOOPS
            } else {
                cycles::X86_LOOPS
            };
            let (agent, triple, loops, cpus) = match board.as_str() {
                "pi5" => (
                    build::build_board_agent(
                        &workspace,
                        build::BoardProfile::Pi5,
                        build::Builder::Cargo,
                        &source,
                    )?,
                    "aarch64",
                    cycles::AARCH64_LOOPS,
                    vec![cycles::A76_MODEL, "cortex-a76", "cortex-a57"],
                ),
                "local" => (
                    build::build_host_agent(&workspace, &source)?,
                    std::env::consts::ARCH,
                    host_loops,
                    vec!["native"],
                ),
                other => anyhow::bail!("--board {other}: `pi5` or `local`"),
            };
            let estimates = cycles::estimate(&agent.path, triple, loops, &cpus)?;
            if board == "pi5" {
                cycles::check_distinct_model(&estimates, cycles::A76_MODEL, "cortex-a57")?;
                if cycles::check_distinct_model(&estimates, "cortex-a76", "cortex-a57").is_err() {
                    println!("LLVM's -mcpu=cortex-a76 gives exactly its Cortex-A57 figures on every loop (it schedules the A76 with the A57's model), so the A76 figure is the {} column: the Neoverse N1, the server core built on the Cortex-A76's pipelines, whose model is LLVM's own.\n", cycles::A76_MODEL);
                }
            }
            let rows = match &measured {
                Some(dir) => Some(cycles::measured_rows(dir)?),
                None => None,
            };
            let clock = match (&rows, ghz) {
                (None, _) => 0.0,
                (Some(_), Some(ghz)) => ghz,
                (Some(_), None) => {
                    cpu_ghz().context("no `cpu MHz` in /proc/cpuinfo: give the clock with --ghz")?
                }
            };
            println!(
                "llvm-mca model estimate ({}), not a measurement: every load hits L1; memory bandwidth, which bounds decode on a Pi 5, is not modelled (docs/measurement.md, \"Cycle estimates\").\n",
                cycles::tool("llvm-mca")
            );
            print!(
                "{}",
                cycles::table(&estimates, loops, rows.as_deref().map(|r| (r, clock)))
            );
            if rows.is_some() {
                println!("\nmeasured at {clock:.3} GHz: the whole GEMV's median (tables, epilogue, caches) over the weights; the estimate is the hot loop alone.");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::MakeModel {
            like,
            layers,
            weights,
            seed,
            out,
        } => {
            use harness::runs::synthetic::{SyntheticModel, Weights};
            let weights = Weights::parse(&weights)
                .with_context(|| format!("--weights {weights}: f16 or f32"))?;
            let model = SyntheticModel::named(&like, layers, weights, seed)?;
            let out = out.unwrap_or_else(|| PathBuf::from(model.file_name()));
            bootstrap::ensure(&[bootstrap::Need::HostBuild])?;
            let workspace = harness::builds::build::workspace_root();
            let agent = harness::builds::build::build_host_agent(
                &workspace,
                &harness::builds::llama_source::vendored(&workspace)?,
            )?;
            let made = harness::runs::synthetic::make(&agent, &workspace, &model, Some(&out))?;
            println!(
                "{}: synthetic {} ({} layers, {:.3} G parameters, {}) {:.2} GB in {:.1} s, peak memory {:.2} GB",
                made.path.display(),
                model.spec.like,
                model.spec.n_layer,
                model.spec.parameters() as f64 / 1e9,
                model.weights.name(),
                made.file_bytes as f64 / 1e9,
                made.seconds.unwrap_or(0.0),
                made.peak_rss_bytes.unwrap_or(0) as f64 / 1e9
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::BuildAgent {
            profile,
            builder,
            build,
            config,
        } => {
            let profile =
                harness::builds::build::BoardProfile::from_name(&profile).with_context(|| {
                    format!("unknown board profile `{profile}` (known: pi5, pi4, generic-aarch64)")
                })?;
            let builder = parse_builder(&builder)?;
            bootstrap::ensure(&[bootstrap::Need::HostBuild, bootstrap::Need::CrossBuild])?;
            let workspace = harness::builds::build::workspace_root();
            let source = prepared_build(&workspace, &config, &build)?;
            let started = std::time::Instant::now();
            let agent =
                harness::builds::build::build_board_agent(&workspace, profile, builder, &source)?;
            let facts = harness::builds::build::inspect_aarch64_binary(&agent.path)?;
            println!(
                "{} ({}, {}): {:.1} s; {}; {} sdot instructions",
                agent.path.display(),
                agent.hash,
                profile.name(),
                started.elapsed().as_secs_f64(),
                if facts.needed.is_empty() && !facts.has_interpreter {
                    "fully static".to_string()
                } else {
                    format!("DYNAMIC: {:?}", facts.needed)
                },
                facts.sdot_count
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Ab {
            base,
            new,
            run: run_args,
            format,
            threshold,
            fdr,
            no_noise_floors,
            fail_on_regression,
            accept_to,
        } => {
            if !["table", "md", "json", "junit"].contains(&format.as_str()) {
                anyhow::bail!("unknown --format `{format}` (known: table, md, json, junit)");
            }
            anyhow::ensure!(
                base != new,
                "`ab {base} {new}`: name two different builds (to measure a build against itself, define it twice under [builds] with different names)"
            );
            let report =
                run_bench(&run_args.options(&base, vec![new.clone()])?).with_context(|| {
                    format!("A/B of `{new}` against `{base}` on `{}`", run_args.matrix)
                })?;
            let results = run_args.results.clone();
            let run = harness::results::run_dir::RunData::load(&report.run_dir)?;
            // The names the run gave them (a source written here is `base`
            // or `new` in cell ids).
            let measured = run.measured_builds();
            anyhow::ensure!(
                measured.len() == 2,
                "the A/B run {} measured builds {measured:?}, not two: see its summary",
                report.run_dir.display()
            );
            let base_side = run.build_side(&measured[0])?;
            let new_side = run.build_side(&measured[1])?;
            let mut settings = harness::results::compare::CompareSettings {
                threshold,
                fdr,
                ..Default::default()
            };
            if !no_noise_floors {
                let (floors, notes) =
                    harness::results::noise::floors_for(&results, None, &new_side);
                for note in notes {
                    eprintln!("{note}");
                }
                settings.noise_floors = floors;
            }
            let mut comparison =
                harness::results::compare::compare(&base_side, &new_side, &settings)?;
            comparison.confirmation.rule = format!(
                "A/B in one session: both builds measured in the same shuffled rounds on the same boards ({}); compare {}@{} {}@{} judges it again",
                report.run_dir.display(),
                report.run_dir.display(),
                measured[0],
                report.run_dir.display(),
                measured[1]
            );
            print_comparison(&comparison, &format)?;
            if !report.all_succeeded() {
                eprintln!("some boards failed; their rows are missing from the verdict");
            }
            if let Some(file) = &accept_to {
                let pinned = run
                    .manifest
                    .versions
                    .agent_builds
                    .iter()
                    .find(|b| b.build == measured[1])
                    .and_then(|b| b.pinned_source(&run.manifest.git_commit));
                if comparison.any_regression() || !report.all_succeeded() {
                    eprintln!(
                        "not accepted: {} stays the accepted build ({})",
                        base,
                        file.display()
                    );
                } else if let Some(pinned) = pinned {
                    let temp = file.with_extension("tmp");
                    std::fs::write(&temp, format!("{pinned}\n"))
                        .and_then(|()| std::fs::rename(&temp, file))
                        .with_context(|| {
                            format!("writing the accepted build to {}", file.display())
                        })?;
                    eprintln!(
                        "accepted: {pinned} is now the accepted build ({})",
                        file.display()
                    );
                } else {
                    anyhow::bail!(
                        "`{new}` cannot be accepted into {}: no one source names what it measured (patches, CMake options, uncommitted changes, or a commit of this repository with another llama.cpp); accept a checkout at a commit, or commit your changes",
                        file.display()
                    );
                }
            }
            Ok(
                if (fail_on_regression && comparison.any_regression()) || !report.all_succeeded() {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                },
            )
        }
        Command::Bisect {
            llama,
            quantbench: _,
            good,
            bad,
            cell,
            attempts,
            run,
        } => {
            let matrix = &run.matrix;
            let loaded = harness::runs::config::BenchConfig::load(&run.config)?;
            // A typo in the cell fails here, before any build.
            if let Some(spec) = loaded.model_matrices.get(matrix) {
                harness::runs::jobs::model::ModelMatrix::new(&loaded, matrix, spec)?
                    .check_test(&cell)
                    .map_err(anyhow::Error::msg)?;
            } else {
                let cells = loaded
                    .matrix(matrix)?
                    .expand(&loaded.catalog())
                    .with_context(|| format!("expanding matrix `{matrix}`"))?;
                if !cells.iter().any(|c| c.id == cell) {
                    let known: Vec<&str> = cells.iter().map(|c| c.id.as_str()).take(12).collect();
                    anyhow::bail!(
                        "matrix `{matrix}` has no cell `{cell}` (its cells include: {}); give --matrix the matrix that holds it",
                        known.join(", ")
                    );
                }
            }
            let report = harness::bisect::bisect(&harness::bisect::BisectOptions {
                session: run.options("default", Vec::new())?,
                over: match llama {
                    Some(checkout) => harness::bisect::BisectOver::Llama(checkout),
                    None => harness::bisect::BisectOver::Quantbench(
                        harness::builds::build::workspace_root(),
                    ),
                },
                good,
                bad,
                cell: cell.clone(),
                attempts,
            })?;
            for line in report.step_lines() {
                println!("{line}");
            }
            println!("{}", report.verdict_line(&cell));
            Ok(match report.outcome {
                harness::bisect::Outcome::FirstBad(_) => ExitCode::SUCCESS,
                _ => ExitCode::FAILURE,
            })
        }
        Command::Compare {
            base,
            new,
            format,
            threshold,
            fdr,
            max_cv,
            quality_tolerance,
            fail_on_regression,
            fail_on_suspect,
            confirm_against,
            results,
            no_noise_floors,
            no_round_adjustment,
            across,
        } => {
            if !["table", "md", "json", "junit"].contains(&format.as_str()) {
                anyhow::bail!("unknown --format `{format}` (known: table, md, json, junit)");
            }
            let (history, _) = harness::results::history::History::open(&results)
                .with_context(|| format!("reading the history of {}", results.display()))?;
            let load = |reference: &str| -> Result<harness::results::run_dir::RunData> {
                // `<run>@<build>`: one build's side of an A/B run.
                let (run, build) = match reference.rsplit_once('@') {
                    Some((run, build)) if !build.is_empty() => (run, Some(build)),
                    _ => (reference, None),
                };
                let dir = history.resolve(run)?;
                Ok(harness::results::run_dir::RunData::load_side(&dir, build)?)
            };
            let base_run = load(&base)?;
            let new_run = load(&new)?;
            let mut settings = harness::results::compare::CompareSettings {
                threshold,
                fdr,
                max_cv,
                quality_tolerance,
                adjust_rounds: !no_round_adjustment,
                across,
                ..Default::default()
            };
            if !no_noise_floors {
                let (floors, notes) =
                    harness::results::noise::floors_for(&results, Some(&history), &new_run);
                for note in notes {
                    eprintln!("{note}");
                }
                settings.noise_floors = floors;
            }
            let comparison = harness::results::persistence::compare_and_confirm(
                &history,
                &base_run,
                &new_run,
                &settings,
                &harness::results::persistence::ConfirmAgainst::parse(&confirm_against),
            )?;
            print_comparison(&comparison, &format)?;
            let failed = (fail_on_suspect && comparison.any_regression())
                || (fail_on_regression && comparison.confirmed_count() > 0);
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Noise {
            target,
            matrix,
            pairs,
            config,
            results,
            threshold,
            fdr,
            accept_new_host_key,
            lock_wait,
        } => {
            anyhow::ensure!(
                pairs >= 1,
                "--pairs {pairs}: a noise measurement needs at least one pair of runs"
            );
            let session_dir = harness::results::noise::new_session_dir(&results);
            let options = SessionOptions {
                config_path: config,
                matrix,
                target,
                results_root: session_dir.clone(),
                builder: harness::builds::build::Builder::Cargo,
                accept_new_host_key,
                board_lock_wait: std::time::Duration::from_secs(lock_wait),
                resume: None,
                budget: None,
                build: "default".into(),
                versus: Vec::new(),
                defined_builds: Default::default(),
                only_cells: Vec::new(),
            };
            let mut runs = Vec::new();
            for i in 0..2 * pairs {
                let side = if i % 2 == 0 { "A" } else { "B" };
                eprintln!("noise: pair {} side {side}", i / 2 + 1);
                let report = run_bench(&options)?;
                anyhow::ensure!(
                    report.all_succeeded(),
                    "noise run {} did not finish on every board (see its summary.md); the runs so far are in {}",
                    report.run_dir.display(),
                    session_dir.display()
                );
                runs.push(report.run_dir);
            }
            let settings = harness::results::compare::CompareSettings {
                threshold,
                fdr,
                ..Default::default()
            };
            let report = harness::results::noise::measure(&runs, &results, &settings)?;
            print!("{}", report.to_table());
            Ok(ExitCode::SUCCESS)
        }
        Command::History { results, rebuild } => {
            if rebuild {
                let path = results.join(harness::results::history::HISTORY_FILE);
                if path.exists() {
                    std::fs::remove_file(&path)
                        .with_context(|| format!("removing {}", path.display()))?;
                }
            }
            let started = std::time::Instant::now();
            let (history, report) = harness::results::history::History::open(&results)?;
            for run in history.runs()? {
                println!("{}  {}  {}", run.run_id, run.git_commit, run.boards);
            }
            println!(
                "{}: {} runs ({} added, {} removed{}) in {:.2} s",
                history.path().display(),
                report.total,
                report.added,
                report.removed,
                if report.rebuilt { ", rebuilt" } else { "" },
                started.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Prune {
            results,
            config,
            keep_runs,
            keep_days,
            models_unused_days,
            builds_unused_days,
            dry_run,
        } => {
            // A config that cannot be read protects no model's cache.
            let models = harness::runs::config::BenchConfig::load(&config)
                .map(|c| c.model_files())
                .unwrap_or_default();
            let policy = harness::results::retention::RetentionPolicy {
                keep_runs,
                keep_days,
                models_unused_days,
                builds_unused_days,
                dry_run,
            };
            let done = harness::results::retention::prune(
                &results,
                &harness::builds::build::workspace_root(),
                &models,
                &policy,
            )?;
            let verb = if dry_run { "would remove" } else { "removed" };
            for dir in done
                .removed_runs
                .iter()
                .chain(&done.removed_models)
                .chain(&done.removed_builds)
            {
                println!("{verb} {}", dir.display());
            }
            for (run, why) in &done.kept_runs {
                println!("kept {run}: {}", why.join("; "));
            }
            println!("{}{done}", if dry_run { "dry run: " } else { "" });
            Ok(ExitCode::SUCCESS)
        }
        Command::Report { results, out } => {
            let site = out.unwrap_or_else(|| results.join("site"));
            let started = std::time::Instant::now();
            let report = harness::results::report::write_report(&results, &site)?;
            println!(
                "{}: latest run {}{}, {} confirmed and {} suspect regressions, {} trend plots ({:.1} s)",
                report.index.display(),
                report.latest_run,
                report
                    .compared_with
                    .map(|p| format!(" against {p}"))
                    .unwrap_or_default(),
                report.confirmed,
                report.suspects,
                report.trend_plots,
                started.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Import {
            source:
                ImportSource::LlamaBench {
                    file,
                    board,
                    model,
                    results,
                },
        } => {
            let imported = harness::results::import::import_llama_bench(
                &file,
                &results,
                &board,
                model.as_deref(),
            )?;
            harness::results::render::render_run(&imported.run_dir)?;
            harness::results::history::History::open(&results)?;
            println!(
                "{} llama-bench rows imported into {}",
                imported.rows,
                imported.run_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Plot { run_dir, only } => {
            let rendered = harness::results::render::render_selected(&run_dir, &only)
                .with_context(|| format!("redrawing {}", run_dir.display()))?;
            println!("{}", rendered.tables);
            println!(
                "{} plots in {}",
                rendered.plots.len(),
                run_dir.join("plots").display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The report's browser test needs chromium; where it cannot be installed
/// the test says so and is skipped, so this never stops set-up.
fn ensure_browser() {
    if let Err(e) = bootstrap::ensure(&[bootstrap::Need::Browser]) {
        eprintln!("setup: no headless browser ({e}); the report's browser test will be skipped");
    }
}

/// Prints a comparison in `format` (table, md, json, junit), the verdict
/// line on stderr for the machine formats, and appends the markdown to a
/// GitHub Actions step summary when there is one.
fn print_comparison(
    comparison: &harness::results::compare::Comparison,
    format: &str,
) -> Result<()> {
    let text = match format {
        "md" => comparison.to_markdown(),
        "json" => comparison.to_json(),
        "junit" => comparison.to_junit(),
        _ => comparison.to_table(),
    };
    println!("{text}");
    if format != "table" {
        eprintln!("{}", comparison.verdict_line());
    }
    if let Some(summary) = std::env::var_os("GITHUB_STEP_SUMMARY") {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&summary)
            .and_then(|mut f| f.write_all(comparison.to_markdown().as_bytes()))
            .with_context(|| {
                format!(
                    "appending to $GITHUB_STEP_SUMMARY ({})",
                    summary.to_string_lossy()
                )
            })?;
    }
    Ok(())
}

/// The build `--build` names, prepared for cargo (a build that is not
/// `default` needs the config only when it names one of its `[builds]`).
fn prepared_build(
    workspace: &std::path::Path,
    config: &std::path::Path,
    build: &str,
) -> Result<harness::builds::llama_source::PreparedSource> {
    let config = if config.exists() || build != "default" {
        harness::runs::config::BenchConfig::load(config)?
    } else {
        harness::runs::config::BenchConfig::parse("", config)?
    };
    let (name, spec) = config.build(build)?;
    let base = config
        .source
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf();
    let source = harness::builds::llama_source::prepare(workspace, &name, &spec, &base)?;
    println!(
        "build `{name}`: llama.cpp {}{}",
        source.identity.label(),
        harness::runs::session::lacks_note(&source)
    );
    Ok(source)
}

fn parse_builder(name: &str) -> Result<harness::builds::build::Builder> {
    match name {
        "cargo" => Ok(harness::builds::build::Builder::Cargo),
        "cross" => Ok(harness::builds::build::Builder::Cross),
        other => anyhow::bail!("unknown builder `{other}` (known: cargo, cross)"),
    }
}

/// The first `cpu MHz` of /proc/cpuinfo, in GHz.
fn cpu_ghz() -> Option<f64> {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix("cpu MHz")?
                .split(':')
                .nth(1)?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map(|mhz| mhz / 1000.0)
}
