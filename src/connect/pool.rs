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

/// Which idle connection an exchange may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Any live idle one: the request can be sent again should the peer close the
    /// connection just as the request goes out.
    Any,
    /// Only one idle for less than [`RECENT_IDLE`]: the request cannot be sent twice, so it
    /// does not take a connection that a server's keep-alive timeout may be closing.
    Recent,
    /// None: a fresh connection.
    Fresh,
}

/// How long a connection may have been idle and still carry a request that cannot be sent
/// twice. Servers close idle connections after their own keep-alive timeout (gunicorn 2 s,
/// Node and Apache 5 s); a connection used a moment ago is very unlikely to be closing.
pub const RECENT_IDLE: Duration = Duration::from_secs(1);

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

    /// An idle, ready connection for `key` that `reuse` allows, if there is one (the
    /// newest first: it is the least likely to be closed by the peer).
    pub fn checkout(self: &Arc<Self>, key: &PoolKey, reuse: Reuse) -> Option<PooledSender> {
        let max_idle = match reuse {
            Reuse::Any => self.idle_timeout,
            Reuse::Recent => self.idle_timeout.min(RECENT_IDLE),
            Reuse::Fresh => return None,
        };
        let mut idle = self.idle.lock();
        let list = idle.get_mut(key)?;
        while let Some(entry) = list.pop() {
            let idle_for = entry.since.elapsed();
            if idle_for >= max_idle {
                // The newest is too old, so are the rest: expired ones go, younger ones wait
                // for a request that may take them.
                if idle_for < self.idle_timeout {
                    list.push(entry);
                    return None;
                }
                list.clear();
                break;
            }
            if entry.sender.is_ready() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;

    /// A live sender over an in-memory pipe; the other end is returned so it stays open.
    async fn live_sender() -> (SendRequest<UpstreamBody>, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(1024);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(ours))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender.ready().await.unwrap();
        (sender, theirs)
    }

    fn peer() -> SocketAddr {
        "127.0.0.1:8080".parse().unwrap()
    }

    /// Put a connection that has been idle for `idle_for`.
    async fn idle_for(pool: &Arc<Pool>, idle_for: Duration) -> tokio::io::DuplexStream {
        let (sender, other_end) = live_sender().await;
        pool.put(PoolKey::Origin(peer()), peer(), sender);
        let mut idle = pool.idle.lock();
        let entry = idle
            .get_mut(&PoolKey::Origin(peer()))
            .unwrap()
            .last_mut()
            .unwrap();
        entry.since = Instant::now() - idle_for;
        other_end
    }

    #[tokio::test]
    async fn a_request_sent_once_takes_only_a_recently_used_connection() {
        let pool = Pool::new(4, Duration::from_secs(90));
        let key = PoolKey::Origin(peer());
        let _end = idle_for(&pool, Duration::from_secs(3)).await;
        assert!(pool.checkout(&key, Reuse::Recent).is_none());
        assert_eq!(pool.idle_count(), 1, "left for a request that may take it");
        assert!(pool.checkout(&key, Reuse::Fresh).is_none());
        let taken = pool.checkout(&key, Reuse::Any).expect("any live one");
        assert!(taken.reused);

        let _end = idle_for(&pool, Duration::from_millis(100)).await;
        assert!(pool.checkout(&key, Reuse::Recent).is_some());
    }

    #[tokio::test]
    async fn connections_past_the_idle_timeout_are_dropped() {
        let pool = Pool::new(4, Duration::from_secs(5));
        let key = PoolKey::Origin(peer());
        let _end = idle_for(&pool, Duration::from_secs(6)).await;
        assert!(pool.checkout(&key, Reuse::Recent).is_none());
        assert!(pool.checkout(&key, Reuse::Any).is_none());
        assert_eq!(pool.idle_count(), 0);
    }
}
