//! End to end on the `local` target: the real CLI builds the real agent,
//! which measures real GGML kernels; we check what lands on disk.

mod common;
use common::xtask;

use std::process::Output;
use wire::files::read_csv;
use wire::rows::{CellStatus, InvocationRow, KernelRow, SampleRow};

const TINY_MATRIX: &str = r#"
[matrices.tiny]
types = ["F32", "Q8_0", "Q4_0", "Q4_K"]
shapes = ["gemma3-1b.attn_kv", "llama3.2-1b.attn_kv"]
batches = [1, 2]
threads = [1, "all"]
warmup = 1
min_reps = 3
min_time_ms = 5
max_time_ms = 200
"#;

#[test]
fn bench_local_writes_rows_samples_manifest_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bench.toml"), TINY_MATRIX).unwrap();
    let out = xtask(
        dir.path(),
        &["bench", "--target", "local", "--matrix", "tiny"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("| Q4_0 | 4.50 |"),
        "summary table printed:\n{stdout}"
    );

    let runs: Vec<_> = std::fs::read_dir(dir.path().join("results"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(runs.len(), 1);
    assert!(dir.path().join("results/history.sqlite").exists());
    let run_dir = runs[0].clone();
    let rows: Vec<KernelRow> = read_csv(&run_dir.join("kernels.csv")).unwrap();
    assert_eq!(rows.len(), 2 * 4 * 2 * 2, "one row per cell");
    for row in &rows {
        assert!(!row.emulated && row.board == "local");
        assert_eq!(row.agent_build.len(), 12);
        if row.ty == "Q4_K" && row.k == 1152 {
            assert_eq!(row.status, CellStatus::Unsupported, "{row:?}");
            assert!(row.note.contains("multiple of 256"));
        } else {
            assert_eq!(row.status, CellStatus::Ok, "{row:?}");
            assert!(row.repetitions >= 3);
            assert!(row.median_ns.unwrap() > 0.0 && row.gflops.unwrap() > 0.0);
            assert!(row.bandwidth_share.unwrap() > 0.0);
            assert!(row.nmse.unwrap() < 0.05, "{row:?}");
            // Weights sit where llama.cpp's default (mmap) load puts them:
            // read in place from a mapped file, or in the repack buffer.
            let placement = &row.weight_placement;
            if row.kernel_path.starts_with("CPU_REPACK") {
                assert!(placement.starts_with("repack/"), "{row:?}");
            } else {
                assert!(row.kernel_path.starts_with("CPU_Mapped"), "{row:?}");
                assert!(placement.starts_with("mmap/4k"), "{row:?}");
            }
        }
    }
    let samples: Vec<SampleRow> = read_csv(&run_dir.join("samples.csv")).unwrap();
    let ok_reps: u32 = rows.iter().map(|r| r.repetitions).sum();
    assert_eq!(samples.len() as u32, ok_reps, "every repetition kept");
    for file in [
        "run.json",
        "summary.md",
        "boards/local/probe.json",
        "boards/local/job-tiny.json",
    ] {
        assert!(run_dir.join(file).exists(), "{file}");
    }
    for plot in [
        "throughput_batch1",
        "speedup_vs_f32",
        "thread_scaling",
        "nmse_vs_bits",
        "bandwidth",
    ] {
        for ext in ["png", "svg"] {
            let path = run_dir.join("plots").join(format!("{plot}.{ext}"));
            assert!(
                std::fs::metadata(&path)
                    .map(|m| m.len() > 1000)
                    .unwrap_or(false),
                "{path:?}"
            );
        }
    }
    let svg = std::fs::read_to_string(run_dir.join("plots/speedup_vs_f32.svg")).unwrap();
    assert!(
        svg.contains("real hardware") && svg.contains("local"),
        "title names board and kind"
    );

    // `plot` redraws from the files alone.
    std::fs::remove_dir_all(run_dir.join("plots")).unwrap();
    let out = xtask(dir.path(), &["plot", run_dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(run_dir.join("plots/bandwidth.png").exists());
}

#[test]
fn codebook_types_are_measured_beside_ggml_types_into_rows_summary_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bench.toml"),
        "[matrices.cb]\ntypes = [\"F32\", \"Q4_0\", \"SQ4\", \"SQ3+S1\", \"LUT2\", \"LUT3\", \"IQ2_XXS+imatrix\"]\nversus = [\"Q4_0\"]\nshapes = [\"llama3.2-1b.attn_kv\"]\nbatches = [1, 4]\nthreads = [\"all\"]\nwarmup = 1\nmin_reps = 3\nmin_time_ms = 5\nmax_time_ms = 200\n",
    )
    .unwrap();
    let out = xtask(
        dir.path(),
        &["bench", "--target", "local", "--matrix", "cb"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run_dir = common::only_run_dir(dir.path());
    let rows: Vec<KernelRow> = read_csv(&run_dir.join("kernels.csv")).unwrap();
    assert_eq!(rows.len(), 14);
    // Every cell has its quantizer's time, made once per shape and type.
    for row in &rows {
        assert_eq!(row.status, CellStatus::Ok, "{row:?}");
        let twin = rows
            .iter()
            .find(|r| r.ty == row.ty && r.n != row.n)
            .unwrap();
        assert!(row.quantize_ms.unwrap() > 0.0, "{row:?}");
        assert_eq!(row.quantize_ms, twin.quantize_ms, "{row:?}");
    }
    for row in rows
        .iter()
        .filter(|r| r.ty.starts_with("SQ") || r.ty.starts_with("LUT"))
    {
        assert_eq!(row.status, CellStatus::Ok, "{row:?}");
        // Every column a GGML type has.
        let family = if row.ty.starts_with("SQ") {
            "codebook-"
        } else {
            "lut-"
        };
        assert!(row.kernel_path.starts_with(family), "{row:?}");
        assert!(row.weight_placement.starts_with("heap/"), "{row:?}");
        assert!(row.repetitions >= 3 && row.median_ns.unwrap() > 0.0);
        assert!(row.gflops.unwrap() > 0.0 && row.weight_gbps.unwrap() > 0.0);
        assert!(row.bandwidth_share.unwrap() > 0.0);
        // The quantization's error (a wrong plane or table is 1 and more).
        let bound = if row.ty == "LUT2" { 0.15 } else { 0.05 };
        assert!(row.nmse.unwrap() < bound, "{row:?}");
    }
    let of = |ty: &str| rows.iter().find(|r| r.ty == ty && r.n == 4).unwrap();
    // Bits as stored: SQ4 with its block scales and codebooks, SQ3 with
    // 1% of the weights kept exactly.
    assert!(
        (4.3..4.5).contains(&of("SQ4").bits_per_weight),
        "{:?}",
        of("SQ4")
    );
    assert!(
        (3.6..3.8).contains(&of("SQ3+S1").bits_per_weight),
        "{:?}",
        of("SQ3+S1")
    );
    assert!(of("SQ4").nmse < of("Q4_0").nmse);
    // GGML refuses to make IQ2_XXS without an importance matrix: this one
    // was made with the activations' (GGML's own i-quant kernel times it).
    let iq2 = of("IQ2_XXS+imatrix");
    assert_eq!(iq2.bits_per_weight, 2.0625, "{iq2:?}");
    assert!(iq2.kernel_path.ends_with("+act:q8_K"), "{iq2:?}");
    assert!(iq2.nmse.unwrap() < 0.3, "{iq2:?}");
    // The planes and the figures: LUT2 Q2_K's 2.625 (4-bit figures per
    // 16, 4 bytes per 256), LUT3 6-bit figures per 32 and 4 bytes a row,
    // under Q3_K's 3.4375.
    for (ty, bits) in [("LUT2", 2.625), ("LUT3", 3.375 + 32.0 / 2048.0)] {
        assert!((of(ty).bits_per_weight - bits).abs() < 1e-9, "{:?}", of(ty));
    }
    let summary = std::fs::read_to_string(run_dir.join("summary.md")).unwrap();
    assert!(summary.contains("| SQ3+S1 |"), "{summary}");
    // `versus`: each other type against Q4_0 in the same cell, its ratio
    // inside its interval and what the interval says. (Which is faster
    // is the machine's business: the test checks the figures, not the
    // timings.)
    assert!(summary.contains("### local against Q4_0"), "{summary}");
    #[derive(serde::Deserialize)]
    struct Invocation {
        cell_id: String,
        median_ns: f64,
    }
    let invocations: Vec<Invocation> = read_csv(&run_dir.join("invocations.csv")).unwrap();
    for ty in ["F32", "SQ4", "SQ3+S1", "LUT2", "LUT3", "IQ2_XXS+imatrix"] {
        for n in [1, 4] {
            let line = summary
                .lines()
                .find(|l| {
                    l.starts_with(&format!("| llama3.2-1b.attn_kv | {n} | "))
                        && l.contains(&format!(" | {ty} | "))
                })
                .unwrap_or_else(|| panic!("{ty} n{n} against Q4_0:\n{summary}"));
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // The quantizer's time, as the row has it.
            let quantize_ms: f64 = cells[7].parse().unwrap();
            let row = rows.iter().find(|r| r.ty == ty && r.n == n).unwrap();
            assert!(
                (quantize_ms - row.quantize_ms.unwrap()).abs() <= 0.05,
                "{line}"
            );
            let ratio: f64 = cells[9].parse().unwrap();
            let (low, high) = cells[10]
                .trim_start_matches('[')
                .trim_end_matches(']')
                .split_once(", ")
                .map(|(l, h)| (l.parse::<f64>().unwrap(), h.parse::<f64>().unwrap()))
                .unwrap();
            assert!(low <= ratio && ratio <= high, "{line}");
            // The ratio of the geometric means of the two cells'
            // invocation medians: the round effects taken out shift both
            // cells alike (each is measured once in every round), so they
            // leave the ratio as it is. Shown with two decimals.
            let geomean = |cell: &str| {
                let logs: Vec<f64> = invocations
                    .iter()
                    .filter(|i| i.cell_id == cell)
                    .map(|i| i.median_ns.ln())
                    .collect();
                (logs.iter().sum::<f64>() / logs.len() as f64).exp()
            };
            let cell = |ty: &str| {
                rows.iter()
                    .find(|r| r.ty == ty && r.n == n)
                    .unwrap()
                    .cell_id
                    .clone()
            };
            let expected = geomean(&cell(ty)) / geomean(&cell("Q4_0"));
            assert!(
                (ratio - expected).abs() <= 0.006,
                "{line} against {expected}"
            );
            let reading = if high < 1.0 {
                "faster"
            } else if low > 1.0 {
                "slower"
            } else {
                "no difference"
            };
            assert!(cells[11].starts_with(reading), "{line}");
        }
    }
    let plot = std::fs::read_to_string(run_dir.join("plots/nmse_vs_bits.svg")).unwrap();
    assert!(plot.contains("SQ4") && plot.contains("SQ3+S1"));
}

fn assert_one_clear_error(out: &Output, expected: &[&str]) {
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line, got:\n{stderr}");
    for word in expected {
        assert!(
            lines[0].contains(word),
            "`{word}` missing from: {}",
            lines[0]
        );
    }
}

#[test]
fn bad_configs_fail_fast_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            "[matrices.m]\ntypes=[\"Q9_0\"]\nshapes=[\"all\"]\n",
            &["--matrix", "m"],
            &["bench.toml", "unknown GGML type `Q9_0`", "Q4_K"],
        ),
        (
            "[matrices.m]\ntypes=[\"SQ4+S12\"]\nshapes=[\"all\"]\n",
            &["--matrix", "m"],
            &["bench.toml", "`SQ4+S12`", "(0, 10]"],
        ),
        (
            "[matrices.m]\ntypes=[\"SQ5\"]\nshapes=[\"all\"]\n",
            &["--matrix", "m"],
            &["bench.toml", "`SQ5`", "SQ4 or SQ3"],
        ),
        (
            "[matrices.m]\ntypes=[\"F32\"]\nshapes=[\"llama9.attn\"]\n",
            &["--matrix", "m"],
            &["unknown shape `llama9.attn`"],
        ),
        (
            "[matrices.m]\ntypes=[\"F32\"]\nshapes=[\"all\"]\n",
            &["--matrix", "nope"],
            &["no matrix named `nope`", "m"],
        ),
        (
            "[matrices.m\ntypes=[\"F32\"]\n",
            &["--matrix", "m"],
            &["bench.toml", "line 1"],
        ),
        (
            "",
            &["--target", "mars", "--matrix", "quick"],
            &["no matrix named `quick`"],
        ),
    ];
    for (config, args, expected) in cases {
        std::fs::write(dir.path().join("bench.toml"), config).unwrap();
        let mut all = vec!["bench"];
        all.extend_from_slice(args);
        assert_one_clear_error(&xtask(dir.path(), &all), expected);
    }
    // A missing config file names the file.
    std::fs::remove_file(dir.path().join("bench.toml")).unwrap();
    assert_one_clear_error(&xtask(dir.path(), &["bench"]), &["bench.toml"]);
    // `plot` on a folder that is not a run.
    assert_one_clear_error(&xtask(dir.path(), &["plot", "."]), &["not a run directory"]);
}

#[test]
fn an_agent_past_its_deadline_is_stopped_and_its_finished_rows_kept() {
    let dir = tempfile::tempdir().unwrap();
    // Four cells of at least 1.5 s each against a 4 s deadline.
    std::fs::write(
        dir.path().join("bench.toml"),
        r#"
[matrices.long]
types = ["F32", "Q8_0", "Q4_0", "Q5_0"]
shapes = ["llama3.2-1b.attn_kv"]
batches = [1]
threads = [1]
warmup = 0
min_reps = 1000000
min_time_ms = 1500
max_time_ms = 1500
deadline_seconds = 4
invocations = 1
"#,
    )
    .unwrap();
    let started = std::time::Instant::now();
    let out = xtask(
        dir.path(),
        &["bench", "--target", "local", "--matrix", "long"],
    );
    let all = common::text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "stopped at the deadline, not after every cell"
    );
    let rows: Vec<KernelRow> =
        read_csv(&common::only_run_dir(dir.path()).join("kernels.csv")).unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    let ok = rows.iter().filter(|r| r.status == CellStatus::Ok).count();
    assert!((1..4).contains(&ok), "finished cells kept: {rows:?}");
    let stopped = rows
        .iter()
        .filter(|r| {
            r.note.contains("agent died in this cell") && r.note.contains("deadline of 4 s")
        })
        .count();
    assert_eq!(stopped, 1, "{rows:?}");
}

#[test]
// The host is killed and waited for on every path; clippy cannot see
// through the loop's `break`.
#[allow(clippy::zombie_processes)]
fn a_local_run_whose_host_was_killed_is_resumed_without_measuring_a_cell_twice() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bench.toml"),
        r#"
[matrices.long]
types = ["F32", "Q8_0", "Q4_0", "Q5_0"]
shapes = ["llama3.2-1b.attn_kv"]
batches = [1]
threads = [1]
warmup = 0
min_reps = 1000000
min_time_ms = 1000
max_time_ms = 1000
invocations = 1
"#,
    )
    .unwrap();
    let mut host = std::process::Command::new(env!("CARGO_BIN_EXE_quantbench"))
        .current_dir(dir.path())
        .args(["bench", "--target", "local", "--matrix", "long"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed (SIGKILL) once two cells' rows are on the host's disk.
    let started = std::time::Instant::now();
    let rows_file = || {
        std::fs::read_dir(dir.path().join("results"))
            .ok()?
            .flatten()
            .map(|e| e.path().join("boards/local/jobs/long/kernels.csv"))
            .find(|p| p.exists())
    };
    let before: Vec<KernelRow> = loop {
        if started.elapsed().as_secs() >= 120 {
            let _ = host.kill();
            let _ = host.wait();
            panic!("no rows appeared");
        }
        if let Some(rows) = rows_file().and_then(|p| read_csv::<KernelRow>(&p).ok()) {
            if rows.len() >= 2 {
                host.kill().unwrap();
                host.wait().unwrap();
                break read_csv(&rows_file().unwrap()).unwrap();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(before.len() < 4, "killed before the end: {before:?}");
    // The agent dies too, in the middle of writing a row: its file ends in
    // a line cut short (as on a full disk).
    kill_processes(dir.path(), "quantbench-agent");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(rows_file().unwrap())
        .unwrap();
    std::io::Write::write_all(&mut file, b"run-x,local,false,llama3.2-1b.attn_kv/Q5").unwrap();
    drop(file);

    let out = xtask(dir.path(), &["bench", "--resume", "latest"]);
    assert!(out.status.success(), "{}", common::text(&out));
    // The cut line, ended by the resumed agent, is named and skipped once.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("not a row, skipped").count(), 1, "{stderr}");
    assert!(
        stderr.contains("boards/local/jobs/long/kernels.csv: line "),
        "{stderr}"
    );
    let run_dir = common::only_run_dir(dir.path());
    let rows: Vec<KernelRow> = read_csv(&run_dir.join("kernels.csv")).unwrap();
    let mut ids: Vec<&str> = rows.iter().map(|r| r.cell_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((rows.len(), ids.len()), (4, 4), "{rows:?}");
    assert!(rows.iter().all(|r| r.status == CellStatus::Ok), "{rows:?}");
    for kept in &before {
        assert!(rows.contains(kept), "measured again: {kept:?}");
    }
    // A resume names the run it continues; a wrong reference is one line.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("run.json")).unwrap()).unwrap();
    assert_eq!(manifest["resumed_at"].as_array().unwrap().len(), 1);

    // A board that writes rows for another board (hiding a regression
    // there) or another run: the merge keeps only its own, and run.json
    // says what was left out.
    let mut forged = wire::files::CsvAppender::open(&rows_file().unwrap()).unwrap();
    let mut other_board = rows[0].clone();
    other_board.board = "pi5".into();
    let mut other_run = rows[1].clone();
    other_run.run_id = "20990101T000000Z-other".into();
    forged.append(&other_board).unwrap();
    forged.append(&other_run).unwrap();
    drop(forged);
    let out = xtask(dir.path(), &["bench", "--resume", "latest"]);
    assert!(out.status.success(), "{}", common::text(&out));
    let merged: Vec<KernelRow> = read_csv(&run_dir.join("kernels.csv")).unwrap();
    assert_eq!(merged, rows, "only the board's own rows of this run");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("run.json")).unwrap()).unwrap();
    let rejected = manifest["rejected_rows"].to_string();
    assert!(
        rejected.contains("2 rows claiming board `pi5`")
            && rejected.contains("20990101T000000Z-other"),
        "{manifest}"
    );
    let out = xtask(dir.path(), &["bench", "--resume", "no-such-run"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--resume no-such-run: not a run directory"),
        "{stderr}"
    );
}

/// A matrix of three single-thread cells measured in `invocations`
/// processes, each invocation `time_ms` long.
fn rounds_matrix(invocations: u32, time_ms: u64) -> String {
    format!(
        r#"
[matrices.rounds]
types = ["F32", "Q8_0", "Q4_0"]
shapes = ["llama3.2-1b.attn_kv"]
batches = [1]
threads = [1]
warmup = 1
min_reps = 1000000
min_time_ms = {time_ms}
max_time_ms = {time_ms}
invocations = {invocations}
"#
    )
}

/// SIGKILLs every process of this test (working directory `dir`, where
/// the CLI and its agents run) whose command line contains `word`; true
/// when there was one.
fn kill_processes(dir: &std::path::Path, word: &str) -> bool {
    let mut killed = false;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let in_dir = std::fs::read_link(entry.path().join("cwd"))
            .map(|cwd| cwd.starts_with(dir))
            .unwrap_or(false);
        if in_dir && cmdline.contains(word) {
            killed |= std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
        }
    }
    killed
}

/// The records `invocations.csv` holds so far in the run under `dir`.
fn invocation_records(dir: &std::path::Path) -> Vec<InvocationRow> {
    std::fs::read_dir(dir.join("results"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("boards/local/jobs/rounds/invocations.csv"))
        .find(|p| p.exists())
        .map(|p| wire::files::read_csv_lenient(&p))
        .unwrap_or_default()
}

#[test]
fn a_killed_invocation_fails_its_cell_and_every_other_cell_gets_all_its_invocations() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bench.toml"), rounds_matrix(4, 150)).unwrap();
    let host = std::process::Command::new(env!("CARGO_BIN_EXE_quantbench"))
        .current_dir(dir.path())
        .args(["bench", "--target", "local", "--matrix", "rounds"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // SIGKILL the round's child process once an invocation of round 1 is
    // on disk: the cell it is measuring then has no invocation 2.
    let started = std::time::Instant::now();
    let mut killed = false;
    while !killed && started.elapsed().as_secs() < 120 {
        if invocation_records(dir.path()).iter().any(|r| r.round == 1) {
            killed = kill_processes(dir.path(), "measure-round");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = host.wait_with_output().unwrap();
    assert!(killed, "no round-1 child to kill");
    assert!(!out.status.success(), "a cell failed");
    let run = common::only_run_dir(dir.path());
    let rows: Vec<KernelRow> = read_csv(&run.join("kernels.csv")).unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    let failed: Vec<&KernelRow> = rows
        .iter()
        .filter(|r| r.status == CellStatus::Failed)
        .collect();
    assert_eq!(failed.len(), 1, "{rows:?}");
    assert!(
        failed[0].note.contains("died in this cell") && failed[0].note.contains("SIGKILL"),
        "{}",
        failed[0].note
    );
    for row in rows.iter().filter(|r| r.status == CellStatus::Ok) {
        assert_eq!(row.invocations, 4, "{row:?}");
    }
    // Every invocation once, in rounds whose order is shuffled.
    let records: Vec<InvocationRow> = read_csv(&run.join("invocations.csv")).unwrap();
    let mut seen: Vec<(&str, u32)> = records
        .iter()
        .map(|r| (r.cell_id.as_str(), r.invocation))
        .collect();
    seen.sort();
    let before = seen.len();
    seen.dedup();
    assert_eq!(before, seen.len(), "an invocation recorded twice");
    let samples: Vec<SampleRow> = read_csv(&run.join("samples.csv")).unwrap();
    assert!(samples.iter().any(|s| s.invocation == 3 && s.round >= 3));
}

#[test]
// The host is killed and waited for on every path.
#[allow(clippy::zombie_processes)]
fn a_run_killed_between_rounds_is_resumed_and_measures_only_the_missing_invocations() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bench.toml"), rounds_matrix(4, 150)).unwrap();
    let mut host = std::process::Command::new(env!("CARGO_BIN_EXE_quantbench"))
        .current_dir(dir.path())
        .args(["bench", "--target", "local", "--matrix", "rounds"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Host, agent and its child all SIGKILLed once four invocations are on
    // disk (round 1 under way): no cell has its row yet.
    let started = std::time::Instant::now();
    loop {
        assert!(started.elapsed().as_secs() < 120, "no invocations appeared");
        if invocation_records(dir.path()).len() >= 4 {
            host.kill().unwrap();
            host.wait().unwrap();
            kill_processes(dir.path(), "quantbench-agent");
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let before = invocation_records(dir.path());
    assert!(before.len() < 12, "killed before the end: {}", before.len());

    let out = xtask(dir.path(), &["bench", "--resume", "latest"]);
    assert!(out.status.success(), "{}", common::text(&out));
    let run = common::only_run_dir(dir.path());
    let rows: Vec<KernelRow> = read_csv(&run.join("kernels.csv")).unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(
        rows.iter()
            .all(|r| r.status == CellStatus::Ok && r.invocations == 4),
        "{rows:?}"
    );
    let records: Vec<InvocationRow> = read_csv(&run.join("invocations.csv")).unwrap();
    for cell in rows.iter().map(|r| &r.cell_id) {
        let mut numbers: Vec<u32> = records
            .iter()
            .filter(|r| &r.cell_id == cell)
            .map(|r| r.invocation)
            .collect();
        numbers.sort();
        assert_eq!(numbers, vec![0, 1, 2, 3], "{cell}");
    }
    for kept in &before {
        assert!(records.contains(kept), "measured again: {kept:?}");
    }
}

#[test]
fn a_cpu_hog_beside_the_run_marks_its_cells_disturbed_and_compare_does_not_judge_them() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bench.toml"), rounds_matrix(3, 100)).unwrap();
    common::bench_local(dir.path(), "rounds");
    // A neighbour spinning on a core for the whole second run.
    let mut hog = std::process::Command::new("sh")
        .args(["-c", "while :; do :; done"])
        .spawn()
        .unwrap();
    let out = xtask(
        dir.path(),
        &["bench", "--target", "local", "--matrix", "rounds"],
    );
    hog.kill().unwrap();
    hog.wait().unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    let out = xtask(
        dir.path(),
        &["compare", "previous", "latest", "--format", "json"],
    );
    assert!(out.status.success(), "{}", common::text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let latest: Vec<KernelRow> = {
        let mut runs: Vec<_> = std::fs::read_dir(dir.path().join("results"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        runs.sort();
        read_csv(&runs[1].join("kernels.csv")).unwrap()
    };
    for row in &latest {
        assert!(
            row.disturbed && row.other_cpu_cores.unwrap_or(0.0) > 0.5,
            "{row:?}"
        );
    }
    for cell in json["cells"].as_array().unwrap() {
        assert_eq!(cell["verdict"], "disturbed", "{cell}");
        assert!(
            cell["notes"]
                .to_string()
                .contains("another process used the CPU"),
            "{cell}"
        );
    }
}

#[test]
fn adaptive_rounds_measure_imprecise_cells_until_the_budget_ends_and_a_budget_too_small_is_refused()
{
    // Two matrices of two 20 ms cells, two invocations each: `loose` asks
    // a precision any two invocations reach, `strict` one none reaches, so
    // its cells get rounds until the 12 s budget is spent.
    let matrix = |name: &str, precision: f64, max_invocations: u32, min_time_ms: u64| {
        format!(
            r#"
[matrices.{name}]
types = ["F32", "Q8_0"]
shapes = ["llama3.2-1b.attn_kv"]
batches = [1]
threads = [1]
warmup = 1
min_reps = 1000000
min_time_ms = {min_time_ms}
max_time_ms = {min_time_ms}
invocations = 2
max_invocations = {max_invocations}
precision = {precision:e}
"#
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let config = [
        matrix("loose", 1e300, 6, 20),
        matrix("strict", 1e-9, 1000, 20),
        matrix("long", 0.02, 4, 10_000),
    ]
    .concat();
    std::fs::write(dir.path().join("bench.toml"), config).unwrap();
    let out = xtask(
        dir.path(),
        &[
            "bench",
            "--target",
            "local",
            "--matrix",
            "loose,strict",
            "--budget",
            "12s",
        ],
    );
    assert!(out.status.success(), "{}", common::text(&out));
    let run = common::only_run_dir(dir.path());
    let rows: Vec<KernelRow> = read_csv(&run.join("kernels.csv")).unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    let (loose, strict): (Vec<&KernelRow>, Vec<&KernelRow>) = rows
        .iter()
        .partition(|r| r.run_id == rows[0].run_id && r.note.is_empty());
    assert_eq!(loose.len(), 2, "{rows:?}");
    for row in &loose {
        assert_eq!(row.invocations, 2, "precise after two: {row:?}");
        assert!(row.precision.is_some(), "{row:?}");
    }
    for row in &strict {
        assert!(
            row.invocations > 2 && row.invocations < 1000,
            "more rounds, stopped by the budget: {row:?}"
        );
        assert!(
            row.note.contains("short of the +-0.0% asked")
                && row.note.contains("--budget left no time"),
            "{}",
            row.note
        );
    }
    // Every invocation of a cell is in samples.csv with its round.
    let samples: Vec<SampleRow> = read_csv(&run.join("samples.csv")).unwrap();
    for row in &strict {
        let invocations: std::collections::BTreeSet<u32> = samples
            .iter()
            .filter(|s| s.cell_id == row.cell_id && s.board == row.board)
            .map(|s| s.invocation)
            .collect();
        assert!(invocations.len() as u32 >= row.invocations, "{row:?}");
    }

    // One invocation of every cell of `long` takes 2 x 10 s: a 5 s budget
    // is refused in one line after the agent's build lines, nothing
    // measured; a budget that is not a duration likewise, at once.
    let out = xtask(
        dir.path(),
        &[
            "bench", "--target", "local", "--matrix", "long", "--budget", "5s",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("rror")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    for word in ["--budget 5s is too small", "on board local", "at least 21s"] {
        assert!(errors[0].contains(word), "`{word}` in {}", errors[0]);
    }
    let runs = std::fs::read_dir(dir.path().join("results"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_dir())
        .count();
    assert_eq!(runs, 1, "the first run, nothing more");
    assert_one_clear_error(
        &xtask(
            dir.path(),
            &[
                "bench",
                "--target",
                "local",
                "--matrix",
                "long",
                "--budget",
                "5 minutes",
            ],
        ),
        &["--budget `5 minutes`", "45m"],
    );
}

/// `cycles`: each kernel's hot loop is found in the agents as they are
/// built (a renamed kernel, or a loop the compiler laid out otherwise than
/// its source says, fails here), llvm-mca's figures are per 32 weights,
/// and a local run's medians are set beside them as cycles at the given
/// clock. (Which figure is larger is the machine's business: not checked.)
#[cfg(target_arch = "x86_64")]
#[test]
fn cycles_finds_every_kernel_loop_for_a_pi5_and_the_host_and_sets_measured_cycles_beside() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bench.toml"),
        "[matrices.m]\ntypes = [\"Q4_0\", \"LUT2\", \"LUT3\", \"SQ4\", \"SQ3\"]\nshapes = [\"llama3.2-1b.attn_kv\"]\nbatches = [1]\nthreads = [1]\nwarmup = 1\nmin_reps = 3\nmin_time_ms = 5\nmax_time_ms = 200\nrepack = false\n",
    )
    .unwrap();
    common::bench_local(dir.path(), "m");
    let run_dir = common::only_run_dir(dir.path());
    let rows: Vec<KernelRow> = read_csv(&run_dir.join("kernels.csv")).unwrap();
    let run = run_dir.to_string_lossy().to_string();
    let out = xtask(
        dir.path(),
        &[
            "cycles",
            "--board",
            "local",
            "--measured",
            &run,
            "--ghz",
            "2",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}{}", common::text(&out));
    assert!(stdout.contains("model estimate"), "{stdout}");
    let cells = |stdout: &str, kernel: &str| -> Vec<String> {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {kernel} |")))
            .unwrap_or_else(|| panic!("{kernel}:\n{stdout}"))
            .split('|')
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .collect()
    };
    let number = |s: &str| s.parse::<f64>().unwrap_or_else(|_| panic!("{s}"));
    for (kernel, ty, path) in [
        ("LUT2 (ours, AVX2 vpshufb)", "LUT2", "lut-avx2"),
        ("LUT3 (ours, AVX2 vpshufb)", "LUT3", "lut-avx2"),
        ("SQ4 (ours, AVX2 vpshufb)", "SQ4", "codebook-avx2"),
        ("SQ3 (ours, AVX2 vpshufb)", "SQ3", "codebook-avx2"),
        ("Q4_0 (GGML vec_dot_q4_0_q8_0)", "Q4_0", "CPU_Mapped"),
    ] {
        let c = cells(&stdout, kernel);
        let (weights, per_iteration, per_32) = (number(&c[2]), number(&c[3]), number(&c[4]));
        assert!(per_iteration > 0.0, "{c:?}");
        // Both printed rounded: cycles an iteration to 2 decimals, per 32
        // weights to 3.
        let rounding = 0.005 * 32.0 / weights + 0.0005;
        assert!(
            (per_32 - per_iteration * 32.0 / weights).abs() <= rounding * 1.01,
            "{c:?}"
        );
        let row = rows
            .iter()
            .find(|r| r.ty == ty && r.kernel_path.starts_with(path))
            .unwrap_or_else(|| panic!("{ty} {path}: {rows:?}"));
        let expected = row.median_ns.unwrap() * 2.0 / ((row.m * row.k) as f64 / 32.0);
        let measured = number(c[5].strip_prefix("llama3.2-1b.attn_kv: ").unwrap());
        assert!(
            (measured - expected).abs() < 1e-3 * expected.max(1.0),
            "{c:?} vs {expected}"
        );
        assert!((number(&c[6]) - per_32 / measured).abs() < 0.006, "{c:?}");
    }
    let out = xtask(dir.path(), &["cycles", "--board", "pi5"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}{}", common::text(&out));
    let mut a76_is_a57 = true;
    for kernel in [
        "LUT2 (ours, NEON tbl + sdot)",
        "LUT3 (ours, NEON tbl + sdot)",
        "SQ4 (ours, NEON tbl + sdot)",
        "SQ3 (ours, NEON tbl + sdot)",
        "LUT2 (ours, NEON tbl + sadalp)",
        "LUT3 (ours, NEON tbl + sadalp)",
        "Q4_0 (GGML vec_dot_q4_0_q8_0)",
        "Q4_0 repacked 4x4 (GGML gemv_q4_0_4x4_q8_0)",
    ] {
        // Columns: the Neoverse N1's, LLVM's `cortex-a76`'s, the A57's.
        let c = cells(&stdout, kernel);
        let (n1, a76, a57) = (number(&c[4]), number(&c[6]), number(&c[8]));
        assert!(n1 > 0.0 && a57 > 0.0, "{c:?}");
        a76_is_a57 &= a76 == a57;
    }
    // The command refuses a model that is the A57's, and says when
    // LLVM's `cortex-a76` is.
    assert_eq!(
        stdout.contains("gives exactly its Cortex-A57 figures"),
        a76_is_a57,
        "{stdout}"
    );
}
