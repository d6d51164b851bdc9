//! GFLOP/s by type, per shape, at batch 1 with the most threads.

use super::kernel_figure;
use crate::results::render::chart::{Chart, Figure};
use crate::results::render::figures::{decode_rows, decode_values, types_by_bits};
use crate::results::render::{PlotKind, RunData};

pub struct ThroughputBatch1;

impl PlotKind for ThroughputBatch1 {
    fn name(&self) -> &'static str {
        "throughput_batch1"
    }

    fn figures(&self, run: &RunData) -> Vec<Figure> {
        kernel_figure(
            run,
            self.name(),
            "GEMV throughput by type (batch 1, most threads)",
            |rows| {
                let decode = decode_rows(rows);
                Chart::bars_from(
                    "GFLOP/s",
                    &decode_values(&decode, |r| r.gflops),
                    &types_by_bits(&decode),
                    None,
                )
            },
        )
    }
}
