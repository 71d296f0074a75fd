//! CONNECT tunnels: TLS end to end through Kalmar, half-close, bulk both ways, idle
//! timeout, errors.

mod support;

use std::time::{Duration, Instant};

use support::origin::TlsOrigin;
use support::{Kalmar, curl};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_through_a_tunnel_with_reqwest_and_curl() {
    let origin = TlsOrigin::start().await;
    let kalmar = Kalmar::start("");
    let url = format!("https://127.0.0.1:{}/hello", origin.addr.port());
    let r = kalmar.client().get(&url).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "hello");

    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &origin.cert_pem).unwrap();
    let proxy = kalmar.url();
    let ca = ca.display().to_string();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || curl(&["-p", "-x", &proxy, "--cacert", &ca, &url]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "hello");

    let lines = kalmar.log_lines(2);
    let tunnel = &lines[0];
    assert_eq!(tunnel["method"], "CONNECT");
    assert_eq!(tunnel["status"], 200);
    assert_eq!(
        tunnel["target"],
        format!("127.0.0.1:{}", origin.addr.port())
    );
    assert!(
        tunnel["bytes_from_client"].as_u64().unwrap() > 200,
        "TLS handshake bytes counted: {tunnel}"
    );
    assert!(
        tunnel["bytes_to_client"].as_u64().unwrap() > 200,
        "{tunnel}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_keeps_the_other_direction_open() {
    // A server that reads until EOF, then answers with what it got, then closes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(format!("got {} bytes", got.len()).as_bytes())
            .await
            .unwrap();
    });
    let kalmar = Kalmar::start("");
    let (mut s, head) = support::open_tunnel(kalmar.addr, &addr.to_string()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(&[1u8; 5000]).await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, "got 5000 bytes");
    let lines = kalmar.log_lines(1);
    assert_eq!(lines[0]["bytes_from_client"], 5000);
    assert_eq!(lines[0]["bytes_to_client"], "got 5000 bytes".len());
}

/// What a bulk stream carries: a pseudo-random block repeated. Its length is prime, so it
/// never lines up with read or write sizes: a lost, doubled or reordered chunk shows.
fn stream_block(seed: u64) -> Vec<u8> {
    const PERIOD: usize = 65_521;
    let mut x = seed | 1;
    (0..PERIOD)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

async fn send_stream(mut to: impl AsyncWriteExt + Unpin, seed: u64, len: usize) {
    let block = stream_block(seed);
    let mut sent = 0;
    while sent < len {
        let at = sent % block.len();
        let n = (block.len() - at).min(len - sent).min(40_000);
        to.write_all(&block[at..at + n]).await.unwrap();
        sent += n;
    }
    to.shutdown().await.unwrap();
}

/// Read to EOF, checking every byte; the count read.
async fn receive_stream(mut from: impl AsyncReadExt + Unpin, seed: u64) -> usize {
    let block = stream_block(seed);
    let mut buf = vec![0u8; 100_000];
    let mut got = 0;
    loop {
        let n = from.read(&mut buf).await.unwrap();
        if n == 0 {
            return got;
        }
        let (mut at, mut rest) = (got % block.len(), &buf[..n]);
        while !rest.is_empty() {
            let k = rest.len().min(block.len() - at);
            assert!(
                rest[..k] == block[at..at + k],
                "wrong bytes near offset {got}"
            );
            (rest, at) = (&rest[k..], 0);
        }
        got += n;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_each_way_at_once_arrive_intact_and_counted() {
    const SIZE: usize = 100 * 1024 * 1024;
    // An origin that checks the upload while it sends the download.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let origin = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (rd, wr) = s.into_split();
        tokio::join!(receive_stream(rd, 1), send_stream(wr, 2, SIZE)).0
    });
    let kalmar = Kalmar::start("");
    let (s, head) = support::open_tunnel(kalmar.addr, &addr.to_string()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (rd, wr) = s.into_split();
    let (downloaded, ()) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(receive_stream(rd, 2), send_stream(wr, 1, SIZE))
    })
    .await
    .expect("100 MiB each way within 2 minutes");
    assert_eq!(downloaded, SIZE);
    assert_eq!(origin.await.unwrap(), SIZE);
    let lines = kalmar.log_lines(1);
    assert_eq!(lines[0]["bytes_from_client"], SIZE);
    assert_eq!(lines[0]["bytes_to_client"], SIZE);
    assert!(lines[0]["error"].is_null(), "{}", lines[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_with_the_connect_head_are_relayed() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(&got).await.unwrap();
    });
    let kalmar = Kalmar::start("");
    let mut s = TcpStream::connect(kalmar.addr).await.unwrap();
    // Head and first payload in one write, as clients that pipeline a ClientHello do.
    s.write_all(format!("CONNECT {addr} HTTP/1.1\r\nHost: {addr}\r\n\r\nearly-bytes").as_bytes())
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("\r\n\r\nearly-bytes"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_a_closed_port_is_502() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let kalmar = Kalmar::start("");
    let (_s, head) = support::open_tunnel(kalmar.addr, &closed.to_string()).await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert!(head.contains("x-kalmar-error: connect-failed"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_without_port_is_400() {
    let kalmar = Kalmar::start("");
    let (_s, head) = support::open_tunnel(kalmar.addr, "example.test").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnel_is_closed_after_tunnel_idle() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    });
    let kalmar = Kalmar::start("[timeouts]\ntunnel_idle = \"500ms\"");
    let (mut s, head) = support::open_tunnel(kalmar.addr, &addr.to_string()).await;
    assert!(head.starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        started.elapsed()
    );
    let lines = kalmar.log_lines(1);
    assert_eq!(lines[0]["error"], "tunnel-idle-timeout");
}
