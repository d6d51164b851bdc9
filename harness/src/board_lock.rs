//! One measurement at a time on a board: a lock in the board's work dir.
//!
//! Two runs on one board (a nightly and a developer's manual run, or
//! tonight's run beside last night's orphaned agent) would each slow the
//! other and both sets of timings would be wrong, silently. So before an
//! agent starts, the host takes `<work_dir>/lock/` on the board: a directory
//! (created atomically) holding `owner` (who: run id, host, user, pid, start
//! time) and `run_dir` (where the agent runs). The check-and-take runs
//! under `flock` on `<work_dir>/.lock-guard`, so two hosts cannot both take
//! a lock they both found stale.
//!
//! The lock is held for the agent's lifetime, not the host's: it is live
//! while the agent's process (the `pid` file in its run dir, whose working
//! directory must be that run dir, which guards against a reused PID) is
//! alive, or, before the agent has started, for `START_GRACE_SECS` after it
//! was taken. A host killed mid-run therefore leaves a lock that keeps
//! others off the board until its orphaned agent ends, and no longer;
//! unless that host's run is resumed: a lock naming the same run id is
//! the resumed run's own, and it takes it back.

use crate::shell::board_path;
use crate::transport::{shell_quote, Connection, TransportError};
use serde::{Deserialize, Serialize};

/// How long a lock without a started agent counts as live: the host takes
/// the lock, then starts the agent within seconds.
pub const START_GRACE_SECS: u64 = 120;

/// Exit status of the take script when the lock is held by someone else.
const HELD: i32 = 75;

/// Who holds a board, as written in `lock/owner`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockOwner {
    pub run_id: String,
    pub host: String,
    pub user: String,
    pub pid: u32,
    pub started_at: String,
}

impl LockOwner {
    /// This host process, taking the board for `run_id`.
    pub fn this_process(run_id: &str) -> LockOwner {
        LockOwner {
            run_id: run_id.to_string(),
            host: local_hostname(),
            user: std::env::var("USER").unwrap_or_else(|_| "unknown".into()),
            pid: std::process::id(),
            started_at: wire::utc_now_rfc3339(),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "run {} from host {} (user {}, pid {}), started {}",
            self.run_id, self.host, self.user, self.pid, self.started_at
        )
    }
}

/// What an attempt to take the lock found.
#[derive(Debug, Clone, PartialEq)]
pub enum TakeOutcome {
    Taken,
    /// Held by a live holder; its `owner` file (raw, in case it is not ours).
    Held(String),
}

/// Tries once to take the lock for an agent that will run in `run_dir`
/// (a path under `work_dir`).
pub fn try_take(
    conn: &Connection,
    board: &str,
    work_dir: &str,
    run_dir: &str,
    owner: &LockOwner,
) -> Result<TakeOutcome, TransportError> {
    let owner_json = serde_json::to_string(owner).unwrap_or_default();
    let script = take_script(&owner.run_id, &owner_json, &board_path(run_dir));
    let command = format!(
        "mkdir -p {wd} && cd {wd} && flock .lock-guard sh -c {script}",
        wd = board_path(work_dir),
        script = shell_quote(&script)
    );
    let out = conn.exec(&command)?;
    match out.status {
        0 => Ok(TakeOutcome::Taken),
        HELD => Ok(TakeOutcome::Held(out.stdout.trim().to_string())),
        status => Err(TransportError::Remote {
            board: board.to_string(),
            command: "taking the board lock".into(),
            status,
            stderr: out.stderr.trim().to_string(),
        }),
    }
}

/// Releases the lock if `run_id` still holds it (a lock taken over after
/// this run was thought dead is someone else's now) and its agent is no
/// longer running (if it is, the lock stays with it and goes stale when it
/// ends).
pub fn release(conn: &Connection, work_dir: &str, run_id: &str) -> Result<(), TransportError> {
    let script = format!(
        "grep -qF {id} lock/owner 2>/dev/null || exit 0\n{live}\n[ \"$live\" = yes ] || rm -rf lock",
        id = shell_quote(&format!("\"run_id\":\"{run_id}\"")),
        live = LIVENESS.replace("START_GRACE", &START_GRACE_SECS.to_string())
    );
    let command = format!(
        "cd {wd} 2>/dev/null && flock .lock-guard sh -c {script}; true",
        wd = board_path(work_dir),
        script = shell_quote(&script)
    );
    conn.exec(&command).map(|_| ())
}

/// Sets `live=yes` when the lock's agent runs (or has not started yet and
/// the lock is younger than the start grace), else `live=no`.
const LIVENESS: &str = r#"live=no
rd=$(cat lock/run_dir 2>/dev/null)
pid=$(cat "$rd/pid" 2>/dev/null)
if [ -n "$pid" ]; then
  if kill -0 "$pid" 2>/dev/null && [ "$(readlink /proc/$pid/cwd 2>/dev/null)" = "$(cd "$rd" 2>/dev/null && pwd -P)" ]; then live=yes; fi
elif [ $(( $(date +%s) - $(stat -c %Y lock) )) -lt START_GRACE ]; then
  live=yes
fi"#;

/// The check-and-take, run in the work dir under the guard's flock.
fn take_script(run_id: &str, owner_json: &str, run_dir_expr: &str) -> String {
    format!(
        "if grep -qF {id} lock/owner 2>/dev/null; then rm -rf lock; fi\nif [ -d lock ]; then\n{live}\n  if [ \"$live\" = yes ]; then cat lock/owner; exit {held}; fi\n  rm -rf lock\nfi\nmkdir lock && printf '%s' {owner} > lock/owner && printf '%s' {run_dir} > lock/run_dir",
        id = shell_quote(&format!("\"run_id\":\"{run_id}\"")),
        live = LIVENESS.replace("START_GRACE", &START_GRACE_SECS.to_string()),
        held = HELD,
        owner = shell_quote(owner_json),
        run_dir = run_dir_expr,
    )
}

pub(crate) fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_describes_who_holds_the_board() {
        let owner = LockOwner {
            run_id: "20261125T220000Z-abc1234".into(),
            host: "ci-runner".into(),
            user: "lab".into(),
            pid: 4242,
            started_at: "2026-11-25T22:00:00Z".into(),
        };
        let text = owner.describe();
        for part in [
            "20261125T220000Z-abc1234",
            "ci-runner",
            "lab",
            "4242",
            "22:00:00",
        ] {
            assert!(text.contains(part), "{text}");
        }
        let json = serde_json::to_string(&owner).unwrap();
        assert!(
            json.contains("\"run_id\":\"20261125T220000Z-abc1234\""),
            "{json}"
        );
    }
}
