//! Shared bench setup: an origin on loopback and Kalmar in-process, both on 127.0.0.1:0.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// An origin answering every request with `body`, keep-alive.
pub async fn origin(body: Bytes) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let body = body.clone();
                    async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(body))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A TCP server that answers each connection with `size` bytes, then closes.
pub async fn bulk_source(size: usize) -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let chunk = vec![0u8; 256 * 1024];
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let chunk = chunk.clone();
            tokio::spawn(async move {
                let mut left = size;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if stream.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n;
                }
            });
        }
    });
    addr
}

/// Kalmar with the ACL and access log on (log to a file in a temp dir), loopback opened.
/// These benches tunnel raw bytes, so the ClientHello check is off (`tls.ports = []`);
/// its cost is measured with real TLS by peerbench (`benches/peerbench/run.sh tls`).
pub fn kalmar(dir: &std::path::Path) -> kalmar::ServerHandle {
    let text = format!(
        "[server]\nworkers = 1\n[dns]\nnameservers = [\"127.0.0.1:1\"]\nuse_hosts_file = false\n\
         [destinations]\nallowed_cidrs = [\"127.0.0.0/8\"]\nconnect_ports = [\"1-65535\"]\n\
         [tls]\nports = []\n\
         [access_log]\npath = {:?}\n",
        dir.join("access.log").display().to_string()
    );
    let config = kalmar::config::Config::from_toml(&text).expect("bench config");
    let listeners = kalmar::Listeners {
        proxy: std::net::TcpListener::bind("127.0.0.1:0").expect("bind"),
        admin: std::net::TcpListener::bind("127.0.0.1:0").expect("bind"),
    };
    kalmar::start(config, kalmar::state::ConfigSource::default(), listeners).expect("start")
}
