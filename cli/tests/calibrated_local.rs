//! Calibrated recipes end to end on `local`: the fixture model quantized
//! with an importance matrix and with GPTQ, both learned from a calibration
//! text the quality figures are not measured on.

mod common;
use common::{fixture, only_run_dir, text, xtask};

use wire::files::read_csv;
use wire::rows::{CellStatus, ModelRow};

/// A folder whose bench.toml has model matrix `m` on the fixture model.
fn config_dir(recipes: &str, calibration: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bench.toml"),
        format!(
            "[model_matrices.m]\nmodels = [{:?}]\nrecipes = [{recipes}]\ntext = {:?}\ncalibration = {calibration:?}\nctx = 128\nprompt = \"Once upon a time\"\ngenerate_tokens = 16\nn_prompt = 32\nn_gen = 8\nrepetitions = 2\n",
            fixture("stories260K.gguf"),
            fixture("stories-eval.txt"),
        ),
    )
    .unwrap();
    dir
}

#[test]
fn calibrated_recipes_keep_their_type_and_gptq_and_awq_lower_the_kl_divergence() {
    let dir = config_dir(
        "\"f32\", \"q4_0\", \"q4_0+imatrix\", \"gptq-q4_0\", \"awq-q4_0\", \"q8_0\", \"gptq-q8_0\"",
        &fixture("stories-calib.txt"),
    );
    let out = xtask(dir.path(), &["bench", "--target", "local", "--matrix", "m"]);
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("flatter"),
        "calibrated on another text: {stderr}"
    );
    let run = only_run_dir(dir.path());
    let rows: Vec<ModelRow> = read_csv(&run.join("models.csv")).unwrap();
    let tg = |recipe: &str| {
        rows.iter()
            .find(|r| r.recipe == recipe && r.test == "tg8")
            .unwrap_or_else(|| panic!("no tg row for {recipe}: {rows:?}"))
    };
    for recipe in [
        "q4_0",
        "q4_0+imatrix",
        "gptq-q4_0",
        "awq-q4_0",
        "q8_0",
        "gptq-q8_0",
    ] {
        assert_eq!(tg(recipe).status, CellStatus::Ok, "{:?}", tg(recipe));
    }
    // Same type, same tensors: the same file size and bits per weight, so
    // the same kernels run them.
    for (plain, calibrated) in [
        ("q4_0", "q4_0+imatrix"),
        ("q4_0", "gptq-q4_0"),
        ("q4_0", "awq-q4_0"),
        ("q8_0", "gptq-q8_0"),
    ] {
        assert_eq!(
            tg(plain).model_size,
            tg(calibrated).model_size,
            "{calibrated}"
        );
        assert_eq!(tg(plain).bits_per_weight, tg(calibrated).bits_per_weight);
    }
    let kld = |recipe: &str| tg(recipe).kld_mean.unwrap();
    assert!(
        kld("gptq-q4_0") < kld("q4_0") * 0.9,
        "gptq-q4_0 {} vs q4_0 {}",
        kld("gptq-q4_0"),
        kld("q4_0")
    );
    // AWQ's scales, searched on the calibration text, judged on another:
    // measured 0.0714 against 0.0855 (the search keeps alpha 0, plain
    // rounding, where nothing is gained, so a broken fold shows here).
    assert!(
        kld("awq-q4_0") < kld("q4_0") * 0.95,
        "awq-q4_0 {} vs q4_0 {}",
        kld("awq-q4_0"),
        kld("q4_0")
    );
    assert!(
        kld("gptq-q8_0") < kld("q8_0"),
        "{} vs {}",
        kld("gptq-q8_0"),
        kld("q8_0")
    );
    assert_ne!(
        kld("q4_0+imatrix"),
        kld("q4_0"),
        "the importance changed the rounding"
    );
    assert!(
        tg("q4_0+imatrix")
            .note
            .contains("importance matrix from stories-calib.txt (ctx 128, 17 chunks)"),
        "{:?}",
        tg("q4_0+imatrix").note
    );
    assert!(
        tg("gptq-q4_0")
            .note
            .contains("GPTQ calibrated on stories-calib.txt"),
        "{:?}",
        tg("gptq-q4_0").note
    );
    // Per matrix, before and after compensation, in the run.
    let records: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("calibration.json")).unwrap())
            .unwrap();
    let gptq = records
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["recipe"] == "gptq-q4_0")
        .unwrap_or_else(|| panic!("{records:#}"));
    let matrices = gptq["matrices"].as_array().unwrap();
    // 5 layers x 6 matrices (ffn_down falls back to f16: n_ff 172).
    assert_eq!(matrices.len(), 30, "{gptq:#}");
    for m in matrices {
        let (before, after) = (
            m["error_rtn"].as_f64().unwrap(),
            m["error_gptq"].as_f64().unwrap(),
        );
        assert!(after < before && after > 0.0, "{m}");
    }
    // AWQ: per group of matrices sharing an input, the alpha chosen.
    let awq = records
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["recipe"] == "awq-q4_0")
        .unwrap_or_else(|| panic!("{records:#}"));
    assert_eq!(awq["method"], "awq");
    // 5 blocks x (attention input, FFN input).
    assert_eq!(awq["alphas"].as_array().unwrap().len(), 10, "{awq:#}");
    assert!(
        awq["mean_error_gptq"].as_f64() < awq["mean_error_rtn"].as_f64(),
        "{awq:#}"
    );
    assert!(
        tg("awq-q4_0")
            .note
            .contains("AWQ calibrated on stories-calib.txt"),
        "{:?}",
        tg("awq-q4_0").note
    );
    let summary = std::fs::read_to_string(run.join("summary.md")).unwrap();
    assert!(summary.contains("| gptq-q4_0 |"), "{summary}");
    assert!(summary.contains("| awq-q4_0 |"), "{summary}");
    // The chooser: which recipes no other beats on speed, closeness and
    // memory (f32, the reference, always is one), in the summary and
    // plotted.
    let choice = summary
        .lines()
        .find(|l| l.starts_with("**Which recipe** (stories260K.gguf)"))
        .unwrap_or_else(|| panic!("{summary}"));
    assert!(choice.contains("f32 ("), "{choice}");
    assert!(run.join("plots/model_recipe_chooser.svg").exists());
}

#[test]
fn codebook_recipes_are_judged_on_their_decoded_weights_and_sized_as_stored() {
    let dir = config_dir(
        "\"q4_0\", \"iq4_nl\", \"sq4\", \"sq4+s0.45\", \"sq3\"",
        &fixture("stories-calib.txt"),
    );
    let out = xtask(dir.path(), &["bench", "--target", "local", "--matrix", "m"]);
    assert!(out.status.success(), "{}", text(&out));
    let run = only_run_dir(dir.path());
    let rows: Vec<ModelRow> = read_csv(&run.join("models.csv")).unwrap();
    let tg = |recipe: &str| {
        rows.iter()
            .find(|r| r.recipe == recipe && r.test == "tg8")
            .unwrap_or_else(|| panic!("no tg row for {recipe}: {rows:?}"))
    };
    for recipe in ["sq4", "sq4+s0.45", "sq3"] {
        let r = tg(recipe);
        assert_eq!(r.status, CellStatus::Ok, "{r:?}");
        // Quality from llama.cpp on the decoded weights...
        assert!(r.kld_mean.is_some() && r.ppl.is_some() && !r.generated_text.is_empty());
        // ...and no speed or memory: those would be the F16 file's.
        assert!(r.avg_ts.is_none() && r.peak_rss_bytes.is_none(), "{r:?}");
        assert!(
            r.note.contains("codebooks on 31 matrices (30 with sensitivities from the importance matrix from stories-calib.txt")
                && r.note.contains("quality only, speed in the kernel matrix"),
            "{}",
            r.note
        );
        // The size is the scheme's, not the decoded file's (F16 matrices:
        // about 16 bits per weight).
        assert!(
            r.bits_per_weight < 12.0 && r.model_size < r.file_bytes,
            "{r:?}"
        );
        let bits = r.model_size as f64 * 8.0 / r.model_n_params as f64;
        assert!((bits - r.bits_per_weight).abs() < 1e-3, "{r:?}");
    }
    assert!(tg("sq3").bits_per_weight < tg("sq4").bits_per_weight);
    assert!(tg("sq4").bits_per_weight < tg("sq4+s0.45").bits_per_weight);
    // The goal on the fixture: SQ4 closer to the unquantized model
    // than GGML's 4-bit types (measured 0.047 against 0.086 and 0.062).
    let kld = |recipe: &str| tg(recipe).kld_mean.unwrap();
    assert!(
        kld("sq4") < kld("q4_0") && kld("sq4") < kld("iq4_nl"),
        "sq4 {} q4_0 {} iq4_nl {}",
        kld("sq4"),
        kld("q4_0"),
        kld("iq4_nl")
    );
    let summary = std::fs::read_to_string(run.join("summary.md")).unwrap();
    assert!(summary.contains("| sq4+s0.45 |"), "{summary}");

    // A bad spelling is one line naming it and what is allowed.
    let bad = config_dir("\"sq4+s12\"", &fixture("stories-calib.txt"));
    let out = xtask(bad.path(), &["bench", "--target", "local", "--matrix", "m"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert!(
        errors.len() == 1 && errors[0].contains("sq4+s12") && errors[0].contains("(0, 10]"),
        "{stderr}"
    );
}

#[test]
fn a_calibration_text_missing_or_shorter_than_one_context_gets_one_line() {
    let missing = config_dir("\"q4_0+imatrix\"", "/nonexistent/calib.txt");
    let out = xtask(
        missing.path(),
        &["bench", "--target", "local", "--matrix", "m"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("calibration text /nonexistent/calib.txt does not exist"),
        "{}",
        text(&out)
    );
    assert_eq!(stderr.lines().filter(|l| l.starts_with("error")).count(), 1);

    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "Once upon a time, there was a cat.").unwrap();
    let cfg = config_dir("\"gptq-q4_0\"", &short.display().to_string());
    let out = xtask(cfg.path(), &["bench", "--target", "local", "--matrix", "m"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("short.txt has") && stderr.contains("at least one context of 128 tokens"),
        "{}",
        text(&out)
    );
    assert!(!cfg.path().join("results").exists() || only_run_dir_is_absent(cfg.path()));

    let cfg = config_dir("\"gptq-q4_0\"", &fixture("stories-calib.txt"));
    let toml = std::fs::read_to_string(cfg.path().join("bench.toml")).unwrap();
    let models_line = toml.lines().find(|l| l.starts_with("models")).unwrap();
    std::fs::write(
        cfg.path().join("bench.toml"),
        toml.replace(models_line, "models = [\"synthetic:distilgpt2:1\"]"),
    )
    .unwrap();
    let out = xtask(cfg.path(), &["bench", "--target", "local", "--matrix", "m"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("a synthetic model's random weights have nothing to calibrate"),
        "{}",
        text(&out)
    );

    for (recipe, expect) in [
        (
            "f32+imatrix",
            "an importance matrix weights a quantized type's rounding",
        ),
        ("gptq-q4_k", "GPTQ is implemented for q4_0, q8_0"),
        ("awq-iq2_xs", "AWQ is implemented for q8_0"),
    ] {
        let cfg = config_dir(&format!("{recipe:?}"), &fixture("stories-calib.txt"));
        let out = xtask(cfg.path(), &["bench", "--target", "local", "--matrix", "m"]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(expect),
            "{}",
            text(&out)
        );
    }
}

/// No run directory was made: the failure came before the run started.
fn only_run_dir_is_absent(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir.join("results"))
        .map(|d| d.flatten().all(|e| !e.path().is_dir()))
        .unwrap_or(true)
}
