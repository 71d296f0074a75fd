//! The tunnel ClientHello check's user-space cost per tunnel: parse a real rustls first flight
//! (one record, and the same hello split over 64-byte records), and decide on it.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use kalmar::acl::{AclConfig, Destination, Policy, Protocol, normalize_host};
use kalmar::config::Config;
use kalmar::tls::client_hello::{Parsed, parse};
use kalmar::tls::policy::Tunnel;
use kalmar::tls::{HelloOutcome, TlsPolicy};

/// The first flight a rustls client sends for `name`, offering h2 and http/1.1.
fn rustls_hello(name: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server_name).expect("conn");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write_tls");
    }
    out
}

/// The handshake message of a one-record flight, re-recorded in records of `size` bytes.
fn split(flight: &[u8], size: usize) -> Vec<u8> {
    let len = usize::from(u16::from_be_bytes([flight[3], flight[4]]));
    let mut out = Vec::new();
    for chunk in flight[5..5 + len].chunks(size) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

fn bench_parse(c: &mut Criterion) {
    let flight = rustls_hello("files.pythonhosted.org");
    assert!(matches!(parse(&flight), Parsed::Hello(_)));
    c.bench_function("tunnel_client_hello_parse", |b| {
        b.iter(|| parse(black_box(&flight)))
    });
    let fragmented = split(&flight, 64);
    assert!(matches!(parse(&fragmented), Parsed::Hello(_)));
    c.bench_function("tunnel_client_hello_parse_64b_records", |b| {
        b.iter(|| parse(black_box(&fragmented)))
    });
}

fn bench_check(c: &mut Criterion) {
    let config = Config::from_toml("[tls]\nsni = \"same-rule\"\n").expect("config");
    let policy = Policy::compile(&AclConfig {
        sources: &config.sources,
        rules: &config.rules,
        destinations: &config.destinations,
    })
    .expect("policy");
    let tls = TlsPolicy::compile(&config.tls, &config.destinations.connect_ports).expect("tls");
    let identity = policy.identify("127.0.0.1".parse().expect("ip"));
    let host = normalize_host("pypi.org").expect("host");
    let method = http::Method::CONNECT;
    let decision = policy.authorize(
        &identity,
        &Destination {
            host: &host,
            port: 443,
            method: &method,
            protocol: Protocol::Connect,
        },
    );
    let tunnel = Tunnel {
        policy: &policy,
        identity: &identity,
        decision: &decision,
        host: &host,
        port: 443,
    };
    let Parsed::Hello(hello) = parse(&rustls_hello("files.pythonhosted.org")) else {
        panic!("hello")
    };
    let outcome = HelloOutcome::Hello(hello);
    assert!(!tls.check(&tunnel, &outcome).closes());
    // A name other than the CONNECT host, allowed by the same rule: the full same-rule path.
    c.bench_function("tunnel_client_hello_check_same_rule", |b| {
        b.iter(|| tls.check(black_box(&tunnel), black_box(&outcome)))
    });
}

criterion_group!(benches, bench_parse, bench_check);
criterion_main!(benches);
