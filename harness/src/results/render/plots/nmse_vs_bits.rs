//! Output NMSE against bits per weight: the size/quality trade-off of each
//! type (geometric mean over its cells).

use super::kernel_figure;
use crate::results::render::chart::{Chart, Figure, LabelledPoint};
use crate::results::render::figures::nmse_by_type;
use crate::results::render::{PlotKind, RunData};

pub struct NmseVsBits;

impl PlotKind for NmseVsBits {
    fn name(&self) -> &'static str {
        "nmse_vs_bits"
    }

    fn figures(&self, run: &RunData) -> Vec<Figure> {
        kernel_figure(
            run,
            self.name(),
            "Output error against bits per weight",
            |rows| {
                let points: Vec<LabelledPoint> = nmse_by_type(rows)
                    .into_iter()
                    .map(|(ty, bits, nmse)| LabelledPoint {
                        label: ty.clone(),
                        colour_key: ty,
                        x: bits,
                        y: nmse,
                    })
                    .collect();
                if points.is_empty() {
                    return Chart::Note("no error figures (F32 only?)".into());
                }
                Chart::LogScatter {
                    x_label: "bits per weight".into(),
                    y_label: "output NMSE (log10)".into(),
                    points,
                }
            },
        )
    }
}
