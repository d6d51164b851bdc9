//! Milliseconds per generated token of each recipe, per model.

use super::model_figure;
use crate::results::render::chart::{Chart, Figure};
use crate::results::render::{PlotKind, RunData};

pub struct ModelTimePerToken;

impl PlotKind for ModelTimePerToken {
    fn name(&self) -> &'static str {
        "model_time_per_token"
    }

    fn figures(&self, run: &RunData) -> Vec<Figure> {
        model_figure(
            run,
            self.name(),
            |_| "Time per generated token by recipe".to_string(),
            |figures| {
                Chart::bars_from(
                    "ms per token",
                    &figures.ms_per_token(),
                    &figures.recipes_by_bits(),
                    None,
                )
            },
        )
    }
}
