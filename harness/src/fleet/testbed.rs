//! Emulated Pi 5 boards on this machine: each a network namespace with its
//! own address on a bridge and its own OpenSSH server (own host key, an
//! authorised key for the testbed identity), where aarch64 programs run
//! under `qemu-aarch64 -cpu cortex-a76` (the board's `runner`). Timings on
//! these boards measure the emulator, and their rows say `emulated`.
//!
//! Everything lives under `<workspace>/.testbed/` plus the namespaces
//! `qbtb-sim<N>`, veth pairs `qbtb-s<N>` and the bridge `qbtb0`; `down`
//! removes all of it. Both `up` and `down` are idempotent. Needs root.

use crate::fleet::boards::{BoardConfig, BoardsFile};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use thiserror::Error;

const BRIDGE: &str = "qbtb0";
const SUBNET_PREFIX: &str = "10.213.0";
const NETNS_PREFIX: &str = "qbtb-sim";

#[derive(Debug, Error)]
pub enum TestbedError {
    #[error("the testbed needs root (network namespaces, a bridge, sshd); run as root, e.g. sudo -E cargo xtask testbed up")]
    NotRoot,
    #[error("testbed: `{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("testbed: {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "testbed: sshd of {board} did not start listening on {address} within 10 s; see {log}"
    )]
    SshdNotListening {
        board: String,
        address: String,
        log: String,
    },
    #[error("testbed: {0}")]
    Setup(#[from] bootstrap::SetupError),
}

pub fn state_dir(workspace: &Path) -> PathBuf {
    workspace.join(".testbed")
}

pub fn boards_file_path(workspace: &Path) -> PathBuf {
    state_dir(workspace).join("boards.toml")
}

pub fn board_name(index: usize) -> String {
    format!("sim{index}")
}

/// The network namespace board `sim<index>` lives in.
pub fn namespace(index: usize) -> String {
    format!("{NETNS_PREFIX}{index}")
}

/// The board's end of its veth pair, inside its namespace: taking it down
/// unplugs the board's cable.
pub fn board_link(index: usize) -> String {
    format!("qbtb-s{index}p")
}

pub fn board_address(index: usize) -> String {
    format!("{SUBNET_PREFIX}.{}", 10 + index)
}

/// Brings up boards `sim1..=simN` (keeping any already running) and writes
/// their config, identity and known_hosts. Returns the boards file path.
pub fn up(workspace: &Path, boards: usize) -> Result<PathBuf, TestbedError> {
    bootstrap::ensure(&[bootstrap::Need::Testbed])?;
    if !bootstrap::is_root() {
        return Err(TestbedError::NotRoot);
    }
    let dir = state_dir(workspace);
    mkdir(&dir)?;
    let identity = dir.join("id_ed25519");
    if !identity.exists() {
        run(Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "quantbench-testbed",
                "-f",
            ])
            .arg(&identity))?;
    }
    let public_key = read(&dir.join("id_ed25519.pub"))?;
    mkdir(Path::new("/run/sshd"))?;
    ensure_bridge()?;
    let user = current_user();
    let mut file = BoardsFile::default();
    let mut known_hosts = String::new();
    for index in 1..=boards {
        let name = board_name(index);
        let board_dir = dir.join(&name);
        mkdir(&board_dir.join("work"))?;
        ensure_namespace(index)?;
        let host_key = board_dir.join("ssh_host_ed25519_key");
        if !host_key.exists() {
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", &name, "-f"])
                .arg(&host_key))?;
        }
        write(&board_dir.join("authorized_keys"), &public_key)?;
        ensure_sshd(index, &board_dir, &user)?;
        let host_public = read(&board_dir.join("ssh_host_ed25519_key.pub"))?;
        let key_fields: Vec<&str> = host_public.split_whitespace().take(2).collect();
        known_hosts.push_str(&format!(
            "{} {}\n",
            board_address(index),
            key_fields.join(" ")
        ));
        file.boards.insert(
            name.clone(),
            BoardConfig {
                host: board_address(index),
                user: Some(user.clone()),
                port: Some(22),
                profile: "pi5".into(),
                identity: Some(identity.display().to_string()),
                work_dir: board_dir.join("work").display().to_string(),
                emulated: true,
                runner: vec!["qemu-aarch64".into(), "-cpu".into(), "cortex-a76".into()],
                known_hosts: Some(dir.join("known_hosts").display().to_string()),
                max_memory_mb: None,
                keep_runs: 20,
                retry_seconds: crate::fleet::boards::default_retry_seconds(),
                labgrid: None,
                vcgencmd: None,
                power_command: None,
                power_interval_ms: None,
            },
        );
    }
    // Keep boards from an earlier, larger `up` in the files.
    if let Ok(previous) = read(&boards_file_path(workspace)) {
        if let Ok(previous) = toml::from_str::<BoardsFile>(&previous) {
            for (name, board) in previous.boards {
                if !file.boards.contains_key(&name) && dir.join(&name).join("sshd.pid").exists() {
                    known_hosts.push_str(&format!(
                        "{} {}\n",
                        board.host,
                        read(&dir.join(&name).join("ssh_host_ed25519_key.pub"))?
                            .split_whitespace()
                            .take(2)
                            .collect::<Vec<_>>()
                            .join(" ")
                    ));
                    file.boards.insert(name, board);
                }
            }
        }
    }
    file.groups
        .insert("testbed".into(), file.boards.keys().cloned().collect());
    write(&dir.join("known_hosts"), &known_hosts)?;
    let text = toml::to_string_pretty(&file).map_err(|e| TestbedError::Command {
        command: "writing boards.toml".into(),
        stderr: e.to_string(),
    })?;
    let path = boards_file_path(workspace);
    write(
        &path,
        &format!("# Written by `cargo xtask testbed up`; removed by `testbed down`.\n{text}"),
    )?;
    Ok(path)
}

/// Removes every namespace, process and file the testbed made.
pub fn down(workspace: &Path) -> Result<(), TestbedError> {
    if !bootstrap::is_root() {
        return Err(TestbedError::NotRoot);
    }
    let dir = state_dir(workspace);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let pid_file = entry.path().join("sshd.pid");
            if let Ok(pid) = read(&pid_file) {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
        }
    }
    // Agents started on the boards outlive sshd by design (detached runs).
    let _ = Command::new("pkill")
        .arg("-f")
        .arg(dir.display().to_string())
        .status();
    let namespaces = Command::new("ip").args(["netns", "list"]).output();
    if let Ok(out) = namespaces {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(NETNS_PREFIX) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    if link_exists(BRIDGE) {
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).status();
    }
    // A tmpfs a test mounted under the state dir must go first.
    if let Ok(mounts) = std::fs::read_to_string("/proc/mounts") {
        for mount_point in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
            if Path::new(mount_point).starts_with(&dir) {
                let _ = Command::new("umount").arg(mount_point).status();
            }
        }
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|source| TestbedError::Io { path: dir, source })?;
    }
    Ok(())
}

/// True when the testbed's boards file exists and every board's sshd runs.
pub fn is_up(workspace: &Path, boards: usize) -> bool {
    boards_file_path(workspace).exists()
        && (1..=boards).all(|i| {
            let pid_file = state_dir(workspace).join(board_name(i)).join("sshd.pid");
            read(&pid_file)
                .map(|pid| pid_alive(pid.trim()))
                .unwrap_or(false)
        })
}

fn ensure_bridge() -> Result<(), TestbedError> {
    if !link_exists(BRIDGE) {
        run(Command::new("ip").args(["link", "add", BRIDGE, "type", "bridge"]))?;
        run(Command::new("ip").args([
            "addr",
            "add",
            &format!("{SUBNET_PREFIX}.1/24"),
            "dev",
            BRIDGE,
        ]))?;
    }
    run(Command::new("ip").args(["link", "set", BRIDGE, "up"]))
}

fn ensure_namespace(index: usize) -> Result<(), TestbedError> {
    let netns = format!("{NETNS_PREFIX}{index}");
    let host_end = format!("qbtb-s{index}");
    let board_end = board_link(index);
    let exists = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.split_whitespace().next() == Some(netns.as_str()))
        })
        .unwrap_or(false);
    if exists && link_exists(&host_end) {
        return Ok(());
    }
    if exists {
        run(Command::new("ip").args(["netns", "del", &netns]))?;
    }
    if link_exists(&host_end) {
        run(Command::new("ip").args(["link", "del", &host_end]))?;
    }
    run(Command::new("ip").args(["netns", "add", &netns]))?;
    run(Command::new("ip").args([
        "link", "add", &host_end, "type", "veth", "peer", "name", &board_end,
    ]))?;
    run(Command::new("ip").args(["link", "set", &board_end, "netns", &netns]))?;
    run(Command::new("ip").args(["link", "set", &host_end, "master", BRIDGE]))?;
    run(Command::new("ip").args(["link", "set", &host_end, "up"]))?;
    let in_ns = |args: &[&str]| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &netns, "ip"]).args(args);
        run(&mut c)
    };
    in_ns(&[
        "addr",
        "add",
        &format!("{}/24", board_address(index)),
        "dev",
        &board_end,
    ])?;
    in_ns(&["link", "set", &board_end, "up"])?;
    in_ns(&["link", "set", "lo", "up"])?;
    Ok(())
}

fn ensure_sshd(index: usize, board_dir: &Path, user: &str) -> Result<(), TestbedError> {
    let pid_file = board_dir.join("sshd.pid");
    if read(&pid_file)
        .map(|p| pid_alive(p.trim()))
        .unwrap_or(false)
    {
        return Ok(());
    }
    let config = format!(
        "ListenAddress {address}\nPort 22\nHostKey {key}\nPidFile {pid}\nAuthorizedKeysFile {keys}\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
         PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nAllowUsers {user}\n\
         Subsystem sftp internal-sftp\nLogLevel INFO\n",
        address = board_address(index),
        key = board_dir.join("ssh_host_ed25519_key").display(),
        pid = pid_file.display(),
        keys = board_dir.join("authorized_keys").display(),
    );
    let config_path = board_dir.join("sshd_config");
    write(&config_path, &config)?;
    let log = board_dir.join("sshd.log");
    run(Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{NETNS_PREFIX}{index}"),
            "/usr/sbin/sshd",
            "-f",
        ])
        .arg(&config_path)
        .arg("-E")
        .arg(&log))?;
    let address = format!("{}:22", board_address(index));
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if let Ok(addr) = address.parse() {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok() {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(TestbedError::SshdNotListening {
        board: board_name(index),
        address,
        log: log.display().to_string(),
    })
}

fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", name])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn pid_alive(pid: &str) -> bool {
    !pid.is_empty() && Path::new("/proc").join(pid).exists()
}

fn current_user() -> String {
    Command::new("id")
        .arg("-un")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "root".into())
}

fn run(command: &mut Command) -> Result<(), TestbedError> {
    let out = command.output().map_err(|e| TestbedError::Command {
        command: format!("{command:?}"),
        stderr: e.to_string(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TestbedError::Command {
            command: format!("{command:?}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn mkdir(path: &Path) -> Result<(), TestbedError> {
    std::fs::create_dir_all(path).map_err(|source| TestbedError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read(path: &Path) -> Result<String, TestbedError> {
    std::fs::read_to_string(path).map_err(|source| TestbedError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, text: &str) -> Result<(), TestbedError> {
    std::fs::write(path, text).map_err(|source| TestbedError::Io {
        path: path.to_path_buf(),
        source,
    })
}
