//! Act: every change the promoter makes to a server, behind the `Promoter` trait so the
//! failover driver can be replayed against a scripted fake. `PgPromoter` does it over SQL as the
//! promoter user (one fresh session per step, each step bounded); `DryRun` reads like it and
//! only logs what it would change. Every step is idempotent: running it twice leaves the server
//! as running it once does.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use postgres_protocol::escape::escape_literal;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, SimpleQueryMessage};
use tracing::info;

use super::observe::{node_status, NodeStatus, APPLICATION_NAME};
use super::settings::{Member, Settings};
use crate::backend::probe::{self, ProbeError};
use crate::pg::Lsn;
use crate::tls::ClientTls;

/// A server's recovery state and WAL positions, read fresh during a failover.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Position {
    pub in_recovery: bool,
    pub timeline: u32,
    pub current_lsn: Option<Lsn>,
    pub receive_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    /// A WAL receiver process runs.
    pub receiver_running: bool,
}

impl Position {
    /// WAL this standby holds: the furthest of received and replayed.
    pub fn received(&self) -> Lsn {
        self.receive_lsn
            .unwrap_or_default()
            .max(self.replay_lsn.unwrap_or_default())
    }

    /// Whether it has replayed everything it received.
    pub fn caught_up(&self) -> bool {
        self.replay_lsn.unwrap_or_default() >= self.received()
    }
}

impl From<&NodeStatus> for Position {
    fn from(s: &NodeStatus) -> Position {
        Position {
            in_recovery: s.in_recovery,
            timeline: s.timeline,
            current_lsn: s.current_lsn,
            receive_lsn: s.receive_lsn,
            replay_lsn: s.replay_lsn,
            receiver_running: s.receiver.is_some(),
        }
    }
}

/// A step that failed on one server.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ActError {
    #[error("{what} on {node}: {source}")]
    Server {
        node: String,
        what: &'static str,
        #[source]
        source: ProbeError,
    },
    #[error("{what} on {node}: no answer within {after:?}")]
    Timeout {
        node: String,
        what: &'static str,
        after: Duration,
    },
    /// Refused before touching the server: this promoter does not hold a valid leadership
    /// (another leads, or its lease ran out).
    #[error("{what} on {node}: not done, this promoter is not the leader (leader: {})", holder.as_deref().unwrap_or("unknown"))]
    NotLeader {
        node: String,
        what: &'static str,
        holder: Option<String>,
    },
    /// The store did not commit the guarded record or journal entry the step needs first.
    #[error("{what} on {node}: not done, the store did not commit its record ({kind}): {message}")]
    Store {
        node: String,
        what: &'static str,
        /// `StoreError::kind`.
        kind: &'static str,
        message: String,
    },
}

impl ActError {
    /// Whether the step was refused by the store gate (nothing was done to the server).
    pub fn is_guard(&self) -> bool {
        matches!(self, ActError::NotLeader { .. } | ActError::Store { .. })
    }
}

impl ActError {
    /// No answer from the server at all (a timeout, or the promoter could not even try): it
    /// may be hung rather than gone. Every other error is an answer (refused, reset, an error
    /// from the server).
    pub fn is_silence(&self) -> bool {
        matches!(
            self,
            ActError::Timeout { .. }
                | ActError::Server {
                    source: ProbeError::Timeout(_) | ProbeError::Local(_),
                    ..
                }
        )
    }
}

/// Everything the promoter changes on servers.
pub trait Promoter: Send + Sync {
    /// Fresh recovery state and positions.
    fn position(&self, node: &Member) -> impl Future<Output = Result<Position, ActError>> + Send;
    /// `primary_conninfo = ''` and reload: the WAL receiver stops, positions hold still.
    /// Returns the previous `primary_conninfo`.
    fn stop_receiver(&self, node: &Member)
        -> impl Future<Output = Result<String, ActError>> + Send;
    /// The upstream a standby follows: its `primary_conninfo`, or, while a failover holds its
    /// receiver stopped, the value saved by `stop_receiver`.
    fn receiver_conninfo(
        &self,
        _node: &Member,
    ) -> impl Future<Output = Result<String, ActError>> + Send {
        async { Ok(String::new()) }
    }
    /// A failover starts (with a store: its journal opens under the next epoch).
    fn begin_failover(&self) -> impl Future<Output = Result<(), ActError>> + Send {
        async { Ok(()) }
    }
    /// Last step before `prepare` and `promote`: with a store, the guarded record naming `node`
    /// the primary (it was replaying `from_timeline`). An error means: do not promote.
    fn guard_promotion(
        &self,
        _node: &Member,
        _from_timeline: u32,
    ) -> impl Future<Output = Result<(), ActError>> + Send {
        async { Ok(()) }
    }
    /// After a verified promotion: with a store, the record gets the new timeline.
    fn promoted(
        &self,
        _node: &Member,
        _timeline: u32,
    ) -> impl Future<Output = Result<(), ActError>> + Send {
        async { Ok(()) }
    }
    /// Puts a `primary_conninfo` back (a failover that did not happen).
    fn restore_receiver(
        &self,
        node: &Member,
        conninfo: &str,
    ) -> impl Future<Output = Result<(), ActError>> + Send;
    /// Before promoting: not read-only, and in synchronous mode the standby list it will need.
    fn prepare(
        &self,
        node: &Member,
        sync_names: Option<&str>,
    ) -> impl Future<Output = Result<(), ActError>> + Send;
    /// `pg_promote(false)`, then `pg_is_in_recovery()` every 10 ms: whether it left recovery
    /// within `wait`.
    fn promote(
        &self,
        node: &Member,
        wait: Duration,
    ) -> impl Future<Output = Result<bool, ActError>> + Send;
    fn checkpoint(&self, node: &Member) -> impl Future<Output = Result<(), ActError>> + Send;
    /// A physical slot on `primary` (reserving WAL now) unless it exists.
    fn ensure_slot(
        &self,
        primary: &Member,
        slot: &str,
    ) -> impl Future<Output = Result<(), ActError>> + Send;
    /// Slot on `primary`, then `primary_conninfo` + `primary_slot_name` on `replica`, reload.
    fn repoint(
        &self,
        replica: &Member,
        primary: &Member,
    ) -> impl Future<Output = Result<(), ActError>> + Send;
    /// `default_transaction_read_only = on`, reload, client sessions terminated. Returns how many.
    fn fence(&self, node: &Member) -> impl Future<Output = Result<u64, ActError>> + Send;
    /// Undoes `fence` (a switchover that did not happen).
    fn unfence(&self, node: &Member) -> impl Future<Output = Result<(), ActError>> + Send;
    fn set_sync_names(
        &self,
        primary: &Member,
        value: &str,
    ) -> impl Future<Output = Result<(), ActError>> + Send;
    /// Bound on one look at a server (`Settings::probe_timeout`), from which a failover derives
    /// how long a silent server is waited for (`failover::Limits::with_look`); `None` keeps the
    /// `Limits` it was given.
    fn look_bound(&self) -> Option<Duration> {
        None
    }
}

/// A string as a SQL literal, safe whatever `standard_conforming_strings` says (libpq's
/// `PQescapeLiteral`: `E'...'` when it holds a backslash).
pub fn sql_literal(s: &str) -> String {
    escape_literal(s)
}

/// A value in a libpq keyword/value connection string, quoted when it must be.
pub(crate) fn conninfo_value(v: &str) -> String {
    if !v.is_empty() && !v.contains([' ', '\'', '\\', '\t', '\n']) {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

/// The `primary_conninfo` a replica gets to follow `primary`: replication credentials, its own
/// name as `application_name` (what `synchronous_standby_names` and `pg_stat_replication` show),
/// and timeouts so it notices a dead primary in seconds: `connect_timeout` 2 s,
/// `tcp_user_timeout` = `failover_after` (at least 1 s), TCP keepalives; and the promoter's own
/// `sslmode` and `sslrootcert` (the path must name the CA file on the replica's host too: the
/// server reads it there). The promoter's client certificate is its own and is not passed on.
pub fn conninfo(
    primary: &Member,
    replica: &Member,
    user: &str,
    password: Option<&str>,
    failover_after: Duration,
    tls: &ClientTls,
) -> String {
    let (host, port) = super::decide::split_address(&primary.address)
        .unwrap_or_else(|| (primary.address.clone(), 5432));
    let user_timeout = failover_after.max(Duration::from_secs(1)).as_millis();
    let mut parts = vec![
        format!("host={}", conninfo_value(&host)),
        format!("port={port}"),
        format!("user={}", conninfo_value(user)),
    ];
    if let Some(pw) = password {
        parts.push(format!("password={}", conninfo_value(pw)));
    }
    parts.push(format!(
        "application_name={}",
        conninfo_value(&replica.name)
    ));
    parts.push(format!("sslmode={}", tls.sslmode.as_str()));
    if let Some(root) = &tls.sslrootcert {
        parts.push(format!(
            "sslrootcert={}",
            conninfo_value(&root.display().to_string())
        ));
    }
    parts.push("connect_timeout=2".into());
    parts.push(format!("tcp_user_timeout={user_timeout}"));
    parts.push("keepalives=1 keepalives_idle=5 keepalives_interval=2 keepalives_count=3".into());
    parts.join(" ")
}

/// Changes servers over SQL as the promoter user.
#[derive(Clone)]
pub struct PgPromoter {
    settings: Arc<Settings>,
    /// Bound on one ordinary step (login + a few statements).
    step_timeout: Duration,
}

/// Bound on one ordinary step of the promoter on a server (login + a few statements): three
/// looks' bounds (`look` = `Settings::probe_timeout`), at least 3 s.
pub fn step_timeout(look: Duration) -> Duration {
    (look * 3).max(Duration::from_secs(3))
}

impl PgPromoter {
    pub fn new(settings: Arc<Settings>) -> PgPromoter {
        let step_timeout = step_timeout(settings.probe_timeout());
        PgPromoter {
            settings,
            step_timeout,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    async fn session(&self, node: &Member, what: &'static str) -> Result<Client, ActError> {
        self.settings
            .login
            .connect(&node.address, APPLICATION_NAME)
            .await
            .map_err(|source| ActError::Server {
                node: node.name.clone(),
                what,
                source,
            })
    }

    /// Runs `statements` one by one (ALTER SYSTEM refuses to run in a multi-statement string)
    /// on a fresh session, all within `timeout`; returns the first column of the last row.
    async fn run(
        &self,
        node: &Member,
        what: &'static str,
        statements: &[String],
        timeout: Duration,
    ) -> Result<Option<String>, ActError> {
        let work = async {
            let client = self.session(node, what).await?;
            let mut last = None;
            for sql in statements {
                let msgs = client
                    .simple_query(sql)
                    .await
                    .map_err(|e| ActError::Server {
                        node: node.name.clone(),
                        what,
                        source: probe::classify(e, true),
                    })?;
                last = msgs.into_iter().find_map(|m| match m {
                    SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
                    _ => None,
                });
            }
            Ok(last)
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(ActError::Timeout {
                node: node.name.clone(),
                what,
                after: timeout,
            }),
        }
    }

    /// The conninfo `replica` gets to follow `primary` with the configured credentials.
    pub fn conninfo_for(&self, replica: &Member, primary: &Member) -> String {
        let s = &self.settings;
        conninfo(
            primary,
            replica,
            &s.replication_user,
            s.replication_password.as_ref().map(|p| p.expose()),
            s.failover_after,
            &s.login.tls,
        )
    }

    /// The full status of one server (what `observe` reads), within the step timeout.
    pub async fn status(&self, node: &Member) -> Result<NodeStatus, ActError> {
        match tokio::time::timeout(
            self.step_timeout,
            node_status(&node.address, &self.settings.login),
        )
        .await
        {
            Ok(r) => r.map_err(|source| ActError::Server {
                node: node.name.clone(),
                what: "read status",
                source,
            }),
            Err(_) => Err(ActError::Timeout {
                node: node.name.clone(),
                what: "read status",
                after: self.step_timeout,
            }),
        }
    }
}

const RELOAD: &str = "SELECT pg_reload_conf()";

/// Where `stop_receiver` keeps a standby's `primary_conninfo` while a failover holds it still
/// (a custom setting in `postgresql.auto.conf`, beside `primary_conninfo` itself); `repoint`
/// and `restore_receiver` reset it.
pub const SAVED_CONNINFO: &str = "pglb.saved_primary_conninfo";

/// ALTER SYSTEM knows a custom setting only once the session has it (PostgreSQL 15 refuses an
/// unknown one): this makes it known in the session, keeping any value it has.
fn saved_placeholder() -> String {
    format!("SELECT set_config('{SAVED_CONNINFO}', coalesce(current_setting('{SAVED_CONNINFO}', true), ''), false)")
}

impl Promoter for PgPromoter {
    async fn position(&self, node: &Member) -> Result<Position, ActError> {
        self.status(node).await.map(|s| Position::from(&s))
    }

    async fn receiver_conninfo(&self, node: &Member) -> Result<String, ActError> {
        self.run(
            node,
            "read primary_conninfo",
            &[format!("SELECT coalesce(nullif(current_setting('primary_conninfo'), ''), current_setting('{SAVED_CONNINFO}', true), '')")],
            self.step_timeout,
        )
        .await
        .map(Option::unwrap_or_default)
    }

    fn look_bound(&self) -> Option<Duration> {
        Some(self.settings.probe_timeout())
    }

    async fn stop_receiver(&self, node: &Member) -> Result<String, ActError> {
        let prev = self
            .run(
                node,
                "stop wal receiver",
                &["SELECT current_setting('primary_conninfo')".to_string()],
                self.step_timeout,
            )
            .await?
            .unwrap_or_default();
        if prev.is_empty() {
            // Stopped already (by an earlier attempt, perhaps of a promoter that died): the
            // value to restore is the one saved then.
            return self.receiver_conninfo(node).await;
        }
        // The old value is saved on the server itself first, so whoever acts next (this
        // process restarted, another promoter) can put it back: never only in memory.
        self.run(
            node,
            "stop wal receiver",
            &[
                saved_placeholder(),
                format!("ALTER SYSTEM SET {SAVED_CONNINFO} = {}", sql_literal(&prev)),
                "ALTER SYSTEM SET primary_conninfo = ''".to_string(),
                RELOAD.to_string(),
            ],
            self.step_timeout,
        )
        .await?;
        Ok(prev)
    }

    async fn restore_receiver(&self, node: &Member, conninfo: &str) -> Result<(), ActError> {
        self.run(
            node,
            "restore wal receiver",
            &[
                format!(
                    "ALTER SYSTEM SET primary_conninfo = {}",
                    sql_literal(conninfo)
                ),
                saved_placeholder(),
                format!("ALTER SYSTEM RESET {SAVED_CONNINFO}"),
                RELOAD.to_string(),
            ],
            self.step_timeout,
        )
        .await
        .map(|_| ())
    }

    async fn prepare(&self, node: &Member, sync_names: Option<&str>) -> Result<(), ActError> {
        let mut stmts = vec!["ALTER SYSTEM RESET default_transaction_read_only".to_string()];
        if let Some(v) = sync_names {
            stmts.push(format!(
                "ALTER SYSTEM SET synchronous_standby_names = {}",
                sql_literal(v)
            ));
        }
        stmts.push(RELOAD.to_string());
        self.run(node, "prepare candidate", &stmts, self.step_timeout)
            .await
            .map(|_| ())
    }

    async fn promote(&self, node: &Member, wait: Duration) -> Result<bool, ActError> {
        // `pg_promote(true, ...)` checks for the end of recovery every 100 ms; asking
        // `pg_is_in_recovery()` every 10 ms on the same session sees it up to 90 ms sooner
        // (a synchronous primary's first commit waits on all that follows).
        let work = async {
            let client = self.session(node, "pg_promote").await?;
            let ask = |sql: &'static str| {
                let client = &client;
                async move {
                    let msgs = client
                        .simple_query(sql)
                        .await
                        .map_err(|e| ActError::Server {
                            node: node.name.clone(),
                            what: "pg_promote",
                            source: probe::classify(e, true),
                        })?;
                    Ok::<_, ActError>(msgs.into_iter().find_map(|m| match m {
                        SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("") == "t"),
                        _ => None,
                    }))
                }
            };
            if ask("SELECT pg_promote(false)").await? != Some(true) {
                return Ok(false);
            }
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                if ask("SELECT pg_is_in_recovery()").await? == Some(false) {
                    return Ok(true);
                }
                if tokio::time::Instant::now() >= deadline {
                    return Ok(false);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        match tokio::time::timeout(wait + self.step_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(ActError::Timeout {
                node: node.name.clone(),
                what: "pg_promote",
                after: wait + self.step_timeout,
            }),
        }
    }

    async fn checkpoint(&self, node: &Member) -> Result<(), ActError> {
        self.run(
            node,
            "checkpoint",
            &["CHECKPOINT".to_string()],
            Duration::from_secs(120),
        )
        .await
        .map(|_| ())
    }

    async fn ensure_slot(&self, primary: &Member, slot: &str) -> Result<(), ActError> {
        let lit = sql_literal(slot);
        let r = self
            .run(
                primary,
                "create replication slot",
                &[format!(
                    "SELECT count(pg_create_physical_replication_slot({lit}, true)) \
                     FROM (SELECT 1) AS one \
                     WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {lit})"
                )],
                self.step_timeout,
            )
            .await;
        match r {
            // Created by someone else in between: what we wanted.
            Err(ActError::Server { source, .. })
                if source.code() == Some(&SqlState::DUPLICATE_OBJECT) =>
            {
                Ok(())
            }
            r => r.map(|_| ()),
        }
    }

    async fn repoint(&self, replica: &Member, primary: &Member) -> Result<(), ActError> {
        let slot = replica.slot_name();
        self.ensure_slot(primary, &slot).await?;
        let conninfo = self.conninfo_for(replica, primary);
        self.run(
            replica,
            "repoint",
            &[
                format!(
                    "ALTER SYSTEM SET primary_conninfo = {}",
                    sql_literal(&conninfo)
                ),
                format!(
                    "ALTER SYSTEM SET primary_slot_name = {}",
                    sql_literal(&slot)
                ),
                saved_placeholder(),
                format!("ALTER SYSTEM RESET {SAVED_CONNINFO}"),
                RELOAD.to_string(),
            ],
            self.step_timeout,
        )
        .await
        .map(|_| ())
    }

    async fn fence(&self, node: &Member) -> Result<u64, ActError> {
        let n = self
            .run(
                node,
                "fence",
                &[
                    "ALTER SYSTEM SET default_transaction_read_only = on".to_string(),
                    RELOAD.to_string(),
                    // The timeout form waits until each session is gone, so a commit in
                    // flight is either durable or never acknowledged when this returns.
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 3000)) \
                     FROM pg_stat_activity \
                     WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                        .to_string(),
                ],
                self.step_timeout + Duration::from_secs(10),
            )
            .await?;
        Ok(n.and_then(|s| s.parse().ok()).unwrap_or(0))
    }

    async fn unfence(&self, node: &Member) -> Result<(), ActError> {
        self.run(
            node,
            "unfence",
            &[
                "ALTER SYSTEM RESET default_transaction_read_only".to_string(),
                RELOAD.to_string(),
            ],
            self.step_timeout,
        )
        .await
        .map(|_| ())
    }

    async fn set_sync_names(&self, primary: &Member, value: &str) -> Result<(), ActError> {
        self.run(
            primary,
            "set synchronous_standby_names",
            &[
                format!(
                    "ALTER SYSTEM SET synchronous_standby_names = {}",
                    sql_literal(value)
                ),
                RELOAD.to_string(),
            ],
            self.step_timeout,
        )
        .await
        .map(|_| ())
    }
}

/// Reads like `PgPromoter`, changes nothing, logs what it would do.
#[derive(Clone)]
pub struct DryRun(pub PgPromoter);

impl Promoter for DryRun {
    async fn position(&self, node: &Member) -> Result<Position, ActError> {
        self.0.position(node).await
    }
    fn look_bound(&self) -> Option<Duration> {
        self.0.look_bound()
    }
    async fn stop_receiver(&self, node: &Member) -> Result<String, ActError> {
        info!(dry_run = true, node = %node.name, "would stop the WAL receiver");
        Ok(String::new())
    }
    async fn restore_receiver(&self, node: &Member, _conninfo: &str) -> Result<(), ActError> {
        info!(dry_run = true, node = %node.name, "would restore primary_conninfo");
        Ok(())
    }
    async fn prepare(&self, node: &Member, sync_names: Option<&str>) -> Result<(), ActError> {
        info!(dry_run = true, node = %node.name, sync_names, "would prepare the candidate");
        Ok(())
    }
    async fn promote(&self, node: &Member, _wait: Duration) -> Result<bool, ActError> {
        info!(dry_run = true, node = %node.name, "would promote");
        Ok(false)
    }
    async fn checkpoint(&self, node: &Member) -> Result<(), ActError> {
        info!(dry_run = true, node = %node.name, "would checkpoint");
        Ok(())
    }
    async fn ensure_slot(&self, primary: &Member, slot: &str) -> Result<(), ActError> {
        info!(dry_run = true, node = %primary.name, slot, "would create the slot");
        Ok(())
    }
    async fn repoint(&self, replica: &Member, primary: &Member) -> Result<(), ActError> {
        info!(dry_run = true, replica = %replica.name, primary = %primary.name, "would repoint");
        Ok(())
    }
    async fn fence(&self, node: &Member) -> Result<u64, ActError> {
        info!(dry_run = true, node = %node.name, "would fence");
        Ok(0)
    }
    async fn unfence(&self, node: &Member) -> Result<(), ActError> {
        info!(dry_run = true, node = %node.name, "would unfence");
        Ok(())
    }
    async fn set_sync_names(&self, primary: &Member, value: &str) -> Result<(), ActError> {
        info!(dry_run = true, node = %primary.name, value, "would set synchronous_standby_names");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::promoter::decide::{conninfo_target, parse_conninfo};

    fn m(name: &str, addr: &str) -> Member {
        Member {
            name: name.into(),
            address: addr.into(),
            priority: 100,
            no_failover: false,
        }
    }

    #[test]
    fn literals_are_escaped() {
        assert_eq!(sql_literal("a'b"), "'a''b'");
        assert_eq!(sql_literal("a'b\\c"), " E'a''b\\\\c'");
    }

    #[test]
    fn conninfo_round_trips_through_the_parser() {
        let c = conninfo(
            &m("pg-1", "db1.internal:5433"),
            &m("pg-2", "db2:5432"),
            "replicator",
            Some("p w'd\\x"),
            Duration::from_secs(3),
            &ClientTls::default(),
        );
        let pairs = parse_conninfo(&c);
        let get = |k: &str| pairs.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str());
        assert_eq!(get("password"), Some("p w'd\\x"));
        assert_eq!(get("application_name"), Some("pg-2"));
        assert_eq!(get("tcp_user_timeout"), Some("3000"));
        assert_eq!(get("connect_timeout"), Some("2"));
        assert_eq!(get("sslmode"), Some("prefer"));
        assert_eq!(get("sslrootcert"), None);
        assert_eq!(conninfo_target(&c), Some(("db1.internal".into(), 5433)));
    }

    #[test]
    fn positions() {
        let p = Position {
            receive_lsn: Some(Lsn(100)),
            replay_lsn: Some(Lsn(90)),
            ..Default::default()
        };
        assert_eq!(p.received(), Lsn(100));
        assert!(!p.caught_up());
        let restarted = Position {
            receive_lsn: None,
            replay_lsn: Some(Lsn(90)),
            ..Default::default()
        };
        assert_eq!(restarted.received(), Lsn(90));
        assert!(restarted.caught_up());
    }
}
