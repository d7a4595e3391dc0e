//! The command line: `pglb check`, and SIGTERM with an open session.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const SECRET: &str = "s3cret-never-print-me";

fn config_text(extra_check_line: &str) -> String {
    // Line numbers matter: the unknown key in the bad file is on line 12.
    format!(
        r#"[listen]
write = "127.0.0.1:{w}"
read = "127.0.0.1:{r}"
stats = "127.0.0.1:{s}"

[check]
interval = "1s"
timeout = "2s"
user = "pglb_check"
password_env = "PGLB_CHECK_PASSWORD"
database = "postgres"
{extra_check_line}
[[backend]]
name = "pg-0"
address = "127.0.0.1:{b0}"

[[backend]]
name = "pg-1"
address = "127.0.0.1:{b1}"
weight = 2
"#,
        w = free_port(),
        r = free_port(),
        s = free_port(),
        b0 = free_port(),
        b1 = free_port(),
    )
}

fn run_check(path: &std::path::Path) -> (std::process::ExitStatus, String, String) {
    output_of(
        Command::new(pglb_bin())
            .args(["check", "--config"])
            .arg(path)
            .env("PGLB_CHECK_PASSWORD", SECRET)
            .env_remove("RUST_LOG"),
    )
}

#[test]
fn check_rejects_unknown_key_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let text = config_text("frobnicate_level = 3\n");
    assert_eq!(
        text.lines().nth(11),
        Some("frobnicate_level = 3"),
        "test fixture: key must be on line 12"
    );
    std::fs::write(&path, text).unwrap();

    let (status, stdout, stderr) = run_check(&path);
    assert!(
        !status.success(),
        "pglb check accepted an unknown key; stdout: {stdout} stderr: {stderr}"
    );
    assert!(
        stderr.contains(&path.display().to_string()),
        "stderr does not name the file {}:\n{stderr}",
        path.display()
    );
    assert!(
        stderr.contains("frobnicate_level"),
        "stderr does not name the unknown key:\n{stderr}"
    );
    assert!(
        stderr.contains("line 12")
            || stderr.contains(":12:")
            || stderr.contains(":12 ")
            || stderr.contains("12 |"),
        "stderr does not name line 12:\n{stderr}"
    );
}

#[test]
fn check_accepts_good_file_without_printing_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("good.toml");
    std::fs::write(&path, config_text("")).unwrap();

    let (status, stdout, stderr) = run_check(&path);
    assert!(
        status.success(),
        "pglb check rejected a good file ({status}):\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        !stdout.contains(SECRET) && !stderr.contains(SECRET),
        "pglb check printed the check password"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_open_session_then_exits_zero() {
    let cluster = PgCluster::start(0);
    // A long grace period: pglb must exit when the last session ends, not when this expires.
    let mut lb = Pglb::builder(&cluster)
        .set("proxy", "shutdown_timeout", "60s")
        .start();
    lb.wait_ready().await;

    let session = connect_ok(lb.write).await;
    assert_eq!(backend_port(&session).await, cluster.primary().port());
    let live = http_get(lb.stats, "/live").expect("GET /live before SIGTERM");
    assert_eq!(live.0, 200, "/live before SIGTERM: {live:?}");
    lb.signal(libc::SIGTERM);

    // Liveness turns 503 at once while the stats listener keeps answering through the drain,
    // so a VIP or a load balancer moves away before any session is cut.
    wait_until(
        Duration::from_secs(5),
        "/live answers 503 after SIGTERM",
        || matches!(http_get(lb.stats, "/live"), Ok((503, _))),
    )
    .await;

    // Draining: the open session keeps working for a while after SIGTERM.
    for _ in 0..5 {
        assert_eq!(
            scalar_ok(&session, "SELECT 1").await,
            "1",
            "open session broke during drain"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        lb.try_exit_status().is_none(),
        "pglb exited while a session was still open"
    );

    drop(session);
    let status = lb.wait_exit(Duration::from_secs(10)).await.expect(
        "pglb did not exit within 10 s of its last session ending (shutdown_timeout is 60 s)",
    );
    assert!(status.success(), "pglb exited with {status} after SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_without_sessions_exits_zero_promptly() {
    // Backends that do not exist: no cluster needed.
    let backends = vec![BackendSpec {
        name: "pg-0".into(),
        address: free_addr().to_string(),
        weight: None,
    }];
    let mut lb = PglbBuilder::new(backends)
        .set("proxy", "shutdown_timeout", "60s")
        .start();
    lb.signal(libc::SIGTERM);
    let status = lb
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("pglb did not exit within 5 s of SIGTERM");
    assert!(status.success(), "pglb exited with {status} after SIGTERM");
}

/// `[proxy] shutdown_delay`: after SIGTERM `/live` answers 503 at once while new sessions are
/// still accepted for the delay (a VIP moves away first); then the listeners close.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_shutdown_delay_keeps_accepting_while_live_is_503() {
    let cluster = PgCluster::start(0);
    let mut lb = Pglb::builder(&cluster)
        .set("proxy", "shutdown_delay", "3s")
        .start();
    lb.wait_ready().await;
    lb.signal(libc::SIGTERM);
    wait_until(
        Duration::from_secs(2),
        "/live answers 503 after SIGTERM",
        || matches!(http_get(lb.stats, "/live"), Ok((503, _))),
    )
    .await;
    // Within the delay: a new client still gets the primary.
    let late = connect_ok(lb.write).await;
    assert_eq!(backend_port(&late).await, cluster.primary().port());
    drop(late);
    // After it: the listeners are closed and pglb exits by itself.
    let status = lb
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("pglb did not exit after shutdown_delay");
    assert!(status.success(), "{status}");
    assert!(
        connect(lb.write).await.is_err(),
        "still accepting after exit"
    );
}

/// `pglb check` validates a file where its secrets are not present (a laptop, CI): a missing
/// secret is a warning naming the variable and its line, exit 0; `--strict` makes it an error,
/// and running pglb needs it.
#[test]
fn check_without_the_secret_warns_and_strict_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("good.toml");
    std::fs::write(&path, config_text("")).unwrap();
    let run = |args: &[&str]| {
        let (status, _, stderr) = output_of(
            Command::new(pglb_bin())
                .args(args)
                .arg("--config")
                .arg(&path)
                .env_remove("PGLB_CHECK_PASSWORD")
                .env_remove("RUST_LOG"),
        );
        (status, stderr)
    };
    let (status, stderr) = run(&["check"]);
    assert!(
        status.success(),
        "check without the secret failed ({status}): {stderr}"
    );
    assert!(
        stderr.contains("warning")
            && stderr.contains("PGLB_CHECK_PASSWORD")
            && stderr.contains("good.toml:"),
        "no warning naming the variable and its line: {stderr}"
    );
    let (status, stderr) = run(&["check", "--strict"]);
    assert_eq!(
        status.code(),
        Some(64),
        "check --strict accepted a missing secret: {stderr}"
    );
    assert!(stderr.contains("PGLB_CHECK_PASSWORD"), "{stderr}");
}
