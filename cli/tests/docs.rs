//! The README and the guides in docs/ hold together: every relative link
//! points at a file that exists and, with `#anchor`, at a heading of it
//! (GitHub's anchors), and every guide is reachable from the README. Text
//! moved between files keeps its links working or this fails.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    harness::builds::build::workspace_root()
}

/// README.md and every Markdown file of docs/.
fn markdown_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    files.sort();
    files.insert(0, root().join("README.md"));
    files
}

/// The lines of `text` outside fenced code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut fenced = false;
    text.lines()
        .filter(|line| {
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced
        })
        .collect()
}

/// `[text](target)` targets of the prose, inline code left out.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in prose(text) {
        // Odd pieces between backticks are inline code.
        let outside: String = line
            .split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(_, piece)| piece)
            .collect::<Vec<_>>()
            .join(" ");
        let mut rest = outside.as_str();
        while let Some(start) = rest.find("](") {
            let after = &rest[start + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].to_string());
            rest = &after[end..];
        }
    }
    out
}

/// GitHub's anchor of a heading: lower case, letters, digits, `-` and `_`
/// kept, spaces made `-`, everything else dropped.
fn anchor_of(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> Vec<String> {
    prose(text)
        .into_iter()
        .filter_map(|line| {
            let heading = line.trim_start_matches('#');
            (heading.len() < line.len() && heading.starts_with(' ')).then(|| anchor_of(heading))
        })
        .collect()
}

/// Links of `text` (the file `file`) that lead nowhere, each with why.
fn broken_links(file: &Path, text: &str) -> Vec<String> {
    let mut broken = Vec::new();
    for link in links(text) {
        if link.contains("://") || link.starts_with("mailto:") {
            continue;
        }
        let (path, anchor) = match link.split_once('#') {
            Some((path, anchor)) => (path, Some(anchor)),
            None => (link.as_str(), None),
        };
        let target = if path.is_empty() {
            file.to_path_buf()
        } else {
            file.parent().unwrap_or(Path::new(".")).join(path)
        };
        if !target.exists() {
            broken.push(format!("{link}: no file {}", target.display()));
            continue;
        }
        if let Some(anchor) = anchor {
            let target_text = if path.is_empty() {
                text.to_string()
            } else {
                std::fs::read_to_string(&target).unwrap_or_default()
            };
            if !anchors(&target_text).iter().any(|a| a == anchor) {
                broken.push(format!(
                    "{link}: no heading #{anchor} in {}",
                    target.display()
                ));
            }
        }
    }
    broken
}

#[test]
fn every_relative_link_and_anchor_in_the_readme_and_docs_resolves() {
    let mut broken = Vec::new();
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for why in broken_links(&file, &text) {
            broken.push(format!("{}: {why}", file.display()));
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn every_guide_is_linked_from_the_readme() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let linked = links(&readme);
    for file in markdown_files().into_iter().skip(1) {
        let name = format!("docs/{}", file.file_name().unwrap().to_string_lossy());
        assert!(
            linked
                .iter()
                .any(|l| l.split('#').next() == Some(name.as_str())),
            "{name} is not linked from README.md"
        );
    }
}

#[test]
fn the_checker_finds_a_missing_file_and_a_missing_heading() {
    let file = root().join("docs").join("results.md");
    let text = "# Title\n\nSee [a](nowhere.md), [b](#title), [c](#gone), [d](../README.md#no-such-part), `[e](skipped.md)`.\n```\n[f](fenced.md)\n```\n";
    let broken = broken_links(&file, text);
    assert_eq!(broken.len(), 3, "{broken:?}");
    assert!(broken[0].starts_with("nowhere.md: no file"));
    assert!(broken[1].starts_with("#gone: no heading"));
    assert!(broken[2].starts_with("../README.md#no-such-part: no heading"));
    assert_eq!(
        anchor_of("Which llama.cpp? Builds, `ab` and `bisect`"),
        "which-llamacpp-builds-ab-and-bisect"
    );
}
