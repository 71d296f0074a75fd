//! ClientHello parsing: real hellos from rustls, crafted ones (fragmented, ECH, malformed), the reader, and a property test over arbitrary bytes.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tokio::io::AsyncWriteExt;

use super::*;

/// The first flight a real rustls client sends for `name` (a DNS name or an address), offering
/// `alpn`.
fn rustls_hello(name: &str, alpn: &[&str]) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("name");
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), server_name).expect("client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write_tls");
    }
    out
}

/// A ClientHello handshake message (header included) with `extensions`, as a client would build it.
fn hello_message(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]); // two cipher suites
    body.extend_from_slice(&[1, 0]); // null compression
    let mut ext = Vec::new();
    for (kind, data) in extensions {
        ext.extend_from_slice(&kind.to_be_bytes());
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(data);
    }
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut msg = vec![CLIENT_HELLO];
    msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    msg.extend_from_slice(&body);
    msg
}

/// `message` in handshake records of at most `size` bytes each.
fn records(message: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in message.chunks(size) {
        out.extend_from_slice(&[HANDSHAKE, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// The handshake message inside a single-record first flight.
fn message_of(flight: &[u8]) -> Vec<u8> {
    let len = usize::from(u16::from_be_bytes([flight[3], flight[4]]));
    flight[5..5 + len].to_vec()
}

fn sni_ext(names: &[&[u8]]) -> (u16, Vec<u8>) {
    let mut list = Vec::new();
    for name in names {
        list.push(0);
        list.extend_from_slice(&(name.len() as u16).to_be_bytes());
        list.extend_from_slice(name);
    }
    let mut data = (list.len() as u16).to_be_bytes().to_vec();
    data.extend_from_slice(&list);
    (EXT_SERVER_NAME, data)
}

fn alpn_ext(names: &[&str]) -> (u16, Vec<u8>) {
    let mut list = Vec::new();
    for name in names {
        list.push(name.len() as u8);
        list.extend_from_slice(name.as_bytes());
    }
    let mut data = (list.len() as u16).to_be_bytes().to_vec();
    data.extend_from_slice(&list);
    (EXT_ALPN, data)
}

fn name(s: &str) -> Option<Host> {
    Some(Host::Name(s.into()))
}

fn hello(parsed: Parsed) -> ClientHello {
    match parsed {
        Parsed::Hello(hello) => hello,
        other => panic!("expected a ClientHello, got {other:?}"),
    }
}

#[test]
fn a_real_rustls_hello_gives_name_and_alpn() {
    let flight = rustls_hello("pypi.org", &["h2", "http/1.1"]);
    let got = hello(parse(&flight));
    assert_eq!(got.server_name, name("pypi.org"));
    assert_eq!(got.alpn, ["h2", "http/1.1"]);
    assert!(!got.ech);

    // rustls sends no SNI for an address, as RFC 6066 asks.
    let got = hello(parse(&rustls_hello("127.0.0.1", &[])));
    assert_eq!(got.server_name, None);
    assert!(got.alpn.is_empty());
}

#[test]
fn every_prefix_needs_more_and_says_how_much() {
    let flight = rustls_hello("files.pythonhosted.org", &["h2"]);
    for cut in 0..flight.len() {
        match parse(&flight[..cut]) {
            Parsed::NeedMore(need) => {
                assert!(need > cut && need <= flight.len(), "{cut}: need {need}");
            }
            other => panic!("prefix of {cut} bytes: {other:?}"),
        }
    }
}

#[test]
fn a_hello_fragmented_over_records_is_reassembled() {
    let message = message_of(&rustls_hello("registry.example.org", &["http/1.1"]));
    let whole = hello(parse(&records(&message, 1 << 14)));
    for size in [1, 2, 3, 4, 5, 7, 64, 100, 511] {
        let flight = records(&message, size);
        assert_eq!(hello(parse(&flight)), whole, "records of {size}");
        for cut in 0..flight.len() {
            assert!(
                matches!(parse(&flight[..cut]), Parsed::NeedMore(_)),
                "records of {size}, cut at {cut}"
            );
        }
    }
    // What follows the hello (a compatibility ChangeCipherSpec, early data) does not matter.
    let mut flight = records(&message, 100);
    flight.extend_from_slice(&[20, 3, 3, 0, 1, 1]);
    assert_eq!(hello(parse(&flight)), whole);
}

#[test]
fn not_tls_is_told_from_the_first_bytes() {
    for bytes in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\x00",
        b"\x16\x02",
        b"\x16\x03\x09",
        b"\x80\x2e\x01\x03\x01", // SSLv2-compatible hello
        b"\x17\x03\x03\x00\x10",
    ] {
        assert_eq!(parse(bytes), Parsed::NotTls, "{bytes:?}");
    }
    for bytes in [
        &b""[..],
        b"\x16",
        b"\x16\x03",
        b"\x16\x03\x01",
        b"\x16\x03\x01\x02",
    ] {
        assert!(matches!(parse(bytes), Parsed::NeedMore(_)), "{bytes:?}");
    }
}

#[test]
fn server_names_are_normalised_like_connect_hosts() {
    let cases: &[(&[u8], Option<Host>)] = &[
        (b"Example.COM", name("example.com")),
        (b"example.com.", name("example.com")),
        ("bücher.example".as_bytes(), name("xn--bcher-kva.example")),
        (b"xn--bcher-kva.example", name("xn--bcher-kva.example")),
        (b"_acme.example.com", name("_acme.example.com")),
        (b"127.0.0.1", Some(Host::Ip("127.0.0.1".parse().unwrap()))),
    ];
    for (raw, want) in cases {
        let got = hello(parse(&records(&hello_message(&[sni_ext(&[raw])]), 1 << 14)));
        assert_eq!(&got.server_name, want, "{raw:?}");
    }
    for raw in [
        &b"pypi%2eorg"[..],
        b"pypi.org:443",
        b"[::1]",
        b"a b.com",
        b"",
        b"a..b",
        b"\xff\xfe",
        b"evil.com\x00.pypi.org",
    ] {
        let flight = records(&hello_message(&[sni_ext(&[raw])]), 1 << 14);
        assert_eq!(
            parse(&flight),
            Parsed::Invalid(Invalid::ServerName),
            "{raw:?}"
        );
    }
}

#[test]
fn ech_is_seen_with_its_outer_name() {
    let ech = (EXT_ECH, vec![0, 0, 1, 0, 1, 7, 0, 0, 0, 0]);
    let message = hello_message(&[sni_ext(&[b"public.example"]), alpn_ext(&["h2"]), ech]);
    let got = hello(parse(&records(&message, 300)));
    assert!(got.ech);
    assert_eq!(got.server_name, name("public.example"));
    assert_eq!(got.alpn, ["h2"]);
}

#[test]
fn malformed_hellos_are_invalid_with_the_reason() {
    let good = hello_message(&[sni_ext(&[b"a.example"])]);
    let cases: Vec<(Vec<u8>, Invalid)> = vec![
        (vec![22, 3, 1, 0, 0], Invalid::RecordLength),
        (vec![22, 3, 1, 0x40, 0x01], Invalid::RecordLength),
        (records(&[2, 0, 0, 0], 100), Invalid::NotClientHello),
        (
            {
                let mut f = records(&good[..10], 100);
                f.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
                f
            },
            Invalid::Interleaved,
        ),
        (
            records(
                &hello_message(&[sni_ext(&[b"a.example"]), sni_ext(&[b"b.example"])]),
                1 << 14,
            ),
            Invalid::DuplicateExtension,
        ),
        (
            records(
                &hello_message(&[sni_ext(&[b"a.example", b"b.example"])]),
                1 << 14,
            ),
            Invalid::ServerName,
        ),
        (
            records(&hello_message(&[(EXT_SERVER_NAME, vec![0, 9, 0])]), 1 << 14),
            Invalid::ServerName,
        ),
        (
            records(&hello_message(&[(EXT_ALPN, vec![0, 5, 2, b'h'])]), 1 << 14),
            Invalid::Alpn,
        ),
        (
            records(
                &hello_message(&[alpn_ext(&["h2"]), alpn_ext(&["h2"])]),
                1 << 14,
            ),
            Invalid::DuplicateExtension,
        ),
        (
            {
                // The extension list claims more than the hello holds.
                let mut m = good.clone();
                let at = m.len() - (4 + 2 + 3 + 9) - 2;
                m[at] = 0x7f;
                records(&m, 1 << 14)
            },
            Invalid::Body,
        ),
        (
            {
                // An extension that claims more than the list holds.
                let mut m = good.clone();
                let at = m.len() - (2 + 3 + 9) - 2;
                m[at] = 0x70;
                records(&m, 1 << 14)
            },
            Invalid::Extensions,
        ),
        (
            records(&[1, 0x01, 0, 0], 100), // a 64 KiB ClientHello
            Invalid::TooLarge,
        ),
    ];
    for (bytes, want) in cases {
        assert_eq!(parse(&bytes), Parsed::Invalid(want), "{bytes:02x?}");
    }
}

#[tokio::test]
async fn the_reader_collects_a_hello_sent_one_byte_at_a_time() {
    let mut flight = records(&message_of(&rustls_hello("pypi.org", &["h2"])), 200);
    flight.extend_from_slice(b"\x17\x03\x03\x00\x02hi"); // bytes after the hello are kept too
    let (mut client, mut kalmar) = tokio::io::duplex(64);
    let sent = flight.clone();
    let writer = tokio::spawn(async move {
        for byte in sent {
            client.write_all(&[byte]).await.expect("write");
            tokio::task::yield_now().await;
        }
        client
    });
    let read = read_client_hello(
        &mut kalmar,
        Bytes::new(),
        Duration::from_secs(10),
        std::future::pending(),
    )
    .await;
    let HelloOutcome::Hello(got) = read.outcome else {
        panic!("{:?}", read.outcome)
    };
    assert_eq!(got.server_name, name("pypi.org"));
    // Everything read is returned for forwarding: the hello, and whatever came with its end.
    assert!(flight.starts_with(&read.bytes), "a prefix of what was sent");
    let _client = writer.await.expect("writer");
}

#[tokio::test]
async fn buffered_bytes_count_and_nothing_more_is_read_when_they_suffice() {
    let flight = rustls_hello("pypi.org", &[]);
    let (_client, mut kalmar) = tokio::io::duplex(64);
    let read = read_client_hello(
        &mut kalmar,
        Bytes::from(flight.clone()),
        Duration::from_secs(10),
        std::future::pending(),
    )
    .await;
    assert!(matches!(read.outcome, HelloOutcome::Hello(_)));
    assert_eq!(read.bytes, flight);

    // Part buffered, the rest from the socket.
    let (mut client, mut kalmar) = tokio::io::duplex(4096);
    client.write_all(&flight[10..]).await.expect("write");
    let read = read_client_hello(
        &mut kalmar,
        Bytes::copy_from_slice(&flight[..10]),
        Duration::from_secs(10),
        std::future::pending(),
    )
    .await;
    assert!(matches!(read.outcome, HelloOutcome::Hello(_)));
    assert_eq!(read.bytes, flight);
}

#[tokio::test(start_paused = true)]
async fn timeout_close_and_far_end_first_keep_what_was_read() {
    let flight = rustls_hello("pypi.org", &[]);

    let (mut client, mut kalmar) = tokio::io::duplex(4096);
    client.write_all(&flight[..20]).await.expect("write");
    let read = read_client_hello(
        &mut kalmar,
        Bytes::new(),
        Duration::from_millis(300),
        std::future::pending(),
    )
    .await;
    assert_eq!(read.outcome, HelloOutcome::Timeout);
    assert_eq!(read.bytes, flight[..20]);

    drop(client);
    let (mut client, mut kalmar) = tokio::io::duplex(4096);
    client.write_all(&flight[..20]).await.expect("write");
    drop(client);
    let read = read_client_hello(
        &mut kalmar,
        Bytes::new(),
        Duration::from_secs(5),
        std::future::pending(),
    )
    .await;
    assert_eq!(read.outcome, HelloOutcome::Closed);
    assert_eq!(read.bytes, flight[..20]);

    let (_client, mut kalmar) = tokio::io::duplex(4096);
    let read = read_client_hello(
        &mut kalmar,
        Bytes::new(),
        Duration::from_secs(5),
        std::future::ready(()),
    )
    .await;
    assert_eq!(read.outcome, HelloOutcome::FarEndFirst);
    assert!(read.bytes.is_empty());
}

#[tokio::test]
async fn plain_http_is_not_tls_at_once_and_an_endless_hello_stops_at_64_kib() {
    let (mut client, mut kalmar) = tokio::io::duplex(4096);
    client
        .write_all(b"GET / HTTP/1.1\r\n")
        .await
        .expect("write");
    let read = read_client_hello(
        &mut kalmar,
        Bytes::new(),
        Duration::from_secs(5),
        std::future::pending(),
    )
    .await;
    assert_eq!(read.outcome, HelloOutcome::NotTls);
    assert_eq!(read.bytes, &b"GET / HTTP/1.1\r\n"[..]);

    // A hello that says it is just under 64 KiB long: with its record headers it is more.
    let (mut client, mut kalmar) = tokio::io::duplex(1 << 16);
    let mut message = vec![1, 0, 0xff, 0xf0];
    message.resize(0xfff0 + 4, 0);
    let mut flight = records(&message, 1 << 14);
    flight.extend(std::iter::repeat_n(0u8, 40_000));
    let writer = tokio::spawn(async move {
        let _ = client.write_all(&flight).await;
        client
    });
    let read = read_client_hello(
        &mut kalmar,
        Bytes::new(),
        Duration::from_secs(5),
        std::future::pending(),
    )
    .await;
    assert_eq!(read.outcome, HelloOutcome::Invalid(Invalid::TooLarge));
    assert_eq!(read.bytes.len(), MAX_HELLO_BYTES);
    drop(kalmar);
    let _ = writer.await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = parse(&bytes);
    }

    #[test]
    fn parse_never_panics_on_bytes_that_start_like_tls(
        minor in 0u8..5,
        len in any::<u16>(),
        rest in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut bytes = vec![HANDSHAKE, 3, minor];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(&rest);
        let _ = parse(&bytes);
    }

    #[test]
    fn parse_never_panics_on_a_real_hello_with_bytes_changed(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        size in 1usize..600,
    ) {
        let mut message = message_of(&rustls_hello("pypi.org", &["h2", "http/1.1"]));
        for (at, byte) in edits {
            let at = at % message.len();
            message[at] = byte;
        }
        let _ = parse(&records(&message, size));
    }

    #[test]
    fn record_boundaries_never_change_the_answer(size in 1usize..2000) {
        let message = message_of(&rustls_hello("a.b.example", &["h2"]));
        prop_assert_eq!(parse(&records(&message, size)), parse(&records(&message, 1 << 14)));
    }
}
