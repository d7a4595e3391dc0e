//! `pglb-promoter rejoin` and the node's own settings: pg_rewind copies `postgresql.conf` from
//! the primary, so a `port` kept there comes back as the primary's. Rejoin must notice that the
//! server is not on its own port and fail (stopping it), and succeed once the port is on the
//! command line (`postmaster.opts`), where pg_rewind does not reach.

mod common;

use std::fs;
use std::time::Duration;

use common::promoter::*;
use common::*;

const T: Duration = Duration::from_secs(30);

/// `postmaster.opts` without its `"-p" "N"` pair: the server's port then comes from the files.
fn without_port_option(opts: &str, port: u16) -> String {
    let pair = format!(" \"-p\" \"{port}\"");
    assert!(opts.contains(&pair), "no {pair} in postmaster.opts: {opts}");
    opts.replace(&pair, "")
}

fn append(path: &std::path::Path, text: &str) {
    let mut old = fs::read_to_string(path).expect("read config file");
    old.push_str(text);
    fs::write(path, old).expect("write config file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejoin_fails_when_the_server_comes_back_on_another_port_and_works_with_it_on_the_command_line(
) {
    let cluster = failover_cluster(2);
    let lb = Pglb::start(&cluster).await;
    let promoter = PromoterBuilder::new().start(&lb);
    promoter.wait_steady("pg-0", T).await;
    let (p0, p1) = (cluster.node(0), cluster.node(1));

    let r = switchover(&promoter, "pg-1").await;
    assert_eq!(r["from"], "pg-0", "{r}");
    assert!(!p1.in_recovery());

    // pg-0 keeps its port in postgresql.conf, the way many installations do, and is started
    // from that: no -p on its command line.
    p0.stop();
    let opts_file = p0.data_dir().join("postmaster.opts");
    let opts = fs::read_to_string(&opts_file).expect("read postmaster.opts");
    fs::write(&opts_file, without_port_option(&opts, p0.port())).expect("write postmaster.opts");
    append(
        &p0.data_dir().join("postgresql.conf"),
        &format!("\nport = {}\n", p0.port()),
    );
    // The new primary's postgresql.conf names another port (its own command line overrides it):
    // the file pg_rewind will copy onto pg-0.
    let elsewhere = free_port();
    append(
        &p1.data_dir().join("postgresql.conf"),
        &format!("\nport = {elsewhere}\n"),
    );

    let (ok, out) = try_rejoin(&promoter, p0).await;
    assert!(
        !ok,
        "rejoin succeeded with pg-0 on port {elsewhere}:\n{out}"
    );
    assert!(
        out.contains(&format!(
            "pg-0 came back on port {elsewhere}, not on its own port {}",
            p0.port()
        )),
        "{out}"
    );
    assert!(out.contains("stopped again"), "{out}");
    assert!(!p0.is_running(), "pg-0 left running on port {elsewhere}");
    assert!(
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], elsewhere)),
            Duration::from_millis(500)
        )
        .is_err(),
        "something still listens on {elsewhere}"
    );

    // The fix: the node's port on its command line, where pg_rewind does not reach.
    fs::write(&opts_file, &opts).expect("write postmaster.opts");
    let (ok, out) = try_rejoin(&promoter, p0).await;
    assert!(ok, "rejoin with -p on the command line failed:\n{out}");
    assert!(out.contains("\"started\":true"), "{out}");
    assert!(p0.in_recovery());
    wait_until(T, "pg-0 streaming from pg-1", || streams_to(p1, "pg-0")).await;
    assert_eq!(p0.exec("SHOW port"), p0.port().to_string());
}
