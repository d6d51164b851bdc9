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

    /// `None` for lines that are not progress events (e.g. library chatter).
    pub fn parse(line: &str) -> Option<ProgressEvent> {
        serde_json::from_str(line.trim()).ok()
    }
}

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
}
