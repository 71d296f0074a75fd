//! The request body on its way to an origin or a parent: the client's body, streamed frame
//! by frame and counted as it passes. It is the body type of every pooled connection.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// A request body on its way to an origin or parent.
pub enum UpstreamBody {
    Empty,
    /// The client's body, counted into `bytes_from_client`.
    Client {
        inner: Incoming,
        counter: Arc<AtomicU64>,
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
