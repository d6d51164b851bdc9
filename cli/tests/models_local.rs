//! The model matrix end to end on `local`: the fixture model (a real
//! llama-architecture GGUF) quantized by llama.cpp, measured by the agent.

mod common;
use common::{fixture, only_run_dir, xtask};

use wire::files::read_csv;
use wire::rows::CellStatus;
use wire::rows::ModelRow;

fn config(models: &[String], recipes: &str) -> String {
    format!(
        "[model_matrices.m]\nmodels = {models:?}\nrecipes = [{recipes}]\ntext = {:?}\nctx = 128\nprompt = \"Once upon a time\"\ngenerate_tokens = 24\nn_prompt = 32\nn_gen = 8\nrepetitions = 2\nmultiple_choice = {:?}\n",
        fixture("stories-eval.txt"),
        fixture("stories-choice.jsonl")
    )
}

/// A folder with a bench.toml whose matrix `m` runs the fixture model.
fn fixture_model_config(recipes: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bench.toml"),
        config(&[fixture("stories260K.gguf")], recipes),
    )
    .unwrap();
    dir
}

#[test]
fn model_quick_gives_rows_quality_text_and_plots() {
    let dir = fixture_model_config("\"f32\", \"q8_0\", \"q4_0\", \"adaptive\"");
    let out = xtask(dir.path(), &["bench", "--target", "local", "--matrix", "m"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let run = only_run_dir(dir.path());
    let rows: Vec<ModelRow> = read_csv(&run.join("models.csv")).unwrap();
    let by = |recipe: &str, test: &str| {
        rows.iter()
            .find(|r| r.recipe == recipe && r.test == test)
            .unwrap_or_else(|| panic!("{recipe} {test}"))
    };
    for recipe in ["f32", "q8_0", "q4_0", "adaptive"] {
        for test in ["pp32", "tg8"] {
            let r = by(recipe, test);
            assert_eq!(r.status, CellStatus::Ok, "{r:?}");
            assert!(r.avg_ts.unwrap() > 0.0 && r.model_size > 0);
            assert!(r.generated_text.len() > 10, "generated text kept: {r:?}");
        }
    }
    // The unquantized model's reference was computed once by the host and
    // read by the agent (a board never evaluates the base model), and the
    // figures are stock llama.cpp's all the same.
    let job_dir = run.join("boards/local/jobs/m-stories260K_gguf");
    let log = std::fs::read_to_string(job_dir.join("agent.log")).unwrap();
    assert!(log.contains("reference: the host's, "), "{log}");
    // A machine with no power source (this VM: no hwmon, no RAPL): the
    // energy columns are empty and the summary names every source looked
    // for and why each was unusable.
    if rows.iter().all(|r| r.power_source.is_empty()) {
        assert!(rows.iter().all(|r| r.j_per_token.is_none()));
        let summary = std::fs::read_to_string(run.join("summary.md")).unwrap();
        assert!(
            summary.contains("no power source, energy columns empty: command: the board names no power_command; vcgencmd: not found at /usr/bin/vcgencmd, /opt/vc/bin/vcgencmd; hwmon: ")
                && summary.contains("; rapl: "),
            "{summary}"
        );
    }
    let job: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(job_dir.join("job.json")).unwrap()).unwrap();
    let reference = job["reference"].as_str().unwrap();
    assert!(reference.contains("reference-128-"), "{reference}");
    // Stock llama.cpp's figures for this model and text (fixtures/README.md).
    let f32 = by("f32", "tg8");
    assert!(
        (f32.ppl.unwrap() - 4.0022).abs() / 4.0022 < 0.01,
        "{:?}",
        f32.ppl
    );
    let q8 = by("q8_0", "tg8");
    let q4 = by("q4_0", "tg8");
    assert!(
        (q8.ppl.unwrap() - 4.0048).abs() / 4.0048 < 0.01,
        "{:?}",
        q8.ppl
    );
    assert!(
        (q4.ppl.unwrap() - 4.3343).abs() / 4.3343 < 0.01,
        "{:?}",
        q4.ppl
    );
    assert!(
        (q8.kld_mean.unwrap() - 0.000807).abs() / 0.000807 < 0.05,
        "{:?}",
        q8.kld_mean
    );
    assert!(
        (q4.kld_mean.unwrap() - 0.0855).abs() / 0.0855 < 0.05,
        "{:?}",
        q4.kld_mean
    );
    assert!(q8.kld_mean.unwrap() < q4.kld_mean.unwrap());
    // The hand-made tasks are easy for a story model; a scorer that always
    // picked one position would get at most 2 of 6.
    assert!(
        f32.mc_accuracy.unwrap() >= 5.0 / 6.0,
        "{:?}",
        f32.mc_accuracy
    );
    // llama.cpp's quantizer falls back for the ffn_down tensors (K = 172).
    assert_eq!(q8.fallbacks.split(';').count(), 5, "{}", q8.fallbacks);
    assert!(
        q8.fallbacks.contains("blk.0.ffn_down.weight:q8_0->"),
        "{}",
        q8.fallbacks
    );
    // Every repetition is kept, keyed like the row, as llama-bench's
    // `samples_ns`: 2 repetitions per test in each of 3 invocations (the
    // agent's own process and two fresh children), each invocation's
    // repetitions numbered on their own.
    let samples: Vec<wire::rows::SampleRow> = read_csv(&run.join("samples.csv")).unwrap();
    for r in rows.iter().filter(|r| r.status == CellStatus::Ok) {
        assert_eq!(r.invocations, 3, "{r:?}");
        let reps: Vec<&wire::rows::SampleRow> = samples
            .iter()
            .filter(|s| s.cell_id == r.cell_id())
            .collect();
        assert_eq!(reps.len(), 6, "{}", r.cell_id());
        for invocation in 0..3 {
            let of: Vec<u32> = reps
                .iter()
                .filter(|s| s.invocation == invocation)
                .map(|s| s.repetition)
                .collect();
            assert_eq!(of, [0, 1], "{} invocation {invocation}", r.cell_id());
        }
        let mean = reps.iter().map(|s| s.ns).sum::<u64>() as f64 / 6.0;
        assert!((mean - r.avg_ns.unwrap()).abs() <= 1.0, "{reps:?} {r:?}");
    }
    let importance = std::fs::read_to_string(run.join("importance.json")).unwrap();
    assert!(importance.contains("\"scores\"") && importance.contains("\"assignment\""));
    for plot in [
        "model_speedup_vs_f32",
        "model_time_per_token",
        "model_kld_vs_bits",
        "layer_importance_stories260K_gguf",
    ] {
        assert!(
            run.join("plots").join(format!("{plot}.png")).exists(),
            "{plot}"
        );
    }
}

#[test]
fn plot_redraws_a_model_only_run_and_refuses_unknown_plot_names() {
    let dir = fixture_model_config("\"f32\", \"q4_0\"");
    let out = xtask(dir.path(), &["bench", "--target", "local", "--matrix", "m"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = only_run_dir(dir.path());
    assert!(!run.join("kernels.csv").exists(), "a model-only run");
    std::fs::remove_dir_all(run.join("plots")).unwrap();
    std::fs::remove_file(run.join("summary.md")).unwrap();
    let out = xtask(dir.path(), &["plot", run.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = std::fs::read_to_string(run.join("summary.md")).unwrap();
    assert!(summary.contains("| stories260K.gguf | q4_0 |"), "{summary}");
    for plot in [
        "model_speedup_vs_f32",
        "model_time_per_token",
        "model_kld_vs_bits",
    ] {
        for ext in ["png", "svg"] {
            assert!(
                run.join("plots").join(format!("{plot}.{ext}")).exists(),
                "{plot}.{ext}"
            );
        }
    }
    // Kernel plots need kernel rows: none are drawn for a model-only run.
    assert!(!run.join("plots/speedup_vs_f32.png").exists());
    // A mistyped plot name is an error naming the known ones, not some plot.
    let out = xtask(
        dir.path(),
        &["plot", run.to_str().unwrap(), "--only", "speedup_vs_f23"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown plot `speedup_vs_f23`") && stderr.contains("speedup_vs_f32"),
        "{stderr}"
    );
}

#[test]
fn bad_model_files_fail_before_any_work_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, b"GG").unwrap();
    let not_gguf = dir.path().join("notes.gguf");
    std::fs::write(&not_gguf, b"hello, not a model").unwrap();
    for (model, expected) in [
        (
            dir.path().join("missing.gguf").display().to_string(),
            "No such file",
        ),
        (truncated.display().to_string(), "too short"),
        (not_gguf.display().to_string(), "not a GGUF file"),
    ] {
        std::fs::write(
            dir.path().join("bench.toml"),
            config(std::slice::from_ref(&model), "\"q4_0\""),
        )
        .unwrap();
        let out = xtask(dir.path(), &["bench", "--target", "local", "--matrix", "m"]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(
            lines[0].contains(expected) && lines[0].contains(&model),
            "{stderr}"
        );
        assert!(!dir.path().join("results").exists(), "nothing ran");
    }
    // Two real models whose names would share rows and a job folder: the
    // same file name in two folders, and names that differ only where the
    // folder name has `_`.
    let fixture_bytes = std::fs::read(fixture("stories260K.gguf")).unwrap();
    for (a, b) in [("a/model.gguf", "b/model.gguf"), ("x-y.gguf", "x_y.gguf")] {
        let paths: Vec<String> = [a, b]
            .iter()
            .map(|p| {
                let path = dir.path().join(p);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &fixture_bytes).unwrap();
                path.display().to_string()
            })
            .collect();
        std::fs::write(dir.path().join("bench.toml"), config(&paths, "\"q4_0\"")).unwrap();
        let out = xtask(dir.path(), &["bench", "--target", "local", "--matrix", "m"]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(lines[0].contains("would share the name"), "{stderr}");
        assert!(!dir.path().join("results").exists(), "nothing ran");
    }
}

#[test]
fn recipe_the_model_cannot_take_is_refused_with_one_line() {
    let dir = fixture_model_config("\"q8_0\", \"q4_k_m\"");
    let out = xtask(dir.path(), &["bench", "--target", "local", "--matrix", "m"]);
    assert!(!out.status.success());
    // The agent build ran first (cargo may print to stderr); the error is one line.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("recipe `q4_k_m` cannot be applied")
            && errors[0].contains("multiple of 256"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("results").exists(),
        "nothing measured, nothing uploaded"
    );
}

#[test]
fn a_synthetic_model_of_a_real_architecture_runs_for_speed_and_memory_only() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bench.toml"),
        config(
            &["synthetic:distilgpt2:1".to_string()],
            "\"f32\", \"q4_0\", \"adaptive\"",
        )
        .replace("multiple_choice", "# multiple_choice"),
    )
    .unwrap();
    let out = xtask(dir.path(), &["bench", "--target", "local", "--matrix", "m"]);
    let all = common::text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("SYNTHETIC models"), "{all}");
    let run = only_run_dir(dir.path());
    let rows: Vec<ModelRow> = read_csv(&run.join("models.csv")).unwrap();
    assert_eq!(rows.len(), 6, "3 recipes x pp, tg: {rows:?}");
    for r in &rows {
        assert_eq!(r.status, CellStatus::Ok, "{r:?}");
        assert!(r.synthetic, "{r:?}");
        assert!(
            r.avg_ts.unwrap() > 0.0 && r.peak_rss_bytes.unwrap() > 0,
            "{r:?}"
        );
        // GPT-2's real vocabulary and width: the embedding alone is 38.6M.
        assert!(r.model_n_params > 38_000_000, "{r:?}");
        assert!(
            r.ppl.is_none() && r.kld_mean.is_none() && r.top1_agreement.is_none(),
            "no quality for random weights: {r:?}"
        );
        assert!(r.note.contains("synthetic"), "{r:?}");
    }
    let importance = std::fs::read_to_string(run.join("importance.json")).unwrap();
    assert!(importance.contains("layer order"), "{importance}");
    // The agent reports its own time, so the host's overhead is known.
    let manifest: harness::runs::manifest::RunManifest =
        wire::files::read_json(&run.join("run.json")).unwrap();
    assert!(
        manifest.boards[0].agent_seconds > 0.0,
        "{:?}",
        manifest.boards
    );

    // A name quantbench cannot make: one line naming the known ones.
    std::fs::write(
        dir.path().join("bench.toml"),
        config(&["synthetic:gpt9".to_string()], "\"f32\""),
    )
    .unwrap();
    let out = xtask(dir.path(), &["bench", "--target", "local", "--matrix", "m"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no synthetic model like `gpt9`") && stderr.contains("llama3.2-1b"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn kv_cache_types_depths_and_flash_attention_are_axes_with_quality_beside_speed() {
    // The fixture: quality in each KV-cache type. Its attention heads are
    // 8 values wide, so q8_0's blocks of 32 cannot hold them: those rows
    // are unsupported, saying why, and the others are measured.
    let dir = tempfile::tempdir().unwrap();
    let settings =
        "n_depth = [0, 64]\nkv_type = [\"f16\", \"bf16\", \"q8_0\"]\nflash_attn = [\"on\"]\n";
    std::fs::write(
        dir.path().join("bench.toml"),
        config(&[fixture("stories260K.gguf")], "\"q8_0\"")
            .replace("multiple_choice", "# multiple_choice")
            + settings,
    )
    .unwrap();
    let out = xtask(dir.path(), &["bench", "--target", "local", "--matrix", "m"]);
    let all = common::text(&out);
    assert!(out.status.success(), "{all}");
    let run = only_run_dir(dir.path());
    let rows: Vec<ModelRow> = read_csv(&run.join("models.csv")).unwrap();
    assert_eq!(
        rows.len(),
        3 * 2 * 2,
        "kv types x depths x pp, tg: {rows:?}"
    );
    let row = |kv: &str, test: &str| {
        rows.iter()
            .find(|r| r.type_k == kv && r.test == test)
            .unwrap_or_else(|| panic!("{kv} {test}: {rows:?}"))
    };
    for kv in ["f16", "bf16"] {
        for test in ["pp32", "tg8", "pp32+d64", "tg8+d64"] {
            let r = row(kv, test);
            assert_eq!(r.status, CellStatus::Ok, "{r:?}");
            assert_eq!((r.type_v.as_str(), r.flash_attn.as_str()), (kv, "on"));
            assert_eq!(r.flash_attn_used, "on", "{r:?}");
            assert!(r.avg_ts.unwrap() > 0.0 && r.ppl.is_some(), "{r:?}");
            assert_eq!(r.n_depth, if test.contains("+d") { 64 } else { 0 });
            // Time to first token: a pp test's whole prompt, one token of
            // a tg test.
            let (ttft, whole) = (r.ttft_ms.unwrap(), r.avg_ns.unwrap() / 1e6);
            if test.starts_with("pp") {
                assert!(ttft > 0.5 * whole && ttft < 2.0 * whole, "{r:?}");
            } else {
                assert!(ttft > 0.0 && ttft < 0.6 * whole, "{r:?}");
            }
            assert_eq!(
                r.key().settings,
                format!("ctk={kv}/ctv={kv}/fa=on/b=2048/ub=512")
            );
        }
        // The cache holds the depth and the test's tokens.
        let (shallow, deep) = (
            row(kv, "tg8").kv_bytes.unwrap(),
            row(kv, "tg8+d64").kv_bytes.unwrap(),
        );
        assert!(deep > shallow && shallow > 0, "{kv}: {shallow} -> {deep}");
    }
    // Each setting's repetitions are its own in samples.csv (what compare
    // judges): 2 repetitions x 3 invocations, never another setting's too.
    let samples: Vec<wire::rows::SampleRow> = read_csv(&run.join("samples.csv")).unwrap();
    for kv in ["f16", "bf16"] {
        let r = row(kv, "tg8");
        let own = samples.iter().filter(|s| s.cell_id == r.cell_id()).count();
        assert_eq!(own, 6, "{}", r.cell_id());
    }
    // Quality measured in each cache type: bf16 keys and values round
    // differently from f16, so the same file's figures move.
    assert_ne!(row("f16", "tg8").kld_mean, row("bf16", "tg8").kld_mean);
    assert_eq!(row("f16", "tg8").kv_bytes, row("bf16", "tg8").kv_bytes);
    for test in ["pp32", "tg8", "pp32+d64", "tg8+d64"] {
        let r = row("q8_0", test);
        assert_eq!(r.status, CellStatus::Unsupported, "{r:?}");
        assert!(r.note.contains("attention heads of 8"), "{r:?}");
        assert!(r.avg_ts.is_none(), "{r:?}");
    }
    let summary = std::fs::read_to_string(run.join("summary.md")).unwrap();
    assert!(summary.contains("q8_0 kv=bf16 fa=on d64"), "{summary}");
    for plot in [
        "model_tg_vs_depth",
        "model_kv_vs_depth",
        "model_ttft_vs_depth",
    ] {
        assert!(run.join(format!("plots/{plot}.svg")).exists(), "{plot}");
    }

    // A model whose heads hold whole blocks: KV memory falls with the type.
    std::fs::remove_dir_all(&run).unwrap();
    std::fs::write(
        dir.path().join("bench.toml"),
        config(&["synthetic:distilgpt2:1".to_string()], "\"q8_0\"")
            .replace("multiple_choice", "# multiple_choice")
            + "n_depth = [0, 256]\nkv_type = [\"f16\", \"q8_0\", \"q4_0\"]\nflash_attn = [\"on\"]\npg = [[32, 8]]\n",
    )
    .unwrap();
    let out = xtask(dir.path(), &["bench", "--target", "local", "--matrix", "m"]);
    let all = common::text(&out);
    assert!(out.status.success(), "{all}");
    let run = only_run_dir(dir.path());
    let rows: Vec<ModelRow> = read_csv(&run.join("models.csv")).unwrap();
    let kv_bytes = |kv: &str, test: &str| {
        let r = rows
            .iter()
            .find(|r| r.type_k == kv && r.test == test)
            .unwrap_or_else(|| panic!("{kv} {test}: {rows:?}"));
        assert_eq!(r.status, CellStatus::Ok, "{r:?}");
        r.kv_bytes.unwrap()
    };
    for test in ["tg8", "tg8+d256"] {
        let (f16, q8, q4) = (
            kv_bytes("f16", test),
            kv_bytes("q8_0", test),
            kv_bytes("q4_0", test),
        );
        assert!(
            f16 > q8 && q8 > q4,
            "{test}: f16 {f16}, q8_0 {q8}, q4_0 {q4}"
        );
    }
    assert!(kv_bytes("q4_0", "tg8+d256") > kv_bytes("q4_0", "tg8"));
    // A prompt then generation (llama-bench's `-pg`), at each depth.
    for test in ["pp32+tg8", "pp32+tg8+d256"] {
        let r = rows
            .iter()
            .find(|r| r.type_k == "f16" && r.test == test)
            .unwrap_or_else(|| panic!("{test}: {rows:?}"));
        assert_eq!(r.status, CellStatus::Ok, "{r:?}");
        assert_eq!((r.n_prompt, r.n_gen), (32, 8), "{r:?}");
        assert!(r.avg_ts.unwrap() > 0.0, "{r:?}");
    }

    // A depth past the context the model was trained for: one line.
    std::fs::write(
        dir.path().join("bench.toml"),
        config(&[fixture("stories260K.gguf")], "\"q8_0\"") + "n_depth = [4096]\n",
    )
    .unwrap();
    let out = xtask(dir.path(), &["bench", "--target", "local", "--matrix", "m"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("needs a context of 4128") && stderr.contains("trained for 2048"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("bench.toml"),
        "the error names the file to fix: {stderr}"
    );
}

#[test]
fn cpu_masks_polling_and_priority_are_axes_and_a_priority_the_board_refuses_is_said() {
    let dir = tempfile::tempdir().unwrap();
    let body = config(&[fixture("stories260K.gguf")], "\"q8_0\"")
        .replace("multiple_choice", "# multiple_choice")
        .replace("repetitions = 2", "repetitions = 1")
        + "threads = [1]\ninvocations = 1\ncpu_mask = [\"0x0\", \"0x1\"]\npoll = [0, 50]\npriority = [\"normal\", \"high\"]\n";
    std::fs::write(dir.path().join("bench.toml"), &body).unwrap();
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
    if root {
        let out = xtask(dir.path(), &["bench", "--target", "local", "--matrix", "m"]);
        assert!(out.status.success(), "{}", common::text(&out));
        let run = only_run_dir(dir.path());
        let rows: Vec<ModelRow> = read_csv(&run.join("models.csv")).unwrap();
        assert_eq!(
            rows.len(),
            2 * 2 * 2 * 2,
            "masks x polls x priorities x pp, tg"
        );
        for r in &rows {
            assert_eq!(r.status, CellStatus::Ok, "{r:?}");
            assert!(r.avg_ts.unwrap() > 0.0 && r.ppl.is_some(), "{r:?}");
        }
        let r = rows
            .iter()
            .find(|r| r.cpu_mask == "0x1" && r.poll == Some(0) && r.priority == "high")
            .unwrap_or_else(|| panic!("{rows:?}"));
        assert_eq!(
            r.key().settings,
            "ctk=f16/ctv=f16/fa=auto/b=2048/ub=512/C=0x1/strict=0/poll=0/prio=high"
        );
        let summary = std::fs::read_to_string(run.join("summary.md")).unwrap();
        assert!(summary.contains("q8_0 C=0x1 poll=0 prio=high"), "{summary}");
        std::fs::remove_dir_all(&run).unwrap();
    }
    // The same matrix where raising a priority is not allowed (root
    // without CAP_SYS_NICE; any other user is without it already): the
    // high-priority tests are unsupported, saying why, the others measured.
    let mut command = if root {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--bounding-set=-sys_nice", "--inh-caps=-sys_nice", "--"])
            .arg(env!("CARGO_BIN_EXE_quantbench"));
        c
    } else {
        std::process::Command::new(env!("CARGO_BIN_EXE_quantbench"))
    };
    let out = command
        .current_dir(dir.path())
        .args(["bench", "--target", "local", "--matrix", "m"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    let run = only_run_dir(dir.path());
    let rows: Vec<ModelRow> = read_csv(&run.join("models.csv")).unwrap();
    assert_eq!(rows.len(), 16, "{rows:?}");
    for r in &rows {
        if r.priority == "high" {
            assert_eq!(r.status, CellStatus::Unsupported, "{r:?}");
            assert!(
                r.note
                    .contains("priority high (nice -10) needs CAP_SYS_NICE"),
                "{r:?}"
            );
        } else {
            assert_eq!(r.status, CellStatus::Ok, "{r:?}");
            assert!(r.avg_ts.unwrap() > 0.0, "{r:?}");
        }
    }
}

/// `quantbench <args>` in `dir` inside a private mount namespace where
/// `/proc/meminfo` says the board has `mem_total_kib` and
/// `/sys/devices/system/cpu` describes CPU 1 as the fast core of two (an
/// Arm kernel's `cpu_capacity`), under `wrap` (e.g. `setpriv ...`).
fn on_a_small_big_little_board(
    dir: &std::path::Path,
    mem_total_kib: u64,
    wrap: &[&str],
    args: &[&str],
) -> std::process::Output {
    let meminfo = dir.join("meminfo");
    std::fs::write(
        &meminfo,
        format!("MemTotal: {mem_total_kib} kB\nMemFree: {mem_total_kib} kB\nMemAvailable: {mem_total_kib} kB\n"),
    )
    .unwrap();
    let cpus = dir.join("cpu");
    for (cpu, capacity) in [(0, "512"), (1, "1024")] {
        std::fs::create_dir_all(cpus.join(format!("cpu{cpu}"))).unwrap();
        std::fs::write(cpus.join(format!("cpu{cpu}/cpu_capacity")), capacity).unwrap();
    }
    std::process::Command::new("unshare")
        .current_dir(dir)
        .args([
            "-m",
            "sh",
            "-c",
            "mount --bind \"$0\" /proc/meminfo && mount --bind \"$1\" /sys/devices/system/cpu && shift && exec \"$@\"",
        ])
        .arg(&meminfo)
        .arg(&cpus)
        .args(wrap)
        .arg(env!("CARGO_BIN_EXE_quantbench"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn load_modes_cold_loads_big_cores_and_memory_fit_are_measured_or_refused_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let body = config(&[fixture("stories260K.gguf")], "\"f32\"")
        .replace("multiple_choice", "# multiple_choice")
        .replace("repetitions = 2", "repetitions = 1")
        + "threads = [\"big\"]\ninvocations = 1\nload_mode = [\"mmap\", \"no-mmap\", \"mlock\"]\nn_depth = [0, 400]\nkv_type = [\"f32\"]\n";
    std::fs::write(dir.path().join("bench.toml"), &body).unwrap();
    // A board of 1.5 MB whose CPU 1 is its big core: the F32 weights (1.2
    // MB) fit with an empty KV cache, not with 440 tokens of f32 K and V
    // (5 layers x 2 x 32 values x 4 bytes a token: 0.56 MB). Without
    // CAP_IPC_LOCK and with a memlock limit of 0, mlock cannot be given.
    let out = on_a_small_big_little_board(
        dir.path(),
        1465,
        &[
            "setpriv",
            "--bounding-set=-ipc_lock",
            "--inh-caps=-ipc_lock",
            "--",
            "prlimit",
            "--memlock=0:0",
        ],
        &["bench", "--target", "local", "--matrix", "m"],
    );
    assert!(out.status.success(), "{}", common::text(&out));
    let run = only_run_dir(dir.path());
    let rows: Vec<ModelRow> = read_csv(&run.join("models.csv")).unwrap();
    assert_eq!(
        rows.len(),
        3 * 2 * 2,
        "load modes x depths x pp, tg: {rows:?}"
    );
    for r in &rows {
        // "big": one thread, on CPU 1 only.
        assert_eq!((r.n_threads, r.cpu_mask.as_str()), (1, "0x2"), "{r:?}");
        let expect = match (r.load_mode.as_str(), r.n_depth) {
            ("mlock", _) => Err("mlock needs"),
            (_, 400) => Err("does not fit"),
            _ => Ok(()),
        };
        match expect {
            Ok(()) => {
                assert_eq!(r.status, CellStatus::Ok, "{r:?}");
                assert!(r.avg_ts.unwrap() > 0.0 && r.ppl.is_some(), "{r:?}");
                // Cold (the file's pages dropped first) and warm loads.
                assert!(
                    r.load_cold_ms.unwrap() > 0.0 && r.load_ms.unwrap() > 0.0,
                    "{r:?}"
                );
            }
            Err(why) => {
                assert_eq!(r.status, CellStatus::Unsupported, "{r:?}");
                assert!(r.note.contains(why), "{r:?}");
            }
        }
    }
    let deep = rows
        .iter()
        .find(|r| r.load_mode == "no-mmap" && r.n_depth == 400)
        .unwrap();
    assert!(
        deep.note.contains("the board has 1.5 MB") && deep.note.contains("in f32"),
        "{deep:?}"
    );
    let mlock = rows.iter().find(|r| r.load_mode == "mlock").unwrap();
    assert!(mlock.note.contains("CAP_IPC_LOCK"), "{mlock:?}");
    // Each load mode is its own cell.
    assert!(
        deep.cell_id().ends_with("[ctk=f32/ctv=f32/fa=auto/b=2048/ub=512/C=0x2/strict=0/poll=50/prio=normal/load=no-mmap]"),
        "{}",
        deep.cell_id()
    );
    std::fs::remove_dir_all(&run).unwrap();

    // As root with the board's real memory, mlock locks.
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").unwrap().uid() == 0 {
        let only_mlock = body
            .replace(
                "load_mode = [\"mmap\", \"no-mmap\", \"mlock\"]",
                "load_mode = [\"mlock\"]",
            )
            .replace("n_depth = [0, 400]", "n_depth = [0]");
        std::fs::write(dir.path().join("bench.toml"), only_mlock).unwrap();
        let out = xtask(dir.path(), &["bench", "--target", "local", "--matrix", "m"]);
        assert!(out.status.success(), "{}", common::text(&out));
        let run = only_run_dir(dir.path());
        let rows: Vec<ModelRow> = read_csv(&run.join("models.csv")).unwrap();
        assert_eq!(rows.len(), 2);
        assert!(
            rows.iter()
                .all(|r| r.status == CellStatus::Ok && r.load_mode == "mlock"),
            "{rows:?}"
        );
        std::fs::remove_dir_all(&run).unwrap();
    }

    // A CPU mask naming a core the board lacks: one line, nothing run.
    std::fs::write(
        dir.path().join("bench.toml"),
        body.replace(
            "threads = [\"big\"]",
            "threads = [1]\ncpu_mask = [\"0x100\"]",
        ),
    )
    .unwrap();
    let out = xtask(dir.path(), &["bench", "--target", "local", "--matrix", "m"]);
    let all = common::text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("cpu_mask 0x100 names CPU 8, which board local lacks"),
        "{all}"
    );
}

#[test]
fn winogrande_and_mmlu_task_files_score_as_llama_perplexity_does_with_an_interval() {
    // Stock llama-perplexity on the F32 fixture (`--winogrande -f
    // fixtures/stories-winogrande.csv`, `--multiple-choice -f
    // fixtures/stories-mmlu.bin`, -c 128) scores 3 of the 6 WinoGrande
    // tasks (50%) and 4 of 4 multiple-choice tasks (100 +/- 0).
    let dir = tempfile::tempdir().unwrap();
    for (file, accuracy, tasks) in [
        ("stories-winogrande.csv", 0.5, 6.0),
        ("stories-mmlu.bin", 1.0, 4.0),
    ] {
        let body = config(&[fixture("stories260K.gguf")], "\"f32\"")
            .replace(&fixture("stories-choice.jsonl"), &fixture(file))
            .replace("repetitions = 2", "repetitions = 1")
            + "threads = [1]\ninvocations = 1\n";
        std::fs::write(dir.path().join("bench.toml"), &body).unwrap();
        let out = xtask(dir.path(), &["bench", "--target", "local", "--matrix", "m"]);
        assert!(out.status.success(), "{}", common::text(&out));
        let run = only_run_dir(dir.path());
        let rows: Vec<ModelRow> = read_csv(&run.join("models.csv")).unwrap();
        let f32 = &rows[0];
        assert_eq!(f32.mc_accuracy, Some(accuracy), "{file}: {f32:?}");
        let stderr = (accuracy * (1.0 - accuracy) / (tasks - 1.0)).sqrt();
        assert!((f32.mc_stderr.unwrap() - stderr).abs() < 1e-9, "{f32:?}");
        std::fs::remove_dir_all(&run).unwrap();
    }
    // A WinoGrande answer that is neither option: one line, nothing run.
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "0,Lily saw _ run.,Tom,the dog,1\n1,Tom saw _ run.,Lily,the cat,3\n",
    )
    .unwrap();
    let body = config(&[fixture("stories260K.gguf")], "\"f32\"")
        .replace(&fixture("stories-choice.jsonl"), &bad.display().to_string());
    std::fs::write(dir.path().join("bench.toml"), &body).unwrap();
    let out = xtask(dir.path(), &["bench", "--target", "local", "--matrix", "m"]);
    let all = common::text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("bad.csv: line 2: answer `3` is not 1 or 2"),
        "{all}"
    );
}

#[test]
fn quantize_options_and_an_external_importance_matrix_reach_llama_cpp() {
    // llama-quantize's per-tensor types and an output type, and stock
    // llama-imatrix's file beside our own importance matrix.
    let dir = tempfile::tempdir().unwrap();
    let recipes = "\"q8_0\", \"q8_0[attn_v=q4_0,output=f16]\", \"q4_0\", \"q4_0+imatrix\", \"q4_0+imatrix=stories260k-calib.imatrix\"";
    let body = config(&[fixture("stories260K.gguf")], recipes)
        .replace("multiple_choice", "# multiple_choice")
        .replace("repetitions = 2", "repetitions = 1")
        + &format!(
            "calibration = {:?}\nimatrix = {:?}\n",
            fixture("stories-calib.txt"),
            fixture("stories260K-calib.imatrix.gguf")
        );
    std::fs::write(dir.path().join("bench.toml"), &body).unwrap();
    let out = xtask(dir.path(), &["bench", "--target", "local", "--matrix", "m"]);
    let all = common::text(&out);
    assert!(out.status.success(), "{all}");
    let run = only_run_dir(dir.path());
    let rows: Vec<ModelRow> = read_csv(&run.join("models.csv")).unwrap();
    let row = |recipe: &str| {
        rows.iter()
            .find(|r| r.recipe == recipe && r.test == "tg8")
            .unwrap_or_else(|| panic!("{recipe}: {rows:?}"))
    };
    for r in rows.iter() {
        assert_eq!(r.status, CellStatus::Ok, "{r:?}");
    }
    // The overridden file: every attn_v q4_0, the output f16, the other
    // matrices q8_0 (those whose rows hold whole blocks of 32: the
    // fixture's ffn_down rows are 172 wide, which llama.cpp keeps in f16).
    let cache = harness::builds::build::workspace_root()
        .join("target/quantbench-models")
        .join(
            wire::build_id::content_hash(std::path::Path::new(&fixture("stories260K.gguf")))
                .unwrap(),
        );
    let made: Vec<std::path::PathBuf> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("q8_0_attn_v=q4_0_output=f16_-") && name.ends_with(".gguf")
        })
        .collect();
    assert_eq!(made.len(), 1, "{made:?}");
    let header = wire::gguf::check_file(&made[0]).unwrap();
    let (f16, q4_0, q8_0) = (1, 2, 8);
    let mut seen = 0;
    for t in header.tensors.iter().filter(|t| t.dims.len() == 2) {
        let expected = if t.dims[0] % 32 != 0 {
            f16
        } else if t.name.contains("attn_v") {
            q4_0
        } else if t.name == "output.weight" {
            f16
        } else {
            q8_0
        };
        assert_eq!(t.type_id, expected, "{}", t.name);
        seen += 1;
    }
    assert!(seen > 10, "{seen} matrices");
    assert!(
        row("q8_0[attn_v=q4_0,output=f16]").file_bytes != row("q8_0").file_bytes,
        "{rows:?}"
    );
    // Each importance matrix reached the quantizer: the files' quality moves.
    let kld = |recipe: &str| row(recipe).kld_mean.unwrap();
    assert_ne!(kld("q4_0"), kld("q4_0+imatrix"));
    assert_ne!(kld("q4_0"), kld("q4_0+imatrix=stories260k-calib.imatrix"));
    assert!(
        row("q4_0+imatrix=stories260k-calib.imatrix")
            .note
            .contains("stories260K-calib.imatrix.gguf"),
        "{rows:?}"
    );

    // Refused in one line before anything runs: a type llama.cpp will not
    // make without an importance matrix, a ternary type on a model not
    // trained for it, and a recipe naming an importance file the matrix
    // does not have.
    for (recipe, expected) in [
        ("iq2_xxs", "only with an importance matrix"),
        ("tq1_0", "-1, 0 or +1"),
        ("q4_0+imatrix=other", "names the importance file `other`"),
    ] {
        let body = config(&[fixture("stories260K.gguf")], &format!("{recipe:?}"));
        std::fs::write(dir.path().join("bench.toml"), body).unwrap();
        let out = xtask(dir.path(), &["bench", "--target", "local", "--matrix", "m"]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(lines[0].contains(expected), "{recipe}: {stderr}");
    }
}

#[test]
fn make_model_writes_the_same_bytes_twice_and_refuses_bad_requests_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let make = |out: &str| {
        xtask(
            dir.path(),
            &[
                "make-model",
                "--like",
                "distilgpt2",
                "--layers",
                "1",
                "--out",
                out,
            ],
        )
    };
    for out in ["a.gguf", "b.gguf"] {
        let made = make(out);
        assert!(made.status.success(), "{}", common::text(&made));
        assert!(
            String::from_utf8_lossy(&made.stdout).contains("synthetic distilgpt2 (1 layers"),
            "{}",
            common::text(&made)
        );
    }
    let a = std::fs::read(dir.path().join("a.gguf")).unwrap();
    assert!(
        a == std::fs::read(dir.path().join("b.gguf")).unwrap(),
        "same bytes"
    );
    for (args, expected) in [
        (vec!["--like", "gpt9"], "known: distilgpt2, llama3.2-1b"),
        (
            vec!["--like", "llama3.2-1b", "--layers", "0"],
            "give 1 to 16",
        ),
        (
            vec!["--like", "llama3.2-1b", "--layers", "17"],
            "give 1 to 16",
        ),
    ] {
        let mut all = vec!["make-model"];
        all.extend(args);
        let out = xtask(dir.path(), &all);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
}

#[test]
fn adaptive_invocations_time_an_imprecise_recipe_again_up_to_the_most_asked() {
    // Two matrices on the fixture model, two invocations each: `loose`
    // asks a precision two invocations reach, `strict` one none reaches,
    // so its recipe is timed in fresh processes up to `max_invocations`.
    let dir = tempfile::tempdir().unwrap();
    let base = config(&[fixture("stories260K.gguf")], "\"q8_0\"");
    let strict = base.replace("[model_matrices.m]", "[model_matrices.strict]")
        + "invocations = 2\nmax_invocations = 4\nprecision = 1e-9\n";
    let loose = base.replace("[model_matrices.m]", "[model_matrices.loose]")
        + "invocations = 2\nmax_invocations = 4\nprecision = 1e300\n";
    std::fs::write(dir.path().join("bench.toml"), strict + &loose).unwrap();
    for (matrix, expected) in [("strict", 4), ("loose", 2)] {
        let out = xtask(
            dir.path(),
            &["bench", "--target", "local", "--matrix", matrix],
        );
        assert!(out.status.success(), "{}", common::text(&out));
        let runs: Vec<std::path::PathBuf> = std::fs::read_dir(dir.path().join("results"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir())
            .collect();
        let run = runs
            .iter()
            .find(|r| {
                std::fs::read_to_string(r.join("run.json"))
                    .unwrap()
                    .contains(&format!("\"matrix\": \"{matrix}\""))
            })
            .unwrap_or_else(|| panic!("the run of {matrix} in {runs:?}"));
        let rows: Vec<ModelRow> = read_csv(&run.join("models.csv")).unwrap();
        let samples: Vec<wire::rows::SampleRow> = read_csv(&run.join("samples.csv")).unwrap();
        for r in &rows {
            assert_eq!(r.status, CellStatus::Ok, "{r:?}");
            assert_eq!(r.invocations, expected, "{matrix}: {r:?}");
            assert!(r.precision.is_some(), "{r:?}");
            let invocations: std::collections::BTreeSet<u32> = samples
                .iter()
                .filter(|s| s.cell_id == r.cell_id())
                .map(|s| s.invocation)
                .collect();
            assert_eq!(invocations.len() as u32, expected, "{matrix}: {r:?}");
        }
    }
}

#[test]
fn a_cached_recipe_cut_short_is_made_again_not_used() {
    // A model of its own (one weight's lowest bit changed), so its recipe
    // cache is this test's alone.
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(fixture("stories260K.gguf")).unwrap();
    let n = bytes.len();
    bytes[n - 4] ^= 1;
    let model = dir.path().join("own.gguf");
    std::fs::write(&model, &bytes).unwrap();
    std::fs::write(
        dir.path().join("bench.toml"),
        config(&[model.display().to_string()], "\"q8_0\""),
    )
    .unwrap();
    let cache = harness::builds::build::workspace_root()
        .join("target/quantbench-models")
        .join(wire::build_id::content_hash(&model).unwrap());
    let _ = std::fs::remove_dir_all(&cache);
    let run = || xtask(dir.path(), &["bench", "--target", "local", "--matrix", "m"]);
    let first = run();
    assert!(first.status.success(), "{}", common::text(&first));
    // What a power loss while the cache was written leaves: the name, and
    // half the bytes.
    let cached = cache.join("q8_0.gguf");
    let whole = std::fs::metadata(&cached).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cached)
        .unwrap()
        .set_len(whole / 2)
        .unwrap();
    let second = run();
    let all = common::text(&second);
    assert!(second.status.success(), "{all}");
    assert!(
        all.contains("q8_0.gguf does not match the SHA-256 recorded when it was made"),
        "{all}"
    );
    assert_eq!(std::fs::metadata(&cached).unwrap().len(), whole);
    let _ = std::fs::remove_dir_all(&cache);
}

/// The RAPL stand-in's schedule: 2 W until the agent has measured the
/// idle power (its log says so), 7 W after; a counter that wraps at 3 J
/// (every 0.43 s at 7 W, several times a test).
const IDLE_W: f64 = 2.0;
const BUSY_W: f64 = 7.0;
const RAPL_RANGE_UJ: u64 = 3_000_000;
/// How far a window's power may stray from the schedule. The stand-in
/// writes the counter every 2 ms when it is scheduled; on a busy 2-core
/// runner it may lag tens of ms, and a reading that lags at a window's
/// start but not at its end adds that lag's joules (CI once read 7.28 W,
/// 4% over, from windows of a few hundred ms). What the checks are for
/// is far outside this: a missed or doubled wrap of the 3 J counter is
/// 3 J in one window (several times its energy at 7 W), and idle read
/// for busy or the other way is 2 W against 7.
const SCHEDULE_TOLERANCE: f64 = 0.15;

/// Advances `energy_uj` under `zone` by the schedule every 2 ms until
/// `stop`; the level switches when `log` first says "power from".
fn rapl_stand_in(
    zone: std::path::PathBuf,
    log_dir: std::path::PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut microjoules = 0.0f64;
        let mut busy = false;
        let mut last = std::time::Instant::now();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(2));
            let now = std::time::Instant::now();
            let watts = if busy { BUSY_W } else { IDLE_W };
            microjoules += watts * 1e6 * (now - last).as_secs_f64();
            last = now;
            let counter = (microjoules as u64) % RAPL_RANGE_UJ;
            let part = zone.join("energy_uj.part");
            std::fs::write(&part, format!("{counter}\n")).unwrap();
            std::fs::rename(&part, zone.join("energy_uj")).unwrap();
            if !busy {
                busy = glob_logs(&log_dir).iter().any(|log| {
                    std::fs::read_to_string(log).is_ok_and(|t| t.contains("power from"))
                });
            }
        }
    })
}

/// Every agent.log under `dir`.
fn glob_logs(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n == "agent.log") {
                found.push(path);
            }
        }
    }
    found
}

#[test]
fn energy_per_token_and_idle_power_come_from_a_wrapping_rapl_counter_and_a_sustained_decode_is_drawn(
) {
    let dir = tempfile::tempdir().unwrap();
    // A RAPL tree where sysfs has none: `/sys/class` replaced in a private
    // mount namespace (no hwmon, no thermal zones, one package zone).
    let class = dir.path().join("class");
    let zone = class.join("powercap/intel-rapl:0");
    std::fs::create_dir_all(zone.join("intel-rapl:0:0")).unwrap();
    std::fs::write(zone.join("name"), "package-0\n").unwrap();
    std::fs::write(
        zone.join("max_energy_range_uj"),
        format!("{RAPL_RANGE_UJ}\n"),
    )
    .unwrap();
    std::fs::write(zone.join("energy_uj"), "0\n").unwrap();
    let body = config(&[fixture("stories260K.gguf")], "\"q8_0\"")
        .replace("multiple_choice", "# multiple_choice")
        .replace("repetitions = 2", "repetitions = 3")
        + "threads = [1]\ninvocations = 2\nidle_seconds = 1.0\nsustain_seconds = 60\nsustain_interval_seconds = 5\n"
        // A kernel cell after the model job: joules per GEMV at 7 W.
        + "[matrices.k]\ntypes = [\"Q4_0\"]\nshapes = [\"gemma3-1b.attn_kv\"]\nbatches = [1]\nthreads = [1]\ninvocations = 3\nmin_time_ms = 300\n";
    std::fs::write(dir.path().join("bench.toml"), &body).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stand_in = rapl_stand_in(zone.clone(), dir.path().join("results"), stop.clone());
    let out = std::process::Command::new("unshare")
        .current_dir(dir.path())
        .args([
            "-m",
            "sh",
            "-c",
            "mount --bind \"$0\" /sys/class && exec \"$@\"",
        ])
        .arg(&class)
        .arg(env!("CARGO_BIN_EXE_quantbench"))
        .args(["bench", "--target", "local", "--matrix", "m,k"])
        .output()
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    stand_in.join().unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    let run = only_run_dir(dir.path());
    let rows: Vec<ModelRow> = read_csv(&run.join("models.csv")).unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        assert_eq!(r.status, CellStatus::Ok, "{r:?}");
        assert_eq!(r.power_source, "rapl:package-0", "{r:?}");
        // The counter read across its wraps integrates the schedule: the
        // idle window at 2 W, the tests at 7 W (the level switches within
        // 2 ms of the agent's log line, long before the first test).
        let idle = r.idle_power_w.unwrap();
        let power = r.power_w.unwrap();
        assert!(
            (idle - IDLE_W).abs() < SCHEDULE_TOLERANCE * IDLE_W,
            "idle {idle}: {r:?}"
        );
        assert!(
            (power - BUSY_W).abs() < SCHEDULE_TOLERANCE * BUSY_W,
            "power {power}: {r:?}"
        );
        // Joules per token above idle: the idle power's share taken out of
        // every window, so exactly 1 - idle/power of the joules.
        let per_token = r.j_per_token.unwrap();
        let above = r.j_per_token_above_idle.unwrap();
        assert!(
            (above / per_token - (1.0 - idle / power)).abs() < 1e-9,
            "{per_token} {above}: {r:?}"
        );
        assert!((r.tokens_per_j.unwrap() * per_token - 1.0).abs() < 1e-9);
        // At 7 W, a token costs 7 W times its mean decode time. The window
        // also holds what the timing leaves out (the cache reset before
        // each repetition, untimed repetitions that extend it, on a busy
        // 2-core runner as slow as they like), so only the order is
        // checked: counting repetitions or calls instead of tokens would
        // be 8x (tg8) or 32x (pp32) off here.
        let tokens = (r.n_prompt + r.n_gen) as f64;
        let expected = BUSY_W * r.avg_ns.unwrap() * 1e-9 / tokens;
        assert!(
            (0.35..4.0).contains(&(per_token / expected)),
            "{per_token} J/token, expected about {expected}: {r:?}"
        );
        // Two invocations, each at least 5 readings; an interval.
        assert!(r.power_samples >= 10 && !r.power_few_samples, "{r:?}");
        assert!(r.j_per_token_stderr.is_some(), "{r:?}");
        assert!(r.wall_j_per_token.is_none(), "RAPL gives no wall figure");
    }
    // The kernel cell: each invocation's calls sampled, at 7 W; a GEMV's
    // joules are the board's power over its time.
    let cells: Vec<wire::rows::KernelRow> = read_csv(&run.join("kernels.csv")).unwrap();
    assert_eq!(cells.len(), 1, "{cells:?}");
    let cell = &cells[0];
    assert_eq!(cell.power_source, "rapl:package-0", "{cell:?}");
    assert!(
        (cell.power_w.unwrap() - BUSY_W).abs() < SCHEDULE_TOLERANCE * BUSY_W,
        "{cell:?}"
    );
    assert!(
        cell.power_samples >= 15 && !cell.power_few_samples,
        "{cell:?}"
    );
    let per_call = cell.j_per_call.unwrap();
    let expected = BUSY_W * cell.median_ns.unwrap() * 1e-9;
    // The window's mean call against the median call: on a busy runner
    // a few slow calls pull the mean up, so only the order is checked
    // (joules per invocation instead of per call would be 100s of times).
    assert!(
        (0.35..4.0).contains(&(per_call / expected)),
        "{per_call} vs {expected}: {cell:?}"
    );
    let flop = 2.0 * (cell.m * cell.k * cell.n) as f64;
    assert!((cell.gflops_per_j.unwrap() - flop / 1e9 / per_call).abs() < 1e-9 * flop);
    let probe: wire::probe::BoardProbe =
        wire::files::read_json(&run.join("boards/local/probe.json")).unwrap();
    let power = probe.power.unwrap();
    assert_eq!(power.source.as_deref(), Some("rapl:package-0"));
    assert!(power.idle.unwrap().samples >= 5, "{power:?}");
    let summary = std::fs::read_to_string(run.join("summary.md")).unwrap();
    assert!(
        summary.contains("power from rapl:package-0, idle 2.0"),
        "{summary}"
    );
    // 60 s of decoding without pause, a row every 5 s with its power.
    let sustained: Vec<wire::rows::SustainRow> = read_csv(&run.join("sustained.csv")).unwrap();
    assert!((11..=13).contains(&sustained.len()), "{sustained:?}");
    assert!(sustained.last().unwrap().elapsed_s >= 59.0);
    for s in &sustained {
        assert!(s.tokens > 0 && s.tokens_per_s > 0.0, "{s:?}");
        let watts = s.power_w.unwrap();
        assert!(
            (watts - BUSY_W).abs() < SCHEDULE_TOLERANCE * BUSY_W,
            "{s:?}"
        );
    }
    for plot in ["model_sustained", "model_energy_vs_kld"] {
        assert!(run.join(format!("plots/{plot}.png")).exists(), "{plot}");
    }
}
