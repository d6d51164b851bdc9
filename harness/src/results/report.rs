//! The static report: `results/site/`, one self-contained folder (no
//! network, no server) a CI job publishes as an artifact. `index.html`
//! holds, in order: the worst cells of the latest run against the previous
//! run of the same boards, the latest run's summary and plots with its CSVs
//! copied beside them, and a trend plot per board and cell (median per run
//! with its 95% confidence band and detected change points).

use crate::results::compare::{CompareSettings, Comparison, Verdict};
use crate::results::history::{History, HistoryError};
use crate::results::persistence::{compare_and_confirm, ConfirmAgainst};
use crate::results::render::chart::{Chart, Figure, Panel};
use crate::results::render::{canvas, render_run, RenderError};
use crate::results::run_dir::{RunData, RunDirError};
use std::fmt::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;
use wire::files::{KERNEL_ROWS_FILE, MANIFEST_FILE, MODEL_ROWS_FILE, SAMPLES_FILE};
use wire::stats::{change_points, invocation_time_ci};

#[derive(Debug, Error)]
pub enum ReportError {
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(transparent)]
    Draw(#[from] canvas::DrawError),
    #[error("no runs under {0}: run `cargo xtask bench` first")]
    NoRuns(PathBuf),
    #[error("{0} is not an earlier report (no {REPORT_MARKER} in it) and the report replaces its folder whole: give --out a new folder, or one an earlier `cargo xtask report` wrote")]
    NotAReport(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the report holds.
pub struct ReportSummary {
    pub index: PathBuf,
    pub latest_run: String,
    pub compared_with: Option<String>,
    /// Regressions seen twice (and quality regressions).
    pub confirmed: usize,
    /// Timing regressions seen once.
    pub suspects: usize,
    pub trend_plots: usize,
}

/// Written into every report folder: only a folder holding it is replaced
/// by the next report (`--out results` must not wipe the history).
pub const REPORT_MARKER: &str = ".quantbench-report";

/// At most this many trend plots: cells with change points first.
const MAX_TRENDS: usize = 48;

/// Writes the report into `out`: built in a folder beside it, then swapped
/// in, so a failed report leaves the last one whole. `out` must be absent,
/// empty, or an earlier report.
pub fn write_report(results_root: &Path, out: &Path) -> Result<ReportSummary, ReportError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReportError::Io { path, source }
    };
    let earlier = out.is_dir() && std::fs::read_dir(out).map_err(io(out))?.next().is_some();
    if earlier && !out.join(REPORT_MARKER).exists() {
        return Err(ReportError::NotAReport(out.to_path_buf()));
    }
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "site".into());
    let building = out.with_file_name(format!(".{name}.building"));
    if building.exists() {
        std::fs::remove_dir_all(&building).map_err(io(&building))?;
    }
    std::fs::create_dir_all(&building).map_err(io(&building))?;
    std::fs::write(building.join(REPORT_MARKER), "").map_err(io(&building))?;
    let mut summary = build_site(results_root, &building)?;
    let old = out.with_file_name(format!(".{name}.old"));
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    if out.exists() {
        std::fs::rename(out, &old).map_err(io(out))?;
    }
    std::fs::rename(&building, out).map_err(io(out))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    summary.index = out.join("index.html");
    Ok(summary)
}

/// The whole site, written into the empty folder `site`.
fn build_site(results_root: &Path, site: &Path) -> Result<ReportSummary, ReportError> {
    let (history, _) = History::open(results_root)?;
    let runs = history.runs()?;
    let latest = runs
        .last()
        .ok_or_else(|| ReportError::NoRuns(results_root.to_path_buf()))?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReportError::Io { path, source }
    };
    let run_site = site.join("runs").join(&latest.run_id);
    std::fs::create_dir_all(run_site.join("plots")).map_err(io(&run_site))?;
    std::fs::create_dir_all(site.join("trends")).map_err(io(site))?;

    // The latest run's own summary and plots, drawn afresh from its files.
    let rendered = render_run(&latest.dir)?;
    let run = RunData::load(&latest.dir)?;
    let mut copied = Vec::new();
    for file in [
        KERNEL_ROWS_FILE,
        MODEL_ROWS_FILE,
        SAMPLES_FILE,
        wire::files::SUSTAINED_FILE,
        MANIFEST_FILE,
        "summary.md",
    ] {
        let from = latest.dir.join(file);
        if from.exists() {
            let to = run_site.join(file);
            // Published copies are for people: spreadsheet-safe CSVs and a
            // run.json without what only the lab needs (see `published`).
            let text = std::fs::read_to_string(&from).map_err(io(&from))?;
            let text = if file.ends_with(".csv") {
                spreadsheet_safe(&text)
            } else if file == MANIFEST_FILE {
                published_manifest(&text)
            } else {
                text
            };
            std::fs::write(&to, text).map_err(io(&to))?;
            copied.push(file);
        }
    }
    let mut run_plots = Vec::new();
    for plot in rendered
        .plots
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
    {
        if let Some(name) = plot.file_name() {
            std::fs::copy(plot, run_site.join("plots").join(name)).map_err(io(plot))?;
            run_plots.push(name.to_string_lossy().into_owned());
        }
    }

    let previous = history.previous_of_same_boards(&latest.run_id)?;
    let comparison: Option<Comparison> = match &previous {
        Some(prev) => {
            let base = RunData::load(&prev.dir)?;
            // Judged as `cargo xtask compare previous latest` judges it.
            let settings = CompareSettings {
                noise_floors: crate::results::noise::floors_for(results_root, Some(&history), &run)
                    .0,
                ..CompareSettings::default()
            };
            compare_and_confirm(
                &history,
                &base,
                &run,
                &settings,
                &ConfirmAgainst::PreviousOfBase,
            )
            .ok()
        }
        None => None,
    };

    let trends = draw_trends(&history, &run, site)?;

    let mut html = String::new();
    let title = format!("quantbench: {}", latest.run_id);
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>{STYLE}</style></head><body>\n<h1>{}</h1>\n<p>commit <code>{}</code>, started {}, boards {}{}</p>\n",
        esc(&title),
        esc(&title),
        esc(&latest.git_commit),
        esc(&latest.started_at),
        esc(&latest.boards),
        if run.kernel_rows.iter().any(|r| r.emulated) || run.model_rows.iter().any(|r| r.emulated) {
            " — <strong>EMULATED: timings measure qemu, not a board</strong>"
        } else {
            ""
        }
    );
    let failed: Vec<_> = run
        .manifest
        .boards
        .iter()
        .filter_map(|b| Some((&b.board, b.error.as_ref()?)))
        .collect();
    if !failed.is_empty() {
        // Each board's error once, as written: its advice must reach the
        // reader unchanged.
        html.push_str("<h2>Boards that failed</h2>\n<ul>\n");
        for (board, error) in failed {
            let _ = writeln!(
                html,
                "<li><code>{}</code><pre>{}</pre></li>",
                esc(board),
                esc(error)
            );
        }
        html.push_str("</ul>\n");
    }
    html.push_str("<h2>Against the previous run of the same boards</h2>\n");
    match (&previous, &comparison) {
        (Some(prev), Some(cmp)) => {
            let _ = writeln!(
                html,
                "<p>{} (base: <code>{}</code>)</p>",
                esc(&cmp.verdict_line()),
                esc(&prev.run_id)
            );
            html.push_str(&comparison_table(cmp));
        }
        (Some(prev), None) => {
            let _ = writeln!(
                html,
                "<p>Nothing in common with the previous run <code>{}</code>.</p>",
                esc(&prev.run_id)
            );
        }
        _ => html.push_str("<p>No earlier run of these boards yet.</p>\n"),
    }
    let _ = writeln!(
        html,
        "<h2>Latest run</h2>\n<p>Files: {}</p>",
        copied
            .iter()
            .map(|f| format!("<a href=\"runs/{}/{f}\">{f}</a>", esc(&latest.run_id)))
            .collect::<Vec<_>>()
            .join(" · ")
    );
    html.push_str(&markdown_to_html(&rendered.tables));
    for plot in &run_plots {
        let _ = writeln!(
            html,
            "<figure><img src=\"runs/{}/plots/{}\" alt=\"{}\"></figure>",
            esc(&latest.run_id),
            esc(plot),
            esc(plot)
        );
    }
    let _ = writeln!(
        html,
        "<h2>Trends</h2>\n<p>Median time per run with its 95% bootstrap confidence band; red lines mark change points found by an L1 step fit with a penalty per step (the method of asv's regression detection). {} of the latest run's cells, those with change points first.</p>",
        trends.len()
    );
    for file in &trends {
        let _ = writeln!(
            html,
            "<figure><img src=\"trends/{}\" alt=\"{}\"></figure>",
            esc(file),
            esc(file)
        );
    }
    html.push_str(SCRIPT);
    html.push_str("</body></html>\n");
    let index = site.join("index.html");
    std::fs::write(&index, html).map_err(io(&index))?;
    Ok(ReportSummary {
        index,
        latest_run: latest.run_id.clone(),
        compared_with: previous.map(|p| p.run_id),
        confirmed: comparison.as_ref().map_or(0, Comparison::confirmed_count),
        suspects: comparison.as_ref().map_or(0, Comparison::suspect_count),
        trend_plots: trends.len(),
    })
}

/// A trend figure per board and cell of the latest run that has at least
/// two runs of history; returns the PNG file names.
fn draw_trends(history: &History, run: &RunData, site: &Path) -> Result<Vec<String>, ReportError> {
    let mut candidates = Vec::new();
    let cells: Vec<(wire::rows::CellKey, bool)> = run
        .kernel_rows
        .iter()
        .filter(|r| r.status == wire::rows::CellStatus::Ok)
        .map(|r| (r.key(), r.emulated))
        .chain(
            run.model_rows
                .iter()
                .filter(|r| r.status == wire::rows::CellStatus::Ok)
                .map(|r| (r.key(), r.emulated)),
        )
        .collect();
    for (key, emulated) in cells {
        let (board, kind, cell) = (key.board.clone(), key.kind.clone(), key.cell_id.clone());
        let points = history.trend(&key)?;
        if points.len() < 2 {
            continue;
        }
        let mut median = Vec::new();
        let mut low = Vec::new();
        let mut high = Vec::new();
        for p in &points {
            let (m, lo, hi) = invocation_time_ci(&p.invocations, 0.95).unwrap_or((
                p.median_ns,
                p.median_ns,
                p.median_ns,
            ));
            median.push(m / 1e3);
            low.push(lo / 1e3);
            high.push(hi / 1e3);
        }
        let steps = change_points(&median, None);
        let labels = points
            .iter()
            .map(|p| {
                format!(
                    "{} {}",
                    p.git_commit.chars().take(7).collect::<String>(),
                    p.started_at.get(5..10).unwrap_or("")
                )
            })
            .collect();
        candidates.push((
            steps.is_empty(),
            Figure {
                file_stem: format!(
                    "trend_{}_{}",
                    crate::shell::file_safe(&board),
                    cell.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
                ),
                title: format!("{kind} {cell} on {board}: median time per run"),
                boards: vec![board.clone()],
                emulated_boards: if emulated {
                    vec![board.clone()]
                } else {
                    Vec::new()
                },
                panels: vec![Panel {
                    caption: format!("{} runs, {} change point(s)", points.len(), steps.len()),
                    chart: Chart::Trend {
                        y_label: "µs per run of the cell".into(),
                        labels,
                        median,
                        low,
                        high,
                        change_points: steps,
                    },
                }],
            },
        ));
    }
    candidates.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.file_stem.cmp(&b.1.file_stem)));
    let mut files = Vec::new();
    for (_, figure) in candidates.into_iter().take(MAX_TRENDS) {
        let written = canvas::draw(
            &figure,
            &run.manifest.started_at,
            &format!(
                "{} | llama.cpp {}",
                run.manifest.git_commit,
                run.manifest.llama_cpp()
            ),
            &site.join("trends"),
        )?;
        files.extend(
            written
                .iter()
                .filter(|p| p.extension().is_some_and(|e| e == "png"))
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())),
        );
    }
    Ok(files)
}

/// The comparison, worst first; unchanged cells folded away.
fn comparison_table(cmp: &Comparison) -> String {
    let mut out = String::from(
        "<table><tr><th>verdict</th><th>board</th><th>cell</th><th>change</th><th>interval</th><th>p</th><th>notes</th></tr>\n",
    );
    let pct = |v: Option<f64>| {
        v.map(|r| format!("{:+.1}%", (r - 1.0) * 100.0))
            .unwrap_or_else(|| "–".into())
    };
    let mut unchanged = 0;
    for c in &cmp.cells {
        if c.verdict == Verdict::Same {
            unchanged += 1;
            continue;
        }
        let verdict = match c.persistence {
            Some(p) => format!("{} ({})", c.verdict.name(), p.name()),
            None => c.verdict.name().to_string(),
        };
        let mut notes = c.quality.clone();
        notes.extend(c.notes.iter().cloned());
        let _ = writeln!(
            out,
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>[{}, {}]</td><td>{}</td><td>{}</td></tr>",
            c.verdict.name(),
            esc(&verdict),
            esc(&c.board),
            esc(&c.cell),
            pct(c.ratio),
            pct(c.ci_low),
            pct(c.ci_high),
            c.p_value.map(|p| format!("{p:.3}")).unwrap_or_else(|| "–".into()),
            esc(&notes.join("; "))
        );
    }
    let _ = writeln!(
        out,
        "</table>\n<p>{unchanged} cells the same (within the margin) not listed. {}</p>",
        esc(&cmp.method_line())
    );
    // Confirmed regressions apart from suspects: what a lab acts on.
    let lines = cmp.confirmation_lines();
    let _ = writeln!(
        out,
        "<h3>Confirmed regressions ({})</h3>\n<ul>",
        cmp.confirmed_count()
    );
    for line in &lines {
        let _ = writeln!(out, "<li>{}</li>", esc(line));
    }
    out.push_str("</ul>\n");
    out
}

/// Headings and pipe tables of the summary as HTML; other lines as paragraphs.
fn markdown_to_html(markdown: &str) -> String {
    let mut out = String::new();
    let mut in_table = false;
    for line in markdown.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('|') {
            let cells: Vec<&str> = trimmed
                .trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect();
            if cells.iter().all(|c| c.chars().all(|ch| "-: ".contains(ch))) {
                continue;
            }
            let tag = if in_table { "td" } else { "th" };
            if !in_table {
                out.push_str("<table>\n");
                in_table = true;
            }
            out.push_str("<tr>");
            for c in cells {
                let _ = write!(out, "<{tag}>{}</{tag}>", esc(c));
            }
            out.push_str("</tr>\n");
            continue;
        }
        if in_table {
            out.push_str("</table>\n");
            in_table = false;
        }
        if let Some(h) = trimmed.strip_prefix("### ") {
            let _ = writeln!(out, "<h3>{}</h3>", esc(h));
        } else if !trimmed.is_empty() {
            let _ = writeln!(out, "<p>{}</p>", esc(trimmed));
        }
    }
    if in_table {
        out.push_str("</table>\n");
    }
    out
}

/// A CSV for a spreadsheet: every field that is not a number and starts
/// with `=`, `+`, `-`, `@`, a tab or a carriage return (what spreadsheets
/// run as a formula) gets a leading `'`, as OWASP advises for exports.
/// Only the published copy: the tools read the run's own files.
fn spreadsheet_safe(csv_text: &str) -> String {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(csv_text.as_bytes());
    let mut writer = csv::WriterBuilder::new()
        .flexible(true)
        .from_writer(Vec::new());
    for record in reader.records().flatten() {
        let fields: Vec<String> = record
            .iter()
            .map(|f| {
                let risky = f.starts_with(['=', '+', '-', '@', '\t', '\r']);
                if risky && f.parse::<f64>().is_err() {
                    format!("'{f}")
                } else {
                    f.to_string()
                }
            })
            .collect();
        let _ = writer.write_record(&fields);
    }
    writer
        .into_inner()
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .unwrap_or_default()
}

/// `run.json` as published: the labgrid reservation tokens removed, the
/// config's folder and the host's name dropped, and in board errors a
/// `user@` of an SSH address and SSH key paths replaced (a reader needs
/// the error, not the lab's accounts). Unreadable: published as `{}`.
fn published_manifest(json: &str) -> String {
    let Ok(mut m) = serde_json::from_str::<serde_json::Value>(json) else {
        return "{}\n".into();
    };
    if let Some(path) = m["config_path"].as_str() {
        let name = Path::new(path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        m["config_path"] = name.into();
    }
    m["host"]["hostname"] = "redacted".into();
    if let Some(boards) = m["boards"].as_array_mut() {
        for board in boards {
            if board["labgrid"].is_object() {
                board["labgrid"]["token"] = serde_json::Value::Null;
            }
            if let Some(error) = board["error"].as_str() {
                board["error"] = redact_accounts(error).into();
            }
            if let Some(jobs) = board["jobs"].as_array_mut() {
                for job in jobs {
                    if let Some(error) = job["error"].as_str() {
                        job["error"] = redact_accounts(error).into();
                    }
                }
            }
        }
    }
    serde_json::to_string_pretty(&m).unwrap_or_default() + "\n"
}

/// `pi@10.0.0.2` -> `<user>@10.0.0.2`; `/home/ci/.ssh/id_ed25519` (or
/// `~/.ssh/...`) -> `<ssh key>`.
fn redact_accounts(text: &str) -> String {
    text.split(' ')
        .map(|word| {
            if word.contains(".ssh/") {
                let end = word.find([',', ')', ';', '\'', '"']).unwrap_or(word.len());
                return format!("<ssh key>{}", &word[end..]);
            }
            match word.split_once('@') {
                Some((user, host))
                    if !user.is_empty()
                        && user
                            .trim_start_matches(['(', '`', '\''])
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                        && !host.is_empty() =>
                {
                    let lead: String = user
                        .chars()
                        .take_while(|c| matches!(c, '(' | '`' | '\''))
                        .collect();
                    format!("{lead}<user>@{host}")
                }
                _ => word.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}th{background:#eee}tr.regressed td,tr.quality-regressed td{background:#fdd}tr.improved td{background:#dfd}tr.noisy td{background:#ffd}img{max-width:100%;border:1px solid #ddd}figure{margin:1em 0}";

/// Marks the page once its images have loaded, so a headless browser (and
/// a reader) can tell whether every image rendered.
const SCRIPT: &str = "<script>window.addEventListener('load',function(){var imgs=Array.from(document.images);var ok=imgs.filter(function(i){return i.complete&&i.naturalWidth>0}).length;document.body.setAttribute('data-images',imgs.length);document.body.setAttribute('data-images-rendered',ok);});</script>\n";

#[cfg(test)]
mod tests {
    #[test]
    fn published_copies_are_spreadsheet_safe_and_keep_no_lab_accounts() {
        let csv = "board,note,median_ns\nlocal,=HYPERLINK(\"x\"),-1.5\nlocal,@SUM(A1),12\n";
        let safe = super::spreadsheet_safe(csv);
        assert!(safe.contains("'=HYPERLINK"), "{safe}");
        assert!(safe.contains("'@SUM(A1)"), "{safe}");
        assert!(safe.contains(",-1.5"), "numbers stay: {safe}");
        let json = r#"{"config_path":"/home/ci/lab/bench.toml","host":{"hostname":"ci-7"},"boards":[{"board":"pi5","error":"ssh pi@10.0.0.2:22 refused the key /home/ci/.ssh/id_ed25519 (try ssh-keygen -R '[10.0.0.2]:22')","labgrid":{"token":"ABC123"},"jobs":[]}]}"#;
        let published = super::published_manifest(json);
        for gone in ["ABC123", "pi@", "/home/ci", "ci-7"] {
            assert!(!published.contains(gone), "{gone}: {published}");
        }
        assert!(published.contains("<user>@10.0.0.2:22"), "{published}");
        assert!(
            published.contains("ssh-keygen -R '[10.0.0.2]:22'"),
            "{published}"
        );
    }

    use super::*;

    #[test]
    fn summary_tables_become_html_tables() {
        let html = markdown_to_html("\n### local\n\n| a | b |\n|---|--:|\n| 1 | <2> |\ntext\n");
        assert_eq!(
            html,
            "<h3>local</h3>\n<table>\n<tr><th>a</th><th>b</th></tr>\n<tr><td>1</td><td>&lt;2&gt;</td></tr>\n</table>\n<p>text</p>\n"
        );
    }
}
