//! The run's time budget (`bench --budget 45m`): what each board's jobs
//! need at least, how many invocations fit, and how long each job may add
//! adaptive rounds.
//!
//! A board's jobs run one after another; boards run side by side, so the
//! budget is per board. Before anything runs, each job states its least
//! time per invocation of all its cells (`JobKind::budget_need`: timed
//! repetitions and the shortest warm-up; model jobs none). When one
//! invocation of every cell does not fit, the run is refused in one line;
//! when the matrix's invocations do not all fit, they are lowered to what
//! does (said in a line). Then, as each job starts, it may add adaptive
//! rounds until the budget's end less the least time of the board's later
//! jobs. A job's `deadline_seconds` stays what it was, a guard against a
//! hung board, stretched by the adaptive time it was given; the budget
//! never stops an invocation midway, so the run can overrun it by the
//! rounds in flight.

use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum BudgetError {
    #[error("--budget `{0}`: not a duration; write it like 45m, 2h, 1h30m or 90s")]
    Unparsable(String),
    #[error("--budget {budget} is too small: on board {board}, one invocation of every cell needs at least {needed} ({what}){left}; give a budget of at least {needed} more than the set-up takes, or fewer cells, or a lower `min_time_ms`")]
    TooSmall {
        budget: String,
        board: String,
        needed: String,
        what: String,
        /// `, and 4s of it were left after the set-up` when builds took some.
        left: String,
    },
}

/// A job's least time, per invocation of all its cells.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetNeed {
    /// Least seconds for one invocation of every cell.
    pub seconds_per_invocation: f64,
    /// Invocations the matrix asks for.
    pub invocations: u32,
    /// What it is, for messages: `kernel matrix quick: 240 cells x (20 ms + 20 ms warm-up)`.
    pub what: String,
}

/// Parses `45m`, `2h`, `1h30m`, `90s`, `600` (seconds).
pub fn parse_duration(text: &str) -> Result<Duration, BudgetError> {
    let bad = || BudgetError::Unparsable(text.to_string());
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(bad());
    }
    if let Ok(seconds) = trimmed.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let mut total = 0u64;
    let mut number = String::new();
    for c in trimmed.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(bad()),
        };
        let n: u64 = number.parse().map_err(|_| bad())?;
        total += n * unit;
        number.clear();
    }
    if !number.is_empty() || total == 0 {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

/// `1h05m`, `4m10s`, `12s`.
pub fn describe(duration: Duration) -> String {
    let s = duration.as_secs();
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// How a board's jobs fit the budget.
#[derive(Debug, Clone, PartialEq)]
pub struct BoardFit {
    /// Invocations each job measures (the matrix's, or fewer to fit).
    pub invocations: Vec<u32>,
    /// Least seconds of each job, at those invocations.
    pub least: Vec<f64>,
    /// Least seconds of the jobs after each one, at those invocations.
    pub reserve_after: Vec<f64>,
    /// A line saying what was lowered, if anything.
    pub lowered: Option<String>,
}

/// Fits one board's jobs (`None`: a job with no per-invocation need) into
/// `left` of the run's `budget` (the rest went on builds and set-up).
pub fn fit_board(
    board: &str,
    needs: &[Option<BudgetNeed>],
    left: Duration,
    budget: Duration,
) -> Result<BoardFit, BudgetError> {
    let available = left.as_secs_f64();
    let one: f64 = needs
        .iter()
        .flatten()
        .map(|n| n.seconds_per_invocation)
        .sum();
    if one > available {
        return Err(BudgetError::TooSmall {
            budget: describe(budget),
            board: board.to_string(),
            needed: describe(Duration::from_secs_f64(one.ceil())),
            what: needs
                .iter()
                .flatten()
                .map(|n| n.what.clone())
                .collect::<Vec<_>>()
                .join("; "),
            left: if budget.as_secs() > left.as_secs() {
                format!(", and {} of it were left after the set-up", describe(left))
            } else {
                String::new()
            },
        });
    }
    let asked: f64 = needs
        .iter()
        .flatten()
        .map(|n| n.seconds_per_invocation * n.invocations as f64)
        .sum();
    // Every job keeps the same share of its invocations.
    let fits = if asked <= available || one <= 0.0 {
        u32::MAX
    } else {
        (available / one).floor().max(1.0) as u32
    };
    let invocations: Vec<u32> = needs
        .iter()
        .map(|n| n.as_ref().map_or(1, |n| n.invocations.min(fits)))
        .collect();
    let lowered = (fits != u32::MAX).then(|| {
        format!(
            "--budget {}: on board {board} only {fits} invocations of every cell fit (at least {} each); measuring {fits}{}, and no adaptive rounds",
            describe(budget),
            describe(Duration::from_secs_f64(one.ceil())),
            if fits < 2 {
                " (one invocation a cell: its interval misses run-to-run spread)"
            } else {
                ""
            }
        )
    });
    let least: Vec<f64> = needs
        .iter()
        .zip(&invocations)
        .map(|(n, &inv)| {
            n.as_ref()
                .map_or(0.0, |n| n.seconds_per_invocation * inv as f64)
        })
        .collect();
    let reserve_after = (0..least.len())
        .map(|i| least[i + 1..].iter().sum())
        .collect();
    Ok(BoardFit {
        invocations,
        least,
        reserve_after,
        lowered,
    })
}

/// Seconds a job starting now may spend on adaptive rounds: what is left
/// of the budget less `reserve_after` (the later jobs' least time) less
/// the job's own least time.
pub fn adaptive_seconds(left: Duration, reserve_after: f64, own_least: f64) -> u64 {
    (left.as_secs_f64() - reserve_after - own_least).max(0.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("45m"), Ok(Duration::from_secs(2700)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("600"), Ok(Duration::from_secs(600)));
        for bad in ["", "m", "45x", "1h30", "0m", "-5m"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(describe(Duration::from_secs(250)), "4m10s");
        assert_eq!(describe(Duration::from_secs(3900)), "1h05m");
    }

    fn need(seconds: f64, invocations: u32) -> Option<BudgetNeed> {
        Some(BudgetNeed {
            seconds_per_invocation: seconds,
            invocations,
            what: format!("{seconds} s a pass"),
        })
    }

    #[test]
    fn a_budget_below_one_pass_is_refused_and_invocations_are_lowered_to_fit() {
        // Two kernel jobs of 30 s and 10 s a pass, 10 invocations each, and
        // a model job with no per-invocation need.
        let needs = [need(30.0, 10), None, need(10.0, 10)];
        let e = fit_board(
            "pi5",
            &needs,
            Duration::from_secs(39),
            Duration::from_secs(39),
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("on board pi5") && text.contains("at least 40s"),
            "{text}"
        );
        // Ample: the matrix's invocations, later jobs' least time reserved.
        let hour = Duration::from_secs(3600);
        let fit = fit_board("pi5", &needs, hour, hour).unwrap();
        assert_eq!(fit.invocations, vec![10, 1, 10]);
        assert_eq!(fit.reserve_after, vec![100.0, 100.0, 0.0]);
        assert!(fit.lowered.is_none());
        // 5 minutes: 7 passes of 40 s fit.
        let fit = fit_board("pi5", &needs, Duration::from_secs(300), hour).unwrap();
        assert_eq!(fit.invocations, vec![7, 1, 7]);
        assert!(fit.lowered.unwrap().contains("only 7 invocations"));
        assert_eq!(adaptive_seconds(Duration::from_secs(300), 70.0, 210.0), 20);
        assert_eq!(adaptive_seconds(Duration::from_secs(100), 70.0, 210.0), 0);
    }
}
