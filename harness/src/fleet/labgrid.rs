//! Talking to a labgrid coordinator, through `labgrid-client`: what a place
//! is (tags, who holds it), taking it the way labgrid users do (reserve,
//! wait for the reservation, acquire), reading how to reach its board (its
//! `NetworkService`), power-cycling it, and giving it back, also when the
//! host is interrupted (`release_all_held`).
//!
//! The command-line client, not labgrid's Python API, is the interface:
//! it is what lab admins already have and script, its exit codes are
//! stable across releases, and quantbench stays a Rust program that links
//! no Python.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use thiserror::Error;

use bootstrap::{LABGRID_VENV_DIR, LABGRID_VERSION};

/// labgrid's own default when neither config nor `LG_COORDINATOR` says.
pub const DEFAULT_COORDINATOR: &str = "127.0.0.1:20408";

/// How long one client command (not `wait`) may take: the coordinator
/// answers in milliseconds; a hung one must not hang a night's run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum LabgridError {
    #[error("labgrid-client is not installed (looked on PATH and in {venv}): run `cargo xtask setup` (installs labgrid {LABGRID_VERSION} from PyPI into that venv) or `pipx install labgrid=={LABGRID_VERSION}`")]
    NotInstalled { venv: String },
    #[error("labgrid coordinator {coordinator} does not answer: {detail}. Check that `labgrid-coordinator` runs there and the address (board's `labgrid.coordinator`, `[labgrid] coordinator` in bench.toml, or LG_COORDINATOR)")]
    CoordinatorUnreachable { coordinator: String, detail: String },
    #[error("labgrid place `{place}` does not exist on coordinator {coordinator} (places there: {known}); create it with `labgrid-client -p {place} create` and add its board's resources with `add-match`")]
    UnknownPlace {
        place: String,
        coordinator: String,
        known: String,
    },
    #[error("labgrid place `{place}` has no NetworkService resource (it has: {has}); export the board's SSH address from the exporter's config as `NetworkService: {{address: ..., username: ..., port: 22}}` and `labgrid-client -p {place} add-match <exporter>/<group>/NetworkService`")]
    NoNetworkService { place: String, has: String },
    #[error("labgrid place `{place}` is held by {holder} and was not free after {waited_s} s; ask {holder} to release it (`labgrid-client -p {place} release`), or wait longer (--lock-wait)")]
    HeldByOther {
        place: String,
        holder: String,
        waited_s: u64,
    },
    #[error("labgrid place `{place}`: its NetworkService {what} `{value}` is not a plain value quantbench can pass to ssh")]
    BadAddress {
        place: String,
        what: &'static str,
        value: String,
    },
    #[error("`labgrid-client {command}` failed: {detail}")]
    Failed { command: String, detail: String },
    #[error("could not run {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
}

/// A place as `labgrid-client show` describes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlaceInfo {
    pub name: String,
    pub tags: BTreeMap<String, String>,
    pub matches: Vec<String>,
    /// `host/user` of whoever holds it.
    pub acquired_by: Option<String>,
    pub reservation: Option<String>,
}

/// One resource of an acquired place, from `labgrid-client env`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PlaceResource {
    pub class: String,
    pub params: BTreeMap<String, String>,
}

/// Where a place's board answers SSH.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkService {
    pub address: String,
    pub username: Option<String>,
    pub port: Option<u16>,
}

/// The resource classes `labgrid-client power` can drive.
const POWER_CLASSES: &[&str] = &[
    "NetworkPowerPort",
    "PDUDaemonPort",
    "YKUSHPowerPort",
    "USBPowerPort",
    "SiSPMPowerPort",
    "TasmotaPowerPort",
];

impl PlaceResource {
    pub fn is_power(&self) -> bool {
        POWER_CLASSES.contains(&self.class.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct LabgridClient {
    program: PathBuf,
    pub coordinator: String,
}

impl LabgridClient {
    /// `labgrid-client` from PATH, or from the venv `cargo xtask setup`
    /// makes; `QUANTBENCH_LABGRID_CLIENT` names another one.
    pub fn find(coordinator: &str) -> Result<LabgridClient, LabgridError> {
        let program = bootstrap::labgrid_client().ok_or_else(|| LabgridError::NotInstalled {
            venv: bootstrap::workspace_root()
                .join(LABGRID_VENV_DIR)
                .display()
                .to_string(),
        })?;
        Ok(LabgridClient {
            program,
            coordinator: coordinator.to_string(),
        })
    }

    /// Runs the client against our coordinator with `args`, killing it
    /// after `timeout`. Returns (exit success, stdout, stderr), or `None`
    /// for the output when the timeout hit.
    fn run(
        &self,
        place: Option<&str>,
        token: Option<&str>,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Option<(bool, String, String)>, LabgridError> {
        let mut command = Command::new(&self.program);
        command.arg("-x").arg(&self.coordinator);
        if let Some(place) = place {
            command.arg("-p").arg(place);
        }
        command
            .args(args)
            // Ours, not the calling shell's: a user's LG_PLACE or LG_TOKEN
            // must not redirect what quantbench takes or gives back.
            .env_remove("LG_PLACE")
            .env_remove("LG_TOKEN")
            .env_remove("LG_ENV")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(token) = token {
            command.env("LG_TOKEN", token);
        }
        let mut child = command.spawn().map_err(|source| LabgridError::Spawn {
            program: self.program.clone(),
            source,
        })?;
        // Drained on threads so a chatty client never blocks on a full pipe.
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut text = String::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_string(&mut text);
                }
                text
            })
        };
        let stdout = drain(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let stderr = drain(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if started.elapsed() >= timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(source) => {
                    return Err(LabgridError::Spawn {
                        program: self.program.clone(),
                        source,
                    })
                }
            }
        };
        let stdout = stdout.join().unwrap_or_default();
        let stderr = stderr.join().unwrap_or_default();
        let Some(status) = status else {
            return Ok(None);
        };
        if stderr.contains("Could not connect to coordinator")
            || stderr.contains("coordinator is unavailable")
        {
            let detail = if stderr.contains("Connection refused") {
                "connection refused".to_string()
            } else {
                last_line(&stderr)
            };
            return Err(LabgridError::CoordinatorUnreachable {
                coordinator: self.coordinator.clone(),
                detail,
            });
        }
        Ok(Some((status.success(), stdout, stderr)))
    }

    /// Runs a command that must succeed within the usual timeout.
    fn run_ok(
        &self,
        place: Option<&str>,
        token: Option<&str>,
        args: &[&str],
    ) -> Result<String, LabgridError> {
        let described = || {
            let mut words: Vec<&str> = place.map(|p| vec!["-p", p]).unwrap_or_default();
            words.extend(args);
            words.join(" ")
        };
        match self.run(place, token, args, COMMAND_TIMEOUT)? {
            Some((true, stdout, _)) => Ok(stdout),
            Some((false, _, stderr)) => Err(LabgridError::Failed {
                command: described(),
                detail: last_line(&stderr),
            }),
            None => Err(LabgridError::CoordinatorUnreachable {
                coordinator: self.coordinator.clone(),
                detail: format!(
                    "`labgrid-client {}` did not finish in {} s",
                    described(),
                    COMMAND_TIMEOUT.as_secs()
                ),
            }),
        }
    }

    /// The place's tags, matches and holder; an unknown place is named
    /// with the places that exist.
    pub fn show(&self, place: &str) -> Result<PlaceInfo, LabgridError> {
        match self.run_ok(Some(place), None, &["show"]) {
            Ok(stdout) => Ok(parse_show(place, &stdout)),
            Err(LabgridError::Failed { detail, .. }) if detail.contains("matches nothing") => {
                Err(LabgridError::UnknownPlace {
                    place: place.to_string(),
                    coordinator: self.coordinator.clone(),
                    known: self
                        .places()
                        .map(|p| {
                            if p.is_empty() {
                                "none".into()
                            } else {
                                p.join(", ")
                            }
                        })
                        .unwrap_or_else(|_| "?".into()),
                })
            }
            Err(e) => Err(e),
        }
    }

    pub fn places(&self) -> Result<Vec<String>, LabgridError> {
        let stdout = self.run_ok(None, None, &["places"])?;
        Ok(stdout
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect())
    }

    /// Reserves `place` (labgrid matches the `name` tag against the place
    /// name) and returns the reservation's token.
    pub fn reserve(&self, place: &str) -> Result<String, LabgridError> {
        let filter = format!("name={place}");
        let stdout = self.run_ok(None, None, &["reserve", "--shell", &filter])?;
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("export LG_TOKEN="))
            .map(|t| t.trim().to_string())
            .ok_or_else(|| LabgridError::Failed {
                command: format!("reserve --shell {filter}"),
                detail: format!("no LG_TOKEN in its output: {}", last_line(&stdout)),
            })
    }

    /// Blocks until the reservation is allocated (true) or `timeout`
    /// passes (false). The client refreshes the reservation while it
    /// waits, so it does not expire in the queue.
    pub fn wait(&self, token: &str, timeout: Duration) -> Result<bool, LabgridError> {
        match self.run(None, None, &["wait", token], timeout)? {
            Some((true, _, _)) => Ok(true),
            Some((false, _, stderr)) => Err(LabgridError::Failed {
                command: format!("wait {token}"),
                detail: last_line(&stderr),
            }),
            None => Ok(false),
        }
    }

    /// Acquires the place the reservation `token` was allocated.
    pub fn acquire_reserved(&self, token: &str) -> Result<(), LabgridError> {
        self.run_ok(Some("+"), Some(token), &["acquire"])
            .map(|_| ())
    }

    pub fn release(&self, place: &str) -> Result<(), LabgridError> {
        self.run_ok(Some(place), None, &["release"]).map(|_| ())
    }

    pub fn cancel_reservation(&self, token: &str) -> Result<(), LabgridError> {
        self.run_ok(None, None, &["cancel-reservation", token])
            .map(|_| ())
    }

    /// The acquired place's resources.
    pub fn resources(&self, place: &str) -> Result<Vec<PlaceResource>, LabgridError> {
        let stdout = self.run_ok(Some(place), None, &["env"])?;
        Ok(parse_env(&stdout))
    }

    /// Switches the place's power off and on again (labgrid's own
    /// `power cycle`, with its default off time).
    pub fn power_cycle(&self, place: &str) -> Result<(), LabgridError> {
        self.run_ok(Some(place), None, &["power", "cycle"])
            .map(|_| ())
    }
}

/// The place's NetworkService, checked to be plain values.
pub fn network_service(
    place: &str,
    resources: &[PlaceResource],
) -> Result<NetworkService, LabgridError> {
    let found = resources
        .iter()
        .find(|r| r.class == "NetworkService")
        .ok_or_else(|| LabgridError::NoNetworkService {
            place: place.to_string(),
            has: if resources.is_empty() {
                "no resources".into()
            } else {
                resources
                    .iter()
                    .map(|r| r.class.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })?;
    let bad = |what: &'static str, value: &str| LabgridError::BadAddress {
        place: place.to_string(),
        what,
        value: value.to_string(),
    };
    let address = found.params.get("address").cloned().unwrap_or_default();
    if address.is_empty() || !crate::shell::is_safe_value(&address) || address.starts_with('-') {
        return Err(bad("address", &address));
    }
    let username = found.params.get("username").cloned();
    if let Some(u) = &username {
        if !crate::shell::is_safe_value(u) || u.starts_with('-') {
            return Err(bad("username", u));
        }
    }
    let port = match found.params.get("port") {
        Some(p) => Some(p.parse::<u16>().map_err(|_| bad("port", p))?),
        None => None,
    };
    Ok(NetworkService {
        address,
        username,
        port,
    })
}

fn last_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with("Traceback") && !l.starts_with("File "))
        .unwrap_or("(no output)")
        .trim_start_matches("labgrid-client: ")
        .to_string()
}

/// `labgrid-client -p <place> show`: the place block at the top (two-space
/// keys); the matching resources after it are not needed here.
pub fn parse_show(place: &str, text: &str) -> PlaceInfo {
    let mut info = PlaceInfo {
        name: place.to_string(),
        ..Default::default()
    };
    let mut in_matches = false;
    for line in text.lines() {
        if !line.starts_with("  ") {
            // `Place 'x':` opens the block; anything else at column 0
            // (the matching resources) ends it.
            if !line.starts_with("Place ") {
                break;
            }
            continue;
        }
        let depth = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if depth >= 4 {
            if in_matches {
                info.matches.push(trimmed.to_string());
            }
            continue;
        }
        in_matches = false;
        let Some((key, value)) = trimmed.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "tags" => {
                info.tags = value
                    .split(',')
                    .filter_map(|kv| kv.trim().split_once('='))
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .collect()
            }
            "matches" => in_matches = true,
            "acquired" if value != "None" && !value.is_empty() => {
                info.acquired_by = Some(value.to_string())
            }
            "reservation" if !value.is_empty() => info.reservation = Some(value.to_string()),
            _ => {}
        }
    }
    info
}

/// `labgrid-client -p <place> env`: YAML of the form
/// `targets: {<place>: {resources: [{<Class>: {key: value}}]}}`, as the
/// client prints it (block style, one resource per `- Class:` item).
pub fn parse_env(text: &str) -> Vec<PlaceResource> {
    let mut out: Vec<PlaceResource> = Vec::new();
    let mut in_resources = false;
    let mut item_depth = 0usize;
    for line in text.lines() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let depth = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if trimmed == "resources:" {
            in_resources = true;
            continue;
        }
        if !in_resources {
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix("- ") {
            item_depth = depth;
            let class = rest.trim_end_matches(':').trim();
            out.push(PlaceResource {
                class: class.to_string(),
                params: BTreeMap::new(),
            });
            continue;
        }
        if depth <= item_depth {
            // Past the resource list (drivers, options, ...).
            in_resources = false;
            continue;
        }
        if let (Some(current), Some((key, value))) = (out.last_mut(), trimmed.split_once(':')) {
            let value = value.trim().trim_matches(|c| c == '\'' || c == '"');
            if !value.is_empty() {
                current
                    .params
                    .insert(key.trim().to_string(), value.to_string());
            }
        }
    }
    out
}

/// Places this process holds, so an interrupted host (Ctrl-C, SIGTERM from
/// a CI runner) gives them back before it exits.
static HELD: Mutex<Vec<(LabgridClient, String, String)>> = Mutex::new(Vec::new());

/// An acquired place: reachable through `network`, released on drop.
pub struct HeldPlace {
    pub client: LabgridClient,
    pub place: String,
    pub token: String,
    pub network: NetworkService,
    pub has_power: bool,
    released: bool,
}

/// Why a place could not be taken within the wait.
fn holder_of(client: &LabgridClient, place: &str) -> String {
    match client.show(place) {
        Ok(PlaceInfo {
            acquired_by: Some(holder),
            ..
        }) => holder,
        Ok(_) => {
            "other reservations queued before ours (see `labgrid-client reservations`)".to_string()
        }
        Err(e) => format!("someone (could not ask: {e})"),
    }
}

impl HeldPlace {
    /// Reserves the place, waits up to `wait` for the reservation, acquires
    /// it and reads its NetworkService. `waiting` is told who holds the
    /// place when it is not free at once. Whatever fails after the
    /// reservation gives it (and the place) back.
    pub fn take(
        client: &LabgridClient,
        place: &str,
        wait: Duration,
        waiting: &dyn Fn(String),
    ) -> Result<HeldPlace, LabgridError> {
        let token = client.reserve(place)?;
        let cancel = || {
            let _ = client.cancel_reservation(&token);
        };
        let allocated = match client.wait(&token, Duration::from_secs(2)) {
            Ok(true) => true,
            Ok(false) => {
                waiting(format!(
                    "labgrid place {place} is held by {}; waiting up to {} s",
                    holder_of(client, place),
                    wait.as_secs()
                ));
                match client.wait(&token, wait.saturating_sub(Duration::from_secs(2))) {
                    Ok(allocated) => allocated,
                    Err(e) => {
                        cancel();
                        return Err(e);
                    }
                }
            }
            Err(e) => {
                cancel();
                return Err(e);
            }
        };
        if !allocated {
            cancel();
            return Err(LabgridError::HeldByOther {
                place: place.to_string(),
                holder: holder_of(client, place),
                waited_s: wait.as_secs(),
            });
        }
        if let Err(e) = client.acquire_reserved(&token) {
            cancel();
            return Err(e);
        }
        let mut held = HeldPlace {
            client: client.clone(),
            place: place.to_string(),
            token: token.clone(),
            network: NetworkService {
                address: String::new(),
                username: None,
                port: None,
            },
            has_power: false,
            released: false,
        };
        if let Ok(mut list) = HELD.lock() {
            list.push((client.clone(), place.to_string(), token));
        }
        // From here on, dropping `held` gives everything back.
        let resources = client.resources(place)?;
        held.network = network_service(place, &resources)?;
        held.has_power = resources.iter().any(PlaceResource::is_power);
        Ok(held)
    }

    /// Releases the place and cancels the reservation (once).
    pub fn release(&mut self) -> Result<(), LabgridError> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        if let Ok(mut list) = HELD.lock() {
            list.retain(|(_, p, t)| !(p == &self.place && t == &self.token));
        }
        let released = self.client.release(&self.place);
        let _ = self.client.cancel_reservation(&self.token);
        released
    }
}

impl Drop for HeldPlace {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// Releases every place this process holds; for the interrupt handler.
pub fn release_all_held() {
    let held: Vec<(LabgridClient, String, String)> = match HELD.lock() {
        Ok(mut list) => std::mem::take(&mut *list),
        Err(_) => return,
    };
    for (client, place, token) in held {
        match client.release(&place) {
            Ok(()) => eprintln!("released labgrid place {place}"),
            Err(e) => eprintln!("could not release labgrid place {place}: {e}"),
        }
        let _ = client.cancel_reservation(&token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Verbatim from labgrid-client 26.0.1.
    const SHOW: &str = "Place 'qa':
  tags: board=pi5, lab=x
  matches:
    exp1/pi-a/*
  acquired: vm/root
  acquired resources:
    exp1/pi-a/NetworkPowerPort/NetworkPowerPort
    exp1/pi-a/NetworkService/NetworkService
  reservation: 8PXT6IEE0O
  created: 2026-11-26 03:42:42.594132
  changed: 2026-11-26 03:42:43.246291
Acquired resource 'NetworkService' (exp1/pi-a/NetworkService/NetworkService):
  {'acquired': 'qa',
";

    const ENV: &str = "targets:
  qa:
    resources:
    - NetworkPowerPort:
        host: http://127.0.0.1:9999/relay/{index}/{value}
        index: 0
        model: simplerest
    - NetworkService:
        port: 22
        username: root
        address: 10.213.0.11

";

    #[test]
    fn show_gives_tags_matches_holder_and_reservation() {
        let info = parse_show("qa", SHOW);
        assert_eq!(info.tags.get("board").map(String::as_str), Some("pi5"));
        assert_eq!(info.tags.len(), 2);
        assert_eq!(info.matches, ["exp1/pi-a/*"]);
        assert_eq!(info.acquired_by.as_deref(), Some("vm/root"));
        assert_eq!(info.reservation.as_deref(), Some("8PXT6IEE0O"));
        let free = parse_show("qa", "Place 'qa':\n  tags: \n  matches:\n    a/b/*\n  acquired: None\n  acquired resources:\n");
        assert_eq!(free.acquired_by, None);
        assert!(free.tags.is_empty());
    }

    #[test]
    fn env_gives_the_network_service_and_power() {
        let resources = parse_env(ENV);
        assert_eq!(resources.len(), 2);
        assert!(resources[0].is_power());
        let net = network_service("qa", &resources).unwrap();
        assert_eq!(
            net,
            NetworkService {
                address: "10.213.0.11".into(),
                username: Some("root".into()),
                port: Some(22)
            }
        );
    }

    #[test]
    fn a_place_without_network_service_or_with_a_hostile_address_is_refused() {
        let only_power = parse_env(&ENV.replace("- NetworkService:", "- USBSerialPort:"));
        let e = network_service("qa", &only_power).unwrap_err().to_string();
        assert!(
            e.contains("no NetworkService") && e.contains("USBSerialPort"),
            "{e}"
        );
        let hostile = parse_env(&ENV.replace("10.213.0.11", "$(reboot)"));
        let e = network_service("qa", &hostile).unwrap_err().to_string();
        assert!(e.contains("address"), "{e}");
        let dashed = parse_env(&ENV.replace("10.213.0.11", "-oProxyCommand=x"));
        assert!(network_service("qa", &dashed).is_err());
    }
}
