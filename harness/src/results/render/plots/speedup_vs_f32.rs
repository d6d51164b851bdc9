//! F32 time over each type's time at batch 1: the seed study's table as a
//! chart.

use super::kernel_figure;
use crate::results::render::chart::{Chart, Figure};
use crate::results::render::figures::{decode_rows, speedup_vs_f32, types_by_bits};
use crate::results::render::{PlotKind, RunData};

pub struct SpeedupVsF32;

impl PlotKind for SpeedupVsF32 {
    fn name(&self) -> &'static str {
        "speedup_vs_f32"
    }

    fn figures(&self, run: &RunData) -> Vec<Figure> {
        kernel_figure(
            run,
            self.name(),
            "Speedup against F32 (batch 1, most threads)",
            |rows| {
                let decode = decode_rows(rows);
                let speedups = speedup_vs_f32(&decode);
                if speedups.is_empty() {
                    return Chart::Note("no F32 rows at batch 1: add F32 to the matrix".into());
                }
                Chart::bars_from(
                    "speedup (F32 time / type time)",
                    &speedups,
                    &types_by_bits(&decode),
                    Some((1.0, "F32 = 1".into())),
                )
            },
        )
    }
}
