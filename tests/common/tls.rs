//! TLS-only clusters: a test CA made with the openssl CLI at test time, server certificates it
//! signs (subjectAltName `DNS:localhost` only, so `verify-full` holds for `localhost:PORT` and
//! not for `127.0.0.1:PORT`), and servers whose `pg_hba.conf` has only `hostssl` lines for TCP
//! (replication included). Replicas stream with `sslmode=verify-full` against the CA.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{
    give_to_postgres, run_ok, set_mode, BackendSpec, PgCluster, PgNode, APP_USER, CHECK_PASSWORD,
    CHECK_USER, REPL_PASSWORD, REPL_USER,
};

/// A certificate authority in a directory: `ca.crt` (public), `ca.key`.
pub struct TestCa {
    pub dir: PathBuf,
    pub cert: PathBuf,
    key: PathBuf,
}

fn openssl(args: &[&str], what: &str) {
    let mut cmd = Command::new("openssl");
    cmd.args(args);
    run_ok(&mut cmd, what, Duration::from_secs(30));
}

impl TestCa {
    /// A new CA called `name` in `dir/name/`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let dir = dir.join(name);
        fs::create_dir_all(&dir).expect("create CA dir");
        set_mode(&dir, 0o755);
        let cert = dir.join("ca.crt");
        let key = dir.join("ca.key");
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "30",
                "-subj",
                &format!("/CN=pglb test CA {name}"),
                "-keyout",
                key.to_str().unwrap(),
                "-out",
                cert.to_str().unwrap(),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            "openssl req (test CA)",
        );
        set_mode(&cert, 0o644);
        TestCa { dir, cert, key }
    }

    /// A certificate for `cn` signed by this CA with `san` (e.g. "DNS:localhost"), as
    /// `name.crt` / `name.key`, readable by the server's OS user (key mode 0600).
    pub fn issue(&self, name: &str, cn: &str, san: &str) -> (PathBuf, PathBuf) {
        let crt = self.dir.join(format!("{name}.crt"));
        let key = self.dir.join(format!("{name}.key"));
        let csr = self.dir.join(format!("{name}.csr"));
        let ext = self.dir.join(format!("{name}.ext"));
        fs::write(
            &ext,
            format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"),
        )
        .expect("write extfile");
        openssl(
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                key.to_str().unwrap(),
                "-out",
                csr.to_str().unwrap(),
            ],
            "openssl req (certificate request)",
        );
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                csr.to_str().unwrap(),
                "-CA",
                self.cert.to_str().unwrap(),
                "-CAkey",
                self.key.to_str().unwrap(),
                "-CAcreateserial",
                "-days",
                "30",
                "-extfile",
                ext.to_str().unwrap(),
                "-out",
                crt.to_str().unwrap(),
            ],
            "openssl x509 (sign)",
        );
        give_to_postgres(&crt);
        give_to_postgres(&key);
        set_mode(&crt, 0o644);
        set_mode(&key, 0o600);
        (crt, key)
    }
}

/// TCP logins only over TLS; the harness's superuser keeps its unix socket.
/// `pglb_cert` logs in with a client certificate signed by the CA (CN = user name).
const HBA_SSL_ONLY: &str = "local all all trust\n\
    local replication all trust\n\
    hostssl replication replicator 127.0.0.1/32 scram-sha-256\n\
    hostssl all pglb_cert 127.0.0.1/32 cert\n\
    hostssl all all 127.0.0.1/32 scram-sha-256\n";

/// The role that logs in with a client certificate (member of pg_monitor, no password).
pub const CERT_USER: &str = "pglb_cert";

/// A cluster whose servers accept TCP logins only over TLS, with the CA that signed their
/// certificate (and a second CA that did not). `rewind`: with what pg_rewind needs and a
/// password for `postgres` (the promoter's login), as `promoter::failover_cluster`.
pub struct TlsCluster {
    pub cluster: PgCluster,
    pub ca: TestCa,
    pub other_ca: TestCa,
}

impl TlsCluster {
    pub fn start(n_replicas: usize, rewind: bool) -> TlsCluster {
        let dir = tempfile::Builder::new()
            .prefix("pglb-tls-")
            .tempdir()
            .expect("create temp dir");
        set_mode(dir.path(), 0o755);
        give_to_postgres(dir.path());
        let ca = TestCa::new(dir.path(), "ca");
        let other_ca = TestCa::new(dir.path(), "other-ca");
        let (crt, key) = ca.issue("server", "localhost", "DNS:localhost");

        let mut primary = PgNode::init("pg-0", dir.path(), &crt, &key);
        fs::write(primary.data.join("pg_hba.conf"), HBA_SSL_ONLY).expect("write pg_hba.conf");
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(primary.data.join("postgresql.conf"))
            .expect("open postgresql.conf");
        // Client certificates are checked against the test CA.
        writeln!(conf, "ssl_ca_file = '{}'", ca.cert.display()).expect("write postgresql.conf");
        if rewind {
            conf.write_all(super::promoter::REWIND_CONF.as_bytes())
                .expect("write postgresql.conf");
        }
        drop(conf);
        primary.start_on_new_port();
        primary.exec(&format!(
            "CREATE ROLE {CHECK_USER} LOGIN PASSWORD '{CHECK_PASSWORD}' IN ROLE pg_monitor; \
             CREATE ROLE {APP_USER} LOGIN PASSWORD '{}'; \
             CREATE ROLE {REPL_USER} LOGIN REPLICATION PASSWORD '{REPL_PASSWORD}'; \
             GRANT CREATE ON SCHEMA public TO {APP_USER}; \
             CREATE ROLE {CERT_USER} LOGIN IN ROLE pg_monitor; \
             ALTER ROLE postgres PASSWORD '{}';",
            super::APP_PASSWORD,
            super::promoter::PROMOTER_PASSWORD,
        ));
        let mut cluster = PgCluster {
            nodes: vec![primary],
            dir,
        };
        for i in 1..=n_replicas {
            let mut replica = basebackup_tls(
                &format!("pg-{i}"),
                cluster.dir.path(),
                &cluster.nodes[0],
                &ca.cert,
            );
            replica.start_on_new_port();
            cluster.nodes.push(replica);
        }
        cluster.wait_streaming(n_replicas, Duration::from_secs(30));
        TlsCluster {
            cluster,
            ca,
            other_ca,
        }
    }

    /// Every node as `localhost:PORT` (the name its certificate holds).
    pub fn backends_by_name(&self) -> Vec<BackendSpec> {
        self.cluster
            .nodes()
            .iter()
            .map(|n| BackendSpec {
                name: n.name().to_string(),
                address: format!("localhost:{}", n.port()),
                weight: Some(1),
            })
            .collect()
    }
}

/// `pg_basebackup -R -C -S` over TLS verified against `ca`.
fn basebackup_tls(name: &str, root: &Path, primary: &PgNode, ca: &Path) -> PgNode {
    let conninfo = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user={REPL_USER} password={REPL_PASSWORD} application_name={name} sslmode=verify-full sslrootcert={}",
        primary.port,
        ca.display()
    );
    PgNode::basebackup_with(name, root, &conninfo)
}

/// What PostgreSQL 17's postmaster does with a first byte 0x16 and this harness's PostgreSQL 15
/// cannot: accept TLS directly (ALPN "postgresql", a certificate from the test CA), then speak
/// to the server inside it. Anything else is relayed as is, so checks reach the server.
pub async fn direct_tls_front(
    server: std::net::SocketAddr,
    crt: &std::path::Path,
    key: &std::path::Path,
) -> std::net::SocketAddr {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(crt)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                if client.peek(&mut first).await.is_err() {
                    return;
                }
                let Ok(mut backend) = tokio::net::TcpStream::connect(server).await else {
                    return;
                };
                if first[0] == 0x16 {
                    if let Ok(mut tls) = acceptor.accept(client).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut backend).await;
                    }
                } else {
                    let mut client = client;
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
                }
            });
        }
    });
    addr
}
