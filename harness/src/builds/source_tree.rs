//! Source trees on disk, for the builds: exporting a git revision,
//! copying and syncing folders (rewriting only the files whose bytes
//! differ, so cargo and CMake rebuild only what changed) and hashing a
//! tree's content. Used for llama.cpp trees (`llama_source`) and for
//! quantbench's own revisions (`quantbench_revision`).

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn git(repo: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .map_err(|e| format!("could not run git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr)
            .lines()
            .next()
            .unwrap_or("git failed")
            .trim()
            .to_string())
    }
}

pub fn resolve_rev(repo: &Path, rev: &str) -> Result<String, String> {
    if rev.starts_with('-') {
        return Err(format!("`{rev}` is not a git revision"));
    }
    git(repo, &["rev-parse", "--verify", "--quiet", &format!("{rev}^{{commit}}")])
        .ok()
        .filter(|c| !c.is_empty())
        .map(|c| c.chars().take(12).collect())
        .ok_or_else(|| {
            format!(
                "{} has no revision `{rev}` (git rev-parse found no commit by that name); check the name with `git -C {} log --oneline`",
                repo.display(),
                repo.display()
            )
        })
}

pub fn git_head(repo: &Path) -> Option<String> {
    let commit: String = git(repo, &["rev-parse", "HEAD"])
        .ok()?
        .chars()
        .take(12)
        .collect();
    let dirty =
        git(repo, &["status", "--porcelain", "--untracked-files=no"]).is_ok_and(|s| !s.is_empty());
    Some(if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    })
}

/// The files of `commit` in `repo`, written to `into`.
pub fn git_export(repo: &Path, commit: &str, into: &Path) -> Result<(), String> {
    std::fs::create_dir_all(into).map_err(|e| format!("{}: {e}", into.display()))?;
    let mut archive = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["archive", "--format=tar", commit])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not run git archive: {e}"))?;
    let stdout = archive.stdout.take().ok_or("git archive gave no output")?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(into)
        .stdin(stdout)
        .status()
        .map_err(|e| format!("could not run tar: {e}"))?;
    let archived = archive.wait().map_err(|e| format!("git archive: {e}"))?;
    if !archived.success() || !tar.success() {
        return Err(format!(
            "could not export {commit} of {} (git archive | tar failed)",
            repo.display()
        ));
    }
    Ok(())
}

/// Copies `from` into `to` (created), leaving out entries `skip` names by
/// their path relative to `from`. Symbolic links are copied as links.
pub fn copy_tree(from: &Path, to: &Path, skip: &dyn Fn(&Path) -> bool) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(from.join(&rel))? {
            let entry = entry?;
            let child = rel.join(entry.file_name());
            if skip(&child) {
                continue;
            }
            let kind = entry.file_type()?;
            let target = to.join(&child);
            if kind.is_dir() {
                std::fs::create_dir_all(&target)?;
                stack.push(child);
            } else if kind.is_symlink() {
                let link = std::fs::read_link(entry.path())?;
                std::os::unix::fs::symlink(link, &target)?;
            } else {
                std::fs::copy(entry.path(), &target)?;
            }
        }
    }
    Ok(())
}

/// Every regular file under `root` by relative path, sorted.
pub fn files_under(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(root.join(&rel))? {
            let entry = entry?;
            let child = rel.join(entry.file_name());
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(child);
            } else {
                files.push(child);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Makes `to` hold exactly what `from` holds, rewriting only files whose
/// bytes differ, so unchanged files keep their times and cargo and CMake
/// rebuild only what changed.
pub fn sync_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    let wanted = files_under(from)?;
    for rel in &wanted {
        let (src, dst) = (from.join(rel), to.join(rel));
        let src_meta = std::fs::symlink_metadata(&src)?;
        if src_meta.file_type().is_symlink() {
            let link = std::fs::read_link(&src)?;
            if std::fs::read_link(&dst).ok().as_ref() != Some(&link) {
                let _ = std::fs::remove_file(&dst);
                if let Some(parent) = dst.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::os::unix::fs::symlink(link, &dst)?;
            }
            continue;
        }
        let same = std::fs::symlink_metadata(&dst)
            .is_ok_and(|m| m.is_file() && m.len() == src_meta.len())
            && std::fs::read(&src)? == std::fs::read(&dst)?;
        if !same {
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let _ = std::fs::remove_file(&dst);
            std::fs::copy(&src, &dst)?;
        }
    }
    let wanted: std::collections::HashSet<&PathBuf> = wanted.iter().collect();
    for rel in files_under(to)? {
        if !wanted.contains(&rel) {
            std::fs::remove_file(to.join(&rel))?;
        }
    }
    Ok(())
}

/// SHA-256 of every file's relative path and bytes, 12 hex digits.
pub fn tree_hash(root: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    for rel in files_under(root)? {
        let path = root.join(&rel);
        hasher.update(rel.to_string_lossy().as_bytes());
        hasher.update([0]);
        if std::fs::symlink_metadata(&path)?.file_type().is_symlink() {
            hasher.update(std::fs::read_link(&path)?.to_string_lossy().as_bytes());
        } else {
            hasher.update(std::fs::read(&path)?);
        }
        hasher.update([0]);
    }
    Ok(hasher.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
