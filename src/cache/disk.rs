//! The optional disk tier (`cache.dir`): one file per slot, written by one writer thread in
//! the order the cache asked (so a removal is never overtaken by an older write), bounded by
//! `cache.disk_size` with least-recently-used eviction, and re-indexed at start so that
//! entries survive restarts.
//!
//! File format (`<sha256(key)[..16] as hex>.kc`), all integers little-endian:
//! ```text
//! "KALMARC1" | meta_len: u32 | body_len: u64 | meta (JSON: key + policy or vary) | body | sha256 of all before
//! ```
//! A file whose length, checksum or key does not match is deleted and treated as a miss:
//! a corrupt or truncated entry is never served.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use bytes::Bytes;
use http::HeaderName;
use parking_lot::Mutex;
use ring::digest;
use serde::{Deserialize, Serialize};

use super::{Entry, Slot, VarySpec};

const MAGIC: &[u8; 8] = b"KALMARC1";
const SUFFIX: &str = "kc";
const DIGEST_LEN: usize = 32;
const HEADER_LEN: usize = 8 + 4 + 8;
/// Writes queued beyond this many bytes are dropped (the disk is behind; it is a cache).
const MAX_PENDING: u64 = 256 * 1024 * 1024;

/// The disk tier could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cache.dir = {path:?}: {source}")]
pub struct DiskError {
    path: PathBuf,
    source: std::io::Error,
}

/// Why a stored file was refused.
#[derive(Debug, thiserror::Error)]
enum Corrupt {
    #[error("shorter than its header")]
    Short,
    #[error("bad magic")]
    Magic,
    #[error("length {actual} does not match the recorded {expected}")]
    Length { expected: u64, actual: u64 },
    #[error("checksum mismatch")]
    Checksum,
    #[error("metadata: {0}")]
    Meta(#[from] serde_json::Error),
    #[error("holds key {0:?}, not the one asked for")]
    Key(String),
}

pub struct Disk {
    dir: PathBuf,
    index: Arc<Mutex<Index>>,
    ops: mpsc::Sender<Op>,
    pending: Arc<AtomicU64>,
}

enum Op {
    Write {
        name: String,
        meta: Vec<u8>,
        body: Bytes,
    },
    Remove(String),
    Clear,
    Flush(mpsc::Sender<()>),
}

#[derive(Serialize, Deserialize)]
struct Meta {
    key: String,
    slot: MetaSlot,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum MetaSlot {
    Response { policy: Box<super::policy::Policy> },
    Vary { generation: u64, names: Vec<String> },
}

/// Which files exist, their sizes and recency.
struct Index {
    files: HashMap<String, (u64, u64)>,
    lru: BTreeMap<u64, String>,
    total: u64,
    tick: u64,
    budget: u64,
}

// === impl Disk ===

impl Disk {
    /// Create `dir` if needed, index the files already there, start the writer thread.
    pub fn open(dir: &Path, budget: u64) -> Result<Disk, DiskError> {
        let err = |source| DiskError {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let mut found = Vec::new();
        for item in std::fs::read_dir(dir).map_err(err)? {
            let Ok(item) = item else { continue };
            let path = item.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.contains(".tmp") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(stem) = name.strip_suffix(&format!(".{SUFFIX}")) else {
                continue;
            };
            let Ok(meta) = item.metadata() else { continue };
            let modified = meta.modified().unwrap_or(std::time::SystemTime::UNIX_EPOCH);
            found.push((modified, stem.to_owned(), meta.len()));
        }
        found.sort();
        let mut index = Index {
            files: HashMap::with_capacity(found.len()),
            lru: BTreeMap::new(),
            total: 0,
            tick: 0,
            budget,
        };
        for (_, name, size) in found {
            index.add(name, size);
        }
        for evicted in index.evict() {
            let _ = std::fs::remove_file(path_of(dir, &evicted));
        }
        tracing::info!(dir = %dir.display(), files = index.files.len(), bytes = index.total, "cache disk tier opened");
        let index = Arc::new(Mutex::new(index));
        let pending = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel();
        {
            let dir = dir.to_owned();
            let index = index.clone();
            let pending = pending.clone();
            std::thread::Builder::new()
                .name("kalmar-cache-disk".into())
                .spawn(move || writer(dir, index, pending, rx))
                .map_err(err)?;
        }
        Ok(Disk {
            dir: dir.to_owned(),
            index,
            ops: tx,
            pending,
        })
    }

    fn send(&self, op: Op) {
        let _ = self.ops.send(op);
    }

    /// Queue `slot` for writing under `key`.
    pub fn store(&self, key: &str, slot: &Slot) {
        let (meta, body) = match slot {
            Slot::Response(entry) => (
                MetaSlot::Response {
                    policy: Box::new(entry.policy.clone()),
                },
                entry.body.clone(),
            ),
            Slot::Vary(spec) => (
                MetaSlot::Vary {
                    generation: spec.generation,
                    names: spec.names.iter().map(|n| n.as_str().to_owned()).collect(),
                },
                Bytes::new(),
            ),
        };
        let meta = match serde_json::to_vec(&Meta {
            key: key.to_owned(),
            slot: meta,
        }) {
            Ok(meta) => meta,
            Err(e) => {
                tracing::debug!(error = %e, "cache entry not written to disk");
                return;
            }
        };
        let size = (meta.len() + body.len() + HEADER_LEN + DIGEST_LEN) as u64;
        if size > self.index.lock().budget
            || self.pending.fetch_add(size, Ordering::Relaxed) > MAX_PENDING
        {
            self.pending.fetch_sub(size, Ordering::Relaxed);
            return;
        }
        self.send(Op::Write {
            name: name_of(key),
            meta,
            body,
        });
    }

    /// Remove the file for `key`; true if the index had one.
    pub fn remove(&self, key: &str) -> bool {
        let name = name_of(key);
        let known = self.index.lock().files.contains_key(&name);
        self.send(Op::Remove(name));
        known
    }

    pub fn clear(&self) {
        self.send(Op::Clear);
    }

    /// Wait until every operation queued so far is done.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        self.send(Op::Flush(tx));
        let _ = rx.recv_timeout(std::time::Duration::from_secs(30));
    }

    /// Read, verify and decode the slot stored for `key`, if any. A file that fails
    /// verification is removed.
    pub async fn load(&self, key: &str) -> Option<Slot> {
        let name = name_of(key);
        if !self.index.lock().touch(&name) {
            return None;
        }
        let path = path_of(&self.dir, &name);
        let owned = key.to_owned();
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let bytes = std::fs::read(&path)?;
            Ok(decode(Bytes::from(bytes), &owned))
        })
        .await;
        match read {
            Ok(Ok(Ok(slot))) => Some(slot),
            Ok(Ok(Err(corrupt))) => {
                tracing::warn!(key, file = %name, reason = %corrupt, "discarding a corrupt cache file");
                self.send(Op::Remove(name));
                None
            }
            Ok(Err(io)) => {
                tracing::debug!(key, error = %io, "cache file unreadable");
                self.send(Op::Remove(name));
                None
            }
            Err(_) => None,
        }
    }

    /// Path of the file that holds `key` (tests corrupt it).
    pub fn path_for(dir: &Path, key: &str) -> PathBuf {
        path_of(dir, &name_of(key))
    }
}

// === impl Index ===

impl Index {
    fn add(&mut self, name: String, size: u64) {
        self.remove(&name);
        self.tick += 1;
        self.lru.insert(self.tick, name.clone());
        self.files.insert(name, (size, self.tick));
        self.total += size;
    }

    fn remove(&mut self, name: &str) -> bool {
        match self.files.remove(name) {
            Some((size, tick)) => {
                self.lru.remove(&tick);
                self.total -= size;
                true
            }
            None => false,
        }
    }

    fn touch(&mut self, name: &str) -> bool {
        let Some((_, tick)) = self.files.get_mut(name) else {
            return false;
        };
        self.tick += 1;
        if let Some(name) = self.lru.remove(tick) {
            self.lru.insert(self.tick, name);
        }
        *tick = self.tick;
        true
    }

    /// Least recently used names to delete until the total fits the budget.
    fn evict(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while self.total > self.budget {
            let Some((_, name)) = self.lru.pop_first() else {
                break;
            };
            if let Some((size, _)) = self.files.remove(&name) {
                self.total -= size;
            }
            out.push(name);
        }
        out
    }
}

fn writer(dir: PathBuf, index: Arc<Mutex<Index>>, pending: Arc<AtomicU64>, rx: mpsc::Receiver<Op>) {
    let mut seq = 0u64;
    for op in rx {
        match op {
            Op::Write { name, meta, body } => {
                let size = (meta.len() + body.len() + HEADER_LEN + DIGEST_LEN) as u64;
                seq += 1;
                let tmp = dir.join(format!("{name}.tmp{seq}"));
                let target = path_of(&dir, &name);
                let written =
                    write_file(&tmp, &meta, &body).and_then(|()| std::fs::rename(&tmp, &target));
                pending.fetch_sub(size, Ordering::Relaxed);
                match written {
                    Ok(()) => {
                        let evicted = {
                            let mut index = index.lock();
                            index.add(name, size);
                            index.evict()
                        };
                        for name in evicted {
                            let _ = std::fs::remove_file(path_of(&dir, &name));
                        }
                    }
                    Err(e) => {
                        let _ = std::fs::remove_file(&tmp);
                        tracing::warn!(dir = %dir.display(), error = %e, "cache file not written");
                    }
                }
            }
            Op::Remove(name) => {
                index.lock().remove(&name);
                let _ = std::fs::remove_file(path_of(&dir, &name));
            }
            Op::Clear => {
                let names: Vec<String> = {
                    let mut index = index.lock();
                    index.lru.clear();
                    index.total = 0;
                    index.files.drain().map(|(name, _)| name).collect()
                };
                for name in names {
                    let _ = std::fs::remove_file(path_of(&dir, &name));
                }
            }
            Op::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

fn write_file(path: &Path, meta: &[u8], body: &[u8]) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(HEADER_LEN);
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    head.extend_from_slice(&(body.len() as u64).to_le_bytes());
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(&head);
    ctx.update(meta);
    ctx.update(body);
    let sum = ctx.finish();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    file.write_all(&head)?;
    file.write_all(meta)?;
    file.write_all(body)?;
    file.write_all(sum.as_ref())?;
    file.into_inner().map_err(|e| e.into_error())?.sync_data()
}

fn decode(bytes: Bytes, key: &str) -> Result<Slot, Corrupt> {
    if bytes.len() < HEADER_LEN + DIGEST_LEN {
        return Err(Corrupt::Short);
    }
    if &bytes[..8] != MAGIC {
        return Err(Corrupt::Magic);
    }
    let meta_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default()) as u64;
    let body_len = u64::from_le_bytes(bytes[12..20].try_into().unwrap_or_default());
    let expected = (HEADER_LEN + DIGEST_LEN) as u64 + meta_len + body_len;
    if expected != bytes.len() as u64 {
        return Err(Corrupt::Length {
            expected,
            actual: bytes.len() as u64,
        });
    }
    let content = bytes.len() - DIGEST_LEN;
    if digest::digest(&digest::SHA256, &bytes[..content]).as_ref() != &bytes[content..] {
        return Err(Corrupt::Checksum);
    }
    let meta_end = HEADER_LEN + meta_len as usize;
    let meta: Meta = serde_json::from_slice(&bytes[HEADER_LEN..meta_end])?;
    if meta.key != key {
        return Err(Corrupt::Key(meta.key));
    }
    Ok(match meta.slot {
        MetaSlot::Response { policy } => Slot::Response(Arc::new(Entry::new(
            *policy,
            bytes.slice(meta_end..content),
        ))),
        MetaSlot::Vary { generation, names } => Slot::Vary(Arc::new(VarySpec {
            generation,
            names: names
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect(),
        })),
    })
}

fn name_of(key: &str) -> String {
    let sum = digest::digest(&digest::SHA256, key.as_bytes());
    sum.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn path_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.{SUFFIX}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> super::super::policy::Policy {
        let mut res = http::HeaderMap::new();
        res.insert(
            "cache-control",
            http::HeaderValue::from_static("max-age=60"),
        );
        let now = std::time::SystemTime::now();
        super::super::policy::Policy::new(
            http::StatusCode::OK,
            &res,
            http::HeaderMap::new(),
            now,
            now,
        )
    }

    #[test]
    fn round_trip_and_every_corruption_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.kc");
        let meta = serde_json::to_vec(&Meta {
            key: "http://a/b".into(),
            slot: MetaSlot::Response {
                policy: Box::new(policy()),
            },
        })
        .unwrap();
        write_file(&file, &meta, b"hello body").unwrap();
        let good = std::fs::read(&file).unwrap();
        let Ok(Slot::Response(entry)) = decode(Bytes::from(good.clone()), "http://a/b") else {
            panic!("decodes")
        };
        assert_eq!(&entry.body[..], b"hello body");
        assert!(matches!(
            decode(Bytes::from(good.clone()), "http://a/c"),
            Err(Corrupt::Key(_))
        ));
        let mut flipped = good.clone();
        let n = flipped.len() - DIGEST_LEN - 3;
        flipped[n] ^= 1;
        assert!(matches!(
            decode(Bytes::from(flipped), "http://a/b"),
            Err(Corrupt::Checksum)
        ));
        let truncated = good[..good.len() - 5].to_vec();
        assert!(matches!(
            decode(Bytes::from(truncated), "http://a/b"),
            Err(Corrupt::Length { .. })
        ));
        assert!(matches!(
            decode(Bytes::from_static(b"short"), "http://a/b"),
            Err(Corrupt::Short)
        ));
    }

    #[test]
    fn index_evicts_least_recently_used() {
        let mut index = Index {
            files: HashMap::new(),
            lru: BTreeMap::new(),
            total: 0,
            tick: 0,
            budget: 100,
        };
        index.add("a".into(), 40);
        index.add("b".into(), 40);
        assert!(index.touch("a"));
        index.add("c".into(), 40);
        assert_eq!(index.evict(), ["b"]);
        assert_eq!(index.total, 80);
        index.add("a".into(), 10);
        assert_eq!(index.total, 50);
        assert!(!index.touch("b"));
    }
}
