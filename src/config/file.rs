//! Serde mirror of `lb.toml`: field names, defaults and value parsing (durations, sizes,
//! addresses). Unknown keys are rejected here. Cross-field rules live in `config::Config`.

use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

/// The file as written by ops. Every section but `[[backend]]` may be omitted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub listen: FileListen,
    pub check: FileCheck,
    #[serde(default)]
    pub read: FileRead,
    #[serde(default)]
    pub proxy: FileProxy,
    #[serde(default)]
    pub stats: FileStats,
    /// Only read by `pglb-promoter`; the balancer ignores it.
    pub promoter: Option<FilePromoter>,
    /// The consensus store that coordinates promoters; absent = `kind = "none"`.
    #[serde(default)]
    pub store: FileStore,
    #[serde(default, rename = "backend")]
    pub backends: Vec<FileBackend>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListen {
    #[serde(default = "default_write")]
    pub write: Spanned<String>,
    #[serde(default = "default_read")]
    pub read: Spanned<String>,
    #[serde(default = "default_stats")]
    pub stats: Spanned<String>,
    /// pglb's own certificate and key (PEM), for the FATAL it sends inside TLS to a client that
    /// asked for TLS when no backend can take its session.
    pub tls_cert: Option<Spanned<String>>,
    pub tls_key: Option<Spanned<String>>,
}

impl Default for FileListen {
    fn default() -> Self {
        Self {
            write: default_write(),
            read: default_read(),
            stats: default_stats(),
            tls_cert: None,
            tls_key: None,
        }
    }
}

fn unspanned(s: &str) -> Spanned<String> {
    Spanned::new(0..0, s.to_string())
}
fn default_write() -> Spanned<String> {
    unspanned("0.0.0.0:5435")
}
fn default_read() -> Spanned<String> {
    unspanned("0.0.0.0:5436")
}
fn default_stats() -> Spanned<String> {
    unspanned("0.0.0.0:8404")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCheck {
    #[serde(
        default = "default_interval",
        deserialize_with = "de_positive_duration"
    )]
    pub interval: Duration,
    #[serde(
        default = "default_check_timeout",
        deserialize_with = "de_positive_duration"
    )]
    pub timeout: Duration,
    /// How often the kept check connection is replaced by a fresh login (so a changed
    /// password, `pg_hba.conf` or DNS name is noticed).
    #[serde(default = "default_relogin", deserialize_with = "de_positive_duration")]
    pub relogin: Duration,
    /// The check interval while a port has no backend (a failover in progress).
    #[serde(
        default = "default_fast_interval",
        deserialize_with = "de_positive_duration"
    )]
    pub fast_interval: Duration,
    #[serde(default = "default_threshold")]
    pub rise: Spanned<u32>,
    #[serde(default = "default_threshold")]
    pub fall: Spanned<u32>,
    pub user: String,
    pub password_env: Option<Spanned<String>>,
    pub password_file: Option<Spanned<String>>,
    /// Present only so that an inline password gets a helpful error instead of "unknown key".
    pub password: Option<Spanned<String>>,
    #[serde(default = "default_database")]
    pub database: String,
    /// libpq's TLS settings: `sslmode` (default prefer), `sslrootcert`, `sslcert` + `sslkey`.
    pub sslmode: Option<Spanned<crate::tls::SslMode>>,
    pub sslrootcert: Option<Spanned<String>>,
    pub sslcert: Option<Spanned<String>>,
    pub sslkey: Option<Spanned<String>>,
}

/// A humantime duration that must be greater than zero (reported at the key's own line).
fn de_positive_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let v: Duration = humantime_serde::deserialize(d)?;
    if v.is_zero() {
        return Err(serde::de::Error::custom("must be greater than zero"));
    }
    Ok(v)
}

fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_check_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_relogin() -> Duration {
    Duration::from_secs(60)
}
fn default_fast_interval() -> Duration {
    Duration::from_millis(200)
}
fn default_threshold() -> Spanned<u32> {
    Spanned::new(0..0, 2)
}
fn default_database() -> String {
    "postgres".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    #[default]
    Leastconn,
    Roundrobin,
    /// A hash of the client's address over the readers (weights respected): every connection
    /// from one address reaches the same replica while the readers stay the same, cancels
    /// included.
    Source,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::Leastconn => "leastconn",
            Balance::Roundrobin => "roundrobin",
            Balance::Source => "source",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRead {
    #[serde(default)]
    pub balance: Balance,
    #[serde(default = "default_max_lag", deserialize_with = "de_size")]
    pub max_lag: u64,
    #[serde(default = "default_max_lag_time", with = "humantime_serde")]
    pub max_lag_time: Duration,
    #[serde(default = "yes")]
    pub fallback_to_primary: bool,
    /// A new TLS (or GSS-encrypted) connection from an address with a read session waiting
    /// for its answer goes to that session's backend: it may be a cancel (proxy::affinity).
    #[serde(default = "yes")]
    pub tls_affinity: bool,
}

impl Default for FileRead {
    fn default() -> Self {
        Self {
            balance: Balance::default(),
            max_lag: default_max_lag(),
            max_lag_time: default_max_lag_time(),
            fallback_to_primary: true,
            tls_affinity: true,
        }
    }
}

fn default_max_lag() -> u64 {
    16 * 1024 * 1024
}
fn default_max_lag_time() -> Duration {
    Duration::from_secs(10)
}
fn yes() -> bool {
    true
}

/// Sizes as people write them: "16MB", "512kB", "1GiB", or a plain number of bytes.
/// "MB" means MiB here, as in postgresql.conf.
fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    match Raw::deserialize(d)? {
        Raw::N(n) => Ok(n),
        Raw::S(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    // PostgreSQL's convention: kB/MB/GB are powers of 1024.
    let mult: u64 = match unit {
        "" | "B" => 1,
        "kB" | "KB" | "k" | "K" | "KiB" => 1 << 10,
        "MB" | "M" | "MiB" => 1 << 20,
        "GB" | "G" | "GiB" => 1 << 30,
        "TB" | "T" | "TiB" => 1 << 40,
        _ => {
            return Err(format!(
                "invalid size {s:?}: expected e.g. \"16MB\", \"512kB\""
            ))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. \"16MB\", \"512kB\""))?;
    Ok((n * mult as f64) as u64)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileProxy {
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "default_startup_timeout", with = "humantime_serde")]
    pub client_startup_timeout: Duration,
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// After SIGTERM, keep accepting new sessions this long while `/live` already answers 503,
    /// so a VIP or load balancer moves traffic away before the listeners close.
    #[serde(default, with = "humantime_serde")]
    pub shutdown_delay: Duration,
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    #[serde(default = "yes")]
    pub close_on_writer_change: bool,
    /// Open client connections per listener (each of write and read).
    #[serde(default = "default_maxconn")]
    pub maxconn: u64,
    /// Sessions per backend, both ports together; 0 = no limit. `[[backend]] maxconn` overrides.
    #[serde(default)]
    pub backend_maxconn: u64,
    /// How long a session waits for a backend under its maxconn before it is refused.
    #[serde(default = "default_queue_timeout", with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// How long a new session waits for a backend when its port has none (a failover); "0s"
    /// refuses at once.
    #[serde(default = "default_wait_for_backend", with = "humantime_serde")]
    pub wait_for_backend: Duration,
    /// Close write-port sessions with no traffic either way for this long; "0s" = never.
    #[serde(default, with = "humantime_serde")]
    pub write_idle_timeout: Duration,
    /// Same for the read port.
    #[serde(default, with = "humantime_serde")]
    pub read_idle_timeout: Duration,
    #[serde(default = "default_keepalive", with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    #[serde(default = "default_user_timeout", with = "humantime_serde")]
    pub tcp_user_timeout: Duration,
    /// Threads that carry sessions; 0 = one per CPU. Read at start only.
    #[serde(default = "default_threads")]
    pub threads: Spanned<usize>,
}

impl Default for FileProxy {
    fn default() -> Self {
        Self {
            connect_timeout: default_connect_timeout(),
            client_startup_timeout: default_startup_timeout(),
            shutdown_timeout: default_shutdown_timeout(),
            shutdown_delay: Duration::ZERO,
            drain_timeout: default_drain_timeout(),
            close_on_writer_change: true,
            maxconn: default_maxconn(),
            backend_maxconn: 0,
            queue_timeout: default_queue_timeout(),
            wait_for_backend: default_wait_for_backend(),
            write_idle_timeout: Duration::ZERO,
            read_idle_timeout: Duration::ZERO,
            tcp_keepalive: default_keepalive(),
            tcp_user_timeout: default_user_timeout(),
            threads: default_threads(),
        }
    }
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_startup_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_threads() -> Spanned<usize> {
    Spanned::new(0..0, 0)
}
fn default_maxconn() -> u64 {
    10_000
}
fn default_wait_for_backend() -> Duration {
    Duration::from_secs(10)
}
fn default_queue_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_keepalive() -> Duration {
    Duration::from_secs(10)
}
fn default_user_timeout() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileStats {
    /// Require `Authorization: Basic` with this user for reading the stats pages.
    pub read_user: Option<Spanned<String>>,
    pub read_password_env: Option<Spanned<String>>,
    pub read_password_file: Option<Spanned<String>>,
    /// Or a bearer token for reading (the admin token also reads).
    pub read_token_env: Option<Spanned<String>>,
    pub read_token_file: Option<Spanned<String>>,
    /// Env var (or file) holding the bearer token for admin actions; without one they are off.
    /// Named but not readable is a config error, not silently "off".
    pub admin_token_env: Option<Spanned<String>>,
    pub admin_token_file: Option<Spanned<String>>,
    /// `http://host:port` of pglb-promoter's status endpoint: the stats page shows its state and
    /// last failover.
    pub promoter_url: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBackend {
    pub name: Spanned<String>,
    pub address: Spanned<String>,
    #[serde(default = "default_weight")]
    pub weight: Spanned<u32>,
    /// Promoter: among equally advanced replicas, the higher priority is promoted. Default 100.
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// Promoter: never promote this backend.
    #[serde(default)]
    pub no_failover: bool,
    /// Sessions on this backend, both ports; overrides `[proxy] backend_maxconn`.
    pub maxconn: Option<u64>,
}

fn default_priority() -> u32 {
    100
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePromoter {
    #[serde(default = "default_promoter_user")]
    pub user: String,
    pub password_env: Option<Spanned<String>>,
    pub password_file: Option<Spanned<String>>,
    #[serde(default = "default_replication_user")]
    pub replication_user: String,
    pub replication_password_env: Option<Spanned<String>>,
    pub replication_password_file: Option<Spanned<String>>,
    #[serde(default = "default_failover_after", with = "humantime_serde")]
    pub failover_after: Duration,
    #[serde(default)]
    pub synchronous: bool,
    /// How often the promoter checks the servers. Default 500 ms.
    #[serde(default = "default_promoter_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// pglb's stats endpoint (`http://host:8404`), or a list of them: each reachable pglb is a
    /// witness. Default: derived from `listen.stats` on localhost.
    pub pglb_url: Option<Spanned<OneOrMany>>,
    /// Where the promoter serves its own state (`/status`, `/metrics`). Default "0.0.0.0:8405".
    #[serde(default = "default_promoter_listen")]
    pub listen: String,
    /// libpq's TLS settings: `sslmode` (default prefer), `sslrootcert`, `sslcert` + `sslkey`.
    pub sslmode: Option<Spanned<crate::tls::SslMode>>,
    pub sslrootcert: Option<Spanned<String>>,
    pub sslcert: Option<Spanned<String>>,
    pub sslkey: Option<Spanned<String>>,
}

/// A string or an array of strings (`pglb_url = "http://a:8404"` or `["http://a:8404", ...]`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

fn default_promoter_user() -> String {
    "postgres".into()
}
fn default_replication_user() -> String {
    "replicator".into()
}
fn default_failover_after() -> Duration {
    Duration::from_secs(3)
}
fn default_promoter_interval() -> Duration {
    Duration::from_millis(500)
}
fn default_promoter_listen() -> String {
    "0.0.0.0:8405".into()
}

fn default_weight() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}

/// Which consensus store coordinates the promoters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// No store: one promoter, nothing shared (the default).
    #[default]
    None,
    /// etcd v3: a leader key under a lease, guarded transactions.
    Etcd,
}

impl StoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::None => "none",
            StoreKind::Etcd => "etcd",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileStore {
    #[serde(default = "default_store_kind")]
    pub kind: Spanned<StoreKind>,
    #[serde(default = "default_store_endpoints")]
    pub endpoints: Spanned<Vec<String>>,
    #[serde(default = "default_store_prefix")]
    pub prefix: Spanned<String>,
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: Spanned<String>,
    pub username: Option<Spanned<String>>,
    pub password_env: Option<Spanned<String>>,
    pub password_file: Option<Spanned<String>>,
    /// Present only so that an inline password gets a helpful error instead of "unknown key".
    pub password: Option<Spanned<String>>,
    pub ca_file: Option<Spanned<String>>,
    pub cert_file: Option<Spanned<String>>,
    pub key_file: Option<Spanned<String>>,
}

impl Default for FileStore {
    fn default() -> Self {
        Self {
            kind: default_store_kind(),
            endpoints: default_store_endpoints(),
            prefix: default_store_prefix(),
            lease_ttl: default_lease_ttl(),
            username: None,
            password_env: None,
            password_file: None,
            password: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

fn default_store_kind() -> Spanned<StoreKind> {
    Spanned::new(0..0, StoreKind::None)
}
fn default_store_endpoints() -> Spanned<Vec<String>> {
    Spanned::new(0..0, Vec::new())
}
fn default_store_prefix() -> Spanned<String> {
    unspanned("/pglb/main")
}
fn default_lease_ttl() -> Spanned<String> {
    unspanned("5s")
}
