//! Body types on both sides of the proxy. Bodies are streamed frame by frame (never
//! buffered whole) and counted as they pass; the client-side body also carries the
//! request's context, so that the access-log line is written when the body is done.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::cache::tee::Tee;
pub use crate::connect::body::UpstreamBody;
use crate::connect::pool::PooledSender;
use crate::error::ErrorKind;
use crate::proxy::ctx::RequestCtx;

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
        /// Stores the body as it streams (cacheable misses only).
        tee: Option<Box<Tee>>,
    },
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
                tee: None,
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

    /// Store the body in the cache while it streams (an upstream body; else a no-op).
    pub fn with_tee(mut self, tee: Box<Tee>) -> ClientBody {
        if let Kind::Upstream { tee: slot, .. } = &mut self.kind {
            *slot = Some(tee);
        }
        self
    }

    fn release_if_done(&mut self) {
        if let Kind::Upstream { inner, .. } = &self.kind
            && inner.is_end_stream()
        {
            self.ended();
        }
    }

    /// The upstream body ended cleanly: the connection goes back to the pool and the
    /// tee stores what it kept.
    fn ended(&mut self) {
        if let Kind::Upstream { conn, tee, .. } = &mut self.kind {
            if let Some(conn) = conn.take() {
                conn.release();
            }
            if let Some(tee) = tee.take() {
                tee.finish();
            }
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
                    if let Kind::Upstream {
                        tee: tee @ Some(_), ..
                    } = &mut this.kind
                        && tee.as_mut().is_some_and(|t| !t.push(data))
                    {
                        // Too large to store: keep streaming, stop keeping.
                        *tee = None;
                    }
                }
                this.release_if_done();
            }
            Poll::Ready(None) => {
                // A chunked body ends here (its `is_end_stream` never turns true); an empty
                // kind afterwards makes the end visible to `is_end_stream` and `Drop`.
                this.ended();
                if matches!(this.kind, Kind::Upstream { .. }) {
                    this.kind = Kind::Full(None);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Kind::Upstream { conn, tee, .. } = &mut this.kind {
                    conn.take();
                    tee.take();
                }
                if let Some(ctx) = &mut this.ctx {
                    ctx.note_error(ErrorKind::UpstreamAborted);
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
                ctx.note_error(ErrorKind::ClientAborted);
            }
            ctx.finish(self.bytes);
        }
    }
}
