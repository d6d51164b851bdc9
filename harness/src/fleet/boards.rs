//! Boards and `--target`: configured boards and groups, `~/.ssh/config`
//! aliases, `user@host:port`, `local`, and places of a labgrid board farm
//! (`labgrid:<place>`), whose address is known once the place is taken.
//!
//! ```toml
//! [boards.kitchen]
//! host = "192.168.1.50"          # address or ~/.ssh/config alias
//! user = "pi"                    # default: ssh config, then $USER
//! port = 22
//! profile = "pi5"                # pi5 | pi4 | generic-aarch64
//! identity = "~/.ssh/id_ed25519" # tried after ssh-agent
//! work_dir = ".quantbench"       # relative to the login's home
//! emulated = false
//! runner = []                    # command prefix, e.g. ["qemu-aarch64", "-cpu", "cortex-a76"]
//! known_hosts = "~/.ssh/known_hosts_lab"  # checked besides ~/.ssh/known_hosts
//! max_memory_mb = 3000           # plan for at most this much of the board's memory
//! keep_runs = 20                 # run folders kept on the board; older ones are pruned
//! retry_seconds = 120            # keep retrying a board whose link fails this long
//!
//! [boards.farm1]                 # a board a labgrid coordinator hands out:
//! labgrid = { place = "pi5-lab-1", coordinator = "labhost:20408" }
//! identity = "~/.ssh/lab_key"    # address, user, port come from the place
//!
//! [labgrid]                      # defaults for every labgrid place
//! coordinator = "labhost:20408"  # else LG_COORDINATOR, else 127.0.0.1:20408
//! power_cycle = false            # power-cycle a place whose board does not answer
//! boot_seconds = 180             # how long to wait for SSH after a power cycle
//!
//! [groups]
//! lab = ["kitchen", "desk", "labgrid:pi5-lab-2"]
//! ```

use crate::builds::build::BoardProfile;
use crate::shell::is_safe_value;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TargetError {
    #[error("target `{target}`: {message}")]
    Invalid { target: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardConfig {
    /// Address or ssh alias; empty for a labgrid board.
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "default_profile")]
    pub profile: String,
    #[serde(default)]
    pub identity: Option<String>,
    #[serde(default = "default_work_dir")]
    pub work_dir: String,
    #[serde(default)]
    pub emulated: bool,
    #[serde(default)]
    pub runner: Vec<String>,
    #[serde(default)]
    pub known_hosts: Option<String>,
    /// Memory quantbench may plan for on the board (MB), below what it
    /// reports, to leave room for other services. Models that would not fit
    /// are refused before upload; kernel cells that would not fit become
    /// `unsupported` rows.
    #[serde(default)]
    pub max_memory_mb: Option<u64>,
    /// Run folders kept on the board (newest first); older ones, agents
    /// beyond as many, and models no kept run names are pruned after each
    /// job. `cargo xtask board clean` does it on demand.
    #[serde(default = "default_keep_runs")]
    pub keep_runs: usize,
    /// How long every remote step (connect, upload, start, follow,
    /// collect) keeps retrying, with back-off, when the link fails, before
    /// the board is failed: long enough for a board to reboot or a switch
    /// to come back.
    #[serde(default = "default_retry_seconds")]
    pub retry_seconds: u64,
    /// The board is a place of a labgrid farm: taken from its coordinator
    /// for the run, reached at the place's NetworkService.
    #[serde(default)]
    pub labgrid: Option<LabgridSettings>,
    /// Where the board's power is read (model jobs' energy columns):
    /// `vcgencmd = "/usr/bin/vcgencmd"` (a Raspberry Pi's firmware tool;
    /// its `pmic_read_adc` gives a Pi 5's rails; default: looked for at
    /// /usr/bin and /opt/vc/bin), `power_command = "..."` (run by `sh -c`
    /// on the board, prints watts: an external meter; used first) and
    /// `power_interval_ms` (between samples, default 100).
    #[serde(default)]
    pub vcgencmd: Option<String>,
    #[serde(default)]
    pub power_command: Option<String>,
    #[serde(default)]
    pub power_interval_ms: Option<u64>,
}

/// A board's `labgrid = {...}`, and `[labgrid]` (defaults, no `place`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabgridSettings {
    #[serde(default)]
    pub place: Option<String>,
    /// `host:port` of the labgrid coordinator.
    #[serde(default)]
    pub coordinator: Option<String>,
    /// When the board does not answer SSH and the place has a power
    /// resource: one power cycle, then wait `boot_seconds` for SSH, before
    /// the board is failed. Off by default: a power cut can lose a board's
    /// unsynced writes.
    #[serde(default)]
    pub power_cycle: Option<bool>,
    #[serde(default)]
    pub boot_seconds: Option<u64>,
}

/// Where a labgrid board comes from, resolved against the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct FarmPlace {
    pub place: String,
    pub coordinator: String,
    pub power_cycle: bool,
    pub boot_seconds: u64,
    /// The place's tags, read from the coordinator when the run opens.
    pub tags: BTreeMap<String, String>,
}

impl FarmPlace {
    fn new(place: &str, own: Option<&LabgridSettings>, defaults: &LabgridSettings) -> FarmPlace {
        let pick =
            |f: fn(&LabgridSettings) -> Option<String>| own.and_then(f).or_else(|| f(defaults));
        FarmPlace {
            place: place.to_string(),
            coordinator: pick(|s| s.coordinator.clone())
                .or_else(|| {
                    std::env::var("LG_COORDINATOR")
                        .ok()
                        .filter(|c| !c.is_empty())
                })
                .unwrap_or_else(|| crate::fleet::labgrid::DEFAULT_COORDINATOR.to_string()),
            power_cycle: own
                .and_then(|s| s.power_cycle)
                .or(defaults.power_cycle)
                .unwrap_or(false),
            boot_seconds: own
                .and_then(|s| s.boot_seconds)
                .or(defaults.boot_seconds)
                .unwrap_or(180),
            tags: BTreeMap::new(),
        }
    }
}

fn default_keep_runs() -> usize {
    20
}

pub fn default_retry_seconds() -> u64 {
    120
}

fn default_profile() -> String {
    "pi5".into()
}
fn default_work_dir() -> String {
    ".quantbench".into()
}

/// `[boards]` and `[groups]`, as in bench.toml or the testbed's boards.toml.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardsFile {
    #[serde(default)]
    pub boards: BTreeMap<String, BoardConfig>,
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub labgrid: LabgridSettings,
}

/// A board ready to be measured.
#[derive(Debug, Clone, PartialEq)]
// A run holds a handful of these: their size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum ResolvedBoard {
    Local,
    Remote(RemoteBoard),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RemoteBoard {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub profile: BoardProfile,
    pub identities: Vec<PathBuf>,
    pub known_hosts: Vec<PathBuf>,
    pub work_dir: String,
    pub emulated: bool,
    pub runner: Vec<String>,
    pub max_memory_bytes: Option<u64>,
    pub keep_runs: usize,
    pub retry_seconds: u64,
    /// Where its power is read (`power_settings` of the model job).
    pub power: wire::power::PowerSettings,
    /// Set for a labgrid place: `host`, `user` and `port` are filled in
    /// from the place's NetworkService once it is taken.
    pub farm: Option<FarmPlace>,
}

impl ResolvedBoard {
    pub fn name(&self) -> &str {
        match self {
            ResolvedBoard::Local => "local",
            ResolvedBoard::Remote(b) => &b.name,
        }
    }
}

/// Resolves `--target` (a comma list of board names, group names,
/// `labgrid:<place>`, ssh aliases, `user@host:port` or `local`) into
/// boards, without duplicates.
pub fn resolve_targets(
    target: &str,
    boards: &BoardsFile,
    ssh_config: &SshConfig,
) -> Result<Vec<ResolvedBoard>, TargetError> {
    let mut out: Vec<ResolvedBoard> = Vec::new();
    for item in target.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let found: Vec<ResolvedBoard> = match boards.groups.get(item) {
            Some(members) => members
                .iter()
                .map(|m| {
                    if m.starts_with("labgrid:") || boards.boards.contains_key(m) {
                        resolve_one(m, boards, ssh_config)
                    } else {
                        Err(TargetError::Invalid {
                            target: item.into(),
                            message: format!(
                                "group `{item}` names board `{m}`, which is not configured"
                            ),
                        })
                    }
                })
                .collect::<Result<_, _>>()?,
            None => vec![resolve_one(item, boards, ssh_config)?],
        };
        for board in found {
            if !out.iter().any(|b| b.name() == board.name()) {
                out.push(board);
            }
        }
    }
    if out.is_empty() {
        return Err(TargetError::Invalid {
            target: target.into(),
            message: "names no board".into(),
        });
    }
    Ok(out)
}

/// One item of a target that is not a group.
fn resolve_one(
    item: &str,
    boards: &BoardsFile,
    ssh_config: &SshConfig,
) -> Result<ResolvedBoard, TargetError> {
    if item == "local" {
        return Ok(ResolvedBoard::Local);
    }
    if let Some(place) = item.strip_prefix("labgrid:") {
        // A configured board for this place lends its settings (identity,
        // known_hosts, runner, ...) and its name.
        let configured = boards
            .boards
            .iter()
            .find(|(_, c)| c.labgrid.as_ref().and_then(|l| l.place.as_deref()) == Some(place));
        return match configured {
            Some((name, config)) => from_config(name, config, boards, ssh_config),
            None => from_config(
                place,
                &BoardConfig {
                    labgrid: Some(LabgridSettings {
                        place: Some(place.to_string()),
                        ..Default::default()
                    }),
                    ..bare_config()
                },
                boards,
                ssh_config,
            ),
        }
        .map(ResolvedBoard::Remote);
    }
    match boards.boards.get(item) {
        Some(config) => from_config(item, config, boards, ssh_config).map(ResolvedBoard::Remote),
        None => from_destination(item, ssh_config).map(ResolvedBoard::Remote),
    }
}

/// Every default of a `[boards.x]` entry.
fn bare_config() -> BoardConfig {
    BoardConfig {
        host: String::new(),
        user: None,
        port: None,
        profile: default_profile(),
        identity: None,
        work_dir: default_work_dir(),
        emulated: false,
        runner: Vec::new(),
        known_hosts: None,
        max_memory_mb: None,
        keep_runs: default_keep_runs(),
        retry_seconds: default_retry_seconds(),
        labgrid: None,
        vcgencmd: None,
        power_command: None,
        power_interval_ms: None,
    }
}

fn from_config(
    name: &str,
    config: &BoardConfig,
    boards: &BoardsFile,
    ssh: &SshConfig,
) -> Result<RemoteBoard, TargetError> {
    let invalid = |message: String| TargetError::Invalid {
        target: name.into(),
        message,
    };
    let profile = BoardProfile::from_name(&config.profile).ok_or_else(|| {
        invalid(format!(
            "unknown profile `{}` (known: pi5, pi4, generic-aarch64)",
            config.profile
        ))
    })?;
    let farm = match &config.labgrid {
        Some(settings) => {
            let place = settings.place.as_deref().unwrap_or_default();
            if place.is_empty() || !is_safe_value(place) || place.starts_with('-') {
                return Err(invalid(format!(
                    "`labgrid.place` must name a labgrid place (letters, digits and . _ - only), not `{place}`"
                )));
            }
            if !config.host.is_empty() {
                return Err(invalid(
                    "set `host` or `labgrid`, not both: a labgrid board's address comes from its place".into(),
                ));
            }
            Some(FarmPlace::new(place, Some(settings), &boards.labgrid))
        }
        None if config.host.is_empty() => {
            return Err(invalid(
                "no `host` (an address or ssh alias) and no `labgrid = { place = ... }`".into(),
            ))
        }
        None => None,
    };
    let alias = ssh.lookup(&config.host);
    let mut identities: Vec<PathBuf> = config.identity.iter().map(|p| expand_home(p)).collect();
    identities.extend(alias.identity_files.iter().map(|p| expand_home(p)));
    identities.extend(default_identities());
    let mut known_hosts = vec![expand_home("~/.ssh/known_hosts")];
    known_hosts.extend(config.known_hosts.iter().map(|p| expand_home(p)));
    let board = RemoteBoard {
        name: name.to_string(),
        host: alias
            .host_name
            .clone()
            .unwrap_or_else(|| config.host.clone()),
        port: config.port.or(alias.port).unwrap_or(22),
        user: config
            .user
            .clone()
            .or(alias.user.clone())
            .unwrap_or_else(current_user),
        profile,
        identities,
        known_hosts,
        work_dir: config.work_dir.clone(),
        emulated: config.emulated,
        runner: config.runner.clone(),
        max_memory_bytes: config.max_memory_mb.map(|mb| mb * 1_000_000),
        keep_runs: config.keep_runs,
        retry_seconds: config.retry_seconds,
        power: power_settings(config).map_err(|message| TargetError::Invalid {
            target: name.into(),
            message,
        })?,
        farm,
    };
    validate(&board)?;
    Ok(board)
}

/// A board's power settings: `vcgencmd` an absolute path, `power_command`
/// not blank, `power_interval_ms` from 10 ms to a minute.
fn power_settings(config: &BoardConfig) -> Result<wire::power::PowerSettings, String> {
    if let Some(path) = config.vcgencmd.as_deref().filter(|p| !p.starts_with('/')) {
        return Err(format!(
            "`vcgencmd = \"{path}\"` must be an absolute path on the board (e.g. /usr/bin/vcgencmd)"
        ));
    }
    if config
        .power_command
        .as_deref()
        .is_some_and(|c| c.trim().is_empty())
    {
        return Err("`power_command` is blank: give a command that prints the board's watts, or leave it out".into());
    }
    let defaults = wire::power::PowerSettings::default();
    let interval_ms = config.power_interval_ms.unwrap_or(defaults.interval_ms);
    if !(10..=60_000).contains(&interval_ms) {
        return Err(format!(
            "`power_interval_ms = {interval_ms}` must be from 10 to 60000"
        ));
    }
    Ok(wire::power::PowerSettings {
        vcgencmd: config.vcgencmd.clone(),
        power_command: config.power_command.clone(),
        interval_ms,
        ..defaults
    })
}

/// `[user@]host[:port]` or an ssh config alias, with no board config: the
/// profile comes from the name (`pi4...` means pi4, anything else pi5, the
/// board this tool is for).
fn from_destination(item: &str, ssh: &SshConfig) -> Result<RemoteBoard, TargetError> {
    let invalid = |message: String| TargetError::Invalid {
        target: item.into(),
        message,
    };
    let (user, rest) = match item.split_once('@') {
        Some((u, r)) => (Some(u.to_string()), r),
        None => (None, item),
    };
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            Some(
                p.parse::<u16>()
                    .map_err(|_| invalid(format!("port `{p}` is not a number")))?,
            ),
        ),
        None => (rest, None),
    };
    let alias = ssh.lookup(host);
    let profile = if host.starts_with("pi4") {
        BoardProfile::Pi4
    } else {
        BoardProfile::Pi5
    };
    let mut identities: Vec<PathBuf> = alias
        .identity_files
        .iter()
        .map(|p| expand_home(p))
        .collect();
    identities.extend(default_identities());
    let board = RemoteBoard {
        name: host.to_string(),
        host: alias.host_name.clone().unwrap_or_else(|| host.to_string()),
        port: port.or(alias.port).unwrap_or(22),
        user: user.or(alias.user.clone()).unwrap_or_else(current_user),
        profile,
        identities,
        known_hosts: vec![expand_home("~/.ssh/known_hosts")],
        work_dir: default_work_dir(),
        emulated: false,
        runner: Vec::new(),
        max_memory_bytes: None,
        keep_runs: default_keep_runs(),
        retry_seconds: default_retry_seconds(),
        power: wire::power::PowerSettings::default(),
        farm: None,
    };
    validate(&board)?;
    Ok(board)
}

/// Checks a labgrid board's place before anything is built: the client
/// is there, the coordinator answers, the place exists; a `board` (or
/// `profile`) tag of pi5, pi4 or generic-aarch64 sets the board profile.
pub fn inspect_place(board: &mut RemoteBoard) -> Result<(), crate::fleet::labgrid::LabgridError> {
    let Some(farm) = board.farm.as_mut() else {
        return Ok(());
    };
    let client = crate::fleet::labgrid::LabgridClient::find(&farm.coordinator)?;
    let info = client.show(&farm.place)?;
    let tagged = ["board", "profile"]
        .iter()
        .filter_map(|k| info.tags.get(*k))
        .find_map(|v| BoardProfile::from_name(v));
    if let Some(profile) = tagged {
        board.profile = profile;
    }
    farm.tags = info.tags;
    Ok(())
}

/// Every value that reaches a remote command line or path must be plain.
fn validate(board: &RemoteBoard) -> Result<(), TargetError> {
    // A labgrid board's address is checked when its place is taken.
    let host = if board.farm.is_some() {
        "labgrid"
    } else {
        board.host.as_str()
    };
    let checks = [
        ("board name", board.name.as_str()),
        ("host", host),
        ("user", board.user.as_str()),
        ("work_dir", board.work_dir.as_str()),
    ];
    // Runner arguments may be options (`-cpu`); names and paths may not,
    // so none can be mistaken for an option by ssh or the remote shell.
    let runner_args = board
        .runner
        .iter()
        .map(|r| ("runner", r.trim_start_matches('-')));
    for (what, value) in checks.into_iter().chain(runner_args) {
        if !is_safe_value(value) {
            return Err(TargetError::Invalid {
                target: board.name.clone(),
                message: format!(
                    "{what} `{value}` contains characters that are not allowed (letters, digits and . _ - / ~ @ : + = , only)"
                ),
            });
        }
    }
    Ok(())
}

fn default_identities() -> Vec<PathBuf> {
    ["~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa"]
        .iter()
        .map(|p| expand_home(p))
        .collect()
}

fn current_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "root".into())
}

pub fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// The parts of `~/.ssh/config` quantbench honours.
#[derive(Debug, Clone, Default)]
pub struct SshConfig {
    blocks: Vec<(Vec<String>, SshHost)>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SshHost {
    pub host_name: Option<String>,
    pub user: Option<String>,
    pub port: Option<u16>,
    pub identity_files: Vec<String>,
}

impl SshConfig {
    pub fn load_default() -> SshConfig {
        std::fs::read_to_string(expand_home("~/.ssh/config"))
            .map(|t| SshConfig::parse(&t))
            .unwrap_or_default()
    }

    pub fn parse(text: &str) -> SshConfig {
        let mut blocks: Vec<(Vec<String>, SshHost)> = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = match line.split_once(|c: char| c.is_whitespace() || c == '=') {
                Some((k, v)) => (
                    k.to_ascii_lowercase(),
                    v.trim()
                        .trim_start_matches('=')
                        .trim()
                        .trim_matches('"')
                        .to_string(),
                ),
                None => continue,
            };
            if key == "host" {
                blocks.push((
                    value.split_whitespace().map(str::to_string).collect(),
                    SshHost::default(),
                ));
                continue;
            }
            if key == "match" {
                // Match blocks need evaluation we do not do; ignore their contents.
                blocks.push((Vec::new(), SshHost::default()));
                continue;
            }
            let Some((_, host)) = blocks.last_mut() else {
                continue;
            };
            match key.as_str() {
                "hostname" => host.host_name = Some(value),
                "user" => host.user = Some(value),
                "port" => host.port = value.parse().ok(),
                "identityfile" => host.identity_files.push(value),
                _ => {}
            }
        }
        SshConfig { blocks }
    }

    /// OpenSSH semantics: for each keyword the first matching block wins;
    /// identity files accumulate.
    pub fn lookup(&self, alias: &str) -> SshHost {
        let mut out = SshHost::default();
        for (patterns, host) in &self.blocks {
            if !patterns.iter().any(|p| glob_match(p, alias))
                || patterns
                    .iter()
                    .any(|p| p.strip_prefix('!').is_some_and(|n| glob_match(n, alias)))
            {
                continue;
            }
            out.host_name = out.host_name.or(host.host_name.clone());
            out.user = out.user.or(host.user.clone());
            out.port = out.port.or(host.port);
            out.identity_files
                .extend(host.identity_files.iter().cloned());
        }
        if let Some(name) = &out.host_name {
            out.host_name = Some(name.replace("%h", alias));
        }
        out
    }
}

fn glob_match(pattern: &str, text: &str) -> bool {
    fn go(p: &[u8], t: &[u8]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], t) || (!t.is_empty() && go(p, &t[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &t[1..]),
            _ => false,
        }
    }
    !pattern.starts_with('!') && go(pattern.as_bytes(), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SSH_CONFIG: &str = "
Host kitchen
    HostName 192.168.1.50
    User pi
    Port 2222
    IdentityFile ~/.ssh/pi_key
Host pi5-*
    User admin
Host *
    User fallback
";

    fn remote(b: &ResolvedBoard) -> &RemoteBoard {
        match b {
            ResolvedBoard::Remote(r) => r,
            ResolvedBoard::Local => panic!("local"),
        }
    }

    #[test]
    fn ssh_alias_supplies_host_user_port_identity() {
        let ssh = SshConfig::parse(SSH_CONFIG);
        let boards = resolve_targets("kitchen", &BoardsFile::default(), &ssh).unwrap();
        let b = remote(&boards[0]);
        assert_eq!(
            (b.host.as_str(), b.user.as_str(), b.port),
            ("192.168.1.50", "pi", 2222)
        );
        assert!(b.identities[0].ends_with(".ssh/pi_key"));
        assert_eq!(b.profile, BoardProfile::Pi5);
        let b = resolve_targets("pi5-desk", &BoardsFile::default(), &ssh).unwrap();
        assert_eq!(remote(&b[0]).user, "admin", "first matching block wins");
    }

    #[test]
    fn user_at_host_port_and_bare_pi5_local() {
        let ssh = SshConfig::default();
        let b = resolve_targets("bob@10.0.0.7:2200", &BoardsFile::default(), &ssh).unwrap();
        let r = remote(&b[0]);
        assert_eq!(
            (r.user.as_str(), r.host.as_str(), r.port),
            ("bob", "10.0.0.7", 2200)
        );
        let b = resolve_targets("pi5.local", &BoardsFile::default(), &ssh).unwrap();
        let r = remote(&b[0]);
        assert_eq!(
            (r.host.as_str(), r.port, r.profile),
            ("pi5.local", 22, BoardProfile::Pi5)
        );
        let b = resolve_targets("pi4.lan", &BoardsFile::default(), &ssh).unwrap();
        assert_eq!(remote(&b[0]).profile, BoardProfile::Pi4);
    }

    #[test]
    fn power_settings_reach_the_board_and_bad_ones_are_refused_saying_what_to_give() {
        let board = |extra: &str| {
            let file: BoardsFile =
                toml::from_str(&format!("[boards.a]\nhost='10.0.0.1'\n{extra}\n")).unwrap();
            resolve_targets("a", &file, &SshConfig::default())
        };
        let b = board("vcgencmd = '/opt/bin/vcgencmd'\npower_command = 'meter --watts'\npower_interval_ms = 250").unwrap();
        let power = &remote(&b[0]).power;
        assert_eq!(power.vcgencmd.as_deref(), Some("/opt/bin/vcgencmd"));
        assert_eq!(power.power_command.as_deref(), Some("meter --watts"));
        assert_eq!(power.interval_ms, 250);
        assert_eq!(remote(&board("").unwrap()[0]).power, Default::default());
        for (extra, says) in [
            ("vcgencmd = 'vcgencmd'", "must be an absolute path"),
            ("power_command = '  '", "is blank"),
            ("power_interval_ms = 5", "from 10 to 60000"),
        ] {
            let e = board(extra).unwrap_err().to_string();
            assert!(e.starts_with("target `a`: ") && e.contains(says), "{e}");
        }
    }

    #[test]
    fn groups_and_lists_expand_without_duplicates() {
        let file: BoardsFile = toml::from_str(
            "[boards.a]\nhost='10.0.0.1'\n[boards.b]\nhost='10.0.0.2'\nprofile='pi4'\n[groups]\nlab=['a','b']\n",
        )
        .unwrap();
        let boards = resolve_targets("lab,a,local", &file, &SshConfig::default()).unwrap();
        let names: Vec<&str> = boards.iter().map(ResolvedBoard::name).collect();
        assert_eq!(names, ["a", "b", "local"]);
        assert_eq!(remote(&boards[1]).profile, BoardProfile::Pi4);
    }

    #[test]
    fn shell_metacharacters_in_names_or_paths_are_refused() {
        let file: BoardsFile = toml::from_str(
            "[boards.'x;reboot']\nhost='10.0.0.1'\n[boards.ok]\nhost='10.0.0.1'\nwork_dir='/tmp/$(id)'\n",
        )
        .unwrap();
        let ssh = SshConfig::default();
        let e = resolve_targets("x;reboot", &file, &ssh)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not allowed"), "{e}");
        let e = resolve_targets("ok", &file, &ssh).unwrap_err().to_string();
        assert!(e.contains("work_dir"), "{e}");
        assert!(resolve_targets("a`id`@host", &BoardsFile::default(), &ssh).is_err());
    }

    #[test]
    fn labgrid_places_take_a_configured_boards_settings_and_the_defaults() {
        let file: BoardsFile = toml::from_str(
            "[labgrid]\ncoordinator='lab:20408'\npower_cycle=true\n\
             [boards.farm1]\nlabgrid={place='pi5-a', boot_seconds=30}\nidentity='/k'\nemulated=true\n\
             [groups]\nfarm=['farm1','labgrid:pi5-b']\n",
        )
        .unwrap();
        let ssh = SshConfig::default();
        let boards = resolve_targets("labgrid:pi5-a,farm", &file, &ssh).unwrap();
        let names: Vec<&str> = boards.iter().map(ResolvedBoard::name).collect();
        assert_eq!(
            names,
            ["farm1", "pi5-b"],
            "the configured board lends its name"
        );
        let a = remote(&boards[0]);
        let farm = a.farm.as_ref().unwrap();
        assert_eq!(
            (
                farm.place.as_str(),
                farm.coordinator.as_str(),
                farm.power_cycle,
                farm.boot_seconds
            ),
            ("pi5-a", "lab:20408", true, 30)
        );
        assert!(a.emulated && a.identities[0].ends_with("k"));
        let b = remote(&boards[1]).farm.as_ref().unwrap();
        assert_eq!((b.place.as_str(), b.boot_seconds), ("pi5-b", 180));
    }

    #[test]
    fn a_labgrid_board_needs_a_place_and_no_host() {
        let ssh = SshConfig::default();
        let file: BoardsFile =
            toml::from_str("[boards.a]\nhost='h'\nlabgrid={place='p'}\n[boards.b]\nuser='pi'\n[boards.c]\nlabgrid={place='x;y'}\n").unwrap();
        let e = resolve_targets("a", &file, &ssh).unwrap_err().to_string();
        assert!(e.contains("not both"), "{e}");
        let e = resolve_targets("b", &file, &ssh).unwrap_err().to_string();
        assert!(e.contains("no `host`"), "{e}");
        let e = resolve_targets("c", &file, &ssh).unwrap_err().to_string();
        assert!(e.contains("labgrid.place"), "{e}");
        assert!(resolve_targets("labgrid:$(id)", &BoardsFile::default(), &ssh).is_err());
    }

    #[test]
    fn unknown_profile_and_bad_port_are_named() {
        let file: BoardsFile = toml::from_str("[boards.a]\nhost='h'\nprofile='pi9'\n").unwrap();
        assert!(resolve_targets("a", &file, &SshConfig::default())
            .unwrap_err()
            .to_string()
            .contains("pi9"));
        assert!(resolve_targets("h:99999", &BoardsFile::default(), &SshConfig::default()).is_err());
    }
}
