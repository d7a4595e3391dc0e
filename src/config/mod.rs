//! The validated, immutable `Config` built from `lb.toml`: addresses parsed, secrets resolved from
//! env vars or files, invariants checked. Parsing details live in `file`, errors in `error`.
//! Reloading (watching the file) is `reload`'s job; this module only turns text into a `Config`.

mod error;
pub mod file;

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::ConfigError;
use file::FileConfig;
pub use file::{Balance, StoreKind};
use serde::{Serialize, Serializer};
use toml::Spanned;

use crate::tls::{ClientTls, ServerTls, SslMode, TlsFileError};

/// A secret read from an env var or a file. Never printed: `Debug` and `Display` redact it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where a secret came from, for printing the resolved config without the secret itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
}

impl SecretSource {
    /// Reads the secret now (env var or file, trailing newline dropped).
    pub fn resolve(&self) -> Result<Secret, String> {
        match self {
            SecretSource::Env(v) => std::env::var(v)
                .map(Secret)
                .map_err(|_| format!("environment variable {v} is not set")),
            SecretSource::File(p) => std::fs::read_to_string(p)
                .map(|s| Secret(s.trim_end_matches(['\n', '\r']).to_string()))
                .map_err(|e| format!("cannot read {}: {e}", p.display())),
        }
    }
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Env(v) => write!(f, "env:{v}"),
            SecretSource::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// Serialises a duration as people write it in lb.toml ("1s", "250ms").
fn human<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// Serialises where a secret comes from ("env:NAME", "file:/path"), never the secret.
fn source<S: Serializer>(src: &Option<SecretSource>, s: S) -> Result<S::Ok, S::Error> {
    match src {
        Some(src) => s.serialize_str(&src.to_string()),
        None => s.serialize_none(),
    }
}

/// What to do when a secret named in the file cannot be read (env var unset, file missing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    /// A config error: what pglb needs to run and to reload.
    Required,
    /// Noted in `Config::missing_secrets` and left unset: `pglb check` (warnings) and the
    /// promoter (which resolves only its own secrets).
    Optional,
}

/// The validated config. Its serde form (`pglb check`) is every resolved setting under the
/// lb.toml names; secrets appear only as where they come from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// The file this config was read from (for messages and the stats page).
    #[serde(skip)]
    pub path: PathBuf,
    /// Secrets named in the file that could not be read (with `Secrets::Optional` only).
    #[serde(skip)]
    pub missing_secrets: Vec<String>,
    pub listen: ListenConfig,
    pub check: CheckConfig,
    pub read: ReadConfig,
    pub proxy: ProxyConfig,
    pub stats: StatsConfig,
    /// `[promoter]`, present only when the file has it.
    pub promoter: Option<PromoterConfig>,
    /// `[store]`: the consensus store shared by promoters and pglb (default kind "none").
    pub store: StoreConfig,
    #[serde(rename = "backend")]
    pub backends: Vec<BackendConfig>,
}

/// `[store]`: where promoters elect their leader and record the primary (see `crate::store`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoreConfig {
    /// "none" (the default: one promoter, nothing shared) or "etcd".
    pub kind: StoreKind,
    /// Client URLs, `http://host:2379` or `https://...`; at least one when kind is "etcd".
    pub endpoints: Vec<String>,
    /// This cluster's keys live under it: `{prefix}/leader`, `{prefix}/primary`, ...
    /// Default "/pglb/main"; no trailing slash.
    pub prefix: String,
    /// Lease of the leader key and of each member key; whole seconds, at least 2 s. Default 5 s.
    #[serde(serialize_with = "human")]
    pub lease_ttl: Duration,
    pub username: Option<String>,
    #[serde(skip)]
    pub password: Option<Secret>,
    #[serde(rename = "password_from", serialize_with = "source")]
    pub password_source: Option<SecretSource>,
    /// TLS to etcd; set when any of ca_file, cert_file, key_file is given.
    pub tls: Option<StoreTls>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::None,
            endpoints: Vec::new(),
            prefix: "/pglb/main".into(),
            lease_ttl: Duration::from_secs(5),
            username: None,
            password: None,
            password_source: None,
            tls: None,
        }
    }
}

/// PEM files for TLS to etcd. `cert_file` and `key_file` (client certificate) go together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// Shortest `[store] lease_ttl`: renewals run at a third of it, and a leader stops acting a fifth
/// of it before the lease can expire; below 2 s one slow round trip would cost the leadership.
const MIN_LEASE_TTL: Duration = Duration::from_secs(2);

/// Settings of `pglb-promoter` (see docs/failover.md).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromoterConfig {
    /// May run pg_promote(), ALTER SYSTEM, read pg_stat_wal_receiver. Default "postgres".
    pub user: String,
    /// Where the password comes from; `SecretSource::resolve` reads it (promoter only).
    #[serde(rename = "password_from", serialize_with = "source")]
    pub password: Option<SecretSource>,
    /// What re-pointed replicas use in primary_conninfo. Default "replicator".
    pub replication_user: String,
    #[serde(rename = "replication_password_from", serialize_with = "source")]
    pub replication_password: Option<SecretSource>,
    /// How long the primary must be gone, witnesses agreeing. Default 3 s.
    #[serde(serialize_with = "human")]
    pub failover_after: Duration,
    pub synchronous: bool,
    /// Promoter check interval. Default 500 ms.
    #[serde(serialize_with = "human")]
    pub interval: Duration,
    /// pglb stats endpoints as written (`http://host:port`); empty: listen.stats on localhost.
    pub pglb_url: Vec<String>,
    /// Where `password` and `replication_password` are named ("file:line: key `...`"), so the
    /// promoter's errors about them name the line too.
    #[serde(skip)]
    pub secrets_at: [Option<String>; 2],
    pub listen: String,
    /// TLS of the promoter's own connections; `sslmode` and `sslrootcert` also go into the
    /// `primary_conninfo` of re-pointed replicas and rejoin's pg_rewind source.
    #[serde(flatten)]
    pub tls: ClientTls,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenConfig {
    pub write: SocketAddr,
    pub read: SocketAddr,
    pub stats: SocketAddr,
    /// `tls_cert` + `tls_key`: pglb's own certificate, only for sending its FATAL inside TLS
    /// to a client that asked for TLS when no backend can take the session.
    #[serde(flatten)]
    pub tls: Option<ServerTls>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckConfig {
    /// Time between two checks of one backend. Default 1 s.
    #[serde(serialize_with = "human")]
    pub interval: Duration,
    /// Bound on one whole check: connect, login, query. Default 2 s.
    #[serde(serialize_with = "human")]
    pub timeout: Duration,
    /// Fresh login replacing the kept check connection. Default 1 min.
    #[serde(serialize_with = "human")]
    pub relogin: Duration,
    /// Check interval while a port has no backend. Default 200 ms.
    #[serde(serialize_with = "human")]
    pub fast_interval: Duration,
    /// Consecutive successes to go up. Default 2.
    pub rise: u32,
    /// Consecutive failures to go down. Default 2.
    pub fall: u32,
    pub user: String,
    #[serde(skip)]
    pub password: Option<Secret>,
    #[serde(rename = "password_from", serialize_with = "source")]
    pub password_source: Option<SecretSource>,
    pub database: String,
    /// `sslmode`, `sslrootcert`, `sslcert`, `sslkey` as libpq (default: prefer, no files).
    #[serde(flatten)]
    pub tls: ClientTls,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReadConfig {
    pub balance: Balance,
    /// Bytes of WAL a replica may be behind the primary and still get new read sessions.
    pub max_lag: u64,
    /// Age of the last replayed transaction, while the primary has more WAL, that a replica may have.
    #[serde(serialize_with = "human")]
    pub max_lag_time: Duration,
    pub fallback_to_primary: bool,
    /// A new encrypted read connection from an address with a request in flight goes to that
    /// request's backend (it may be its cancel). Default on.
    pub tls_affinity: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProxyConfig {
    #[serde(serialize_with = "human")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "human")]
    pub client_startup_timeout: Duration,
    #[serde(serialize_with = "human")]
    pub shutdown_timeout: Duration,
    /// Accepting goes on this long after SIGTERM (`/live` already 503). Default 0.
    #[serde(serialize_with = "human")]
    pub shutdown_delay: Duration,
    #[serde(serialize_with = "human")]
    pub drain_timeout: Duration,
    pub close_on_writer_change: bool,
    /// Open client connections per listener. Default 10000.
    pub maxconn: u64,
    /// Queue wait for a backend at its maxconn. Default 5 s.
    #[serde(serialize_with = "human")]
    pub queue_timeout: Duration,
    /// Wait of a new session for a backend on a port that has none. Default 10 s; 0 = none.
    #[serde(serialize_with = "human")]
    pub wait_for_backend: Duration,
    /// Idle session timeouts per port; zero = off (the default).
    #[serde(serialize_with = "human")]
    pub write_idle_timeout: Duration,
    #[serde(serialize_with = "human")]
    pub read_idle_timeout: Duration,
    #[serde(serialize_with = "human")]
    pub tcp_keepalive: Duration,
    #[serde(serialize_with = "human")]
    pub tcp_user_timeout: Duration,
    /// Worker threads carrying sessions; 0 = one per CPU. A change needs a restart.
    pub threads: usize,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct StatsConfig {
    #[serde(skip)]
    pub admin_token: Option<Secret>,
    /// Basic-auth user and password required to read the stats pages (not `/health`).
    #[serde(skip)]
    pub read_basic: Option<(String, Secret)>,
    /// Bearer token accepted for reading.
    #[serde(skip)]
    pub read_token: Option<Secret>,
    /// Where each secret comes from, for `pglb check`.
    #[serde(rename = "admin_token_from", serialize_with = "source")]
    pub admin_token_source: Option<SecretSource>,
    pub read_user: Option<String>,
    #[serde(rename = "read_password_from", serialize_with = "source")]
    pub read_password_source: Option<SecretSource>,
    #[serde(rename = "read_token_from", serialize_with = "source")]
    pub read_token_source: Option<SecretSource>,
    /// The promoter's status endpoint as `host:port` (from `promoter_url`), for the stats page.
    #[serde(rename = "promoter_url")]
    pub promoter_status: Option<String>,
}

impl StatsConfig {
    /// Whether reading the stats pages needs credentials.
    pub fn read_protected(&self) -> bool {
        self.read_basic.is_some() || self.read_token.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendConfig {
    pub name: String,
    /// `host:port` as written; host names resolve at connect time.
    pub address: String,
    pub weight: u32,
    /// Promoter tie-breaker: higher wins among equally advanced replicas. Default 100.
    pub priority: u32,
    /// Promoter never promotes this backend.
    pub no_failover: bool,
    /// Sessions on this backend over both ports; 0 = no limit.
    pub maxconn: u64,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &src)
    }

    /// Reads and validates a config file, secrets as `secrets` says.
    pub fn load_with(path: &Path, secrets: Secrets) -> Result<Config, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse_with(path, &src, secrets)
    }

    /// Validates config text; `path` is only used in messages. Every secret must be readable.
    pub fn parse(path: &Path, src: &str) -> Result<Config, ConfigError> {
        Config::parse_with(path, src, Secrets::Required)
    }

    pub fn parse_with(path: &Path, src: &str, secrets: Secrets) -> Result<Config, ConfigError> {
        let v = Validator {
            path,
            src,
            secrets,
            missing: std::cell::RefCell::new(Vec::new()),
        };
        let mut c = v.run()?;
        c.missing_secrets = v.missing.into_inner();
        Ok(c)
    }
}

/// Most worker threads `[proxy] threads` may ask for: each holds a listening socket per port and a
/// runtime, and more threads than CPUs only adds switching.
const MAX_THREADS: usize = 1024;

struct Validator<'a> {
    path: &'a Path,
    src: &'a str,
    secrets: Secrets,
    missing: std::cell::RefCell<Vec<String>>,
}

impl Validator<'_> {
    fn invalid<T>(&self, span: &Spanned<T>, key: &str, message: impl Into<String>) -> ConfigError {
        let line = if span.span().is_empty() && span.span().start == 0 {
            0
        } else {
            error::line_of(self.src, span.span().start)
        };
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line,
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn run(&self) -> Result<Config, ConfigError> {
        let raw: FileConfig = toml::from_str(self.src).map_err(|e| {
            let line = e
                .span()
                .map(|s| error::line_of(self.src, s.start))
                .unwrap_or(0);
            let message = e.message().trim().to_string();
            // For an unknown key the span covers the key itself; otherwise the key is on that line.
            let key = error::key_at_line(self.src, line).unwrap_or_else(|| "(top level)".into());
            ConfigError::Parse {
                path: self.path.to_path_buf(),
                line,
                key,
                message,
            }
        })?;

        let write = self.addr(&raw.listen.write, "listen.write")?;
        let read = self.addr(&raw.listen.read, "listen.read")?;
        let stats = self.addr(&raw.listen.stats, "listen.stats")?;
        // A clash is reported at the line that is in the file (the other may be a default).
        let in_file = |v: &Spanned<String>| !v.span().is_empty();
        if write == read {
            return Err(if in_file(&raw.listen.read) {
                self.invalid(
                    &raw.listen.read,
                    "listen.read",
                    "must differ from listen.write",
                )
            } else {
                self.invalid(
                    &raw.listen.write,
                    "listen.write",
                    format!("must differ from listen.read ({read}, its default)"),
                )
            });
        }
        if stats == write || stats == read {
            let other = if stats == write {
                &raw.listen.write
            } else {
                &raw.listen.read
            };
            let other_key = if stats == write {
                "listen.write"
            } else {
                "listen.read"
            };
            return Err(if in_file(&raw.listen.stats) || !in_file(other) {
                self.invalid(
                    &raw.listen.stats,
                    "listen.stats",
                    "must differ from listen.write and listen.read",
                )
            } else {
                self.invalid(
                    other,
                    other_key,
                    format!("must differ from listen.stats ({stats}, its default)"),
                )
            });
        }

        let c = &raw.check;
        if let Some(p) = &c.password {
            return Err(self.invalid(
                p,
                "check.password",
                "inline passwords are not accepted: use password_env or password_file",
            ));
        }
        for (v, key) in [(&c.rise, "check.rise"), (&c.fall, "check.fall")] {
            if *v.get_ref() == 0 {
                return Err(self.invalid(v, key, "must be at least 1"));
            }
        }
        if *raw.proxy.threads.get_ref() > MAX_THREADS {
            return Err(self.invalid(
                &raw.proxy.threads,
                "proxy.threads",
                format!("must be at most {MAX_THREADS} (0 = one per CPU)"),
            ));
        }
        let (password, password_source) =
            self.secret(&c.password_env, &c.password_file, "check.password")?;
        let check_tls =
            self.client_tls("check", &c.sslmode, &c.sslrootcert, &c.sslcert, &c.sslkey)?;
        let listen_tls = self.server_tls(&raw.listen.tls_cert, &raw.listen.tls_key)?;
        let promoter = match &raw.promoter {
            None => None,
            Some(p) => {
                // Resolved by the promoter at its start: the balancer must not need them.
                let source = |env: &Option<Spanned<String>>, file: &Option<Spanned<String>>| {
                    env.as_ref()
                        .map(|e| SecretSource::Env(e.get_ref().clone()))
                        .or_else(|| {
                            file.as_ref()
                                .map(|f| SecretSource::File(f.get_ref().into()))
                        })
                };
                let password = source(&p.password_env, &p.password_file);
                let replication_password =
                    source(&p.replication_password_env, &p.replication_password_file);
                // Where each is named ("file:line: key `...`"), for the promoter's messages.
                let at = |env: &Option<Spanned<String>>,
                          file: &Option<Spanned<String>>,
                          key: &str| {
                    match (env, file) {
                        (Some(e), _) => Some(self.invalid(e, &format!("{key}_env"), "").at()),
                        (None, Some(f)) => Some(self.invalid(f, &format!("{key}_file"), "").at()),
                        (None, None) => None,
                    }
                };
                let secrets_at = [
                    at(&p.password_env, &p.password_file, "promoter.password"),
                    at(
                        &p.replication_password_env,
                        &p.replication_password_file,
                        "promoter.replication_password",
                    ),
                ];
                Some(PromoterConfig {
                    secrets_at,
                    user: p.user.clone(),
                    password,
                    replication_user: p.replication_user.clone(),
                    replication_password,
                    failover_after: p.failover_after,
                    synchronous: p.synchronous,
                    interval: p.interval,
                    pglb_url: match &p.pglb_url {
                        None => Vec::new(),
                        Some(u) => {
                            let urls = u.get_ref().clone().into_vec();
                            // Checked here, where the line is known; the promoter uses them as given.
                            if let Some(bad) = urls.iter().find(|url| {
                                crate::promoter::settings::parse_http_url(url).is_none()
                            }) {
                                return Err(self.invalid(
                                    u,
                                    "promoter.pglb_url",
                                    format!("{bad:?}: only http://host:port[/] is supported"),
                                ));
                            }
                            urls
                        }
                    },
                    listen: p.listen.clone(),
                    tls: self.client_tls(
                        "promoter",
                        &p.sslmode,
                        &p.sslrootcert,
                        &p.sslcert,
                        &p.sslkey,
                    )?,
                })
            }
        };

        let store = self.store(&raw.store)?;

        let mut names = HashSet::new();
        let mut backends = Vec::with_capacity(raw.backends.len());
        for b in &raw.backends {
            let name = b.name.get_ref().trim();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
            {
                return Err(self.invalid(
                    &b.name,
                    "backend.name",
                    "must be non-empty and use only letters, digits, '-', '_' and '.'",
                ));
            }
            if !names.insert(name.to_string()) {
                return Err(self.invalid(
                    &b.name,
                    "backend.name",
                    format!("duplicate backend name {name:?}"),
                ));
            }
            let addr = b.address.get_ref().trim();
            match addr.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
                _ => {
                    return Err(self.invalid(
                        &b.address,
                        "backend.address",
                        format!("{addr:?} is not host:port"),
                    ))
                }
            }
            if *b.weight.get_ref() == 0 {
                return Err(self.invalid(&b.weight, "backend.weight", "must be at least 1"));
            }
            backends.push(BackendConfig {
                name: name.to_string(),
                address: addr.to_string(),
                weight: *b.weight.get_ref(),
                priority: b.priority,
                no_failover: b.no_failover,
                maxconn: b.maxconn.unwrap_or(raw.proxy.backend_maxconn),
            });
        }
        if backends.is_empty() {
            return Err(ConfigError::Invalid {
                path: self.path.to_path_buf(),
                line: 0,
                key: "backend".into(),
                message: "at least one [[backend]] is required".into(),
            });
        }

        let (admin_token, admin_token_source) = self.secret(
            &raw.stats.admin_token_env,
            &raw.stats.admin_token_file,
            "stats.admin_token",
        )?;

        let st = &raw.stats;
        let mut read_password_source = None;
        let read_basic = match (&st.read_user, &st.read_password_env, &st.read_password_file) {
            (None, None, None) => None,
            (Some(u), e, f) => match self.secret(e, f, "stats.read_password")? {
                (Some(p), src) => {
                    read_password_source = src;
                    Some((u.get_ref().clone(), p))
                }
                // Named but unreadable, with secrets optional (already noted as missing).
                (None, Some(src)) => {
                    read_password_source = Some(src);
                    None
                }
                (None, None) => {
                    return Err(self.invalid(
                        u,
                        "stats.read_user",
                        "read_user needs read_password_env or read_password_file",
                    ))
                }
            },
            (None, Some(e), _) => {
                return Err(self.invalid(
                    e,
                    "stats.read_password_env",
                    "a read password needs read_user",
                ))
            }
            (None, None, Some(f)) => {
                return Err(self.invalid(
                    f,
                    "stats.read_password_file",
                    "a read password needs read_user",
                ))
            }
        };
        let (read_token, read_token_source) =
            self.secret(&st.read_token_env, &st.read_token_file, "stats.read_token")?;

        Ok(Config {
            path: self.path.to_path_buf(),
            missing_secrets: Vec::new(),
            listen: ListenConfig {
                write,
                read,
                stats,
                tls: listen_tls,
            },
            check: CheckConfig {
                interval: c.interval,
                timeout: c.timeout,
                relogin: c.relogin,
                fast_interval: c.fast_interval,
                rise: *c.rise.get_ref(),
                fall: *c.fall.get_ref(),
                user: c.user.clone(),
                password,
                password_source,
                database: c.database.clone(),
                tls: check_tls,
            },
            read: ReadConfig {
                balance: raw.read.balance,
                max_lag: raw.read.max_lag,
                max_lag_time: raw.read.max_lag_time,
                fallback_to_primary: raw.read.fallback_to_primary,
                tls_affinity: raw.read.tls_affinity,
            },
            proxy: ProxyConfig {
                connect_timeout: raw.proxy.connect_timeout,
                client_startup_timeout: raw.proxy.client_startup_timeout,
                shutdown_timeout: raw.proxy.shutdown_timeout,
                shutdown_delay: raw.proxy.shutdown_delay,
                drain_timeout: raw.proxy.drain_timeout,
                close_on_writer_change: raw.proxy.close_on_writer_change,
                maxconn: raw.proxy.maxconn,
                queue_timeout: raw.proxy.queue_timeout,
                wait_for_backend: raw.proxy.wait_for_backend,
                write_idle_timeout: raw.proxy.write_idle_timeout,
                read_idle_timeout: raw.proxy.read_idle_timeout,
                tcp_keepalive: raw.proxy.tcp_keepalive,
                tcp_user_timeout: raw.proxy.tcp_user_timeout,
                threads: *raw.proxy.threads.get_ref(),
            },
            stats: StatsConfig {
                admin_token,
                read_user: st.read_user.as_ref().map(|u| u.get_ref().clone()),
                read_basic,
                read_token,
                admin_token_source,
                read_password_source,
                read_token_source,
                promoter_status: match &st.promoter_url {
                    None => None,
                    Some(u) => Some(
                        crate::promoter::settings::parse_http_url(u.get_ref()).ok_or_else(
                            || {
                                self.invalid(
                                    u,
                                    "stats.promoter_url",
                                    "only http://host:port is supported",
                                )
                            },
                        )?,
                    ),
                },
            },
            promoter,
            store,
            backends,
        })
    }

    fn store(&self, st: &file::FileStore) -> Result<StoreConfig, ConfigError> {
        if let Some(p) = &st.password {
            return Err(self.invalid(
                p,
                "store.password",
                "inline passwords are not accepted: use password_env or password_file",
            ));
        }
        let ttl_text = st.lease_ttl.get_ref().trim();
        let lease_ttl = humantime::parse_duration(ttl_text).map_err(|e| {
            self.invalid(
                &st.lease_ttl,
                "store.lease_ttl",
                format!("{ttl_text:?} is not a duration (e.g. \"5s\"): {e}"),
            )
        })?;
        if lease_ttl < MIN_LEASE_TTL {
            return Err(self.invalid(&st.lease_ttl, "store.lease_ttl", "must be at least 2s"));
        }
        if lease_ttl.subsec_nanos() != 0 {
            return Err(self.invalid(
                &st.lease_ttl,
                "store.lease_ttl",
                "must be a whole number of seconds (etcd leases count in seconds)",
            ));
        }
        let prefix = st.prefix.get_ref().trim().trim_end_matches('/').to_string();
        if !prefix.starts_with('/') || prefix.chars().any(char::is_whitespace) {
            return Err(self.invalid(
                &st.prefix,
                "store.prefix",
                "must start with '/' and contain no spaces (e.g. \"/pglb/main\")",
            ));
        }
        let path =
            |v: &Option<Spanned<String>>, key: &str| -> Result<Option<PathBuf>, ConfigError> {
                match v {
                    None => Ok(None),
                    Some(f) => {
                        let p = PathBuf::from(f.get_ref());
                        std::fs::metadata(&p).map_err(|e| {
                            self.invalid(f, key, format!("cannot read {}: {e}", p.display()))
                        })?;
                        Ok(Some(p))
                    }
                }
            };
        let ca_file = path(&st.ca_file, "store.ca_file")?;
        let cert_file = path(&st.cert_file, "store.cert_file")?;
        let key_file = path(&st.key_file, "store.key_file")?;
        match (&st.cert_file, &st.key_file) {
            (Some(c), None) => {
                return Err(self.invalid(c, "store.cert_file", "cert_file needs key_file"))
            }
            (None, Some(k)) => {
                return Err(self.invalid(k, "store.key_file", "key_file needs cert_file"))
            }
            _ => {}
        }
        let tls = (ca_file.is_some() || cert_file.is_some()).then_some(StoreTls {
            ca_file,
            cert_file,
            key_file,
        });
        let endpoints: Vec<String> = st
            .endpoints
            .get_ref()
            .iter()
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .collect();
        for e in &endpoints {
            let rest = e
                .strip_prefix("http://")
                .map(|r| (r, false))
                .or_else(|| e.strip_prefix("https://").map(|r| (r, true)));
            let ok = match rest {
                Some((hostport, _)) => match hostport.rsplit_once(':') {
                    Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok(),
                    None => false,
                },
                None => false,
            };
            if !ok {
                return Err(self.invalid(
                    &st.endpoints,
                    "store.endpoints",
                    format!("{e:?} is not a client URL like \"http://etcd-1:2379\""),
                ));
            }
            if let Some((_, https)) = rest {
                if https != tls.is_some() {
                    return Err(self.invalid(
                        &st.endpoints,
                        "store.endpoints",
                        if https {
                            format!("{e:?} is https: set ca_file (and cert_file/key_file for client certificates)")
                        } else {
                            format!("{e:?} is http but TLS files are set: use https://")
                        },
                    ));
                }
            }
        }
        let kind = *st.kind.get_ref();
        if kind == StoreKind::Etcd && endpoints.is_empty() {
            // The list may be missing altogether: then point at the kind line.
            let span_in_file = !st.endpoints.span().is_empty();
            return Err(if span_in_file {
                self.invalid(
                    &st.endpoints,
                    "store.endpoints",
                    "kind \"etcd\" needs at least one endpoint",
                )
            } else {
                self.invalid(
                    &st.kind,
                    "store.endpoints",
                    "kind \"etcd\" needs endpoints = [\"http://etcd-1:2379\", ...]",
                )
            });
        }
        let (password, password_source) =
            self.secret(&st.password_env, &st.password_file, "store.password")?;
        let username = st.username.as_ref().map(|u| u.get_ref().clone());
        match (&username, &password) {
            (None, Some(_)) => {
                let at = st.password_env.as_ref().or(st.password_file.as_ref());
                if let Some(at) = at {
                    return Err(self.invalid(at, "store.password", "a password needs username"));
                }
            }
            (Some(_), None) => {
                if let Some(u) = &st.username {
                    return Err(self.invalid(
                        u,
                        "store.username",
                        "username needs password_env or password_file",
                    ));
                }
            }
            _ => {}
        }
        Ok(StoreConfig {
            kind,
            endpoints,
            prefix,
            lease_ttl,
            username,
            password,
            password_source,
            tls,
        })
    }

    /// `[check]`'s or `[promoter]`'s TLS: the combinations libpq allows, the files read and
    /// parsed now (errors at the key naming the file).
    fn client_tls(
        &self,
        section: &str,
        sslmode: &Option<Spanned<SslMode>>,
        sslrootcert: &Option<Spanned<String>>,
        sslcert: &Option<Spanned<String>>,
        sslkey: &Option<Spanned<String>>,
    ) -> Result<ClientTls, ConfigError> {
        let mode = sslmode.as_ref().map(|m| *m.get_ref()).unwrap_or_default();
        if let (Some(m), None) = (sslmode, sslrootcert) {
            if mode.verifies() {
                return Err(self.invalid(
                    m,
                    &format!("{section}.sslmode"),
                    format!(
                        "sslmode \"{}\" needs sslrootcert (the CA certificate file, PEM)",
                        mode.as_str()
                    ),
                ));
            }
        }
        match (sslcert, sslkey) {
            (Some(c), None) => {
                return Err(self.invalid(c, &format!("{section}.sslcert"), "sslcert needs sslkey"))
            }
            (None, Some(k)) => {
                return Err(self.invalid(k, &format!("{section}.sslkey"), "sslkey needs sslcert"))
            }
            _ => {}
        }
        let path = |v: &Option<Spanned<String>>| v.as_ref().map(|p| PathBuf::from(p.get_ref()));
        ClientTls::new(mode, path(sslrootcert), path(sslcert), path(sslkey)).map_err(|e| {
            self.tls_file_error(
                e,
                section,
                &[
                    ("sslrootcert", sslrootcert),
                    ("sslcert", sslcert),
                    ("sslkey", sslkey),
                ],
            )
        })
    }

    /// `[listen] tls_cert` + `tls_key`, read and parsed now.
    fn server_tls(
        &self,
        cert: &Option<Spanned<String>>,
        key: &Option<Spanned<String>>,
    ) -> Result<Option<ServerTls>, ConfigError> {
        match (cert, key) {
            (None, None) => Ok(None),
            (Some(c), None) => Err(self.invalid(c, "listen.tls_cert", "tls_cert needs tls_key")),
            (None, Some(k)) => Err(self.invalid(k, "listen.tls_key", "tls_key needs tls_cert")),
            (Some(c), Some(k)) => {
                ServerTls::new(PathBuf::from(c.get_ref()), PathBuf::from(k.get_ref()))
                    .map(Some)
                    .map_err(|e| {
                        self.tls_file_error(
                            e,
                            "listen",
                            &[
                                ("tls_cert", &Some(c.clone())),
                                ("tls_key", &Some(k.clone())),
                            ],
                        )
                    })
            }
        }
    }

    /// A TLS file error at the key naming that file (the certificate's key when the pair is
    /// the trouble).
    fn tls_file_error(
        &self,
        e: TlsFileError,
        section: &str,
        keys: &[(&str, &Option<Spanned<String>>)],
    ) -> ConfigError {
        let path = match &e {
            TlsFileError::Read { path, .. }
            | TlsFileError::NoCertificate { path }
            | TlsFileError::NoKey { path }
            | TlsFileError::BadCertificate { path, .. } => Some(path.clone()),
            TlsFileError::Pair(_) => None,
        };
        let at = keys
            .iter()
            .find(|(_, v)| {
                v.as_ref()
                    .is_some_and(|v| Some(PathBuf::from(v.get_ref())) == path)
            })
            .or_else(|| keys.iter().rev().find(|(_, v)| v.is_some()));
        match at {
            Some((key, Some(v))) => self.invalid(v, &format!("{section}.{key}"), e.to_string()),
            _ => ConfigError::Invalid {
                path: self.path.to_path_buf(),
                line: 0,
                key: section.to_string(),
                message: e.to_string(),
            },
        }
    }

    /// Resolves a secret given as `<key>_env` or `<key>_file`; none means no password (trust).
    fn secret(
        &self,
        env: &Option<Spanned<String>>,
        file: &Option<Spanned<String>>,
        key: &str,
    ) -> Result<(Option<Secret>, Option<SecretSource>), ConfigError> {
        match (env, file) {
            (Some(e), Some(_)) => Err(self.invalid(
                e,
                &format!("{key}_env"),
                "set either the _env or the _file form, not both",
            )),
            (Some(var), None) => {
                let src = SecretSource::Env(var.get_ref().clone());
                match std::env::var(var.get_ref()) {
                    Ok(v) => Ok((Some(Secret(v)), Some(src))),
                    Err(_) => self.missing(
                        self.invalid(
                            var,
                            &format!("{key}_env"),
                            format!("environment variable {} is not set", var.get_ref()),
                        ),
                        src,
                    ),
                }
            }
            (None, Some(f)) => {
                let p = PathBuf::from(f.get_ref());
                match std::fs::read_to_string(&p) {
                    Ok(v) => Ok((
                        Some(Secret(v.trim_end_matches(['\n', '\r']).to_string())),
                        Some(SecretSource::File(p)),
                    )),
                    Err(e) => self.missing(
                        self.invalid(
                            f,
                            &format!("{key}_file"),
                            format!("cannot read {}: {e}", p.display()),
                        ),
                        SecretSource::File(p),
                    ),
                }
            }
            (None, None) => Ok((None, None)),
        }
    }

    /// A secret that cannot be read: an error, or (secrets optional) noted and left unset.
    fn missing(
        &self,
        error: ConfigError,
        src: SecretSource,
    ) -> Result<(Option<Secret>, Option<SecretSource>), ConfigError> {
        match self.secrets {
            Secrets::Required => Err(error),
            Secrets::Optional => {
                self.missing.borrow_mut().push(error.to_string());
                Ok((None, Some(src)))
            }
        }
    }

    fn addr(&self, v: &Spanned<String>, key: &str) -> Result<SocketAddr, ConfigError> {
        v.get_ref().trim().parse().map_err(|_| {
            self.invalid(
                v,
                key,
                format!(
                    "{:?} is not an ip:port listen address (e.g. \"0.0.0.0:5435\")",
                    v.get_ref()
                ),
            )
        })
    }
}

impl Config {
    /// Every resolved setting as lb.toml text, for `pglb check`. Secrets show only their source.
    pub fn describe(&self) -> String {
        let body = toml::to_string(self)
            .unwrap_or_else(|e| format!("# cannot print the resolved config: {e}\n"));
        format!("# resolved from {}\n{body}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[listen]
write = "127.0.0.1:5435"
read = "127.0.0.1:5436"
stats = "127.0.0.1:8404"

[check]
user = "pglb_check"

[[backend]]
name = "pg-0"
address = "127.0.0.1:5432"
"#;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("lb.toml"), s)
    }

    #[test]
    fn promoter_errors_name_their_line_and_key() {
        let text = format!(
            "{MIN}\n[promoter]\npassword_env = \"PGLB_TEST_UNSET_PROMOTER_PW\"\npglb_url = [\"http://a:8404\", \"ftp://b\"]\n"
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.starts_with("lb.toml:16: key `promoter.pglb_url`"), "{e}");
        assert!(e.contains("ftp://b"), "{e}");
        let c = parse(&format!(
            "{MIN}\n[promoter]\npassword_env = \"PGLB_TEST_UNSET_PROMOTER_PW\"\n"
        ))
        .unwrap();
        let p = c.promoter.expect("[promoter]");
        assert_eq!(
            p.secrets_at[0].as_deref(),
            Some("lb.toml:15: key `promoter.password_env`")
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.check.interval, Duration::from_secs(1));
        assert_eq!(c.check.rise, 2);
        assert_eq!(c.read.max_lag, 16 << 20);
        assert_eq!(c.read.balance, Balance::Leastconn);
        assert!(c.read.fallback_to_primary);
        assert_eq!(c.backends[0].weight, 1);
        assert!(c.check.password.is_none());
    }

    #[test]
    fn shipped_example_is_valid() {
        std::env::set_var("PGLB_CHECK_PASSWORD_FOR_EXAMPLE_TEST", "x");
        let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/lb.toml"))
            .unwrap()
            .replace(
                "\"PGLB_CHECK_PASSWORD\"",
                "\"PGLB_CHECK_PASSWORD_FOR_EXAMPLE_TEST\"",
            );
        let c = parse(&src).unwrap();
        assert_eq!(c.backends.len(), 4);
        assert_eq!(c.listen.write.port(), 5435);
        assert_eq!(c.listen.read.port(), 5436);
        assert_eq!(c.listen.stats.port(), 8404);
    }

    #[test]
    fn threads_default_to_zero_and_too_many_are_refused_at_their_line() {
        assert_eq!(parse(MIN).unwrap().proxy.threads, 0);
        let c = parse(&format!("{MIN}\n[proxy]\nthreads = 3\n")).unwrap();
        assert_eq!(c.proxy.threads, 3);
        let src = format!("{MIN}\n[proxy]\nthreads = 5000\n");
        let line = src.lines().position(|l| l.starts_with("threads")).unwrap() + 1;
        let e = parse(&src).unwrap_err().to_string();
        assert!(e.starts_with(&format!("lb.toml:{line}:")), "{e}");
        assert!(
            e.contains("proxy.threads") && e.contains("at most 1024"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let src = MIN.replace(
            "user = \"pglb_check\"",
            "user = \"pglb_check\"\nintervall = \"1s\"",
        );
        let e = parse(&src).unwrap_err().to_string();
        assert!(e.starts_with("lb.toml:9:"), "{e}");
        assert!(e.contains("check.intervall"), "{e}");
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn bad_duration_and_size_are_refused_with_key() {
        let e = parse(&MIN.replace("[check]", "[check]\ninterval = \"fast\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("check.interval"), "{e}");
        let e = parse(&format!("{MIN}\n[read]\nmax_lag = \"16 parsecs\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("read.max_lag"), "{e}");
        assert!(e.contains("invalid size"), "{e}");
    }

    #[test]
    fn sizes_parse_like_postgresql() {
        assert_eq!(file::parse_size("16MB").unwrap(), 16 << 20);
        assert_eq!(file::parse_size("512kB").unwrap(), 512 << 10);
        assert_eq!(file::parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(file::parse_size("100").unwrap(), 100);
        assert!(file::parse_size("lots").is_err());
    }

    #[test]
    fn duplicate_backend_names_are_refused() {
        let src = format!("{MIN}\n[[backend]]\nname = \"pg-0\"\naddress = \"h:1\"\n");
        let e = parse(&src).unwrap_err().to_string();
        assert!(e.contains("duplicate backend name"), "{e}");
        assert!(e.contains("backend.name"), "{e}");
        assert!(e.starts_with("lb.toml:15:"), "{e}");
    }

    #[test]
    fn inline_password_is_refused() {
        let e = parse(&MIN.replace("[check]", "[check]\npassword = \"hunter2\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("inline passwords are not accepted"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn missing_password_env_is_refused() {
        let e = parse(&MIN.replace(
            "[check]",
            "[check]\npassword_env = \"PGLB_TEST_SURELY_UNSET_VAR\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("PGLB_TEST_SURELY_UNSET_VAR is not set"), "{e}");
    }

    #[test]
    fn same_write_and_read_port_is_refused() {
        let e = parse(&MIN.replace("127.0.0.1:5436", "127.0.0.1:5435"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen.read"), "{e}");
    }

    #[test]
    fn bad_backend_address_is_refused() {
        let e = parse(&MIN.replace("127.0.0.1:5432", "nohostport"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("backend.address"), "{e}");
    }

    #[test]
    fn describe_never_prints_the_password() {
        std::env::set_var("PGLB_TEST_DESCRIBE_PW", "s3cret-value");
        let c = parse(&MIN.replace(
            "[check]",
            "[check]\npassword_env = \"PGLB_TEST_DESCRIBE_PW\"",
        ))
        .unwrap();
        let d = c.describe();
        assert!(!d.contains("s3cret-value"));
        assert!(d.contains("env:PGLB_TEST_DESCRIBE_PW"));
        assert!(!format!("{c:?}").contains("s3cret-value"));
    }

    fn line_of(src: &str, start: &str) -> usize {
        src.lines().position(|l| l.starts_with(start)).unwrap() + 1
    }

    #[test]
    fn store_defaults_to_none() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.store.kind, StoreKind::None);
        assert_eq!(c.store.prefix, "/pglb/main");
        assert_eq!(c.store.lease_ttl, Duration::from_secs(5));
        assert!(c.store.endpoints.is_empty());
    }

    #[test]
    fn store_etcd_is_read() {
        let src = format!(
            "{MIN}\n[store]\nkind = \"etcd\"\nendpoints = [\"http://etcd-1:2379\", \"http://etcd-2:2379/\"]\nprefix = \"/pglb/prod/\"\nlease_ttl = \"3s\"\n"
        );
        let c = parse(&src).unwrap();
        assert_eq!(c.store.kind, StoreKind::Etcd);
        assert_eq!(
            c.store.endpoints,
            ["http://etcd-1:2379", "http://etcd-2:2379"]
        );
        assert_eq!(c.store.prefix, "/pglb/prod");
        assert_eq!(c.store.lease_ttl, Duration::from_secs(3));
        assert!(c.store.tls.is_none());
    }

    #[test]
    fn store_unknown_key_names_file_line_and_key() {
        let src = format!("{MIN}\n[store]\nkind = \"etcd\"\nendpoint = [\"http://e:2379\"]\n");
        let e = parse(&src).unwrap_err().to_string();
        let line = line_of(&src, "endpoint =");
        assert!(e.starts_with(&format!("lb.toml:{line}:")), "{e}");
        assert!(
            e.contains("store.endpoint") && e.contains("unknown field"),
            "{e}"
        );
    }

    #[test]
    fn store_etcd_without_endpoints_is_refused() {
        let src = format!("{MIN}\n[store]\nkind = \"etcd\"\n");
        let e = parse(&src).unwrap_err().to_string();
        let line = line_of(&src, "kind =");
        assert!(e.starts_with(&format!("lb.toml:{line}:")), "{e}");
        assert!(e.contains("store.endpoints"), "{e}");
        let src = format!("{MIN}\n[store]\nkind = \"etcd\"\nendpoints = []\n");
        let e = parse(&src).unwrap_err().to_string();
        let line = line_of(&src, "endpoints =");
        assert!(e.starts_with(&format!("lb.toml:{line}:")), "{e}");
        assert!(e.contains("at least one endpoint"), "{e}");
    }

    #[test]
    fn store_lease_ttl_must_be_whole_seconds_of_at_least_two() {
        let with = |ttl: &str| {
            format!("{MIN}\n[store]\nkind = \"etcd\"\nendpoints = [\"http://e:2379\"]\nlease_ttl = \"{ttl}\"\n")
        };
        for (ttl, msg) in [
            ("1s", "at least 2s"),
            ("1500ms", "at least 2s"),
            ("2500ms", "whole number of seconds"),
            ("soon", "not a duration"),
        ] {
            let src = with(ttl);
            let e = parse(&src).unwrap_err().to_string();
            let line = line_of(&src, "lease_ttl =");
            assert!(e.starts_with(&format!("lb.toml:{line}:")), "{ttl}: {e}");
            assert!(
                e.contains("store.lease_ttl") && e.contains(msg),
                "{ttl}: {e}"
            );
        }
        assert_eq!(
            parse(&with("2s")).unwrap().store.lease_ttl,
            Duration::from_secs(2)
        );
    }

    #[test]
    fn store_endpoints_must_be_client_urls() {
        let src = format!("{MIN}\n[store]\nkind = \"etcd\"\nendpoints = [\"etcd-1:2379\"]\n");
        let e = parse(&src).unwrap_err().to_string();
        assert!(
            e.contains("store.endpoints") && e.contains("client URL"),
            "{e}"
        );
        let src =
            format!("{MIN}\n[store]\nkind = \"etcd\"\nendpoints = [\"https://etcd-1:2379\"]\n");
        let e = parse(&src).unwrap_err().to_string();
        assert!(e.contains("set ca_file"), "{e}");
    }

    #[test]
    fn store_tls_files_must_exist_and_pair() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let base = format!(
            "{MIN}\n[store]\nkind = \"etcd\"\nendpoints = [\"https://e:2379\"]\nca_file = \"{}\"\n",
            ca.display()
        );
        let c = parse(&base).unwrap();
        assert_eq!(c.store.tls.unwrap().ca_file.as_deref(), Some(ca.as_path()));
        let src = format!("{base}cert_file = \"{}\"\n", ca.display());
        let e = parse(&src).unwrap_err().to_string();
        assert!(e.contains("cert_file needs key_file"), "{e}");
        let src = format!("{base}key_file = \"/nonexistent/key.pem\"\n");
        let e = parse(&src).unwrap_err().to_string();
        assert!(
            e.contains("store.key_file") && e.contains("cannot read"),
            "{e}"
        );
        let e = parse(&base.replace("https://", "http://"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("use https://"), "{e}");
    }

    #[test]
    fn check_tls_takes_libpq_names_and_checks_files() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.check.tls.sslmode, SslMode::Prefer);
        let with = |extra: &str| MIN.replace("[check]", &format!("[check]\n{extra}"));
        let src = with("sslmode = \"verify-full\"");
        let e = parse(&src).unwrap_err().to_string();
        assert!(e.starts_with("lb.toml:8: key `check.sslmode`"), "{e}");
        assert!(e.contains("needs sslrootcert"), "{e}");
        let e = parse(&with("sslmode = \"verify-everything\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("check.sslmode") && e.contains("verify-full"),
            "{e}"
        );
        let e = parse(&with(
            "sslmode = \"verify-ca\"\nsslrootcert = \"/nonexistent/ca.crt\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("lb.toml:9: key `check.sslrootcert`"), "{e}");
        assert!(e.contains("cannot read /nonexistent/ca.crt"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = parse(&with(&format!("sslrootcert = \"{}\"", junk.display())))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("check.sslrootcert") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = parse(&with(&format!("sslcert = \"{}\"", junk.display())))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslcert needs sslkey"), "{e}");
        let e = parse(&format!(
            "{MIN}\n[promoter]\nsslmode = \"require\"\nsslkey = \"{}\"\nsslcert = \"{}\"\n",
            junk.display(),
            junk.display()
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("promoter.sslcert"), "{e}");
        let c = parse(&with("sslmode = \"require\"")).unwrap();
        assert_eq!(c.check.tls.sslmode, SslMode::Require);
        assert!(
            c.describe().contains("sslmode = \"require\""),
            "{}",
            c.describe()
        );
        let e = parse(&MIN.replace(
            "[listen]",
            &format!("[listen]\ntls_cert = \"{}\"", junk.display()),
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("listen.tls_cert") && e.contains("needs tls_key"),
            "{e}"
        );
    }

    #[test]
    fn store_password_is_never_printed_and_never_inline() {
        let src = format!(
            "{MIN}\n[store]\nkind = \"etcd\"\nendpoints = [\"http://e:2379\"]\npassword = \"hunter2\"\n"
        );
        let e = parse(&src).unwrap_err().to_string();
        assert!(
            e.contains("inline passwords are not accepted") && !e.contains("hunter2"),
            "{e}"
        );
        std::env::set_var("PGLB_TEST_STORE_PW", "etcd-s3cret");
        let src = format!(
            "{MIN}\n[store]\nkind = \"etcd\"\nendpoints = [\"http://e:2379\"]\nusername = \"pglb\"\npassword_env = \"PGLB_TEST_STORE_PW\"\n"
        );
        let c = parse(&src).unwrap();
        assert_eq!(c.store.password.as_ref().unwrap().expose(), "etcd-s3cret");
        let d = c.describe();
        assert!(
            d.contains("env:PGLB_TEST_STORE_PW") && !d.contains("etcd-s3cret"),
            "{d}"
        );
        assert!(!format!("{c:?}").contains("etcd-s3cret"));
        let src = src.replace("username = \"pglb\"\n", "");
        let e = parse(&src).unwrap_err().to_string();
        assert!(e.contains("a password needs username"), "{e}");
    }
}
