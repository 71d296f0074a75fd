//! Bad input and dead upstreams: a precise status, an X-Kalmar-Error kind, a log line,
//! and the proxy keeps serving.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::dns::DnsServer;
use support::origin::Origin;
use support::{Kalmar, raw_exchange};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_502() {
    let kalmar = Kalmar::start("");
    let addr = closed_port();
    let r = kalmar
        .client()
        .get(format!("http://{addr}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(support::error_kind(&r), "connect-failed");
    assert!(r.headers().contains_key("x-kalmar-request-id"));
    let body = r.text().await.unwrap();
    assert!(body.contains(&addr.to_string()), "{body}");
    let lines = kalmar.log_lines(1);
    assert_eq!(lines[0]["error"], "connect-failed");
    assert_eq!(lines[0]["status"], 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresolvable_name_is_502_dns_failure() {
    let dns = DnsServer::start(&[("known.test", &["127.0.0.1".parse().unwrap()])]).await;
    let kalmar = Kalmar::start(&format!("[dns]\nnameservers = [{:?}]", dns.nameserver()));
    let r = kalmar
        .client()
        .get("http://does-not-exist.test/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(support::error_kind(&r), "dns-failure");
    assert!(r.text().await.unwrap().contains("NXDOMAIN"));
    assert!(
        dns.queries.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the loopback DNS server was asked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolve_through_the_test_dns_server() {
    let origin = Origin::start().await;
    let dns = DnsServer::start(&[("origin.test", &["127.0.0.1".parse().unwrap()])]).await;
    let kalmar = Kalmar::start(&format!("[dns]\nnameservers = [{:?}]", dns.nameserver()));
    let r = kalmar
        .client()
        .get(format!("http://origin.test:{}/hello", origin.addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_is_504() {
    let (_socket, addr, _fillers) = support::black_hole();
    let kalmar = Kalmar::start("[timeouts]\nconnect = \"500ms\"");
    let started = Instant::now();
    let r = kalmar
        .client()
        .get(format!("http://{addr}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(support::error_kind(&r), "connect-timeout");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_origin_is_504_response_timeout() {
    let origin = Origin::start().await;
    let kalmar = Kalmar::start("[timeouts]\nupstream_response_header = \"300ms\"");
    let r = kalmar
        .client()
        .get(origin.url("/slow/3000"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(support::error_kind(&r), "response-timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_line_is_400_and_the_proxy_keeps_serving() {
    let origin = Origin::start().await;
    let kalmar = Kalmar::start("");
    for garbage in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET http://x/ HTTP/9.9\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
        b"GET  http://a b c\r\n\r\n",
    ] {
        let answer = raw_exchange(kalmar.addr, garbage).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{garbage:?}: {answer}");
        assert!(
            answer.contains("x-kalmar-error: malformed-request"),
            "{answer}"
        );
    }
    let r = kalmar
        .client()
        .get(origin.url("/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "hello");
    let lines = kalmar.log_lines(5);
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["error"] == "malformed-request")
            .count(),
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_431() {
    let origin = Origin::start().await;
    let kalmar = Kalmar::start("[server]\nmax_request_header_size = \"8KiB\"");
    let big = "a".repeat(9000);
    let r = kalmar
        .client()
        .get(origin.url("/hello"))
        .header("x-big", big.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    assert_eq!(support::error_kind(&r), "headers-too-large");
    let r = kalmar
        .client()
        .get(origin.url("/hello"))
        .header("x-small", "a".repeat(1000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(origin.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_connections_new_clients_get_503_and_existing_ones_are_served() {
    let origin = Origin::start().await;
    let kalmar = Kalmar::start("[server]\nmax_connections = 2");
    // Two keep-alive clients hold the two slots.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(kalmar.addr).await.unwrap();
        let req = format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", origin.url("/hello"));
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    let answer = raw_exchange(
        kalmar.addr,
        format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", origin.url("/hello")).as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("x-kalmar-error: overloaded"), "{answer}");
    // The held connections still work.
    let s = &mut held[0];
    s.write_all(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", origin.url("/hello")).as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // A slot frees up when a client leaves.
    held.clear();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = kalmar
        .client()
        .get(origin.url("/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_after_the_header_timeout() {
    let kalmar = Kalmar::start("[timeouts]\nrequest_header = \"700ms\"");
    let mut s = tokio::net::TcpStream::connect(kalmar.addr).await.unwrap();
    let started = Instant::now();
    s.write_all(b"GET http://127.0.0.1/ HTTP/1.1\r\nX-Slow: ")
        .await
        .unwrap();
    let mut out = Vec::new();
    // Keep trickling bytes; the proxy must still cut us off at the deadline.
    let trickle = async {
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if s.write_all(b"a").await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), trickle).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("x-kalmar-error: header-timeout"));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "cut after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_client_is_closed() {
    let kalmar = Kalmar::start("[timeouts]\nclient_idle = \"500ms\"");
    let origin = Origin::start().await;
    let mut s = tokio::net::TcpStream::connect(kalmar.addr).await.unwrap();
    s.write_all(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", origin.url("/hello")).as_bytes())
        .await
        .unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "idle connection closed after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tunnels_count_against_max_connections() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let kalmar = Kalmar::start("[server]\nmax_connections = 2");
    let mut tunnels = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(kalmar.addr).await.unwrap();
        s.write_all(format!("CONNECT {addr} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        tunnels.push(s);
        // hyper hands the socket to the tunnel a moment after the 200; until then the
        // connection and the tunnel both count.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let answer = raw_exchange(
        kalmar.addr,
        b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
}
