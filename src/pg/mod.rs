//! PostgreSQL wire-protocol bits that pglb needs and nothing more: recognising the first packet a
//! client sends (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest with protocol 3.2's
//! longer keys, or a TLS ClientHello for direct TLS) and writing an `ErrorResponse`. Everything
//! after the first packet is spliced unread by `proxy`.

mod lsn;

pub use lsn::Lsn;

use bytes::{BufMut, BytesMut};

/// PostgreSQL's own limit on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET_LENGTH: usize = 10_000;

const PROTOCOL_V3: u32 = 196_608; // 3.0
const CANCEL_REQUEST_CODE: u32 = 80_877_102;
const SSL_REQUEST_CODE: u32 = 80_877_103;
const GSSENC_REQUEST_CODE: u32 = 80_877_104;

/// An SSLRequest packet, as a client sends it first to ask for TLS.
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// What the client's first packet is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstPacket {
    /// Protocol 3.x StartupMessage; `user`/`database` are for logs only.
    Startup {
        minor: u16,
        user: Option<String>,
        database: Option<String>,
    },
    SslRequest,
    GssEncRequest,
    /// Body of a CancelRequest: the backend PID and secret key, forwarded verbatim. The key is
    /// 4 bytes in protocol 3.0 and up to 256 in 3.2 (PostgreSQL 18).
    CancelRequest {
        pid: u32,
        key: Vec<u8>,
    },
    /// A TLS record holding a ClientHello: direct TLS (libpq 17+ `sslnegotiation=direct`), no
    /// SSLRequest first. `sni` is the server name the client asked for, for logs only.
    DirectTls {
        sni: Option<String>,
    },
}

impl FirstPacket {
    pub fn kind(&self) -> &'static str {
        match self {
            FirstPacket::Startup { .. } => "startup",
            FirstPacket::SslRequest => "ssl_request",
            FirstPacket::GssEncRequest => "gssenc_request",
            FirstPacket::CancelRequest { .. } => "cancel_request",
            FirstPacket::DirectTls { .. } => "direct_tls",
        }
    }
}

/// Why a first packet was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("invalid length {0} in startup packet (must be 8..={MAX_STARTUP_PACKET_LENGTH})")]
    BadLength(i64),
    #[error("unsupported frontend protocol {major}.{minor}: pglb speaks 3.x")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("malformed {0} packet")]
    Malformed(&'static str),
}

impl PacketError {
    pub fn kind(&self) -> &'static str {
        match self {
            PacketError::BadLength(_) => "bad_length",
            PacketError::UnsupportedProtocol { .. } => "unsupported_protocol",
            PacketError::Malformed(_) => "malformed",
        }
    }
}

/// Longest cancel key pglb forwards (protocol 3.2 allows up to 256 bytes).
pub const MAX_CANCEL_KEY_LENGTH: usize = 256;

/// First byte of a TLS handshake record: a ClientHello sent without an SSLRequest. No
/// PostgreSQL packet starts with it (its length would be over 369 MB).
pub const TLS_HANDSHAKE: u8 = 0x16;

/// Longest TLS record pglb reads as a first packet (2^14 bytes of plaintext, RFC 8446 5.1).
pub const MAX_TLS_RECORD_LENGTH: usize = 16_384;

/// Reads a TLS record header (type, version, length): how many bytes the whole record has.
pub fn tls_record_length(header: [u8; 5]) -> Result<usize, PacketError> {
    if header[0] != TLS_HANDSHAKE || header[1] != 3 {
        return Err(PacketError::Malformed("TLS record"));
    }
    let len = u16::from_be_bytes([header[3], header[4]]) as usize;
    if len == 0 || len > MAX_TLS_RECORD_LENGTH {
        return Err(PacketError::BadLength(len as i64));
    }
    Ok(5 + len)
}

/// Reads the 4-byte length prefix: how many bytes the whole packet has, or why not.
pub fn packet_length(header: [u8; 4]) -> Result<usize, PacketError> {
    let len = i32::from_be_bytes(header) as i64;
    if !(8..=MAX_STARTUP_PACKET_LENGTH as i64).contains(&len) {
        return Err(PacketError::BadLength(len));
    }
    Ok(len as usize)
}

/// Parses a complete first packet (length prefix included).
pub fn parse_first_packet(packet: &[u8]) -> Result<FirstPacket, PacketError> {
    if packet.first() == Some(&TLS_HANDSHAKE) {
        return parse_client_hello(packet);
    }
    if packet.len() < 8 {
        return Err(PacketError::BadLength(packet.len() as i64));
    }
    let declared = packet_length([packet[0], packet[1], packet[2], packet[3]])?;
    if declared != packet.len() {
        return Err(PacketError::BadLength(declared as i64));
    }
    let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    let body = &packet[8..];
    match code {
        SSL_REQUEST_CODE if body.is_empty() => Ok(FirstPacket::SslRequest),
        GSSENC_REQUEST_CODE if body.is_empty() => Ok(FirstPacket::GssEncRequest),
        SSL_REQUEST_CODE => Err(PacketError::Malformed("SSLRequest")),
        GSSENC_REQUEST_CODE => Err(PacketError::Malformed("GSSENCRequest")),
        CANCEL_REQUEST_CODE => {
            if !(8..=4 + MAX_CANCEL_KEY_LENGTH).contains(&body.len()) {
                return Err(PacketError::Malformed("CancelRequest"));
            }
            Ok(FirstPacket::CancelRequest {
                pid: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                key: body[4..].to_vec(),
            })
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != (PROTOCOL_V3 >> 16) as u16 {
                return Err(PacketError::UnsupportedProtocol { major, minor });
            }
            let (user, database) = startup_params(body)?;
            Ok(FirstPacket::Startup {
                minor,
                user,
                database,
            })
        }
    }
}

/// Name/value pairs of a StartupMessage, NUL-terminated, ending with an empty name.
fn startup_params(body: &[u8]) -> Result<(Option<String>, Option<String>), PacketError> {
    let mut user = None;
    let mut database = None;
    let mut fields = body.split(|&b| b == 0);
    loop {
        let name = fields
            .next()
            .ok_or(PacketError::Malformed("StartupMessage"))?;
        if name.is_empty() {
            // The empty name is the packet's last byte, as PostgreSQL requires ("invalid startup
            // packet layout: expected terminator as last byte" otherwise).
            if fields.next() != Some(&[][..]) || fields.next().is_some() {
                return Err(PacketError::Malformed(
                    "StartupMessage (bytes after its terminator)",
                ));
            }
            break;
        }
        let value = fields
            .next()
            .ok_or(PacketError::Malformed("StartupMessage"))?;
        let value = String::from_utf8_lossy(value).into_owned();
        match name {
            b"user" => user = Some(value),
            b"database" => database = Some(value),
            _ => {}
        }
    }
    if user.is_none() {
        // PostgreSQL requires it too: "no PostgreSQL user name specified in startup packet".
        return Err(PacketError::Malformed("StartupMessage (no user)"));
    }
    Ok((user, database))
}

/// A CancelRequest packet for the given key (4 to 256 bytes), to send to a backend.
pub fn cancel_request(pid: u32, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + key.len());
    out.extend_from_slice(&(12 + key.len() as u32).to_be_bytes());
    out.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// A whole TLS record that must hold the start of a ClientHello; the server name (SNI) is read
/// when the record holds that far. Every read is bounded: garbage is refused or has no name,
/// never a panic.
fn parse_client_hello(record: &[u8]) -> Result<FirstPacket, PacketError> {
    let header: [u8; 5] = record
        .get(..5)
        .and_then(|h| h.try_into().ok())
        .ok_or(PacketError::Malformed("TLS record"))?;
    let len = tls_record_length(header)?;
    if len != record.len() {
        return Err(PacketError::BadLength(record.len() as i64));
    }
    let hello = &record[5..];
    // Handshake type 1: ClientHello.
    if hello.first() != Some(&1) {
        return Err(PacketError::Malformed("TLS ClientHello"));
    }
    Ok(FirstPacket::DirectTls {
        sni: server_name_indication(hello),
    })
}

/// The host_name in a ClientHello's server_name extension (RFC 6066), if the bytes hold one.
fn server_name_indication(hello: &[u8]) -> Option<String> {
    let mut r = Reader(hello);
    r.take(4)?; // type, u24 length (the message may go on in the next record)
    r.take(2 + 32)?; // legacy_version, random
    let n = r.u8()? as usize;
    r.take(n)?; // session id
    let n = r.u16()? as usize;
    r.take(n)?; // cipher suites
    let n = r.u8()? as usize;
    r.take(n)?; // compression methods
    let n = r.u16()? as usize;
    let mut ext = Reader(r.take(n).unwrap_or(r.0));
    while let (Some(kind), Some(n)) = (ext.u16(), ext.u16()) {
        let data = ext.take(n as usize)?;
        if kind != 0 {
            continue;
        }
        let mut list = Reader(data);
        let n = list.u16()? as usize;
        let mut names = Reader(list.take(n)?);
        while let Some(name_type) = names.u8() {
            let n = names.u16()? as usize;
            let name = names.take(n)?;
            if name_type == 0 {
                return std::str::from_utf8(name)
                    .ok()
                    .filter(|s| s.bytes().all(|b| b.is_ascii_graphic()))
                    .map(str::to_string);
            }
        }
        return None;
    }
    None
}

/// A bounded cursor over bytes: every read returns None past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

/// SQLSTATE codes pglb reports.
pub mod sqlstate {
    /// cannot_connect_now: no backend for this port right now.
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    /// protocol_violation.
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// feature_not_supported (e.g. protocol version).
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    /// too_many_connections.
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// admin_shutdown: pglb closed the session (writer changed, shutting down).
    pub const ADMIN_SHUTDOWN: &str = "57P01";
}

/// A FATAL `ErrorResponse` message, ready to write to a client.
pub fn error_response(sqlstate: &str, message: &str) -> BytesMut {
    let mut body = BytesMut::with_capacity(64 + message.len());
    for (tag, val) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', sqlstate),
        (b'M', message),
    ] {
        body.put_u8(tag);
        body.put_slice(val.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(b'E');
    out.put_u32(body.len() as u32 + 4);
    out.put_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)], version: u32) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&version.to_be_bytes());
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        p.extend(body);
        p
    }

    #[test]
    fn parses_startup_message() {
        let p = startup(&[("user", "app"), ("database", "db")], PROTOCOL_V3);
        assert_eq!(
            parse_first_packet(&p).unwrap(),
            FirstPacket::Startup {
                minor: 0,
                user: Some("app".into()),
                database: Some("db".into())
            }
        );
    }

    #[test]
    fn accepts_newer_minor_versions() {
        let p = startup(&[("user", "app")], PROTOCOL_V3 + 2);
        assert!(matches!(
            parse_first_packet(&p),
            Ok(FirstPacket::Startup { minor: 2, .. })
        ));
    }

    #[test]
    fn refuses_protocol_2_and_garbage_versions() {
        let p = startup(&[("user", "app")], 2 << 16);
        assert_eq!(
            parse_first_packet(&p),
            Err(PacketError::UnsupportedProtocol { major: 2, minor: 0 })
        );
    }

    #[test]
    fn recognises_ssl_gss_and_cancel() {
        let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        assert_eq!(parse_first_packet(&ssl).unwrap(), FirstPacket::SslRequest);
        let gss = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
        assert_eq!(
            parse_first_packet(&gss).unwrap(),
            FirstPacket::GssEncRequest
        );
        let c = cancel_request(42, &7u32.to_be_bytes());
        assert_eq!(
            parse_first_packet(&c).unwrap(),
            FirstPacket::CancelRequest {
                pid: 42,
                key: 7u32.to_be_bytes().to_vec()
            }
        );
    }

    #[test]
    fn protocol_3_2_cancel_keys_up_to_256_bytes() {
        for n in [4, 32, 256] {
            let key: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let c = cancel_request(9, &key);
            assert_eq!(c.len(), 12 + n);
            assert_eq!(
                parse_first_packet(&c).unwrap(),
                FirstPacket::CancelRequest { pid: 9, key }
            );
        }
        for n in [0, 3, 257] {
            let c = cancel_request(9, &vec![1; n]);
            assert!(parse_first_packet(&c).is_err(), "{n}-byte key accepted");
        }
    }

    /// A ClientHello as a TLS library writes it (hand-assembled here; tests/tls.rs sends a
    /// real one through pglb).
    fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let mut ext = Vec::new();
        if let Some(name) = sni {
            let mut list = vec![0u8];
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name.as_bytes());
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend(list);
            ext.extend_from_slice(&0u16.to_be_bytes());
            ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext.extend(data);
        }
        // ALPN "postgresql", after the name.
        ext.extend_from_slice(&[0, 16, 0, 13, 0, 11, 10]);
        ext.extend_from_slice(b"postgresql");
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut hs = vec![1, 0];
        hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
        hs.extend(body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn direct_tls_client_hello_with_and_without_a_name() {
        let r = client_hello(Some("db.example.com"));
        assert_eq!(
            tls_record_length(r[..5].try_into().unwrap()).unwrap(),
            r.len()
        );
        assert_eq!(
            parse_first_packet(&r).unwrap(),
            FirstPacket::DirectTls {
                sni: Some("db.example.com".into())
            }
        );
        assert_eq!(
            parse_first_packet(&client_hello(None)).unwrap(),
            FirstPacket::DirectTls { sni: None }
        );
        // Cut anywhere (length fixed up): no name or refused, never a panic.
        let full = client_hello(Some("db.example.com"));
        for cut in 5..full.len() {
            let mut p = full[..cut].to_vec();
            let n = (cut - 5) as u16;
            p[3..5].copy_from_slice(&n.to_be_bytes());
            let _ = parse_first_packet(&p);
        }
        // Not a ClientHello, or not TLS 1.x framing.
        let mut other = client_hello(None);
        other[5] = 2;
        assert!(parse_first_packet(&other).is_err());
        assert!(tls_record_length([0x16, 2, 0, 0, 10]).is_err());
        assert!(tls_record_length([0x16, 3, 1, 0xff, 0xff]).is_err());
    }

    #[test]
    fn refuses_bad_lengths() {
        assert!(packet_length([0x7f, 0xff, 0xff, 0xff]).is_err());
        assert!(packet_length([0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(packet_length([0, 0, 0, 0]).is_err());
        assert!(packet_length([0, 0, 0, 7]).is_err());
        assert_eq!(packet_length([0, 0, 0, 8]).unwrap(), 8);
    }

    #[test]
    fn refuses_unterminated_startup() {
        let mut p = startup(&[("user", "app")], PROTOCOL_V3);
        p.pop();
        p.pop();
        let len = p.len() as u32;
        p[0..4].copy_from_slice(&len.to_be_bytes());
        assert!(parse_first_packet(&p).is_err());
    }

    #[test]
    fn error_response_is_well_formed() {
        let e = error_response("57P03", "pglb: no primary");
        assert_eq!(e[0], b'E');
        let len = u32::from_be_bytes([e[1], e[2], e[3], e[4]]) as usize;
        assert_eq!(len + 1, e.len());
        assert_eq!(*e.last().unwrap(), 0);
        assert!(e.windows(16).any(|w| w == b"pglb: no primary"));
    }

    #[test]
    fn never_panics_on_short_or_odd_input() {
        for n in 0..64u8 {
            let mut v: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
            if v.len() >= 4 {
                let l = v.len() as u32;
                v[0..4].copy_from_slice(&l.to_be_bytes());
            }
            let _ = parse_first_packet(&v);
        }
    }
}
