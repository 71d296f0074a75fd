//! What the cache does for one GET or HEAD: a [`Plan`] decided from the stored response
//! before anything is sent (stage 6), at most one exchange with the origin, then one
//! after-response step (stage 9): store the answer, update the stored response with a 304
//! or a HEAD answer, or fall back on the stored response when the origin failed.
//!
//! | plan | the one exchange | after it |
//! |---|---|---|
//! | `Hit` | none (within `stale-while-revalidate`: one in the background) | – |
//! | `Revalidate` | the request with the stored response's validators | 304: update the stored response and serve it (200, or 304 when the client's own conditional matches); 5xx or no answer: the stale copy if allowed; else the new response, stored |
//! | `Miss` | the client's request as sent | GET: store the answer; HEAD: update or invalidate the stored GET; no answer: the stale copy if allowed |
//! | `NotCached` | none (`only-if-cached`: 504) | – |

use std::sync::Arc;
use std::time::SystemTime;

use http::header::HeaderMap;
use http::{HeaderName, Method, StatusCode};

use super::key::{Forward, request_directive, stored_request_headers};
use super::policy::{self, Policy, Reuse, ValidateWhy};
use super::{Cache, Entry, Lookup};

/// The cache's decision for one GET or HEAD, before the exchange.
pub enum Plan {
    /// Serve the stored response; `background`: it is stale within
    /// `stale-while-revalidate`, so validate it in the background.
    Hit { entry: Arc<Entry>, background: bool },
    /// Ask the origin with the stored response's validators.
    Revalidate { entry: Arc<Entry>, fwd: Forward },
    /// Forward the request as the client sent it; `stale` is a stored response that may
    /// still answer if the origin cannot be reached.
    Miss {
        fwd: Forward,
        stale: Option<Arc<Entry>>,
    },
    /// `only-if-cached` and nothing usable stored.
    NotCached,
}

// === impl Plan ===

impl Plan {
    /// The plan for a request with `request` headers (its own conditionals taken out) given
    /// what `lookup` found.
    pub fn decide(
        lookup: &Lookup,
        head: bool,
        request: &HeaderMap,
        now: SystemTime,
        heuristic_fraction: f32,
    ) -> Plan {
        let only_if_cached = request_directive(request, "only-if-cached");
        let Some(entry) = &lookup.entry else {
            if only_if_cached {
                return Plan::NotCached;
            }
            let fwd = if lookup.vary.is_some() {
                Forward::VaryMiss
            } else {
                Forward::Miss
            };
            return Plan::Miss { fwd, stale: None };
        };
        let why = match entry.policy.reuse(request, now, heuristic_fraction) {
            Reuse::Fresh => {
                return Plan::Hit {
                    entry: entry.clone(),
                    background: false,
                };
            }
            Reuse::StaleWhileRevalidate => {
                return Plan::Hit {
                    entry: entry.clone(),
                    background: !head,
                };
            }
            Reuse::Validate(why) => why,
        };
        if only_if_cached {
            return Plan::NotCached;
        }
        let fwd = match why {
            ValidateWhy::Stale => Forward::Stale,
            ValidateWhy::Asked => Forward::Request,
        };
        if entry.policy.has_validator() && !head {
            Plan::Revalidate {
                entry: entry.clone(),
                fwd,
            }
        } else {
            Plan::Miss {
                fwd,
                stale: Some(entry.clone()),
            }
        }
    }
}

// === impl Cache (after the exchange) ===

impl Cache {
    /// The policy to store a GET response under (with its `Vary` names), or None when RFC
    /// 9111 forbids storing it, it is too large, or it would be useless (stale at once and
    /// without a validator). `request` are the client's headers as forwarded.
    #[allow(clippy::too_many_arguments)]
    pub fn policy_for(
        &self,
        request: &HeaderMap,
        status: StatusCode,
        response: &HeaderMap,
        content_length: Option<u64>,
        sent: SystemTime,
        received: SystemTime,
    ) -> Option<(Policy, Vec<HeaderName>)> {
        let vary = super::key::vary_names(response).ok()?;
        if content_length.is_some_and(|len| len > self.max_object_size)
            || !policy::storable(&Method::GET, request, status, response)
        {
            return None;
        }
        let policy = Policy::new(
            status,
            response,
            stored_request_headers(request, &vary),
            sent,
            received,
        );
        let useful = !policy
            .time_to_live(received, self.heuristic_fraction)
            .is_zero()
            || policy.has_validator();
        useful.then_some((policy, vary))
    }

    /// After a 304 to a revalidation of `entry`: the refreshed entry, stored again while
    /// it is still storable (a 304 may add `no-store`: then it is served once and dropped).
    #[allow(clippy::too_many_arguments)]
    pub fn refresh(
        &self,
        url: &str,
        lookup: &Lookup,
        entry: &Entry,
        request: &HeaderMap,
        response: &HeaderMap,
        sent: SystemTime,
        received: SystemTime,
    ) -> Arc<Entry> {
        let policy = entry.policy.not_modified(response, sent, received);
        let storable = policy::storable(&Method::GET, request, policy.status(), policy.headers());
        let refreshed = Arc::new(entry.refreshed(policy));
        if storable {
            self.replace(url, lookup, refreshed.clone());
        } else {
            self.invalidate(url);
        }
        refreshed
    }

    /// After the origin answered a HEAD: a 200 refreshes the stored GET response it found
    /// (or drops it when validators or length differ), RFC 9111 4.3.5.
    pub fn after_head(
        &self,
        url: &str,
        lookup: &Lookup,
        status: StatusCode,
        response: &HeaderMap,
        sent: SystemTime,
        received: SystemTime,
    ) {
        let Some(entry) = &lookup.entry else { return };
        if status != StatusCode::OK {
            return;
        }
        match entry.policy.head_update(response, sent, received) {
            Some(policy) => self.replace(url, lookup, Arc::new(entry.refreshed(policy))),
            None => {
                self.invalidate(url);
            }
        }
    }

    /// Claim the background revalidation of `key`; None when one is already running. The
    /// claim ends when the returned guard drops.
    pub fn claim_revalidation(self: &Arc<Self>, key: &str) -> Option<RevalidationGuard> {
        let key: Arc<str> = Arc::from(key);
        self.revalidations
            .lock()
            .insert(key.clone())
            .then(|| RevalidationGuard {
                cache: self.clone(),
                key,
            })
    }
}

/// Held while a background revalidation of one key runs.
pub struct RevalidationGuard {
    cache: Arc<Cache>,
    key: Arc<str>,
}

impl Drop for RevalidationGuard {
    fn drop(&mut self) {
        self.cache.revalidations.lock().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheConfig;
    use http::HeaderValue;

    fn entry(cc: &'static str, etag: bool) -> Arc<Entry> {
        let mut h = HeaderMap::new();
        h.insert("cache-control", HeaderValue::from_static(cc));
        if etag {
            h.insert("etag", HeaderValue::from_static("\"v1\""));
        }
        let now = SystemTime::now();
        let policy = Policy::new(StatusCode::OK, &h, HeaderMap::new(), now, now);
        Arc::new(Entry::new(policy, bytes::Bytes::from_static(b"body")))
    }

    fn lookup(entry: Option<Arc<Entry>>) -> Lookup {
        Lookup {
            variant: None,
            vary: None,
            entry,
        }
    }

    #[test]
    fn plans() {
        let now = SystemTime::now();
        let none = HeaderMap::new();
        let plan = |e, head, req: &HeaderMap| Plan::decide(&lookup(e), head, req, now, 0.1);
        assert!(matches!(
            plan(None, false, &none),
            Plan::Miss {
                fwd: Forward::Miss,
                stale: None
            }
        ));
        assert!(matches!(
            plan(Some(entry("max-age=60", false)), false, &none),
            Plan::Hit {
                background: false,
                ..
            }
        ));
        assert!(matches!(
            plan(Some(entry("max-age=60, no-cache", true)), false, &none),
            Plan::Revalidate {
                fwd: Forward::Request,
                ..
            }
        ));
        // HEAD does not revalidate: it is forwarded, and its answer updates the entry
        assert!(matches!(
            plan(Some(entry("max-age=60, no-cache", true)), true, &none),
            Plan::Miss {
                fwd: Forward::Request,
                stale: Some(_)
            }
        ));
        assert!(matches!(
            plan(Some(entry("max-age=0", false)), false, &none),
            Plan::Miss {
                fwd: Forward::Stale,
                stale: Some(_)
            }
        ));
        assert!(matches!(
            plan(
                Some(entry("max-age=0, stale-while-revalidate=60", true)),
                false,
                &none
            ),
            Plan::Hit {
                background: true,
                ..
            }
        ));
        let mut oic = HeaderMap::new();
        oic.insert("cache-control", HeaderValue::from_static("only-if-cached"));
        assert!(matches!(plan(None, false, &oic), Plan::NotCached));
        assert!(matches!(
            plan(Some(entry("no-cache", true)), false, &oic),
            Plan::NotCached
        ));
    }

    #[tokio::test]
    async fn refresh_keeps_or_drops_the_entry() {
        let cache = Cache::new(&CacheConfig::default()).unwrap();
        let url = "http://a/b";
        let e = entry("no-cache", true);
        let target = cache.store_target(url, &[], &HeaderMap::new());
        cache.insert(&target, e.clone());
        let now = SystemTime::now();
        let found = lookup(Some(e.clone()));
        let none = HeaderMap::new();
        let mut ok = HeaderMap::new();
        ok.insert("etag", HeaderValue::from_static("\"v1\""));
        ok.insert("x-new", HeaderValue::from_static("1"));
        let refreshed = cache.refresh(url, &found, &e, &none, &ok, now, now);
        assert_eq!(refreshed.policy.headers()["x-new"], "1");
        let stored = cache.lookup(url, &none).await.entry.unwrap();
        assert_eq!(stored.policy.headers()["x-new"], "1");
        // a 304 that says no-store: served this once, then gone
        let mut no_store = HeaderMap::new();
        no_store.insert("cache-control", HeaderValue::from_static("no-store"));
        cache.refresh(url, &found, &e, &none, &no_store, now, now);
        assert!(cache.lookup(url, &none).await.entry.is_none());

        let claim = cache.claim_revalidation(url).unwrap();
        assert!(cache.claim_revalidation(url).is_none());
        drop(claim);
        assert!(cache.claim_revalidation(url).is_some());
    }
}
