//! The agent's progress lines: one JSON object per line on stdout.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ProgressEvent {
    /// The job was read; `total` cells will follow.
    Started {
        total: usize,
        bandwidth_gbps: Option<f64>,
    },
    /// The agent starts a cell (so a crash can be pinned to it).
    CellStarted { index: usize, cell_id: String },
    /// A cell's row is on disk.
    CellFinished {
        index: usize,
        cell_id: String,
        status: crate::rows::CellStatus,
        median_ns: Option<f64>,
    },
    /// One invocation (agent process) of a cell finished; the cell's row
    /// follows when its last invocation does.
    InvocationFinished {
        cell_id: String,
        /// How many of the cell's invocations are done, of `invocations`.
        done: u32,
        invocations: u32,
        round: u32,
    },
    /// Every cell is done; `elapsed_seconds` is the agent's own run time.
    Finished {
        ok: usize,
        unsupported: usize,
        failed: usize,
        elapsed_seconds: f64,
    },
}

impl ProgressEvent {
    pub fn to_line(&self) -> String {
        // Serializing this enum cannot fail: it holds only strings and numbers.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// `None` for lines that are not progress events (e.g. library chatter),
    /// and for events whose figures no agent could report (not finite,
    /// negative, or an agent time over a year): a board's output is not
    /// trusted to keep the host's sums finite.
    pub fn parse(line: &str) -> Option<ProgressEvent> {
        let event: ProgressEvent = serde_json::from_str(line.trim()).ok()?;
        event.is_plausible().then_some(event)
    }

    fn is_plausible(&self) -> bool {
        let sane = |v: f64, most: f64| v.is_finite() && (0.0..=most).contains(&v);
        match self {
            ProgressEvent::Started { bandwidth_gbps, .. } => {
                bandwidth_gbps.is_none_or(|b| sane(b, 1e5))
            }
            ProgressEvent::CellFinished { median_ns, .. } => {
                median_ns.is_none_or(|t| sane(t, 1e15))
            }
            ProgressEvent::Finished {
                elapsed_seconds, ..
            } => sane(*elapsed_seconds, MAX_AGENT_SECONDS),
            _ => true,
        }
    }
}

/// The longest an agent's own time can be (a year): anything above is a
/// broken or hostile board's output.
pub const MAX_AGENT_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_other_lines_are_ignored() {
        let e = ProgressEvent::CellFinished {
            index: 3,
            cell_id: "x/F32/n1/t1".into(),
            status: crate::rows::CellStatus::Ok,
            median_ns: Some(12.5),
        };
        assert_eq!(ProgressEvent::parse(&e.to_line()), Some(e));
        assert_eq!(ProgressEvent::parse("repack: repack tensor"), None);
    }

    #[test]
    fn figures_no_agent_could_report_are_not_events() {
        let finished = |seconds: &str| {
            format!(
                "{{\"event\":\"finished\",\"ok\":1,\"unsupported\":0,\"failed\":0,\"elapsed_seconds\":{seconds}}}"
            )
        };
        assert!(ProgressEvent::parse(&finished("12.5")).is_some());
        for bad in ["1.7e308", "-1", "1e300"] {
            assert_eq!(ProgressEvent::parse(&finished(bad)), None, "{bad}");
        }
        assert_eq!(
            ProgressEvent::parse(
                "{\"event\":\"cell_finished\",\"index\":0,\"cell_id\":\"c\",\"status\":\"ok\",\"median_ns\":-5}"
            ),
            None
        );
    }
}
