//! The drawing backend: the only module that talks to plotters. It draws a
//! `Figure` as PNG and SVG with the header every plot carries (boards,
//! `real hardware` or `EMULATED`, date, commit) and one panel per entry.

use super::chart::{Chart, Figure, LabelledPoint};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Once;
use thiserror::Error;

#[derive(Debug, Error)]
#[error("drawing {path}: {message}")]
pub struct DrawError {
    pub path: PathBuf,
    pub message: String,
}

type DrawResult = Result<(), String>;

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        // Embedded so plots render the same on a machine without fonts
        // (fresh CI images have none). DejaVu Sans, Bitstream Vera licence.
        let bytes: &'static [u8] = include_bytes!("../../../assets/DejaVuSans.ttf");
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, bytes);
    });
}

/// Draws `figure` into `out_dir` as PNG and SVG; returns the two files.
pub fn draw(
    figure: &Figure,
    date: &str,
    commit: &str,
    out_dir: &Path,
) -> Result<Vec<PathBuf>, DrawError> {
    register_font();
    let label = if figure.emulated_boards.is_empty() {
        "real hardware".to_string()
    } else {
        format!(
            "EMULATED ({}): timings measure qemu, not a Pi",
            figure.emulated_boards.join(", ")
        )
    };
    let header = format!("{} | {label} | {date} | {commit}", figure.boards.join(", "));
    let panel_widths: Vec<u32> = figure
        .panels
        .iter()
        .map(|p| (120 * p.chart.width_hint()).max(640) as u32)
        .collect();
    let size = (panel_widths.iter().sum::<u32>().max(640) + 40, 520);
    let mut written = Vec::new();
    for ext in ["png", "svg"] {
        // A stem may come from row values (a board's name): one safe
        // file name whatever they say.
        let path = out_dir.join(format!(
            "{}.{ext}",
            crate::shell::file_safe(&figure.file_stem)
        ));
        let result = if ext == "png" {
            let root = BitMapBackend::new(&path, size).into_drawing_area();
            draw_figure(&root, figure, &header)
                .and_then(|_| root.present().map_err(|e| e.to_string()))
        } else {
            let root = SVGBackend::new(&path, size).into_drawing_area();
            draw_figure(&root, figure, &header)
                .and_then(|_| root.present().map_err(|e| e.to_string()))
        };
        result.map_err(|message| DrawError {
            path: path.clone(),
            message,
        })?;
        written.push(path);
    }
    Ok(written)
}

fn draw_figure<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    figure: &Figure,
    header: &str,
) -> DrawResult {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (top, body) = root.split_vertically(56);
    top.draw_text(
        &figure.title,
        &("sans-serif", 20).into_font().color(&BLACK),
        (12, 6),
    )
    .map_err(|e| e.to_string())?;
    top.draw_text(
        header,
        &("sans-serif", 14).into_font().color(&BLACK),
        (12, 30),
    )
    .map_err(|e| e.to_string())?;
    let panels = body.split_evenly((1, figure.panels.len().max(1)));
    for (area, panel) in panels.iter().zip(&figure.panels) {
        match &panel.chart {
            Chart::Bars {
                y_label,
                groups,
                series,
                reference,
            } => grouped_bars(area, &panel.caption, y_label, groups, series, reference),
            Chart::Lines {
                x_label,
                y_label,
                series,
            } => lines(area, &panel.caption, x_label, y_label, series),
            Chart::LogScatter {
                x_label,
                y_label,
                points,
            } => log_scatter(area, &panel.caption, x_label, y_label, points),
            Chart::Trend {
                y_label,
                labels,
                median,
                low,
                high,
                change_points,
            } => trend(
                area,
                &panel.caption,
                y_label,
                labels,
                median,
                low,
                high,
                change_points,
            ),
            Chart::Note(text) => note(area, &panel.caption, text),
        }
        .map_err(|e| format!("{}: {e}", panel.caption))?;
    }
    Ok(())
}

/// A series keeps its colour in every plot: a GGML type's position in
/// GGML's type list, anything else (recipes, mixes) a stable hash.
fn series_colour(name: &str) -> RGBColor {
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
    let index = wire::ggml_type::GgmlType::ALL
        .iter()
        .position(|t| t.name().eq_ignore_ascii_case(name))
        .unwrap_or_else(|| {
            name.bytes()
                .fold(7usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
        });
    PALETTE[index % PALETTE.len()]
}

fn legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> DrawResult {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 11))
        .position(position)
        .draw()
        .map_err(|e| e.to_string())
}

fn grouped_bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    y_label: &str,
    groups: &[String],
    series: &[(String, Vec<Option<f64>>)],
    reference: &Option<(f64, String)>,
) -> DrawResult {
    if groups.is_empty() || series.is_empty() {
        return note(area, caption, "no rows for this plot");
    }
    let y_max = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().copied())
        .chain(reference.iter().map(|r| r.0))
        .fold(0.0f64, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(70)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..groups.len() as f64, 0f64..y_max.max(1e-9))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        // Ask for labels at every half unit and name only the group centres.
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            let centred = (x - x.floor() - 0.5).abs() < 0.1;
            match groups.get(i) {
                Some(name) if centred => name.clone(),
                _ => String::new(),
            }
        })
        .x_label_style(("sans-serif", 10))
        .y_desc(y_label)
        .draw()
        .map_err(|e| e.to_string())?;
    let width = 0.8 / series.len() as f64;
    for (si, (name, values)) in series.iter().enumerate() {
        let c = series_colour(name);
        let bars: Vec<Rectangle<(f64, f64)>> = values
            .iter()
            .enumerate()
            .filter_map(|(gi, v)| {
                let v = (*v)?;
                let x0 = gi as f64 + 0.1 + si as f64 * width;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.9, v)],
                    c.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(|e| e.to_string())?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.filled()));
    }
    if let Some((level, label)) = reference {
        chart
            .draw_series(LineSeries::new(
                [(0.0, *level), (groups.len() as f64, *level)],
                BLACK.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(label.clone())
            .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], BLACK.stroke_width(2)));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

fn lines<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> DrawResult {
    let points = || series.iter().flat_map(|(_, p)| p.iter().copied());
    let x_max = points().map(|p| p.0).fold(1.0, f64::max);
    let y_max = points().map(|p| p.1).fold(0.0, f64::max) * 1.15;
    let x_count = points()
        .map(|p| p.0.to_bits())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.5f64..x_max + 0.5, 0f64..y_max.max(1e-9))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_labels(x_count.max(2))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| e.to_string())?;
    for (name, points) in series {
        let c = series_colour(name);
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], c.stroke_width(2)));
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 3, c.filled())))
            .map_err(|e| e.to_string())?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)
}

fn log_scatter<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    x_label: &str,
    y_label: &str,
    points: &[LabelledPoint],
) -> DrawResult {
    let points: Vec<&LabelledPoint> = points.iter().filter(|p| p.y > 0.0).collect();
    if points.is_empty() {
        return note(area, caption, "no points");
    }
    let (y_lo, y_hi) = points.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.y.log10()), hi.max(p.y.log10()))
    });
    let x_max = points.iter().map(|p| p.x).fold(0.0, f64::max) * 1.3 + 1.0;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, (y_lo - 0.5)..(y_hi + 0.5))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .y_label_formatter(&|y| format!("1e{y:.1}"))
        .draw()
        .map_err(|e| e.to_string())?;
    // Recipes of one type share their bits per weight (plain, calibrated):
    // their labels are stacked downwards instead of printed over each other.
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by(|&a, &b| points[b].y.total_cmp(&points[a].y));
    let mut label_dy = vec![-6i32; points.len()];
    let mut placed: Vec<(i32, i32)> = Vec::new();
    for i in order {
        let (px, py) = chart.backend_coord(&(points[i].x, points[i].y.log10()));
        let mut label_y = py - 6;
        while placed
            .iter()
            .any(|&(x, y)| (x - px).abs() < 220 && (y - label_y).abs() < 12)
        {
            label_y += 12;
        }
        placed.push((px, label_y));
        label_dy[i] = label_y - py;
    }
    chart
        .draw_series(points.iter().zip(&label_dy).map(|(p, dy)| {
            EmptyElement::at((p.x, p.y.log10()))
                + Circle::new((0, 0), 4, series_colour(&p.colour_key).filled())
                + Text::new(p.label.clone(), (6, *dy), ("sans-serif", 11))
        }))
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn trend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    y_label: &str,
    labels: &[String],
    median: &[f64],
    low: &[f64],
    high: &[f64],
    change_points: &[usize],
) -> DrawResult {
    if median.is_empty() {
        return note(area, caption, "no runs");
    }
    let n = median.len();
    let y_max = high.iter().chain(median).copied().fold(0.0f64, f64::max) * 1.1;
    let y_min = low.iter().chain(median).copied().fold(f64::MAX, f64::min) * 0.9;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 14))
        .margin(8)
        .x_label_area_size(60)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, y_min.max(0.0)..y_max.max(1e-9))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_labels(n.min(12))
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_label_style(("sans-serif", 9))
        .y_desc(y_label)
        .draw()
        .map_err(|e| e.to_string())?;
    let blue = RGBColor(31, 119, 180);
    let band: Vec<(f64, f64)> = (0..n)
        .map(|i| (i as f64, high[i]))
        .chain((0..n).rev().map(|i| (i as f64, low[i])))
        .collect();
    chart
        .draw_series(std::iter::once(Polygon::new(band, blue.mix(0.2).filled())))
        .map_err(|e| e.to_string())?
        .label("95% CI of the median")
        .legend(move |(x, y)| {
            Rectangle::new([(x, y - 5), (x + 10, y + 5)], blue.mix(0.2).filled())
        });
    chart
        .draw_series(LineSeries::new(
            median.iter().enumerate().map(|(i, &m)| (i as f64, m)),
            blue.stroke_width(2),
        ))
        .map_err(|e| e.to_string())?
        .label("median")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], blue.stroke_width(2)));
    chart
        .draw_series(
            median
                .iter()
                .enumerate()
                .map(|(i, &m)| Circle::new((i as f64, m), 3, blue.filled())),
        )
        .map_err(|e| e.to_string())?;
    let red = RGBColor(214, 39, 40);
    for (k, &at) in change_points.iter().enumerate() {
        let x = at as f64 - 0.5;
        let series = chart
            .draw_series(LineSeries::new(
                [(x, y_min.max(0.0)), (x, y_max)],
                red.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?;
        if k == 0 {
            series
                .label("change point")
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], red.stroke_width(2)));
        }
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)
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
