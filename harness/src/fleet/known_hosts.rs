//! Host keys as OpenSSH checks them: known_hosts files read line by line,
//! plain and hashed host patterns, `[host]:port`, wildcards and negation,
//! `@revoked` and `@cert-authority` markers, keys matched by type.
//!
//! libssh2's own check stops at the first line it cannot parse (silently
//! dropping every later entry), ignores markers and reports a stored key of
//! another type as a changed key. A board a lab reinstalls, or whose sshd
//! gained an ed25519 key, deserves the answer OpenSSH would give.

use hmac::{Hmac, Mac};
use sha1::Sha1;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One usable line of a known_hosts file.
#[derive(Debug, Clone, PartialEq)]
pub struct KnownKey {
    pub marker: Marker,
    patterns: String,
    pub key_type: String,
    pub key: Vec<u8>,
    pub file: PathBuf,
    pub line: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    None,
    Revoked,
    CertAuthority,
}

/// A line that is not a known_hosts entry: reported, then skipped, so it
/// hides no later entry.
#[derive(Debug, Clone, PartialEq)]
pub struct BadLine {
    pub file: PathBuf,
    pub line: usize,
    pub reason: String,
}

/// Every entry of `files` that exist, in order, and the lines that are not
/// entries.
pub fn read_files(files: &[PathBuf]) -> (Vec<KnownKey>, Vec<BadLine>) {
    let mut keys = Vec::new();
    let mut bad = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        let (k, b) = parse_text(&text, file);
        keys.extend(k);
        bad.extend(b);
    }
    (keys, bad)
}

/// The entries of one known_hosts file's `text`, and the lines that are not.
pub fn parse_text(text: &str, file: &Path) -> (Vec<KnownKey>, Vec<BadLine>) {
    let mut keys = Vec::new();
    let mut bad = Vec::new();
    for (index, line) in text.lines().enumerate() {
        match parse_line(line) {
            Ok(Some((marker, patterns, key_type, key))) => keys.push(KnownKey {
                marker,
                patterns,
                key_type,
                key,
                file: file.to_path_buf(),
                line: index + 1,
            }),
            Ok(None) => {}
            Err(reason) => bad.push(BadLine {
                file: file.to_path_buf(),
                line: index + 1,
                reason,
            }),
        }
    }
    (keys, bad)
}

type Parsed = (Marker, String, String, Vec<u8>);

fn parse_line(line: &str) -> Result<Option<Parsed>, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let mut fields = line.split_whitespace();
    let mut first = fields.next().unwrap_or("");
    let marker = match first {
        "@revoked" => Marker::Revoked,
        "@cert-authority" => Marker::CertAuthority,
        other if other.starts_with('@') => return Err(format!("unknown marker {other}")),
        _ => Marker::None,
    };
    if marker != Marker::None {
        first = fields.next().ok_or("no host patterns after the marker")?;
    }
    let key_type = fields.next().ok_or("no key type")?;
    let key = fields.next().ok_or("no key")?;
    let key = base64_decode(key).ok_or("the key is not base64")?;
    // What OpenSSH checks too: the blob must be a key of the named type.
    if blob_key_type(&key).as_deref() != Some(key_type) {
        return Err(format!("the key is not a {key_type} key"));
    }
    Ok(Some((marker, first.to_string(), key_type.to_string(), key)))
}

/// `host` as known_hosts names it: plain for port 22, else `[host]:port`.
pub fn host_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

impl KnownKey {
    /// Whether this line's host patterns name `host_name` (OpenSSH's
    /// `match_hostname`: a negated match anywhere wins).
    pub fn names(&self, host_name: &str) -> bool {
        if let Some(hashed) = self.patterns.strip_prefix("|1|") {
            return hashed_matches(hashed, host_name);
        }
        let mut matched = false;
        for pattern in self.patterns.split(',') {
            let (negated, pattern) = match pattern.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, pattern),
            };
            if wildcard_match(&pattern.to_lowercase(), &host_name.to_lowercase()) {
                if negated {
                    return false;
                }
                matched = true;
            }
        }
        matched
    }
}

fn hashed_matches(hashed: &str, host_name: &str) -> bool {
    let Some((salt, hash)) = hashed.split_once('|') else {
        return false;
    };
    let (Some(salt), Some(hash)) = (base64_decode(salt), base64_decode(hash)) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(&salt) else {
        return false;
    };
    mac.update(host_name.as_bytes());
    mac.verify_slice(&hash).is_ok()
}

fn wildcard_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    fn go(p: &[char], t: &[char]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some('*') => (0..=t.len()).any(|skip| go(&p[1..], &t[skip..])),
            Some('?') => !t.is_empty() && go(&p[1..], &t[1..]),
            Some(c) => t.first() == Some(c) && go(&p[1..], &t[1..]),
        }
    }
    go(&p, &t)
}

/// What the known keys say of the key a server presented.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Match,
    /// The key is listed as `@revoked`.
    Revoked {
        file: PathBuf,
        line: usize,
    },
    /// A key of the same type is known for this host, and it is another.
    Changed {
        file: PathBuf,
        line: usize,
    },
    /// Only `@cert-authority` lines name this host; certificates are not
    /// supported.
    CertificatesOnly {
        file: PathBuf,
        line: usize,
    },
    /// No key of this type is known for the host; `other_types` are.
    Unknown {
        other_types: Vec<String>,
    },
}

/// OpenSSH's decision for `host_name` presenting `key_type`/`key`.
pub fn verdict(keys: &[KnownKey], host_name: &str, key_type: &str, key: &[u8]) -> Verdict {
    if let Some(revoked) = keys
        .iter()
        .find(|k| k.marker == Marker::Revoked && k.key == key)
    {
        return Verdict::Revoked {
            file: revoked.file.clone(),
            line: revoked.line,
        };
    }
    let for_host: Vec<&KnownKey> = keys.iter().filter(|k| k.names(host_name)).collect();
    let plain: Vec<&&KnownKey> = for_host
        .iter()
        .filter(|k| k.marker == Marker::None)
        .collect();
    if plain.iter().any(|k| k.key_type == key_type && k.key == key) {
        return Verdict::Match;
    }
    if let Some(same_type) = plain.iter().find(|k| k.key_type == key_type) {
        return Verdict::Changed {
            file: same_type.file.clone(),
            line: same_type.line,
        };
    }
    if plain.is_empty() {
        if let Some(ca) = for_host.iter().find(|k| k.marker == Marker::CertAuthority) {
            return Verdict::CertificatesOnly {
                file: ca.file.clone(),
                line: ca.line,
            };
        }
    }
    let mut other_types: Vec<String> = plain.iter().map(|k| k.key_type.clone()).collect();
    other_types.dedup();
    Verdict::Unknown { other_types }
}

/// Appends `host_name key_type base64(key)` to `file` (creating it and its
/// folder, private to the user), as `StrictHostKeyChecking=accept-new` does.
pub fn append(file: &Path, host_name: &str, key_type: &str, key: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
        }
    }
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)?;
    let needs_newline = std::fs::read(file)
        .map(|b| !b.is_empty() && !b.ends_with(b"\n"))
        .unwrap_or(false);
    if needs_newline {
        writeln!(out)?;
    }
    writeln!(out, "{host_name} {key_type} {}", base64_encode(key))?;
    out.sync_all()
}

/// The key type a public key blob names (its first SSH string).
pub fn blob_key_type(blob: &[u8]) -> Option<String> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    let name = blob.get(4..4 + len)?;
    String::from_utf8(name.to_vec()).ok()
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = base64_no_pad(bytes);
    while !out.len().is_multiple_of(4) {
        out.push('=');
    }
    out
}

/// Standard base64 without padding, as OpenSSH prints fingerprints.
pub fn base64_no_pad(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buffer = 0u32;
    let mut bits = 0;
    for c in text.trim_end_matches('=').bytes() {
        let value = ALPHABET.iter().position(|&a| a == c)? as u32;
        buffer = buffer << 6 | value;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED_A: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIGsvUhxTI0/8sNgWUKDUdhl4Ow+BYTTH/i2SOpxiVpN4";
    const ED_B: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIBNBc1HJaRKUxFjQT9MvlVSVsBjgzL8O3C6yJLuHnAoq";

    fn keys_of(text: &str) -> (Vec<KnownKey>, Vec<BadLine>) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("known_hosts");
        std::fs::write(&file, text).unwrap();
        read_files(&[file])
    }

    fn key(b64: &str) -> Vec<u8> {
        base64_decode(b64).unwrap()
    }

    #[test]
    fn base64_round_trips_and_matches_known_vectors() {
        assert_eq!(base64_no_pad(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_decode("Zm8=").unwrap(), b"fo");
        assert_eq!(base64_encode(&key(ED_A)), ED_A);
        assert_eq!(blob_key_type(&key(ED_A)).unwrap(), "ssh-ed25519");
    }

    /// A blob of `key_type` (the type string, then filler).
    fn blob_of(key_type: &str) -> String {
        let mut blob = (key_type.len() as u32).to_be_bytes().to_vec();
        blob.extend(key_type.as_bytes());
        blob.extend([7u8; 40]);
        base64_encode(&blob)
    }

    #[test]
    fn same_key_matches_other_key_of_same_type_is_changed_other_type_is_unknown() {
        let ecdsa = blob_of("ecdsa-sha2-nistp256");
        let (keys, bad) = keys_of(&format!(
            "board.lab ecdsa-sha2-nistp256 {ecdsa}\n[10.0.0.5]:2222 ssh-ed25519 {ED_A}\n"
        ));
        assert!(bad.is_empty());
        let port = host_name("10.0.0.5", 2222);
        assert_eq!(
            verdict(&keys, &port, "ssh-ed25519", &key(ED_A)),
            Verdict::Match
        );
        assert!(matches!(
            verdict(&keys, &port, "ssh-ed25519", &key(ED_B)),
            Verdict::Changed { line: 2, .. }
        ));
        // Port 22 is another host for known_hosts.
        assert!(matches!(
            verdict(&keys, "10.0.0.5", "ssh-ed25519", &key(ED_A)),
            Verdict::Unknown { .. }
        ));
        // An old ecdsa entry while the board offers ed25519: not "changed".
        assert_eq!(
            verdict(&keys, "board.lab", "ssh-ed25519", &key(ED_A)),
            Verdict::Unknown {
                other_types: vec!["ecdsa-sha2-nistp256".into()]
            }
        );
    }

    #[test]
    fn a_bad_line_is_reported_and_hides_no_later_entry() {
        let (keys, bad) = keys_of(&format!(
            "# comment\ngarbage-without-a-key\nthis line is not\nboard ssh-rsa {ED_A}\nboard ssh-ed25519 {ED_A}\n"
        ));
        let lines: Vec<usize> = bad.iter().map(|b| b.line).collect();
        assert_eq!(lines, vec![2, 3, 4], "{bad:?}");
        assert_eq!(
            verdict(&keys, "board", "ssh-ed25519", &key(ED_A)),
            Verdict::Match
        );
    }

    #[test]
    fn revoked_keys_are_refused_even_when_also_listed() {
        let (keys, _) = keys_of(&format!(
            "board ssh-ed25519 {ED_A}\n@revoked * ssh-ed25519 {ED_A}\n"
        ));
        assert!(matches!(
            verdict(&keys, "board", "ssh-ed25519", &key(ED_A)),
            Verdict::Revoked { line: 2, .. }
        ));
    }

    #[test]
    fn cert_authority_only_hosts_are_named_as_such() {
        let (keys, _) = keys_of(&format!("@cert-authority *.lab ssh-ed25519 {ED_B}\n"));
        assert!(matches!(
            verdict(&keys, "pi1.lab", "ssh-ed25519", &key(ED_A)),
            Verdict::CertificatesOnly { line: 1, .. }
        ));
    }

    #[test]
    fn hashed_wildcard_and_negated_patterns_match_as_in_openssh() {
        // `ssh-keygen -H` of "pi5.local": salt and HMAC-SHA1 of the name.
        let salt = b"0123456789abcdefghij";
        let mut mac = Hmac::<Sha1>::new_from_slice(salt).unwrap();
        mac.update(b"pi5.local");
        let hashed = format!(
            "|1|{}|{}",
            base64_encode(salt),
            base64_encode(&mac.finalize().into_bytes())
        );
        let (keys, bad) = keys_of(&format!(
            "{hashed} ssh-ed25519 {ED_A}\n*.lab,!gw.lab ssh-ed25519 {ED_B}\n"
        ));
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(
            verdict(&keys, "pi5.local", "ssh-ed25519", &key(ED_A)),
            Verdict::Match
        );
        assert_eq!(
            verdict(&keys, "pi7.lab", "ssh-ed25519", &key(ED_B)),
            Verdict::Match
        );
        assert!(matches!(
            verdict(&keys, "gw.lab", "ssh-ed25519", &key(ED_B)),
            Verdict::Unknown { .. }
        ));
    }

    #[test]
    fn accepted_keys_are_appended_and_then_match() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("new/.ssh/known_hosts");
        append(&file, "[10.0.0.5]:2222", "ssh-ed25519", &key(ED_A)).unwrap();
        let (keys, bad) = read_files(&[file]);
        assert!(bad.is_empty());
        assert_eq!(
            verdict(&keys, "[10.0.0.5]:2222", "ssh-ed25519", &key(ED_A)),
            Verdict::Match
        );
    }
}
