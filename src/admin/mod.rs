//! Admin HTTP listener (`server.admin_listen`): metrics, liveness, readiness and reload, plus
//! routes other modules add (the cache's purge and clear).
//!
//! | route      | method    | answer                                                        |
//! |------------|-----------|---------------------------------------------------------------|
//! | `/metrics` | GET, HEAD | 200, Prometheus text format 0.0.4                             |
//! | `/healthz` | GET, HEAD | 200 `ok` while the process runs                               |
//! | `/readyz`  | GET, HEAD | 200 `ready` when [`AdminState::ready`] is set and [`AdminState::gate`] holds, else 503 |
//! | `/reload`  | POST      | 200 `applied: ...` or 500 `not applied: ...`                  |
//! | other      | any       | [`ExtraRoutes`] if it claims the request, else 404            |
//!
//! A known path with the wrong method is 405 with `Allow`.

pub mod cache;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::metrics::Metrics;

/// Route paths, one place.
pub mod paths {
    /// Prometheus scrape endpoint.
    pub const METRICS: &str = "/metrics";
    /// Liveness: the process runs.
    pub const HEALTHZ: &str = "/healthz";
    /// Readiness: listener bound, config loaded, not shutting down.
    pub const READYZ: &str = "/readyz";
    /// Reload the configuration, as SIGHUP does.
    pub const RELOAD: &str = "/reload";
}

/// How long an admin client may take to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// After the shutdown future completes, open admin connections get this long to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// `Content-Type` of the plain-text answers.
const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

/// An admin response (small, fully buffered bodies).
pub type AdminResponse = Response<Full<Bytes>>;

/// A boxed future, as the admin callbacks return them.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Runs the same reload as SIGHUP; `Ok(summary)` when the new config is in force,
/// `Err(message)` (naming the key) when the old one stays. It also records
/// `Metrics::config_reload`: the admin listener does not count reloads itself.
pub type ReloadFn = Arc<dyn Fn() -> BoxFuture<Result<String, String>> + Send + Sync>;

/// Extra routes, consulted for paths the admin listener does not own: return `Some` to answer
/// (including 405 for a wrong method), `None` to let it answer 404. The request head is
/// complete (method, path, query); admin bodies are not read.
///
/// ```ignore
/// let cache_routes: ExtraRoutes = Arc::new(move |req: &http::request::Parts| {
///     match (req.method.clone(), req.uri.path()) {
///         (Method::POST, "/cache/purge") => Some(Box::pin(purge(cache.clone(), req.uri.clone()))),
///         _ => None,
///     }
/// });
/// ```
pub type ExtraRoutes =
    Arc<dyn Fn(&http::request::Parts) -> Option<BoxFuture<AdminResponse>> + Send + Sync>;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// Set once the proxy listener is bound and the config loaded; cleared when shutdown begins.
    pub ready: Arc<AtomicBool>,
    pub reload: ReloadFn,
    /// A further readiness condition: `Some(why)` while it does not hold (the Kubernetes index
    /// before its first full list).
    pub gate: Option<ReadyGate>,
}

/// See [`AdminState::gate`].
pub type ReadyGate = Arc<dyn Fn() -> Option<&'static str> + Send + Sync>;

/// The routes the admin listener owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Metrics,
    Healthz,
    Readyz,
    Reload,
}

// === impl AdminState ===

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("ready", &self.ready.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

// === impl Route ===

impl Route {
    fn of(path: &str) -> Option<Route> {
        match path {
            paths::METRICS => Some(Route::Metrics),
            paths::HEALTHZ => Some(Route::Healthz),
            paths::READYZ => Some(Route::Readyz),
            paths::RELOAD => Some(Route::Reload),
            _ => None,
        }
    }

    /// Methods the route answers, as the `Allow` header lists them.
    fn allow(self) -> &'static str {
        match self {
            Route::Metrics | Route::Healthz | Route::Readyz => "GET, HEAD",
            Route::Reload => "POST",
        }
    }

    fn accepts(self, method: &Method) -> bool {
        match self {
            Route::Metrics | Route::Healthz | Route::Readyz => {
                *method == Method::GET || *method == Method::HEAD
            }
            Route::Reload => *method == Method::POST,
        }
    }
}

/// Serve the admin endpoints on `listener` until `shutdown` completes. Pass a future that
/// completes when the proxy has finished draining, not when draining starts, so that `/readyz`
/// keeps answering 503 (and `/metrics` keeps answering) during the drain.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_with_routes(listener, state, None, shutdown).await
}

/// [`serve`], with extra routes for paths the admin listener does not own.
pub async fn serve_with_routes(
    listener: TcpListener,
    state: AdminState,
    extra: Option<ExtraRoutes>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    connections.spawn(serve_connection(
                        stream,
                        state.clone(),
                        extra.clone(),
                        stop_rx.clone(),
                    ));
                }
                Err(error) => {
                    tracing::warn!(%error, "admin listener: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::debug!("admin listener: closing connections still open after the grace period");
        connections.shutdown().await;
    }
    Ok(())
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    state: AdminState,
    extra: Option<ExtraRoutes>,
    mut stop: watch::Receiver<bool>,
) {
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        let state = state.clone();
        let extra = extra.clone();
        async move { Ok::<_, Infallible>(handle(&state, extra.as_ref(), req).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let stopping = async move {
        // An error means the server is gone: stop as well.
        let _ = stop.wait_for(|stop| *stop).await;
    };
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = stopping => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "admin connection ended with an error");
    }
}

/// Answer one admin request (the router; exposed so the core can test or embed it).
pub async fn handle<B>(
    state: &AdminState,
    extra: Option<&ExtraRoutes>,
    req: Request<B>,
) -> AdminResponse {
    let (parts, _body) = req.into_parts();
    let Some(route) = Route::of(parts.uri.path()) else {
        if let Some(answer) = extra.and_then(|routes| routes(&parts)) {
            return answer.await;
        }
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    if !route.accepts(&parts.method) {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(route.allow()));
        return resp;
    }
    match route {
        Route::Metrics => {
            let mut resp = Response::new(Full::new(Bytes::from(state.metrics.encode())));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(prometheus::TEXT_FORMAT),
            );
            resp.headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Route::Healthz => text(StatusCode::OK, "ok\n"),
        Route::Readyz => {
            let why = state.gate.as_ref().and_then(|g| g());
            match (state.ready.load(Ordering::Acquire), why) {
                (true, None) => text(StatusCode::OK, "ready\n"),
                (true, Some(why)) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
                (false, _) => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            }
        }
        Route::Reload => match (state.reload)().await {
            Ok(summary) => text(StatusCode::OK, format!("applied: {}\n", one_line(&summary))),
            Err(error) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("not applied: {}\n", one_line(&error)),
            ),
        },
    }
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> AdminResponse {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_PLAIN));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Trim a message to a single line for the answer body.
fn one_line(message: &str) -> &str {
    message.trim_end_matches(['\n', '\r'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Running {
        addr: std::net::SocketAddr,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        server: tokio::task::JoinHandle<io::Result<()>>,
        ready: Arc<AtomicBool>,
        metrics: Arc<Metrics>,
        reloads: Arc<AtomicUsize>,
    }

    async fn start(extra: Option<ExtraRoutes>) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = Arc::new(Metrics::new());
        let ready = Arc::new(AtomicBool::new(false));
        let reloads = Arc::new(AtomicUsize::new(0));
        let counter = reloads.clone();
        let m = metrics.clone();
        let reload: ReloadFn = Arc::new(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let m = m.clone();
            Box::pin(async move {
                let ok = n.is_multiple_of(2);
                m.config_reload(ok);
                if ok {
                    Ok("3 sources, 7 rules".to_owned())
                } else {
                    Err("rules[2].action = \"alow\": unknown variant\n".to_owned())
                }
            })
        });
        let state = AdminState {
            metrics: metrics.clone(),
            ready: ready.clone(),
            reload,
            gate: None,
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_with_routes(listener, state, extra, async move {
            let _ = rx.await;
        }));
        Running {
            addr,
            stop: Some(tx),
            server,
            ready,
            metrics,
            reloads,
        }
    }

    /// One request over a raw TCP connection: (status, headers, body).
    async fn request(
        addr: std::net::SocketAddr,
        method: &str,
        path: &str,
    ) -> (u16, String, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read");
        let raw = String::from_utf8(raw).expect("utf8");
        let (head, body) = raw.split_once("\r\n\r\n").expect("head");
        let status = head[9..12].parse().expect("status");
        (status, head.to_ascii_lowercase(), body.to_owned())
    }

    #[tokio::test]
    async fn endpoints_answer() {
        let mut admin = start(None).await;
        let (status, _, body) = request(admin.addr, "GET", "/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));

        let (status, _, _) = request(admin.addr, "GET", "/readyz").await;
        assert_eq!(status, 503);
        admin.ready.store(true, Ordering::SeqCst);
        let (status, _, body) = request(admin.addr, "GET", "/readyz").await;
        assert_eq!((status, body.as_str()), (200, "ready\n"));

        admin.metrics.rate_limited();
        admin.metrics.rate_limited();
        let (status, head, body) = request(admin.addr, "GET", "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            head.contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
            .expect("parses");
        let limited = scrape
            .samples
            .iter()
            .find(|s| s.metric == crate::metrics::names::RATE_LIMITED)
            .expect("present");
        assert!(matches!(limited.value, prometheus_parse::Value::Counter(v) if v == 2.0));

        let (status, head, body) = request(admin.addr, "HEAD", "/metrics").await;
        assert_eq!(status, 200);
        assert!(head.contains("content-length:"));
        assert!(body.is_empty());

        let (status, _, body) = request(admin.addr, "POST", "/reload").await;
        assert_eq!(
            (status, body.as_str()),
            (200, "applied: 3 sources, 7 rules\n")
        );
        let (status, _, body) = request(admin.addr, "POST", "/reload").await;
        assert_eq!(status, 500);
        assert_eq!(
            body,
            "not applied: rules[2].action = \"alow\": unknown variant\n"
        );
        assert_eq!(admin.reloads.load(Ordering::SeqCst), 2);

        let (status, _, _) = request(admin.addr, "GET", "/nope").await;
        assert_eq!(status, 404);
        let (status, head, _) = request(admin.addr, "GET", "/reload").await;
        assert_eq!(status, 405);
        assert!(head.contains("allow: post"), "{head}");
        let (status, head, _) = request(admin.addr, "DELETE", "/metrics").await;
        assert_eq!(status, 405);
        assert!(head.contains("allow: get, head"), "{head}");
        // the reloads went through the state's function and were counted once each
        let text = admin.metrics.encode();
        assert!(
            text.contains("kalmar_config_reloads_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("kalmar_config_reloads_total{result=\"error\"} 1"));

        let _ = admin.stop.take().map(|tx| tx.send(()));
        admin.server.await.expect("join").expect("serve");
        assert!(tokio::net::TcpStream::connect(admin.addr).await.is_err());
    }

    #[tokio::test]
    async fn extra_routes_are_consulted_for_unknown_paths() {
        let extra: ExtraRoutes =
            Arc::new(
                |req: &http::request::Parts| match (req.method.clone(), req.uri.path()) {
                    (Method::POST, "/cache/purge") => {
                        let query = req.uri.query().unwrap_or_default().to_owned();
                        Some(Box::pin(
                            async move { text(StatusCode::OK, format!("purged {query}\n")) },
                        ) as BoxFuture<AdminResponse>)
                    }
                    (_, "/cache/purge") => {
                        Some(Box::pin(async { text(StatusCode::METHOD_NOT_ALLOWED, "") })
                            as BoxFuture<AdminResponse>)
                    }
                    _ => None,
                },
            );
        let mut admin = start(Some(extra)).await;
        let (status, _, body) = request(admin.addr, "POST", "/cache/purge?url=http://a/").await;
        assert_eq!((status, body.as_str()), (200, "purged url=http://a/\n"));
        let (status, _, _) = request(admin.addr, "GET", "/cache/purge").await;
        assert_eq!(status, 405);
        let (status, _, _) = request(admin.addr, "POST", "/cache/clear").await;
        assert_eq!(status, 404);
        // owned routes win over extra ones
        let (status, _, _) = request(admin.addr, "GET", "/healthz").await;
        assert_eq!(status, 200);
        let _ = admin.stop.take().map(|tx| tx.send(()));
        admin.server.await.expect("join").expect("serve");
    }

    #[tokio::test]
    async fn keep_alive_connection_is_closed_gracefully_at_shutdown() {
        let mut admin = start(None).await;
        let mut s = tokio::net::TcpStream::connect(admin.addr)
            .await
            .expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("write");
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).await.expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        // the idle keep-alive connection must not hold shutdown up
        let _ = admin.stop.take().map(|tx| tx.send(()));
        tokio::time::timeout(Duration::from_secs(2), &mut admin.server)
            .await
            .expect("shutdown is prompt")
            .expect("join")
            .expect("serve");
        let n = s.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0, "connection closed");
    }

    #[tokio::test]
    async fn garbage_does_not_hurt_the_listener() {
        let mut admin = start(None).await;
        let mut s = tokio::net::TcpStream::connect(admin.addr)
            .await
            .expect("connect");
        s.write_all(b"\x00\xff garbage \r\n\r\n")
            .await
            .expect("write");
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw).await;
        let (status, _, _) = request(admin.addr, "GET", "/healthz").await;
        assert_eq!(status, 200);
        let _ = admin.stop.take().map(|tx| tx.send(()));
        admin.server.await.expect("join").expect("serve");
    }
}
