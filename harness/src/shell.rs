//! Quoting for remote command lines: every value that reaches a board's
//! shell is validated where it enters (config) and quoted where it is used.

/// Quotes one value for a POSIX shell. Values are also validated against a
/// conservative character set where they come from config (board names,
/// paths), so quoting is the second line of defence, not the only one.
pub fn shell_quote(value: &str) -> String {
    if !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/=:,+@".contains(c))
    {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\'', "'\\''"))
    }
}

/// True for values safe to use unquoted in names and paths.
pub fn is_safe_value(value: &str) -> bool {
    !value.is_empty()
        && !value.starts_with('-')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/~@:+=,".contains(c))
}

/// A path on a board as one shell word: relative paths (work dirs are
/// relative to the login's home) are anchored at `$HOME`, since commands
/// may run elsewhere.
pub fn board_path(path: &str) -> String {
    if path.starts_with('/') {
        shell_quote(path)
    } else {
        format!("\"$HOME\"/{}", shell_quote(path))
    }
}

pub fn command_line(argv: &[&str]) -> String {
    argv.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `name` as one safe file name: letters, digits, `.`, `-` and `_` kept,
/// anything else `_` (a board named `user@host:22` becomes `user_host_22`).
pub fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn board_paths_are_anchored_at_home_and_quoted() {
        assert_eq!(board_path("/srv/quant bench"), "'/srv/quant bench'");
        assert_eq!(board_path("lab dir"), "\"$HOME\"/'lab dir'");
    }

    #[test]
    fn shell_quote_neutralises_metacharacters() {
        assert_eq!(shell_quote("/home/pi/.quantbench"), "/home/pi/.quantbench");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("x; rm -rf ~"), "'x; rm -rf ~'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote("$(reboot)"), "'$(reboot)'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(command_line(&["echo", "a;b", "c"]), "echo 'a;b' c");
    }

    #[test]
    fn unsafe_values_are_recognised() {
        assert!(is_safe_value("sim1"));
        assert!(is_safe_value("/tmp/quantbench-testbed/sim1/work"));
        assert!(!is_safe_value("sim1;reboot"));
        assert!(!is_safe_value("$(id)"));
        assert!(!is_safe_value("a b"));
        assert!(!is_safe_value("-oProxyCommand=x"));
        assert!(!is_safe_value("`id`"));
    }
}
