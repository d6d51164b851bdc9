//! Per model, each layer's measured importance behind `adaptive`, coloured
//! by the type the layer got: `layer_importance_<model>`.

use crate::results::render::chart::{Chart, Figure, Panel};
use crate::results::render::{PlotKind, RunData};
use std::collections::BTreeMap;

pub struct LayerImportancePlot;

impl PlotKind for LayerImportancePlot {
    fn name(&self) -> &'static str {
        "layer_importance"
    }

    fn figures(&self, run: &RunData) -> Vec<Figure> {
        run.importance
            .iter()
            .map(|li| {
                let values: BTreeMap<(String, String), f64> = li
                    .scores
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let ty = li.assignment.get(i).cloned().unwrap_or_default();
                        ((format!("blk.{i:02}"), ty), v)
                    })
                    .collect();
                let types: Vec<(String, f64)> = li
                    .assignment
                    .iter()
                    .map(|a| (a.clone(), 0.0))
                    .collect::<BTreeMap<_, _>>()
                    .into_iter()
                    .collect();
                Figure {
                    file_stem: format!(
                        "layer_importance_{}",
                        li.model.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
                    ),
                    title: format!(
                        "Layer importance of {} (bar colour = type in `adaptive`)",
                        li.model
                    ),
                    // Importance is measured on the host, not on a board.
                    boards: vec!["host".into()],
                    emulated_boards: Vec::new(),
                    panels: vec![Panel {
                        caption: "measured on the host".into(),
                        chart: Chart::bars_from(
                            "mean KLD when only this layer is low-bit",
                            &values,
                            &types,
                            None,
                        ),
                    }],
                }
            })
            .collect()
    }
}
