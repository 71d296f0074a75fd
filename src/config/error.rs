//! Configuration errors in the operator's words: every message starts with the key as it
//! is written in the file (`rules[0].action`), says what is wrong with the value, and
//! lists the accepted values when there is a fixed set.
//!
//! ```text
//! rules[0].action: unknown value "alow", expected one of: allow, deny, report
//! server.listne: unknown key, expected one of: listen, admin_listen, ...
//! timeouts.connect: invalid value "ten seconds", expected a duration
//! /etc/kalmar/kalmar.toml:3:8: TOML syntax error: unclosed table, expected `]`
//! ```
//! The `config` crate's own messages (``enum Action does not have variant constructor
//! alow for key `rules[0]action` ``) are taken apart here; the key comes from
//! `serde_path_to_error`, which tracks it while the configuration is deserialized.

use std::path::PathBuf;

/// A configuration that could not be loaded; the message names the key and the value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    #[error("{origin}:{line}:{column}: TOML syntax error: {message}")]
    Syntax {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("config file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Anything else the loader reports (not expected with TOML and the environment).
    #[error("{0}")]
    Load(#[from] config::ConfigError),
}

// === impl ConfigError ===

impl ConfigError {
    /// `key` has a value that cannot be used: the one constructor for that error.
    pub fn invalid(key: impl Into<String>, message: impl std::fmt::Display) -> ConfigError {
        ConfigError::Invalid {
            key: key.into(),
            message: message.to_string(),
        }
    }

    /// A failure of `build()` (reading the sources): a TOML syntax error in `text`,
    /// which came from `origin`, gets its line and column.
    pub(super) fn from_build(err: config::ConfigError, origin: &str, text: &str) -> ConfigError {
        let config::ConfigError::FileParse { cause, .. } = &err else {
            return ConfigError::Load(err);
        };
        let Some(toml) = cause.downcast_ref::<toml::de::Error>() else {
            return ConfigError::Load(err);
        };
        let (line, column) = match toml.span() {
            Some(span) => line_column(text, span.start),
            None => (1, 1),
        };
        ConfigError::Syntax {
            origin: origin.to_owned(),
            line,
            column,
            message: toml.message().trim().to_owned(),
        }
    }

    /// A failure of deserializing `merged` (every source, layered) into `T`, the typed
    /// configuration.
    pub(super) fn from_deserialize<T: serde::de::DeserializeOwned>(
        err: serde_path_to_error::Error<config::ConfigError>,
        merged: &config::Config,
    ) -> ConfigError {
        let key = match err.path().to_string() {
            root if root == "." => String::new(),
            key => key,
        };
        let mut inner = err.into_inner();
        while let config::ConfigError::At { error, .. } = inner {
            inner = *error;
        }
        match inner {
            config::ConfigError::Type {
                unexpected,
                expected,
                origin,
                ..
            } => {
                let from = origin.map(|o| format!(" (from {o})")).unwrap_or_default();
                keyed(
                    key,
                    format!("invalid type: {unexpected}, expected {expected}{from}"),
                )
            }
            config::ConfigError::NotFound(field) => {
                let field = field.rsplit('.').next().unwrap_or(&field).to_owned();
                keyed(join(&key, &field), "missing key".into())
            }
            config::ConfigError::Message(message) => {
                if let Some(value) = message
                    .strip_prefix("enum ")
                    .and_then(|rest| rest.split_once(" does not have variant constructor "))
                    .map(|(_, value)| value.to_owned())
                {
                    let serde = serde_message::<T>(merged, &key).unwrap_or_default();
                    return match reword(&key, &serde) {
                        Some(found) if serde.starts_with("unknown variant") => found,
                        _ => keyed(key, format!("unknown value {value:?}")),
                    };
                }
                if let Some(reworded) = reword(&key, &message) {
                    return reworded;
                }
                // A foreign leaf type's parse error names nothing ("invalid socket
                // address syntax"): add the value. Kalmar's own messages name the value
                // already, with credentials as `***`, so they are left alone.
                let names_nothing = !message.contains([':', '"', '`']);
                match merged.get_string(&key) {
                    Ok(value) if names_nothing => keyed(key, format!("{value:?}: {message}")),
                    _ => keyed(key, message),
                }
            }
            other => keyed(key, other.to_string()),
        }
    }
}

/// The `config` crate names no accepted values for an enum; serde does, when the same
/// merged values are read from plain JSON. Its message counts only when it is about the
/// same key (JSON is stricter about numbers in strings, so it may stop elsewhere first).
fn serde_message<T: serde::de::DeserializeOwned>(
    merged: &config::Config,
    key: &str,
) -> Option<String> {
    let json: serde_json::Value = merged.clone().try_deserialize().ok()?;
    match serde_path_to_error::deserialize::<_, T>(&json) {
        Err(e) if e.path().to_string() == key => Some(e.into_inner().to_string()),
        _ => None,
    }
}

/// serde's standard messages, reworded; None when `message` is none of them.
fn reword(key: &str, message: &str) -> Option<ConfigError> {
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        let (value, expected) = rest.split_once(", expected ")?;
        let value = value.trim_matches('`');
        return Some(keyed(
            key.to_owned(),
            format!("unknown value {value:?}, {}", one_of(expected)),
        ));
    }
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let (field, expected) = rest.split_once(", expected ").or_else(|| {
            rest.split_once(", there are no fields")
                .map(|(f, _)| (f, ""))
        })?;
        let field = field.trim_matches('`');
        // serde_path_to_error already ends the path with the unknown key.
        let at = if key == field || key.ends_with(&format!(".{field}")) {
            key.to_owned()
        } else {
            join(key, field)
        };
        return Some(keyed(at, format!("unknown key, {}", one_of(expected))));
    }
    if let Some(rest) = message.strip_prefix("invalid value: ") {
        let rest = rest.strip_prefix("string ").unwrap_or(rest);
        return Some(keyed(key.to_owned(), format!("invalid value {rest}")));
    }
    None
}

/// serde's list of names (`` `a` ``, `` `a` or `b` ``, `` one of `a`, `b`, `c` ``) as
/// "expected one of: a, b, c".
fn one_of(expected: &str) -> String {
    let names: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    if names.is_empty() {
        "no value is accepted here".into()
    } else {
        format!("expected one of: {}", names.join(", "))
    }
}

fn keyed(key: String, message: String) -> ConfigError {
    if key.is_empty() {
        ConfigError::invalid("configuration", message)
    } else {
        ConfigError::Invalid { key, message }
    }
}

fn join(key: &str, field: &str) -> String {
    if key.is_empty() {
        field.to_owned()
    } else {
        format!("{key}.{field}")
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn messages_name_the_key_and_the_accepted_values() {
        let table = [
            (
                "[[rules]]\nname = \"a\"\naction = \"alow\"",
                "rules[0].action: unknown value \"alow\", expected one of: allow, deny, report",
            ),
            (
                "[proxy]\nx_forwarded_for = \"yes\"",
                "proxy.x_forwarded_for: unknown value \"yes\", expected one of: off, on, delete",
            ),
            (
                "nonsense = 1",
                "nonsense: unknown key, expected one of: server, timeouts,",
            ),
            (
                "[tunnel]\nrelay = \"zero-copy\"",
                "tunnel.relay: unknown value \"zero-copy\", expected one of: copy, splice",
            ),
            (
                "[tunnel]\nbuffer = \"1KiB\"",
                "tunnel.buffer: 1.0 KiB: must be between 4 KiB and 4 MiB",
            ),
            (
                "[server]\nworkers = \"four\"",
                "server.workers: invalid type: string \"four\", expected an integer",
            ),
            (
                "[server]\nlisten = 5",
                "server.listen: \"5\": invalid socket address syntax",
            ),
            (
                "[server]\n\n  listen = = 1",
                "the given TOML:3:12: TOML syntax error:",
            ),
        ];
        for (toml, want) in table {
            let err = Config::from_toml(toml).expect_err(toml).to_string();
            assert!(
                err.starts_with(want),
                "{toml}:\n  got  {err}\n  want {want}"
            );
        }
    }

    #[test]
    fn environment_values_say_where_they_came_from() {
        let env = [("KALMAR_SERVER__MAX_CONNECTIONS".into(), "many".into())];
        let err = Config::load_with_env(None, env).unwrap_err().to_string();
        assert_eq!(
            err,
            "server.max_connections: invalid type: string \"many\", expected an integer \
             (from the environment)"
        );
    }

    #[test]
    fn serde_name_lists() {
        assert_eq!(one_of("`a`"), "expected one of: a");
        assert_eq!(one_of("`a` or `b`"), "expected one of: a, b");
        assert_eq!(one_of("one of `a`, `b`, `c`"), "expected one of: a, b, c");
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
        assert_eq!(line_column("", 0), (1, 1));
    }
}
