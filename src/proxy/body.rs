//! Body types on both sides of the proxy. Bodies are streamed frame by frame (never
//! buffered whole) and counted as they pass; the client-side body also carries the
//! request's context, so that the access-log line is written when the body is done.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::connect::pool::PooledSender;
use crate::proxy::ctx::RequestCtx;

/// A request body on its way to an origin or parent.
pub enum UpstreamBody {
    Empty,
    /// The client's body, counted into `bytes_from_client`.
    Client {
        inner: Incoming,
        counter: Arc<AtomicU64>,
    },
}

/// A response body on its way to the client.
pub struct ClientBody {
    kind: Kind,
    bytes: u64,
    /// Present until the body is finished; consumed to write the access-log line.
    ctx: Option<Box<RequestCtx>>,
}

enum Kind {
    Full(Option<Bytes>),
    Upstream {
        inner: Incoming,
        conn: Option<PooledSender>,
    },
}

// === impl UpstreamBody ===

impl UpstreamBody {
    pub fn from_client(inner: Incoming, counter: Arc<AtomicU64>) -> UpstreamBody {
        UpstreamBody::Client { inner, counter }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Empty => Poll::Ready(None),
            UpstreamBody::Client { inner, counter } => {
                let polled = Pin::new(inner).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &polled
                    && let Some(data) = frame.data_ref()
                {
                    counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Client { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Client { inner, .. } => inner.size_hint(),
        }
    }
}

// === impl ClientBody ===

impl ClientBody {
    pub fn full(bytes: Bytes) -> ClientBody {
        ClientBody {
            kind: Kind::Full(Some(bytes)),
            bytes: 0,
            ctx: None,
        }
    }

    pub fn empty() -> ClientBody {
        ClientBody {
            kind: Kind::Full(None),
            bytes: 0,
            ctx: None,
        }
    }

    /// The origin's body; `conn` goes back to the pool once the body has been read whole.
    pub fn upstream(inner: Incoming, conn: PooledSender) -> ClientBody {
        ClientBody {
            kind: Kind::Upstream {
                inner,
                conn: Some(conn),
            },
            bytes: 0,
            ctx: None,
        }
    }

    /// Attach the request context: its access-log line is written when this body ends.
    pub fn with_ctx(mut self, ctx: Box<RequestCtx>) -> ClientBody {
        self.ctx = Some(ctx);
        self
    }

    fn release_if_done(&mut self) {
        if let Kind::Upstream { inner, conn } = &mut self.kind
            && inner.is_end_stream()
            && let Some(conn) = conn.take()
        {
            conn.release();
        }
    }
}

impl From<Bytes> for ClientBody {
    fn from(bytes: Bytes) -> Self {
        ClientBody::full(bytes)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream { inner, .. } => Pin::new(inner).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
                this.release_if_done();
            }
            Poll::Ready(None) => this.release_if_done(),
            Poll::Ready(Some(Err(_))) => {
                if let Kind::Upstream { conn, .. } = &mut this.kind {
                    conn.take();
                }
                if let Some(ctx) = &mut this.ctx {
                    ctx.note_error("upstream-aborted");
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        self.release_if_done();
        let complete = self.is_end_stream();
        if let Some(mut ctx) = self.ctx.take() {
            if !complete {
                ctx.note_error("client-aborted");
            }
            ctx.finish(self.bytes);
        }
    }
}
