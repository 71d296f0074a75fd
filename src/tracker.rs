//! What is in flight (client connections, tunnels) and the two shutdown signals. Shared by
//! the server, which counts connections, and the tunnel relay, which ends at the hard stop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::{Notify, watch};

/// Counts what is in flight, and carries the two shutdown signals: `graceful` (stop
/// accepting, finish what is running) and `hard` (grace is over, end everything).
pub struct Tracker {
    connections: AtomicUsize,
    tunnels: AtomicUsize,
    changed: Notify,
    graceful: watch::Sender<bool>,
    hard: watch::Sender<bool>,
    pub ready: Arc<AtomicBool>,
}

pub struct ConnectionSlot {
    tracker: Arc<Tracker>,
}

pub struct TunnelSlot {
    tracker: Arc<Tracker>,
}

// === impl Tracker ===

impl Tracker {
    pub fn new() -> Arc<Tracker> {
        Arc::new(Tracker {
            connections: AtomicUsize::new(0),
            tunnels: AtomicUsize::new(0),
            changed: Notify::new(),
            graceful: watch::channel(false).0,
            hard: watch::channel(false).0,
            ready: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A connection slot, or None at `max` client connections. A tunnel is a client
    /// connection too (hyper has handed its socket over, so it counts separately).
    pub fn try_connection(self: &Arc<Self>, max: usize) -> Option<ConnectionSlot> {
        let mut current = self.connections.load(Ordering::Relaxed);
        loop {
            if current + self.tunnels.load(Ordering::Relaxed) >= max {
                return None;
            }
            match self.connections.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(ConnectionSlot {
                        tracker: self.clone(),
                    });
                }
                Err(now) => current = now,
            }
        }
    }

    pub fn tunnel_started(self: &Arc<Self>) -> TunnelSlot {
        self.tunnels.fetch_add(1, Ordering::AcqRel);
        TunnelSlot {
            tracker: self.clone(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.connections.load(Ordering::Acquire) + self.tunnels.load(Ordering::Acquire)
    }

    pub fn begin_shutdown(&self) {
        self.ready.store(false, Ordering::Release);
        self.graceful.send_replace(true);
    }

    pub fn stop_now(&self) {
        self.hard.send_replace(true);
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.graceful.borrow()
    }

    /// Resolves once graceful shutdown has begun.
    pub async fn shutting_down(&self) {
        let mut rx = self.graceful.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }

    /// Resolves once the grace period is over.
    pub async fn hard_stop(&self) {
        let mut rx = self.hard.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }

    /// Resolves when no connection or tunnel is left.
    pub async fn idle(&self) {
        loop {
            let notified = self.changed.notified();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.tracker.connections.fetch_sub(1, Ordering::AcqRel);
        self.tracker.changed.notify_waiters();
    }
}

impl Drop for TunnelSlot {
    fn drop(&mut self) {
        self.tracker.tunnels.fetch_sub(1, Ordering::AcqRel);
        self.tracker.changed.notify_waiters();
    }
}
