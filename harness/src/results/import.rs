//! Bringing stock llama.cpp's `llama-bench -o jsonl` (or `-o json`) results
//! into a run directory as model rows, so `compare` can put quantbench's
//! numbers beside stock llama.cpp's on the same GGUF files. A llama-bench
//! row's file name gives the recipe (quantbench's cache names recipe files
//! `<recipe>.gguf`); `--model` gives the model name our rows use. Several
//! llama-bench runs' outputs in one file are invocations of each cell.

use crate::runs::manifest::{BoardOutcome, HostInfo, MatrixRecord, RunManifest, Versions};
use crate::runs::session::unique_run_id;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use thiserror::Error;
use wire::files::{
    write_json, CsvAppender, ResultsError, MANIFEST_FILE, MODEL_ROWS_FILE, SAMPLES_FILE,
};
use wire::rows::{CellStatus, ModelRow, SampleRow};

#[derive(Debug, Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: not a llama-bench result ({source}); expected the output of `llama-bench -o jsonl` or `-o json`")]
    Parse {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
    #[error("{0}: no llama-bench results in the file")]
    Empty(PathBuf),
    #[error("--board `{0}`: a board name may hold only letters, digits, `.`, `_` and `-`")]
    BadBoard(String),
    #[error(transparent)]
    Results(#[from] ResultsError),
}

/// The llama-bench fields quantbench uses (its JSON has more).
#[derive(Debug, Deserialize)]
struct LlamaBenchRecord {
    #[serde(default)]
    build_commit: String,
    /// `-mmp`: false for a `--no-mmap` load (older files lack it: mmap).
    #[serde(default)]
    use_mmap: Option<bool>,
    #[serde(default)]
    cpu_info: String,
    model_filename: String,
    #[serde(default)]
    model_type: String,
    #[serde(default)]
    model_size: u64,
    #[serde(default)]
    model_n_params: u64,
    n_threads: usize,
    n_prompt: usize,
    n_gen: usize,
    #[serde(default)]
    n_depth: usize,
    #[serde(default)]
    n_batch: usize,
    #[serde(default)]
    n_ubatch: usize,
    #[serde(default)]
    type_k: String,
    #[serde(default)]
    type_v: String,
    /// `true`/`false` in older llama-bench, -1 (auto), 0, 1 in newer.
    #[serde(default)]
    flash_attn: Option<serde_json::Value>,
    #[serde(default)]
    cpu_mask: String,
    #[serde(default)]
    cpu_strict: Option<serde_json::Value>,
    #[serde(default)]
    poll: Option<u32>,
    #[serde(default)]
    test_time: String,
    avg_ns: f64,
    stddev_ns: f64,
    avg_ts: f64,
    stddev_ts: f64,
    #[serde(default)]
    samples_ns: Vec<f64>,
}

/// llama-bench's flash attention as a model row's setting.
fn flash_attn_setting(value: Option<&serde_json::Value>) -> &'static str {
    match value {
        Some(serde_json::Value::Bool(true)) => "on",
        Some(serde_json::Value::Bool(false)) => "off",
        Some(v) if v.as_i64() == Some(1) => "on",
        Some(v) if v.as_i64() == Some(0) => "off",
        Some(serde_json::Value::String(s)) if s == "on" || s == "enabled" => "on",
        Some(serde_json::Value::String(s)) if s == "off" || s == "disabled" => "off",
        _ => "auto",
    }
}

/// What an import made.
#[derive(Debug)]
pub struct Imported {
    pub run_dir: PathBuf,
    pub rows: usize,
}

/// Reads `file` and writes `<results_root>/<time>-llama-bench-<commit>/`
/// with `models.csv`, `samples.csv` and `run.json`, rows under `board`.
pub fn import_llama_bench(
    file: &Path,
    results_root: &Path,
    board: &str,
    model_name: Option<&str>,
) -> Result<Imported, ImportError> {
    if !crate::runs::config::is_safe_name(board) {
        return Err(ImportError::BadBoard(board.to_string()));
    }
    let text = std::fs::read_to_string(file).map_err(|source| ImportError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    let records: Vec<LlamaBenchRecord> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).map_err(|source| ImportError::Parse {
            path: file.to_path_buf(),
            line: source.line(),
            source,
        })?
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|source| ImportError::Parse {
                    path: file.to_path_buf(),
                    line: i + 1,
                    source,
                })
            })
            .collect::<Result<_, _>>()?
    };
    let first = records
        .first()
        .ok_or_else(|| ImportError::Empty(file.to_path_buf()))?;
    let commit = format!("llama.cpp-{}", first.build_commit);
    let run_id = unique_run_id(results_root, &format!("llama-bench-{}", first.build_commit));
    let run_dir = results_root.join(&run_id);
    let io = |source| ResultsError::Io {
        path: run_dir.clone(),
        source,
    };
    std::fs::create_dir_all(&run_dir).map_err(io)?;
    let mut rows = CsvAppender::<ModelRow>::open(&run_dir.join(MODEL_ROWS_FILE))?;
    let mut samples = CsvAppender::<SampleRow>::open(&run_dir.join(SAMPLES_FILE))?;
    // A test that appears again is another llama-bench process's (the
    // outputs of several runs put one after another): each is an
    // invocation of one cell, so `compare` sees the spread between
    // processes as it does in our runs.
    let mut cells: Vec<(ModelRow, Vec<Vec<f64>>)> = Vec::new();
    for r in &records {
        let path = Path::new(&r.model_filename);
        let recipe = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let row = ModelRow {
            run_id: run_id.clone(),
            board: board.to_string(),
            emulated: false,
            agent_build: format!("llama-bench {}", r.build_commit),
            llama_cpp: format!("llama-bench build {}", r.build_commit),
            git_commit: commit.clone(),
            status: CellStatus::Ok,
            note: format!("imported from stock llama-bench ({})", r.cpu_info),
            model_filename: model_name
                .map(str::to_string)
                .unwrap_or_else(|| r.model_filename.clone()),
            recipe,
            build: String::new(),
            model_type: r.model_type.clone(),
            model_size: r.model_size,
            model_n_params: r.model_n_params,
            file_bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
            bits_per_weight: r.model_size as f64 * 8.0 / r.model_n_params.max(1) as f64,
            fallbacks: String::new(),
            n_threads: r.n_threads,
            n_prompt: r.n_prompt,
            n_gen: r.n_gen,
            test: wire::model_settings::test_name(r.n_prompt, r.n_gen, r.n_depth),
            n_depth: r.n_depth,
            type_k: r.type_k.to_ascii_lowercase(),
            type_v: r.type_v.to_ascii_lowercase(),
            flash_attn: flash_attn_setting(r.flash_attn.as_ref()).into(),
            flash_attn_used: String::new(),
            n_batch: r.n_batch,
            n_ubatch: r.n_ubatch,
            cpu_mask: r.cpu_mask.clone(),
            // A bool in llama-bench's JSON, 0/1 in its SQL.
            cpu_strict: matches!(&r.cpu_strict, Some(v) if v.as_bool() == Some(true) || v.as_i64() == Some(1)),
            poll: r.poll,
            // llama-bench does not write its --prio.
            priority: String::new(),
            load_mode: if r.use_mmap == Some(false) {
                "no-mmap".into()
            } else {
                String::new()
            },
            load_cold_ms: None,
            ttft_ms: None,
            kv_bytes: None,
            avg_ns: Some(r.avg_ns),
            stddev_ns: Some(r.stddev_ns),
            avg_ts: Some(r.avg_ts),
            stddev_ts: Some(r.stddev_ts),
            load_ms: None,
            peak_rss_bytes: None,
            // One llama-bench process; more where the test appears again.
            invocations: 1,
            precision: None,
            ppl: None,
            kld_mean: None,
            kld_p99: None,
            top1_agreement: None,
            ppl_stderr: None,
            kld_stderr: None,
            kld_p90: None,
            kld_max: None,
            top1_stderr: None,
            mc_accuracy: None,
            mc_stderr: None,
            generated_text: String::new(),
            repetition_score: None,
            synthetic: false,
            finished_at: r.test_time.clone(),
            // llama-bench records neither heat nor power.
            ..ModelRow::default()
        };
        let ns: Vec<f64> = r.samples_ns.clone();
        match cells.iter_mut().find(|(c, _)| c.cell_id() == row.cell_id()) {
            Some((_, invocations)) => invocations.push(ns),
            None => cells.push((row, vec![ns])),
        }
    }
    let written = cells.len();
    for (mut row, invocations) in cells {
        for (invocation, ns) in invocations.iter().enumerate() {
            for (repetition, &ns) in ns.iter().enumerate() {
                samples.append_unsynced(&SampleRow {
                    run_id: run_id.clone(),
                    board: board.to_string(),
                    cell_id: row.cell_id(),
                    repetition: repetition as u32,
                    invocation: invocation as u32,
                    round: invocation as u32,
                    ns: ns as u64,
                })?;
            }
        }
        samples.sync()?;
        if invocations.len() > 1 {
            // The row's figures over every process's repetitions.
            let all: Vec<f64> = invocations.iter().flatten().copied().collect();
            let tokens = (row.n_prompt + row.n_gen) as f64;
            let ts: Vec<f64> = all.iter().map(|ns| tokens * 1e9 / ns).collect();
            let (ns, ts) = (
                wire::stats::Summary::of(&all),
                wire::stats::Summary::of(&ts),
            );
            row.avg_ns = ns.map(|s| s.mean);
            row.stddev_ns = ns.map(|s| s.stddev);
            row.avg_ts = ts.map(|s| s.mean);
            row.stddev_ts = ts.map(|s| s.stddev);
            row.invocations = invocations.len() as u32;
            row.precision = wire::stats::relative_half_width(&invocations, 0.95);
        }
        rows.append(&row)?;
    }
    let now = wire::utc_now_rfc3339();
    write_json(
        &run_dir.join(MANIFEST_FILE),
        &RunManifest {
            run_id: run_id.clone(),
            started_at: first.test_time.clone(),
            finished_at: Some(now),
            matrix: "import:llama-bench".into(),
            matrices: vec![MatrixRecord {
                name: "llama-bench".into(),
                kind: "model".into(),
                spec: serde_json::json!({ "imported_from": file.display().to_string() }),
            }],
            config_path: String::new(),
            seed: 0,
            git_commit: commit,
            target: board.to_string(),
            versions: Versions {
                quantbench: env!("CARGO_PKG_VERSION").to_string(),
                llama_cpp_sys_2: String::new(),
                rustc: String::new(),
                agent_builds: Vec::new(),
            },
            host: HostInfo::current(),
            boards: vec![BoardOutcome {
                board: board.to_string(),
                ok: records.len(),
                ..Default::default()
            }],
            resumed_at: Vec::new(),
            rejected_rows: Vec::new(),
        },
    )?;
    Ok(Imported {
        run_dir,
        rows: written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_rows_become_model_rows_with_their_repetitions() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lb.jsonl");
        std::fs::write(
            &file,
            concat!(
                r#"{"build_commit":"abc1234","cpu_info":"AMD","model_filename":"/m/q8_0.gguf","model_type":"llama ?B Q8_0","model_size":100,"model_n_params":80,"n_threads":2,"n_prompt":64,"n_gen":0,"test_time":"2026-11-25T10:00:00Z","avg_ns":2000,"stddev_ns":10,"avg_ts":32000,"stddev_ts":100,"samples_ns":[1990,2010]}"#,
                "\n",
                r#"{"build_commit":"abc1234","cpu_info":"AMD","model_filename":"/m/q8_0.gguf","model_type":"llama ?B Q8_0","model_size":100,"model_n_params":80,"n_threads":2,"n_prompt":0,"n_gen":16,"test_time":"2026-11-25T10:00:01Z","avg_ns":1000,"stddev_ns":10,"avg_ts":16000,"stddev_ts":100,"samples_ns":[990,1010]}"#,
                "\n",
                r#"{"build_commit":"abc1234","cpu_info":"AMD","model_filename":"/m/q8_0.gguf","model_type":"llama ?B Q8_0","model_size":100,"model_n_params":80,"n_batch":2048,"n_ubatch":512,"type_k":"q8_0","type_v":"q8_0","flash_attn":true,"n_threads":2,"n_prompt":0,"n_gen":16,"n_depth":512,"test_time":"2026-11-25T10:00:02Z","avg_ns":1500,"stddev_ns":10,"avg_ts":10000,"stddev_ts":100,"samples_ns":[1490,1510]}"#,
                "\n"
            ),
        )
        .unwrap();
        let results = dir.path().join("results");
        let imported =
            import_llama_bench(&file, &results, "local", Some("stories260K.gguf")).unwrap();
        assert_eq!(imported.rows, 3);
        let rows: Vec<ModelRow> =
            wire::files::read_csv(&imported.run_dir.join(MODEL_ROWS_FILE)).unwrap();
        assert_eq!(rows[1].cell_id(), "stories260K.gguf/q8_0/tg16/t2");
        assert_eq!(rows[1].key().settings, "", "llama-bench's defaults");
        // Depth, KV-cache types and flash attention, as llama-bench ran them.
        assert_eq!(
            rows[2].cell_id(),
            "stories260K.gguf/q8_0/tg16+d512/t2[ctk=q8_0/ctv=q8_0/fa=on/b=2048/ub=512]"
        );
        assert_eq!(
            rows[2].key().settings,
            "ctk=q8_0/ctv=q8_0/fa=on/b=2048/ub=512"
        );
        let samples: Vec<SampleRow> =
            wire::files::read_csv(&imported.run_dir.join(SAMPLES_FILE)).unwrap();
        assert_eq!(samples.len(), 6);
        crate::results::run_dir::RunData::load(&imported.run_dir).unwrap();

        // Two llama-bench runs one after another: each cell once, with two
        // invocations, its figures over both.
        let once = std::fs::read_to_string(&file).unwrap();
        let twice = dir.path().join("lb2.jsonl");
        std::fs::write(&twice, once.replace("[990,1010]", "[1090,1110]") + &once).unwrap();
        let imported =
            import_llama_bench(&twice, &results, "local", Some("stories260K.gguf")).unwrap();
        assert_eq!(imported.rows, 3);
        let rows: Vec<ModelRow> =
            wire::files::read_csv(&imported.run_dir.join(MODEL_ROWS_FILE)).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1].invocations, 2);
        assert_eq!(rows[1].avg_ns, Some(1050.0));
        assert!(rows[1].precision.is_some());
        let samples: Vec<SampleRow> =
            wire::files::read_csv(&imported.run_dir.join(SAMPLES_FILE)).unwrap();
        assert_eq!(samples.len(), 12);
        assert!(samples.iter().any(|s| s.invocation == 1));

        // A commit that climbs folders stays one folder under results;
        // a board name with markup is refused.
        let climbing = std::fs::read_to_string(&file)
            .unwrap()
            .replace("abc1234", "x/../../../../tmp/y");
        std::fs::write(&file, climbing).unwrap();
        let imported = import_llama_bench(&file, &results, "local", None).unwrap();
        assert_eq!(imported.run_dir.parent(), Some(results.as_path()));
        assert!(imported.run_dir.is_dir());
        let e = import_llama_bench(&file, &results, "\"><img src=x>", None).unwrap_err();
        assert!(e.to_string().contains("--board"), "{e}");

        std::fs::write(&file, "{\"model_filename\": 3}\n").unwrap();
        let e = import_llama_bench(&file, &results, "local", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 1") && e.contains("llama-bench -o jsonl"),
            "{e}"
        );
    }
}
