//! SSH to boards (ssh2): connect, check the host key, authenticate, run
//! commands built from quoted values, move files over SFTP.

use crate::fleet::known_hosts::{self, Verdict};
use ssh2::{HashType, Session};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

pub use crate::shell::{command_line, is_safe_value, shell_quote};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(8);
const IO_TIMEOUT_MS: u32 = 60_000;

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("board {board}: cannot reach {address}: {reason}. Is the board on, on the network, and running sshd?")]
    Unreachable {
        board: String,
        address: String,
        reason: String,
    },
    #[error("board {board}: {user}@{host} refused authentication (tried: {tried}). Add your key to the board's ~/.ssh/authorized_keys, load it into ssh-agent, or set `identity` for the board")]
    AuthRefused {
        board: String,
        user: String,
        host: String,
        tried: String,
    },
    #[error("board {board}: host key of {host} is unknown ({fingerprint}){other_types}. Check it on the board (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), then pass --accept-new-host-key to trust and record it, or add it to ~/.ssh/known_hosts")]
    UnknownHostKey {
        board: String,
        host: String,
        fingerprint: String,
        /// ` (known_hosts has only an ecdsa-sha2-nistp256 key for it)` or empty.
        other_types: String,
    },
    #[error("board {board}: HOST KEY OF {host} HAS CHANGED ({fingerprint}; {known_hosts} line {line} has another), refusing to connect: someone may be intercepting, or the board was reinstalled. If you know why, remove the old key with: ssh-keygen -R '{host}' -f {known_hosts}")]
    ChangedHostKey {
        board: String,
        host: String,
        fingerprint: String,
        known_hosts: String,
        line: usize,
    },
    #[error("board {board}: host key of {host} ({fingerprint}) is REVOKED ({known_hosts} line {line}), refusing to connect. Give the board a new host key, or remove the @revoked line if it is wrong")]
    RevokedHostKey {
        board: String,
        host: String,
        fingerprint: String,
        known_hosts: String,
        line: usize,
    },
    #[error("board {board}: {known_hosts} line {line} trusts a certificate authority for {host}, but quantbench checks plain host keys only. Add the board's own key (ssh-keyscan -p PORT HOST) to known_hosts, or pass --accept-new-host-key")]
    HostCertificateOnly {
        board: String,
        host: String,
        known_hosts: String,
        line: usize,
    },
    #[error("board {board}: its sshd serves no SFTP, which quantbench uploads and reads files with. Enable it in the board's /etc/ssh/sshd_config (`Subsystem sftp internal-sftp`, or the path of sftp-server) and restart sshd")]
    NoSftp { board: String },
    #[error("board {board}: identity {path} is protected by a passphrase, which quantbench cannot ask for: load it into ssh-agent (ssh-add {path}) and run again")]
    EncryptedIdentity { board: String, path: String },
    #[error("board {board}: disk full under {path} ({detail}); free space on the board or set a `work_dir` on a larger filesystem")]
    DiskFull {
        board: String,
        path: String,
        detail: String,
    },
    #[error("board {board}: {path} is larger than {limit} bytes, more than such a file can hold: not read (is something else writing there?)")]
    TooLarge {
        board: String,
        path: String,
        limit: u64,
    },
    #[error("board {board}: `{command}` exited with {status}: {stderr}")]
    Remote {
        board: String,
        command: String,
        status: i32,
        stderr: String,
    },
    #[error("board {board}: {step}: {source}")]
    Ssh {
        board: String,
        step: String,
        source: ssh2::Error,
    },
    #[error("board {board}: {step}: {source}")]
    Io {
        board: String,
        step: String,
        source: std::io::Error,
    },
}

/// Part of a board's file, as [`Connection::read_window`] reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct FileWindow {
    /// The file's size when it was opened.
    pub size: u64,
    /// The bytes just before the offset asked for.
    pub before: Vec<u8>,
    /// The bytes from the offset on (at most the `max` asked for).
    pub bytes: Vec<u8>,
}

/// The most of a command's stdout (and of its stderr) kept in memory; a
/// board that prints more has the rest cut, and says so.
pub const MAX_COMMAND_OUTPUT: usize = 1 << 20;
/// What is read and thrown away past the limit so the command can end;
/// past this the channel is closed on it.
const MAX_COMMAND_DRAIN: u64 = 64 << 20;

/// Reads at most `limit` bytes of `reader` as text; what follows is read
/// and dropped (up to `MAX_COMMAND_DRAIN`, so a command that prints forever
/// cannot hold the host) and replaced by one line saying how much was cut.
fn read_bounded(reader: &mut dyn Read, limit: usize) -> std::io::Result<String> {
    let mut kept = Vec::new();
    reader.take(limit as u64).read_to_end(&mut kept)?;
    let cut = std::io::copy(&mut reader.take(MAX_COMMAND_DRAIN), &mut std::io::sink())?;
    let mut text = String::from_utf8_lossy(&kept).into_owned();
    if cut > 0 {
        let more = if cut >= MAX_COMMAND_DRAIN {
            " or more"
        } else {
            ""
        };
        text.push_str(&format!(
            "\n[quantbench: {cut}{more} further bytes of this board's output cut; output is kept up to {} MiB]\n",
            limit >> 20
        ));
    }
    Ok(text)
}

impl TransportError {
    /// Errors worth a reconnect (the network), as opposed to a refusal.
    pub fn is_connection_loss(&self) -> bool {
        match self {
            TransportError::Unreachable { .. } | TransportError::Io { .. } => true,
            TransportError::Ssh { source, .. } => matches!(
                source.code(),
                ssh2::ErrorCode::Session(-7) // LIBSSH2_ERROR_SOCKET_SEND
                    | ssh2::ErrorCode::Session(-43) // SOCKET_RECV
                    | ssh2::ErrorCode::Session(-13) // SOCKET_DISCONNECT
                    | ssh2::ErrorCode::Session(-9) // TIMEOUT
                    | ssh2::ErrorCode::Session(-37) // EAGAIN
            ),
            _ => false,
        }
    }
}

/// Where and how to reach one board over SSH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshEndpoint {
    pub board: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Private keys to try after ssh-agent, in order.
    pub identities: Vec<PathBuf>,
    /// known_hosts files to check the host key against.
    pub known_hosts: Vec<PathBuf>,
    /// Trust an unknown (never a changed) host key and record it.
    pub accept_new_host_key: bool,
}

impl SshEndpoint {
    /// Where an accepted key is recorded: the board's own known_hosts file
    /// when it has one (listed last), else the user's.
    pub fn pin_file(&self) -> PathBuf {
        self.known_hosts
            .last()
            .cloned()
            .unwrap_or_else(|| PathBuf::from("known_hosts"))
    }
}

pub struct Connection {
    session: Session,
    pub endpoint: SshEndpoint,
    /// One SFTP channel for the connection's life: opening one costs
    /// several round trips, which a far board pays on every poll otherwise.
    sftp: std::cell::OnceCell<ssh2::Sftp>,
}

pub struct ExecOutput {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Connection {
    pub fn open(endpoint: &SshEndpoint) -> Result<Connection, TransportError> {
        let board = endpoint.board.clone();
        let address = format!("{}:{}", endpoint.host, endpoint.port);
        let unreachable = |reason: String| TransportError::Unreachable {
            board: board.clone(),
            address: address.clone(),
            reason,
        };
        let socket_addr = address
            .to_socket_addrs()
            .map_err(|e| unreachable(format!("cannot resolve: {e}")))?
            .next()
            .ok_or_else(|| unreachable("name resolves to no address".into()))?;
        let tcp = TcpStream::connect_timeout(&socket_addr, CONNECT_TIMEOUT)
            .map_err(|e| unreachable(e.to_string()))?;
        let ssh = |step: &str| {
            let board = board.clone();
            let step = step.to_string();
            move |source| TransportError::Ssh {
                board,
                step,
                source,
            }
        };
        let mut session = Session::new().map_err(ssh("creating an SSH session"))?;
        session.set_tcp_stream(tcp);
        session.set_timeout(IO_TIMEOUT_MS);
        session
            .handshake()
            .map_err(|e| unreachable(format!("SSH handshake failed: {e}")))?;
        check_host_key(&session, endpoint)?;
        authenticate(&session, endpoint)?;
        Ok(Connection {
            session,
            endpoint: endpoint.clone(),
            sftp: std::cell::OnceCell::new(),
        })
    }

    /// An SFTP channel; a board whose sshd serves none is told how to
    /// enable it instead of libssh2's `Unable to request SFTP subsystem`.
    fn sftp(&self) -> Result<&ssh2::Sftp, TransportError> {
        if let Some(sftp) = self.sftp.get() {
            return Ok(sftp);
        }
        let sftp = self.session.sftp().map_err(|source| {
            if source.message().contains("SFTP subsystem") {
                TransportError::NoSftp {
                    board: self.endpoint.board.clone(),
                }
            } else {
                self.ssh_err("starting SFTP")(source)
            }
        })?;
        Ok(self.sftp.get_or_init(|| sftp))
    }

    fn ssh_err(&self, step: &str) -> impl Fn(ssh2::Error) -> TransportError + '_ {
        let step = step.to_string();
        move |source| TransportError::Ssh {
            board: self.endpoint.board.clone(),
            step: step.clone(),
            source,
        }
    }

    fn io_err(&self, step: &str) -> impl Fn(std::io::Error) -> TransportError + '_ {
        let step = step.to_string();
        move |source| TransportError::Io {
            board: self.endpoint.board.clone(),
            step: step.clone(),
            source,
        }
    }

    /// Runs a shell command line (already built from quoted values).
    pub fn exec(&self, command: &str) -> Result<ExecOutput, TransportError> {
        let mut channel = self
            .session
            .channel_session()
            .map_err(self.ssh_err("opening a channel"))?;
        channel
            .exec(command)
            .map_err(self.ssh_err("starting a command"))?;
        let stdout = read_bounded(&mut channel, MAX_COMMAND_OUTPUT)
            .map_err(self.io_err("reading command output"))?;
        let stderr = read_bounded(&mut channel.stderr(), MAX_COMMAND_OUTPUT)
            .map_err(self.io_err("reading command errors"))?;
        channel
            .wait_close()
            .map_err(self.ssh_err("closing a channel"))?;
        let status = channel
            .exit_status()
            .map_err(self.ssh_err("reading an exit status"))?;
        Ok(ExecOutput {
            status,
            stdout,
            stderr,
        })
    }

    /// Runs a command and fails with its stderr when it exits non-zero.
    pub fn exec_ok(&self, command: &str) -> Result<String, TransportError> {
        let out = self.exec(command)?;
        if out.status != 0 {
            return Err(TransportError::Remote {
                board: self.endpoint.board.clone(),
                command: command.to_string(),
                status: out.status,
                stderr: out.stderr.trim().to_string(),
            });
        }
        Ok(out.stdout)
    }

    pub fn exists(&self, remote: &str) -> Result<bool, TransportError> {
        let sftp = self.sftp()?;
        Ok(sftp.stat(Path::new(remote)).is_ok())
    }

    /// Uploads `local` to `remote` through a temporary name and a rename, so
    /// the final name never holds a partial file. `on_bytes` gets the running
    /// byte count. Returns the bytes sent.
    pub fn upload(
        &self,
        local: &Path,
        remote: &str,
        mode: i32,
        on_bytes: &mut dyn FnMut(u64),
    ) -> Result<u64, TransportError> {
        let sftp = self.sftp()?;
        let temp = format!("{remote}.part-{}", std::process::id());
        let mut source =
            std::fs::File::open(local).map_err(self.io_err("opening the local file"))?;
        let total = source.metadata().map(|m| m.len()).unwrap_or(0);
        // Refuse before sending a byte when the board cannot hold the file.
        let dir = remote.rsplit_once('/').map(|(d, _)| d).unwrap_or(".");
        if let Some(free) = self.free_bytes(dir) {
            if free < total + UPLOAD_MARGIN_BYTES {
                return Err(TransportError::DiskFull {
                    board: self.endpoint.board.clone(),
                    path: dir.to_string(),
                    detail: format!(
                        "{:.1} MB free, {} needs {:.1} MB",
                        free as f64 / 1e6,
                        local.display(),
                        total as f64 / 1e6
                    ),
                });
            }
        }
        let result = (|| -> Result<u64, TransportError> {
            let mut dest = sftp
                .create(Path::new(&temp))
                .map_err(self.ssh_err(&format!("creating {temp}")))?;
            let mut buffer = vec![0u8; 256 * 1024];
            let mut sent = 0u64;
            loop {
                let n = source
                    .read(&mut buffer)
                    .map_err(self.io_err("reading the local file"))?;
                if n == 0 {
                    break;
                }
                dest.write_all(&buffer[..n]).map_err(|e| {
                    self.disk_full_or(&temp, total, self.io_err(&format!("writing {temp}"))(e))
                })?;
                sent += n as u64;
                on_bytes(sent);
            }
            dest.fsync().ok();
            drop(dest);
            sftp.setstat(
                Path::new(&temp),
                ssh2::FileStat {
                    size: None,
                    uid: None,
                    gid: None,
                    perm: Some(mode as u32),
                    atime: None,
                    mtime: None,
                },
            )
            .map_err(self.ssh_err("setting permissions"))?;
            sftp.rename(
                Path::new(&temp),
                Path::new(remote),
                Some(
                    ssh2::RenameFlags::OVERWRITE
                        | ssh2::RenameFlags::ATOMIC
                        | ssh2::RenameFlags::NATIVE,
                ),
            )
            .map_err(self.ssh_err(&format!("renaming {temp} to {remote}")))?;
            Ok(sent)
        })();
        if result.is_err() {
            let _ = sftp.unlink(Path::new(&temp));
        }
        result
    }

    /// Free bytes for this user on the filesystem holding `dir` (`df`),
    /// or `None` when the board cannot say.
    pub fn free_bytes(&self, dir: &str) -> Option<u64> {
        let out = self.exec(&format!("df -Pk {}", shell_quote(dir))).ok()?;
        wire::probe::df_free_bytes(&out.stdout)
    }

    /// A failed write on the board is reported as a full disk when `df`
    /// agrees, since SFTP servers often report it as a generic failure.
    fn disk_full_or(&self, path: &str, needed: u64, other: TransportError) -> TransportError {
        let dir = path.rsplit_once('/').map(|(d, _)| d).unwrap_or(".");
        match self.free_bytes(dir) {
            Some(free) if free < needed.max(1) || free < 64 * 1024 => TransportError::DiskFull {
                board: self.endpoint.board.clone(),
                path: dir.to_string(),
                detail: format!("{} KiB free, {needed} bytes needed", free / 1024),
            },
            _ => other,
        }
    }

    /// Downloads a small file (a board's description), refusing one larger
    /// than `limit` bytes: a board's file is never trusted to fit memory.
    pub fn download(&self, remote: &str, local: &Path, limit: u64) -> Result<(), TransportError> {
        let sftp = self.sftp()?;
        let source = sftp
            .open(Path::new(remote))
            .map_err(self.ssh_err(&format!("opening {remote}")))?;
        let mut bytes = Vec::new();
        source
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(self.io_err(&format!("reading {remote}")))?;
        if bytes.len() as u64 > limit {
            return Err(TransportError::TooLarge {
                board: self.endpoint.board.clone(),
                path: remote.to_string(),
                limit,
            });
        }
        std::fs::write(local, bytes).map_err(self.io_err(&format!("writing {}", local.display())))
    }

    /// What `remote` holds around `offset`, for following a growing file:
    /// its size, the `back` bytes just before `offset` (which the follower
    /// already has, to check they are still there) and at most `max`
    /// bytes from `offset` on. `None` when the file does not exist.
    pub fn read_window(
        &self,
        remote: &str,
        offset: u64,
        back: u64,
        max: u64,
    ) -> Result<Option<FileWindow>, TransportError> {
        let sftp = self.sftp()?;
        let mut file = match sftp.open(Path::new(remote)) {
            Ok(f) => f,
            Err(_) => return Ok(None),
        };
        let size = file
            .stat()
            .map_err(self.ssh_err(&format!("reading the size of {remote}")))?
            .size
            .unwrap_or(0);
        if size < offset {
            return Ok(Some(FileWindow {
                size,
                before: Vec::new(),
                bytes: Vec::new(),
            }));
        }
        let back = back.min(offset);
        file.seek(SeekFrom::Start(offset - back))
            .map_err(self.io_err("seeking"))?;
        let mut bytes = Vec::new();
        (&mut file)
            .take(back + max)
            .read_to_end(&mut bytes)
            .map_err(self.io_err(&format!("reading {remote}")))?;
        let split = (back as usize).min(bytes.len());
        let after = bytes.split_off(split);
        Ok(Some(FileWindow {
            size,
            before: bytes,
            bytes: after,
        }))
    }

    pub fn write_file(&self, remote: &str, contents: &[u8]) -> Result<(), TransportError> {
        let sftp = self.sftp()?;
        let mut file = sftp
            .create(Path::new(remote))
            .map_err(self.ssh_err(&format!("creating {remote}")))?;
        file.write_all(contents).map_err(|e| {
            self.disk_full_or(
                remote,
                contents.len() as u64,
                self.io_err(&format!("writing {remote}"))(e),
            )
        })
    }
}

fn check_host_key(session: &Session, endpoint: &SshEndpoint) -> Result<(), TransportError> {
    let (key, _) = session
        .host_key()
        .ok_or_else(|| TransportError::Unreachable {
            board: endpoint.board.clone(),
            address: endpoint.host.clone(),
            reason: "the server sent no host key".into(),
        })?;
    let key_type = known_hosts::blob_key_type(key).unwrap_or_else(|| "unknown".into());
    let fingerprint = session
        .host_key_hash(HashType::Sha256)
        .map(|h| format!("SHA256:{}", known_hosts::base64_no_pad(h)))
        .unwrap_or_else(|| "unknown fingerprint".into());
    let name = known_hosts::host_name(&endpoint.host, endpoint.port);
    let mut files = endpoint.known_hosts.clone();
    files.push(PathBuf::from(SYSTEM_KNOWN_HOSTS));
    let (keys, bad_lines) = known_hosts::read_files(&files);
    for bad in &bad_lines {
        eprintln!(
            "warning: {}:{}: not a known_hosts entry ({}); skipped, later lines still count",
            bad.file.display(),
            bad.line,
            bad.reason
        );
    }
    let board = endpoint.board.clone();
    match known_hosts::verdict(&keys, &name, &key_type, key) {
        Verdict::Match => Ok(()),
        Verdict::Revoked { file, line } => Err(TransportError::RevokedHostKey {
            board,
            host: name,
            fingerprint,
            known_hosts: file.display().to_string(),
            line,
        }),
        Verdict::Changed { file, line } => Err(TransportError::ChangedHostKey {
            board,
            host: name,
            fingerprint,
            known_hosts: file.display().to_string(),
            line,
        }),
        Verdict::CertificatesOnly { .. } | Verdict::Unknown { .. }
            if endpoint.accept_new_host_key =>
        {
            // As StrictHostKeyChecking=accept-new: recorded, so a reconnect
            // or a later run must present this same key.
            let pin = endpoint.pin_file();
            known_hosts::append(&pin, &name, &key_type, key).map_err(|source| {
                TransportError::Io {
                    board: board.clone(),
                    step: format!("recording the host key in {}", pin.display()),
                    source,
                }
            })?;
            eprintln!(
                "board {board}: unknown host key {fingerprint} accepted and recorded in {} (--accept-new-host-key); from now on {name} must present this key",
                pin.display()
            );
            Ok(())
        }
        Verdict::CertificatesOnly { file, line } => Err(TransportError::HostCertificateOnly {
            board,
            host: name,
            known_hosts: file.display().to_string(),
            line,
        }),
        Verdict::Unknown { other_types } => Err(TransportError::UnknownHostKey {
            board,
            host: name,
            fingerprint,
            other_types: if other_types.is_empty() {
                String::new()
            } else {
                format!(
                    " (known_hosts has only a {} key for it, no {key_type} key)",
                    other_types.join(", ")
                )
            },
        }),
    }
}

/// Room left beside an upload, so a file that just fits does not leave a
/// board with no space for its rows.
const UPLOAD_MARGIN_BYTES: u64 = 16 << 20;

/// Read besides the user's and the board's files, as OpenSSH does.
const SYSTEM_KNOWN_HOSTS: &str = "/etc/ssh/ssh_known_hosts";

fn authenticate(session: &Session, endpoint: &SshEndpoint) -> Result<(), TransportError> {
    let mut tried = Vec::new();
    if std::env::var_os("SSH_AUTH_SOCK").is_some() {
        // Every key the agent holds, not only its first.
        if let Ok(mut agent) = session.agent() {
            if agent.connect().is_ok() && agent.list_identities().is_ok() {
                for identity in agent.identities().unwrap_or_default() {
                    tried.push(format!("ssh-agent key {}", identity.comment()));
                    if agent.userauth(&endpoint.user, &identity).is_ok() && session.authenticated()
                    {
                        return Ok(());
                    }
                }
            }
        }
        if tried.is_empty() {
            tried.push("ssh-agent (no keys)".to_string());
        }
    }
    let mut encrypted = None;
    for identity in &endpoint.identities {
        if !identity.exists() {
            continue;
        }
        if is_passphrase_protected(identity) {
            tried.push(format!("{} (passphrase-protected)", identity.display()));
            encrypted.get_or_insert_with(|| identity.display().to_string());
            continue;
        }
        tried.push(identity.display().to_string());
        if session
            .userauth_pubkey_file(&endpoint.user, None, identity, None)
            .is_ok()
            && session.authenticated()
        {
            return Ok(());
        }
    }
    if let Some(path) = encrypted {
        return Err(TransportError::EncryptedIdentity {
            board: endpoint.board.clone(),
            path,
        });
    }
    Err(TransportError::AuthRefused {
        board: endpoint.board.clone(),
        user: endpoint.user.clone(),
        host: endpoint.host.clone(),
        tried: if tried.is_empty() {
            "no ssh-agent and no identity file found".into()
        } else {
            tried.join(", ")
        },
    })
}

/// Whether a private key file needs a passphrase: PEM's `ENCRYPTED` headers,
/// or an OpenSSH key whose cipher is not `none`.
fn is_passphrase_protected(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    if text.contains("ENCRYPTED") {
        return true;
    }
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    let Some(blob) = known_hosts::base64_decode(&body) else {
        return false;
    };
    let Some(rest) = blob.strip_prefix(b"openssh-key-v1\0") else {
        return false;
    };
    known_hosts::blob_key_type(rest).is_some_and(|cipher| cipher != "none")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passphrase_protected_keys_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("pem");
        std::fs::write(
            &pem,
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nabc\n",
        )
        .unwrap();
        assert!(is_passphrase_protected(&pem));
        let encode = |cipher: &str| {
            let mut blob = b"openssh-key-v1\0".to_vec();
            blob.extend((cipher.len() as u32).to_be_bytes());
            blob.extend(cipher.as_bytes());
            format!(
                "-----BEGIN OPENSSH PRIVATE KEY-----\n{}\n-----END OPENSSH PRIVATE KEY-----\n",
                known_hosts::base64_encode(&blob)
            )
        };
        let locked = dir.path().join("locked");
        std::fs::write(&locked, encode("aes256-ctr")).unwrap();
        assert!(is_passphrase_protected(&locked));
        let open = dir.path().join("open");
        std::fs::write(&open, encode("none")).unwrap();
        assert!(!is_passphrase_protected(&open));
    }
}
