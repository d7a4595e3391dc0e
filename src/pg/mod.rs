//! PostgreSQL wire-protocol bits that pglb needs and nothing more: recognising the first packet a
//! client sends (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest) and writing an
//! `ErrorResponse`. Everything after the first packet is spliced unread by `proxy`.

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
    /// Body of a CancelRequest: the backend PID and secret key, forwarded verbatim.
    CancelRequest {
        pid: u32,
        key: u32,
    },
}

impl FirstPacket {
    pub fn kind(&self) -> &'static str {
        match self {
            FirstPacket::Startup { .. } => "startup",
            FirstPacket::SslRequest => "ssl_request",
            FirstPacket::GssEncRequest => "gssenc_request",
            FirstPacket::CancelRequest { .. } => "cancel_request",
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
            if body.len() != 8 {
                return Err(PacketError::Malformed("CancelRequest"));
            }
            Ok(FirstPacket::CancelRequest {
                pid: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                key: u32::from_be_bytes([body[4], body[5], body[6], body[7]]),
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

/// A CancelRequest packet for the given key, to send to a backend.
pub fn cancel_request(pid: u32, key: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&16u32.to_be_bytes());
    out[4..8].copy_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    out[8..12].copy_from_slice(&pid.to_be_bytes());
    out[12..16].copy_from_slice(&key.to_be_bytes());
    out
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
        let c = cancel_request(42, 7);
        assert_eq!(
            parse_first_packet(&c).unwrap(),
            FirstPacket::CancelRequest { pid: 42, key: 7 }
        );
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
