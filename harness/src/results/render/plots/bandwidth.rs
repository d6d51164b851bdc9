//! Achieved weight GB/s at batch 1, with the board's measured read
//! bandwidth as a line: how close each type gets to the memory limit.

use super::kernel_figure;
use crate::results::render::chart::{Chart, Figure};
use crate::results::render::figures::{
    decode_rows, decode_values, measured_bandwidth, types_by_bits,
};
use crate::results::render::{PlotKind, RunData};

pub struct Bandwidth;

impl PlotKind for Bandwidth {
    fn name(&self) -> &'static str {
        "bandwidth"
    }

    fn figures(&self, run: &RunData) -> Vec<Figure> {
        kernel_figure(
            run,
            self.name(),
            "Achieved weight GB/s against measured read bandwidth",
            |rows| {
                let decode = decode_rows(rows);
                let limit = measured_bandwidth(&decode)
                    .map(|bw| (bw, format!("measured read bandwidth {bw:.1} GB/s")));
                Chart::bars_from(
                    "weight GB/s",
                    &decode_values(&decode, |r| r.weight_gbps),
                    &types_by_bits(&decode),
                    limit,
                )
            },
        )
    }
}
