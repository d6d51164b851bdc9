//! What a plot kind hands the drawing backend: figures of panels of charts,
//! as plain data. Plot kinds build these from rows; only `canvas` turns
//! them into pixels, so plot kinds never name the plotting library.

/// One output figure: `<file_stem>.png` and `<file_stem>.svg`.
#[derive(Debug, Clone)]
pub struct Figure {
    pub file_stem: String,
    pub title: String,
    /// Every board drawn, and those whose rows are emulated (the header says so).
    pub boards: Vec<String>,
    pub emulated_boards: Vec<String>,
    /// Side by side, usually one per board.
    pub panels: Vec<Panel>,
}

#[derive(Debug, Clone)]
pub struct Panel {
    pub caption: String,
    pub chart: Chart,
}

#[derive(Debug, Clone)]
pub enum Chart {
    /// Groups along x, one bar per series in each group.
    Bars {
        y_label: String,
        groups: Vec<String>,
        /// Series name and its value per group (`None`: no bar).
        series: Vec<(String, Vec<Option<f64>>)>,
        /// A horizontal line with its legend label.
        reference: Option<(f64, String)>,
    },
    /// Lines through points, one per series.
    Lines {
        x_label: String,
        y_label: String,
        series: Vec<(String, Vec<(f64, f64)>)>,
    },
    /// Labelled points on a log10 y axis (values given as-is, positive).
    LogScatter {
        x_label: String,
        y_label: String,
        points: Vec<LabelledPoint>,
    },
    /// One value over time (runs, oldest first) with its confidence band
    /// and the points where a new level starts.
    Trend {
        y_label: String,
        /// One label per run (commit and date).
        labels: Vec<String>,
        median: Vec<f64>,
        low: Vec<f64>,
        high: Vec<f64>,
        change_points: Vec<usize>,
    },
    /// Nothing to draw, and why.
    Note(String),
}

#[derive(Debug, Clone)]
pub struct LabelledPoint {
    pub label: String,
    /// Points with the same key share a colour (the type or recipe).
    pub colour_key: String,
    pub x: f64,
    pub y: f64,
}

impl Chart {
    /// Bars from a map keyed by (group, series), series in the given order.
    pub fn bars_from(
        y_label: &str,
        values: &std::collections::BTreeMap<(String, String), f64>,
        series_order: &[(String, f64)],
        reference: Option<(f64, String)>,
    ) -> Chart {
        let groups: Vec<String> = values
            .keys()
            .map(|k| k.0.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if groups.is_empty() {
            return Chart::Note("no rows for this plot".into());
        }
        let series = series_order
            .iter()
            .map(|(name, _)| {
                let per_group = groups
                    .iter()
                    .map(|g| values.get(&(g.clone(), name.clone())).copied())
                    .collect();
                (name.clone(), per_group)
            })
            .filter(|(_, v): &(String, Vec<Option<f64>>)| v.iter().any(Option::is_some))
            .collect();
        Chart::Bars {
            y_label: y_label.to_string(),
            groups,
            series,
            reference,
        }
    }

    /// Groups along x, for sizing the panel.
    pub fn width_hint(&self) -> usize {
        match self {
            Chart::Bars { groups, .. } => groups.len(),
            _ => 0,
        }
    }
}
