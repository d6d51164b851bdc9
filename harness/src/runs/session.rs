//! The session stage every run goes through once, whatever its jobs: the
//! target resolved to boards, the machine set up for what they need, one
//! agent built per board profile (and one for the host when a job prepares
//! work there), and a run id whose directory does not exist yet.

use crate::builds::build::{
    build_board_agent, build_host_agent, workspace_root, AgentBuild, BuildError, Builder,
};
use crate::builds::llama_source::PreparedSource;
use crate::fleet::boards::{resolve_targets, BoardsFile, ResolvedBoard, SshConfig, TargetError};
use crate::runs::config::{BenchConfig, ConfigError};
use crate::runs::manifest::BuildRecord;
use crate::runs::steps::Stage;
use bootstrap::Need;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SessionError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Setup(#[from] bootstrap::SetupError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Testbed(#[from] crate::fleet::testbed::TestbedError),
    #[error(transparent)]
    Source(#[from] crate::builds::llama_source::SourceError),
    // Not `source`: the message already holds the labgrid error, and a
    // source would print it twice in an error chain.
    #[error("board {board}: {error}")]
    Farm {
        board: String,
        error: crate::fleet::labgrid::LabgridError,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the command line says about where and how to run.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub config_path: PathBuf,
    /// `--matrix`: one name or a comma list of kernel and model matrices.
    pub matrix: String,
    /// `--target`; `None` means the embedded default: one emulated Pi 5
    /// brought up on this machine (`testbed up --boards 1`), board `sim1`.
    pub target: Option<String>,
    pub results_root: PathBuf,
    pub builder: Builder,
    pub accept_new_host_key: bool,
    /// How long to wait for a board another run holds before failing it.
    pub board_lock_wait: std::time::Duration,
    /// `--resume`: a run directory, a run id under `results_root`, or
    /// `latest`, to pick up again instead of starting a new run.
    pub resume: Option<String>,
    /// `--budget`: the whole run's time (see `crate::runs::budget`).
    pub budget: Option<std::time::Duration>,
    /// `--build`: which llama.cpp the agents are built from, a
    /// `[builds.<name>]` of the config, `default`, or a source
    /// (`crate:0.1.140`, `path:<checkout>@<rev>`).
    pub build: String,
    /// `ab <base> <new>`, `bisect`: builds measured in the same rounds as
    /// `build` (kernel matrices; each cell once per build).
    pub versus: Vec<String>,
    /// Builds the caller defines besides the config's `[builds]` (bisect's
    /// revisions), by name.
    pub defined_builds: BTreeMap<String, crate::builds::llama_source::BuildSpec>,
    /// Kernel cells to measure (ids without `@<build>`); empty: all.
    pub only_cells: Vec<String>,
}

/// A board of this run, as the jobs and the runner see it.
#[derive(Debug, Clone)]
pub struct BoardSlot {
    pub board: ResolvedBoard,
    pub name: String,
    pub emulated: bool,
}

pub struct Session {
    pub options: SessionOptions,
    pub workspace: PathBuf,
    /// `--target` as given, or the default's board.
    pub target: String,
    pub boards: Vec<BoardSlot>,
    pub commit: String,
    pub run_id: String,
    /// `<results>/<run_id>`; created by the pipeline once jobs are prepared.
    pub run_dir: PathBuf,
    /// The builds measured: `--build` first (the base of an A/B), then
    /// the one `ab` measures against it.
    pub under_test: Vec<BuildUnderTest>,
    pub builds: Vec<BuildRecord>,
}

/// One build of the session: its llama.cpp and its agents.
#[derive(Debug, Clone)]
pub struct BuildUnderTest {
    pub source: PreparedSource,
    /// The agent for this machine, when a board is `local` or a job
    /// prepares work on the host (quantizing models).
    pub host_agent: Option<AgentBuild>,
    /// Agents for remote boards by profile name.
    pub board_agents: BTreeMap<String, AgentBuild>,
}

impl BuildUnderTest {
    pub fn name(&self) -> &str {
        &self.source.name
    }

    /// The agent of this build that runs on `board`.
    pub fn agent_for(&self, board: &ResolvedBoard) -> Option<&AgentBuild> {
        match board {
            ResolvedBoard::Local => self.host_agent.as_ref(),
            ResolvedBoard::Remote(r) => self.board_agents.get(r.profile.name()),
        }
    }
}

impl Session {
    /// Resolves the target, sets up, builds the agents. `host_agent` asks
    /// for the host's own agent even when no board is `local`.
    pub fn open(
        options: &SessionOptions,
        config: &BenchConfig,
        host_agent: bool,
    ) -> Result<Session, SessionError> {
        let workspace = workspace_root();
        let target = target_or_default(options.target.as_deref(), &workspace)?;
        let mut boards = resolve_targets(
            &target,
            &known_boards(config, &workspace)?,
            &SshConfig::load_default(),
        )?;
        let any_remote = boards.iter().any(|b| matches!(b, ResolvedBoard::Remote(_)));
        let any_farm = boards
            .iter()
            .any(|b| matches!(b, ResolvedBoard::Remote(r) if r.farm.is_some()));
        let mut needs = vec![Need::HostBuild];
        if any_remote {
            needs.push(Need::CrossBuild);
        }
        if any_farm {
            needs.push(Need::Labgrid);
        }
        bootstrap::ensure(&needs)?;
        // Before any build: a missing client, a coordinator that does not
        // answer or a place that does not exist fails in a second.
        for board in &mut boards {
            if let ResolvedBoard::Remote(remote) = board {
                crate::fleet::boards::inspect_place(remote).map_err(|error| {
                    SessionError::Farm {
                        board: remote.name.clone(),
                        error,
                    }
                })?;
            }
        }

        // Said once the set-up and the boards are known good: a run refused
        // for a missing package or an unknown board is one error line.
        Stage::SetUp.begin(match options.target {
            None => "set-up: the packages and Rust target this run needs are here, and one emulated Pi 5 is up (no --target)",
            Some(_) => "set-up: the packages and Rust target this run needs are here",
        });
        Stage::Boards.begin(&format!(
            "boards: {}",
            boards
                .iter()
                .map(describe_board)
                .collect::<Vec<_>>()
                .join(", ")
        ));

        let config_dir = config
            .source
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let mut names = vec![options.build.clone()];
        names.extend(options.versus.iter().cloned());
        let several = names.len() > 1;
        let mut sources = Vec::new();
        for (index, name) in names.iter().enumerate() {
            let (mut build_name, build_spec) = match options.defined_builds.get(name) {
                Some(spec) => (name.clone(), spec.clone()),
                None => config.build(name)?,
            };
            // Cell ids carry a measured build's name (`<cell>@<name>`): a
            // source written on the command line gets a plain one.
            if several && !crate::runs::config::is_safe_name(&build_name) {
                build_name = match index {
                    0 => "base".to_string(),
                    1 => "new".to_string(),
                    n => format!("new{n}"),
                };
            }
            // Every source is checked before any compiles: a bad second
            // build fails in seconds, not after the first one's build.
            let source = crate::builds::llama_source::prepare(
                &workspace,
                &build_name,
                &build_spec,
                &config_dir,
            )?;
            if build_name != "default" || several {
                eprintln!(
                    "build `{build_name}`: llama.cpp {}{}",
                    source.label(),
                    lacks_note(&source)
                );
            }
            sources.push(source);
        }
        Stage::Agents.begin(
            "agents: quantbench's agent with GGML for each kind of board (compiled once, then reused)",
        );
        let needs_host = host_agent || boards.iter().any(|b| matches!(b, ResolvedBoard::Local));
        let mut builds = Vec::new();
        let mut under_test = Vec::new();
        for source in sources {
            let mut timed = |profile: &str,
                             build: &dyn Fn() -> Result<AgentBuild, BuildError>|
             -> Result<AgentBuild, BuildError> {
                let started = std::time::Instant::now();
                let agent = build()?;
                let record = BuildRecord {
                    profile: profile.to_string(),
                    hash: agent.hash.clone(),
                    target_triple: agent.target_triple.clone(),
                    seconds: started.elapsed().as_secs_f64(),
                    build: source.name.clone(),
                    llama_cpp: Some(source.identity.clone()),
                    quantbench: source.revision.clone(),
                };
                eprintln!(
                    "agent for {} built: {} ({}) in {:.1} s",
                    record.profile, record.hash, record.target_triple, record.seconds
                );
                builds.push(record);
                Ok(agent)
            };
            let host_agent = if needs_host {
                Some(timed("local", &|| build_host_agent(&workspace, &source))?)
            } else {
                None
            };
            let mut board_agents = BTreeMap::new();
            for board in &boards {
                if let ResolvedBoard::Remote(r) = board {
                    let profile = r.profile.name().to_string();
                    if let std::collections::btree_map::Entry::Vacant(slot) =
                        board_agents.entry(profile)
                    {
                        let agent = timed(slot.key(), &|| {
                            build_board_agent(&workspace, r.profile, options.builder, &source)
                        })?;
                        slot.insert(agent);
                    }
                }
            }
            under_test.push(BuildUnderTest {
                source,
                host_agent,
                board_agents,
            });
        }

        let commit = git_commit(&workspace);
        let run_id = unique_run_id(&options.results_root, &commit);
        let run_dir = options.results_root.join(&run_id);
        let boards = boards
            .into_iter()
            .map(|board| BoardSlot {
                name: board.name().to_string(),
                emulated: matches!(&board, ResolvedBoard::Remote(r) if r.emulated),
                board,
            })
            .collect();
        Ok(Session {
            options: options.clone(),
            workspace,
            target,
            boards,
            commit,
            run_id,
            run_dir,
            under_test,
            builds,
        })
    }

    /// The `--build` build (the base of an A/B): it runs every job.
    pub fn base(&self) -> &BuildUnderTest {
        &self.under_test[0]
    }

    /// The builds measured against the base in the same rounds.
    pub fn versus(&self) -> &[BuildUnderTest] {
        &self.under_test[1..]
    }

    /// The base build's agent that runs on `board`.
    pub fn agent_for(&self, board: &ResolvedBoard) -> Option<&AgentBuild> {
        self.base().agent_for(board)
    }

    pub fn board_names(&self) -> Vec<String> {
        self.boards.iter().map(|b| b.name.clone()).collect()
    }
}

/// What a build's llama.cpp lacks and what that switches off, for the
/// line that names the build.
pub fn lacks_note(source: &PreparedSource) -> String {
    use crate::builds::llama_source::Capability;
    let off: Vec<&str> = source
        .identity
        .lacks
        .iter()
        .filter_map(|c| match c {
            Capability::TensorOverrides => {
                Some("adaptive and per-layer recipes (no per-tensor overrides)")
            }
            Capability::ImatrixData => {
                Some("+imatrix recipes (no importance data in quantize parameters)")
            }
            // Older llama.cpp sets the same load modes through flags.
            Capability::LoadModeEnum => None,
        })
        .collect();
    if off.is_empty() {
        String::new()
    } else {
        format!("; switched off: {}", off.join(", "))
    }
}

/// `<run_dir>/boards/<board>/`: one board's files within a run.
pub fn board_dir(run_dir: &Path, board: &str) -> PathBuf {
    run_dir.join("boards").join(board)
}

/// `<board_dir>/jobs/<job>/`: one job's files from one board (on a remote
/// board, a byte-for-byte mirror of the agent's run folder there, grown as
/// the agent writes; on `local`, the agent's own output folder).
pub fn job_dir(board_dir: &Path, job: &str) -> PathBuf {
    board_dir.join("jobs").join(job)
}

/// The job folders under a board's folder, by name.
pub fn job_dirs(board_dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(board_dir.join("jobs"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// Boards from the config plus the testbed's, when it is up (the config's
/// own definitions win on a name clash).
pub fn known_boards(config: &BenchConfig, workspace: &Path) -> Result<BoardsFile, SessionError> {
    let mut file = BoardsFile::default();
    let testbed_file = crate::fleet::testbed::boards_file_path(workspace);
    if testbed_file.exists() {
        let text = std::fs::read_to_string(&testbed_file).map_err(|source| SessionError::Read {
            path: testbed_file.clone(),
            source,
        })?;
        file = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: testbed_file.clone(),
            message: e.message().to_string(),
        })?;
    }
    file.boards.extend(config.boards.clone());
    file.groups.extend(config.groups.clone());
    file.labgrid = config.labgrid.clone();
    if file.labgrid.place.is_some() {
        return Err(ConfigError::Parse {
            path: config.source.clone(),
            message: "`[labgrid]` holds defaults for every place and cannot name one: put `place` in a board's `labgrid = { place = \"...\" }`, or use --target labgrid:<place>".into(),
        }
        .into());
    }
    Ok(file)
}

/// One board as the boards step names it: what it is and whether its
/// timings mean anything.
fn describe_board(board: &ResolvedBoard) -> String {
    match board {
        ResolvedBoard::Local => "local (this machine)".to_string(),
        ResolvedBoard::Remote(r) => {
            let mut what = vec![format!(
                "{}, {}@{}:{}",
                r.profile.name(),
                r.user,
                r.host,
                r.port
            )];
            if r.emulated {
                what.push("emulated: its timings measure qemu, not the board".into());
            }
            if let Some(farm) = &r.farm {
                what.push(format!("labgrid place {}", farm.place));
            }
            format!("{} ({})", r.name, what.join("; "))
        }
    }
}

/// `--target`, or the embedded default: one emulated Pi 5 on this machine
/// (brought up when it is not), board `sim1`.
pub fn target_or_default(target: Option<&str>, workspace: &Path) -> Result<String, SessionError> {
    if let Some(t) = target {
        return Ok(t.to_string());
    }
    if !crate::fleet::testbed::is_up(workspace, 1) {
        eprintln!("no --target: bringing up one emulated Pi 5 (cargo xtask testbed up --boards 1)");
        crate::fleet::testbed::up(workspace, 1)?;
    }
    Ok(crate::fleet::testbed::board_name(1))
}

/// A run id whose directory does not exist yet (two runs in one second
/// must not share one).
pub fn unique_run_id(results_root: &Path, commit: &str) -> String {
    let mut run_id = new_run_id(commit);
    for attempt in 2.. {
        if !results_root.join(&run_id).exists() {
            break;
        }
        run_id = format!("{}-{attempt}", new_run_id(commit));
    }
    run_id
}

/// `<UTC time to the millisecond>-<commit>-<random>`: sorts by time (runs
/// started in the same second too), names the code
/// measured, and the random tag keeps two hosts that start a run of the
/// same commit in the same second (two CI runners sharing a lab) from
/// sharing an id, on boards or in a shared results folder.
pub fn new_run_id(commit: &str) -> String {
    // The id is a folder name: whatever the commit text says (an imported
    // file's `build_commit` may say `x/../../tmp`), it stays one folder.
    let commit: String = commit
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    format!(
        "{}-{commit}-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
        random_tag()
    )
}

/// Six hex digits from the kernel's random source (time and pid if that
/// cannot be read).
fn random_tag() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 3];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let mixed = nanos ^ std::process::id().rotate_left(16);
        bytes.copy_from_slice(&mixed.to_le_bytes()[..3]);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Short commit of the workspace, with `-dirty` when it has local changes.
pub fn git_commit(workspace: &Path) -> String {
    let run = |args: &[&str]| {
        Command::new("git")
            .current_dir(workspace)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(commit) = run(&["rev-parse", "--short=7", "HEAD"]) else {
        return "nogit".into();
    };
    let dirty =
        run(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_never_reuse_an_existing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let first = unique_run_id(dir.path(), "abc");
        std::fs::create_dir(dir.path().join(&first)).unwrap();
        let second = unique_run_id(dir.path(), "abc");
        assert_ne!(first, second);
        assert!(second.contains("-abc-"), "{second}");
    }

    #[test]
    fn run_ids_started_in_the_same_second_differ() {
        // Two hosts cannot see each other's results folder: the id itself
        // must differ.
        let ids: std::collections::HashSet<String> =
            (0..50).map(|_| new_run_id("abc1234")).collect();
        assert!(ids.len() >= 49, "{ids:?}");
    }
}
