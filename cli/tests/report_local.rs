//! The HTML report end to end: real runs on `local`, `cargo xtask report`,
//! and the page opened in a real headless browser (Debian's chromium, which
//! `cargo xtask setup` installs where it can).

mod common;
use common::{bench_local, rewrite_csv, text, xtask};

use std::path::Path;
use std::process::{Command, Output};

const MATRIX: &str = r#"
[matrices.pair]
types = ["F32", "Q4_0"]
shapes = ["llama3.2-1b.attn_kv"]
batches = [1]
threads = [1]
warmup = 1
min_reps = 5
min_time_ms = 5
max_time_ms = 200
"#;

fn chromium(args: &[&str], profile: &Path) -> Option<Output> {
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .ok()
}

#[test]
fn report_renders_in_a_real_browser_with_every_image() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bench.toml"), MATRIX).unwrap();
    for _ in 0..3 {
        bench_local(dir.path(), "pair");
    }
    let out = xtask(dir.path(), &["report"]);
    assert!(out.status.success(), "{}", text(&out));
    let site = dir.path().join("results/site");
    let html = std::fs::read_to_string(site.join("index.html")).unwrap();
    // Latest against the previous run of the same boards, its files, trends.
    assert!(html.contains("Against the previous run"), "{html}");
    assert!(html.contains("cells:"), "{html}");
    assert!(html.contains("kernels.csv") && site.join("runs").read_dir().unwrap().count() == 1);
    let trends = html.matches("src=\"trends/").count();
    assert_eq!(trends, 2, "one trend per cell: {html}");
    // Self-contained: every image the page names is in the site folder.
    for src in html.split("src=\"").skip(1) {
        let src = src.split('"').next().unwrap();
        assert!(site.join(src).is_file(), "{src}");
    }

    if Command::new("chromium").arg("--version").output().is_err() {
        println!("SKIPPED the browser check: chromium is not installed and could not be (cargo xtask setup installs Debian's chromium as root)");
        return;
    }
    let profile = tempfile::tempdir().unwrap();
    let url = format!("file://{}", site.join("index.html").display());
    let dom = chromium(&["--dump-dom", &url], profile.path()).unwrap();
    let dom_text = String::from_utf8_lossy(&dom.stdout);
    let attr = |name: &str| -> usize {
        dom_text
            .split(&format!("{name}=\""))
            .nth(1)
            .and_then(|s| s.split('"').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the DOM:\n{dom_text}"))
    };
    let images = attr("data-images");
    assert!(images >= 3, "{images}");
    assert_eq!(attr("data-images-rendered"), images, "every image rendered");

    let shot = profile.path().join("shot.png");
    let out = chromium(
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,900",
            &url,
        ],
        profile.path(),
    )
    .unwrap();
    assert!(shot.exists(), "{}", text(&out));
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    let pixels = &pixels[..frame.buffer_size()];
    let distinct: std::collections::HashSet<&[u8]> =
        pixels.chunks(frame.color_type.samples()).collect();
    assert!(
        distinct.len() > 50,
        "a blank page has {} colours",
        distinct.len()
    );
}

#[test]
fn report_replaces_only_an_earlier_report_and_shows_a_failed_boards_error_once_as_written() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bench.toml"), MATRIX).unwrap();
    bench_local(dir.path(), "pair");
    bench_local(dir.path(), "pair");
    // The latest run's board failed with a host-key error whose advice is
    // case-sensitive (`-R`, not `-r`) and whose cells carry the same error.
    let results = dir.path().join("results");
    let mut runs: Vec<std::path::PathBuf> = std::fs::read_dir(&results)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("run.json").is_file())
        .collect();
    runs.sort();
    let latest = runs.last().unwrap();
    let error = "host key of [10.0.0.2]:22 CHANGED (SHA256:AbCdEfGh): if the board was re-imaged, run ssh-keygen -R '[10.0.0.2]:22'";
    let manifest = latest.join("run.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m["boards"][0]["error"] = error.into();
    std::fs::write(&manifest, m.to_string()).unwrap();
    rewrite_csv::<wire::rows::KernelRow>(&latest.join("kernels.csv"), |r| {
        r.status = wire::rows::CellStatus::Failed;
        r.note = error.to_string();
    });
    let out = xtask(dir.path(), &["plot", latest.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let summary = std::fs::read_to_string(latest.join("summary.md")).unwrap();
    assert_eq!(
        summary.matches("ssh-keygen -R '[10.0.0.2]:22'").count(),
        1,
        "{summary}"
    );
    assert!(summary.contains("SHA256:AbCdEfGh"), "{summary}");
    assert!(!summary.contains("ssh-keygen -r"), "{summary}");

    // `--out` on a folder that is not an earlier report (here the results
    // themselves) is refused in one line, and nothing in it is touched.
    let before = std::fs::read_dir(&results).unwrap().count();
    let out = xtask(dir.path(), &["report", "--out", "results"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not an earlier report"), "{stderr}");
    assert_eq!(std::fs::read_dir(&results).unwrap().count(), before);
    assert!(runs.iter().all(|r| r.join("run.json").is_file()));

    // A new folder, then the same folder again: the earlier report is
    // replaced whole, nothing left beside it.
    for _ in 0..2 {
        let out = xtask(dir.path(), &["report", "--out", "site"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let html = std::fs::read_to_string(dir.path().join("site/index.html")).unwrap();
    assert!(html.contains("Boards that failed"), "{html}");
    assert_eq!(
        html.matches("ssh-keygen -R '[10.0.0.2]:22'").count(),
        1,
        "{html}"
    );
    let beside: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".site"))
        .collect();
    assert!(beside.is_empty(), "{beside:?}");
}

#[test]
fn a_board_name_with_markup_in_the_rows_cannot_put_markup_or_paths_into_the_report() {
    // Two runs whose rows (all of them: kernels and samples) name a board
    // `"><img src=x onerror=...>/..`, as a hostile board or an import could.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bench.toml"), MATRIX).unwrap();
    bench_local(dir.path(), "pair");
    bench_local(dir.path(), "pair");
    let hostile = "\"><img src=x onerror=document.title='pwned'>/..";
    for run in std::fs::read_dir(dir.path().join("results"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("run.json").is_file())
    {
        for file in ["kernels.csv", "samples.csv"] {
            let path = run.join(file);
            let text = std::fs::read_to_string(&path).unwrap();
            // The board column: every row's `local` field.
            let text = text.replace(
                ",local,",
                &format!(",\"{}\",", hostile.replace('"', "\"\"")),
            );
            std::fs::write(&path, text).unwrap();
        }
    }
    let out = xtask(dir.path(), &["history", "--rebuild"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = xtask(dir.path(), &["report"]);
    assert!(out.status.success(), "{}", text(&out));
    let site = dir.path().join("results/site");
    let html = std::fs::read_to_string(site.join("index.html")).unwrap();
    assert!(!html.contains("<img src=x"), "{html}");
    assert!(
        html.contains("&lt;img src=x"),
        "escaped, still shown: {html}"
    );
    // Every image the page names is a file inside the site.
    let mut images = 0;
    for src in html.split("src=\"").skip(1) {
        let src = src.split('"').next().unwrap();
        assert!(!src.split('/').any(|part| part == ".."), "{src}");
        assert!(site.join(src).is_file(), "{src}");
        images += 1;
    }
    assert!(images >= 2, "{html}");
    if Command::new("chromium").arg("--version").output().is_err() {
        println!("SKIPPED the browser check: chromium is not installed");
        return;
    }
    let profile = tempfile::tempdir().unwrap();
    let url = format!("file://{}", site.join("index.html").display());
    let dom = chromium(&["--dump-dom", &url], profile.path()).unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains("<title>"), "{dom}");
    assert!(!dom.contains("<title>pwned</title>"), "a script ran: {dom}");
    // The markup is text in the page, never an element.
    assert!(
        !dom.contains("<img src=\"x\"") && !dom.contains("<img src=x"),
        "{dom}"
    );
}
