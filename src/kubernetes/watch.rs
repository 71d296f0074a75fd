//! The watcher task of one configuration: builds the client, runs the watches, folds their events
//! and publishes the index.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::stream::{self, BoxStream, StreamExt};
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

use super::direct::DirectLookup;
use super::fold::{Fold, Object, Scope};
use super::objects::{NamespaceObject, NodeObject, PodObject};
use super::{Credentials, Inner, PUBLISH_INTERVAL, Settings};

/// Retry delays after a failed list or watch: doubling from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

type Item = (usize, Result<Event<Object>, watcher::Error>);

/// Per-watch health, for the sync-age gauge and for logging a failure once, not per retry.
#[derive(Debug, Clone, Copy)]
struct Health {
    ok: bool,
    last_ok: Instant,
}

/// Doubling back-off, reset by the watcher stream on every good event.
#[derive(Debug, Clone)]
struct Backoff {
    next: Duration,
}

// === impl Backoff ===

impl Backoff {
    fn new() -> Self {
        Self {
            next: BACKOFF_FIRST,
        }
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        Some(now)
    }
}

impl kube::runtime::utils::Backoff for Backoff {
    fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }
}

/// A client for these credentials, with Kalmar's crypto provider (ring).
pub(super) async fn client(settings: &Settings) -> Result<kube::Client, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match &settings.credentials {
        Credentials::Kubeconfig(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?
        }
        Credentials::InCluster => {
            kube::Config::incluster().map_err(|e| format!("in-cluster config: {e}"))?
        }
    };
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

/// Runs until aborted (a reload with another section, or shutdown).
pub(super) async fn run(inner: Arc<Inner>, settings: Arc<Settings>) {
    let client = {
        let mut backoff = Backoff::new();
        loop {
            match client(&settings).await {
                Ok(c) => break c,
                Err(error) => {
                    tracing::warn!(%error, "cannot build the kubernetes client; retrying");
                    tokio::time::sleep(backoff.next().unwrap_or(BACKOFF_MAX)).await;
                }
            }
        }
    };
    inner.direct.store(Some(Arc::new(DirectLookup::new(
        client.clone(),
        settings.namespaces.clone(),
        inner.metrics.clone(),
    ))));

    let mut scopes = Vec::new();
    let mut streams: Vec<BoxStream<'static, Item>> = Vec::new();
    if settings.namespaces.is_empty() {
        scopes.push(Scope::Pods(None));
        streams.push(watch(0, Api::<PodObject>::all(client.clone()), Object::Pod));
    } else {
        for ns in &settings.namespaces {
            let id = scopes.len();
            scopes.push(Scope::Pods(Some(ns.clone())));
            streams.push(watch(
                id,
                Api::<PodObject>::namespaced(client.clone(), ns),
                Object::Pod,
            ));
        }
    }
    let id = scopes.len();
    scopes.push(Scope::Namespaces);
    streams.push(watch(
        id,
        Api::<NamespaceObject>::all(client.clone()),
        Object::Namespace,
    ));
    let id = scopes.len();
    scopes.push(Scope::Nodes);
    streams.push(watch(id, Api::<NodeObject>::all(client), Object::Node));

    let kinds: Vec<&'static str> = scopes
        .iter()
        .map(|s| match s {
            Scope::Pods(_) => "pod",
            Scope::Namespaces => "namespace",
            Scope::Nodes => "node",
        })
        .collect();
    let started = Instant::now();
    let mut health = vec![
        Health {
            ok: false,
            last_ok: started,
        };
        scopes.len()
    ];
    let mut fold = Fold::new(scopes);
    let mut merged = stream::select_all(streams);
    let mut dirty = false;
    let mut published_once = false;
    let mut conflicts_reported = 0;
    let mut publish_tick = tokio::time::interval(PUBLISH_INTERVAL);
    publish_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut age_tick = tokio::time::interval(Duration::from_secs(1));

    loop {
        tokio::select! {
            item = merged.next() => {
                let Some((w, result)) = item else { break };
                let kind = kinds.get(w).copied().unwrap_or("pod");
                match result {
                    Ok(event) => {
                        if let Some(h) = health.get_mut(w) {
                            if !h.ok && published_once {
                                tracing::info!(kind, "kubernetes watch is back");
                            }
                            *h = Health { ok: true, last_ok: Instant::now() };
                        }
                        dirty |= fold.apply(w, event);
                        if !published_once && fold.synced() {
                            publish(&inner, &mut fold, &mut conflicts_reported);
                            dirty = false;
                            published_once = true;
                            inner.synced.store(true, Ordering::Release);
                            tracing::info!(
                                seconds = started.elapsed().as_secs_f64(),
                                addresses = inner.index.load().len(),
                                "kubernetes index synced"
                            );
                        }
                    }
                    Err(error) => {
                        inner.metrics.restart(kind);
                        if let Some(h) = health.get_mut(w)
                            && (h.ok || h.last_ok == started)
                        {
                            tracing::warn!(
                                kind, %error,
                                "kubernetes watch failed; serving the last-known index and retrying"
                            );
                            h.ok = false;
                        }
                    }
                }
            }
            _ = publish_tick.tick(), if dirty && published_once => {
                publish(&inner, &mut fold, &mut conflicts_reported);
                dirty = false;
            }
            _ = age_tick.tick() => {
                // A healthy watch is in sync now (bookmarks keep it alive without events).
                let now = Instant::now();
                for h in health.iter_mut().filter(|h| h.ok) {
                    h.last_ok = now;
                }
                let stale = health.iter().filter(|h| !h.ok).map(|h| h.last_ok).min();
                inner.metrics.sync_age(stale.map_or(0, |t| t.elapsed().as_secs()));
            }
        }
    }
}

/// One kind's watcher, with back-off, tagged with its watch index.
fn watch<K>(id: usize, api: Api<K>, wrap: fn(K) -> Object) -> BoxStream<'static, Item>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    watcher::watcher(api, watcher::Config::default())
        .backoff(Backoff::new())
        .map(move |r| (id, r.map(|e| e.modify_into(wrap))))
        .boxed()
}

/// Metrics first, then the index: whoever sees the new index sees its counts.
fn publish(inner: &Inner, fold: &mut Fold, conflicts_reported: &mut u64) {
    let index = fold.index();
    inner.metrics.counts(&fold.counts());
    let seen = fold.conflicts_seen();
    inner.metrics.conflicts(seen - *conflicts_reported);
    *conflicts_reported = seen;
    inner.index.store(Arc::new(index));
}

/// `Event<K>` → `Event<Object>`.
trait ModifyInto<K> {
    fn modify_into(self, f: fn(K) -> Object) -> Event<Object>;
}

impl<K> ModifyInto<K> for Event<K> {
    fn modify_into(self, f: fn(K) -> Object) -> Event<Object> {
        match self {
            Event::Apply(k) => Event::Apply(f(k)),
            Event::Delete(k) => Event::Delete(f(k)),
            Event::Init => Event::Init,
            Event::InitApply(k) => Event::InitApply(f(k)),
            Event::InitDone => Event::InitDone,
        }
    }
}
