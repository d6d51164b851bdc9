//! The plot kinds, one file each. A kernel plot draws one panel per board
//! from that board's measured kernel rows; a model plot one panel per board
//! from its model rows.

mod bandwidth;
mod layer_importance;
mod model_depth;
mod model_energy;
mod model_kld_vs_bits;
mod model_recipe_chooser;
mod model_speedup_vs_f32;
mod model_time_per_token;
mod nmse_vs_bits;
mod speedup_vs_f32;
mod thread_scaling;
mod throughput_batch1;

use super::chart::{Chart, Figure, Panel};
use super::figures::{by_board, emulated_boards, shown_model_rows, ModelFigures};
use super::{PlotKind, RunData};
use wire::rows::{CellStatus, KernelRow, ModelRow};

/// Every plot kind, in the order they are drawn.
pub fn all() -> Vec<Box<dyn PlotKind>> {
    vec![
        Box::new(throughput_batch1::ThroughputBatch1),
        Box::new(speedup_vs_f32::SpeedupVsF32),
        Box::new(thread_scaling::ThreadScaling),
        Box::new(nmse_vs_bits::NmseVsBits),
        Box::new(bandwidth::Bandwidth),
        Box::new(model_speedup_vs_f32::ModelSpeedupVsF32),
        Box::new(model_time_per_token::ModelTimePerToken),
        Box::new(model_kld_vs_bits::ModelKldVsBits),
        Box::new(model_recipe_chooser::ModelRecipeChooser),
        Box::new(model_depth::ModelTgVsDepth),
        Box::new(model_depth::ModelKvVsDepth),
        Box::new(model_depth::ModelTtftVsDepth),
        Box::new(model_energy::ModelEnergyVsKld),
        Box::new(model_energy::ModelSustained),
        Box::new(layer_importance::LayerImportancePlot),
    ]
}

/// A figure with one panel per board from its measured kernel rows; none
/// when the run measured no kernel.
fn kernel_figure(
    run: &RunData,
    file_stem: &str,
    title: &str,
    chart: impl Fn(&[&KernelRow]) -> Chart,
) -> Vec<Figure> {
    let measured: Vec<&KernelRow> = run
        .kernel_rows
        .iter()
        .filter(|r| r.status == CellStatus::Ok && r.median_ns.is_some())
        .collect();
    if measured.is_empty() {
        return Vec::new();
    }
    let boards = by_board(&measured, |r| &r.board);
    let panels = boards
        .iter()
        .map(|(board, rows)| {
            let rows: Vec<&KernelRow> = rows.iter().map(|r| **r).collect();
            let noisy = rows.iter().filter(|r| r.thermal_noisy).count();
            let mut caption = board_caption(board, rows.iter().any(|r| r.emulated));
            if noisy > 0 {
                caption.push_str(&format!(
                    " - {noisy} cells THERMALLY NOISY (throttled or not `performance`)"
                ));
            }
            Panel {
                caption,
                chart: chart(&rows),
            }
        })
        .collect();
    vec![Figure {
        file_stem: file_stem.to_string(),
        title: title.to_string(),
        boards: boards.keys().cloned().collect(),
        emulated_boards: emulated_boards(&measured, |r| (&r.board, r.emulated)),
        panels,
    }]
}

/// A figure with one panel per board from its model rows; none when the
/// run measured no model.
fn model_figure(
    run: &RunData,
    file_stem: &str,
    title: impl Fn(&[ModelFigures]) -> String,
    chart: impl Fn(&ModelFigures) -> Chart,
) -> Vec<Figure> {
    let shown = shown_model_rows(&run.model_rows);
    let ok: Vec<&ModelRow> = shown
        .iter()
        .filter(|r| r.status == CellStatus::Ok)
        .collect();
    if ok.is_empty() {
        return Vec::new();
    }
    let boards = by_board(&ok, |r| &r.board);
    let figures: Vec<(String, ModelFigures)> = boards
        .iter()
        .map(|(board, rows)| {
            let rows: Vec<&ModelRow> = rows.iter().map(|r| **r).collect();
            (board.clone(), ModelFigures::new(&rows))
        })
        .collect();
    let all: Vec<ModelFigures> = figures
        .iter()
        .map(|(_, f)| ModelFigures::new(&f.rows))
        .collect();
    let panels = figures
        .iter()
        .map(|(board, f)| Panel {
            caption: {
                let mut caption = board_caption(board, f.rows.iter().any(|r| r.emulated));
                if f.rows.iter().any(|r| r.synthetic) {
                    caption.push_str(" - SYNTHETIC weights: speed and memory only");
                }
                caption
            },
            chart: chart(f),
        })
        .collect();
    vec![Figure {
        file_stem: file_stem.to_string(),
        title: title(&all),
        boards: boards.keys().cloned().collect(),
        emulated_boards: emulated_boards(&ok, |r| (&r.board, r.emulated)),
        panels,
    }]
}

pub(super) fn board_caption(board: &str, emulated: bool) -> String {
    if emulated {
        format!("{board} (emulated)")
    } else {
        board.to_string()
    }
}
