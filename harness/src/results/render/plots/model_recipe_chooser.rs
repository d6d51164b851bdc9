//! The recipe chooser: generation speed against KL divergence from the
//! unquantized model, each point labelled with its memory, the recipes no
//! other beats on all three (the Pareto front) told apart from those that
//! are slower, worse and larger than one of them. The
//! answer to "which quantization should I ship on this board" for a given
//! tolerance of quality loss: the fastest front recipe within it.

use super::model_figure;
use crate::results::render::chart::{Chart, Figure, LabelledPoint};
use crate::results::render::{PlotKind, RunData};

pub struct ModelRecipeChooser;

impl PlotKind for ModelRecipeChooser {
    fn name(&self) -> &'static str {
        "model_recipe_chooser"
    }

    fn figures(&self, run: &RunData) -> Vec<Figure> {
        model_figure(
            run,
            self.name(),
            |_| {
                "Which recipe: generation speed against KL divergence, memory in the labels (front: no other recipe is faster, closer and smaller)".to_string()
            },
            |figures| {
                let points: Vec<LabelledPoint> = figures
                    .recipe_choices()
                    .into_iter()
                    .filter_map(|(r, front)| {
                        Some(LabelledPoint {
                            label: format!(
                                "{}{} {}: {:.0} t/s, KLD {:.4}, {:.0} MB",
                                if front { "* " } else { "" },
                                r.model_filename,
                                r.recipe,
                                r.avg_ts?,
                                r.kld_mean?,
                                r.peak_rss_bytes.unwrap_or(r.model_size) as f64 / 1e6
                            ),
                            colour_key: if front {
                                "front (worth shipping)".into()
                            } else {
                                "beaten (another recipe is faster, closer and smaller)".into()
                            },
                            x: r.avg_ts?,
                            // An unquantized recipe's KLD is 0: it has no
                            // place on a log axis (it is the reference).
                            y: r.kld_mean.filter(|k| *k > 0.0)?,
                        })
                    })
                    .collect();
                if points.is_empty() {
                    return Chart::Note("no recipe with both speed and KL divergence".into());
                }
                Chart::LogScatter {
                    x_label: "tg tokens per second".into(),
                    y_label: "mean KLD (log10)".into(),
                    points,
                }
            },
        )
    }
}
