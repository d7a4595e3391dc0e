//! Arbitrary UTF-8 into the config parser (`Config::parse`, what `lb.toml` and every reload go
//! through). No input may panic, and:
//! - a refusal is never an I/O error, reads `PATH:LINE: key `KEY`: MESSAGE` with a key, and LINE
//!   is a line of the input (1..=its last line), or 0 for the one whole-file error (no backend);
//! - no secret value (env var or file) appears in an error or in `describe()`;
//! - an accepted config holds the validated invariants;
//! - parsing is deterministic (the same text gives the same config or the same error).
//!
//! Secrets: the env vars the committed configs name are set to a known value. `*_file` paths
//! resolve in the working directory (`fuzz/run` uses an empty one holding a file `secret`);
//! inputs whose `*_file` keys could reach outside it (a `/` or `..` in the path) are skipped, so
//! the fuzzer cannot make the parser read `/dev/zero` or block on `/dev/stdin`.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pglb::config::{Config, ConfigError};

const PATH: &str = "/etc/pglb/lb.toml";
const SECRET: &str = "fuzz-secret-3b9d1e";
const SECRET_ENVS: &[&str] = &[
    "PGLB_CHECK_PASSWORD",
    "PGLB_PROMOTER_PASSWORD",
    "PGLB_REPLICATION_PASSWORD",
    "POSTGRES_PASSWORD",
    "PGLB_ADMIN_TOKEN",
    "PGLB_STATS_PASSWORD",
    "PGLB_READ_TOKEN",
];

fn init() {
    for var in SECRET_ENVS {
        std::env::set_var(var, SECRET);
    }
}

fuzz_target!(init: init(), |src: &str| {
    if file_key_reaches_out(src) {
        return;
    }
    let path = Path::new(PATH);
    let first = Config::parse(path, src);
    let again = Config::parse(path, src);
    match (&first, &again) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "same text, two configs"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("same text accepted once and refused once"),
    }
    match first {
        Ok(c) => check_valid(src, &c),
        Err(e) => check_error(src, &e),
    }
});

/// True when some `*_file` key holds a path that is absolute or climbs out of the directory.
fn file_key_reaches_out(src: &str) -> bool {
    fn walk(t: &toml::Table) -> bool {
        t.iter().any(|(k, v)| match v {
            toml::Value::String(s) => k.ends_with("_file") && (s.contains('/') || s.contains("..")),
            toml::Value::Table(t) => walk(t),
            toml::Value::Array(a) => a.iter().any(|v| match v {
                toml::Value::Table(t) => walk(t),
                _ => false,
            }),
            _ => false,
        })
    }
    src.parse::<toml::Table>().is_ok_and(|t| walk(&t))
}

fn check_error(src: &str, e: &ConfigError) {
    let shown = e.to_string();
    let (line, key, message) = match e {
        ConfigError::Parse {
            path,
            line,
            key,
            message,
        }
        | ConfigError::Invalid {
            path,
            line,
            key,
            message,
        } => {
            assert_eq!(path, Path::new(PATH));
            (*line, key, message)
        }
        ConfigError::Io { .. } => panic!("Config::parse gave an I/O error: {shown}"),
    };
    assert_eq!(shown, format!("{PATH}:{line}: key `{key}`: {message}"));
    let last_line = src.matches('\n').count() + 1;
    assert!(
        line <= last_line,
        "error names line {line}, the input has {last_line}: {shown}"
    );
    assert!(!key.is_empty(), "an error without a key: {shown}");
    // Line 0 only for what has no line: the file as a whole (no [[backend]] at all).
    assert!(
        line > 0 || key == "backend",
        "an error at line 0 for a key of the file: {shown}"
    );
    if !src.contains(SECRET) {
        assert!(!shown.contains(SECRET), "secret in an error: {shown}");
    }
}

fn check_valid(src: &str, c: &Config) {
    assert_eq!(c.path, Path::new(PATH));
    assert!(!c.backends.is_empty());
    let mut names = std::collections::HashSet::new();
    for b in &c.backends {
        assert!(names.insert(&b.name), "duplicate backend {}", b.name);
        assert!(!b.name.is_empty());
        assert!(b.weight >= 1);
        let (host, port) = b.address.rsplit_once(':').expect("host:port");
        assert!(!host.is_empty());
        assert!(port.parse::<u16>().is_ok());
    }
    assert!(c.check.rise >= 1 && c.check.fall >= 1);
    assert!(!c.check.interval.is_zero() && !c.check.timeout.is_zero());
    assert_ne!(c.listen.write, c.listen.read);
    assert!(c.listen.stats != c.listen.write && c.listen.stats != c.listen.read);
    if !src.contains(SECRET) {
        let shown = c.describe();
        assert!(!shown.contains(SECRET), "secret in describe():\n{shown}");
        let debug = format!("{c:?}");
        assert!(!debug.contains(SECRET), "secret in Debug:\n{debug}");
    }
}
