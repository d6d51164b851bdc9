//! Prints how long `compare` takes on two runs the size of the `full`
//! kernel matrix (14 types x 18 shapes x 3 batches x 3 thread counts =
//! 2268 cells, 10 repetitions each), and how long rebuilding the history
//! index takes from 365 nightly run directories (a year of `quick`-sized
//! runs: 200 cells, 10 repetitions each), and how long a nightly's
//! `compare previous latest` takes on that history: noise floors from the
//! last same-build runs, the comparison and its persistence check.
//!
//! `cargo run --release -p harness --example history_at_scale [work dir]`
//! (default: a temporary folder, removed afterwards).

use harness::results::compare::{compare, CompareSettings};
use harness::results::history::History;
use harness::results::run_dir::RunData;
use harness::runs::manifest::{BoardOutcome, HostInfo, RunManifest, Versions};
use std::path::Path;
use std::time::Instant;
use wire::files::{write_json, CsvAppender, KERNEL_ROWS_FILE, MANIFEST_FILE, SAMPLES_FILE};
use wire::rows::{example_row, SampleRow};

/// A run directory with `cells` kernel rows and `reps` repetitions each,
/// timings drawn around 100 us with a per-run drift.
fn fake_run(dir: &Path, run_id: &str, day: usize, cells: usize, reps: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rows = CsvAppender::open(&dir.join(KERNEL_ROWS_FILE)).unwrap();
    let mut samples = CsvAppender::open(&dir.join(SAMPLES_FILE)).unwrap();
    for c in 0..cells {
        let mut row = example_row(&format!("shape{}/T{}/n1/t{}", c / 9, c % 9, c % 3));
        row.run_id = run_id.to_string();
        let base = 100_000.0 * (1.0 + (c % 17) as f64 / 10.0) * (1.0 + (day % 7) as f64 / 1000.0);
        row.median_ns = Some(base);
        rows.append(&row).unwrap();
        for r in 0..reps {
            samples
                .append(&SampleRow {
                    run_id: run_id.to_string(),
                    board: row.board.clone(),
                    cell_id: row.cell_id.clone(),
                    // Five invocations, as a real board's default.
                    repetition: (r / 5) as u32,
                    invocation: (r % 5) as u32,
                    round: (r % 5) as u32,
                    ns: (base
                        * (1.0 + ((r * 7919 + c) % 13) as f64 / 400.0)
                        * (1.0 + (r % 5) as f64 / 100.0)) as u64,
                })
                .unwrap();
        }
    }
    write_json(
        &dir.join(MANIFEST_FILE),
        &RunManifest {
            run_id: run_id.to_string(),
            started_at: format!(
                "2026-{:02}-{:02}T02:17:00Z",
                1 + day / 31 % 12,
                1 + day % 28
            ),
            finished_at: None,
            matrix: "quick".into(),
            matrices: Vec::new(),
            config_path: "bench.toml".into(),
            seed: 42,
            git_commit: format!("{:07x}", 0xabc0000 + day),
            target: "local".into(),
            versions: Versions {
                quantbench: "0".into(),
                llama_cpp_sys_2: "0".into(),
                rustc: "0".into(),
                agent_builds: Vec::new(),
            },
            host: HostInfo::current(),
            boards: vec![BoardOutcome {
                board: "local".into(),
                ..Default::default()
            }],
            resumed_at: Vec::new(),
            rejected_rows: Vec::new(),
        },
    )
    .unwrap();
}

fn main() {
    let temp = tempfile::tempdir().unwrap();
    let root = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| temp.path().to_path_buf());

    let full = root.join("full");
    fake_run(&full.join("a"), "a", 0, 2268, 10);
    fake_run(&full.join("b"), "b", 1, 2268, 10);
    let started = Instant::now();
    let a = RunData::load(&full.join("a")).unwrap();
    let b = RunData::load(&full.join("b")).unwrap();
    let loaded = started.elapsed();
    let cmp = compare(&a, &b, &CompareSettings::default()).unwrap();
    println!(
        "compare, two full-matrix runs (2268 cells x 10 reps): load {:.2} s + compare {:.2} s; {}",
        loaded.as_secs_f64(),
        (started.elapsed() - loaded).as_secs_f64(),
        cmp.verdict_line()
    );

    let year = root.join("year");
    let made = Instant::now();
    for day in 0..365 {
        let id = format!("2026{day:04}T021700Z-{:07x}", 0xabc0000 + day);
        fake_run(&year.join(&id), &id, day, 200, 10);
    }
    println!(
        "made 365 run directories in {:.1} s",
        made.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let (history, report) = History::open(&year).unwrap();
    println!(
        "history rebuilt from {} runs ({} added) in {:.2} s",
        report.total,
        report.added,
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let (_, report) = History::open(&year).unwrap();
    println!(
        "history up to date check ({} added) in {:.3} s",
        report.added,
        started.elapsed().as_secs_f64()
    );
    // A nightly's `compare previous latest`: floors from the history, the
    // comparison, and the second look against the run before the base.
    let started = Instant::now();
    let runs = history.runs().unwrap();
    let latest = RunData::load(&runs[runs.len() - 1].dir).unwrap();
    let previous = RunData::load(&runs[runs.len() - 2].dir).unwrap();
    let (floors, _) = harness::results::noise::floors_for(&year, Some(&history), &latest);
    let floors_time = started.elapsed();
    let settings = CompareSettings {
        noise_floors: floors,
        ..CompareSettings::default()
    };
    let cmp = harness::results::persistence::compare_and_confirm(
        &history,
        &previous,
        &latest,
        &settings,
        &harness::results::persistence::ConfirmAgainst::PreviousOfBase,
    )
    .unwrap();
    println!(
        "compare previous latest on the year: floors for {} cells from the history in {:.2} s, compare and persistence check in {:.2} s; {}",
        settings.noise_floors.len(),
        floors_time.as_secs_f64(),
        (started.elapsed() - floors_time).as_secs_f64(),
        cmp.verdict_line()
    );
    let started = Instant::now();
    let points = history
        .trend(&wire::rows::CellKey {
            board: "local".into(),
            kind: "kernel".into(),
            cell_id: "shape0/T0/n1/t0".into(),
            settings: "llm-like/mmap/repack".into(),
        })
        .unwrap();
    println!(
        "one cell's trend over {} runs read in {:.3} s",
        points.len(),
        started.elapsed().as_secs_f64()
    );
}
