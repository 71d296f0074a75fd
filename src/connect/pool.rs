//! Keep-alive pool of HTTP/1.1 client connections, keyed by the vetted address dialled.
//!
//! A sender is checked out for one exchange and put back when the response body has been
//! read to its end (`PooledSender::release`); a body abandoned half-way closes its
//! connection instead. Keying by the *checked* socket address (not the name) means a pooled
//! connection is only ever reused for an address that passed the destination guard.
//! Connections to a parent proxy are keyed by the parent (`scheme://host:port`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;
use parking_lot::Mutex;

use super::body::UpstreamBody;

/// Where a pooled connection goes: an origin address, or a parent proxy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PoolKey {
    Origin(SocketAddr),
    Parent(Arc<str>),
}

pub struct Pool {
    /// foldhash (randomly seeded per process) rather than SipHash: the map is looked up
    /// twice per request, and its keys are vetted addresses, at most one entry per origin.
    idle: Mutex<HashMap<PoolKey, Vec<Idle>, foldhash::fast::RandomState>>,
    max_idle_per_key: usize,
    idle_timeout: Duration,
}

struct Idle {
    sender: SendRequest<UpstreamBody>,
    peer: SocketAddr,
    since: Instant,
}

/// A checked-out connection; return it with [`PooledSender::release`].
pub struct PooledSender {
    pub sender: SendRequest<UpstreamBody>,
    pub key: PoolKey,
    /// The socket address this connection was dialled to (origin or parent).
    pub peer: SocketAddr,
    /// True when this connection came from the pool (it may have been closed by the
    /// peer meanwhile, so a request that was not sent may be retried on a new one).
    pub reused: bool,
    pool: Arc<Pool>,
}

// === impl Pool ===

impl Pool {
    pub fn new(max_idle_per_key: usize, idle_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            idle: Mutex::new(HashMap::default()),
            max_idle_per_key,
            idle_timeout,
        })
    }

    /// An idle, ready connection for `key`, if there is one.
    pub fn checkout(self: &Arc<Self>, key: &PoolKey) -> Option<PooledSender> {
        let mut idle = self.idle.lock();
        let list = idle.get_mut(key)?;
        while let Some(entry) = list.pop() {
            if entry.since.elapsed() < self.idle_timeout && entry.sender.is_ready() {
                return Some(PooledSender {
                    sender: entry.sender,
                    key: key.clone(),
                    peer: entry.peer,
                    reused: true,
                    pool: self.clone(),
                });
            }
        }
        idle.remove(key);
        None
    }

    /// Wrap a freshly made connection.
    pub fn fresh(
        self: &Arc<Self>,
        key: PoolKey,
        peer: SocketAddr,
        sender: SendRequest<UpstreamBody>,
    ) -> PooledSender {
        PooledSender {
            sender,
            key,
            peer,
            reused: false,
            pool: self.clone(),
        }
    }

    fn put(&self, key: PoolKey, peer: SocketAddr, sender: SendRequest<UpstreamBody>) {
        if self.max_idle_per_key == 0 {
            return;
        }
        let mut idle = self.idle.lock();
        let list = idle.entry(key).or_default();
        // Drop the oldest when full: it is the likeliest to be closed by the peer soon.
        if list.len() >= self.max_idle_per_key {
            list.remove(0);
        }
        list.push(Idle {
            sender,
            peer,
            since: Instant::now(),
        });
    }

    /// Forget idle connections past their time (called periodically).
    pub fn evict_expired(&self) {
        let mut idle = self.idle.lock();
        idle.retain(|_, list| {
            list.retain(|e| e.since.elapsed() < self.idle_timeout && !e.sender.is_closed());
            !list.is_empty()
        });
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().values().map(Vec::len).sum()
    }
}

// === impl PooledSender ===

impl PooledSender {
    /// The exchange finished cleanly: put the connection back once hyper is ready for the
    /// next request on it (it may need a moment to finish reading the previous message).
    pub fn release(mut self) {
        if self.sender.is_ready() {
            self.pool.put(self.key, self.peer, self.sender);
        } else if !self.sender.is_closed() {
            let pool = self.pool.clone();
            tokio::spawn(async move {
                let ready = tokio::time::timeout(Duration::from_secs(1), self.sender.ready()).await;
                if let Ok(Ok(())) = ready {
                    pool.put(self.key, self.peer, self.sender);
                }
            });
        }
    }
}
