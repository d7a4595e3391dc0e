//! Metric names (consts, units in the name), their descriptions, and small helpers that record
//! them with labels from closed sets or configured backend names only: never peer addresses or
//! error text. The Prometheus recorder is installed once by `app`.

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::proxy::PortRole;

pub const BACKEND_UP: &str = "pglb_backend_up";
pub const BACKEND_ROLE: &str = "pglb_backend_role";
pub const SESSIONS_ACTIVE: &str = "pglb_sessions_active";
pub const SESSIONS_TOTAL: &str = "pglb_sessions_total";
pub const SESSIONS_CUT_TOTAL: &str = "pglb_sessions_cut_total";
pub const CLIENTS_REJECTED_TOTAL: &str = "pglb_clients_rejected_total";
pub const BACKEND_CONNECT_FAILURES_TOTAL: &str = "pglb_backend_connect_failures_total";
pub const BYTES_TOTAL: &str = "pglb_bytes_total";
pub const CHECK_DURATION_SECONDS: &str = "pglb_check_duration_seconds";
pub const CHECKS_TOTAL: &str = "pglb_checks_total";
pub const REPLICA_LAG_BYTES: &str = "pglb_replica_lag_bytes";
pub const REPLICA_LAG_SECONDS: &str = "pglb_replica_lag_seconds";
pub const CONFIG_RELOADS_TOTAL: &str = "pglb_config_reloads_total";
pub const CONFIG_LAST_RELOAD_OK: &str = "pglb_config_last_reload_successful";
pub const SESSIONS_QUEUED_TOTAL: &str = "pglb_sessions_queued_total";
pub const ACCEPT_ERRORS_TOTAL: &str = "pglb_accept_errors_total";
pub const PRIMARY_KNOWN: &str = "pglb_primary_known";
pub const BUILD_INFO: &str = "pglb_build_info";
pub const CHECK_LOGINS_REFUSED_TOTAL: &str = "pglb_check_logins_refused_total";
pub const SESSIONS_WAITING: &str = "pglb_sessions_waiting";
pub const STORE_UP: &str = "pglb_store_up";
pub const STORE_ERRORS_TOTAL: &str = "pglb_store_errors_total";
pub const STORE_ANSWER_AGE_SECONDS: &str = "pglb_store_last_answer_age_seconds";
pub const STORE_RULE: &str = "pglb_store_rule";
pub const STORE_RECORDED_EPOCH: &str = "pglb_store_recorded_epoch";
pub const TLS_AFFINITY_TOTAL: &str = "pglb_tls_affinity_total";

const PORTS: [PortRole; 2] = [PortRole::Write, PortRole::Read];
/// Every `reason` label of `pglb_sessions_cut_total`.
pub const CUT_REASONS: [&str; 4] = ["writer_changed", "backend_cut", "idle_timeout", "shutdown"];
/// The `reason` labels of `pglb_clients_rejected_total` known before any client came (invalid
/// first packets add their own kind when they happen).
const REJECT_REASONS: [&str; 4] = ["no_backend", "queue_timeout", "maxconn", "startup_timeout"];
/// Every `result` label of `pglb_config_reloads_total`.
const RELOAD_RESULTS: [&str; 3] = ["applied", "rejected", "unchanged"];

/// Registers descriptions; call once after installing the recorder.
pub fn describe() {
    describe_gauge!(BACKEND_UP, "1 when the backend passes its checks");
    describe_gauge!(
        BACKEND_ROLE,
        "1 for the backend's current role (label role)"
    );
    describe_gauge!(SESSIONS_ACTIVE, "open client sessions");
    describe_counter!(SESSIONS_TOTAL, "client sessions spliced to a backend");
    describe_counter!(
        SESSIONS_CUT_TOTAL,
        "sessions closed by pglb (writer changed, backend disabled, shutdown)"
    );
    describe_counter!(
        CLIENTS_REJECTED_TOTAL,
        "clients refused before reaching a backend, by reason"
    );
    describe_counter!(
        BACKEND_CONNECT_FAILURES_TOTAL,
        "session connects to a backend that failed"
    );
    describe_counter!(
        BYTES_TOTAL,
        Unit::Bytes,
        "bytes spliced, direction=in (client to backend) or out"
    );
    describe_histogram!(
        CHECK_DURATION_SECONDS,
        Unit::Seconds,
        "duration of one health check"
    );
    describe_counter!(CHECKS_TOTAL, "health checks by result");
    describe_gauge!(
        REPLICA_LAG_BYTES,
        Unit::Bytes,
        "WAL bytes a replica's replay is behind the primary"
    );
    describe_gauge!(
        REPLICA_LAG_SECONDS,
        Unit::Seconds,
        "how long the primary has been ahead of the replica's replay"
    );
    describe_counter!(
        CONFIG_RELOADS_TOTAL,
        "config reloads by result (applied, rejected, unchanged)"
    );
    describe_gauge!(
        CONFIG_LAST_RELOAD_OK,
        "1 when the last config reload was applied or unchanged"
    );
    describe_counter!(
        ACCEPT_ERRORS_TOTAL,
        "accept() failures (e.g. out of file descriptors)"
    );
    describe_gauge!(
        PRIMARY_KNOWN,
        "1 when pglb knows a primary to send writes to"
    );
    describe_counter!(
        SESSIONS_QUEUED_TOTAL,
        "sessions that waited for a slot on a backend at its maxconn"
    );
    describe_gauge!(BUILD_INFO, "always 1; the version is a label");
    describe_counter!(
        CHECK_LOGINS_REFUSED_TOTAL,
        "check logins refused while the kept check connection still answered (server full, login no longer allowed)"
    );
    describe_gauge!(
        SESSIONS_WAITING,
        "new sessions waiting for a backend on a port that has none (wait_for_backend)"
    );

    describe_gauge!(
        STORE_UP,
        "1 when the store ([store]) answered pglb's last read of the recorded primary"
    );
    describe_counter!(
        STORE_ERRORS_TOTAL,
        "failed reads of the store (and failed client set-ups), by kind"
    );
    describe_gauge!(
        STORE_ANSWER_AGE_SECONDS,
        Unit::Seconds,
        "time since the store last answered pglb"
    );
    describe_gauge!(
        STORE_RULE,
        "1 for how the store decides writes now (label rule: record, last_record, no_record, unreachable)"
    );
    describe_gauge!(
        STORE_RECORDED_EPOCH,
        "epoch of the primary recorded in the store (each failover records the next)"
    );
    describe_counter!(
        TLS_AFFINITY_TOTAL,
        "encrypted (TLS, GSS) read-port connections by how [read] tls_affinity routed them: rule=inflight or answering (to the backend of a busy session of the same client address: it may be a cancel), unavailable (that backend takes no connections), none (no busy session: balanced)"
    );

    // Every family with labels from a closed set is present from the start, at 0, so that
    // dashboards and alerts see 0 rather than no data.
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    gauge!(CONFIG_LAST_RELOAD_OK).set(1.0);
    for r in RELOAD_RESULTS {
        counter!(CONFIG_RELOADS_TOTAL, "result" => r).absolute(0);
    }
    for port in PORTS {
        gauge!(SESSIONS_WAITING, "port" => port.as_str()).set(0.0);
        counter!(ACCEPT_ERRORS_TOTAL, "port" => port.as_str()).absolute(0);
        counter!(SESSIONS_QUEUED_TOTAL, "port" => port.as_str()).absolute(0);
        for reason in CUT_REASONS {
            counter!(SESSIONS_CUT_TOTAL, "port" => port.as_str(), "reason" => reason).absolute(0);
        }
        for reason in REJECT_REASONS {
            counter!(CLIENTS_REJECTED_TOTAL, "port" => port.as_str(), "reason" => reason)
                .absolute(0);
        }
    }
    for rule in crate::proxy::affinity::Rule::ALL {
        counter!(TLS_AFFINITY_TOTAL, "port" => PortRole::Read.as_str(), "rule" => rule.as_str())
            .absolute(0);
    }
}

/// Per-backend families at 0 for a backend that has not had the event yet (called for every
/// backend at each scrape; adding 0 changes no value).
pub fn backend_zeros(backend: &str) {
    for port in PORTS {
        let labels = [
            ("port", port.as_str().to_string()),
            ("backend", backend.to_string()),
        ];
        counter!(SESSIONS_TOTAL, &labels).increment(0);
        gauge!(SESSIONS_ACTIVE, &labels).increment(0.0);
    }
    for result in ["ok", "refused", "timeout", "auth"] {
        counter!(CHECKS_TOTAL, "backend" => backend.to_string(), "result" => result).increment(0);
    }
    for reason in ["refused", "timeout", "dns", "io"] {
        counter!(BACKEND_CONNECT_FAILURES_TOTAL, "backend" => backend.to_string(), "reason" => reason)
            .increment(0);
    }
}

/// Kinds of `pglb_store_errors_total` shown at 0 from the start (with `[store]` only).
const STORE_ERROR_KINDS: [&str; 4] = ["connect", "etcd", "timeout", "decode"];

/// The store families at 0, when pglb follows a store.
pub fn store_zeros() {
    gauge!(STORE_UP).set(0.0);
    for kind in STORE_ERROR_KINDS {
        counter!(STORE_ERRORS_TOTAL, "kind" => kind).increment(0);
    }
}

pub fn store_errors(kind: &'static str, n: u64) {
    counter!(STORE_ERRORS_TOTAL, "kind" => kind).increment(n);
}

pub fn session_started(port: PortRole, backend: &str) {
    let labels = [
        ("port", port.as_str().to_string()),
        ("backend", backend.to_string()),
    ];
    gauge!(SESSIONS_ACTIVE, &labels).increment(1.0);
    counter!(SESSIONS_TOTAL, &labels).increment(1);
}

pub fn session_ended(port: PortRole, backend: &str) {
    gauge!(SESSIONS_ACTIVE, "port" => port.as_str(), "backend" => backend.to_string())
        .decrement(1.0);
}

pub fn session_cut(port: PortRole, reason: &'static str) {
    counter!(SESSIONS_CUT_TOTAL, "port" => port.as_str(), "reason" => reason).increment(1);
}

pub fn client_rejected(port: PortRole, reason: &'static str) {
    counter!(CLIENTS_REJECTED_TOTAL, "port" => port.as_str(), "reason" => reason).increment(1);
}

pub fn backend_connect_failed(backend: &str, kind: &'static str) {
    counter!(BACKEND_CONNECT_FAILURES_TOTAL, "backend" => backend.to_string(), "reason" => kind)
        .increment(1);
}

pub fn accept_error(port: PortRole) {
    counter!(ACCEPT_ERRORS_TOTAL, "port" => port.as_str()).increment(1);
}

pub fn check_result(backend: &str, result: &'static str, seconds: f64) {
    counter!(CHECKS_TOTAL, "backend" => backend.to_string(), "result" => result).increment(1);
    histogram!(CHECK_DURATION_SECONDS, "backend" => backend.to_string()).record(seconds);
}

pub fn config_reload(result: &'static str) {
    counter!(CONFIG_RELOADS_TOTAL, "result" => result).increment(1);
    gauge!(CONFIG_LAST_RELOAD_OK).set(if result == "rejected" { 0.0 } else { 1.0 });
}

pub fn tls_affinity(port: PortRole, rule: &'static str) {
    counter!(TLS_AFFINITY_TOTAL, "port" => port.as_str(), "rule" => rule).increment(1);
}

pub fn session_queued(port: PortRole) {
    counter!(SESSIONS_QUEUED_TOTAL, "port" => port.as_str()).increment(1);
}

pub fn check_login_refused(backend: &str, kind: &'static str) {
    counter!(CHECK_LOGINS_REFUSED_TOTAL, "backend" => backend.to_string(), "reason" => kind)
        .increment(1);
}

pub fn sessions_waiting(port: PortRole, delta: f64) {
    gauge!(SESSIONS_WAITING, "port" => port.as_str()).increment(delta);
}

/// Installs the Prometheus recorder once per process and describes every metric of both binaries
/// (a description shows only beside a metric that has a value); later calls get the same handle.
pub fn prometheus() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new().set_buckets_for_metric(
                Matcher::Full(CHECK_DURATION_SECONDS.to_string()),
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            );
            match builder.and_then(|b| b.install_recorder()) {
                Ok(h) => {
                    describe();
                    crate::promoter::metrics::describe();
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .clone()
}
