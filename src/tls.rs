//! TLS as pglb speaks it itself (client streams pass through untouched; this is not about them):
//! - `ClientTls`: connections to the servers, for checks and for the promoter, with libpq's
//!   `sslmode` names and meanings, `sslrootcert` and a client certificate (`sslcert` + `sslkey`).
//!   Built from files when the config is read, so `pglb check` and a reload refuse a file that
//!   is missing or does not parse.
//! - `ServerTls`: pglb's own certificate (`[listen] tls_cert` / `tls_key`), used only to send a
//!   client that insists on TLS pglb's FATAL when no backend can take its session.
//!
//! Verification is rustls' WebPKI verifier with one libpq difference made explicit: `verify-ca`
//! checks the chain and not the name (`NotValidForName` is accepted, every other failure is
//! not). Not supported: `sslrootcert=system`, CRLs, a key protected by a password, and the
//! certificate's CN as a host name when it has no subjectAltName (rustls reads only the SAN).

use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// libpq's `sslmode` (`verify-ca` and `verify-full` need `sslrootcert`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// TLS when the server offers it, plaintext when it declines. No verification unless
    /// `sslrootcert` is set (then the chain, as libpq does). The default.
    #[default]
    Prefer,
    /// TLS or nothing; no verification unless `sslrootcert` is set (then the chain).
    Require,
    /// TLS, the chain checked against `sslrootcert`.
    VerifyCa,
    /// TLS, the chain and the host name (of the backend's address) checked.
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// Why building TLS settings from files failed (a config error names the key).
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1) or it does not parse", path.display())]
    NoKey { path: PathBuf },
    #[error("{} has a certificate rustls refuses: {source}", path.display())]
    BadCertificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the certificate and key do not go together or are not supported: {0}")]
    Pair(#[source] rustls::Error),
}

/// Why TLS to a server failed. `Display` is the reason on the stats page (the verifier's own
/// words for a certificate), and `ProbeError::Tls` carries it with the kind `tls`.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the server does not accept TLS (sslmode={0})")]
    Declined(&'static str),
    #[error("unexpected answer {0:#04x} to the SSLRequest")]
    Unexpected(u8),
    #[error("{0:?} is not a host name or IP address TLS can verify")]
    ServerName(String),
    /// The handshake failed: a certificate the verifier refused, no common protocol, ...
    #[error("TLS handshake: {0}")]
    Handshake(#[source] rustls::Error),
}

/// What a connection attempt with TLS settings can fail with: the network, or TLS itself.
#[derive(Debug, thiserror::Error)]
pub enum NegotiateError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsFileError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|_| TlsFileError::NoKey {
        path: path.to_path_buf(),
    })
}

/// A digest of the files' contents, so a reload notices a rotated certificate.
fn digest(parts: &[&[u8]]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

/// TLS to the servers for checks or the promoter: the `sslmode`, the files as configured and
/// the rustls settings built from them.
#[derive(Clone, Serialize)]
pub struct ClientTls {
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    #[serde(skip)]
    config: Option<Arc<rustls::ClientConfig>>,
    #[serde(skip)]
    files: u64,
}

impl Default for ClientTls {
    /// `sslmode=prefer` without files, as libpq.
    fn default() -> Self {
        ClientTls::new(SslMode::Prefer, None, None, None).expect("no files: cannot fail")
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        self.sslmode == other.sslmode
            && self.sslrootcert == other.sslrootcert
            && self.sslcert == other.sslcert
            && self.sslkey == other.sslkey
            && self.files == other.files
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Paths only; the key never.
        f.debug_struct("ClientTls")
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("sslcert", &self.sslcert)
            .field("sslkey", &self.sslkey)
            .finish()
    }
}

impl ClientTls {
    /// Reads the files and builds the settings. The caller checks the combinations (a verifying
    /// mode needs `sslrootcert`, `sslcert` and `sslkey` go together).
    pub fn new(
        sslmode: SslMode,
        sslrootcert: Option<PathBuf>,
        sslcert: Option<PathBuf>,
        sslkey: Option<PathBuf>,
    ) -> Result<ClientTls, TlsFileError> {
        let provider = provider();
        let mut contents: Vec<Vec<u8>> = Vec::new();
        let roots = match &sslrootcert {
            None => None,
            Some(p) => {
                let pem = read(p)?;
                let mut store = rustls::RootCertStore::empty();
                for c in certificates(p, &pem)? {
                    store
                        .add(c)
                        .map_err(|source| TlsFileError::BadCertificate {
                            path: p.clone(),
                            source,
                        })?;
                }
                contents.push(pem);
                Some(Arc::new(store))
            }
        };
        let client_auth = match (&sslcert, &sslkey) {
            (Some(c), Some(k)) => {
                let cert_pem = read(c)?;
                let key_pem = read(k)?;
                let chain = certificates(c, &cert_pem)?;
                let key = private_key(k, &key_pem)?;
                contents.push(cert_pem);
                contents.push(key_pem);
                Some((chain, key))
            }
            _ => None,
        };
        let files = digest(&contents.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let config = if sslmode == SslMode::Disable {
            None
        } else {
            let inner = match roots {
                Some(r) => Some(
                    WebPkiServerVerifier::builder_with_provider(r, provider.clone())
                        .build()
                        .map_err(|e| TlsFileError::Pair(rustls::Error::General(e.to_string())))?,
                ),
                None => None,
            };
            let verifier = Arc::new(Verifier {
                inner,
                check_name: sslmode == SslMode::VerifyFull,
                provider: provider.clone(),
            });
            let builder = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(TlsFileError::Pair)?
                .dangerous()
                .with_custom_certificate_verifier(verifier);
            let config = match client_auth {
                Some((chain, key)) => builder
                    .with_client_auth_cert(chain, key)
                    .map_err(TlsFileError::Pair)?,
                None => builder.with_no_client_auth(),
            };
            Some(Arc::new(config))
        };
        Ok(ClientTls {
            sslmode,
            sslrootcert,
            sslcert,
            sslkey,
            config,
            files,
        })
    }

    /// Negotiates TLS on a fresh connection to `host` (the host part of the backend's address)
    /// as libpq does: an SSLRequest, then the handshake on `S`; on `N`, plaintext only with
    /// `prefer`. A failed handshake is an error in every mode (libpq's `prefer` would retry in
    /// plaintext; a check should show the failure instead).
    pub async fn negotiate(
        &self,
        mut stream: TcpStream,
        host: &str,
    ) -> Result<PgStream, NegotiateError> {
        let Some(config) = &self.config else {
            return Ok(PgStream::Plain(stream));
        };
        stream.write_all(&crate::pg::SSL_REQUEST).await?;
        let mut answer = [0u8; 1];
        stream.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {}
            b'N' if self.sslmode == SslMode::Prefer => return Ok(PgStream::Plain(stream)),
            b'N' => return Err(TlsError::Declined(self.sslmode.as_str()).into()),
            other => return Err(TlsError::Unexpected(other).into()),
        }
        let name = server_name(host)?;
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        match connector.connect(name, stream).await {
            Ok(s) => Ok(PgStream::Tls(Box::new(s))),
            Err(e) => Err(handshake_error(e)),
        }
    }
}

/// The rustls error inside an io error from a handshake, as a `TlsError`; other io errors stay
/// io errors (a reset is the network's doing, not TLS's).
fn handshake_error(e: std::io::Error) -> NegotiateError {
    if e.get_ref().is_some_and(|i| i.is::<rustls::Error>()) {
        let inner = e
            .into_inner()
            .expect("checked above")
            .downcast::<rustls::Error>()
            .expect("checked above");
        return TlsError::Handshake(*inner).into();
    }
    NegotiateError::Io(e)
}

/// `host` as a TLS server name: an IP address or a DNS name.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(bare.to_string()).map_err(|_| TlsError::ServerName(host.to_string()))
}

/// libpq's verification levels on top of WebPKI: none (signatures of the handshake are still
/// checked), the chain only (`verify-ca`, and `require`/`prefer` with `sslrootcert`), or the
/// chain and the name (`verify-full`).
#[derive(Debug)]
struct Verifier {
    inner: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(inner) = &self.inner else {
            return Ok(ServerCertVerified::assertion());
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            // WebPKI checks the name only after the chain verified: for verify-ca that is
            // success.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A connection to a server after negotiation: plaintext or TLS.
pub enum PgStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for PgStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PgStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_flush(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// pglb's own certificate (`[listen] tls_cert` / `tls_key`), for the FATAL it sends inside TLS.
#[derive(Clone, Serialize)]
pub struct ServerTls {
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    #[serde(skip)]
    config: Arc<rustls::ServerConfig>,
    #[serde(skip)]
    files: u64,
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &Self) -> bool {
        self.tls_cert == other.tls_cert
            && self.tls_key == other.tls_key
            && self.files == other.files
    }
}

impl Eq for ServerTls {}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .finish()
    }
}

impl ServerTls {
    pub fn new(tls_cert: PathBuf, tls_key: PathBuf) -> Result<ServerTls, TlsFileError> {
        let cert_pem = read(&tls_cert)?;
        let key_pem = read(&tls_key)?;
        let chain = certificates(&tls_cert, &cert_pem)?;
        let key = private_key(&tls_key, &key_pem)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsFileError::Pair)?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(TlsFileError::Pair)?;
        // PostgreSQL 17's ALPN name: libpq 17+ requires it with sslnegotiation=direct and
        // accepts it (or none) after an SSLRequest.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(ServerTls {
            files: digest(&[&cert_pem, &key_pem]),
            tls_cert,
            tls_key,
            config: Arc::new(config),
        })
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }
}
