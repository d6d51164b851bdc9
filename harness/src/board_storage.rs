//! What piles up in a board's work dir, and pruning it.
//!
//! Every run leaves a run folder; every agent build and model a folder or
//! file of its own. After each job (while the job still holds the board's
//! lock, so no agent is running) and on `cargo xtask board clean`, the
//! board keeps its newest `keep_runs` run folders, as many agent builds
//! (always the one in use), and only the models a kept run's job names.
//! Half-uploaded files (`*.part-*`) go too.

use crate::shell::board_path;
use crate::transport::{Connection, TransportError};

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
    let script = format!(
        r#"cd {wd} 2>/dev/null || {{ echo 0 0 0; exit 0; }}
r=0; a=0; m=0
[ -d agents/{current} ] && touch agents/{current}
for d in $(ls -1dt runs/*/ 2>/dev/null | tail -n +{from}); do rm -rf "$d"; r=$((r+1)); done
for d in $(ls -1dt agents/*/ 2>/dev/null | tail -n +{from}); do
  [ "${{d%/}}" = agents/{current} ] && continue
  rm -rf "$d"; a=$((a+1))
done
rm -f agents/*/*.part-* 2>/dev/null
for f in models/*; do
  [ -e "$f" ] || continue
  b=${{f##*/}}
  case "$b" in *.part-*) rm -f "$f"; m=$((m+1)); continue;; esac
  grep -qsF "$b" runs/*/job.json || {{ rm -f "$f"; m=$((m+1)); }}
done
echo $r $a $m"#,
        wd = board_path(work_dir),
        current = crate::shell::shell_quote(current_agent),
        from = keep.max(1) + 1,
    );
    let out = conn.exec(&script)?;
    let counts: Vec<usize> = out
        .stdout
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    Ok(match counts[..] {
        [runs, agents, models] => Pruned {
            runs,
            agents,
            models,
        },
        _ => Pruned::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
