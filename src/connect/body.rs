//! The request body on its way to an origin or a parent: the client's body, streamed frame
//! by frame and counted as it passes. It is the body type of every pooled connection.
//!
//! While a request may still have to be sent a second time (see [`super::replay`]), the
//! frames that pass are also kept in a [`BodyCopy`]: `Bytes` handles, so nothing is copied.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use parking_lot::Mutex;

/// A request body on its way to an origin or parent.
pub enum UpstreamBody {
    Empty,
    /// The client's body, counted into `bytes_from_client`, and kept in `copy` when set.
    Client {
        inner: Incoming,
        counter: Arc<AtomicU64>,
        copy: Option<Arc<BodyCopy>>,
    },
    /// A client body recorded by a [`BodyCopy`], sent a second time (already counted).
    /// Boxed: the rare case should not grow every request that carries the type.
    Replayed(Box<Recorded>),
}

/// A recorded body: its data frames in order, and its trailers.
#[derive(Default)]
pub struct Recorded {
    data: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
}

/// The frames of a request body as they went upstream, up to a limit, for sending the body
/// again. Shared with the body, which hyper drops when the exchange fails.
pub struct BodyCopy {
    limit: u64,
    state: Mutex<CopyState>,
}

#[derive(Default)]
struct CopyState {
    recorded: Recorded,
    len: u64,
    ended: bool,
    /// Past the limit, or the client's body failed: there is nothing to send again.
    spoiled: bool,
}

// === impl UpstreamBody ===

impl UpstreamBody {
    pub fn from_client(inner: Incoming, counter: Arc<AtomicU64>) -> UpstreamBody {
        UpstreamBody::Client {
            inner,
            counter,
            copy: None,
        }
    }

    /// Keep the frames that pass from now on, up to `limit` bytes. `None` when there is
    /// nothing to keep: the body has no bytes left to send.
    pub fn record(&mut self, limit: u64) -> Option<Arc<BodyCopy>> {
        match self {
            UpstreamBody::Client { inner, copy, .. } if !inner.is_end_stream() => {
                let recorder = Arc::new(BodyCopy {
                    limit,
                    state: Mutex::default(),
                });
                *copy = Some(recorder.clone());
                Some(recorder)
            }
            _ => None,
        }
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
            UpstreamBody::Client {
                inner,
                counter,
                copy,
            } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &polled
                    && let Some(data) = frame.data_ref()
                {
                    counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                if let (Some(recorder), Poll::Ready(polled)) = (copy, &polled) {
                    recorder.keep(polled.as_ref(), inner.is_end_stream());
                }
                polled
            }
            UpstreamBody::Replayed(body) => Poll::Ready(match body.data.pop_front() {
                Some(bytes) => Some(Ok(Frame::data(bytes))),
                None => body.trailers.take().map(|t| Ok(Frame::trailers(t))),
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Client { inner, .. } => inner.is_end_stream(),
            UpstreamBody::Replayed(body) => body.data.is_empty() && body.trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Client { inner, .. } => inner.size_hint(),
            UpstreamBody::Replayed(body) => {
                SizeHint::with_exact(body.data.iter().map(|b| b.len() as u64).sum())
            }
        }
    }
}

// === impl BodyCopy ===

impl BodyCopy {
    /// Record one poll's outcome (`None`: the body ended); `ended` is the body's own word
    /// that no frame follows.
    fn keep(&self, polled: Option<&Result<Frame<Bytes>, hyper::Error>>, ended: bool) {
        let mut state = self.state.lock();
        if state.spoiled {
            return;
        }
        match polled {
            None => state.ended = true,
            Some(Err(_)) => state.spoiled = true,
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    state.len += data.len() as u64;
                    if state.len > self.limit {
                        *state = CopyState {
                            spoiled: true,
                            ..CopyState::default()
                        };
                        return;
                    }
                    state.recorded.data.push_back(data.clone());
                } else if let Some(trailers) = frame.trailers_ref() {
                    state.recorded.trailers = Some(trailers.clone());
                }
                state.ended |= ended;
            }
        }
    }

    /// The whole body again, when it was recorded to its end within the limit.
    pub fn replay(&self) -> Option<UpstreamBody> {
        let mut state = self.state.lock();
        if !state.ended || state.spoiled {
            return None;
        }
        let recorded = std::mem::take(&mut state.recorded);
        Some(UpstreamBody::Replayed(Box::new(recorded)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request moves its body through hyper a few times: the rare replayed body is
    /// boxed so that it does not make every one larger than the client's body itself.
    #[test]
    fn a_body_is_no_larger_than_the_clients_body_and_two_pointers() {
        let client = std::mem::size_of::<Incoming>() + std::mem::size_of::<Arc<AtomicU64>>();
        assert!(std::mem::size_of::<UpstreamBody>() <= client + 16);
    }
}
