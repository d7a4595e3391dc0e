//! The promoter's metric names (consts, units in the name) and descriptions. Labels come only
//! from closed sets (`Decision::kind`, `WaitReason::kind`, action and outcome names) or from
//! backend names in the config. Kept beside the promoter so the balancer's `metrics` stays its own.

use metrics::{counter, describe_counter, describe_gauge, gauge, Unit};

pub const LOOKS_TOTAL: &str = "pglb_promoter_looks_total";
pub const DECISIONS_TOTAL: &str = "pglb_promoter_decisions_total";
pub const FAILOVERS_TOTAL: &str = "pglb_promoter_failovers_total";
pub const ACTIONS_TOTAL: &str = "pglb_promoter_actions_total";
pub const LAST_FAILOVER_SECONDS: &str = "pglb_promoter_last_failover_seconds";
pub const PRIMARY_DOWN_SECONDS: &str = "pglb_promoter_primary_down_seconds";
pub const PRIMARY_KNOWN: &str = "pglb_promoter_primary_known";
pub const BACKEND_REACHABLE: &str = "pglb_promoter_backend_reachable";
pub const CONFIG_RELOADS_TOTAL: &str = "pglb_promoter_config_reloads_total";
pub const INFO: &str = "pglb_promoter_info";
pub const IS_LEADER: &str = "pglb_promoter_is_leader";
pub const LEADERSHIP_CHANGES_TOTAL: &str = "pglb_promoter_leadership_changes_total";
pub const STORE_ERRORS_TOTAL: &str = "pglb_promoter_store_errors_total";
pub const STORE_REACHABLE: &str = "pglb_promoter_store_reachable";
pub const GUARD_REFUSED_TOTAL: &str = "pglb_promoter_guard_refused_total";

/// Registers descriptions; call once after installing the recorder.
pub fn describe() {
    describe_counter!(LOOKS_TOTAL, "looks at the cluster (observe + decide)");
    describe_counter!(
        CONFIG_RELOADS_TOTAL,
        "config reload attempts by result (applied, rejected, unchanged)"
    );
    describe_counter!(
        DECISIONS_TOTAL,
        "decisions by kind (steady, reconcile, failover, wait) and wait reason"
    );
    describe_counter!(
        FAILOVERS_TOTAL,
        "failovers started, by outcome (promoted or the reason none was)"
    );
    describe_counter!(
        ACTIONS_TOTAL,
        "changes made to servers (repoint, set_sync_names, fence), by result"
    );
    describe_gauge!(
        LAST_FAILOVER_SECONDS,
        Unit::Seconds,
        "last failover: from the primary's last answer to the verified promotion"
    );
    describe_gauge!(
        PRIMARY_DOWN_SECONDS,
        Unit::Seconds,
        "how long no primary has answered (0 while one does)"
    );
    describe_gauge!(PRIMARY_KNOWN, "1 when a primary answers the promoter");
    describe_gauge!(INFO, "1, labelled with this promoter's id and version");
    describe_gauge!(
        IS_LEADER,
        "1 while this promoter holds the leader key (with [store])"
    );
    describe_counter!(
        LEADERSHIP_CHANGES_TOTAL,
        "times this promoter became leader (to=leader) or stopped leading (to=follower)"
    );
    describe_counter!(
        STORE_ERRORS_TOTAL,
        "failed store requests, by kind (timeout, etcd, not_leader, decode, ...)"
    );
    describe_gauge!(
        STORE_REACHABLE,
        "1 when the store answered the last request"
    );
    describe_counter!(
        GUARD_REFUSED_TOTAL,
        "server changes refused by the store gate (not the leader, or the guarded record or \
         journal entry did not commit), by reason"
    );
    describe_gauge!(
        BACKEND_REACHABLE,
        "1 when the promoter can log in to the backend"
    );
}

pub fn look() {
    counter!(LOOKS_TOTAL).increment(1);
}

pub fn decision(kind: &'static str, reason: &'static str) {
    counter!(DECISIONS_TOTAL, "decision" => kind, "reason" => reason).increment(1);
}

pub fn failover(outcome: &'static str) {
    counter!(FAILOVERS_TOTAL, "outcome" => outcome).increment(1);
}

pub fn action(action: &'static str, ok: bool) {
    counter!(ACTIONS_TOTAL, "action" => action, "result" => if ok { "ok" } else { "error" })
        .increment(1);
}

pub fn last_failover(seconds: f64) {
    gauge!(LAST_FAILOVER_SECONDS).set(seconds);
}

pub fn primary(known: bool, down_seconds: f64) {
    gauge!(PRIMARY_KNOWN).set(if known { 1.0 } else { 0.0 });
    gauge!(PRIMARY_DOWN_SECONDS).set(down_seconds);
}

pub fn reachable(backend: &str, up: bool) {
    gauge!(BACKEND_REACHABLE, "backend" => backend.to_string()).set(if up { 1.0 } else { 0.0 });
}

pub fn config_reload(result: &'static str) {
    counter!(CONFIG_RELOADS_TOTAL, "result" => result).increment(1);
}

pub fn info(id: &str) {
    gauge!(INFO, "id" => id.to_string(), "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

pub fn leader(leading: bool) {
    gauge!(IS_LEADER).set(if leading { 1.0 } else { 0.0 });
}

pub fn leadership_change(leading: bool) {
    counter!(LEADERSHIP_CHANGES_TOTAL, "to" => if leading { "leader" } else { "follower" })
        .increment(1);
}

pub fn store_error(kind: &'static str) {
    counter!(STORE_ERRORS_TOTAL, "kind" => kind).increment(1);
}

pub fn store_reachable(up: bool) {
    gauge!(STORE_REACHABLE).set(if up { 1.0 } else { 0.0 });
}

pub fn guard_refused(reason: &'static str) {
    counter!(GUARD_REFUSED_TOTAL, "reason" => reason).increment(1);
}
