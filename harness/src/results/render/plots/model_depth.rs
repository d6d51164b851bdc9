//! What a conversation's length does (a model matrix with `n_depth`):
//! generation speed against the tokens already in the KV cache, the KV
//! cache's size, and the time to the first token of a prompt against them,
//! one line per model, recipe and cache setting (KV-cache type, attention,
//! batches, build), at the most threads. Drawn only when a run measured
//! two depths or more.

use super::model_figure;
use crate::results::render::chart::{Chart, Figure};
use crate::results::render::figures::ModelFigures;
use crate::results::render::{PlotKind, RunData};
use std::collections::{BTreeMap, BTreeSet};
use wire::rows::ModelRow;

pub struct ModelTgVsDepth;
pub struct ModelKvVsDepth;
pub struct ModelTtftVsDepth;

impl PlotKind for ModelTtftVsDepth {
    fn name(&self) -> &'static str {
        "model_ttft_vs_depth"
    }

    fn figures(&self, run: &RunData) -> Vec<Figure> {
        depth_figure(
            run,
            self.name(),
            "Time to first token of a prompt against context depth (the pp test's prompt on top of the KV cache)",
            "time to first token, ms",
            (Tests::Prompt, |r| r.ttft_ms),
        )
    }
}

impl PlotKind for ModelTgVsDepth {
    fn name(&self) -> &'static str {
        "model_tg_vs_depth"
    }

    fn figures(&self, run: &RunData) -> Vec<Figure> {
        depth_figure(
            run,
            self.name(),
            "Generation speed against context depth (tokens already in the KV cache)",
            "generated tokens/s",
            (Tests::Generation, |r| r.avg_ts),
        )
    }
}

impl PlotKind for ModelKvVsDepth {
    fn name(&self) -> &'static str {
        "model_kv_vs_depth"
    }

    fn figures(&self, run: &RunData) -> Vec<Figure> {
        depth_figure(
            run,
            self.name(),
            "KV-cache size against context depth (depth plus the generated tokens)",
            "KV cache MB",
            (Tests::Generation, |r| r.kv_bytes.map(|b| b as f64 / 1e6)),
        )
    }
}

/// Which rows a depth figure draws.
#[derive(Clone, Copy)]
enum Tests {
    Generation,
    Prompt,
}

/// One line per series through `rows`' `value` at each depth.
fn depth_figure(
    run: &RunData,
    file_stem: &str,
    title: &str,
    y_label: &str,
    (tests, value): (Tests, fn(&ModelRow) -> Option<f64>),
) -> Vec<Figure> {
    let depths: BTreeSet<usize> = run.model_rows.iter().map(|r| r.n_depth).collect();
    if depths.len() < 2 {
        return Vec::new();
    }
    model_figure(
        run,
        file_stem,
        |_| title.to_string(),
        |figures: &ModelFigures| {
            let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
            let rows = match tests {
                Tests::Generation => figures.tg_rows(),
                Tests::Prompt => figures.pp_rows(),
            };
            for r in rows {
                if let Some(v) = value(r) {
                    series
                        .entry(format!("{} {}", r.model_filename, without_depth(r)))
                        .or_default()
                        .push((r.n_depth as f64, v));
                }
            }
            if series.is_empty() {
                return Chart::Note("no rows with this figure".into());
            }
            for points in series.values_mut() {
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
            Chart::Lines {
                x_label: "depth (tokens in the KV cache)".into(),
                y_label: y_label.into(),
                series: series.into_iter().collect(),
            }
        },
    )
}

/// A shown row's recipe label (`q4_0 kv=q8_0 fa=on d512@new`) without its
/// depth: the series the row is a point of.
fn without_depth(r: &ModelRow) -> String {
    if r.n_depth == 0 {
        r.recipe.clone()
    } else {
        r.recipe.replacen(&format!(" d{}", r.n_depth), "", 1)
    }
}
