//! Fuzzing every parser that reads what a user or a board writes: inputs
//! mutated from our fixtures and from the bad inputs issue 23 named, fed to
//! the parser; any panic fails with the smallest input found, and each
//! target prints how many inputs ran and which outcomes they reached.
//! CI runs a few hundred inputs a target (seconds);
//! `QUANTBENCH_FUZZ_CASES=100000 cargo test --release -p harness --test
//! fuzz -- --nocapture` runs longer. (`kernels/tests/fuzz_imatrix.rs` feeds
//! importance matrices through the check to GGML itself.)

use harness::builds::build::workspace_root;
use std::path::Path;
use wire::fuzzing::{cases, mutated, run};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(workspace_root().join("fixtures").join(name)).unwrap()
}

/// A GGUF header with `n_kv` keys asking for huge sizes (issue 23: a small
/// crafted file asking for gigabytes).
fn crafted_gguf() -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(17u64.to_le_bytes());
    b.extend(b"general.alignment");
    b.extend(4u32.to_le_bytes());
    b.extend(32u32.to_le_bytes());
    b.extend(4u64.to_le_bytes());
    b.extend(b"huge");
    b.extend(2u32.to_le_bytes());
    for d in [1u64 << 20, 1 << 20] {
        b.extend(d.to_le_bytes());
    }
    b.extend(0u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b
}

/// Headers that fail the checks the mutations rarely reach: an array of
/// arrays, a tensor whose columns are not whole blocks, a tensor twice, a
/// key twice, a key read as u32 holding a string, every scalar width and a
/// bool of 5 (found missing by `.ci/fuzz-coverage`).
fn rare_ggufs() -> Vec<Vec<u8>> {
    let start = |n_tensors: u64, n_kv: u64| {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(n_tensors.to_le_bytes());
        b.extend(n_kv.to_le_bytes());
        b
    };
    let tensor = |b: &mut Vec<u8>, name: &[u8], cols: u64, ty: u32| {
        b.extend((name.len() as u64).to_le_bytes());
        b.extend(name);
        b.extend(1u32.to_le_bytes());
        b.extend(cols.to_le_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(0u64.to_le_bytes());
    };
    let mut nested = start(0, 1);
    nested.extend(1u64.to_le_bytes());
    nested.extend(b"a");
    nested.extend(9u32.to_le_bytes());
    nested.extend(9u32.to_le_bytes());
    nested.extend(0u64.to_le_bytes());
    let mut shape = start(1, 0);
    tensor(&mut shape, b"w", 33, 2); // Q4_0 blocks hold 32
    shape.extend([0u8; 64]);
    let mut twice = start(2, 0);
    tensor(&mut twice, b"w", 8, 0);
    tensor(&mut twice, b"w", 8, 0);
    twice.extend([0u8; 64]);
    let key = |b: &mut Vec<u8>, name: &[u8], ty: u32, value: &[u8]| {
        b.extend((name.len() as u64).to_le_bytes());
        b.extend(name);
        b.extend(ty.to_le_bytes());
        b.extend(value);
    };
    let mut duplicate = start(0, 2);
    key(&mut duplicate, b"a", 0, &[1]);
    key(&mut duplicate, b"a", 0, &[1]);
    // A key our code reads with a typed getter, of another type.
    let mut mistyped = start(0, 1);
    let mut text = 4u64.to_le_bytes().to_vec();
    text.extend(b"1234");
    key(&mut mistyped, b"imatrix.chunk_count", 8, &text);
    // Every scalar width, then a bool that is neither 0 nor 1.
    let mut scalars = start(0, 5);
    key(&mut scalars, b"c", 2, &7u16.to_le_bytes());
    key(&mut scalars, b"d", 10, &7u64.to_le_bytes());
    key(&mut scalars, b"e", 7, &[1]);
    key(&mut scalars, b"f", 12, &1.5f64.to_le_bytes());
    key(&mut scalars, b"g", 7, &[5]);
    vec![nested, shape, twice, duplicate, mistyped, scalars]
}

#[test]
fn gguf_header_check() {
    let model = fixture("stories260K.gguf");
    let imatrix = fixture("stories260K-calib.imatrix.gguf");
    let header_len = wire::gguf::check(&model[..], model.len() as u64)
        .unwrap()
        .data_offset as usize;
    let mut known: Vec<&str> = wire::gguf::CHECKS.to_vec();
    known.push("ok");
    run(
        "gguf header",
        cases(1500),
        mutated(
            [vec![model, imatrix, crafted_gguf()], rare_ggufs()].concat(),
            header_len,
        ),
        &known,
        |bytes| match wire::gguf::check(&bytes[..], bytes.len() as u64) {
            Ok(header) => {
                // Whatever passes lies inside the file.
                for t in &header.tensors {
                    assert!(t.offset + t.bytes <= bytes.len() as u64);
                }
                "ok".into()
            }
            Err(e) => {
                assert!(!e.to_string().contains('\n'), "one line: {e}");
                e.check.to_string()
            }
        },
    );
}

/// A real kernels.csv: the schema's header and two rows.
fn kernels_csv() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kernels.csv");
    let mut out = wire::files::CsvAppender::open(&path).unwrap();
    out.append(&wire::rows::example_row("llama3.2-1b.attn_q/Q4_0/b1/t1"))
        .unwrap();
    out.append(&wire::rows::example_row("llama3.2-1b.attn_q/Q8_0/b1/t1"))
        .unwrap();
    drop(out);
    std::fs::read(&path).unwrap()
}

#[test]
fn csv_rows_from_a_board() {
    let csv = kernels_csv();
    // Issue 23's: a half row (full disk), rows claiming another board.
    let mut half = csv.clone();
    half.truncate(csv.len() - 40);
    let other = String::from_utf8_lossy(&csv)
        .replace(",local,", ",pi5,")
        .into_bytes();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kernels.csv");
    run(
        "csv rows",
        cases(1000),
        mutated(vec![csv.clone(), half, other], csv.len()),
        &[
            "rows",
            "rows and skipped lines",
            "only skipped lines",
            "nothing",
        ],
        |bytes| {
            std::fs::write(&path, &bytes).unwrap();
            let read = wire::files::read_rows::<wire::rows::KernelRow>(&path).unwrap();
            match (read.rows.is_empty(), read.skipped.is_empty()) {
                (false, true) => "rows",
                (false, false) => "rows and skipped lines",
                (true, false) => "only skipped lines",
                (true, true) => "nothing",
            }
            .into()
        },
    );
}

#[test]
fn progress_lines() {
    let lines: Vec<Vec<u8>> = [
        r#"{"event":"started","total":4,"bandwidth_gbps":12.5}"#,
        r#"{"event":"cell_started","index":0,"cell_id":"a/Q4_0/b1/t1"}"#,
        r#"{"event":"cell_finished","index":0,"cell_id":"a/Q4_0/b1/t1","status":"ok","median_ns":1200.5}"#,
        r#"{"event":"invocation_finished","cell_id":"a","done":1,"invocations":3,"round":0}"#,
        // Issue 23's: sums that would overflow, a negative time.
        r#"{"event":"finished","ok":3,"unsupported":1,"failed":0,"elapsed_seconds":12.5}"#,
        r#"{"event":"finished","ok":1,"unsupported":0,"failed":0,"elapsed_seconds":1.7e308}"#,
        r#"{"event":"cell_finished","index":0,"cell_id":"c","status":"ok","median_ns":-5}"#,
    ]
    .iter()
    .map(|l| l.as_bytes().to_vec())
    .collect();
    let kinds = [
        "started",
        "cell_started",
        "cell_finished",
        "invocation_finished",
        "finished",
        "not an event",
    ];
    run(
        "progress lines",
        cases(3000),
        mutated(lines, 120),
        &kinds,
        |bytes| {
            let line = String::from_utf8_lossy(&bytes);
            match wire::progress::ProgressEvent::parse(&line) {
                Some(event) => {
                    let json: serde_json::Value = serde_json::from_str(&event.to_line()).unwrap();
                    // Whatever is accepted has finite, non-negative figures.
                    for key in ["elapsed_seconds", "median_ns", "bandwidth_gbps"] {
                        if let Some(v) = json.get(key).filter(|v| !v.is_null()) {
                            let v = v.as_f64().unwrap();
                            assert!(v.is_finite() && v >= 0.0, "{key} {v}");
                        }
                    }
                    json["event"].as_str().unwrap_or("").to_string()
                }
                None => "not an event".into(),
            }
        },
    );
}

#[test]
fn bench_toml() {
    let config = std::fs::read(workspace_root().join("bench.toml")).unwrap();
    // Issue 23's: a matrix whose name word-splits into `agents/`.
    let spaced = String::from_utf8_lossy(&config)
        .replacen("[matrices.smoke]", "[matrices.\"x agents\"]", 1)
        .into_bytes();
    let path = workspace_root().join("bench.toml");
    run(
        "bench.toml",
        cases(400),
        mutated(vec![config.clone(), spaced], config.len()),
        &["ok", "refused"],
        |bytes| {
            let text = String::from_utf8_lossy(&bytes);
            match harness::runs::config::BenchConfig::parse(&text, &path) {
                Ok(_) => "ok".into(),
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    "refused".into()
                }
            }
        },
    );
}

#[test]
fn known_hosts_files() {
    let seed = b"# comment\n[10.213.0.11]:22 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n@revoked * ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ==\n|1|abc=|def= ecdsa-sha2-nistp256 AAAAE2VjZHNh\n@cert-authority *.lab ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n".to_vec();
    run(
        "known_hosts",
        cases(2000),
        mutated(vec![seed.clone()], seed.len()),
        &["keys", "keys and bad lines", "only bad lines", "nothing"],
        |bytes| {
            let text = String::from_utf8_lossy(&bytes);
            let (keys, bad) =
                harness::fleet::known_hosts::parse_text(&text, Path::new("known_hosts"));
            for key in &keys {
                // A verdict on any key never panics.
                let _ = harness::fleet::known_hosts::verdict(
                    std::slice::from_ref(key),
                    "[10.213.0.11]:22",
                    &key.key_type,
                    &key.key,
                );
            }
            match (keys.is_empty(), bad.is_empty()) {
                (false, true) => "keys",
                (false, false) => "keys and bad lines",
                (true, false) => "only bad lines",
                (true, true) => "nothing",
            }
            .into()
        },
    );
}

#[test]
fn labgrid_client_output() {
    let show = b"Place 'qa':\n  tags: board=pi5, lab=x\n  matches:\n    exp1/pi-a/*\n  acquired: vm/root\n  acquired resources:\n    exp1/pi-a/NetworkService/NetworkService\n  reservation: 8PXT6IEE0O\n".to_vec();
    let env = b"targets:\n  qa:\n    resources:\n    - NetworkPowerPort:\n        host: http://127.0.0.1:9999/relay/{index}/{value}\n        index: 0\n        model: simplerest\n    - NetworkService:\n        port: 22\n        username: root\n        address: 10.213.0.11\n".to_vec();
    run(
        "labgrid output",
        cases(2000),
        mutated(vec![show, env], 400),
        &["place held", "place free", "resources", "no resources"],
        |bytes| {
            let text = String::from_utf8_lossy(&bytes);
            let info = harness::fleet::labgrid::parse_show("qa", &text);
            let resources = harness::fleet::labgrid::parse_env(&text);
            match (resources.is_empty(), info.acquired_by.is_some()) {
                (false, _) => "resources",
                (true, true) => "place held",
                (true, false) if text.starts_with("targets") => "no resources",
                _ => "place free",
            }
            .into()
        },
    );
}

#[test]
fn llama_bench_json() {
    let line = r#"{"build_commit":"abc1234","cpu_info":"AMD","model_filename":"/m/q8_0.gguf","model_type":"llama ?B Q8_0","model_size":100,"model_n_params":80,"n_threads":2,"n_prompt":64,"n_gen":0,"test_time":"2026-11-25T10:00:00Z","avg_ns":2000,"stddev_ns":10,"avg_ts":32000,"stddev_ts":100,"samples_ns":[1990,2010]}"#;
    let jsonl = format!(
        "{line}\n{}\n",
        line.replace("\"n_prompt\":64,\"n_gen\":0", "\"n_prompt\":0,\"n_gen\":16")
    );
    let array = format!("[{line}]");
    // Issue 23's: a commit that walks out of results/.
    let traversal = jsonl.replace("abc1234", "x/../../../../tmp/y");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lb.jsonl");
    let results = dir.path().join("results");
    run(
        "llama-bench json",
        cases(300),
        mutated(
            vec![
                jsonl.into_bytes(),
                array.into_bytes(),
                traversal.into_bytes(),
            ],
            line.len(),
        ),
        &["imported", "refused"],
        |bytes| {
            std::fs::write(&file, &bytes).unwrap();
            let outcome =
                harness::results::import::import_llama_bench(&file, &results, "local", None);
            match outcome {
                Ok(imported) => {
                    // One folder directly under results/, whatever the file says.
                    assert_eq!(imported.run_dir.parent(), Some(results.as_path()));
                    std::fs::remove_dir_all(&imported.run_dir).unwrap();
                    "imported".into()
                }
                Err(_) => "refused".into(),
            }
        },
    );
}
