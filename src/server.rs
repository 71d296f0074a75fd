//! Stage 0: listeners, worker threads, client connections, and graceful shutdown.
//!
//! Each worker thread runs its own single-threaded event loop and accepts from the shared
//! listening socket; a connection stays on the thread that accepted it, so the request
//! path takes no cross-thread hand-offs. The first request head on a connection is read
//! and checked here (size, syntax, slowloris deadline) so that even a request hyper could
//! not parse gets Kalmar's own error answer; after that hyper owns the connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::error::ProxyError;
use crate::net::{ClientIo, ConnState};
use crate::proxy::Proxy;
use crate::proxy::ctx::{ConnInfo, RequestCtx};
use crate::tracker::ConnectionSlot;

/// Headers accepted in one request head (beyond it: 431).
const MAX_HEADERS: usize = 128;

enum FirstHead {
    Complete(Bytes),
    Closed,
    Reject(ProxyError),
}

// === accept loop and connections ===

/// Accept on `listener` until graceful shutdown begins.
pub async fn accept_loop(proxy: Arc<Proxy>, listener: tokio::net::TcpListener) {
    let tracker = proxy.tracker.clone();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = tracker.shutting_down() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let max = proxy.state.load().config.server.max_connections;
                match tracker.try_connection(max) {
                    Some(slot) => {
                        tokio::spawn(serve_connection(proxy.clone(), stream, peer, slot));
                    }
                    None => reject_overloaded(&proxy, stream, peer, max),
                }
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Beyond `server.max_connections`: a fast 503 without reading the request.
fn reject_overloaded(proxy: &Arc<Proxy>, stream: TcpStream, peer: SocketAddr, max: usize) {
    proxy.metrics.connection_rejected();
    let err = ProxyError::Overloaded(max);
    let _ = stream.try_write(&err.to_raw_response());
    let _ = socket2::SockRef::from(&stream).shutdown(std::net::Shutdown::Write);
    log_rejected(proxy, peer, &err, Instant::now(), SystemTime::now());
}

async fn serve_connection(
    proxy: Arc<Proxy>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: ConnectionSlot,
) {
    let _slot = slot;
    let _metrics_guard = proxy.metrics.connection_opened();
    let config = proxy.state.load().config.clone();
    let _ = stream.set_nodelay(true);
    let header_limit = config.server.max_request_header_size.as_u64() as usize;

    let (started, time) = (Instant::now(), SystemTime::now());
    // A client that has not sent a complete request yet has nothing in flight: on shutdown
    // it is closed at once instead of holding the drain for the whole header timeout.
    let first_head = tokio::select! {
        head = read_first_head(&stream, header_limit, config.timeouts.request_header) => head,
        _ = proxy.tracker.shutting_down() => FirstHead::Closed,
    };
    let prefix = match first_head {
        FirstHead::Complete(prefix) => prefix,
        FirstHead::Closed => return,
        FirstHead::Reject(err) => {
            tracing::debug!(%peer, error = %err, "rejected first request");
            let _ = crate::net::write_all(&stream, &err.to_raw_response()).await;
            let _ = socket2::SockRef::from(&stream).shutdown(std::net::Shutdown::Write);
            log_rejected(&proxy, peer, &err, started, time);
            return;
        }
    };

    let state = ConnState::new(header_limit);
    let io = TokioIo::new(ClientIo::new(prefix, stream, state.clone()));
    let conn_info = ConnInfo {
        peer,
        state: state.clone(),
    };
    let service = {
        let proxy = proxy.clone();
        service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            // Where the forward step puts the origin's 1xx answers for this request.
            req.extensions_mut().insert(conn_info.state.interim.clone());
            let proxy = proxy.clone();
            let conn_info = conn_info.clone();
            async move { Ok::<_, std::convert::Infallible>(proxy.handle(req, &conn_info).await) }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // hyper's head timer starts when it begins waiting for the next request, so on a
        // kept-alive connection it bounds idle time plus head time.
        .header_read_timeout(config.timeouts.client_idle)
        // A client may send its request and then shut its side (`shutdown(SHUT_WR)`): that
        // EOF after a complete request is not an abort, and the answer still goes out.
        .half_close(true)
        .max_header_size(header_limit)
        .max_headers(MAX_HEADERS)
        .max_buf_size(header_limit.max(8192) * 2);
    let conn = builder.serve_connection(io, service).with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let tracker = proxy.tracker.clone();
    tokio::select! {
        result = conn.as_mut() => log_connection_end(peer, result),
        _ = tracker.shutting_down() => {
            // Finish the request in flight, then close instead of keeping alive.
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                result = conn.as_mut() => log_connection_end(peer, result),
                _ = tracker.hard_stop() => {}
            }
        }
    }
    if let Some(err) = state.take_rejected() {
        // A later request hyper could not parse, answered by Kalmar in hyper's place.
        log_rejected(&proxy, peer, &err, Instant::now(), SystemTime::now());
    }
}

fn log_connection_end(peer: SocketAddr, result: Result<(), hyper::Error>) {
    if let Err(e) = result {
        // Header timeouts, resets, and hyper's own 400/431 answers to later requests.
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// Read until the first request head is complete, rejecting it early when it is too large,
/// malformed, or too slow (slowloris).
async fn read_first_head(stream: &TcpStream, limit: usize, timeout: Duration) -> FirstHead {
    let mut buf = BytesMut::with_capacity(4096);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let readable = tokio::time::timeout_at(deadline, stream.readable()).await;
        match readable {
            Err(_) => {
                return if buf.is_empty() {
                    FirstHead::Closed
                } else {
                    FirstHead::Reject(ProxyError::HeaderTimeout(timeout))
                };
            }
            Ok(Err(_)) => return FirstHead::Closed,
            Ok(Ok(())) => {}
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(buf.capacity().min(limit + 1));
        }
        match stream.try_read_buf(&mut buf) {
            Ok(0) => return FirstHead::Closed,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return FirstHead::Closed,
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                if head_len > limit {
                    return too_large(head_len, limit);
                }
                if let Err(err) = ambiguous_length(request.headers) {
                    return FirstHead::Reject(err);
                }
                return FirstHead::Complete(buf.freeze());
            }
            Ok(httparse::Status::Partial) if buf.len() > limit => {
                return too_large(buf.len(), limit);
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return FirstHead::Reject(ProxyError::TooManyHeaders(MAX_HEADERS));
            }
            Err(e) => {
                return FirstHead::Reject(ProxyError::Malformed(format!(
                    "cannot parse request head: {e}"
                )));
            }
        }
    }
}

/// `Transfer-Encoding` together with `Content-Length` (RFC 9112 6.1): the length is
/// ambiguous, the classic request-smuggling shape. hyper would quietly drop the
/// `Content-Length` and read the body as chunked, so the first head is refused here. (On a
/// later request hyper does the same, which keeps the forwarded framing unambiguous: the
/// request goes upstream chunked, without the `Content-Length`.)
fn ambiguous_length(headers: &[httparse::Header<'_>]) -> Result<(), ProxyError> {
    let has = |name: &str| headers.iter().any(|h| h.name.eq_ignore_ascii_case(name));
    if has("transfer-encoding") && has("content-length") {
        return Err(ProxyError::Malformed(
            "both Transfer-Encoding and Content-Length: the message length is ambiguous".into(),
        ));
    }
    Ok(())
}

fn too_large(size: usize, limit: usize) -> FirstHead {
    FirstHead::Reject(ProxyError::HeadersTooLarge { size, limit })
}

/// Access-log line (and metrics) for a connection refused before a request could be parsed.
fn log_rejected(
    proxy: &Arc<Proxy>,
    peer: SocketAddr,
    err: &ProxyError,
    started: Instant,
    time: SystemTime,
) {
    let mut ctx = RequestCtx::rejected(peer, started, time, proxy.metrics.clone());
    ctx.record.status = err.status().as_u16();
    ctx.failed(err);
    let log = proxy.log.clone();
    tokio::spawn(async move { ctx.finish_async(&log, 0).await });
}
