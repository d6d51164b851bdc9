//! Energy and heat of model rows: joules per generated token against KL
//! divergence (the recipe chooser's energy version: on a battery, the
//! recipe that costs least per token for the closeness it keeps), and the
//! sustained decodes' tokens/s, power and temperature against time.

use super::{board_caption, model_figure};
use crate::results::render::chart::{Chart, Figure, LabelledPoint, Panel};
use crate::results::render::figures::{by_board, emulated_boards};
use crate::results::render::{PlotKind, RunData};
use std::collections::BTreeMap;
use wire::rows::SustainRow;

/// One figure of a sustained row.
type Measure = fn(&SustainRow) -> Option<f64>;

pub struct ModelEnergyVsKld;
pub struct ModelSustained;

impl PlotKind for ModelEnergyVsKld {
    fn name(&self) -> &'static str {
        "model_energy_vs_kld"
    }

    fn figures(&self, run: &RunData) -> Vec<Figure> {
        if run.model_rows.iter().all(|r| r.j_per_token.is_none()) {
            return Vec::new();
        }
        model_figure(
            run,
            self.name(),
            |_| {
                "KL divergence from the unquantized model against joules per generated token (lower left is better)".to_string()
            },
            |figures| {
                let points: Vec<LabelledPoint> = figures
                    .tg_rows()
                    .iter()
                    .filter_map(|r| {
                        let joules = r.j_per_token?;
                        Some(LabelledPoint {
                            label: format!(
                                "{} {}: {:.4} J/token ({}), KLD {:.4}",
                                r.model_filename,
                                r.recipe,
                                joules,
                                r.power_source,
                                r.kld_mean.unwrap_or(0.0)
                            ),
                            colour_key: r.recipe.clone(),
                            x: joules,
                            y: r.kld_mean.filter(|k| *k > 0.0)?,
                        })
                    })
                    .collect();
                if points.is_empty() {
                    return Chart::Note(
                        "no generation rows with both energy and a KL divergence (f32 only, or no power source)"
                            .into(),
                    );
                }
                Chart::LogScatter {
                    x_label: "joules per generated token".into(),
                    y_label: "mean KLD (log10)".into(),
                    points,
                }
            },
        )
    }
}

impl PlotKind for ModelSustained {
    fn name(&self) -> &'static str {
        "model_sustained"
    }

    fn figures(&self, run: &RunData) -> Vec<Figure> {
        if run.sustained.is_empty() {
            return Vec::new();
        }
        let boards = by_board(&run.sustained, |r| &r.board);
        let mut panels = Vec::new();
        for (board, rows) in &boards {
            let caption = board_caption(board, rows.iter().any(|r| r.emulated));
            let measures: [(&str, Measure); 3] = [
                ("generated tokens/s", |r| Some(r.tokens_per_s)),
                ("power, W", |r| r.power_w),
                ("SoC temperature, °C", |r| r.temp_c),
            ];
            for (y_label, value) in measures {
                let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
                for r in rows {
                    if let Some(v) = value(r) {
                        series
                            .entry(format!(
                                "{} {} t{}",
                                r.model_filename, r.recipe, r.n_threads
                            ))
                            .or_default()
                            .push((r.elapsed_s, v));
                    }
                }
                // Power and temperature only where the board gave them.
                if series.is_empty() {
                    continue;
                }
                panels.push(Panel {
                    caption: format!("{caption}: {y_label}"),
                    chart: Chart::Lines {
                        x_label: "seconds decoding without pause".into(),
                        y_label: y_label.into(),
                        series: series.into_iter().collect(),
                    },
                });
            }
        }
        vec![Figure {
            file_stem: self.name().to_string(),
            title: "Sustained decoding: does each recipe keep its speed? (tokens/s, power and temperature over time)".into(),
            boards: boards.keys().cloned().collect(),
            emulated_boards: emulated_boards(&run.sustained, |r| (&r.board, r.emulated)),
            panels,
        }]
    }
}
