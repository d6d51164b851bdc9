//! The human-readable summary: markdown tables from kernel rows.

use crate::results::{CellStatus, KernelRow};
use std::collections::BTreeMap;
use std::fmt::Write;

/// Per board: one line per type with its decode (batch 1, most threads)
/// figures, geometric means over shapes, ordered by bits per weight.
pub fn type_table(rows: &[KernelRow]) -> String {
    let mut out = String::new();
    let mut boards: BTreeMap<&str, Vec<&KernelRow>> = BTreeMap::new();
    for r in rows {
        boards.entry(&r.board).or_default().push(r);
    }
    for (board, rows) in boards {
        let emulated = rows.iter().any(|r| r.emulated);
        let _ = writeln!(
            out,
            "\n### {board}{}\n",
            if emulated {
                " (EMULATED: timings measure qemu, not the board)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "| type | bits/weight | cells ok | unsupported | failed | speedup vs F32 | GFLOP/s | weight GB/s | share of bandwidth | output NMSE |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let decode = best_thread_decode(&rows);
        let f32_ns: BTreeMap<&str, f64> = decode
            .iter()
            .filter(|r| r.ty == "F32")
            .filter_map(|r| Some((r.shape.as_str(), r.median_ns?)))
            .collect();
        let mut types: Vec<(&str, f64)> = rows
            .iter()
            .map(|r| (r.ty.as_str(), r.bits_per_weight))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect();
        types.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (ty, bits) in types {
            let of_type: Vec<&&KernelRow> = rows.iter().filter(|r| r.ty == ty).collect();
            let count = |s| of_type.iter().filter(|r| r.status == s).count();
            let dec: Vec<&KernelRow> = decode.iter().copied().filter(|r| r.ty == ty).collect();
            let speedup = geomean(
                dec.iter()
                    .filter_map(|r| Some(f32_ns.get(r.shape.as_str())? / r.median_ns?)),
            );
            let _ = writeln!(
                out,
                "| {ty} | {bits:.2} | {} | {} | {} | {} | {} | {} | {} | {} |",
                count(CellStatus::Ok),
                count(CellStatus::Unsupported),
                count(CellStatus::Failed),
                fmt_opt(speedup, |v| format!("{v:.2}x")),
                fmt_opt(geomean(dec.iter().filter_map(|r| r.gflops)), |v| format!(
                    "{v:.1}"
                )),
                fmt_opt(
                    geomean(dec.iter().filter_map(|r| r.weight_gbps)),
                    |v| format!("{v:.1}")
                ),
                fmt_opt(
                    geomean(dec.iter().filter_map(|r| r.bandwidth_share)),
                    |v| format!("{:.0}%", v * 100.0)
                ),
                fmt_opt(
                    geomean(of_type.iter().filter_map(|r| r.nmse.filter(|e| *e > 0.0))),
                    |v| format!("{v:.2e}")
                ),
            );
        }
    }
    out
}

/// Every cell, for the summary file.
pub fn cell_table(rows: &[KernelRow]) -> String {
    let mut out = String::from(
        "| board | shape | type | N | threads | median µs | GFLOP/s | weight GB/s | NMSE | path / note |\n|---|---|---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let path_or_note = if r.status == CellStatus::Ok {
            r.kernel_path.clone()
        } else {
            format!("{:?}: {}", r.status, r.note).to_lowercase()
        };
        let _ = writeln!(
            out,
            "| {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.board,
            if r.emulated { " (emu)" } else { "" },
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

/// The model table: one line per model x recipe at the most threads
/// measured, with llama-bench's pp/tg figures and the quality columns.
pub fn model_table(rows: &[crate::models::ModelRow]) -> String {
    let mut out = String::from(
        "\n| board | model | recipe | bits/weight | size MB | pp t/s | tg t/s | speedup vs f32 (tg) | PPL | mean KLD | top-1 agree | MC acc | repetition | fallbacks | generated text |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    let max_threads = rows.iter().map(|r| r.n_threads).max().unwrap_or(0);
    let tg = |board: &str, model: &str, recipe: &str| {
        rows.iter()
            .find(|r| {
                r.board == board
                    && r.model_filename == model
                    && r.recipe == recipe
                    && r.n_gen > 0
                    && r.n_threads == max_threads
            })
            .and_then(|r| r.avg_ts)
    };
    let mut seen = std::collections::BTreeSet::new();
    for r in rows {
        if !seen.insert((r.board.clone(), r.model_filename.clone(), r.recipe.clone())) {
            continue;
        }
        if r.status != CellStatus::Ok {
            let _ = writeln!(
                out,
                "| {} | {} | {} | – | – | – | – | – | – | – | – | – | – | – | failed: {} |",
                r.board,
                r.model_filename,
                r.recipe,
                r.note.replace('|', "/")
            );
            continue;
        }
        let pp = rows
            .iter()
            .find(|x| {
                x.board == r.board
                    && x.model_filename == r.model_filename
                    && x.recipe == r.recipe
                    && x.n_prompt > 0
                    && x.n_threads == max_threads
            })
            .and_then(|x| x.avg_ts);
        let this_tg = tg(&r.board, &r.model_filename, &r.recipe);
        let speedup = this_tg
            .zip(tg(&r.board, &r.model_filename, "f32"))
            .map(|(a, b)| a / b);
        let text: String = r.generated_text.chars().take(60).collect();
        let _ = writeln!(
            out,
            "| {}{} | {} | {} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.board,
            if r.emulated { " (emu)" } else { "" },
            r.model_filename,
            r.recipe,
            r.bits_per_weight,
            r.file_bytes as f64 / 1e6,
            fmt_opt(pp, |v| format!("{v:.0}")),
            fmt_opt(this_tg, |v| format!("{v:.0}")),
            fmt_opt(speedup, |v| format!("{v:.2}x")),
            fmt_opt(r.ppl, |v| format!("{v:.4}")),
            fmt_opt(r.kld_mean, |v| format!("{v:.6}")),
            fmt_opt(r.top1_agreement, |v| format!("{:.2}%", v * 100.0)),
            fmt_opt(r.mc_accuracy, |v| format!("{:.0}%", v * 100.0)),
            fmt_opt(r.repetition_score, |v| format!("{v:.2}")),
            if r.fallbacks.is_empty() {
                0
            } else {
                r.fallbacks.split(';').count()
            },
            text.replace('|', "/").replace('\n', " "),
        );
    }
    out
}

fn best_thread_decode<'a>(rows: &[&'a KernelRow]) -> Vec<&'a KernelRow> {
    let mut best: BTreeMap<(&str, &str), &KernelRow> = BTreeMap::new();
    for &r in rows
        .iter()
        .filter(|r| r.n == 1 && r.status == CellStatus::Ok)
    {
        let key = (r.shape.as_str(), r.ty.as_str());
        if best.get(&key).is_none_or(|b| r.threads > b.threads) {
            best.insert(key, r);
        }
    }
    best.into_values().collect()
}

fn geomean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let logs: Vec<f64> = values.filter(|v| *v > 0.0).map(f64::ln).collect();
    (!logs.is_empty()).then(|| (logs.iter().sum::<f64>() / logs.len() as f64).exp())
}

fn fmt_opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "–".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::example_row;

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
}
