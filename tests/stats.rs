//! The stats listener against a live cluster: HTML page, `/stats.json`, `/metrics`, `/health`,
//! the page as a browser renders it (headless Chromium), and the admin API with and without its
//! token.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn generate_wal(cluster: &PgCluster, mb: usize) {
    cluster.primary().exec(&format!(
        "CREATE TABLE IF NOT EXISTS wal_filler(x text); \
         INSERT INTO wal_filler SELECT repeat('x', 1000) FROM generate_series(1, {});",
        mb * 1000
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn page_json_and_metrics_show_roles_errors_and_lag() {
    let cluster = PgCluster::start(2);
    let lb = Pglb::start(&cluster).await;
    lb.wait_stats(Duration::from_secs(20), "replicas up", |s| {
        s.backend("pg-1").state == "up" && s.backend("pg-2").state == "up"
    })
    .await;

    // A session, so counters move.
    let c = connect_ok(lb.write).await;
    scalar_ok(&c, "SELECT 1").await;

    // A stopped replica shows down, with its reason (once stopped: refused).
    cluster.node(2).stop();
    let s = lb
        .wait_stats(Duration::from_secs(15), "pg-2 down, refused", |s| {
            let b = s.backend("pg-2");
            b.state == "down"
                && b.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("connection refused"))
        })
        .await;
    let err = s.backend("pg-2").last_error.clone().unwrap();

    // A paused replica's lag grows, in JSON and metrics.
    cluster.node(1).pause_replay();
    generate_wal(&cluster, 3);
    let s = lb
        .wait_stats(Duration::from_secs(20), "pg-1 lag above 1MB", |s| {
            s.backend("pg-1").lag_bytes.unwrap_or(0) > 1 << 20
        })
        .await;
    assert_eq!(s.primary.as_deref(), Some("pg-0"));
    assert_eq!(s.backend("pg-0").role, "primary");
    assert_eq!(s.backend("pg-1").role, "replica");

    let (code, html) = http_request(lb.stats, "GET", "/", None);
    assert_eq!(code, 200);
    assert_eq!(html.matches("<table>").count(), 1, "one table, ports as columns");
    for needle in [
        "pg-0",
        "pg-1",
        "pg-2",
        "primary",
        "replica",
        "down",
        "write port",
        "read port",
    ] {
        assert!(html.contains(needle), "page lacks {needle:?}");
    }
    assert!(
        html.contains(&err.replace('"', "&#34;")) || html.contains(&err),
        "page lacks the error"
    );
    assert!(html.contains("http-equiv=\"refresh\""));

    let (code, metrics) = http_request(lb.stats, "GET", "/metrics", None);
    assert_eq!(code, 200);
    assert_eq!(
        metric(&metrics, "pglb_backend_up{backend=\"pg-0\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&metrics, "pglb_backend_up{backend=\"pg-2\"}"),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "pglb_backend_role{backend=\"pg-0\",role=\"primary\"}"
        ),
        Some(1.0)
    );
    assert!(metric(&metrics, "pglb_replica_lag_bytes{backend=\"pg-1\"}").unwrap_or(0.0) > 1e6);
    assert!(metrics.contains("pglb_check_duration_seconds_bucket{backend=\"pg-0\""));
    assert!(
        metric(
            &metrics,
            "pglb_sessions_total{port=\"write\",backend=\"pg-0\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert!(!metrics.contains(CHECK_PASSWORD));

    assert_eq!(http_request(lb.stats, "GET", "/health", None).0, 200);
    cluster.node(1).resume_replay();
    cluster.primary().stop();
    lb.wait_stats(Duration::from_secs(15), "no primary", |s| {
        s.primary.is_none()
    })
    .await;
    let (code, body) = http_request(lb.stats, "GET", "/health", None);
    assert_eq!(code, 503);
    assert!(body.contains("no primary"), "{body}");
}

fn chromium() -> String {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {c}")])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c.to_string();
        }
    }
    panic!("headless Chromium is required for this test (Debian: apt-get install chromium); .ci/run installs it");
}

fn browser(args: &[&str], url: &str) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            &format!("--user-data-dir={}", profile.path().display()),
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn browser_renders_one_row_per_backend_with_both_ports_as_columns() {
    let cluster = PgCluster::start(2);
    let lb = Pglb::start(&cluster).await;
    lb.wait_stats(Duration::from_secs(20), "all up", |s| {
        s.backends.iter().all(|b| b.state == "up")
    })
    .await;
    let url = format!("http://{}/", lb.stats);
    let out = browser(&["--dump-dom"], &url);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One table, one row per backend (ports as columns), as the browser parsed it.
    assert_eq!(dom.matches("<table>").count(), 1, "{dom}");
    assert_eq!(dom.matches("<tr class=\"up\">").count(), 3, "{dom}");
    assert!(dom.contains("role-primary"));
    assert!(
        dom.contains("write sessions") && dom.contains("read sessions"),
        "{dom}"
    );
    assert!(dom.contains("as of "), "{dom}");
    // Replicas show the backend they stream from.
    assert_eq!(dom.matches("<td>pg-0</td>").count(), 2, "{dom}");

    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("stats.png");
    let out = browser(
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1800,400",
            "--hide-scrollbars",
        ],
        &url,
    );
    assert!(out.status.success(), "chromium screenshot failed: {out:?}");
    let bytes = std::fs::read(&png).expect("screenshot written");
    assert_eq!(&bytes[1..4], b"PNG");
    assert!(
        bytes.len() > 10_000,
        "screenshot suspiciously small: {} bytes",
        bytes.len()
    );
    if let Some(dest) = std::env::var_os("PGLB_SAVE_SCREENSHOT") {
        std::fs::copy(&png, dest).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_actions_need_the_token_and_survive_reload() {
    const TOKEN: &str = "admin-token-5e1f";
    let cluster = PgCluster::start(2);
    let builder = || Pglb::builder(&cluster).set("stats", "admin_token_env", "PGLB_ADMIN_TOKEN");
    let lb = builder().env("PGLB_ADMIN_TOKEN", TOKEN).start();
    lb.wait_ready().await;
    lb.wait_stats(Duration::from_secs(20), "replicas readable", |s| {
        s.backend("pg-1").read_eligible && s.backend("pg-2").read_eligible
    })
    .await;
    let (p1, p2) = (cluster.node(1).port(), cluster.node(2).port());

    // Without or with a wrong token: 401 and a log line; nothing changes.
    assert_eq!(
        http_request(lb.stats, "POST", "/api/backends/pg-1/drain", None).0,
        401
    );
    assert_eq!(
        http_request(lb.stats, "POST", "/api/backends/pg-1/drain", Some("nope")).0,
        401
    );
    lb.wait_log(Duration::from_secs(5), "admin action refused")
        .await;
    assert_eq!(lb.stats().unwrap().backend("pg-1").state, "up");
    assert_eq!(
        http_request(lb.stats, "POST", "/api/backends/pg-9/drain", Some(TOKEN)).0,
        404
    );

    // Open one read session on each replica.
    let mut on = std::collections::HashMap::new();
    for _ in 0..20 {
        let c = connect_ok(lb.read).await;
        let port = backend_port(&c).await;
        on.entry(port).or_insert(c);
        if on.len() == 2 {
            break;
        }
    }
    assert!(
        on.contains_key(&p1) && on.contains_key(&p2),
        "sessions on both replicas"
    );

    // drain pg-1: no new sessions, the open one stays.
    let (code, body) = http_request(lb.stats, "POST", "/api/backends/pg-1/drain", Some(TOKEN));
    assert_eq!(code, 200, "{body}");
    assert_eq!(lb.stats().unwrap().backend("pg-1").state, "draining");
    for _ in 0..6 {
        assert_eq!(
            landing_port(lb.read).await,
            p2,
            "drained pg-1 took a new session"
        );
    }
    scalar_ok(&on[&p1], "SELECT 1").await;

    // The admin state survives a reload that keeps the backend.
    let text = builder()
        .set("read", "max_lag", "32MB")
        .render(lb.write, lb.read, lb.stats);
    std::fs::write(lb.config_path(), text).unwrap();
    lb.wait_stats(Duration::from_secs(10), "reload applied", |s| {
        serde_json::from_str::<serde_json::Value>(&s.raw).unwrap()["reload"]["applied"] == 1
    })
    .await;
    assert_eq!(lb.stats().unwrap().backend("pg-1").state, "draining");

    // disable pg-2: its open session is closed; reads fall back to the primary.
    assert_eq!(
        http_request(lb.stats, "POST", "/api/backends/pg-2/disable", Some(TOKEN)).0,
        200
    );
    wait_until_async(Duration::from_secs(5), "pg-2 session closed", || async {
        scalar(&on[&p2], "SELECT 1").await.is_err()
    })
    .await;
    assert_eq!(landing_port(lb.read).await, cluster.primary().port());
    scalar_ok(&on[&p1], "SELECT 1").await;

    // enable both: reads go to the replicas again.
    for b in ["pg-1", "pg-2"] {
        assert_eq!(
            http_request(
                lb.stats,
                "POST",
                &format!("/api/backends/{b}/enable"),
                Some(TOKEN)
            )
            .0,
            200
        );
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..8 {
        seen.insert(landing_port(lb.read).await);
    }
    assert_eq!(seen, [p1, p2].into_iter().collect());
    assert!(
        !lb.log_text().contains(TOKEN),
        "the token leaked into the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_actions_are_off_without_a_token() {
    let cluster = PgCluster::start(0);
    let lb = Pglb::start(&cluster).await;
    let (code, body) = http_request(
        lb.stats,
        "POST",
        "/api/backends/pg-0/disable",
        Some("anything"),
    );
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("admin actions are off"));
    assert_eq!(lb.stats().unwrap().backend("pg-0").state, "up");
}
