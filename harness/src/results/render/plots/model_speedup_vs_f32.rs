//! Generation (tg) speed of each recipe over f32, per model: the seed
//! study's table as a chart.

use super::model_figure;
use crate::results::render::chart::{Chart, Figure};
use crate::results::render::{PlotKind, RunData};

pub struct ModelSpeedupVsF32;

impl PlotKind for ModelSpeedupVsF32 {
    fn name(&self) -> &'static str {
        "model_speedup_vs_f32"
    }

    fn figures(&self, run: &RunData) -> Vec<Figure> {
        model_figure(
            run,
            self.name(),
            |boards| {
                let threads = boards.iter().map(|b| b.max_threads).max().unwrap_or(0);
                format!("Generation speedup against f32 by recipe (tg, {threads} threads)")
            },
            |figures| {
                let speedups = figures.tg_speedup_vs_f32();
                if speedups.is_empty() {
                    return Chart::Note("no f32 recipe: add f32 to the recipes".into());
                }
                Chart::bars_from(
                    "speedup (f32 time / recipe time)",
                    &speedups,
                    &figures.recipes_by_bits(),
                    Some((1.0, "f32 = 1".into())),
                )
            },
        )
    }
}
