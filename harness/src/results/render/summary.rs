//! The human-readable summary (`summary.md`): per board, a line per kernel
//! type and a line per model recipe, then every kernel cell. Figures come
//! from `figures`, the same ones the plots draw.

use super::figures::{
    by_board, f32_beside, shown_model_rows, type_figures, versus_figures, ModelFigures,
    VersusFigure,
};
use super::RunData;
use std::collections::BTreeSet;
use std::fmt::Write;
use wire::rows::{CellStatus, KernelRow, ModelRow};

/// The summary's tables (printed by the CLI) and the whole file.
pub fn summary(run: &RunData) -> (String, String) {
    let m = &run.manifest;
    let mut tables = String::new();
    if !run.kernel_rows.is_empty() {
        tables.push_str(&type_table(&run.kernel_rows));
        tables.push_str(&versus_table(&versus_figures(run)));
    }
    if !run.model_rows.is_empty() {
        let shown = shown_model_rows(&run.model_rows);
        tables.push_str(&model_table(&shown));
        tables.push_str(&energy_table(&shown, &run.probes));
    }
    let mut full = format!(
        "# quantbench run {}\n\nmatrix `{}`, commit {}, llama.cpp {}, started {}\n{}{}{}",
        m.run_id,
        m.matrix,
        m.git_commit,
        m.llama_cpp(),
        m.started_at,
        board_errors(&m.boards),
        farm_boards(&m.boards),
        tables
    );
    if !run.kernel_rows.is_empty() {
        let errors: Vec<(&str, &str)> = m
            .boards
            .iter()
            .filter_map(|b| Some((b.board.as_str(), b.error.as_deref()?)))
            .collect();
        let _ = write!(
            full,
            "\n## All cells\n\n{}",
            cell_table(&run.kernel_rows, &errors)
        );
    }
    (tables, full)
}

/// Each failed board's error, once and as written (its advice, such as an
/// `ssh-keygen -R` line, must reach the reader unchanged); empty when no
/// board failed.
pub fn board_errors(boards: &[crate::runs::manifest::BoardOutcome]) -> String {
    let mut out = String::new();
    for board in boards {
        let Some(error) = &board.error else { continue };
        if out.is_empty() {
            out.push_str("\n## Boards that failed\n\n");
        }
        let _ = writeln!(
            out,
            "- `{}`:\n\n```text\n{}\n```\n",
            board.board,
            error.trim_end()
        );
    }
    out
}

/// Which labgrid place each farm board was, so the summary names the exact
/// board; empty when no board came from a farm.
pub fn farm_boards(boards: &[crate::runs::manifest::BoardOutcome]) -> String {
    let mut out = String::new();
    for board in boards {
        let Some(farm) = &board.labgrid else {
            continue;
        };
        if out.is_empty() {
            out.push_str("\n## Boards from labgrid\n\n");
        }
        let tags: Vec<String> = farm.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = write!(
            out,
            "- `{}`: place `{}` on coordinator {}, reservation {}, reached at {}",
            board.board,
            farm.place,
            farm.coordinator,
            farm.token.as_deref().unwrap_or("none"),
            farm.reached_at.as_deref().unwrap_or("never")
        );
        if !tags.is_empty() {
            let _ = write!(out, ", tags {}", tags.join(" "));
        }
        for cycle in &farm.power_cycles {
            let _ = write!(
                out,
                "; power-cycled at {} ({})",
                cycle.at,
                match cycle.ssh_after_seconds {
                    Some(s) => format!("SSH back after {s:.0} s"),
                    None => "did not come back".into(),
                }
            );
        }
        if let Some(e) = &farm.error {
            let _ = write!(out, "; {e}");
        }
        out.push('\n');
    }
    out
}

fn emulated_note(emulated: bool) -> &'static str {
    if emulated {
        " (EMULATED: timings measure qemu, not the board)"
    } else {
        ""
    }
}

/// Per board and reference type (a kernel matrix's `versus`): each other
/// type's time as a ratio to the reference's in the same cell, with its 95%
/// interval and what the interval says; empty without `versus`.
pub fn versus_table(figures: &[VersusFigure]) -> String {
    let mut out = String::new();
    let mut heading = None;
    for f in figures {
        let this = (f.board.as_str(), f.reference.as_str());
        if heading != Some(this) {
            heading = Some(this);
            let _ = write!(
                out,
                "\n### {} against {}{}\n\nEach type's time over {}'s in the same cell (geometric means of invocation medians, round effects taken out), with its 95% interval; quantize ms: the quantizer's wall time on every core of the board.\n\n| shape | batch | threads | type | bits | NMSE | quantize ms | time us | x {} | 95% interval | |\n|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|\n",
                f.board,
                f.reference,
                emulated_note(f.emulated),
                f.reference,
                f.reference
            );
        }
        let c = &f.change;
        let reading = if c.high < 1.0 {
            "faster"
        } else if c.low > 1.0 {
            "slower"
        } else {
            "no difference the spread can see"
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.2} | {} | {} | {:.1} | {:.2} | [{:.2}, {:.2}]{} | {} |",
            f.shape,
            f.n,
            f.threads,
            f.ty,
            f.bits_per_weight,
            fmt_opt(f.nmse, |v| format!("{v:.2e}")),
            fmt_opt(f.quantize_ms, |v| format!("{v:.1}")),
            f.time_ns / 1e3,
            c.ratio,
            c.low,
            c.high,
            match c.method {
                wire::stats::IntervalMethod::Invocations => "",
                wire::stats::IntervalMethod::RepetitionsOnly => " (one invocation: too narrow)",
            },
            reading
        );
    }
    out
}

/// Per board: one line per type with its decode (batch 1, most threads)
/// figures, geometric means over shapes, ordered by bits per weight.
pub fn type_table(rows: &[KernelRow]) -> String {
    let mut out = String::new();
    for (board, rows) in by_board(rows, |r| &r.board) {
        let emulated = rows.iter().any(|r| r.emulated);
        let _ = writeln!(out, "\n### {board}{}\n", emulated_note(emulated));
        if let Some(note) = thermal_note(&rows) {
            let _ = writeln!(out, "{note}\n");
        }
        if let Some(note) = precision_note(&rows) {
            let _ = writeln!(out, "{note}\n");
        }
        let _ = writeln!(
            out,
            "| type | bits/weight | cells ok | unsupported | failed | speedup vs F32 | GFLOP/s | weight GB/s | share of bandwidth | output NMSE |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for t in type_figures(&rows) {
            let _ = writeln!(
                out,
                "| {} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} |",
                t.ty,
                t.bits_per_weight,
                t.ok,
                t.unsupported,
                t.failed,
                fmt_opt(t.speedup_vs_f32, |v| format!("{v:.2}x")),
                fmt_opt(t.gflops, |v| format!("{v:.1}")),
                fmt_opt(t.weight_gbps, |v| format!("{v:.1}")),
                fmt_opt(t.bandwidth_share, |v| format!("{:.0}%", v * 100.0)),
                fmt_opt(t.nmse, |v| format!("{v:.2e}")),
            );
        }
    }
    out
}

/// How many of a board's measured cells are thermally noisy and why, or
/// `None` when none is.
pub fn thermal_note<R: std::borrow::Borrow<KernelRow>>(rows: &[R]) -> Option<String> {
    let noisy: Vec<&KernelRow> = rows
        .iter()
        .map(|r| r.borrow())
        .filter(|r| r.thermal_noisy)
        .collect();
    if noisy.is_empty() {
        return None;
    }
    let throttled = noisy.iter().filter(|r| r.throttled == Some(true)).count();
    let mut governors: Vec<&str> = noisy
        .iter()
        .map(|r| r.governor.as_str())
        .filter(|g| !g.is_empty() && *g != "performance")
        .collect();
    governors.sort();
    governors.dedup();
    let mut why = Vec::new();
    if throttled > 0 {
        why.push(format!("{throttled} throttled"));
    }
    if !governors.is_empty() {
        why.push(format!("governor {}", governors.join(", ")));
    }
    Some(format!(
        "**THERMALLY NOISY: {} of {} cells** ({}): their timings are not the board's steady speed; `compare` calls them noisy. Cool the board (a fan, or `cooldown_below_c`) and set the `performance` governor.",
        noisy.len(),
        rows.len(),
        why.join("; ")
    ))
}

/// How many of a board's measured cells stopped short of the precision
/// their adaptive rounds asked (the agent's `note` says so), or `None`.
pub fn precision_note(rows: &[&KernelRow]) -> Option<String> {
    let short: Vec<&&KernelRow> = rows
        .iter()
        .filter(|r| r.status == CellStatus::Ok && r.note.contains("short of the"))
        .collect();
    if short.is_empty() {
        return None;
    }
    let budget = short.iter().filter(|r| r.note.contains("--budget")).count();
    Some(format!(
        "**Not decided: {} of {} cells** stopped short of the precision asked ({budget} when the run's --budget ran out, {} at max_invocations); `compare` may call them inconclusive. A larger --budget or max_invocations decides them.",
        short.len(),
        rows.len(),
        short.len() - budget
    ))
}

/// Every cell, for the summary file.
/// Every cell; a failed cell whose note is its board's error (listed once
/// above the table) points there instead of repeating it. Notes are kept
/// as written.
pub fn cell_table(rows: &[KernelRow], board_errors: &[(&str, &str)]) -> String {
    let mut out = String::from(
        "| board | shape | type | N | threads | median µs | GFLOP/s | weight GB/s | NMSE | path / note |\n|---|---|---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let path_or_note = if r.status == CellStatus::Ok && r.note.is_empty() {
            r.kernel_path.clone()
        } else if r.status == CellStatus::Ok {
            format!("{}; {}", r.kernel_path, r.note)
        } else {
            let status = match r.status {
                CellStatus::Unsupported => "unsupported",
                _ => "failed",
            };
            let board_error = board_errors
                .iter()
                .any(|(board, error)| *board == r.board && r.note.contains(error.trim()));
            if board_error {
                format!("{status}: the board's error (see Boards that failed)")
            } else {
                format!("{status}: {}", r.note)
            }
        };
        let _ = writeln!(
            out,
            "| {}{}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.board,
            if r.emulated { " (emu)" } else { "" },
            if r.thermal_noisy { " (thermal)" } else { "" },
            r.shape,
            r.ty,
            r.n,
            r.threads,
            fmt_opt(r.median_ns, |v| format!("{:.1}", v / 1000.0)),
            fmt_opt(r.gflops, |v| format!("{v:.1}")),
            fmt_opt(r.weight_gbps, |v| format!("{v:.1}")),
            fmt_opt(r.nmse, |v| format!("{v:.2e}")),
            path_or_note.replace('|', "/"),
        );
    }
    out
}

/// Per board, one line per model x recipe at the most threads measured,
/// with llama-bench's pp/tg figures and the quality columns.
pub fn model_table(rows: &[ModelRow]) -> String {
    let mut out = String::new();
    for (board, rows) in by_board(rows, |r| &r.board) {
        let emulated = rows.iter().any(|r| r.emulated);
        let header = "| model | recipe | bits/weight | weights MB | peak RSS MB | pp t/s | tg t/s | speedup vs f32 (tg) | PPL | mean KLD | top-1 agree | MC acc | repetition | fallbacks | generated text |";
        let _ = writeln!(out, "\n### {board} models{}\n", emulated_note(emulated));
        let synthetic: BTreeSet<&str> = rows
            .iter()
            .filter(|r| r.synthetic)
            .map(|r| r.model_filename.as_str())
            .collect();
        if !synthetic.is_empty() {
            let _ = writeln!(
                out,
                "**SYNTHETIC models** ({}): real architectures and sizes with seeded random weights. Their speed and memory are a trained model's; they have no quality, so its columns are empty.\n",
                synthetic.into_iter().collect::<Vec<_>>().join(", ")
            );
        }
        let _ = writeln!(out, "{header}");
        let _ = writeln!(
            out,
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        let figures = ModelFigures::new(&rows);
        let mut seen = BTreeSet::new();
        for r in &rows {
            if !seen.insert((r.model_filename.clone(), r.recipe.clone())) {
                continue;
            }
            if r.status != CellStatus::Ok {
                let _ = writeln!(
                    out,
                    "| {} | {} | – | – | – | – | – | – | – | – | – | – | – | – | {}: {} |",
                    r.model_filename,
                    r.recipe,
                    match r.status {
                        CellStatus::Unsupported => "unsupported",
                        _ => "failed",
                    },
                    r.note.replace('|', "/")
                );
                continue;
            }
            let pp = figures.tokens_per_second(&r.model_filename, &r.recipe, true);
            let tg = figures.tokens_per_second(&r.model_filename, &r.recipe, false);
            let speedup = tg
                .zip(figures.tokens_per_second(&r.model_filename, &f32_beside(&r.recipe), false))
                .map(|(a, b)| a / b);
            let text: String = r.generated_text.chars().take(60).collect();
            let _ = writeln!(
                out,
                "| {} | {} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.model_filename,
                r.recipe,
                r.bits_per_weight,
                // The weights as the scheme stores them (a codebook
                // recipe's file holds them decoded, larger).
                r.model_size as f64 / 1e6,
                fmt_opt(r.peak_rss_bytes.map(|b| b as f64), |v| format!("{:.0}", v / 1e6)),
                fmt_opt(pp, |v| format!("{v:.0}")),
                fmt_opt(tg, |v| format!("{v:.0}")),
                fmt_opt(speedup, |v| format!("{v:.2}x")),
                fmt_opt(r.ppl, |v| with_error(format!("{v:.4}"), r.ppl_stderr, 4)),
                fmt_opt(r.kld_mean, |v| with_error(format!("{v:.6}"), r.kld_stderr, 6)),
                fmt_opt(r.top1_agreement, |v| format!("{:.2}%", v * 100.0)),
                fmt_opt(r.mc_accuracy, |v| {
                    with_error(
                        format!("{:.0}%", v * 100.0),
                        r.mc_stderr.map(|e| e * 100.0),
                        0,
                    )
                }),
                fmt_opt(r.repetition_score, |v| format!("{v:.2}")),
                if r.fallbacks.is_empty() {
                    0
                } else {
                    r.fallbacks.split(';').count()
                },
                text.replace('|', "/").replace('\n', " "),
            );
        }
        out.push_str(&recipe_choice_line(&figures));
    }
    out
}

/// Per board, where its power came from (or which sources were looked for
/// and why each was unusable), then each measured test's power, energy
/// per token and heat: what a battery or a fanless case asks of a recipe.
pub fn energy_table(
    rows: &[ModelRow],
    probes: &std::collections::BTreeMap<String, wire::probe::BoardProbe>,
) -> String {
    let mut out = String::new();
    for (board, rows) in by_board(rows, |r| &r.board) {
        let report = probes.get(&board).and_then(|p| p.power.as_ref());
        let measured: Vec<&&ModelRow> = rows
            .iter()
            .filter(|r| {
                r.status == CellStatus::Ok && (r.power_w.is_some() || r.temp_after_c.is_some())
            })
            .collect();
        if report.is_none() && measured.is_empty() {
            continue;
        }
        let emulated = rows.iter().any(|r| r.emulated);
        let _ = writeln!(
            out,
            "\n### {board} energy and heat{}\n",
            emulated_note(emulated)
        );
        if let Some(report) = report {
            let _ = writeln!(out, "{}.\n", report.describe());
        }
        if measured.is_empty() {
            continue;
        }
        let _ = writeln!(out, "| model | recipe | test | threads | t/s | W | J/token | J/token above idle | tokens/J | J/token at the wall | samples | °C before → after | MHz after | throttled |");
        let _ = writeln!(
            out,
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"
        );
        for r in measured {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}{} | {} → {} | {} | {} |",
                r.model_filename,
                r.recipe,
                r.test,
                r.n_threads,
                fmt_opt(r.avg_ts, |v| format!("{v:.1}")),
                fmt_opt(r.power_w, |v| format!("{v:.2}")),
                fmt_opt(r.j_per_token, |v| match r.j_per_token_stderr {
                    Some(e) => format!("{} ± {}", joules(v), joules(e)),
                    None => joules(v),
                }),
                fmt_opt(r.j_per_token_above_idle, joules),
                fmt_opt(r.tokens_per_j, |v| format!("{v:.1}")),
                fmt_opt(r.wall_j_per_token, joules),
                r.power_samples,
                if r.power_few_samples { " (few)" } else { "" },
                fmt_opt(r.temp_before_c, |v| format!("{v:.1}")),
                fmt_opt(r.temp_after_c, |v| format!("{v:.1}")),
                fmt_opt(r.freq_after_mhz, |v| format!("{v:.0}")),
                match (r.throttled, r.thermal_noisy) {
                    (Some(true), _) => "yes",
                    (_, true) => "noisy",
                    (Some(false), _) => "no",
                    (None, _) => "–",
                },
            );
        }
    }
    out
}

/// Which recipes are worth shipping on the board, per model: the ones no
/// other beats on generation speed, KL divergence and memory together,
/// fastest first.
fn recipe_choice_line(figures: &ModelFigures) -> String {
    let mut out = String::new();
    let choices = figures.recipe_choices();
    let mut models: Vec<(&str, &str)> = choices
        .iter()
        .map(|(r, _)| (r.model_filename.as_str(), r.build.as_str()))
        .collect();
    models.dedup();
    for (model, build) in models {
        let of_model: Vec<_> = choices
            .iter()
            .filter(|(r, _)| r.model_filename == model && r.build == build)
            .collect();
        if of_model.len() < 2 {
            continue;
        }
        let front: Vec<String> = of_model
            .iter()
            .filter(|(_, front)| *front)
            .map(|(r, _)| {
                format!(
                    "{} ({:.0} t/s, KLD {:.4}, {:.0} MB)",
                    r.recipe,
                    r.avg_ts.unwrap_or(0.0),
                    r.kld_mean.unwrap_or(0.0),
                    r.peak_rss_bytes.unwrap_or(r.model_size) as f64 / 1e6
                )
            })
            .collect();
        let beaten = of_model.len() - front.len();
        let _ = writeln!(
            out,
            "\n**Which recipe** ({model}{}): worth shipping on this board, as no other recipe is faster in generation, closer to the unquantized model and smaller in memory all at once: {}; the other {beaten} are each slower, farther and larger than one of these (speeds as measured, noise included: see the table; `model_recipe_chooser` plots them).",
            if build.is_empty() { String::new() } else { format!(" @{build}") },
            front.join(", ")
        );
    }
    out
}

/// Joules to three significant digits: a Pi's 0.213 J/token and a tiny
/// model's 0.000712 alike.
fn joules(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let digits = (2 - v.abs().log10().floor() as i32).max(0) as usize;
    format!("{v:.digits$}")
}

/// `value ± error` where the error is known (llama-perplexity's style).
fn with_error(value: String, error: Option<f64>, digits: usize) -> String {
    match error {
        Some(e) => format!("{value} ± {e:.digits$}"),
        None => value,
    }
}

fn fmt_opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "–".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::rows::example_row;

    #[test]
    fn type_table_shows_speedup_against_f32_and_flags_emulation() {
        let mut f32_row = example_row("f");
        f32_row.ty = "F32".into();
        f32_row.bits_per_weight = 32.0;
        f32_row.median_ns = Some(600_000.0);
        let mut q4 = example_row("q");
        q4.median_ns = Some(150_000.0);
        let mut emu = q4.clone();
        emu.board = "sim1".into();
        emu.emulated = true;
        let table = type_table(&[f32_row, q4, emu]);
        assert!(
            table.contains("| Q4_0 | 4.50 | 1 | 0 | 0 | 4.00x |"),
            "{table}"
        );
        assert!(table.contains("### sim1 (EMULATED"), "{table}");
        assert!(!table.contains("### local (EMULATED"), "{table}");
    }

    #[test]
    fn farm_boards_name_place_coordinator_reservation_and_power_cycles() {
        use crate::runs::manifest::{BoardOutcome, FarmRecord, PowerCycleRecord};
        let plain = BoardOutcome {
            board: "sim1".into(),
            ..Default::default()
        };
        assert_eq!(farm_boards(std::slice::from_ref(&plain)), "");
        let farm = BoardOutcome {
            board: "pi5-a".into(),
            labgrid: Some(FarmRecord {
                place: "pi5-a".into(),
                coordinator: "lab:20408".into(),
                token: Some("TOKEN1".into()),
                reached_at: Some("pi@10.0.0.5:22".into()),
                tags: [("board".to_string(), "pi5".to_string())].into(),
                power_cycles: vec![PowerCycleRecord {
                    at: "T".into(),
                    ssh_after_seconds: Some(41.0),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = farm_boards(&[plain, farm]);
        assert!(
            text.contains("- `pi5-a`: place `pi5-a` on coordinator lab:20408, reservation TOKEN1, reached at pi@10.0.0.5:22, tags board=pi5; power-cycled at T (SSH back after 41 s)"),
            "{text}"
        );
    }
}
