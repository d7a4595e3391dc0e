//! `ConfigError`: every way `lb.toml` can be refused, each naming the file, the line and the key.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The TOML did not parse, or a value had the wrong type or format, or a key is unknown.
    #[error("{path}:{line}: key `{key}`: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
    /// The file parsed but breaks a rule (duplicate names, missing secrets, ...).
    #[error("{path}:{line}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// "file:line: key `k`", the place this error is about (the file alone for an io error).
    pub fn at(&self) -> String {
        match self {
            ConfigError::Io { path, .. } => path.display().to_string(),
            ConfigError::Parse {
                path, line, key, ..
            }
            | ConfigError::Invalid {
                path, line, key, ..
            } => {
                format!("{}:{line}: key `{key}`", path.display())
            }
        }
    }

    /// Stable label for metrics and the stats page.
    pub fn kind(&self) -> &'static str {
        match self {
            ConfigError::Io { .. } => "io",
            ConfigError::Parse { .. } => "parse",
            ConfigError::Invalid { .. } => "invalid",
        }
    }
}

/// 1-based line of a byte offset.
pub(crate) fn line_of(src: &str, offset: usize) -> usize {
    let end = offset.min(src.len());
    src.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The dotted key written on a line (`check.interval`, `backend.name`), found from the nearest
/// table header above it. Used to name the key when the TOML parser only gives a position.
pub(crate) fn key_at_line(src: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = src.lines().collect();
    let idx = line.checked_sub(1)?;
    let here = lines.get(idx)?.trim();
    let key = here
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string());
    let section = lines[..=idx].iter().rev().find_map(|l| {
        let l = l.trim();
        l.starts_with('[').then(|| {
            l.trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
    });
    // A bare `[` names no section: fall back to the line's key, or none.
    let section = section.filter(|s| !s.is_empty());
    let key = key.filter(|k| !k.is_empty());
    match (section, key) {
        (Some(s), Some(k)) => Some(format!("{s}.{k}")),
        (None, Some(k)) => Some(k),
        (Some(s), None) => Some(s),
        (None, None) => None,
    }
}
