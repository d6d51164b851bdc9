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
fn calibrated_recipes_keep_their_type_and_gptq_lowers_the_kl_divergence() {
    let dir = config_dir(
        "\"f32\", \"q4_0\", \"q4_0+imatrix\", \"gptq-q4_0\", \"q8_0\", \"gptq-q8_0\"",
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
    for recipe in ["q4_0", "q4_0+imatrix", "gptq-q4_0", "q8_0", "gptq-q8_0"] {
        assert_eq!(tg(recipe).status, CellStatus::Ok, "{:?}", tg(recipe));
    }
    // Same type, same tensors: the same file size and bits per weight, so
    // the same kernels run them.
    for (plain, calibrated) in [
        ("q4_0", "q4_0+imatrix"),
        ("q4_0", "gptq-q4_0"),
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
    let summary = std::fs::read_to_string(run.join("summary.md")).unwrap();
    assert!(summary.contains("| gptq-q4_0 |"), "{summary}");
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
        ("f32+imatrix", "`+imatrix` calibrates a quantized type"),
        ("gptq-q4_k", "GPTQ is implemented for q4_0, q8_0"),
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
