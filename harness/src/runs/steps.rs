//! The numbered stages of a run as whoever started it reads them
//! (`[2/5] boards: sim1 (pi5, emulated ...)`): one place says how many
//! there are and how a stage's line looks, so `bench`, `ab` and `bisect`
//! show the same steps.

/// The stages of a run, in the order it goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Packages, the Rust target, and with no `--target` the emulated board.
    SetUp,
    /// The boards resolved and (labgrid) their places checked.
    Boards,
    /// An agent built (or reused) for each kind of board and each build.
    Agents,
    /// Every board at once, rows written as they come.
    Measuring,
    /// Rows merged, the summary and plots drawn.
    Results,
}

impl Stage {
    const COUNT: usize = 5;

    fn number(self) -> usize {
        match self {
            Stage::SetUp => 1,
            Stage::Boards => 2,
            Stage::Agents => 3,
            Stage::Measuring => 4,
            Stage::Results => 5,
        }
    }

    /// The line that opens this stage.
    pub fn line(self, what: &str) -> String {
        format!("[{}/{}] {what}", self.number(), Self::COUNT)
    }

    /// Says that this stage begins (on stderr, with the other status lines).
    pub fn begin(self, what: &str) {
        eprintln!("{}", self.line(what));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_numbered_in_order_out_of_their_count() {
        let all = [
            Stage::SetUp,
            Stage::Boards,
            Stage::Agents,
            Stage::Measuring,
            Stage::Results,
        ];
        assert_eq!(all.len(), Stage::COUNT);
        for (index, stage) in all.iter().enumerate() {
            assert_eq!(stage.number(), index + 1);
        }
        assert_eq!(Stage::Boards.line("boards: sim1"), "[2/5] boards: sim1");
    }
}
