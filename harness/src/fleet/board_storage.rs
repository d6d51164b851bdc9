//! What piles up in a board's work dir, and pruning it.
//!
//! Every run leaves a run folder; every agent build and model a folder or
//! file of its own. After each job (while the job still holds the board's
//! lock, so no agent is running) and on `cargo xtask board clean`, the
//! board keeps its newest `keep_runs` run folders, as many agent builds
//! (always the one in use), and only the models a kept run's job names.
//! Whatever the board's lock lists in `lock/uses` (the agent builds and
//! models the holding run uploaded or is about to run) is always kept.
//! Half-uploaded files (`*.part-*`) go too: uploads happen only while
//! their run holds the lock, and the prune runs under that lock, so none
//! is in flight.

use crate::fleet::transport::{Connection, TransportError};
use crate::shell::board_path;

/// What a prune removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub runs: usize,
    pub agents: usize,
    pub models: usize,
}

impl std::fmt::Display for Pruned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "removed {} run folder(s), {} agent build(s), {} model file(s)",
            self.runs, self.agents, self.models
        )
    }
}

/// Prunes `work_dir` on the board, keeping `keep` runs and agent builds and
/// always the agent `current_agent` (its hash).
pub fn prune(
    conn: &Connection,
    work_dir: &str,
    keep: usize,
    current_agent: &str,
) -> Result<Pruned, TransportError> {
    let out = conn.exec(&prune_script(work_dir, keep, current_agent))?;
    Ok(read_counts(&out.stdout))
}

/// The shell script that prunes `work_dir` (POSIX sh; prints the counts).
fn prune_script(work_dir: &str, keep: usize, current_agent: &str) -> String {
    format!(
        r#"cd {wd} 2>/dev/null || {{ echo 0 0 0; exit 0; }}
r=0; a=0; m=0
[ -d agents/{current} ] && touch agents/{current}
# Line by line, never word-split: a name with a space is one folder.
while IFS= read -r d; do
  [ -n "$d" ] || continue
  rm -rf -- "$d"; r=$((r+1))
done <<LIST
$(ls -1dt runs/*/ 2>/dev/null | tail -n +{from})
LIST
while IFS= read -r d; do
  [ -n "$d" ] || continue
  [ "${{d%/}}" = agents/{current} ] && continue
  n=${{d%/}}; n=${{n#agents/}}
  grep -qsxF -- "$n" lock/uses && continue
  rm -rf -- "$d"; a=$((a+1))
done <<LIST
$(ls -1dt agents/*/ 2>/dev/null | tail -n +{from})
LIST
rm -f agents/*/*.part-* 2>/dev/null
for f in models/*; do
  [ -e "$f" ] || continue
  b=${{f##*/}}
  case "$b" in *.part-*) rm -f "$f"; m=$((m+1)); continue;; esac
  grep -qsxF -- "$b" lock/uses && continue
  grep -qsF "$b" runs/*/job.json || {{ rm -f "$f"; m=$((m+1)); }}
done
echo $r $a $m"#,
        wd = board_path(work_dir),
        current = crate::shell::shell_quote(current_agent),
        from = keep.max(1) + 1,
    )
}

fn read_counts(stdout: &str) -> Pruned {
    let counts: Vec<usize> = stdout
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    match counts[..] {
        [runs, agents, models] => Pruned {
            runs,
            agents,
            models,
        },
        _ => Pruned::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Sets a folder's mtime to the `i`-th second after 1000 (for `ls -t`).
    fn made_at(folder: &Path, i: usize) {
        let t =
            std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000 + i as u64);
        std::fs::File::open(folder)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    /// The script a board runs, run here by `sh` on `wd`.
    fn prune_here(wd: &Path, keep: usize, current: &str) -> std::process::Output {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(prune_script(&wd.display().to_string(), keep, current))
            .output()
            .unwrap()
    }

    #[test]
    fn a_run_folder_with_a_space_is_pruned_whole_and_nothing_beside_it() {
        // The script a board runs, run here by sh on a work dir holding
        // three runs (one named with a space, as a matrix `x agents` once
        // made), an `agents` folder of builds and a model a kept run uses.
        let dir = tempfile::tempdir().unwrap();
        let wd = dir.path();
        for (i, run) in ["old run x agents", "mid", "new"].iter().enumerate() {
            let folder = wd.join("runs").join(run);
            std::fs::create_dir_all(&folder).unwrap();
            std::fs::write(folder.join("job.json"), "model.gguf").unwrap();
            // Oldest first, a second apart, for `ls -t`.
            made_at(&folder, i);
        }
        std::fs::create_dir_all(wd.join("agents/abc")).unwrap();
        std::fs::create_dir_all(wd.join("models")).unwrap();
        std::fs::write(wd.join("models/model.gguf"), "m").unwrap();
        let out = prune_here(wd, 2, "abc");
        assert!(out.status.success(), "{out:?}");
        let pruned = read_counts(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(pruned.runs, 1, "{out:?}");
        assert!(!wd.join("runs/old run x agents").exists());
        for kept in ["runs/mid", "runs/new", "agents/abc", "models/model.gguf"] {
            assert!(wd.join(kept).exists(), "{kept}");
        }
    }

    #[test]
    fn what_the_holding_run_lists_in_lock_uses_is_never_pruned() {
        // A run holding the board uploaded a model no kept run's job names
        // yet, and an agent build older than `keep` newer ones.
        let dir = tempfile::tempdir().unwrap();
        let wd = dir.path();
        for (i, agent) in ["listed", "a", "b", "c"].iter().enumerate() {
            let folder = wd.join("agents").join(agent);
            std::fs::create_dir_all(&folder).unwrap();
            made_at(&folder, i);
        }
        std::fs::create_dir_all(wd.join("models")).unwrap();
        std::fs::create_dir_all(wd.join("lock")).unwrap();
        for model in ["waiting.gguf", "orphan.gguf", "waiting.gguf.part-7"] {
            std::fs::write(wd.join("models").join(model), "m").unwrap();
        }
        std::fs::write(wd.join("lock/uses"), "listed\nwaiting.gguf\n").unwrap();
        let out = prune_here(wd, 1, "c");
        assert!(out.status.success(), "{out:?}");
        for kept in ["agents/listed", "agents/c", "models/waiting.gguf"] {
            assert!(wd.join(kept).exists(), "{kept}");
        }
        for gone in ["agents/a", "agents/b", "models/orphan.gguf"] {
            assert!(!wd.join(gone).exists(), "{gone}");
        }
        let pruned = read_counts(&String::from_utf8_lossy(&out.stdout));
        assert_eq!((pruned.agents, pruned.models), (2, 2), "{out:?}");
    }

    #[test]
    fn pruned_counts_read_as_a_sentence() {
        let p = Pruned {
            runs: 3,
            agents: 1,
            models: 0,
        };
        assert_eq!(
            p.to_string(),
            "removed 3 run folder(s), 1 agent build(s), 0 model file(s)"
        );
    }
}
