//! Property tests (the stable-toolchain stand-in for `cargo fuzz`) for the two parsers that see
//! untrusted or hand-written input: the client's first packet (`pglb::pg`) and `lb.toml`
//! (`pglb::config::Config::parse`).
//!
//! Properties:
//! - `packet_length` and `parse_first_packet` never panic on arbitrary bytes, and agree with
//!   each other (an accepted packet has a valid length prefix equal to its size).
//! - Structured StartupMessage / SSLRequest / GSSENCRequest / CancelRequest packets round-trip.
//! - Length fields over `MAX_STARTUP_PACKET_LENGTH`, zero, below 8 or negative, a prefix that
//!   disagrees with the bytes, and unknown protocol versions are errors (the right ones).
//! - `Config::parse` never panics on arbitrary text nor on a valid config mutated at random (keys
//!   deleted, duplicated, inserted, lines swapped, typos, truncation); every error names the
//!   file and a line within the file; every accepted config holds the validated invariants.
//!
//! Case count: `PROPTEST_CASES` (proptest's own variable) when set, else [`DEFAULT_CASES`] per
//! property. Failures are persisted by proptest under `proptest-regressions/`.

use std::path::Path;
use std::sync::Once;

use pglb::config::{Config, ConfigError};
use pglb::pg::{
    cancel_request, packet_length, parse_first_packet, FirstPacket, PacketError,
    MAX_STARTUP_PACKET_LENGTH,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{Config as ProptestConfig, FileFailurePersistence};

/// Cases per property when `PROPTEST_CASES` is not set: enough to matter, quick in CI.
const DEFAULT_CASES: u32 = 2000;

fn cases() -> ProptestConfig {
    let mut c = if std::env::var_os("PROPTEST_CASES").is_some() {
        // proptest's default reads PROPTEST_CASES (and the other PROPTEST_* knobs).
        ProptestConfig::default()
    } else {
        ProptestConfig::with_cases(DEFAULT_CASES)
    };
    c.failure_persistence = Some(Box::new(FileFailurePersistence::Direct(
        "proptest-regressions/proptest_parsers.txt",
    )));
    c
}

const PROTOCOL_V3: u32 = 3 << 16;
const CANCEL_CODE: u32 = 80_877_102;
const SSL_CODE: u32 = 80_877_103;
const GSSENC_CODE: u32 = 80_877_104;
const SPECIAL_CODES: [u32; 3] = [CANCEL_CODE, SSL_CODE, GSSENC_CODE];

/// A packet: 4-byte big-endian length of the whole packet, then the 4-byte code, then `body`.
fn packet(code: u32, body: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + body.len());
    p.extend_from_slice(&((body.len() + 8) as u32).to_be_bytes());
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(body);
    p
}

/// StartupMessage body: name\0value\0 ... \0.
fn startup_body(params: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in params {
        body.extend_from_slice(k);
        body.push(0);
        body.extend_from_slice(v);
        body.push(0);
    }
    body.push(0);
    body
}

fn no_nul(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(1u8..=255, 0..=max)
}

/// Parameter names other than `user` and `database` (those are placed on purpose).
fn other_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        select(vec![
            b"application_name".to_vec(),
            b"client_encoding".to_vec(),
            b"options".to_vec(),
            b"replication".to_vec(),
            b"_pq_.some_extension".to_vec(),
            b"User".to_vec(),
            b"databasex".to_vec(),
        ]),
        vec(1u8..=255, 1..=24),
    ]
    .prop_filter("not user/database", |n| {
        n.as_slice() != b"user" && n.as_slice() != b"database"
    })
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A well-formed protocol-3 StartupMessage and what parsing it must give.
fn valid_startup() -> impl Strategy<Value = (Vec<u8>, FirstPacket)> {
    (
        any::<u16>(),
        vec((other_name(), no_nul(64)), 0..8),
        no_nul(64),
        proptest::option::of(no_nul(64)),
        any::<Index>(),
        any::<Index>(),
    )
        .prop_map(|(minor, mut params, user, database, ui, di)| {
            let at = ui.index(params.len() + 1);
            params.insert(at, (b"user".to_vec(), user.clone()));
            if let Some(db) = &database {
                let at = di.index(params.len() + 1);
                params.insert(at, (b"database".to_vec(), db.clone()));
            }
            let p = packet(PROTOCOL_V3 | u32::from(minor), &startup_body(&params));
            let want = FirstPacket::Startup {
                minor,
                user: Some(lossy(&user)),
                database: database.as_deref().map(lossy),
            };
            (p, want)
        })
}

/// Any 4-byte code that is neither protocol 3.x nor one of the three special request codes.
fn unknown_code() -> impl Strategy<Value = u32> {
    prop_oneof![
        any::<u32>(),
        // Near misses: protocol 2.x and 4.x, and the special codes' neighbours (major 1234).
        (
            prop_oneof![
                Just(2u32),
                Just(4u32),
                Just(1234u32),
                Just(0u32),
                Just(0xffffu32)
            ],
            any::<u16>()
        )
            .prop_map(|(major, minor)| (major << 16) | u32::from(minor)),
    ]
    .prop_filter("not v3 nor special", |c| {
        (c >> 16) != 3 && !SPECIAL_CODES.contains(c)
    })
}

proptest! {
    #![proptest_config(cases())]

    // ---------------------------------------------------------------------------------------
    // First packet: no panics, self-consistency
    // ---------------------------------------------------------------------------------------

    #[test]
    fn packet_length_accepts_exactly_8_to_the_limit(header in any::<[u8; 4]>()) {
        let declared = i32::from_be_bytes(header) as i64;
        match packet_length(header) {
            Ok(n) => {
                prop_assert_eq!(n as i64, declared);
                prop_assert!((8..=MAX_STARTUP_PACKET_LENGTH).contains(&n));
            }
            Err(PacketError::BadLength(v)) => {
                prop_assert_eq!(v, declared);
                prop_assert!(!(8..=MAX_STARTUP_PACKET_LENGTH as i64).contains(&declared));
            }
            Err(e) => prop_assert!(false, "packet_length gave {e:?}"),
        }
    }

    #[test]
    fn parse_first_packet_never_panics_on_arbitrary_bytes(
        bytes in prop_oneof![9 => vec(any::<u8>(), 0..64), 1 => vec(any::<u8>(), 0..10_050)],
    ) {
        if parse_first_packet(&bytes).is_ok() {
            let header = [bytes[0], bytes[1], bytes[2], bytes[3]];
            prop_assert_eq!(packet_length(header), Ok(bytes.len()));
        }
    }

    /// Arbitrary bytes behind a length prefix that matches, so parsing gets past the length check.
    #[test]
    fn parse_first_packet_never_panics_behind_a_correct_length(
        code in prop_oneof![
            any::<u32>(),
            select(vec![PROTOCOL_V3, PROTOCOL_V3 | 1, PROTOCOL_V3 | 0xffff, CANCEL_CODE, SSL_CODE, GSSENC_CODE]),
        ],
        body in prop_oneof![
            9 => vec(any::<u8>(), 0..64),
            1 => vec(any::<u8>(), 0..(MAX_STARTUP_PACKET_LENGTH - 8)),
        ],
    ) {
        let p = packet(code, &body);
        let r = parse_first_packet(&p);
        if r.is_ok() {
            prop_assert!(p.len() <= MAX_STARTUP_PACKET_LENGTH);
        }
        match (code, &r) {
            (SSL_CODE, Ok(v)) => prop_assert_eq!(v, &FirstPacket::SslRequest),
            (GSSENC_CODE, Ok(v)) => prop_assert_eq!(v, &FirstPacket::GssEncRequest),
            (CANCEL_CODE, Ok(FirstPacket::CancelRequest { .. })) => prop_assert!((8..=260).contains(&body.len())),
            (c, Ok(FirstPacket::Startup { minor, user, .. })) => {
                prop_assert_eq!(c >> 16, 3);
                prop_assert_eq!(u32::from(*minor), c & 0xffff);
                prop_assert!(user.is_some(), "a StartupMessage without user was accepted");
            }
            (_, Ok(v)) => prop_assert!(false, "code {code} parsed as {v:?}"),
            (_, Err(_)) => {}
        }
    }

    // ---------------------------------------------------------------------------------------
    // First packet: structured round trips
    // ---------------------------------------------------------------------------------------

    #[test]
    fn startup_messages_round_trip((p, want) in valid_startup()) {
        prop_assert_eq!(parse_first_packet(&p), Ok(want));
    }

    #[test]
    fn cancel_requests_round_trip(pid in any::<u32>(), key in vec(any::<u8>(), 4..=256)) {
        let p = cancel_request(pid, &key);
        prop_assert_eq!(&p[..], &packet(CANCEL_CODE, &[&pid.to_be_bytes()[..], &key].concat())[..]);
        prop_assert_eq!(parse_first_packet(&p), Ok(FirstPacket::CancelRequest { pid, key }));
    }

    #[test]
    fn ssl_and_gssenc_requests_need_an_empty_body(extra in vec(any::<u8>(), 0..32)) {
        for (code, want) in [(SSL_CODE, FirstPacket::SslRequest), (GSSENC_CODE, FirstPacket::GssEncRequest)] {
            let r = parse_first_packet(&packet(code, &extra));
            if extra.is_empty() {
                prop_assert_eq!(r, Ok(want));
            } else {
                prop_assert!(matches!(r, Err(PacketError::Malformed(_))), "{:?}", r);
            }
        }
    }

    #[test]
    fn cancel_requests_need_a_key_of_4_to_256_bytes(
        body in prop_oneof![vec(any::<u8>(), 0..8), vec(any::<u8>(), 261..300)],
    ) {
        let r = parse_first_packet(&packet(CANCEL_CODE, &body));
        prop_assert!(matches!(r, Err(PacketError::Malformed(_))), "{:?}", r);
    }

    /// A StartupMessage cut anywhere inside its parameter list (the length prefix fixed up to the
    /// cut) is refused as malformed, never misread. The one cut pglb accepts is at a pair
    /// boundary (only the final terminator missing) with `user` kept: PostgreSQL refuses that
    /// layout itself, and pglb forwards the packet untouched, so the client still gets an error.
    #[test]
    fn truncated_startup_messages_are_malformed((p, _) in valid_startup(), cut in any::<Index>()) {
        let body = &p[8..];
        let end = 8 + cut.index(body.len());
        let mut q = p[..end].to_vec();
        let n = q.len() as u32;
        q[0..4].copy_from_slice(&n.to_be_bytes());
        match parse_first_packet(&q) {
            Err(PacketError::Malformed(_)) => {}
            Err(e) => prop_assert!(false, "unexpected error kind {e:?}"),
            Ok(FirstPacket::Startup { user, .. }) => {
                prop_assert!(user.is_some());
                prop_assert_eq!(q.last(), Some(&0u8));
            }
            Ok(other) => prop_assert!(false, "truncated startup parsed as {other:?}"),
        }
    }

    // ---------------------------------------------------------------------------------------
    // First packet: errors for bad lengths and versions
    // ---------------------------------------------------------------------------------------

    #[test]
    fn lengths_over_the_limit_are_refused(
        len in prop_oneof![
            (MAX_STARTUP_PACKET_LENGTH as i32 + 1)..=(MAX_STARTUP_PACKET_LENGTH as i32 + 64),
            (MAX_STARTUP_PACKET_LENGTH as i32 + 1)..=i32::MAX,
        ],
        code in any::<u32>(),
    ) {
        prop_assert_eq!(packet_length(len.to_be_bytes()), Err(PacketError::BadLength(len as i64)));
        // Even with every announced byte present (the reader never gets this far).
        if (len as usize) <= MAX_STARTUP_PACKET_LENGTH + 64 {
            let mut p = vec![0u8; len as usize];
            p[0..4].copy_from_slice(&len.to_be_bytes());
            p[4..8].copy_from_slice(&code.to_be_bytes());
            prop_assert_eq!(parse_first_packet(&p), Err(PacketError::BadLength(len as i64)));
        }
    }

    #[test]
    fn zero_short_and_negative_lengths_are_refused(
        len in prop_oneof![Just(0i32), 1i32..8, i32::MIN..0, Just(-1i32), Just(i32::MIN)],
        rest in vec(any::<u8>(), 4..64),
    ) {
        prop_assert_eq!(packet_length(len.to_be_bytes()), Err(PacketError::BadLength(len as i64)));
        let mut p = len.to_be_bytes().to_vec();
        p.extend_from_slice(&rest);
        prop_assert!(matches!(parse_first_packet(&p), Err(PacketError::BadLength(_))));
    }

    /// The prefix says one size, the buffer holds another.
    #[test]
    fn a_length_prefix_that_disagrees_with_the_packet_is_refused(
        (p, _) in valid_startup(),
        delta in prop_oneof![-8i64..0, 1i64..64],
    ) {
        let declared = p.len() as i64 + delta; // p.len() >= 15: never negative
        let mut q = p.clone();
        q[0..4].copy_from_slice(&(declared as u32).to_be_bytes());
        prop_assert!(matches!(parse_first_packet(&q), Err(PacketError::BadLength(_))));
    }

    #[test]
    fn unknown_protocol_versions_are_refused(
        code in unknown_code(),
        body in prop_oneof![
            vec(any::<u8>(), 0..64),
            // A perfectly good parameter list does not make the version acceptable.
            Just(startup_body(&[(b"user".to_vec(), b"app".to_vec())])),
        ],
    ) {
        let r = parse_first_packet(&packet(code, &body));
        prop_assert_eq!(
            r,
            Err(PacketError::UnsupportedProtocol { major: (code >> 16) as u16, minor: (code & 0xffff) as u16 })
        );
    }

    #[test]
    fn startup_messages_at_the_size_limit(pad in 0usize..16) {
        // A `user` value long enough to put the packet at exactly the limit minus `pad`, and one
        // byte over the limit.
        let base = packet(PROTOCOL_V3, &startup_body(&[(b"user".to_vec(), Vec::new())])).len();
        let fill = MAX_STARTUP_PACKET_LENGTH - base - pad;
        let ok = packet(PROTOCOL_V3, &startup_body(&[(b"user".to_vec(), vec![b'u'; fill])]));
        prop_assert_eq!(ok.len(), MAX_STARTUP_PACKET_LENGTH - pad);
        let parsed = parse_first_packet(&ok);
        prop_assert!(matches!(parsed, Ok(FirstPacket::Startup { .. })), "{:?}", parsed);
        let over = packet(PROTOCOL_V3, &startup_body(&[(b"user".to_vec(), vec![b'u'; fill + pad + 1])]));
        prop_assert_eq!(over.len(), MAX_STARTUP_PACKET_LENGTH + 1);
        prop_assert_eq!(parse_first_packet(&over), Err(PacketError::BadLength(over.len() as i64)));
    }
}

// -------------------------------------------------------------------------------------------
// Config
// -------------------------------------------------------------------------------------------

/// Env var the base config names for every secret; set once per process.
const PW_ENV: &str = "PGLB_PROPTEST_SECRET";
const CONFIG_PATH: &str = "/etc/pglb/lb-proptest.toml";

fn set_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| std::env::set_var(PW_ENV, "proptest-secret-value"));
}

/// A valid config that uses every section and most keys.
fn base_config() -> String {
    format!(
        r#"# pglb config used by the property tests
[listen]
write = "127.0.0.1:5435"
read = "127.0.0.1:5436"
stats = "127.0.0.1:8404"

[check]
interval = "1s"
timeout = "2s"
rise = 2
fall = 2
user = "pglb_check"
password_env = "{PW_ENV}"
database = "postgres"

[read]
balance = "leastconn"
max_lag = "16MB"
max_lag_time = "10s"
fallback_to_primary = true

[proxy]
connect_timeout = "2s"
client_startup_timeout = "10s"
shutdown_timeout = "30s"
drain_timeout = "5m"
close_on_writer_change = true
tcp_keepalive = "10s"
tcp_user_timeout = "30s"

[stats]
admin_token_env = "{PW_ENV}"

[promoter]
user = "postgres"
password_env = "{PW_ENV}"
failover_after = "3s"
interval = "500ms"

[[backend]]
name = "pg-0"
address = "10.0.0.10:5432"
weight = 1
priority = 100
no_failover = false

[[backend]]
name = "pg-1"
address = "db-1.example.internal:5432"
weight = 2

[[backend]]
name = "pg-2"
address = "[::1]:5433"
"#
    )
}

const KEYS: &[&str] = &[
    "write",
    "read",
    "stats",
    "interval",
    "timeout",
    "rise",
    "fall",
    "user",
    "password",
    "password_env",
    "password_file",
    "database",
    "balance",
    "max_lag",
    "max_lag_time",
    "fallback_to_primary",
    "tls_affinity",
    "connect_timeout",
    "client_startup_timeout",
    "shutdown_timeout",
    "drain_timeout",
    "close_on_writer_change",
    "maxconn",
    "backend_maxconn",
    "queue_timeout",
    "write_idle_timeout",
    "read_idle_timeout",
    "tcp_keepalive",
    "tcp_user_timeout",
    "admin_token_env",
    "admin_token_file",
    "read_user",
    "read_password_env",
    "read_password_file",
    "read_token_env",
    "read_token_file",
    "failover_after",
    "synchronous",
    "pglb_url",
    "listen",
    "replication_user",
    "name",
    "address",
    "weight",
    "priority",
    "no_failover",
    "intervall",
    "adress",
    "max_lagg",
    "x",
    "\"quoted key\"",
    "a.b",
    "check.rise",
];

const VALUES: &[&str] = &[
    "\"1s\"",
    "\"0s\"",
    "\"-1s\"",
    "\"fast\"",
    "\"250ms\"",
    "\"18446744073709551615s\"",
    "\"99999999999999999999years\"",
    "\"1e400ns\"",
    "\"16MB\"",
    "\"16 parsecs\"",
    "\"1e30TB\"",
    "\"99999999999999999999999TB\"",
    "\".\"",
    "\"..MB\"",
    "0",
    "-1",
    "1",
    "2",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
    "true",
    "false",
    "1.5",
    "nan",
    "-inf",
    "\"127.0.0.1:5435\"",
    "\"127.0.0.1:5436\"",
    "\"0.0.0.0:8404\"",
    "\"[::1]:0\"",
    "\"host:99999\"",
    "\"host:\"",
    "\":5432\"",
    "\"\"",
    "\" \"",
    "\"pg-0\"",
    "\"pg 0\"",
    "{}",
    "[]",
    "[1, \"a\"]",
    "{ a = 1 }",
    "\"\\u0000\"",
    "'''multi\nline'''",
    "\"ünïcödé\"",
    "1979-05-27T07:32:00Z",
    "\"leastconn\"",
    "\"roundrobin\"",
    "\"source\"",
    "\"random\"",
    "\"PGLB_PROPTEST_SECRET\"",
    "\"PGLB_PROPTEST_SURELY_UNSET\"",
    "\"/nonexistent/secret\"",
    "\"/tmp\"",
    "\"http://127.0.0.1:8404\"",
];

const ODD_LINES: &[&str] = &[
    "",
    "# comment",
    "=",
    "[",
    "]]",
    "[check]",
    "[listen]",
    "[read]",
    "[proxy]",
    "[stats]",
    "[promoter]",
    "[[backend]]",
    "[backend]",
    "[[check]]",
    "[nonsense]",
    "[check.sub]",
    "\"unterminated",
    "a = \"\"\"",
    "\u{feff}",
    "\t",
    "\r",
    "key",
    "= 1",
    "[[]]",
    "[ listen ]",
    "name = \"pg-0\"",
    "name = \"pg-9\"\naddress = \"h:1\"",
];

#[derive(Debug, Clone)]
enum Mutation {
    DeleteLine(Index),
    DuplicateLine(Index),
    SwapLines(Index, Index),
    Insert(Index, String),
    Typo(Index, Index, TypoKind),
    Truncate(Index),
}

#[derive(Debug, Clone)]
enum TypoKind {
    Delete,
    Insert(char),
    Replace(char),
    DoubleChar,
    SwapWithNext,
}

fn odd_char() -> impl Strategy<Value = char> {
    prop_oneof![
        select(vec![
            '=', '"', '\'', '[', ']', '\n', '#', '.', ',', ':', ' ', '\\', '{', '}', '0', '9', '-',
            'e', 'x', '\u{0}', 'é', '\u{feff}', '𝄞'
        ]),
        any::<char>(),
    ]
}

fn inserted_line() -> impl Strategy<Value = String> {
    prop_oneof![
        (select(KEYS), select(VALUES)).prop_map(|(k, v)| format!("{k} = {v}")),
        select(ODD_LINES).prop_map(str::to_string),
        "[ -~]{0,40}",
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => any::<Index>().prop_map(Mutation::DeleteLine),
        1 => any::<Index>().prop_map(Mutation::DuplicateLine),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        3 => (any::<Index>(), inserted_line()).prop_map(|(i, l)| Mutation::Insert(i, l)),
        4 => (
            any::<Index>(),
            any::<Index>(),
            prop_oneof![
                Just(TypoKind::Delete),
                odd_char().prop_map(TypoKind::Insert),
                odd_char().prop_map(TypoKind::Replace),
                Just(TypoKind::DoubleChar),
                Just(TypoKind::SwapWithNext),
            ]
        )
            .prop_map(|(l, c, k)| Mutation::Typo(l, c, k)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
    ]
}

fn apply(text: &str, m: &Mutation) -> String {
    let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
    match m {
        Mutation::DeleteLine(i) => {
            let i = i.index(lines.len());
            lines.remove(i);
        }
        Mutation::DuplicateLine(i) => {
            let i = i.index(lines.len());
            let l = lines[i].clone();
            lines.insert(i, l);
        }
        Mutation::SwapLines(a, b) => {
            let (a, b) = (a.index(lines.len()), b.index(lines.len()));
            lines.swap(a, b);
        }
        Mutation::Insert(i, l) => {
            let i = i.index(lines.len() + 1);
            lines.insert(i, l.clone());
        }
        Mutation::Typo(l, c, kind) => {
            let l = l.index(lines.len());
            let mut chars: Vec<char> = lines[l].chars().collect();
            let at = c.index(chars.len() + 1);
            match kind {
                TypoKind::Insert(ch) => chars.insert(at, *ch),
                _ if chars.is_empty() => {}
                TypoKind::Delete => {
                    chars.remove(at.min(chars.len() - 1));
                }
                TypoKind::Replace(ch) => {
                    let at = at.min(chars.len() - 1);
                    chars[at] = *ch;
                }
                TypoKind::DoubleChar => {
                    let at = at.min(chars.len() - 1);
                    chars.insert(at, chars[at]);
                }
                TypoKind::SwapWithNext => {
                    let at = at.min(chars.len() - 1);
                    if at + 1 < chars.len() {
                        chars.swap(at, at + 1);
                    }
                }
            }
            lines[l] = chars.into_iter().collect();
        }
        Mutation::Truncate(i) => {
            let joined = lines.join("\n");
            let mut at = i.index(joined.len() + 1);
            while !joined.is_char_boundary(at) {
                at -= 1;
            }
            return joined[..at].to_string();
        }
    }
    lines.join("\n")
}

fn mutated_config() -> impl Strategy<Value = String> {
    vec(mutation(), 1..6).prop_map(|ms| {
        let mut text = base_config();
        for m in &ms {
            text = apply(&text, m);
        }
        text
    })
}

/// Text that looks a bit like TOML: fragments of real lines, keys, values and noise.
fn tomlish() -> impl Strategy<Value = String> {
    vec(
        prop_oneof![
            inserted_line(),
            select(ODD_LINES).prop_map(str::to_string),
            ".{0,60}",
        ],
        0..30,
    )
    .prop_map(|ls| ls.join("\n"))
}

/// Every error names the file and a line: `FILE:LINE: key `KEY`: MESSAGE`, LINE a number no
/// greater than the file's line count + 1 (0 is allowed: "no particular line").
fn check_error(src: &str, path: &Path, e: &ConfigError) -> Result<(), TestCaseError> {
    let shown = e.to_string();
    let prefix = format!("{}:", path.display());
    prop_assert!(
        shown.starts_with(&prefix),
        "error does not start with the path: {shown}"
    );
    let (line, key) = match e {
        ConfigError::Parse {
            path: p, line, key, ..
        }
        | ConfigError::Invalid {
            path: p, line, key, ..
        } => {
            prop_assert_eq!(p.as_path(), path);
            (*line, key)
        }
        ConfigError::Io { .. } => {
            prop_assert!(false, "Config::parse gave an I/O error: {shown}");
            unreachable!()
        }
    };
    let rest = &shown[prefix.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    prop_assert!(!digits.is_empty(), "no line number after the path: {shown}");
    prop_assert_eq!(digits.parse::<usize>().ok(), Some(line), "{}", shown);
    prop_assert!(
        rest[digits.len()..].starts_with(": key `"),
        "no key after the line: {shown}"
    );
    let _ = key;
    let lines = src.lines().count().max(1);
    prop_assert!(
        line <= lines + 1,
        "line {line} beyond the file's {lines} lines: {shown}"
    );
    Ok(())
}

/// What a config that validated must hold.
fn check_valid(c: &Config, path: &Path) -> Result<(), TestCaseError> {
    prop_assert_eq!(c.path.as_path(), path);
    prop_assert!(!c.backends.is_empty());
    let mut names = std::collections::HashSet::new();
    for b in &c.backends {
        prop_assert!(names.insert(b.name.clone()), "duplicate backend {}", b.name);
        prop_assert!(!b.name.is_empty());
        prop_assert!(b.weight >= 1);
        let (host, port) = b.address.rsplit_once(':').expect("host:port");
        prop_assert!(!host.is_empty());
        prop_assert!(port.parse::<u16>().is_ok());
    }
    prop_assert!(c.check.rise >= 1 && c.check.fall >= 1);
    prop_assert!(!c.check.interval.is_zero() && !c.check.timeout.is_zero());
    prop_assert!(c.listen.write != c.listen.read);
    prop_assert!(c.listen.stats != c.listen.write && c.listen.stats != c.listen.read);
    Ok(())
}

fn parse_and_check(src: &str) -> Result<(), TestCaseError> {
    let path = Path::new(CONFIG_PATH);
    match Config::parse(path, src) {
        Ok(c) => check_valid(&c, path),
        Err(e) => check_error(src, path, &e),
    }
}

#[test]
fn the_base_config_of_these_properties_is_valid() {
    set_env();
    let c = Config::parse(Path::new(CONFIG_PATH), &base_config())
        .unwrap_or_else(|e| panic!("base config refused: {e}"));
    assert_eq!(c.backends.len(), 3);
    assert!(c.promoter.is_some());
    assert!(c.stats.admin_token.is_some());
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn config_parse_never_panics_on_arbitrary_text(src in any::<String>()) {
        set_env();
        parse_and_check(&src)?;
    }

    #[test]
    fn config_parse_never_panics_on_tomlish_text(src in tomlish()) {
        set_env();
        parse_and_check(&src)?;
    }

    /// Sizes (`max_lag`): any text gives a number or an error, never a panic; plain numbers
    /// and the units PostgreSQL uses come out exact.
    #[test]
    fn sizes_parse_or_fail_cleanly(
        text in prop_oneof![any::<String>(), "[0-9.]{0,24} ?(B|kB|KB|k|K|KiB|MB|M|MiB|GB|G|GiB|TB|T|TiB|x|)"],
        n in 0u64..(1 << 20),
        unit in select(vec![("", 1u64), ("B", 1), ("kB", 1 << 10), ("MB", 1 << 20), ("GiB", 1 << 30), ("TB", 1 << 40)]),
    ) {
        let _ = pglb::config::file::parse_size(&text);
        prop_assert_eq!(pglb::config::file::parse_size(&format!("{n}{}", unit.0)), Ok(n * unit.1));
    }

    #[test]
    fn config_parse_never_panics_on_mutated_valid_configs(src in mutated_config()) {
        set_env();
        parse_and_check(&src)?;
    }
}

/// Every key of the base config set to every value of the vocabulary (a finite space, so it is
/// walked whole rather than sampled): when the file is refused, the error names the line of
/// the changed key, and the key. The one cross-field exception: `listen.write` set to the read
/// address is reported on `listen.read`'s line (that is the line of the other value).
#[test]
fn config_errors_for_a_bad_value_point_at_its_line() {
    set_env();
    let path = Path::new(CONFIG_PATH);
    let base = base_config();
    let lines: Vec<&str> = base.split('\n').collect();
    let mut wrong = Vec::new();
    let mut refused = 0;
    for (i, l) in lines.iter().enumerate() {
        let Some((key, _)) = l.split_once(" = ") else {
            continue;
        };
        for value in VALUES {
            let mut changed: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
            changed[i] = format!("{key} = {value}");
            let src = changed.join("\n");
            let Err(e) = Config::parse(path, &src) else {
                continue;
            };
            refused += 1;
            if let Err(f) = check_error(&src, path, &e) {
                wrong.push(format!("{}: {f}", changed[i]));
                continue;
            }
            let (line, named) = match &e {
                ConfigError::Parse { line, key, .. } | ConfigError::Invalid { line, key, .. } => {
                    (*line, key.clone())
                }
                ConfigError::Io { .. } => unreachable!("checked above"),
            };
            // A multi-line value may put the parser's position on a later line of the value.
            let value_lines = value.matches('\n').count();
            let on_its_line = (i + 1..=i + 1 + value_lines).contains(&line) && named.ends_with(key);
            let cross_field = named == "listen.read"
                && key == "write"
                && lines
                    .get(line.wrapping_sub(1))
                    .is_some_and(|l| l.starts_with("read = "));
            if !(on_its_line || cross_field) {
                wrong.push(format!(
                    "`{}` on line {} refused as: {e}",
                    changed[i].replace('\n', "\\n"),
                    i + 1
                ));
            }
        }
    }
    assert!(
        refused > 100,
        "only {refused} refusals: the vocabulary no longer exercises the parser"
    );
    assert!(
        wrong.is_empty(),
        "{} of {refused} refusals do not point at the changed line and key:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
