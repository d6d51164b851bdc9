//! Plots of kernel rows, PNG and SVG. Plot code takes rows, never paths to
//! CSVs, so any source of rows (a run, a comparison) can be drawn.
//!
//! Every title names the board(s), whether timings are emulated, the date and
//! the commit. A run with several boards gets one panel per board, side by
//! side.

use crate::results::{CellStatus, KernelRow};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Once;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PlotError {
    #[error("drawing {path}: {message}")]
    Draw { path: PathBuf, message: String },
    #[error("no measured rows to plot")]
    NoRows,
}

/// Text that goes into every title.
#[derive(Debug, Clone)]
pub struct PlotContext {
    pub date: String,
    pub commit: String,
}

/// The plot kinds, one file pair (`<name>.png`, `<name>.svg`) each.
pub const PLOTS: &[(&str, &str)] = &[
    (
        "throughput_batch1",
        "GEMV throughput by type (batch 1, most threads)",
    ),
    (
        "speedup_vs_f32",
        "Speedup against F32 (batch 1, most threads)",
    ),
    (
        "thread_scaling",
        "Thread scaling (batch 1, geometric mean over shapes)",
    ),
    ("nmse_vs_bits", "Output error against bits per weight"),
    (
        "bandwidth",
        "Achieved weight GB/s against measured read bandwidth",
    ),
];

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        // Embedded so plots render the same on a machine without fonts
        // (fresh CI images have none). DejaVu Sans, Bitstream Vera licence.
        let bytes: &'static [u8] = include_bytes!("../assets/DejaVuSans.ttf");
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, bytes);
    });
}

/// Draws every plot into `out_dir`; returns the files written.
pub fn draw_all(
    rows: &[KernelRow],
    ctx: &PlotContext,
    out_dir: &Path,
) -> Result<Vec<PathBuf>, PlotError> {
    register_font();
    let measured: Vec<&KernelRow> = rows
        .iter()
        .filter(|r| r.status == CellStatus::Ok && r.median_ns.is_some())
        .collect();
    if measured.is_empty() {
        return Err(PlotError::NoRows);
    }
    let boards: Vec<String> = measured
        .iter()
        .map(|r| r.board.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let shapes = measured
        .iter()
        .map(|r| &r.shape)
        .collect::<BTreeSet<_>>()
        .len();
    let mut written = Vec::new();
    for &(name, what) in PLOTS {
        for ext in ["png", "svg"] {
            let path = out_dir.join(format!("{name}.{ext}"));
            let panel_width = (120 * shapes).max(640) as u32;
            let size = (panel_width * boards.len() as u32 + 40, 520);
            let result = if ext == "png" {
                let root = BitMapBackend::new(&path, size).into_drawing_area();
                draw_one(&root, name, what, &measured, &boards, ctx)
                    .and_then(|_| root.present().map_err(|e| e.to_string()))
            } else {
                let root = SVGBackend::new(&path, size).into_drawing_area();
                draw_one(&root, name, what, &measured, &boards, ctx)
                    .and_then(|_| root.present().map_err(|e| e.to_string()))
            };
            result.map_err(|message| PlotError::Draw {
                path: path.clone(),
                message,
            })?;
            written.push(path);
        }
    }
    Ok(written)
}

fn draw_one<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    name: &str,
    what: &str,
    rows: &[&KernelRow],
    boards: &[String],
    ctx: &PlotContext,
) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let emulated: Vec<&str> = boards
        .iter()
        .filter(|b| rows.iter().any(|r| &r.board == *b && r.emulated))
        .map(String::as_str)
        .collect();
    let label = if emulated.is_empty() {
        "real hardware".to_string()
    } else {
        format!(
            "EMULATED ({}): timings measure qemu, not a Pi",
            emulated.join(", ")
        )
    };
    let title = format!(
        "{what}\n{} | {label} | {} | {}",
        boards.join(", "),
        ctx.date,
        ctx.commit
    );
    let (top, body) = root.split_vertically(56);
    for (i, line) in title.lines().enumerate() {
        top.draw_text(
            line,
            &("sans-serif", if i == 0 { 20 } else { 14 })
                .into_font()
                .color(&BLACK),
            (12, 6 + 24 * i as i32),
        )
        .map_err(|e| e.to_string())?;
    }
    let panels = body.split_evenly((1, boards.len()));
    for (panel, board) in panels.iter().zip(boards) {
        let board_rows: Vec<&KernelRow> =
            rows.iter().copied().filter(|r| &r.board == board).collect();
        let caption = if board_rows.iter().any(|r| r.emulated) {
            format!("{board} (emulated)")
        } else {
            board.clone()
        };
        match name {
            "throughput_batch1" => throughput(panel, &caption, &board_rows),
            "speedup_vs_f32" => speedup(panel, &caption, &board_rows),
            "thread_scaling" => thread_scaling(panel, &caption, &board_rows),
            "nmse_vs_bits" => nmse_vs_bits(panel, &caption, &board_rows),
            _ => bandwidth(panel, &caption, &board_rows),
        }
        .map_err(|e| format!("{board}: {e}"))?;
    }
    Ok(())
}

type DrawResult = Result<(), String>;

/// Rows at batch 1 with the most threads measured for their cell.
fn decode_rows<'a>(rows: &[&'a KernelRow]) -> Vec<&'a KernelRow> {
    let mut best: BTreeMap<(String, String), &KernelRow> = BTreeMap::new();
    for &r in rows.iter().filter(|r| r.n == 1) {
        let key = (r.shape.clone(), r.ty.clone());
        if best.get(&key).is_none_or(|b| r.threads > b.threads) {
            best.insert(key, r);
        }
    }
    best.into_values().collect()
}

/// Types in the order of their bits per weight, most bits first.
fn types_by_bits(rows: &[&KernelRow]) -> Vec<(String, f64)> {
    let mut types: Vec<(String, f64)> = rows
        .iter()
        .map(|r| (r.ty.clone(), r.bits_per_weight))
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .collect();
    types.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    types
}

/// A type keeps its colour in every plot: its position in GGML's type list.
fn type_color(ty: &str) -> RGBColor {
    let index = crate::ggml_type::GgmlType::ALL
        .iter()
        .position(|t| t.name().eq_ignore_ascii_case(ty))
        // Recipes that are not a single type (mixes, adaptive): a stable
        // colour from the name.
        .unwrap_or_else(|| {
            ty.bytes()
                .fold(7usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
        });
    color(index)
}

fn color(i: usize) -> RGBColor {
    const PALETTE: [RGBColor; 14] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
        RGBColor(0, 0, 128),
        RGBColor(128, 0, 0),
        RGBColor(0, 100, 0),
        RGBColor(255, 215, 0),
    ];
    PALETTE[i % PALETTE.len()]
}

/// Grouped bars: one group per shape, one bar per type.
fn grouped_bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    y_label: &str,
    values: &BTreeMap<(String, String), f64>,
    types: &[(String, f64)],
    reference_line: Option<(f64, String)>,
) -> DrawResult {
    let shapes: Vec<String> = values
        .keys()
        .map(|k| k.0.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if shapes.is_empty() {
        return note(area, caption, "no batch-1 rows");
    }
    let y_max = values
        .values()
        .copied()
        .chain(reference_line.iter().map(|r| r.0))
        .fold(0.0f64, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(70)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..shapes.len() as f64, 0f64..y_max.max(1e-9))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        // Ask for labels at every half unit and name only the group centres.
        .x_labels(shapes.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            let centred = (x - x.floor() - 0.5).abs() < 0.1;
            match shapes.get(i) {
                Some(name) if centred => name.clone(),
                _ => String::new(),
            }
        })
        .x_label_style(("sans-serif", 10))
        .y_desc(y_label)
        .draw()
        .map_err(|e| e.to_string())?;
    let width = 0.8 / types.len().max(1) as f64;
    for (ti, (ty, _)) in types.iter().enumerate() {
        let c = type_color(ty);
        let bars: Vec<Rectangle<(f64, f64)>> = shapes
            .iter()
            .enumerate()
            .filter_map(|(si, shape)| {
                let v = *values.get(&(shape.clone(), ty.clone()))?;
                let x0 = si as f64 + 0.1 + ti as f64 * width;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.9, v)],
                    c.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(|e| e.to_string())?
            .label(ty.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.filled()));
    }
    if let Some((level, label)) = reference_line {
        chart
            .draw_series(LineSeries::new(
                [(0.0, level), (shapes.len() as f64, level)],
                BLACK.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(label)
            .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], BLACK.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 11))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| e.to_string())
}

fn throughput<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    rows: &[&KernelRow],
) -> DrawResult {
    let decode = decode_rows(rows);
    let values = decode
        .iter()
        .filter_map(|r| Some(((r.shape.clone(), r.ty.clone()), r.gflops?)))
        .collect();
    grouped_bars(
        area,
        caption,
        "GFLOP/s",
        &values,
        &types_by_bits(&decode),
        None,
    )
}

fn speedup<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    rows: &[&KernelRow],
) -> DrawResult {
    let decode = decode_rows(rows);
    let f32_time: BTreeMap<String, f64> = decode
        .iter()
        .filter(|r| r.ty == "F32")
        .filter_map(|r| Some((r.shape.clone(), r.median_ns?)))
        .collect();
    if f32_time.is_empty() {
        return note(
            area,
            caption,
            "no F32 rows at batch 1: add F32 to the matrix",
        );
    }
    let values = decode
        .iter()
        .filter_map(|r| {
            let base = f32_time.get(&r.shape)?;
            Some(((r.shape.clone(), r.ty.clone()), base / r.median_ns?))
        })
        .collect();
    grouped_bars(
        area,
        caption,
        "speedup (F32 time / type time)",
        &values,
        &types_by_bits(&decode),
        Some((1.0, "F32 = 1".into())),
    )
}

fn bandwidth<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    rows: &[&KernelRow],
) -> DrawResult {
    let decode = decode_rows(rows);
    let values = decode
        .iter()
        .filter_map(|r| Some(((r.shape.clone(), r.ty.clone()), r.weight_gbps?)))
        .collect();
    // Each row carries its share of the board's bandwidth: recover the limit.
    let limit = decode
        .iter()
        .find_map(|r| Some(r.weight_gbps? / r.bandwidth_share?))
        .map(|bw| (bw, format!("measured read bandwidth {bw:.1} GB/s")));
    grouped_bars(
        area,
        caption,
        "weight GB/s",
        &values,
        &types_by_bits(&decode),
        limit,
    )
}

fn thread_scaling<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    rows: &[&KernelRow],
) -> DrawResult {
    // Geometric mean of GFLOP/s over the shapes measured at every thread count.
    let mut by_type: BTreeMap<String, BTreeMap<usize, Vec<f64>>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.n == 1) {
        if let Some(g) = r.gflops {
            by_type
                .entry(r.ty.clone())
                .or_default()
                .entry(r.threads)
                .or_default()
                .push(g.ln());
        }
    }
    let thread_counts: BTreeSet<usize> = by_type.values().flat_map(|m| m.keys().copied()).collect();
    if thread_counts.len() < 2 {
        return note(area, caption, "only one thread count measured");
    }
    let series: Vec<(String, Vec<(f64, f64)>)> = types_by_bits(rows)
        .into_iter()
        .filter_map(|(ty, _)| {
            let points = by_type.get(&ty)?;
            Some((
                ty,
                points
                    .iter()
                    .map(|(&t, logs)| {
                        (
                            t as f64,
                            (logs.iter().sum::<f64>() / logs.len() as f64).exp(),
                        )
                    })
                    .collect(),
            ))
        })
        .collect();
    let x_max = *thread_counts.iter().last().unwrap_or(&1) as f64;
    let y_max = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.5f64..x_max + 0.5, 0f64..y_max.max(1e-9))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("threads")
        .y_desc("GFLOP/s")
        .x_labels(thread_counts.len())
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| e.to_string())?;
    for (ty, points) in series {
        let c = type_color(&ty);
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(ty)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], c.stroke_width(2)));
        chart
            .draw_series(points.into_iter().map(|p| Circle::new(p, 3, c.filled())))
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 11))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| e.to_string())
}

fn nmse_vs_bits<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    rows: &[&KernelRow],
) -> DrawResult {
    // Geometric mean over shapes and batches of each type's output NMSE.
    let mut by_type: BTreeMap<String, (f64, Vec<f64>)> = BTreeMap::new();
    for r in rows {
        if let Some(e) = r.nmse.filter(|e| *e > 0.0) {
            by_type
                .entry(r.ty.clone())
                .or_insert((r.bits_per_weight, Vec::new()))
                .1
                .push(e.log10());
        }
    }
    let points: Vec<(String, f64, f64)> = by_type
        .into_iter()
        .map(|(ty, (bits, logs))| (ty, bits, logs.iter().sum::<f64>() / logs.len() as f64))
        .collect();
    if points.is_empty() {
        return note(area, caption, "no error figures (F32 only?)");
    }
    let (title, body) = area.split_vertically(24);
    title
        .draw_text(
            caption,
            &("sans-serif", 16).into_font().color(&BLACK),
            (20, 4),
        )
        .map_err(|e| e.to_string())?;
    scatter_log(&body, &points, "bits per weight", "output NMSE (log10)")
}

fn note<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    text: &str,
) -> DrawResult {
    area.draw_text(
        caption,
        &("sans-serif", 16).into_font().color(&BLACK),
        (20, 10),
    )
    .and_then(|_| {
        area.draw_text(
            text,
            &("sans-serif", 14).into_font().color(&BLACK),
            (20, 40),
        )
    })
    .map_err(|e| e.to_string())
}

/// Model-level plots: speedup against f32 and time per token by recipe,
/// KL divergence against bits per weight (labelled with tokens/s), and the
/// per-layer importance behind `adaptive`.
pub fn draw_models(
    rows: &[crate::models::ModelRow],
    importance: &[crate::models::LayerImportance],
    ctx: &PlotContext,
    out_dir: &Path,
) -> Result<Vec<PathBuf>, PlotError> {
    register_font();
    let ok: Vec<&crate::models::ModelRow> =
        rows.iter().filter(|r| r.status == CellStatus::Ok).collect();
    if ok.is_empty() {
        return Ok(Vec::new());
    }
    let max_threads = ok.iter().map(|r| r.n_threads).max().unwrap_or(1);
    let tg: Vec<&&crate::models::ModelRow> = ok
        .iter()
        .filter(|r| r.n_gen > 0 && r.n_threads == max_threads)
        .collect();
    let mut recipes: Vec<(String, f64)> = tg
        .iter()
        .map(|r| (r.recipe.clone(), r.bits_per_weight))
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .collect();
    recipes.sort_by(|a, b| b.1.total_cmp(&a.1));
    let label = if ok.iter().any(|r| r.emulated) {
        "EMULATED: timings measure qemu"
    } else {
        "real hardware"
    };
    let boards: Vec<String> = ok
        .iter()
        .map(|r| r.board.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let header = format!(
        "{} | {label} | {} | {}",
        boards.join(", "),
        ctx.date,
        ctx.commit
    );
    let mut written = Vec::new();
    let mut draw = |name: &str,
                    title: &str,
                    f: &dyn Fn(&DrawingArea<SVGBackend, Shift>) -> DrawResult,
                    g: &dyn Fn(&DrawingArea<BitMapBackend, Shift>) -> DrawResult|
     -> Result<(), PlotError> {
        let size = (900, 520);
        for ext in ["png", "svg"] {
            let path = out_dir.join(format!("{name}.{ext}"));
            let err = |message: String| PlotError::Draw {
                path: path.clone(),
                message,
            };
            if ext == "svg" {
                let root = SVGBackend::new(&path, size).into_drawing_area();
                let (top, body) = root.split_vertically(56);
                titled(&root, &top, title, &header)
                    .and_then(|_| f(&body))
                    .and_then(|_| root.present().map_err(|e| e.to_string()))
                    .map_err(err)?;
            } else {
                let root = BitMapBackend::new(&path, size).into_drawing_area();
                let (top, body) = root.split_vertically(56);
                titled(&root, &top, title, &header)
                    .and_then(|_| g(&body))
                    .and_then(|_| root.present().map_err(|e| e.to_string()))
                    .map_err(err)?;
            }
            written.push(path);
        }
        Ok(())
    };
    let f32_ts: BTreeMap<String, f64> = tg
        .iter()
        .filter(|r| r.recipe == "f32")
        .filter_map(|r| Some((r.model_filename.clone(), r.avg_ts?)))
        .collect();
    let speedups: BTreeMap<(String, String), f64> = tg
        .iter()
        .filter_map(|r| {
            Some((
                (r.model_filename.clone(), r.recipe.clone()),
                r.avg_ts? / f32_ts.get(&r.model_filename)?,
            ))
        })
        .collect();
    let ms_per_token: BTreeMap<(String, String), f64> = tg
        .iter()
        .filter_map(|r| {
            Some((
                (r.model_filename.clone(), r.recipe.clone()),
                1000.0 / r.avg_ts?,
            ))
        })
        .collect();
    let title = format!("Generation speedup against f32 by recipe (tg, {max_threads} threads)");
    draw(
        "model_speedup_vs_f32",
        &title,
        &|a| {
            grouped_bars(
                a,
                "",
                "speedup (f32 time / recipe time)",
                &speedups,
                &recipes,
                Some((1.0, "f32 = 1".into())),
            )
        },
        &|a| {
            grouped_bars(
                a,
                "",
                "speedup (f32 time / recipe time)",
                &speedups,
                &recipes,
                Some((1.0, "f32 = 1".into())),
            )
        },
    )?;
    draw(
        "model_time_per_token",
        "Time per generated token by recipe",
        &|a| grouped_bars(a, "", "ms per token", &ms_per_token, &recipes, None),
        &|a| grouped_bars(a, "", "ms per token", &ms_per_token, &recipes, None),
    )?;
    let points: Vec<(String, f64, f64)> = tg
        .iter()
        .filter_map(|r| {
            let kld = r.kld_mean.filter(|k| *k > 0.0)?;
            Some((
                format!(
                    "{} {} ({:.0} t/s)",
                    r.model_filename,
                    r.recipe,
                    r.avg_ts.unwrap_or(0.0)
                ),
                r.bits_per_weight,
                kld.log10(),
            ))
        })
        .collect();
    draw(
        "model_kld_vs_bits",
        "KL divergence from the unquantized model against bits per weight",
        &|a| scatter_log(a, &points, "bits per weight", "mean KLD (log10)"),
        &|a| scatter_log(a, &points, "bits per weight", "mean KLD (log10)"),
    )?;
    for li in importance {
        let values: BTreeMap<(String, String), f64> = li
            .scores
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                (
                    (
                        format!("blk.{i:02}"),
                        li.assignment.get(i).cloned().unwrap_or_default(),
                    ),
                    v,
                )
            })
            .collect();
        let mut kinds: Vec<(String, f64)> = li
            .assignment
            .iter()
            .map(|a| (a.clone(), 0.0))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect();
        kinds.sort_by(|a, b| a.0.cmp(&b.0));
        let title = format!(
            "Layer importance of {} (bar colour = type in `adaptive`)",
            li.model
        );
        let name = format!(
            "layer_importance_{}",
            li.model.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        );
        draw(
            &name,
            &title,
            &|a| {
                grouped_bars(
                    a,
                    "",
                    "mean KLD when only this layer is low-bit",
                    &values,
                    &kinds,
                    None,
                )
            },
            &|a| {
                grouped_bars(
                    a,
                    "",
                    "mean KLD when only this layer is low-bit",
                    &values,
                    &kinds,
                    None,
                )
            },
        )?;
    }
    Ok(written)
}

fn titled<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    top: &DrawingArea<DB, Shift>,
    title: &str,
    header: &str,
) -> DrawResult {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    top.draw_text(
        title,
        &("sans-serif", 20).into_font().color(&BLACK),
        (12, 6),
    )
    .map_err(|e| e.to_string())?;
    top.draw_text(
        header,
        &("sans-serif", 14).into_font().color(&BLACK),
        (12, 30),
    )
    .map_err(|e| e.to_string())
}

fn scatter_log<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    points: &[(String, f64, f64)],
    x_desc: &str,
    y_desc: &str,
) -> DrawResult {
    if points.is_empty() {
        return note(area, "", "no points");
    }
    let (y_lo, y_hi) = points.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.2), hi.max(p.2))
    });
    let x_max = points.iter().map(|p| p.1).fold(0.0, f64::max) * 1.3 + 1.0;
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, (y_lo - 0.5)..(y_hi + 0.5))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .y_label_formatter(&|y| format!("1e{y:.1}"))
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(points.iter().map(|(label, x, y)| {
            EmptyElement::at((*x, *y))
                + Circle::new((0, 0), 4, type_color(label).filled())
                + Text::new(label.clone(), (6, -6), ("sans-serif", 11))
        }))
        .map_err(|e| e.to_string())?;
    Ok(())
}
