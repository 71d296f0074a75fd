//! Stages 6 and 9 for plain HTTP: answer from the cache, revalidate, or forward and store.
//! Runs after `authorize`, so a denied client never reaches a stored response.
//!
//! | request                                   | what happens                                   | log / `Cache-Status`              |
//! |-------------------------------------------|------------------------------------------------|-----------------------------------|
//! | GET/HEAD, fresh entry                     | served from the cache (304 if the client's own conditional matches) | hit / `kalmar; hit` |
//! | GET, stale entry with a validator         | If-None-Match / If-Modified-Since to the origin; 304 refreshes and serves the entry | revalidated / `fwd=stale; fwd-status=304` |
//! | GET/HEAD, no entry                        | forwarded; GET responses stored while they stream; concurrent identical misses wait for the first | miss / `fwd=miss[; stored]` |
//! | Range, If-Match, If-Unmodified-Since, If-Range | forwarded untouched                       | uncacheable / `fwd=bypass`        |
//! | any other method                          | forwarded; a 2xx/3xx answer to an unsafe one invalidates the URL, `Location`, `Content-Location` | uncacheable / `fwd=method` |
//! | `Cache-Control: only-if-cached`, no usable entry | 504 `not-cached`                        | –                                 |
//!
//! ```text
//! GET http://example.com/a  ->  (stale, ETag "v1")  ->  GET /a  If-None-Match: "v1"
//!                           <-  304 Not Modified    <-  200 + stored body, Age: 0,
//!                                                       Cache-Status: kalmar; fwd=stale; fwd-status=304
//! ```

use std::sync::Arc;
use std::time::SystemTime;

use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode};
use http_cache_semantics::{AfterResponse, BeforeRequest, CachePolicy};
use hyper::body::Incoming;

use super::Exchange;
use super::body::ClientBody;
use super::ctx::RequestCtx;
use super::target::Target;
use crate::cache::key::{
    self, CACHE_STATUS, CacheRequest, Conditionals, Forward, Status, stored_request_headers,
};
use crate::cache::tee::Tee;
use crate::cache::{Cache, Entry, Flight, FlightGuard, Lookup, Outcome};
use crate::error::ProxyError;

// === impl Exchange ===

impl Exchange<'_> {
    /// A plain-HTTP request through the cache (when `cache.enabled`), else straight to forward.
    pub async fn serve_http(
        mut self,
        req: Request<Incoming>,
    ) -> Result<Response<ClientBody>, ProxyError> {
        match &self.proxy.cache {
            Some(cache) if self.snap.config.cache.enabled => {
                let cache = cache.clone();
                // Boxed: the cache's states would otherwise size every request's future.
                Box::pin(self.through_cache(&cache, req)).await
            }
            _ => self.forward(req).await,
        }
    }

    async fn through_cache(
        &mut self,
        cache: &Arc<Cache>,
        mut req: Request<Incoming>,
    ) -> Result<Response<ClientBody>, ProxyError> {
        let method = req.method().clone();
        if method != Method::GET && method != Method::HEAD {
            let response = self.forward(req).await?;
            if !is_safe(&method)
                && (response.status().is_success() || response.status().is_redirection())
            {
                invalidate_after_unsafe(
                    cache,
                    &self.target,
                    &self.ctx.record.target,
                    response.headers(),
                );
            }
            return Ok(annotate(
                self.ctx,
                response,
                Outcome::Uncacheable,
                Status::forwarded(Forward::Method),
            ));
        }
        if key::bypasses(req.headers()) {
            let response = self.forward(req).await?;
            return Ok(annotate(
                self.ctx,
                response,
                Outcome::Uncacheable,
                Status::forwarded(Forward::Bypass),
            ));
        }

        // The canonical URL is the key and names the authority; forward sets Host again.
        req.headers_mut().remove(header::HOST);
        let head = method == Method::HEAD;
        let mut cond = Conditionals::take(req.headers_mut());
        let url = self.ctx.record.target.clone();
        let now = SystemTime::now();
        let lookup = cache.lookup(&url, req.headers()).await;

        let mut fwd = Forward::Miss;
        let mut stale = None;
        if let Some(entry) = &lookup.entry {
            let asked = CacheRequest {
                url: &url,
                headers: req.headers(),
            };
            match entry.policy.before_request(&asked, now) {
                BeforeRequest::Fresh(parts) => {
                    return Ok(from_entry(
                        self.ctx,
                        entry,
                        parts,
                        head,
                        &cond,
                        Status::Hit,
                        Outcome::Hit,
                    ));
                }
                BeforeRequest::Stale {
                    request,
                    matches: true,
                } => {
                    fwd = if entry.policy.is_stale(now) {
                        Forward::Stale
                    } else {
                        Forward::Request
                    };
                    stale = Some((entry.clone(), request.headers));
                }
                BeforeRequest::Stale { matches: false, .. } => fwd = Forward::VaryMiss,
            }
        }
        if key::request_directive(req.headers(), "only-if-cached") {
            return Err(ProxyError::NotCached(url));
        }

        // Kept for the stored policy: the client's headers, without Host and conditionals.
        let request_headers = req.headers().clone();

        if let (Some((entry, validators)), false) = (stale, head) {
            for name in [header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE] {
                if let Some(v) = validators.get(&name) {
                    req.headers_mut().insert(name, v.clone());
                }
            }
            let response = self.forward(req).await?;
            if response.status() == StatusCode::NOT_MODIFIED {
                let vary = lookup.vary.as_ref().map_or(&[][..], |spec| &spec.names[..]);
                let stored = CacheRequest {
                    url: &url,
                    headers: &stored_request_headers(&request_headers, vary),
                };
                return match entry
                    .policy
                    .after_response(&stored, &response, SystemTime::now())
                {
                    AfterResponse::NotModified(policy, parts) => {
                        let status = Status::Forwarded {
                            fwd,
                            fwd_status: Some(304),
                            stored: false,
                            collapsed: false,
                        };
                        let refreshed = Arc::new(entry.refreshed(policy));
                        if refreshed.policy.is_storable() {
                            cache.replace(&url, &lookup, refreshed.clone());
                        }
                        // The 304's (empty) body is done: dropping it returns the connection.
                        drop(response);
                        Ok(from_entry(
                            self.ctx,
                            &refreshed,
                            parts,
                            false,
                            &cond,
                            status,
                            Outcome::Revalidated,
                        ))
                    }
                    AfterResponse::Modified(..) => {
                        // A 304 for validators the entry does not have: the entry is unusable.
                        cache.invalidate(&url);
                        Ok(annotate(
                            self.ctx,
                            response,
                            Outcome::Miss,
                            Status::forwarded(fwd),
                        ))
                    }
                };
            }
            return Ok(store_or_pass(
                cache,
                self.ctx,
                &url,
                &request_headers,
                response,
                None,
                Status::Forwarded {
                    fwd,
                    fwd_status: None,
                    stored: false,
                    collapsed: false,
                },
            ));
        }

        // A miss. Plain GETs collapse: the first fetches, the others wait and read the entry.
        let mut flight: Option<FlightGuard> = None;
        if !head && cond.is_empty() {
            let key = lookup.variant.as_deref().unwrap_or(&url);
            match cache.join_flight(key) {
                Flight::Leader(guard) => flight = Some(guard),
                Flight::Follower(rx) => {
                    if cache.wait(rx).await
                        && let Some(response) =
                            collapsed_hit(cache, self.ctx, &url, req.headers()).await
                    {
                        return Ok(response);
                    }
                    // The leader's response was not stored (or took too long): fetch alone.
                }
            }
        }
        cond.restore(req.headers_mut());
        let response = self.forward(req).await?;
        if head {
            return Ok(annotate(
                self.ctx,
                response,
                Outcome::Miss,
                Status::forwarded(fwd),
            ));
        }
        Ok(store_or_pass(
            cache,
            self.ctx,
            &url,
            &request_headers,
            response,
            flight,
            Status::Forwarded {
                fwd,
                fwd_status: None,
                stored: false,
                collapsed: false,
            },
        ))
    }
}

/// After waiting for a collapsed miss: the entry it stored, if it answers this request.
async fn collapsed_hit(
    cache: &Arc<Cache>,
    ctx: &mut RequestCtx,
    url: &str,
    headers: &HeaderMap,
) -> Option<Response<ClientBody>> {
    let Lookup { entry, .. } = cache.lookup(url, headers).await;
    let entry = entry?;
    let asked = CacheRequest { url, headers };
    match entry.policy.before_request(&asked, SystemTime::now()) {
        BeforeRequest::Fresh(parts) => Some(from_entry(
            ctx,
            &entry,
            parts,
            false,
            &Conditionals::default(),
            Status::Forwarded {
                fwd: Forward::Miss,
                fwd_status: None,
                stored: false,
                collapsed: true,
            },
            Outcome::Hit,
        )),
        BeforeRequest::Stale { .. } => None,
    }
}

/// A forwarded GET response: stored while it streams when RFC 9111 allows, else passed on.
fn store_or_pass(
    cache: &Arc<Cache>,
    ctx: &mut RequestCtx,
    url: &str,
    request_headers: &HeaderMap,
    response: Response<ClientBody>,
    flight: Option<FlightGuard>,
    mut status: Status,
) -> Response<ClientBody> {
    let now = SystemTime::now();
    let Some((policy, vary)) = storable(cache, url, request_headers, &response, now) else {
        // Not stored: waiters (if any) go to the origin themselves.
        drop(flight);
        return annotate(ctx, response, Outcome::Uncacheable, status);
    };
    if let Status::Forwarded { stored, .. } = &mut status {
        *stored = true;
    }
    let target = cache.store_target(url, &vary, request_headers);
    let head_bytes = key::head_size(response.headers()) + key::head_size(request_headers);
    let tee = Tee::new(cache.clone(), target, policy, head_bytes, flight);
    let (parts, body) = response.into_parts();
    let response = Response::from_parts(parts, body.with_tee(tee));
    annotate(ctx, response, Outcome::Miss, status)
}

/// The policy to store `response` under, or None when it must not (or need not) be stored.
fn storable(
    cache: &Cache,
    url: &str,
    request_headers: &HeaderMap,
    response: &Response<ClientBody>,
    now: SystemTime,
) -> Option<(CachePolicy, Vec<http::HeaderName>)> {
    let vary = key::vary_names(response.headers()).ok()?;
    let too_large = http_body::Body::size_hint(response.body())
        .exact()
        .or_else(|| {
            response
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok())
        })
        .is_some_and(|len: u64| len > cache.max_object_size());
    if too_large {
        return None;
    }
    let stored = stored_request_headers(request_headers, &vary);
    let policy = CachePolicy::new_options(
        &CacheRequest {
            url,
            headers: &stored,
        },
        response,
        now,
        cache.options(),
    );
    // Storable, and worth it: fresh for a while, or revalidatable later.
    let useful = !policy.time_to_live(now).is_zero() || key::has_validator(response.headers());
    (policy.is_storable() && useful).then_some((policy, vary))
}

/// A response built from a stored entry: its refreshed head (with `Age`), the body as a
/// shared `Bytes`, or 304 when the client's own conditional matches.
fn from_entry(
    ctx: &mut RequestCtx,
    entry: &Entry,
    mut parts: http::response::Parts,
    head: bool,
    cond: &Conditionals,
    status: Status,
    outcome: Outcome,
) -> Response<ClientBody> {
    parts.headers.append(CACHE_STATUS, status.to_header());
    let body = if parts.status.is_success() && cond.not_modified(&parts.headers) {
        parts.status = StatusCode::NOT_MODIFIED;
        parts.headers.remove(header::CONTENT_LENGTH);
        ClientBody::empty()
    } else if matches!(
        parts.status,
        StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
    ) {
        parts.headers.remove(header::CONTENT_LENGTH);
        ClientBody::empty()
    } else {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, entry.body.len().into());
        if head {
            ClientBody::empty()
        } else {
            ClientBody::full(entry.body.clone())
        }
    };
    ctx.record.cache = Some(outcome);
    Response::from_parts(parts, body)
}

/// Record the outcome and add `Cache-Status` to a forwarded response.
fn annotate(
    ctx: &mut RequestCtx,
    mut response: Response<ClientBody>,
    outcome: Outcome,
    status: Status,
) -> Response<ClientBody> {
    response
        .headers_mut()
        .append(CACHE_STATUS, status.to_header());
    ctx.record.cache = Some(outcome);
    response
}

/// RFC 9110 9.2.1.
fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// RFC 9111 4.4: after a successful unsafe request, the target URI and the same-origin
/// `Location` / `Content-Location` URIs are invalidated.
fn invalidate_after_unsafe(cache: &Cache, target: &Target, url: &str, headers: &HeaderMap) {
    cache.invalidate(url);
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(value) = headers.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        if let Some(other) = same_origin_url(target, url, value) {
            cache.invalidate(&other);
        }
    }
}

/// `reference` resolved against `base` (a canonical URL of `target`), if it names the
/// same origin.
fn same_origin_url(target: &Target, base: &str, reference: &str) -> Option<String> {
    let absolute = if reference.starts_with("http://") || reference.starts_with("https://") {
        reference.to_owned()
    } else if reference.starts_with("//") {
        format!("http:{reference}")
    } else if reference.starts_with('/') {
        format!("http://{}{reference}", target.authority)
    } else {
        let path = base.split(['?', '#']).next().unwrap_or(base);
        let dir = &path[..path.rfind('/').map_or(path.len(), |i| i + 1)];
        format!("{dir}{reference}")
    };
    let uri: http::Uri = absolute.parse().ok()?;
    let other = Target::from_request(&Method::GET, &uri).ok()?;
    (other.authority == target.authority).then(|| other.log_target())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_origin_references() {
        let target = Target::from_request(
            &Method::POST,
            &"http://a.example:8080/x/y?q".parse().unwrap(),
        )
        .unwrap();
        let base = target.log_target();
        let cases = [
            ("/z", Some("http://a.example:8080/z")),
            ("z?1", Some("http://a.example:8080/x/z?1")),
            ("http://A.example:8080/w", Some("http://a.example:8080/w")),
            ("//a.example:8080/v", Some("http://a.example:8080/v")),
            ("http://b.example:8080/w", None),
            ("http://a.example/w", None),
        ];
        for (reference, expected) in cases {
            assert_eq!(
                same_origin_url(&target, &base, reference).as_deref(),
                expected,
                "{reference}"
            );
        }
    }
}
