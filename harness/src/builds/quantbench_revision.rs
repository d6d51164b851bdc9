//! Which quantbench an agent is built from: the working tree (every build
//! unless it says otherwise) or a commit of this repository
//! (`quantbench = "<rev>"` in a `[builds.<name>]`, `quantbench@<rev>` on
//! the command line), so a change to our own kernels or agent is something
//! `ab` and `bisect` can measure.
//!
//! The commit's files are exported into one folder
//! (`target/quantbench-revision/`), rewritten only where bytes differ, and
//! cargo builds its agent there with this checkout's cargo configuration,
//! into cargo folders of its own (`build::build_folder`): the first commit
//! compiles llama.cpp once, the next is an incremental build of what
//! changed.
//!
//! Host and agent exchange jobs, rows and progress as the types of the
//! `wire` crate: a commit whose `wire/` differs from this checkout's may
//! read jobs another way, so it is refused before anything is built.

use crate::builds::source_tree::{git, git_export, resolve_rev, sync_tree};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `target/quantbench-revision/`: the exported commit being built.
pub const REVISION_DIR: &str = "target/quantbench-revision";

/// The folders whose files are the job format host and agent share.
const JOB_FORMAT: &[&str] = &["wire"];

/// Which commit of this repository a build's agent comes from: recorded in
/// `run.json` with the build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantbenchRevision {
    /// The revision as written (`HEAD~1`, a branch, a hash).
    pub rev: String,
    /// The commit it named (12 hex digits).
    pub commit: String,
    /// The commit's git tree: exactly the files the agent is built from.
    pub tree: String,
}

impl QuantbenchRevision {
    /// `rev` in the git repository `workspace` is, checked to speak this
    /// checkout's job format; an unknown revision, a folder that is not a
    /// git checkout or another job format is one line.
    pub fn resolve(workspace: &Path, rev: &str) -> Result<QuantbenchRevision, String> {
        if git(workspace, &["rev-parse", "--git-dir"]).is_err() {
            return Err(format!(
                "quantbench@{rev} needs this repository's git history, and {} is not a git checkout (clone it with git)",
                workspace.display()
            ));
        }
        let commit = resolve_rev(workspace, rev)?;
        let tree = git(workspace, &["rev-parse", &format!("{commit}^{{tree}}")])?;
        if git(
            workspace,
            &[
                "cat-file",
                "-e",
                &format!("{commit}:remote-agent/Cargo.toml"),
            ],
        )
        .is_err()
        {
            return Err(format!(
                "quantbench at `{rev}` ({commit}) has no remote-agent/ to build; pick a later commit"
            ));
        }
        let mut differing = Vec::new();
        for folder in JOB_FORMAT {
            let changed = git(workspace, &["diff", "--name-only", &commit, "--", folder])?;
            let untracked = git(
                workspace,
                &["ls-files", "--others", "--exclude-standard", "--", folder],
            )?;
            differing.extend(
                changed
                    .lines()
                    .chain(untracked.lines())
                    .filter(|l| !l.is_empty())
                    .map(str::to_string),
            );
        }
        if !differing.is_empty() {
            let shown: Vec<&str> = differing.iter().map(String::as_str).take(3).collect();
            let more = differing.len() - shown.len();
            return Err(format!(
                "quantbench at `{rev}` ({commit}) speaks another job format than this checkout: {}{} differ{} (the wire crate host and agent share); measure it with that commit's own quantbench (`git worktree add ../quantbench-{commit} {commit}`, then `cargo xtask` there), or pick a commit whose wire/ matches",
                shown.join(", "),
                if more > 0 { format!(" and {more} more") } else { String::new() },
                if differing.len() == 1 { "s" } else { "" },
            ));
        }
        Ok(QuantbenchRevision {
            rev: rev.to_string(),
            commit,
            tree: tree.chars().take(12).collect(),
        })
    }

    /// `quantbench HEAD~1 (1a2b3c4d5e6f)`, or the commit alone when that is
    /// how it was written.
    pub fn label(&self) -> String {
        if self.commit.starts_with(&self.rev) || self.rev.starts_with(&self.commit) {
            format!("quantbench {}", self.commit)
        } else {
            format!("quantbench {} ({})", self.rev, self.commit)
        }
    }

    /// Where the exported commit is built.
    pub fn checkout(workspace: &Path) -> PathBuf {
        workspace.join(REVISION_DIR)
    }

    /// Brings the export folder to this commit's files, rewriting only
    /// those that differ (cargo then rebuilds only what changed). Returns
    /// the folder.
    pub fn materialize(&self, workspace: &Path) -> Result<PathBuf, String> {
        let dir = Self::checkout(workspace);
        let marker = dir.join(".quantbench-commit");
        if std::fs::read_to_string(&marker).ok().as_deref() == Some(self.tree.as_str()) {
            return Ok(dir);
        }
        let staging = dir.with_extension(format!("staging-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        let result = git_export(workspace, &self.commit, &staging).and_then(|()| {
            let _ = std::fs::remove_file(&marker);
            // The exported Cargo.lock is the commit's; a build that patches
            // in another llama-cpp-sys-2 rewrites it, the next sync restores.
            sync_tree(&staging, &dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            std::fs::write(&marker, &self.tree).map_err(|e| format!("{}: {e}", marker.display()))
        });
        let _ = std::fs::remove_dir_all(&staging);
        result.map(|()| dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A repository with wire/, kernels/ and remote-agent/ and four
    /// commits: the second changes wire/, the last two only kernels/.
    fn repository() -> (tempfile::TempDir, Vec<String>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        let git = |args: &[&str]| {
            let out = Command::new("git")
                .arg("-C")
                .arg(root)
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .output()
                .expect("git");
            assert!(out.status.success(), "{out:?}");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let write = |rel: &str, text: &str| {
            let path = root.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        git(&["init", "-q"]);
        write("wire/src/lib.rs", "pub struct Job;\n");
        write("remote-agent/Cargo.toml", "[package]\n");
        write("kernels/src/lib.rs", "fn fast() {}\n");
        let mut commits = Vec::new();
        for (file, text) in [
            ("kernels/src/lib.rs", "fn fast() {}\n"),
            ("wire/src/lib.rs", "pub struct Job { n: u8 }\n"),
            ("kernels/src/lib.rs", "fn slow() {}\n"),
            ("kernels/src/lib.rs", "fn fast() {}\n// again\n"),
        ] {
            write(file, text);
            git(&["add", "."]);
            git(&["commit", "-q", "-m", file]);
            commits.push(git(&["rev-parse", "HEAD"]));
        }
        (dir, commits)
    }

    #[test]
    fn a_commit_resolves_exports_and_is_refused_when_its_job_format_differs() {
        let (repo, commits) = repository();
        let root = repo.path();
        // HEAD~1 has the working tree's wire/: built from its own files.
        let revision = QuantbenchRevision::resolve(root, "HEAD~1").expect("same job format");
        assert_eq!(revision.commit, commits[2][..12]);
        assert_eq!(
            revision.label(),
            format!("quantbench HEAD~1 ({})", &commits[2][..12])
        );
        let dir = revision.materialize(root).expect("exported");
        assert_eq!(
            std::fs::read_to_string(dir.join("kernels/src/lib.rs")).unwrap(),
            "fn slow() {}\n"
        );
        // The next commit builds in the same folder.
        let next = QuantbenchRevision::resolve(root, "HEAD").expect("same job format");
        next.materialize(root).expect("exported");
        assert_eq!(
            std::fs::read_to_string(dir.join("kernels/src/lib.rs")).unwrap(),
            "fn fast() {}\n// again\n"
        );
        // The first commit's wire/ differs from the working tree's.
        let refused = QuantbenchRevision::resolve(root, "HEAD~3").expect_err("other format");
        assert!(
            refused.contains("another job format") && refused.contains("wire/src/lib.rs"),
            "{refused}"
        );
        // So does HEAD once wire/ is edited in the working tree.
        std::fs::write(root.join("wire/src/lib.rs"), "pub struct Job { n: u16 }\n").unwrap();
        let refused = QuantbenchRevision::resolve(root, "HEAD").expect_err("edited wire");
        assert!(refused.contains("wire/src/lib.rs"), "{refused}");
        let unknown = QuantbenchRevision::resolve(root, "no-such-branch").expect_err("unknown");
        assert!(
            unknown.contains("no revision `no-such-branch`"),
            "{unknown}"
        );
        let not_git = tempfile::tempdir().unwrap();
        let refused = QuantbenchRevision::resolve(not_git.path(), "HEAD").expect_err("no git");
        assert!(refused.contains("not a git checkout"), "{refused}");
    }
}
