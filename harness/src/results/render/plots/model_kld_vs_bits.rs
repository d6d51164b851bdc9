//! KL divergence from the unquantized model against bits per weight, each
//! point labelled with its KLD and generation speed: quality, size and
//! speed in one picture. Calibrated recipes (`+imatrix`, `gptq-`) sit at
//! their type's bits beside the plain one, labels stacked.

use super::model_figure;
use crate::results::render::chart::{Chart, Figure, LabelledPoint};
use crate::results::render::{PlotKind, RunData};

pub struct ModelKldVsBits;

impl PlotKind for ModelKldVsBits {
    fn name(&self) -> &'static str {
        "model_kld_vs_bits"
    }

    fn figures(&self, run: &RunData) -> Vec<Figure> {
        model_figure(
            run,
            self.name(),
            |_| "KL divergence from the unquantized model against bits per weight".to_string(),
            |figures| {
                let points: Vec<LabelledPoint> = figures
                    .tg_rows()
                    .iter()
                    .filter_map(|r| {
                        Some(LabelledPoint {
                            label: format!(
                                "{} {}: {:.4} ({:.0} t/s)",
                                r.model_filename,
                                r.recipe,
                                r.kld_mean.unwrap_or(0.0),
                                r.avg_ts.unwrap_or(0.0)
                            ),
                            colour_key: r.recipe.clone(),
                            x: r.bits_per_weight,
                            y: r.kld_mean.filter(|k| *k > 0.0)?,
                        })
                    })
                    .collect();
                if points.is_empty() {
                    return Chart::Note("no KL divergence figures (f32 only?)".into());
                }
                Chart::LogScatter {
                    x_label: "bits per weight".into(),
                    y_label: "mean KLD (log10)".into(),
                    points,
                }
            },
        )
    }
}
