//! GFLOP/s against threads at batch 1, the geometric mean over shapes.

use super::kernel_figure;
use crate::results::render::chart::{Chart, Figure};
use crate::results::render::figures::{thread_scaling, types_by_bits};
use crate::results::render::{PlotKind, RunData};
use std::collections::BTreeSet;

pub struct ThreadScaling;

impl PlotKind for ThreadScaling {
    fn name(&self) -> &'static str {
        "thread_scaling"
    }

    fn figures(&self, run: &RunData) -> Vec<Figure> {
        kernel_figure(
            run,
            self.name(),
            "Thread scaling (batch 1, geometric mean over shapes)",
            |rows| {
                let scaling = thread_scaling(rows);
                let counts: BTreeSet<usize> = scaling
                    .values()
                    .flat_map(|points| points.iter().map(|p| p.0))
                    .collect();
                if counts.len() < 2 {
                    return Chart::Note("only one thread count measured".into());
                }
                let series = types_by_bits(rows)
                    .into_iter()
                    .filter_map(|(ty, _)| {
                        let points = scaling.get(&ty)?;
                        Some((ty, points.iter().map(|&(t, g)| (t as f64, g)).collect()))
                    })
                    .collect();
                Chart::Lines {
                    x_label: "threads".into(),
                    y_label: "GFLOP/s".into(),
                    series,
                }
            },
        )
    }
}
