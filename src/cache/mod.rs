//! Stages 6 and 9: an RFC 9111 shared cache for plain-HTTP GET and HEAD responses — the
//! store (a byte-weighted memory tier and an optional disk tier), request collapsing, and
//! invalidation. The rules for one stored response are in [`policy`]; what the cache does
//! for one request, before and after its one exchange with the origin, is [`plan`]; the
//! pipeline stage that runs it is `proxy::cache_stage`.
//!
//! A URL maps to one *slot*: either the stored response, or, when the origin sent `Vary`, a
//! [`VarySpec`] naming the request headers that select a variant, each variant stored under
//! its own key:
//!
//! ```text
//! http://example.com/a                       -> Response(entry)
//! http://example.com/b                       -> Vary { generation: 7, names: [accept-language] }
//! http://example.com/b\0 7\0accept-language=de -> Response(entry for "de")
//! ```
//! Replacing or removing the URL slot (purge, invalidation) orphans its variants: a new
//! `VarySpec` gets a new generation, so an old variant is never reachable again and ages out.

pub mod disk;
pub mod key;
pub mod plan;
pub mod policy;
pub mod range;
pub mod tee;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use bytesize::ByteSize;
use http::{HeaderMap, HeaderName};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The `[cache]` config section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Consult and fill the cache (reloadable; the sizes and `dir` apply at start).
    pub enabled: bool,
    /// Bound of the memory tier (bodies + headers + keys).
    pub memory_size: ByteSize,
    /// Larger responses are passed through and not stored.
    pub max_object_size: ByteSize,
    /// Directory of the disk tier; empty = memory only.
    pub dir: String,
    /// Bound of the disk tier.
    pub disk_size: ByteSize,
    /// How long concurrent misses for one key wait for the first one's response.
    #[serde(with = "humantime_serde")]
    pub collapse_wait: Duration,
    /// Heuristic freshness: this fraction of the time since `Last-Modified`.
    pub heuristic_fraction: f32,
}

/// An invalid `[cache]` setting.
#[derive(Debug, thiserror::Error)]
pub enum CacheConfigError {
    #[error("{0}: must be at least 1 KiB")]
    MemorySize(ByteSize),
    #[error("{max}: must not exceed cache.memory_size ({memory}) nor 1 GiB")]
    MaxObjectSize { max: ByteSize, memory: ByteSize },
    #[error("{disk}: must be at least cache.max_object_size ({max})")]
    DiskSize { disk: ByteSize, max: ByteSize },
    #[error("{0}: must be between 0 and 1")]
    Heuristic(f32),
}

/// What the cache did for one request: the access-log `cache` field and the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served from a fresh stored response (including collapsed waiters).
    Hit,
    /// Fetched from the origin (stored or not).
    Miss,
    /// A stale stored response, validated by a 304 and served.
    Revalidated,
    /// A stale stored response served without validation: within `stale-while-revalidate`
    /// (revalidated in the background), or because the origin failed (`stale-if-error`,
    /// or no answer at all).
    Stale,
    /// Not a cacheable request or response (methods, Range, no-store, private, ...).
    Uncacheable,
}

/// One stored response: its policy (response head, timing, selecting request headers) and
/// the whole body.
pub struct Entry {
    pub policy: policy::Policy,
    pub body: Bytes,
    /// Memory-tier weight: body plus an estimate of the heads.
    weight: u32,
}

/// The request headers that select a variant of one URL, from the response's `Vary`.
#[derive(Debug, PartialEq, Eq)]
pub struct VarySpec {
    pub generation: u64,
    pub names: Vec<HeaderName>,
}

/// What a cache key holds.
#[derive(Clone)]
pub enum Slot {
    Response(Arc<Entry>),
    Vary(Arc<VarySpec>),
}

/// The result of a lookup: the key that holds (or would hold) the response for this
/// request, and the entry found there.
pub struct Lookup {
    /// The variant key when the URL varies, else None (the key is the URL).
    pub variant: Option<String>,
    /// The URL's `Vary` names, when it varies.
    pub vary: Option<Arc<VarySpec>>,
    pub entry: Option<Arc<Entry>>,
}

/// Where a response is stored: the URL, and the variant when the response has `Vary`.
pub struct StoreTarget {
    pub url: Arc<str>,
    pub vary: Option<(Arc<VarySpec>, String)>,
}

/// A miss's role in request collapsing.
pub enum Flight {
    /// First miss for the key: fetch, and wake the others when done (drop).
    Leader(FlightGuard),
    /// Another miss is fetching: wait for it.
    Follower(watch::Receiver<bool>),
}

/// Held by the leader of a collapsed miss until its response is stored or abandoned.
pub struct FlightGuard {
    cache: Arc<Cache>,
    key: Arc<str>,
    tx: watch::Sender<bool>,
}

/// The shared cache. Lives in `Proxy`, across reloads.
pub struct Cache {
    memory: moka::sync::Cache<Arc<str>, Slot>,
    disk: Option<disk::Disk>,
    flights: Mutex<HashMap<Arc<str>, watch::Receiver<bool>>>,
    /// Background revalidations in flight (one per key).
    revalidations: Mutex<std::collections::HashSet<Arc<str>>>,
    heuristic_fraction: f32,
    max_object_size: u64,
    collapse_wait: Duration,
    generation: AtomicU64,
}

/// Fixed per-entry overhead counted into the memory weight (key, Arc, policy struct).
const ENTRY_OVERHEAD: usize = 512;

// === impl CacheConfig ===

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            memory_size: ByteSize::mib(256),
            max_object_size: ByteSize::mib(8),
            dir: String::new(),
            disk_size: ByteSize::gib(1),
            collapse_wait: Duration::from_secs(10),
            heuristic_fraction: 0.1,
        }
    }
}

impl CacheConfig {
    pub fn validate(&self) -> Result<(), CacheConfigError> {
        if self.memory_size.as_u64() < 1024 {
            return Err(CacheConfigError::MemorySize(self.memory_size));
        }
        if self.max_object_size > self.memory_size || self.max_object_size > ByteSize::gib(1) {
            return Err(CacheConfigError::MaxObjectSize {
                max: self.max_object_size,
                memory: self.memory_size,
            });
        }
        if !self.dir.is_empty() && self.disk_size < self.max_object_size {
            return Err(CacheConfigError::DiskSize {
                disk: self.disk_size,
                max: self.max_object_size,
            });
        }
        if !(0.0..=1.0).contains(&self.heuristic_fraction) {
            return Err(CacheConfigError::Heuristic(self.heuristic_fraction));
        }
        Ok(())
    }
}

// === impl CacheConfigError ===

impl CacheConfigError {
    /// The config key at fault.
    pub fn key(&self) -> &'static str {
        match self {
            CacheConfigError::MemorySize(_) => "cache.memory_size",
            CacheConfigError::MaxObjectSize { .. } => "cache.max_object_size",
            CacheConfigError::DiskSize { .. } => "cache.disk_size",
            CacheConfigError::Heuristic(_) => "cache.heuristic_fraction",
        }
    }
}

// === impl Outcome ===

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Revalidated => "revalidated",
            Outcome::Stale => "stale",
            Outcome::Uncacheable => "uncacheable",
        }
    }
}

// === impl Entry ===

impl Entry {
    pub fn new(policy: policy::Policy, body: Bytes) -> Entry {
        let weight =
            (body.len() + policy.head_size() + ENTRY_OVERHEAD).min(u32::MAX as usize) as u32;
        Entry {
            policy,
            body,
            weight,
        }
    }

    /// The same body under a refreshed policy (after a 304 or a HEAD).
    pub fn refreshed(&self, policy: policy::Policy) -> Entry {
        Entry {
            policy,
            body: self.body.clone(),
            weight: self.weight,
        }
    }
}

// === impl Slot ===

impl Slot {
    fn weight(&self) -> u32 {
        match self {
            Slot::Response(entry) => entry.weight,
            Slot::Vary(spec) => (ENTRY_OVERHEAD + spec.names.len() * 32) as u32,
        }
    }
}

// === impl Cache ===

impl Cache {
    /// The store for `config`; opens (and indexes) the disk tier when `cache.dir` is set.
    pub fn new(config: &CacheConfig) -> Result<Arc<Cache>, disk::DiskError> {
        let memory = moka::sync::Cache::builder()
            .max_capacity(config.memory_size.as_u64())
            .weigher(|key: &Arc<str>, slot: &Slot| {
                slot.weight()
                    .saturating_add(key.len().min(u32::MAX as usize) as u32)
            })
            .build();
        let disk = if config.dir.is_empty() {
            None
        } else {
            Some(disk::Disk::open(
                std::path::Path::new(&config.dir),
                config.disk_size.as_u64(),
            )?)
        };
        // Vary generations must not repeat across restarts (the disk tier keeps old ones).
        let start = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Ok(Arc::new(Cache {
            memory,
            disk,
            flights: Mutex::new(HashMap::new()),
            revalidations: Mutex::new(Default::default()),
            heuristic_fraction: config.heuristic_fraction,
            max_object_size: config.max_object_size.as_u64(),
            collapse_wait: config.collapse_wait,
            generation: AtomicU64::new(start),
        }))
    }

    /// Heuristic freshness: this fraction of the time since `Last-Modified`.
    pub fn heuristic_fraction(&self) -> f32 {
        self.heuristic_fraction
    }

    pub fn max_object_size(&self) -> u64 {
        self.max_object_size
    }

    /// The slot at `key`: memory first, then the disk tier (promoted into memory).
    async fn slot(&self, key: &str) -> Option<Slot> {
        if let Some(slot) = self.memory.get(key) {
            return Some(slot);
        }
        let slot = self.disk.as_ref()?.load(key).await?;
        self.memory.insert(Arc::from(key), slot.clone());
        Some(slot)
    }

    /// Find the stored response for `url` as requested with `headers`.
    pub async fn lookup(&self, url: &str, headers: &HeaderMap) -> Lookup {
        match self.slot(url).await {
            None => Lookup {
                variant: None,
                vary: None,
                entry: None,
            },
            Some(Slot::Response(entry)) => Lookup {
                variant: None,
                vary: None,
                entry: Some(entry),
            },
            Some(Slot::Vary(spec)) => {
                let variant = key::variant_key(url, &spec, headers);
                let entry = match self.slot(&variant).await {
                    Some(Slot::Response(entry)) => Some(entry),
                    _ => None,
                };
                Lookup {
                    variant: Some(variant),
                    vary: Some(spec),
                    entry,
                }
            }
        }
    }

    /// Where a response for `url` with these `Vary` names and request headers goes.
    pub fn store_target(&self, url: &str, vary: &[HeaderName], headers: &HeaderMap) -> StoreTarget {
        let url: Arc<str> = Arc::from(url);
        if vary.is_empty() {
            return StoreTarget { url, vary: None };
        }
        let spec = match self.memory.get(&*url) {
            Some(Slot::Vary(spec)) if spec.names == vary => spec,
            _ => Arc::new(VarySpec {
                generation: self.generation.fetch_add(1, Ordering::Relaxed),
                names: vary.to_vec(),
            }),
        };
        let variant = key::variant_key(&url, &spec, headers);
        StoreTarget {
            url,
            vary: Some((spec, variant)),
        }
    }

    /// Store `entry` at `target` (memory, and disk when configured).
    pub fn insert(&self, target: &StoreTarget, entry: Arc<Entry>) {
        match &target.vary {
            None => self.put(target.url.clone(), Slot::Response(entry)),
            Some((spec, variant)) => {
                let current = matches!(self.memory.get(&*target.url), Some(Slot::Vary(s)) if Arc::ptr_eq(&s, spec));
                if !current {
                    self.put(target.url.clone(), Slot::Vary(spec.clone()));
                }
                self.put(Arc::from(variant.as_str()), Slot::Response(entry));
            }
        }
    }

    /// Replace the response stored at the key a lookup found (a refreshed policy after a 304).
    pub fn replace(&self, url: &str, lookup: &Lookup, entry: Arc<Entry>) {
        let key = lookup.variant.as_deref().unwrap_or(url);
        self.put(Arc::from(key), Slot::Response(entry));
    }

    fn put(&self, key: Arc<str>, slot: Slot) {
        if let Some(disk) = &self.disk {
            disk.store(&key, &slot);
        }
        self.memory.insert(key, slot);
    }

    /// Forget what is stored for `url` (its variants become unreachable). True if
    /// something was there.
    pub fn invalidate(&self, url: &str) -> bool {
        let in_memory = self.memory.remove(url).is_some();
        let on_disk = self.disk.as_ref().is_some_and(|d| d.remove(url));
        in_memory || on_disk
    }

    /// Admin purge: [`Cache::invalidate`], and free the variants held in memory now.
    /// Returns the number of memory slots removed (the disk slot counts as one when
    /// memory had none).
    pub fn purge(&self, url: &str) -> usize {
        let mut removed = usize::from(self.invalidate(url));
        let prefix = format!("{url}\0");
        let variants: Vec<Arc<Arc<str>>> = self
            .memory
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| Arc::clone(&k))
            .collect();
        for key in variants {
            if self.memory.remove(&**key).is_some() {
                removed += 1;
            }
            if let Some(disk) = &self.disk {
                disk.remove(&key);
            }
        }
        removed
    }

    /// Admin clear: both tiers.
    pub fn clear(&self) {
        self.memory.invalidate_all();
        if let Some(disk) = &self.disk {
            disk.clear();
        }
    }

    /// Wait until the disk tier has written everything queued so far (shutdown, tests).
    pub fn flush(&self) {
        self.memory.run_pending_tasks();
        if let Some(disk) = &self.disk {
            disk.flush();
        }
    }

    /// Memory-tier weight in bytes (after pending evictions).
    pub fn memory_bytes(&self) -> u64 {
        self.memory.run_pending_tasks();
        self.memory.weighted_size()
    }

    /// Join the in-flight miss for `key`, or become its leader.
    pub fn join_flight(self: &Arc<Self>, key: &str) -> Flight {
        let mut flights = self.flights.lock();
        if let Some(rx) = flights.get(key) {
            return Flight::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(false);
        let key: Arc<str> = Arc::from(key);
        flights.insert(key.clone(), rx);
        Flight::Leader(FlightGuard {
            cache: self.clone(),
            key,
            tx,
        })
    }

    /// Wait (at most `cache.collapse_wait`) for the leader to finish. True if it did.
    pub async fn wait(&self, mut rx: watch::Receiver<bool>) -> bool {
        matches!(
            tokio::time::timeout(self.collapse_wait, rx.wait_for(|done| *done)).await,
            Ok(Ok(_))
        )
    }
}

// === impl FlightGuard ===

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let mut flights = self.cache.flights.lock();
        if flights
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
        {
            flights.remove(&self.key);
        }
        drop(flights);
        self.tx.send_replace(true);
    }
}

/// A header map from name/value pairs, for the cache's unit tests.
#[cfg(test)]
pub(crate) fn test_headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (n, v) in pairs {
        h.append(
            http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}
