//! Stage 9: store an origin body while it streams to the client. The client gets every
//! frame as it arrives; the tee keeps a reference to each (`Bytes` clones, no copy) and
//! inserts the entry only when the body ended cleanly. Past `cache.max_object_size` it
//! lets go of what it held and the body keeps streaming, unstored.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::policy::Policy;
use super::{Cache, Entry, FlightGuard, StoreTarget};

/// The storing half of a response body (boxed inside `ClientBody`, present only on
/// cacheable misses).
pub struct Tee {
    cache: Arc<Cache>,
    target: StoreTarget,
    policy: Policy,
    chunks: Vec<Bytes>,
    size: u64,
    /// Woken (by drop) once the entry is stored or abandoned.
    flight: Option<FlightGuard>,
}

// === impl Tee ===

impl Tee {
    pub fn new(
        cache: Arc<Cache>,
        target: StoreTarget,
        policy: Policy,
        flight: Option<FlightGuard>,
    ) -> Box<Tee> {
        Box::new(Tee {
            cache,
            target,
            policy,
            chunks: Vec::new(),
            size: 0,
            flight,
        })
    }

    /// Keep a reference to one data frame. False once the body is too large to store:
    /// the caller then drops the tee.
    pub fn push(&mut self, data: &Bytes) -> bool {
        self.size += data.len() as u64;
        if self.size > self.cache.max_object_size() {
            return false;
        }
        if !data.is_empty() {
            self.chunks.push(data.clone());
        }
        true
    }

    /// The body ended cleanly: store it, then wake collapsed waiters.
    pub fn finish(mut self: Box<Self>) {
        let body = match self.chunks.len() {
            0 => Bytes::new(),
            1 => self.chunks.pop().unwrap_or_default(),
            _ => {
                let mut all = BytesMut::with_capacity(self.size as usize);
                for chunk in &self.chunks {
                    all.extend_from_slice(chunk);
                }
                all.freeze()
            }
        };
        let Tee {
            cache,
            target,
            policy,
            flight,
            ..
        } = *self;
        cache.insert(&target, Arc::new(Entry::new(policy, body)));
        drop(flight);
    }
}
