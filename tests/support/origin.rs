//! Origin servers for tests: a plain HTTP/1.1 server with a few useful routes, and a TLS
//! server with a certificate made at test time. Both count connections and requests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

#[derive(Default)]
pub struct Counters {
    pub connections: AtomicUsize,
    pub requests: AtomicUsize,
    pub bytes_received: AtomicU64,
}

pub struct Origin {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    /// A plain HTTP origin on 127.0.0.1:0.
    pub async fn start() -> Origin {
        Self::start_on("127.0.0.1:0").await
    }

    pub async fn start_on(bind: &str) -> Origin {
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .expect("bind origin");
        let addr = listener.local_addr().expect("addr");
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                c.connections.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| route(req, c.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Origin {
            addr,
            counters,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn connections(&self) -> usize {
        self.counters.connections.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.counters.requests.load(Ordering::SeqCst)
    }
}

fn full(body: impl Into<Bytes>) -> BoxBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Routes:
/// - `/hello`            → "hello"
/// - `/headers`          → the request line and headers as seen by the origin, one per line
/// - `/echo`             → the request body, streamed back (chunked)
/// - `/sink`             → reads the body, answers with its length
/// - `/bytes/N`          → N bytes of 'x', streamed in 64 KiB chunks with content-length
/// - `/chunked`          → three chunks, no content-length
/// - `/hop`              → a response carrying hop-by-hop headers and a forged X-Kalmar-Error
/// - `/slow/MS`          → answers after MS milliseconds
async fn route(
    req: Request<Incoming>,
    counters: Arc<Counters>,
) -> Result<Response<BoxBody>, Infallible> {
    counters.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    let response = match path.as_str() {
        "/hello" => Response::builder()
            .header("x-origin", "test")
            .body(full("hello")),
        "/headers" => {
            let mut text = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
            for (name, value) in req.headers() {
                text.push_str(&format!("{}: {}\n", name, value.to_str().unwrap_or("?")));
            }
            Response::builder().body(full(text))
        }
        "/echo" => {
            let body = req.into_body().map_err(std::io::Error::other).boxed();
            Response::builder().body(body)
        }
        "/sink" => {
            let mut body = req.into_body();
            let mut n: u64 = 0;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            n += d.len() as u64;
                        }
                    }
                    Err(_) => break,
                }
            }
            counters.bytes_received.fetch_add(n, Ordering::SeqCst);
            Response::builder().body(full(n.to_string()))
        }
        p if p.starts_with("/bytes/") => {
            let n: u64 = p["/bytes/".len()..].parse().unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures_stream(n, chunk);
            Response::builder()
                .header("content-length", n)
                .body(StreamBody::new(stream).boxed())
        }
        "/chunked" => {
            let frames = vec![
                Ok(Frame::data(Bytes::from("one,"))),
                Ok(Frame::data(Bytes::from("two,"))),
                Ok(Frame::data(Bytes::from("three"))),
            ];
            let stream = tokio_stream_iter(frames);
            Response::builder().body(StreamBody::new(stream).boxed())
        }
        "/hop" => Response::builder()
            .header("connection", "x-hop-secret")
            .header("x-hop-secret", "must-not-pass")
            .header("keep-alive", "timeout=5")
            .header("x-kalmar-error", "forged-by-origin")
            .header("x-end-to-end", "kept")
            .body(full("hop")),
        p if p.starts_with("/slow/") => {
            let ms: u64 = p["/slow/".len()..].parse().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::builder().body(full("slow"))
        }
        _ => Response::builder().status(404).body(full("not found")),
    };
    Ok(response.expect("valid response"))
}

/// A stream of `total` bytes in `chunk`-sized frames, generated lazily (constant memory).
fn futures_stream(
    total: u64,
    chunk: Bytes,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> {
    futures_util::stream::unfold(total, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let n = left.min(chunk.len() as u64) as usize;
            Some((Ok(Frame::data(chunk.slice(..n))), left - n as u64))
        }
    })
}

fn tokio_stream_iter(
    frames: Vec<Result<Frame<Bytes>, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> {
    futures_util::stream::iter(frames)
}

/// A TLS origin (certificate for `localhost` and 127.0.0.1 made at test time) that
/// answers every request with "tls-hello".
pub struct TlsOrigin {
    pub addr: SocketAddr,
    pub cert_pem: String,
    pub counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsOrigin {
    pub async fn start() -> TlsOrigin {
        TlsOrigin::start_for(&["localhost", "127.0.0.1"]).await
    }

    /// As [`TlsOrigin::start`], with a certificate for `names`.
    pub async fn start_for(names: &[&str]) -> TlsOrigin {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let cert = rcgen::generate_simple_self_signed(names).expect("cert");
        let cert_pem = cert.cert.pem();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .expect("tls config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind tls origin");
        let addr = listener.local_addr().expect("addr");
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                c.connections.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let c = c.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let svc = service_fn(move |req| route(req, c.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        TlsOrigin {
            addr,
            cert_pem,
            counters,
            task,
        }
    }
}
