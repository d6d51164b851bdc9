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
//! was taken or last refreshed (the holder refreshes it before each upload
//! and every 30 s of a long one, and lists there what it uploads, which
//! pruning keeps). The agent is started only while the lock is still the
//! starting run's, checked under the same flock. A host killed mid-run therefore leaves a lock that keeps
//! others off the board until its orphaned agent ends, and no longer;
//! unless that host's run is resumed: a lock naming the same run id is
//! the resumed run's own, and it takes it back.

use crate::fleet::transport::{shell_quote, Connection, TransportError};
use crate::shell::board_path;
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
    let script = take_script(&owner.run_id, &owner_json(owner), &board_path(run_dir));
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
/// ends). A lock whose agent never started (the job failed while holding
/// the board: an upload, a check) is released at once: the start grace is
/// for others judging a holder they cannot see, not for the holder.
pub fn release(conn: &Connection, work_dir: &str, run_id: &str) -> Result<(), TransportError> {
    let script = release_script(run_id);
    let command = format!(
        "cd {wd} 2>/dev/null && flock .lock-guard sh -c {script}; true",
        wd = board_path(work_dir),
        script = shell_quote(&script)
    );
    conn.exec(&command).map(|_| ())
}

/// What [`hold`] or [`start_holding`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Holding {
    /// The lock is still this run's.
    Held,
    /// Someone else's now (the lock went stale while this run could not
    /// reach the board, and another run took it): its `owner` file.
    Lost(String),
}

/// Under the guard's flock: exits `HELD` with the current owner when the
/// lock is not (or no longer) `owner_json`'s.
fn still_ours(owner_json: &str) -> String {
    format!(
        "[ \"$(cat lock/owner 2>/dev/null)\" = {owner} ] || {{ cat lock/owner 2>/dev/null; exit {HELD}; }}",
        owner = shell_quote(owner_json)
    )
}

fn owner_json(owner: &LockOwner) -> String {
    serde_json::to_string(owner).unwrap_or_default()
}

/// Confirms the lock is still `owner`'s, keeps it fresh (the start grace
/// counts from the last time the holder did this) and records `uses`
/// (agent builds and model files this run is about to upload or run) in
/// `lock/uses`, which pruning keeps. Called before each upload and while a
/// long one runs, so a run that holds the board without an agent yet never
/// looks stale and never has its files pruned.
pub fn hold(
    conn: &Connection,
    board: &str,
    work_dir: &str,
    owner: &LockOwner,
    uses: &[String],
) -> Result<Holding, TransportError> {
    let script = hold_script(&owner_json(owner), uses);
    run_guarded(conn, board, work_dir, &script, "keeping the board lock")
}

fn hold_script(owner_json: &str, uses: &[String]) -> String {
    let mut script = format!("{}\ntouch lock", still_ours(owner_json));
    for name in uses {
        script.push_str(&format!(
            "\nprintf '%s\\n' {} >> lock/uses",
            shell_quote(name)
        ));
    }
    script
}

/// Runs `start` (a shell script that starts the agent and writes its pid)
/// under the guard's flock only while the lock is still `owner`'s: a run
/// whose lock went stale during a flaky start never starts a second agent
/// beside the run that took the board over. The guard is closed for the
/// started processes (`flock -o`), so the agent never holds it.
pub fn start_holding(
    conn: &Connection,
    board: &str,
    work_dir: &str,
    owner: &LockOwner,
    start: &str,
) -> Result<Holding, TransportError> {
    let script = format!("{}\n{start}", still_ours(&owner_json(owner)));
    run_guarded(conn, board, work_dir, &script, "starting the agent")
}

fn run_guarded(
    conn: &Connection,
    board: &str,
    work_dir: &str,
    script: &str,
    what: &str,
) -> Result<Holding, TransportError> {
    let out = conn.exec(&guarded(work_dir, script))?;
    match out.status {
        0 => Ok(Holding::Held),
        HELD => Ok(Holding::Lost(out.stdout.trim().to_string())),
        status => Err(TransportError::Remote {
            board: board.to_string(),
            command: what.into(),
            status,
            stderr: out.stderr.trim().to_string(),
        }),
    }
}

/// `script` run in `work_dir` under the guard's flock, closed for what
/// the script starts.
fn guarded(work_dir: &str, script: &str) -> String {
    format!(
        "cd {wd} && flock -o .lock-guard sh -c {script}",
        wd = board_path(work_dir),
        script = shell_quote(script)
    )
}

fn release_script(run_id: &str) -> String {
    format!(
        "grep -qF {id} lock/owner 2>/dev/null || exit 0\n{AGENT_RUNS}\n[ \"$live\" = yes ] || rm -rf lock",
        id = shell_quote(&format!("\"run_id\":\"{run_id}\"")),
    )
}

/// Sets `live=yes` only when the lock's agent runs (its pid alive, working
/// in the lock's run dir), else `live=no`.
const AGENT_RUNS: &str = r#"live=no
rd=$(cat lock/run_dir 2>/dev/null)
pid=$(cat "$rd/pid" 2>/dev/null)
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(readlink /proc/$pid/cwd 2>/dev/null)" = "$(cd "$rd" 2>/dev/null && pwd -P)" ]; then live=yes; fi"#;

/// Sets `live=yes` when the lock's agent runs, or has not started yet and
/// the lock is younger than the start grace; else `live=no`.
fn liveness() -> String {
    format!(
        "{AGENT_RUNS}\nif [ -z \"$pid\" ] && [ $(( $(date +%s) - $(stat -c %Y lock) )) -lt {START_GRACE_SECS} ]; then live=yes; fi"
    )
}

/// The check-and-take, run in the work dir under the guard's flock.
fn take_script(run_id: &str, owner_json: &str, run_dir_expr: &str) -> String {
    format!(
        "if grep -qF {id} lock/owner 2>/dev/null; then rm -rf lock; fi\nif [ -d lock ]; then\n{live}\n  if [ \"$live\" = yes ]; then cat lock/owner; exit {held}; fi\n  rm -rf lock\nfi\nmkdir lock && printf '%s' {owner} > lock/owner && printf '%s' {run_dir} > lock/run_dir",
        id = shell_quote(&format!("\"run_id\":\"{run_id}\"")),
        live = liveness(),
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
    use std::path::Path;

    fn owner(run_id: &str, pid: u32) -> LockOwner {
        LockOwner {
            run_id: run_id.into(),
            host: "h".into(),
            user: "u".into(),
            pid,
            started_at: "2026-12-05T00:00:00Z".into(),
        }
    }

    /// Runs a guarded script on this machine's shell in `wd`.
    fn run_here(wd: &Path, script: &str) -> std::process::Output {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(guarded(&wd.display().to_string(), script))
            .output()
            .unwrap()
    }

    #[test]
    fn a_run_whose_lock_was_taken_over_starts_nothing_and_names_the_new_holder() {
        // What a flaky start leaves: this run took the lock, could not
        // reach the board past the start grace, and another run took it.
        let dir = tempfile::tempdir().unwrap();
        let wd = dir.path();
        let ours = owner("run-a", 1);
        let theirs = owner("run-b", 2);
        std::fs::create_dir_all(wd.join("lock")).unwrap();
        std::fs::write(wd.join("lock/owner"), owner_json(&theirs)).unwrap();
        let start = "echo started > started";
        let out = run_here(wd, &format!("{}\n{start}", still_ours(&owner_json(&ours))));
        assert_eq!(out.status.code(), Some(HELD), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("run-b"));
        assert!(!wd.join("started").exists(), "a second agent was started");
        // Still ours: the start runs, and `hold` lists what it uses.
        std::fs::write(wd.join("lock/owner"), owner_json(&ours)).unwrap();
        let uses = ["abc123".to_string(), "d e.gguf".to_string()];
        let out = run_here(wd, &hold_script(&owner_json(&ours), &uses));
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            std::fs::read_to_string(wd.join("lock/uses")).unwrap(),
            "abc123\nd e.gguf\n"
        );
        let out = run_here(wd, &format!("{}\n{start}", still_ours(&owner_json(&ours))));
        assert!(out.status.success(), "{out:?}");
        assert!(wd.join("started").exists());
    }

    #[test]
    fn the_holder_releases_a_lock_whose_agent_never_started_at_once() {
        // A job that failed while holding the board (an upload, a check):
        // no agent, a lock seconds old. Others would wait out the start
        // grace; the holder itself lets go.
        let dir = tempfile::tempdir().unwrap();
        let wd = dir.path();
        std::fs::create_dir_all(wd.join("lock")).unwrap();
        std::fs::create_dir_all(wd.join("runs/r")).unwrap();
        std::fs::write(wd.join("lock/owner"), owner_json(&owner("run-a", 1))).unwrap();
        std::fs::write(
            wd.join("lock/run_dir"),
            wd.join("runs/r").display().to_string(),
        )
        .unwrap();
        let out = run_here(wd, &release_script("run-b"));
        assert!(out.status.success() && wd.join("lock").exists(), "not ours");
        let out = run_here(wd, &release_script("run-a"));
        assert!(out.status.success(), "{out:?}");
        assert!(!wd.join("lock").exists(), "released");
    }

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
