//! Arbitrary bytes into the first-packet parser (`pglb::pg`), the only bytes pglb reads from a
//! client. No input may panic, and:
//! - `parse_first_packet` agrees with `packet_length`: it accepts only a packet whose length
//!   prefix is valid (8..=MAX_STARTUP_PACKET_LENGTH) and equal to its size, and any bad prefix
//!   or short input is refused as `BadLength`;
//! - the stream framing the proxy does (prefix, then that many bytes) gives the same answer;
//! - a first byte 0x16 is a TLS record (direct TLS): framed by its 5-byte record header
//!   (`tls_record_length`) instead of the length prefix, under the same rules;
//! - what is accepted round-trips: SSLRequest/GSSENCRequest are exactly their 8 bytes, a
//!   CancelRequest re-encodes byte for byte with `cancel_request`, and a StartupMessage rebuilt
//!   from the parsed version, user and database parses back to the same value;
//! - a refusal turns into a well-formed FATAL `ErrorResponse`, as the proxy sends it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pglb::pg::{
    cancel_request, error_response, packet_length, parse_first_packet, sqlstate, tls_record_length,
    FirstPacket, PacketError, MAX_STARTUP_PACKET_LENGTH, TLS_HANDSHAKE,
};

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
const SPECIAL_CODES: [u32; 3] = [80_877_102, 80_877_103, 80_877_104];

fuzz_target!(|data: &[u8]| {
    let parsed = parse_first_packet(data);
    if data.first() == Some(&TLS_HANDSHAKE) {
        check_tls_framing(data, &parsed);
    } else {
        check_against_length_prefix(data, &parsed);
        check_stream_framing(data);
    }
    match &parsed {
        Ok(p) => check_round_trip(data, p),
        Err(e) => check_error_response(e),
    }
});

fn header(data: &[u8]) -> Option<[u8; 4]> {
    Some(data.get(..4)?.try_into().unwrap())
}

fn check_against_length_prefix(data: &[u8], parsed: &Result<FirstPacket, PacketError>) {
    let prefix = header(data).map(packet_length);
    match parsed {
        Ok(_) => {
            let len = prefix
                .expect("accepted a packet shorter than its length prefix")
                .expect("accepted a packet whose length prefix packet_length refuses");
            assert_eq!(len, data.len(), "accepted a packet whose prefix disagrees");
            assert!((8..=MAX_STARTUP_PACKET_LENGTH).contains(&len));
        }
        Err(e) => {
            let framing_ok = data.len() >= 8 && prefix == Some(Ok(data.len()));
            if !framing_ok {
                assert!(
                    matches!(e, PacketError::BadLength(_)),
                    "bad framing refused as {e:?} instead of BadLength"
                );
            }
            if let PacketError::BadLength(n) = e {
                assert!(!framing_ok, "good framing refused as BadLength({n})");
            }
            if let PacketError::UnsupportedProtocol { major, minor } = e {
                let code = ((*major as u32) << 16) | *minor as u32;
                assert_ne!(*major, 3, "protocol 3.{minor} refused as unsupported");
                assert!(!SPECIAL_CODES.contains(&code));
                assert_eq!(&data[4..8], &code.to_be_bytes());
            }
        }
    }
}

/// A TLS record (direct TLS): accepted only when its record header is valid and gives its
/// size; a record whose header frames it is never refused for its length; and what the proxy
/// reads from a stream (the 5-byte header, then that many bytes in all) is never refused for
/// its length either.
fn check_tls_framing(data: &[u8], parsed: &Result<FirstPacket, PacketError>) {
    let framed = data
        .get(..5)
        .map(|h| tls_record_length(h.try_into().unwrap()));
    let framing_ok = framed
        .as_ref()
        .is_some_and(|r| r.as_ref() == Ok(&data.len()));
    match parsed {
        Ok(p) => {
            assert!(
                framing_ok,
                "accepted a TLS record its header does not frame"
            );
            assert!(matches!(p, FirstPacket::DirectTls { .. }), "{p:?}");
        }
        Err(PacketError::BadLength(n)) => {
            assert!(!framing_ok, "framed TLS record refused as BadLength({n})")
        }
        Err(PacketError::Malformed(_)) => {}
        Err(e) => panic!("a TLS record refused as {e:?}"),
    }
    if let Some(Ok(len)) = framed {
        if let Some(record) = data.get(..len) {
            if let Err(e) = parse_first_packet(record) {
                assert!(
                    !matches!(e, PacketError::BadLength(_)),
                    "framed TLS record refused as {e:?}"
                );
            }
        }
    }
}

/// What `proxy::client::read_packet` does on a socket carrying `data`: read the 4-byte prefix,
/// refuse it or read that many bytes (the rest of the stream is not read), then parse.
fn check_stream_framing(data: &[u8]) {
    let Some(h) = header(data) else { return };
    match packet_length(h) {
        Err(e) => assert!(matches!(e, PacketError::BadLength(_))),
        Ok(len) => {
            assert!((8..=MAX_STARTUP_PACKET_LENGTH).contains(&len));
            if let Some(packet) = data.get(..len) {
                // A whole packet framed by its own prefix is never refused for its length.
                if let Err(e) = parse_first_packet(packet) {
                    assert!(
                        !matches!(e, PacketError::BadLength(_)),
                        "framed packet refused as {e:?}"
                    );
                }
            }
        }
    }
}

fn check_round_trip(data: &[u8], p: &FirstPacket) {
    match p {
        FirstPacket::SslRequest => assert_eq!(data, SSL_REQUEST),
        FirstPacket::GssEncRequest => assert_eq!(data, GSSENC_REQUEST),
        FirstPacket::CancelRequest { pid, key } => {
            assert_eq!(cancel_request(*pid, key).as_slice(), data)
        }
        // The record is forwarded as read; only its server name is looked at.
        FirstPacket::DirectTls { .. } => assert_eq!(data[0], 0x16),
        FirstPacket::Startup {
            minor,
            user,
            database,
        } => {
            let user = user
                .as_ref()
                .expect("a StartupMessage accepted without user");
            assert_eq!(&data[4..6], &[0, 3]);
            assert_eq!(&data[6..8], &minor.to_be_bytes());
            // The terminating empty name is the packet's last byte, as PostgreSQL requires.
            assert_eq!(data.last(), Some(&0));
            assert_eq!(data.get(data.len().wrapping_sub(2)), Some(&0));
            let mut params = vec![("user", user.as_str())];
            if let Some(d) = database {
                params.push(("database", d.as_str()));
            }
            let rebuilt = startup(*minor, &params);
            // Lossy UTF-8 decoding can make the values longer than the original bytes.
            if rebuilt.len() <= MAX_STARTUP_PACKET_LENGTH {
                assert_eq!(parse_first_packet(&rebuilt).as_ref(), Ok(p));
            }
        }
    }
    assert!([
        "startup",
        "ssl_request",
        "gssenc_request",
        "cancel_request",
        "direct_tls"
    ]
    .contains(&p.kind()));
}

fn startup(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = vec![0, 3];
    body.extend_from_slice(&minor.to_be_bytes());
    for (k, v) in params {
        assert!(!v.contains('\0'), "a parsed value holds a NUL");
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

/// The proxy answers a refused packet with `pglb: {error}` in a FATAL ErrorResponse.
fn check_error_response(e: &PacketError) {
    assert!(["bad_length", "unsupported_protocol", "malformed"].contains(&e.kind()));
    let message = format!("pglb: {e}");
    assert!(
        !message.contains('\0'),
        "error text holds a NUL: {message:?}"
    );
    let code = match e {
        PacketError::UnsupportedProtocol { .. } => sqlstate::FEATURE_NOT_SUPPORTED,
        _ => sqlstate::PROTOCOL_VIOLATION,
    };
    let r = error_response(code, &message);
    assert_eq!(r[0], b'E');
    let len = u32::from_be_bytes([r[1], r[2], r[3], r[4]]) as usize;
    assert_eq!(len + 1, r.len());
    // Fields: type byte, NUL-terminated text; then a final NUL.
    let mut fields = Vec::new();
    let mut rest = &r[5..];
    while rest[0] != 0 {
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .expect("unterminated field");
        fields.push((rest[0], &rest[1..end]));
        rest = &rest[end + 1..];
    }
    assert_eq!(rest, [0]);
    assert_eq!(
        fields,
        [
            (b'S', b"FATAL".as_slice()),
            (b'V', b"FATAL".as_slice()),
            (b'C', code.as_bytes()),
            (b'M', message.as_bytes()),
        ]
    );
}
