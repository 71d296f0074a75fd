//! Request-path benches over loopback: a real client, Kalmar in-process, a real origin.

mod support;

use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn forward_http1_get_1kb(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let origin = rt.block_on(support::origin(Bytes::from(vec![b'x'; 1024])));
    let kalmar = support::kalmar(dir.path());
    let proxy = kalmar.proxy_addr;
    let url: hyper::Uri = format!("http://{origin}/1k").parse().unwrap();
    let mut sender = rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    });
    let mut group = c.benchmark_group("forward");
    group.throughput(Throughput::Elements(1));
    group.bench_function("forward_http1_get_1kb", |b| {
        b.iter(|| {
            rt.block_on(async {
                let req = hyper::Request::get(url.clone())
                    .header("host", origin.to_string())
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let resp = sender.send_request(req).await.unwrap();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body.len(), 1024);
            })
        })
    });
    group.finish();
    kalmar.shutdown();
}

fn connect_tunnel_bulk_64mb(c: &mut Criterion) {
    const SIZE: usize = 64 * 1024 * 1024;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let source = rt.block_on(support::bulk_source(SIZE));
    let kalmar = support::kalmar(dir.path());
    let proxy = kalmar.proxy_addr;
    let mut group = c.benchmark_group("tunnel");
    group.throughput(Throughput::Bytes(SIZE as u64));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.bench_function("connect_tunnel_bulk_64mb", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
                s.write_all(
                    format!("CONNECT {source} HTTP/1.1\r\nHost: {source}\r\n\r\n").as_bytes(),
                )
                .await
                .unwrap();
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0usize;
                let mut head_done = false;
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    if !head_done {
                        let pos = buf[..n]
                            .windows(4)
                            .position(|w| w == b"\r\n\r\n")
                            .expect("response head in first read");
                        total += n - (pos + 4);
                        head_done = true;
                    } else {
                        total += n;
                    }
                }
                assert_eq!(total, SIZE);
            })
        })
    });
    group.finish();
    kalmar.shutdown();
}

fn connect_tunnel_open_close(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let source = rt.block_on(support::bulk_source(1));
    let kalmar = support::kalmar(dir.path());
    let proxy = kalmar.proxy_addr;
    c.bench_function("connect_tunnel_open_close", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
                s.write_all(
                    format!("CONNECT {source} HTTP/1.1\r\nHost: {source}\r\n\r\n").as_bytes(),
                )
                .await
                .unwrap();
                let mut out = Vec::new();
                s.read_to_end(&mut out).await.unwrap();
                assert!(out.starts_with(b"HTTP/1.1 200"));
            })
        })
    });
    kalmar.shutdown();
}

/// What a GET on a kept-alive connection pays for being retriable: the copy of its head that
/// `connect::replay` keeps while it is sent (and drops when the answer comes).
fn replay_capture(c: &mut Criterion) {
    use kalmar::connect::body::UpstreamBody;
    use kalmar::connect::replay::Replay;
    let mut req = hyper::Request::get("/1k")
        .header("host", "127.0.0.1:18080")
        .header("user-agent", "wrk")
        .header("accept", "*/*")
        .header("via", "1.1 kalmar")
        .header("x-request-id", "5f770520-0000000440")
        .body(UpstreamBody::Empty)
        .unwrap();
    c.bench_function("replay_capture_get", |b| {
        b.iter(|| std::hint::black_box(Replay::capture(&mut req)))
    });
}

criterion_group!(
    benches,
    replay_capture,
    forward_http1_get_1kb,
    connect_tunnel_bulk_64mb,
    connect_tunnel_open_close
);
criterion_main!(benches);
