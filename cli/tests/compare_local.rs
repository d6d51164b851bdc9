//! `compare` and `history` end to end on real runs on `local`. Verdicts on
//! real timings depend on the machine, so the judged changes here are
//! injected into a copy of a real run (its repetitions slowed, its error
//! raised): what must be flagged is known exactly.

mod common;
use common::{bench_local, rewrite_csv, text, xtask};

use std::path::{Path, PathBuf};
use std::process::Command;
use wire::files::read_csv;
use wire::rows::{KernelRow, SampleRow};

const MATRICES: &str = r#"
[matrices.pair]
types = ["F32", "Q4_0"]
shapes = ["llama3.2-1b.attn_kv"]
batches = [1]
threads = [1]
warmup = 1
min_reps = 10
min_time_ms = 5
max_time_ms = 300

[matrices.other]
types = ["Q8_0"]
shapes = ["gemma3-1b.attn_kv"]
threads = [1]
min_reps = 3
min_time_ms = 1
"#;

fn runs(dir: &Path) -> Vec<PathBuf> {
    let mut runs: Vec<PathBuf> = std::fs::read_dir(dir.join("results"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    runs.sort();
    runs
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Makes a copy's timings the controlled ones, so its rows agree with
/// them: settled, undisturbed (another test's agent may have shared the
/// CPU with the real run).
fn controlled_rows(run: &Path) {
    rewrite_csv::<KernelRow>(&run.join("kernels.csv"), |r| {
        r.disturbed = false;
        r.settled = true;
        r.thermal_noisy = false;
    });
}

#[test]
fn injected_slowdown_and_error_rise_are_flagged_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bench.toml"), MATRICES).unwrap();
    bench_local(dir.path(), "pair");
    let measured = runs(dir.path())[0].clone();
    // Real timings on a shared 2-core machine are too noisy to judge
    // exactly, so both sides get the same controlled repetitions (ten,
    // 1000..1009 ns) in copies of the real run: two runs as before, then
    // one with Q4_0 40% slower and F32's output error doubled, then one
    // with Q4_0 still slow.
    let q4 = "llama3.2-1b.attn_kv/Q4_0/n1/t1";
    let f32 = "llama3.2-1b.attn_kv/F32/n1/t1";
    let earlier = dir.path().join("results/20991229T000000Z-earlier");
    let base = dir.path().join("results/20991230T000000Z-base");
    let new = dir.path().join("results/20991231T000000Z-injected");
    let again = dir.path().join("results/20991232T000000Z-again");
    for (copy, q4_factor) in [(&earlier, 10), (&base, 10), (&new, 14), (&again, 14)] {
        copy_dir(&measured, copy);
        rewrite_csv::<SampleRow>(&copy.join("samples.csv"), |s| {
            s.ns = (1000 + s.repetition as u64 % 10) * if s.cell_id == q4 { q4_factor } else { 10 }
                / 10;
        });
        controlled_rows(copy);
    }
    rewrite_csv::<KernelRow>(&new.join("kernels.csv"), |r| {
        if r.cell_id == f32 {
            r.nmse = Some(r.nmse.unwrap_or(1e-7).max(1e-7) * 2.0);
        }
    });
    let base_arg = base.to_str().unwrap();
    let new_arg = new.to_str().unwrap();

    let out = xtask(dir.path(), &["compare", base_arg, new_arg]);
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    let line_of = |table: &str, cell: &str| {
        table
            .lines()
            .find(|l| l.contains(cell))
            .unwrap_or_else(|| panic!("{cell} in\n{table}"))
            .to_string()
    };
    // Seen once (the run before the base had it as fast as the base): a
    // suspect. The error rise is deterministic: confirmed at once.
    assert!(
        line_of(&table, q4).starts_with("regressed (suspect)"),
        "{table}"
    );
    assert!(
        line_of(&table, f32).starts_with("quality-regressed"),
        "{table}"
    );
    assert!(line_of(&table, f32).contains("nmse"), "{table}");
    assert!(
        table.contains(
            "2 cells: 1 regressed, 1 quality-regressed, 0 improved, 0 inconclusive, 0 noisy, 0 disturbed, 0 same, 0 not-comparable; regressions 1 confirmed, 1 suspect"
        ),
        "{table}"
    );
    assert!(
        table.contains("20991229T000000Z-earlier (the run before the base)"),
        "{table}"
    );

    // The same comparison for CI: JUnit with one case per cell, a failure
    // per confirmed regression and the suspect named; the exit code.
    let junit_of = |base: &str, new: &str, fail_on: &str| {
        let out = xtask(
            dir.path(),
            &["compare", base, new, "--format", "junit", fail_on],
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, junit) = junit_of(base_arg, new_arg, "--fail-on-regression");
    assert_eq!(code, Some(1), "the quality regression: {junit}");
    assert_eq!(junit.matches("<testcase").count(), 2, "{junit}");
    assert_eq!(junit.matches("<failure").count(), 1, "{junit}");
    assert_eq!(
        junit.matches("type=\"quality-regression\"").count(),
        1,
        "{junit}"
    );
    assert_eq!(junit.matches("suspect regression").count(), 1, "{junit}");
    // Without the quality change, a suspect alone fails only when asked.
    let (code, _) = junit_of(base_arg, again.to_str().unwrap(), "--fail-on-regression");
    assert_eq!(code, Some(0), "a suspect is no failure by default");
    let out = xtask(
        dir.path(),
        &[
            "compare",
            base_arg,
            again.to_str().unwrap(),
            "--confirm-against",
            "none",
            "--fail-on-suspect",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("no second look asked for"),
        "{}",
        text(&out)
    );

    // The next run still slow: between the two slow runs the cell is the
    // same, but against the run before the step (the base) both show it:
    // confirmed, a failure.
    let (code, junit) = junit_of(new_arg, again.to_str().unwrap(), "--fail-on-regression");
    assert_eq!(code, Some(1), "{junit}");
    assert_eq!(
        junit.matches("type=\"confirmed-regression\"").count(),
        1,
        "{junit}"
    );
    assert!(junit.contains("since 20991230T000000Z-base"), "{junit}");
    let out = xtask(dir.path(), &["compare", new_arg, again.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        line_of(&table, q4).starts_with("same (confirmed regression since earlier)"),
        "{table}"
    );
    assert!(
        table.contains("confirmed regression: local kernel llama3.2-1b.attn_kv/Q4_0/n1/t1"),
        "{table}"
    );

    // A setting judged itself: the same cells with repack off match none
    // of the base's keys, unless compared across `repack`.
    let unpacked = dir.path().join("results/20991233T000000Z-no-repack");
    copy_dir(&again, &unpacked);
    rewrite_csv::<KernelRow>(&unpacked.join("kernels.csv"), |r| r.repack = false);
    let out = xtask(
        dir.path(),
        &["compare", base_arg, unpacked.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no measured cell in common"),
        "{}",
        text(&out)
    );
    let out = xtask(
        dir.path(),
        &[
            "compare",
            base_arg,
            unpacked.to_str().unwrap(),
            "--across",
            "repack",
            "--format",
            "json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let q4_cell = json["cells"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cell"] == q4)
        .unwrap();
    assert_eq!(q4_cell["verdict"], "regressed", "{q4_cell}");
    assert_eq!(q4_cell["settings"], "llm-like/mmap/*", "{q4_cell}");
    assert!(
        q4_cell["notes"]
            .to_string()
            .contains("settings llm-like/mmap/repack -> llm-like/mmap/no-repack"),
        "{q4_cell}"
    );
    let out = xtask(
        dir.path(),
        &["compare", base_arg, new_arg, "--across", "threads"],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("--across `threads`"), "{}", text(&out));

    // A run against itself: nothing regressed, and the markdown goes to
    // the step summary when CI sets one.
    let summary = dir.path().join("step-summary.md");
    let out = Command::new(env!("CARGO_BIN_EXE_quantbench"))
        .current_dir(dir.path())
        .env("GITHUB_STEP_SUMMARY", &summary)
        .args([
            "compare",
            base_arg,
            base_arg,
            "--fail-on-regression",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let verdicts: Vec<&str> = json["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["verdict"].as_str().unwrap())
        .collect();
    assert_eq!(verdicts, ["same", "same"]);
    let md = std::fs::read_to_string(&summary).unwrap();
    assert!(
        md.contains("| verdict |") && md.contains("0 regressed"),
        "{md}"
    );
    assert!(md.contains("Benjamini-Hochberg"), "{md}");
}

#[test]
fn placement_luck_between_invocations_is_not_a_regression_but_a_real_slowdown_is() {
    // Two same-commit runs as a real board gives them: each invocation
    // (agent process) lands on one of two levels 16% apart, while its
    // repetitions agree to 0.1%; half of one run's invocations landed
    // high, seven of ten of the other's. Pooled (one process a side, the
    // old rule) that luck is a 7% "change" with p far below 0.05; judged
    // by invocation it is not. A 30% slowdown on top of the same luck is.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bench.toml"), MATRICES).unwrap();
    bench_local(dir.path(), "pair");
    let measured = runs(dir.path())[0].clone();
    let rows: Vec<KernelRow> = read_csv(&measured.join("kernels.csv")).unwrap();
    assert!(rows.iter().all(|r| r.invocations == 10), "local default");
    let q4 = "llama3.2-1b.attn_kv/Q4_0/n1/t1";
    let runs_of = [("a", 5u32, 10u64), ("b", 3, 10), ("c", 3, 13)];
    for (name, fast_invocations, q4_factor) in runs_of {
        let copy = dir.path().join(format!("results/20991230T000000Z-{name}"));
        copy_dir(&measured, &copy);
        rewrite_csv::<SampleRow>(&copy.join("samples.csv"), |s| {
            let level = if s.invocation < fast_invocations {
                1000
            } else {
                1160
            };
            let factor = if s.cell_id == q4 { q4_factor } else { 10 };
            s.ns = (level + s.repetition as u64 % 2) * factor / 10;
        });
        controlled_rows(&copy);
    }
    let verdict_of = |new: &str| -> Vec<(String, String)> {
        let out = xtask(
            dir.path(),
            &[
                "compare",
                "results/20991230T000000Z-a",
                new,
                "--format",
                "json",
            ],
        );
        assert!(out.status.success(), "{}", text(&out));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["cells"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["cell"].as_str().unwrap().to_string(),
                    c["verdict"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    for (cell, verdict) in verdict_of("results/20991230T000000Z-b") {
        assert!(
            verdict == "same" || verdict == "inconclusive",
            "{cell}: {verdict} for placement luck alone"
        );
    }
    let with_slowdown = verdict_of("results/20991230T000000Z-c");
    assert!(
        with_slowdown.contains(&(q4.to_string(), "regressed".to_string())),
        "{with_slowdown:?}"
    );
}

#[test]
fn history_finds_runs_by_name_and_commit_and_survives_corruption() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bench.toml"), MATRICES).unwrap();
    for _ in 0..2 {
        bench_local(dir.path(), "pair");
    }
    bench_local(dir.path(), "other");
    let all = runs(dir.path());
    assert_eq!(all.len(), 3);
    assert!(
        dir.path().join("results/history.sqlite").exists(),
        "updated after each run"
    );

    // `previous` and `latest` are the last two runs; a commit prefix names
    // the latest run of that commit.
    let out = xtask(dir.path(), &["compare", "previous", "latest"]);
    assert!(!out.status.success(), "pair vs other share no cell");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no measured cell in common"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let first = all[0].to_str().unwrap();
    let out = xtask(dir.path(), &["compare", first, all[1].to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(all[0].join("run.json")).unwrap()).unwrap();
    let commit = manifest["git_commit"].as_str().unwrap();
    let out = xtask(dir.path(), &["compare", &commit[..7], first]);
    // The latest run of that commit is `other`: nothing in common with `pair`.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no measured cell in common"),
        "{}",
        text(&out)
    );

    // Bad references get one line naming what is accepted.
    let out = xtask(dir.path(), &["compare", "results/nope", "latest"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no run `results/nope`") && stderr.contains("latest"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    // A corrupt index is rebuilt from the run directories, not trusted.
    std::fs::write(
        dir.path().join("results/history.sqlite"),
        b"not a database at all",
    )
    .unwrap();
    let out = xtask(dir.path(), &["history"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("3 runs") && stdout.contains("rebuilt"),
        "{stdout}"
    );
    // Deleting it loses nothing either.
    std::fs::remove_file(dir.path().join("results/history.sqlite")).unwrap();
    let out = xtask(
        dir.path(),
        &["compare", "previous", all[1].to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = xtask(dir.path(), &["history"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("3 runs"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_slowdown_measured_while_throttled_is_noisy_not_a_regression_and_the_summary_says_so() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bench.toml"), MATRICES).unwrap();
    bench_local(dir.path(), "pair");
    let measured = runs(dir.path())[0].clone();
    // The same controlled repetitions as above; the hot run's Q4_0 is 40%
    // slower and its row says the board throttled while measuring it.
    let q4 = "llama3.2-1b.attn_kv/Q4_0/n1/t1";
    let base = dir.path().join("results/20991230T000000Z-cool");
    let hot = dir.path().join("results/20991231T000000Z-hot");
    for (copy, q4_factor) in [(&base, 10), (&hot, 14)] {
        copy_dir(&measured, copy);
        rewrite_csv::<SampleRow>(&copy.join("samples.csv"), |s| {
            s.ns = (1000 + s.repetition as u64 % 10) * if s.cell_id == q4 { q4_factor } else { 10 }
                / 10;
        });
        controlled_rows(copy);
    }
    rewrite_csv::<KernelRow>(&hot.join("kernels.csv"), |r| {
        if r.cell_id == q4 {
            r.governor = "performance".into();
            r.throttled = Some(true);
            r.thermal_noisy = true;
        }
    });
    let out = xtask(
        dir.path(),
        &[
            "compare",
            base.to_str().unwrap(),
            hot.to_str().unwrap(),
            "--format",
            "json",
            "--fail-on-regression",
        ],
    );
    assert!(out.status.success(), "not a regression: {}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cell = json["cells"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cell"] == q4)
        .unwrap();
    assert_eq!(cell["verdict"], "noisy", "{cell}");
    assert!(
        cell["notes"]
            .to_string()
            .contains("thermally noisy in the new run"),
        "{cell}"
    );
    // The run's own summary flags it.
    let out = xtask(dir.path(), &["plot", hot.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("THERMALLY NOISY: 1 of") && stdout.contains("1 throttled"),
        "{stdout}"
    );
}

#[test]
fn noise_pairs_print_a_false_alarm_table_and_compare_uses_their_floors_for_the_same_build_only() {
    let dir = tempfile::tempdir().unwrap();
    let config = MATRICES.replace(
        "max_time_ms = 300\n",
        "max_time_ms = 300\ninvocations = 3\n",
    );
    std::fs::write(dir.path().join("bench.toml"), &config).unwrap();
    let out = xtask(
        dir.path(),
        &[
            "noise", "--target", "local", "--matrix", "pair", "--pairs", "1",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("same-build pairs") && stdout.contains("false alarms:"),
        "{stdout}"
    );
    assert!(
        stdout.contains("smallest change found with 90% power"),
        "{stdout}"
    );
    let floors_file = dir.path().join("results/noise/local.json");
    let floors: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&floors_file).unwrap()).unwrap();
    assert_eq!(floors["cells"].as_array().unwrap().len(), 2, "{floors}");
    // The noise runs stay out of the nightly history.
    assert!(
        runs(dir.path()).iter().all(|r| r.ends_with("noise")),
        "{:?}",
        runs(dir.path())
    );

    // Two nightly runs of the same build: compare names each cell's floor.
    bench_local(dir.path(), "pair");
    bench_local(dir.path(), "pair");
    let out = xtask(
        dir.path(),
        &["compare", "previous", "latest", "--format", "json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for cell in json["cells"].as_array().unwrap() {
        assert!(cell["noise_floor"]["relative"].is_number(), "{cell}");
        assert!(cell["margin"].as_f64().unwrap() >= 0.05, "{cell}");
    }
    // A board that changed since (another agent build) keeps no floor, and
    // compare says why on stderr.
    let changed = std::fs::read_to_string(&floors_file).unwrap().replace(
        floors["state"]["agent_build"].as_str().unwrap(),
        "0000older000",
    );
    std::fs::write(&floors_file, changed).unwrap();
    let out = xtask(
        dir.path(),
        &["compare", "previous", "latest", "--format", "json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("noise floors of") && stderr.contains("agent 0000older000 ->"),
        "{stderr}"
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json["cells"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["noise_floor"].is_null()));

    // Floors from the history: six more nights of the same build on the
    // board as it was (copies of the last run, later in time, 10% apart
    // night to night). Judging the last, the earlier same-build runs (five
    // copies, and the two real ones where no other test's process
    // disturbed them) give each cell a floor, and compare says where it
    // came from.
    let nightly: Vec<PathBuf> = runs(dir.path())
        .into_iter()
        .filter(|r| !r.ends_with("noise"))
        .collect();
    let last = nightly.last().unwrap().clone();
    for night in 0..6u32 {
        let copy = dir
            .path()
            .join(format!("results/20991201T00000{night}Z-night"));
        copy_dir(&last, &copy);
        let manifest = copy.join("run.json");
        let mut m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
        m["started_at"] = format!("2099-12-01T00:00:0{night}Z").into();
        std::fs::write(&manifest, m.to_string()).unwrap();
        let factor = if night % 2 == 0 { 1.0 } else { 1.1 };
        rewrite_csv::<KernelRow>(&copy.join("kernels.csv"), |r| {
            r.median_ns = r.median_ns.map(|t| t * factor);
        });
        controlled_rows(&copy);
    }
    let out = xtask(
        dir.path(),
        &["compare", "previous", "latest", "--format", "json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for cell in json["cells"].as_array().unwrap() {
        let source = cell["noise_floor"]["source"].as_str().unwrap_or_default();
        let runs: usize = source
            .strip_prefix("history: ")
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a floor from the history: {cell}"));
        assert!((5..=7).contains(&runs), "{cell}");
        assert!(source.contains("runs of agent"), "{cell}");
        assert!(
            cell["noise_floor"]["relative"].as_f64().unwrap() > 0.05,
            "{cell}"
        );
    }
    // Another agent build starts a new floor: none yet.
    let newest = dir.path().join("results/20991201T000005Z-night");
    rewrite_csv::<KernelRow>(&newest.join("kernels.csv"), |r| {
        r.agent_build = "0000other000".into();
    });
    let out = xtask(
        dir.path(),
        &["compare", "previous", "latest", "--format", "json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        json["cells"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["noise_floor"].is_null()),
        "{json}"
    );

    // Bad input: one line each.
    let out = xtask(
        dir.path(),
        &[
            "noise", "--target", "local", "--matrix", "pair", "--pairs", "0",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--pairs 0"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn prune_keeps_what_compare_noise_floors_and_pins_need_and_removes_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bench.toml"), MATRICES).unwrap();
    bench_local(dir.path(), "other");
    let measured = runs(dir.path())[0].clone();
    // Sixteen old runs of the same series on the same board, a day apart,
    // long before --keep-days.
    let old = |i: usize| dir.path().join(format!("results/20250101T0000{i:02}Z-old"));
    for i in 0..16 {
        copy_dir(&measured, &old(i));
        let path = old(i).join("run.json");
        let mut manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        manifest["started_at"] = format!("2025-01-{:02}T00:00:00Z", i + 1).into();
        std::fs::write(&path, manifest.to_string()).unwrap();
    }
    // The first is a lab's baseline.
    std::fs::write(
        dir.path().join("results/keep.txt"),
        "# baselines\n20250101T000000Z-old  # before the upgrade\n",
    )
    .unwrap();
    // Recipe caches: one unused for 60 days, one used today.
    let cache = harness::builds::build::workspace_root().join("target/quantbench-models");
    let stale = cache.join(format!("zz-retention-test-stale-{}", std::process::id()));
    let fresh = cache.join(format!("zz-retention-test-fresh-{}", std::process::id()));
    for folder in [&stale, &fresh] {
        std::fs::create_dir_all(folder).unwrap();
        std::fs::write(folder.join("q8_0.gguf"), b"x").unwrap();
    }
    let sixty_days_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(60 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(stale.join("q8_0.gguf"))
        .unwrap()
        .set_modified(sixty_days_ago)
        .unwrap();

    let prune = |extra: &[&str]| {
        let mut args = vec!["prune", "--keep-runs", "3", "--keep-days", "90"];
        args.extend(extra);
        xtask(dir.path(), &args)
    };
    let dry = prune(&["--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry));
    assert_eq!(runs(dir.path()).len(), 17, "a dry run removes nothing");
    assert!(stale.exists());

    let out = prune(&[]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    // Kept: the newest 3 of the series (the real run, old15, old14), the
    // 11 that make the board's history noise floor (the real run and
    // old15..old06), the pinned old00. Removed: old01..old05.
    for i in 0..16 {
        let gone = (1..=5).contains(&i);
        assert_eq!(!old(i).exists(), gone, "old{i}\n{all}");
    }
    assert!(measured.exists());
    assert!(
        all.contains("20250101T000000Z-old: pinned in keep.txt"),
        "{all}"
    );
    assert!(
        all.contains("makes the history noise floor of local"),
        "{all}"
    );
    assert!(!stale.exists() && fresh.exists(), "{all}");
    let _ = std::fs::remove_dir_all(&fresh);
    // The history follows the folders.
    let out = xtask(dir.path(), &["history"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("12 runs"),
        "{}",
        text(&out)
    );
    // A policy that would starve compare is refused in one line.
    let out = xtask(dir.path(), &["prune", "--keep-runs", "2"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("keep at least 3"), "{stderr}");
}
