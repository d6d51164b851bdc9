//! A cargo build run for someone waiting on it: cargo's own output goes to
//! a log file, and one line says how far it is (rewritten in place on a
//! terminal, every 30 seconds otherwise), so a first run reads as steps
//! rather than hundreds of compile lines; on failure, the log's last lines.
//! The launcher follows the CLI's compile with it, the host library the
//! agents' builds.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a followed build ended well.
#[derive(Debug)]
pub struct Built {
    /// The binary cargo made (its last executable artifact).
    pub executable: Option<PathBuf>,
    /// Crates compiled (not counting those already up to date).
    pub compiled: usize,
    pub elapsed: Duration,
}

#[derive(Debug)]
pub enum BuildFailed {
    Spawn {
        program: String,
        source: std::io::Error,
    },
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    Failed {
        what: String,
        status: String,
        tail: String,
        log: PathBuf,
    },
}

impl std::fmt::Display for BuildFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildFailed::Spawn { program, source } => {
                write!(f, "could not start `{program}`: {source}")
            }
            BuildFailed::Log { path, source } => {
                write!(
                    f,
                    "could not write the build log {}: {source}",
                    path.display()
                )
            }
            BuildFailed::Failed {
                what,
                status,
                tail,
                log,
            } => write!(
                f,
                "{what} failed ({status}); the end of cargo's output:\n{tail}\n(all of it: {})",
                log.display()
            ),
        }
    }
}

impl std::error::Error for BuildFailed {}

/// The last lines of a failed build's log shown in its error.
const TAIL_LINES: usize = 40;
/// Below this, a build that compiles nothing (all up to date) says nothing.
const QUIET_FOR: Duration = Duration::from_secs(3);
/// How often a line is printed when the output is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// Runs `command` (a `cargo build` or `cross build`, without
/// `--message-format`), its output in `log`, saying `what` it is doing
/// while it takes more than a moment.
pub fn follow(mut command: Command, what: &str, log: &Path) -> Result<Built, BuildFailed> {
    let log_error = |source| BuildFailed::Log {
        path: log.to_path_buf(),
        source,
    };
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(log_error)?;
    }
    let log_file = std::fs::File::create(log).map_err(log_error)?;
    let started = Instant::now();
    let mut child = command
        .args(["--message-format", "json-render-diagnostics"])
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .map_err(|source| BuildFailed::Spawn {
            program: command.get_program().to_string_lossy().into_owned(),
            source,
        })?;
    let state = Arc::new(Mutex::new(Progress::default()));
    let reader = child.stdout.take().map(|stdout| {
        let state = Arc::clone(&state);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(artifact) = Artifact::parse(&line) {
                    if let Ok(mut state) = state.lock() {
                        state.add(artifact);
                    }
                }
            }
        })
    });

    let terminal = std::io::stderr().is_terminal();
    let mut shown = false;
    let mut last_printed = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        std::thread::sleep(Duration::from_millis(250));
        let progress = state.lock().map(|s| s.clone()).unwrap_or_default();
        if progress.compiled == 0 && started.elapsed() < QUIET_FOR {
            continue;
        }
        let line = progress.line(what, started.elapsed());
        if terminal {
            eprint!("\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
        } else if !shown || last_printed.elapsed() >= LOG_EVERY {
            eprintln!("{line}");
            last_printed = Instant::now();
        }
        shown = true;
    };
    if let Some(reader) = reader {
        let _ = reader.join();
    }
    let progress = state.lock().map(|s| s.clone()).unwrap_or_default();
    if shown && terminal {
        eprint!("\r\x1b[2K");
    }
    let status = status.map_err(|source| BuildFailed::Spawn {
        program: command.get_program().to_string_lossy().into_owned(),
        source,
    })?;
    if !status.success() {
        return Err(BuildFailed::Failed {
            what: what.to_string(),
            status: status.to_string(),
            tail: tail(log, TAIL_LINES),
            log: log.to_path_buf(),
        });
    }
    let elapsed = started.elapsed();
    if shown {
        eprintln!(
            "{what}: done in {} ({})",
            minutes(elapsed),
            crates(progress.compiled)
        );
    }
    Ok(Built {
        executable: progress.executable,
        compiled: progress.compiled,
        elapsed,
    })
}

#[derive(Debug, Default, Clone)]
struct Progress {
    compiled: usize,
    last: String,
    executable: Option<PathBuf>,
}

impl Progress {
    fn add(&mut self, artifact: Artifact) {
        if !artifact.fresh {
            self.compiled += 1;
            self.last = artifact.name;
        }
        if artifact.executable.is_some() {
            self.executable = artifact.executable;
        }
    }

    fn line(&self, what: &str, elapsed: Duration) -> String {
        let last = match self.last.as_str() {
            "" => String::new(),
            name => format!(", last {name}"),
        };
        format!(
            "{what}: {} so far, {}{last}",
            minutes(elapsed),
            crates(self.compiled)
        )
    }
}

/// One `compiler-artifact` message of cargo's JSON output, the parts read
/// here (by hand: this crate takes no JSON parser).
#[derive(Debug, PartialEq)]
struct Artifact {
    name: String,
    fresh: bool,
    executable: Option<PathBuf>,
}

impl Artifact {
    fn parse(line: &str) -> Option<Artifact> {
        if !line.contains(r#""reason":"compiler-artifact""#) {
            return None;
        }
        // The package's name (a build script's target is `build-script-build`).
        // `registry+<index>#serde@1.0.228`, `path+file:///w/cli#quantbench@0.1.0`,
        // or `path+file:///w/kernels#0.1.0` when the name is the folder's.
        let package = json_string_after(line, r#""package_id":"#)?;
        let (source, tail) = package.rsplit_once('#')?;
        let name = match tail.split_once('@') {
            Some((name, _)) => name,
            None => source.rsplit('/').next()?,
        };
        Some(Artifact {
            name: name.to_string(),
            fresh: line.contains(r#""fresh":true"#),
            executable: json_string_after(line, r#""executable":"#).map(PathBuf::from),
        })
    }
}

/// The JSON string right after `key`, with the escapes cargo writes in
/// names and paths undone; `None` when the value is not a string.
fn json_string_after(text: &str, key: &str) -> Option<String> {
    let rest = text[text.find(key)? + key.len()..].strip_prefix('"')?;
    let mut value = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(value),
            '\\' => match chars.next()? {
                'n' => value.push('\n'),
                't' => value.push('\t'),
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

/// `1 crate compiled`, `3 crates compiled`.
fn crates(count: usize) -> String {
    match count {
        1 => "1 crate compiled".to_string(),
        n => format!("{n} crates compiled"),
    }
}

/// `2m05s`.
pub fn minutes(elapsed: Duration) -> String {
    let s = elapsed.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}

/// The last `lines` lines of a file.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_artifact_lines_give_the_crate_its_freshness_and_the_binary() {
        let lib = r#"{"reason":"compiler-artifact","package_id":"registry+https://github.com/rust-lang/crates.io-index#serde@1.0.228","manifest_path":"/x/serde/Cargo.toml","target":{"kind":["lib"],"crate_types":["lib"],"name":"serde","src_path":"/x/src/lib.rs","edition":"2021","doctest":true,"test":true},"profile":{"opt_level":"3"},"features":[],"filenames":["/t/libserde.rlib"],"executable":null,"fresh":false}"#;
        let script = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/kernels#0.1.0","manifest_path":"/w/kernels/Cargo.toml","target":{"kind":["custom-build"],"crate_types":["bin"],"name":"build-script-build","src_path":"/w/kernels/build.rs"},"executable":null,"fresh":false}"#;
        let bin = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/cli#quantbench@0.1.0","manifest_path":"/w/cli/Cargo.toml","target":{"kind":["bin"],"crate_types":["bin"],"name":"quantbench","src_path":"/w/cli/src/main.rs"},"filenames":["/w/target/release/quantbench"],"executable":"/w/target/release/quant\"bench","fresh":true}"#;
        let mut progress = Progress::default();
        for line in [lib, r#"{"reason":"build-finished","success":true}"#, bin] {
            if let Some(artifact) = Artifact::parse(line) {
                progress.add(artifact);
            }
        }
        assert_eq!(progress.compiled, 1, "the fresh binary is not counted");
        assert_eq!(progress.last, "serde");
        assert_eq!(
            Artifact::parse(script).map(|a| a.name).as_deref(),
            Some("kernels"),
            "a build script is named by its package"
        );
        assert_eq!(
            progress.executable,
            Some(PathBuf::from("/w/target/release/quant\"bench"))
        );
        assert_eq!(
            progress.line("compiling", Duration::from_secs(125)),
            "compiling: 2m05s so far, 1 crate compiled, last serde"
        );
    }

    #[test]
    fn a_failed_build_says_what_failed_with_the_end_of_its_log() {
        let dir = std::env::temp_dir().join(format!("bootstrap-follow-{}", std::process::id()));
        let log = dir.join("build.log");
        let mut command = Command::new("sh");
        // `sh -c` ignores the --message-format arguments follow appends.
        command.args([
            "-c",
            "echo compiling >&2; echo 'error: no such crate' >&2; exit 101",
            "sh",
        ]);
        let e = follow(command, "compiling the thing", &log).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("compiling the thing failed (exit status: 101)")
                && text.contains("error: no such crate")
                && text.contains(&log.display().to_string()),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
