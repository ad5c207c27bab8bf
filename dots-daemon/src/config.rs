//! Shared pieces of the daemons' TOML configuration files (`agent.toml` of
//! `dots-agent`, `client.toml` of `dots-client`): loading, errors that name
//! the file, the key path (`peers[1].address`) and the bad value, relative
//! paths, prefixes, and checks on files and socket paths.
//!
//! Keys are kebab-case, every key has a default or is reported as missing,
//! and unknown keys are rejected. Relative paths in a file are taken
//! relative to the directory of that file (the `origin`), not to the working
//! directory.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::Deserialize;

/// What the origin of a configuration built in code (from flags, not a file)
/// is called in error messages.
pub const COMMAND_LINE: &str = "<command line>";

/// A configuration that cannot be used. Every variant names the file; all
/// but [`ConfigError::Read`] and [`ConfigError::Syntax`] name the key path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML.
    #[error("{}{}: {message}", file.display(), at(*line, *column))]
    Syntax {
        file: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    /// A key that does not exist, or a value of the wrong type or not among
    /// the allowed ones, found while reading the file.
    #[error("{}{}: {key}: {message}", file.display(), at(*line, None))]
    Key {
        file: PathBuf,
        key: String,
        line: Option<usize>,
        message: String,
    },
    /// A required key is absent.
    #[error("{}: {key}: missing: {message}", file.display())]
    Missing {
        file: PathBuf,
        key: String,
        message: String,
    },
    /// A value of the right type that is still wrong (semantic checks).
    #[error("{}: {key} = {value}: {message}", file.display())]
    Value {
        file: PathBuf,
        key: String,
        /// As it would be written in the file.
        value: String,
        message: String,
    },
}

impl ConfigError {
    /// The file (or [`COMMAND_LINE`]) the error is in.
    pub fn file(&self) -> &Path {
        match self {
            ConfigError::Read { file, .. }
            | ConfigError::Syntax { file, .. }
            | ConfigError::Key { file, .. }
            | ConfigError::Missing { file, .. }
            | ConfigError::Value { file, .. } => file,
        }
    }

    /// The key path, e.g. `peers[1].address`, when the error has one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Key { key, .. }
            | ConfigError::Missing { key, .. }
            | ConfigError::Value { key, .. } => Some(key),
            ConfigError::Read { .. } | ConfigError::Syntax { .. } => None,
        }
    }

    /// The 1-based line, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Syntax { line, .. } | ConfigError::Key { line, .. } => *line,
            _ => None,
        }
    }
}

fn at(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.chars().count(), |i| before[i + 1..].chars().count())
        + 1;
    (line, column)
}

/// Reads a file for `load`.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.to_path_buf(),
        source,
    })
}

/// Deserializes `text` into `T`, turning serde's errors into
/// [`ConfigError`]s with the key path and line.
pub fn parse<T: serde::de::DeserializeOwned>(text: &str, origin: &Path) -> Result<T, ConfigError> {
    let file = origin.to_path_buf();
    let de = toml::Deserializer::parse(text).map_err(|e| {
        let mut message = e.message().trim().to_string();
        let (line, column) = match e.span() {
            Some(s) => {
                // Name what the error is about (a duplicate key, ...).
                if let Some(what) = text
                    .get(s.clone())
                    .filter(|w| !w.trim().is_empty() && w.len() <= 60 && !w.contains('\n'))
                {
                    message.push_str(&format!(": {}", what.trim()));
                }
                let (l, c) = line_col(text, s.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        ConfigError::Syntax {
            file: file.clone(),
            line,
            column,
            message,
        }
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let line = inner.span().map(|s| line_col(text, s.start).0);
        key_error(file, &path, inner.message().trim(), line)
    })
}

/// Classifies one serde message: unknown key, missing key, or bad value.
fn key_error(file: PathBuf, path: &str, message: &str, line: Option<usize>) -> ConfigError {
    // serde_path_to_error renders the root as ".".
    let path = if path == "." { "" } else { path };
    let join = |name: &str| {
        if path.is_empty() {
            name.to_string()
        } else {
            format!("{path}.{name}")
        }
    };
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((name, expected)) = rest.split_once('`') {
            // The path may already end in the unknown key.
            let key = if path.ends_with(name) {
                path.to_string()
            } else {
                join(name)
            };
            let expected = expected
                .trim_start_matches(',')
                .trim()
                .replace("expected one of", "the known keys here are")
                .replace("expected", "the known key here is")
                .replace("there are no fields", "no keys are allowed here");
            return ConfigError::Key {
                file,
                key,
                line,
                message: format!("unknown key; {expected}"),
            };
        }
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        if let Some((name, _)) = rest.split_once('`') {
            return ConfigError::Missing {
                file,
                key: join(name),
                message: "this key is required".into(),
            };
        }
    }
    // Rust type names mean little in a configuration file.
    let message = message
        .replace("expected u64", "expected a whole number, 0 or more")
        .replace("expected usize", "expected a whole number, 0 or more")
        .replace("expected i64", "expected a whole number");
    ConfigError::Key {
        file,
        key: if path.is_empty() {
            "(top level)".into()
        } else {
            path.to_string()
        },
        line,
        message,
    }
}

/// `path` taken relative to the directory of `origin` when it is relative.
pub fn resolve(path: &mut PathBuf, origin: &Path) {
    if path.is_relative() && !path.as_os_str().is_empty() {
        if let Some(dir) = origin.parent().filter(|d| !d.as_os_str().is_empty()) {
            *path = dir.join(&*path);
        }
    }
}

pub fn resolve_opt(path: &mut Option<PathBuf>, origin: &Path) {
    if let Some(p) = path {
        resolve(p, origin);
    }
}

/// How a value is written in TOML, for error messages.
pub fn quoted(s: impl fmt::Display) -> String {
    format!("{:?}", s.to_string())
}

pub fn path_value(p: &Path) -> String {
    quoted(p.display())
}

/// Checks that a path names a readable regular file.
pub fn check_readable(file: &Path, key: &str, path: &Path) -> Result<(), ConfigError> {
    let bad = |message: String| ConfigError::Value {
        file: file.to_path_buf(),
        key: key.to_string(),
        value: path_value(path),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot use this file: {e}")))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    std::fs::File::open(path).map_err(|e| bad(format!("cannot open this file: {e}")))?;
    Ok(())
}

/// Checks a path key is set to something.
pub fn check_path_set(file: &Path, key: &str, path: &Path) -> Result<(), ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(ConfigError::Value {
            file: file.to_path_buf(),
            key: key.to_string(),
            value: "\"\"".into(),
            message: "must not be empty".into(),
        });
    }
    Ok(())
}

/// Checks a Unix socket path fits in `sun_path` (108 bytes with the NUL).
pub fn check_socket_path(file: &Path, key: &str, path: &Path) -> Result<(), ConfigError> {
    check_path_set(file, key, path)?;
    use std::os::unix::ffi::OsStrExt;
    let len = path.as_os_str().as_bytes().len();
    if len > 107 {
        return Err(ConfigError::Value {
            file: file.to_path_buf(),
            key: key.to_string(),
            value: path_value(path),
            message: format!("a Unix socket path is at most 107 bytes, this one has {len}"),
        });
    }
    Ok(())
}

/// An IP prefix in a configuration file: `192.0.2.0/24`, `2001:db8::/32`, or
/// a bare address meaning a host prefix (`/32`, `/128`).
pub struct PrefixDe(pub IpNet);

impl<'de> Deserialize<'de> for PrefixDe {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_prefix(&s).map(PrefixDe).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{s:?} is not an IP prefix (like \"192.0.2.0/24\", \"2001:db8::/32\" or an address)"
            ))
        })
    }
}

pub fn parse_prefix(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

/// A clap value parser for prefixes on the command line, read as in the
/// configuration files: a bare address is a host prefix (`/32`, `/128`).
pub fn prefix_arg(s: &str) -> Result<IpNet, String> {
    parse_prefix(s).ok_or_else(|| {
        format!("{s:?} is not an IP prefix (like 192.0.2.0/24, 2001:db8::/32 or an address)")
    })
}

pub fn de_prefixes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    Ok(Vec::<PrefixDe>::deserialize(d)?
        .into_iter()
        .map(|p| p.0)
        .collect())
}

/// Semantic checks of a list of prefixes: no host bits set, no duplicates.
pub fn check_prefixes(file: &Path, key: &str, prefixes: &[IpNet]) -> Result<(), ConfigError> {
    for (i, p) in prefixes.iter().enumerate() {
        let bad = |message: String| ConfigError::Value {
            file: file.to_path_buf(),
            key: format!("{key}[{i}]"),
            value: quoted(p),
            message,
        };
        if p.trunc() != *p {
            return Err(bad(format!(
                "host bits are set: write {:?} (or the address alone for one host)",
                p.trunc().to_string()
            )));
        }
        if let Some(j) = prefixes[..i].iter().position(|q| q == p) {
            return Err(bad(format!("listed twice (also {key}[{j}])")));
        }
    }
    Ok(())
}
