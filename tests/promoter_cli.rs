//! `pglb-promoter`'s command line: its own help and version, `--dry-run` at the top level (the
//! form the docs show) and as `run --dry-run`, and a config check that needs only the
//! promoter's own secrets.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::promoter::*;
use common::*;

const T: Duration = Duration::from_secs(30);

fn promoter(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    output_of(
        Command::new(promoter_bin())
            .args(args)
            .env_remove("PGLB_CHECK_PASSWORD")
            .env_remove("PGLB_CONFIG")
            .env_remove("RUST_LOG")
            .env_remove("PGLB_LOG"),
    )
}

#[test]
fn help_and_version_speak_of_the_promoter() {
    let (st, out, _) = promoter(&["--help"]);
    assert!(st.success());
    assert!(
        out.starts_with("pglb-promoter: the failover sidecar of pglb"),
        "{out}"
    );
    assert!(out.contains("Usage: pglb-promoter"), "{out}");
    assert!(out.contains("--dry-run"), "{out}");
    for sub in ["run", "check", "switchover", "rejoin"] {
        assert!(out.contains(sub), "{sub} missing: {out}");
    }
    assert!(!out.contains("Layer-4 load balancer"), "{out}");

    let (st, out, _) = promoter(&["--version"]);
    assert!(st.success());
    assert_eq!(
        out.trim(),
        format!("pglb-promoter {}", env!("CARGO_PKG_VERSION"))
    );
}

/// A config with a [promoter] section whose backends listen nowhere; `[check]` wants a password
/// from an env var that is not set (pglb's secret, not the promoter's).
fn offline_config(dir: &Path) -> (std::path::PathBuf, std::net::SocketAddr) {
    let status = free_addr();
    let path = dir.join("lb.toml");
    std::fs::write(
        &path,
        format!(
            r#"[listen]
write = "127.0.0.1:{w}"
read = "127.0.0.1:{r}"
stats = "127.0.0.1:{s}"

[check]
user = "pglb_check"
password_env = "PGLB_CHECK_PASSWORD"

[promoter]
user = "postgres"
failover_after = "2s"
interval = "200ms"
pglb_url = ["http://127.0.0.1:{s}", "http://127.0.0.1:{s2}"]
listen = "{status}"

[[backend]]
name = "pg-0"
address = "127.0.0.1:{b0}"

[[backend]]
name = "pg-1"
address = "127.0.0.1:{b1}"
"#,
            w = free_port(),
            r = free_port(),
            s = free_port(),
            s2 = free_port(),
            b0 = free_port(),
            b1 = free_port(),
        ),
    )
    .expect("write config");
    (path, status)
}

#[test]
fn check_needs_only_the_promoters_own_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = offline_config(dir.path());
    let (st, _, err) = promoter(&["check", "--config", path.to_str().unwrap()]);
    assert!(st.success(), "{err}");
    assert!(err.contains("is valid: 2 backends"), "{err}");
}

#[test]
fn dry_run_belongs_to_the_sidecar_only() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = offline_config(dir.path());
    let (st, _, err) = promoter(&[
        "--config",
        path.to_str().unwrap(),
        "--dry-run",
        "switchover",
        "--to",
        "pg-1",
    ]);
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(err.contains("--dry-run applies to the sidecar"), "{err}");
}

#[test]
fn an_id_that_cannot_name_a_store_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = offline_config(dir.path());
    let (st, _, err) = promoter(&["--config", path.to_str().unwrap(), "--id", "a/b"]);
    assert_eq!(st.code(), Some(64), "{err}");
    assert!(err.contains("--id"), "{err}");
}

/// `run --dry-run` (kept working) starts the sidecar in dry-run mode, with both pglb listed as
/// witnesses (neither runs here: both unreachable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_dry_run_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let (path, status) = offline_config(dir.path());
    let log = std::fs::File::create(dir.path().join("promoter.log")).unwrap();
    let mut child = Command::new(promoter_bin())
        .args(["--config", path.to_str().unwrap(), "run", "--dry-run"])
        .args(["--id", "promoter-a.1"])
        .env_remove("PGLB_CHECK_PASSWORD")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn pglb-promoter");
    let mut last = String::new();
    wait_until(T, "/status with two witnesses in dry-run mode", || {
        let Ok((200, body)) = http_get(status, "/status") else {
            return false;
        };
        last = body;
        let s: serde_json::Value = serde_json::from_str(&last).unwrap_or_default();
        s["dry_run"] == true
            && s["id"] == "promoter-a.1"
            && s["looks"].as_u64().unwrap_or(0) > 0
            && s["witnesses"].as_array().map(Vec::len) == Some(2)
            && s["witnesses"][1]["state"] == "unreachable"
    })
    .await;
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(term.success());
    let st = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(st.success(), "{st}");
}

/// `pglb-promoter --config lb.toml --dry-run`, as the docs write it: steady on the real primary,
/// and when it dies, it says what it would do and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn top_level_dry_run_observes_and_changes_nothing() {
    let cluster = failover_cluster(1);
    let lb = Pglb::start(&cluster).await;
    let promoter = PromoterBuilder::new().arg("--dry-run").start(&lb);
    let s = promoter.wait_steady("pg-0", T).await;
    assert_eq!(s["dry_run"], true, "{s}");

    kill9(cluster.node(0));
    promoter.wait_log(T, "would promote").await;
    assert!(cluster.node(1).in_recovery(), "a dry run promoted pg-1");
}
