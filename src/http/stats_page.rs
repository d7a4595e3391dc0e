//! The HTML stats page: a template (`templates/stats.html`, askama, escaped by default) filled
//! from a `View`. One table per port, one row per backend; refreshes itself, no JavaScript.

use askama::Template;

use crate::view::{BackendView, ReloadResult, View};

struct Row {
    name: String,
    address: String,
    role: &'static str,
    /// Why it is fenced, for people; empty otherwise.
    fence_reason: &'static str,
    state: &'static str,
    condition: &'static str,
    admin: &'static str,
    weight: u32,
    since: String,
    timeline: String,
    lsn: String,
    receive_lsn: String,
    upstream: String,
    lag: String,
    write_now: u64,
    write_total: u64,
    write_max: u64,
    read_now: u64,
    read_total: u64,
    read_max: u64,
    bytes: String,
    check_ms: String,
    error: String,
    takes_writes: bool,
    takes_reads: bool,
}

/// The store pglb follows for writes (`[store]`).
struct StorePanel {
    kind: String,
    endpoints: String,
    prefix: String,
    reachable: bool,
    rule: &'static str,
    /// What the rule means right now, for people.
    rule_text: String,
    recorded: String,
    write_block: Option<String>,
    last_answer: String,
    errors: u64,
    last_error: Option<String>,
}

fn store_panel(st: &crate::view::StoreView) -> StorePanel {
    use crate::view::StoreRule;
    let rule_text = match st.rule {
        StoreRule::Record => "writes go only to the recorded primary",
        StoreRule::LastRecord => {
            "store unreachable: writes go only to the last recorded primary while its checks confirm it"
        }
        StoreRule::NoRecord => "no primary recorded yet: pglb's own rule (newest timeline) decides",
        StoreRule::Unreachable => "store unreachable and no primary ever read from it: no writes",
    };
    StorePanel {
        kind: st.kind.clone(),
        endpoints: st.endpoints.join(", "),
        prefix: st.prefix.clone(),
        reachable: st.reachable,
        rule: st.rule.as_str(),
        rule_text: rule_text.to_string(),
        recorded: match &st.recorded {
            Some(r) => format!("{} · timeline {} · epoch {}", r.name, r.timeline, r.epoch),
            None => "none".into(),
        },
        write_block: st.write_block.as_ref().map(|b| b.to_string()),
        last_answer: match st.seconds_since_answer {
            Some(s) => format!("{} ago", duration(s)),
            None => "never".into(),
        },
        errors: st.errors,
        last_error: st.last_error.clone(),
    }
}

/// What the promoter says of itself (its `/status`), when pglb is told where it is.
pub struct PromoterPanel {
    /// Where it was read from, or why it could not be.
    pub source: String,
    pub summary: String,
    pub last_failover: Option<String>,
}

#[derive(Template)]
#[template(path = "stats.html")]
struct Page {
    version: String,
    as_of: String,
    uptime: String,
    config_file: String,
    generation: u64,
    reload_result: String,
    reload_ok: bool,
    reload_counts: String,
    reload_error: Option<String>,
    primary: String,
    has_primary: bool,
    readers: String,
    listen_write: String,
    listen_read: String,
    waiting: u64,
    refresh_seconds: u32,
    promoter: Option<PromoterPanel>,
    store: Option<StorePanel>,
    rows: Vec<Row>,
}

fn duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn row(b: &BackendView, takes_writes: bool, takes_reads: bool) -> Row {
    let lag = match (b.lag_bytes, b.lag_seconds) {
        (Some(l), Some(s)) => format!("{} · {s:.1}s", bytes(l)),
        (Some(l), None) => bytes(l),
        _ => String::new(),
    };
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    Row {
        name: b.name.clone(),
        address: b.address.clone(),
        role: b.role.as_str(),
        fence_reason: b.fence_reason.map_or("", |r| r.describe()),
        state: b.state.as_str(),
        condition: b.condition.as_str(),
        admin: b.admin_state.as_str(),
        weight: b.weight,
        since: duration(b.seconds_since_change),
        timeline: b.timeline.map(|t| t.to_string()).unwrap_or_default(),
        lsn: opt(&b.lsn),
        receive_lsn: opt(&b.receive_lsn),
        upstream: opt(&b.upstream),
        lag,
        write_now: b.write.sessions_active,
        write_total: b.write.sessions_total,
        write_max: b.write.sessions_max,
        read_now: b.read.sessions_active,
        read_total: b.read.sessions_total,
        read_max: b.read.sessions_max,
        bytes: format!(
            "{} / {}",
            bytes(b.write.bytes_in + b.read.bytes_in),
            bytes(b.write.bytes_out + b.read.bytes_out)
        ),
        check_ms: b
            .check_latency_ms
            .map(|m| format!("{m:.1}"))
            .unwrap_or_default(),
        error: match (&b.last_error, &b.login_error) {
            (Some(e), _) => e.clone(),
            (None, Some(e)) => format!("new logins refused: {e}"),
            (None, None) => String::new(),
        },
        takes_writes,
        takes_reads,
    }
}

/// The page: one row per backend, both ports as columns.
pub fn render(s: &View, waiting: u64, promoter: Option<PromoterPanel>) -> String {
    let is_primary = |b: &BackendView| s.primary.as_deref() == Some(b.name.as_str());
    let fallback = s.readers.is_empty() && s.fallback_to_primary;
    let rows = s
        .backends
        .iter()
        .map(|b| {
            let reads = s.readers.contains(&b.name) || (fallback && is_primary(b));
            row(b, is_primary(b), reads)
        })
        .collect();
    let page = Page {
        version: s.version.clone(),
        as_of: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        uptime: duration(s.uptime_seconds),
        config_file: s.config_file.clone(),
        generation: s.generation,
        reload_ok: s.reload.result != ReloadResult::Rejected,
        reload_result: s.reload.result.as_str().to_string(),
        reload_counts: format!(
            "{} applied, {} refused",
            s.reload.applied, s.reload.rejected
        ),
        reload_error: s.reload.error.clone(),
        primary: s.primary.clone().unwrap_or_else(|| "none".into()),
        has_primary: s.primary.is_some(),
        readers: if s.readers.is_empty() {
            if fallback {
                "none (reads go to the primary)".into()
            } else {
                "none".into()
            }
        } else {
            s.readers.join(", ")
        },
        listen_write: s.listen.write.clone(),
        listen_read: s.listen.read.clone(),
        waiting,
        refresh_seconds: 2,
        promoter,
        store: s.store.as_ref().map(store_panel),
        rows,
    };
    page.render()
        .unwrap_or_else(|e| format!("<pre>stats page failed to render: {e}</pre>"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Role;

    #[test]
    fn human_units() {
        assert_eq!(duration(5.0), "5s");
        assert_eq!(duration(125.0), "2m05s");
        assert_eq!(duration(7300.0), "2h01m");
        assert_eq!(bytes(10), "10 B");
        assert_eq!(bytes(16 << 20), "16.0 MB");
    }

    fn snapshot() -> View {
        let port = crate::view::PortView {
            sessions_active: 3,
            sessions_total: 40,
            sessions_max: 7,
            bytes_in: 2048,
            bytes_out: 1 << 20,
        };
        let b = BackendView {
            name: "pg-1".into(),
            address: "10.0.0.2:5432".into(),
            weight: 1,
            role: Role::Replica,
            state: crate::view::Status::Down,
            admin_state: crate::view::AdminState::Enabled,
            seconds_since_change: 65.0,
            in_recovery: Some(true),
            timeline: Some(2),
            system_id: None,
            lsn: None,
            receive_lsn: None,
            lag_bytes: Some(4096),
            lag_seconds: Some(1.5),
            read_eligible: false,
            streaming: Some(false),
            check_latency_ms: Some(3.25),
            last_check_unix: None,
            last_error: Some("authentication failed: <b>bad</b>".into()),
            last_error_kind: Some("auth".into()),
            sessions_active: 6,
            write: port,
            read: port,
            ..Default::default()
        };
        View {
            version: "0.0.0".into(),
            uptime_seconds: 10.0,
            config_file: "lb.toml".into(),
            generation: 4,
            reload: Default::default(),
            primary: None,
            readers: vec![],
            fallback_to_primary: false,
            listen: crate::view::Listen {
                write: "w".into(),
                read: "r".into(),
                stats: "s".into(),
            },
            backends: vec![b],
            ..Default::default()
        }
    }

    #[test]
    fn renders_one_row_per_backend_with_escaped_errors() {
        let html = render(&snapshot(), 0, None);
        assert_eq!(html.matches("<table>").count(), 1);
        assert_eq!(html.matches("<tr class=\"down\">").count(), 1);
        assert!(html.contains("write sessions") && html.contains("read sessions"));
        assert!(html.contains("pg-1"));
        assert!(html.contains("1m05s"));
        assert!(html.contains("4.0 kB"));
        assert!(
            html.contains("authentication failed: &#60;b&#62;bad&#60;/b&#62;")
                || html.contains("authentication failed: &lt;b&gt;bad&lt;/b&gt;"),
            "{html}"
        );
        assert!(!html.contains("<b>bad</b>"));
        assert!(html.contains("generation <b>4</b>"));
        assert!(
            !html.contains("promoter"),
            "no promoter panel without a promoter"
        );
    }

    #[test]
    fn shows_the_promoters_state_when_it_has_one() {
        let panel = PromoterPanel {
            source: "http://promoter:8405/status".into(),
            summary: "decision: steady · primary: pg-1 · failovers: 1".into(),
            last_failover: Some("pg-0 → pg-1 at 2026-12-01T10:00:00Z: promoted in 2.9 s".into()),
        };
        let html = render(&snapshot(), 2, Some(panel));
        assert!(html.contains("decision: steady"), "{html}");
        assert!(
            html.contains("pg-0 → pg-1 at 2026-12-01T10:00:00Z"),
            "{html}"
        );
        assert!(html.contains("2 new sessions waiting"), "{html}");
    }

    #[test]
    fn shows_the_store_and_why_a_backend_is_fenced() {
        let mut v = snapshot();
        v.backends[0].role = Role::Fenced;
        v.backends[0].fence_reason = Some(crate::view::FenceReason::NotRecorded);
        v.store = Some(crate::view::StoreView {
            kind: "etcd".into(),
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/pglb/main".into(),
            reachable: false,
            recorded: Some(crate::view::RecordView {
                name: "pg-0".into(),
                timeline: 3,
                epoch: 2,
                revision: 9,
            }),
            rule: crate::view::StoreRule::LastRecord,
            write_block: Some(crate::view::WriteBlock::RecordedDown {
                name: "pg-0".into(),
            }),
            seconds_since_answer: Some(12.0),
            errors: 4,
            last_error: Some("etcd get on /pglb/main/primary: no answer".into()),
            last_error_kind: Some("timeout".into()),
            last_answer: None,
        });
        let html = render(&v, 0, None);
        assert!(html.contains("unreachable"), "{html}");
        assert!(html.contains("pg-0 · timeline 3 · epoch 2"), "{html}");
        assert!(html.contains("last_record"), "{html}");
        assert!(html.contains("the recorded primary pg-0 is down"), "{html}");
        assert!(html.contains("12s ago"), "{html}");
        assert!(html.contains("the store records another primary"), "{html}");
        // Without a store, no store section.
        assert!(!render(&snapshot(), 0, None).contains("recorded primary"));
    }
}
