//! Stages 6 and 9 for plain HTTP, around one exchange: decide a [`Plan`] from the stored
//! response (`cache::plan`), send at most one request to the origin, then one
//! after-response step. Runs after `authorize`, so a denied client never reaches a stored
//! response.
//!
//! | plan | request to the origin | after it | log / `Cache-Status` |
//! |---|---|---|---|
//! | `Hit` (fresh, or the client's `max-stale`) | none | – (304 / 206 / 416 from the stored response) | hit / `kalmar; hit` |
//! | `Hit` within `stale-while-revalidate` | one in a background task | it refreshes or replaces the entry | stale / `hit; detail=stale-while-revalidate` |
//! | `Revalidate` (stale or asked, with validators) | with the stored validators | 304: update, serve the stored response; 5xx/none: stale if allowed; else store the answer | revalidated / `fwd=stale; fwd-status=304` |
//! | `Miss` | as the client sent it; concurrent GET misses collapse | GET: store while streaming; HEAD: update or drop the stored GET | miss / `fwd=miss[; stored]` |
//! | `NotCached` (`only-if-cached`) | none | 504 `not-cached` | – |
//! | other methods; If-Match, If-Unmodified-Since; an unanswered Range | as sent | unsafe 2xx/3xx invalidate the URL, `Location`, `Content-Location` | uncacheable / `fwd=method`, `fwd=bypass` |
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
use hyper::body::Incoming;

use super::Exchange;
use http_body_util::BodyExt;

use super::body::{ClientBody, UpstreamBody};
use super::ctx::RequestCtx;
use super::target::Target;
use crate::cache::key::{self, CACHE_STATUS, Conditionals, Forward, StaleWhy, Status};
use crate::cache::plan::Plan;
use crate::cache::range::{self, RangeAnswer};
use crate::cache::tee::Tee;
use crate::cache::{Cache, Entry, Flight, FlightGuard, Outcome};
use crate::error::ProxyError;

// === impl Exchange ===

impl Exchange<'_> {
    /// Validate the stored response for `url` in the background (it was just served
    /// within `stale-while-revalidate`): a GET with its validators from a task of its own,
    /// whose answer refreshes (304) or replaces it. One at a time per URL; nothing is
    /// logged for it but errors at debug level.
    fn revalidate_in_background(&self, cache: &Arc<Cache>, url: &str, request: &HeaderMap) {
        let Some(claim) = cache.claim_revalidation(url) else {
            return;
        };
        let proxy = self.proxy.clone();
        let snap = proxy.state.load();
        let mut ctx = self.ctx.background();
        let (identity, target, decision) = (
            self.identity.clone(),
            self.target.clone(),
            self.decision.clone(),
        );
        let (cache, url, headers) = (cache.clone(), url.to_owned(), request.clone());
        tokio::spawn(async move {
            let _claim = claim;
            let route = snap
                .upstream
                .route(&target.host, target.port, target.protocol);
            let mut exchange = Exchange {
                proxy: &proxy,
                snap: &snap,
                ctx: &mut ctx,
                identity,
                target,
                decision,
                route,
            };
            if let Err(e) = exchange.validate_stored(&cache, &url, headers).await {
                tracing::debug!(%url, error = %e, "background revalidation failed");
            }
        });
    }

    /// The background half of `stale-while-revalidate`: one exchange, then the same
    /// after-response step as a foreground validation (refresh, or store the new answer).
    async fn validate_stored(
        &mut self,
        cache: &Arc<Cache>,
        url: &str,
        headers: HeaderMap,
    ) -> Result<(), ProxyError> {
        let lookup = cache.lookup(url, &headers).await;
        let Some(entry) = lookup.entry.clone() else {
            return Ok(());
        };
        let mut parts = Request::new(()).into_parts().0;
        parts.headers = headers.clone();
        for (name, value) in &entry.policy.validators() {
            parts.headers.insert(name.clone(), value.clone());
        }
        let sent = SystemTime::now();
        let response = self.forward_parts(parts, UpstreamBody::Empty).await?;
        let received = SystemTime::now();
        if response.status() == StatusCode::NOT_MODIFIED {
            cache.refresh(
                url,
                &lookup,
                &entry,
                &headers,
                response.headers(),
                sent,
                received,
            );
            return Ok(());
        }
        let content_length = http_body::Body::size_hint(response.body()).exact();
        let Some((policy, vary)) = cache.policy_for(
            &headers,
            response.status(),
            response.headers(),
            content_length,
            sent,
            received,
        ) else {
            // The origin's answer may not be stored: neither may the old one be used.
            cache.invalidate(url);
            return Ok(());
        };
        let target = cache.store_target(url, &vary, &headers);
        let tee = Tee::new(cache.clone(), target, policy, None);
        let mut body = response.into_body().with_tee(tee);
        // Read it to the end: the tee stores it when it ends cleanly.
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                break;
            }
        }
        Ok(())
    }

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

        // 6. Decide, before anything is sent. The canonical URL is the key and names the
        // authority (forward sets Host again); the client's own conditionals are evaluated
        // here against the stored response, not sent along with the cache's.
        req.headers_mut().remove(header::HOST);
        let head = method == Method::HEAD;
        let mut cond = Conditionals::take(req.headers_mut());
        let url = self.ctx.record.target.clone();
        let fraction = cache.heuristic_fraction();
        let lookup = cache.lookup(&url, req.headers()).await;
        let plan = Plan::decide(&lookup, head, req.headers(), SystemTime::now(), fraction);
        let ranged = req.headers().contains_key(header::RANGE);
        // A Range is answered from a stored response only when it is used as it is;
        // otherwise the request goes to the origin untouched and its answer is not stored.
        if ranged && !matches!(plan, Plan::Hit { .. }) {
            cond.restore(req.headers_mut());
            let response = self.forward(req).await?;
            return Ok(annotate(
                self.ctx,
                response,
                Outcome::Uncacheable,
                Status::forwarded(Forward::Bypass),
            ));
        }
        // The client's headers as forwarded, without the cache's validators: what a stored
        // response is judged against.
        let request_headers = req.headers().clone();
        let mut flight: Option<FlightGuard> = None;
        let (fwd, stored) = match plan {
            Plan::Hit { entry, background } => {
                let (status, outcome) = if background {
                    self.revalidate_in_background(cache, &url, &request_headers);
                    (Status::Stale(StaleWhy::WhileRevalidate), Outcome::Stale)
                } else {
                    (Status::Hit, Outcome::Hit)
                };
                let served = Served::new(&entry, &request_headers, head, &cond);
                return Ok(served.respond(self.ctx, status, outcome));
            }
            Plan::NotCached => return Err(ProxyError::NotCached(url)),
            Plan::Revalidate { entry, fwd } => {
                for (name, value) in &entry.policy.validators() {
                    req.headers_mut().insert(name.clone(), value.clone());
                }
                (fwd, Stored::Validating(entry))
            }
            Plan::Miss { fwd, stale } => {
                // Plain GET misses collapse: the first fetches, the others wait and read it.
                if !head && cond.is_empty() {
                    let key = lookup.variant.as_deref().unwrap_or(&url);
                    match cache.join_flight(key) {
                        Flight::Leader(guard) => flight = Some(guard),
                        Flight::Follower(rx) => {
                            if cache.wait(rx).await
                                && let Some(response) =
                                    collapsed_hit(cache, self.ctx, &url, &request_headers).await
                            {
                                return Ok(response);
                            }
                            // The leader's response was not stored (or took too long): fetch alone.
                        }
                    }
                }
                cond.restore(req.headers_mut());
                (fwd, stale.map_or(Stored::None, Stored::Fallback))
            }
        };

        // 8. The one exchange with the origin.
        let sent = SystemTime::now();
        let result = self.forward(req).await;
        let received = SystemTime::now();

        // 9. After it: fall back on the stored response, update it, or store the answer.
        let stale = match &stored {
            Stored::Validating(entry) | Stored::Fallback(entry) => Some(entry),
            Stored::None => None,
        };
        let response = match result {
            Ok(response) => response,
            Err(e) => {
                return match stale {
                    Some(entry)
                        if entry.policy.serve_stale_on_error(
                            &request_headers,
                            None,
                            received,
                            fraction,
                        ) =>
                    {
                        let served = Served::new(entry, &request_headers, head, &cond);
                        Ok(served.respond(
                            self.ctx,
                            Status::Stale(StaleWhy::Unreachable),
                            Outcome::Stale,
                        ))
                    }
                    _ => Err(e),
                };
            }
        };
        let status = response.status();
        if let Some(entry) = stale
            && status.is_server_error()
            && entry
                .policy
                .serve_stale_on_error(&request_headers, Some(status), received, fraction)
        {
            // The error body is not wanted: dropping it discards that origin connection.
            drop(response);
            let served = Served::new(entry, &request_headers, head, &cond);
            let why = StaleWhy::OriginError(status.as_u16());
            return Ok(served.respond(self.ctx, Status::Stale(why), Outcome::Stale));
        }
        if let Stored::Validating(entry) = &stored
            && status == StatusCode::NOT_MODIFIED
        {
            let refreshed = cache.refresh(
                &url,
                &lookup,
                entry,
                &request_headers,
                response.headers(),
                sent,
                received,
            );
            // The 304's (empty) body is done: dropping it returns the connection.
            drop(response);
            let served = Served::new(&refreshed, &request_headers, head, &cond);
            let status = Status::Forwarded {
                fwd,
                fwd_status: Some(304),
                stored: false,
                collapsed: false,
            };
            return Ok(served.respond(self.ctx, status, Outcome::Revalidated));
        }
        if head {
            cache.after_head(&url, &lookup, status, response.headers(), sent, received);
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
            (sent, received),
            Status::forwarded(fwd),
        ))
    }
}

/// What was stored for the URL when the request went to the origin.
enum Stored {
    None,
    /// Being validated (the request carries its validators).
    Validating(Arc<Entry>),
    /// Not usable as it is, but may answer if the origin fails.
    Fallback(Arc<Entry>),
}

/// After waiting for a collapsed miss: the entry it stored, if it answers this request.
async fn collapsed_hit(
    cache: &Arc<Cache>,
    ctx: &mut RequestCtx,
    url: &str,
    headers: &HeaderMap,
) -> Option<Response<ClientBody>> {
    let lookup = cache.lookup(url, headers).await;
    let now = SystemTime::now();
    match Plan::decide(&lookup, false, headers, now, cache.heuristic_fraction()) {
        Plan::Hit {
            entry,
            background: false,
        } => {
            let served = Served::new(&entry, headers, false, &Conditionals::default());
            let status = Status::Forwarded {
                fwd: Forward::Miss,
                fwd_status: None,
                stored: false,
                collapsed: true,
            };
            Some(served.respond(ctx, status, Outcome::Hit))
        }
        _ => None,
    }
}

/// A forwarded GET response: stored while it streams when RFC 9111 allows, else passed on.
#[allow(clippy::too_many_arguments)]
fn store_or_pass(
    cache: &Arc<Cache>,
    ctx: &mut RequestCtx,
    url: &str,
    request_headers: &HeaderMap,
    response: Response<ClientBody>,
    flight: Option<FlightGuard>,
    (sent, received): (SystemTime, SystemTime),
    mut status: Status,
) -> Response<ClientBody> {
    let content_length = http_body::Body::size_hint(response.body())
        .exact()
        .or_else(|| {
            response
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok())
        });
    let Some((policy, vary)) = cache.policy_for(
        request_headers,
        response.status(),
        response.headers(),
        content_length,
        sent,
        received,
    ) else {
        // Not stored: waiters (if any) go to the origin themselves.
        drop(flight);
        return annotate(ctx, response, Outcome::Uncacheable, status);
    };
    if let Status::Forwarded { stored, .. } = &mut status {
        *stored = true;
    }
    let target = cache.store_target(url, &vary, request_headers);
    let tee = Tee::new(cache.clone(), target, policy, flight);
    let (parts, body) = response.into_parts();
    let response = Response::from_parts(parts, body.with_tee(tee));
    annotate(ctx, response, Outcome::Miss, status)
}

/// A response built from a stored entry, as it answers one request: the stored head with
/// the current `Age`; 304 when the client's own conditional matches; 206 or 416 for a
/// `Range`; no body for HEAD.
struct Served<'a> {
    entry: &'a Entry,
    parts: http::response::Parts,
    range: RangeAnswer,
    head: bool,
}

impl<'a> Served<'a> {
    fn new(entry: &'a Entry, request: &HeaderMap, head: bool, cond: &Conditionals) -> Served<'a> {
        let mut parts = Response::new(()).into_parts().0;
        parts.status = entry.policy.status();
        parts.headers = entry.policy.served_headers(SystemTime::now());
        let len = entry.body.len() as u64;
        let mut range = RangeAnswer::Full;
        if parts.status.is_success() && cond.not_modified(&parts.headers) {
            parts.status = StatusCode::NOT_MODIFIED;
        } else if parts.status == StatusCode::OK && !head {
            range = range::answer(request, &parts.headers, len);
        }
        Served {
            entry,
            parts,
            range,
            head,
        }
    }

    fn respond(
        mut self,
        ctx: &mut RequestCtx,
        status: Status,
        outcome: Outcome,
    ) -> Response<ClientBody> {
        let headers = &mut self.parts.headers;
        headers.append(CACHE_STATUS, status.to_header());
        let len = self.entry.body.len() as u64;
        let body = match (self.parts.status, self.range) {
            (StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED, _) => {
                headers.remove(header::CONTENT_LENGTH);
                ClientBody::empty()
            }
            (_, RangeAnswer::Partial { start, end }) => {
                self.parts.status = StatusCode::PARTIAL_CONTENT;
                if let Some(v) = range::content_range(self.range, len) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
                headers.insert(header::CONTENT_LENGTH, (end - start + 1).into());
                ClientBody::full(self.entry.body.slice(start as usize..=end as usize))
            }
            (_, RangeAnswer::Unsatisfiable) => {
                self.parts.status = StatusCode::RANGE_NOT_SATISFIABLE;
                if let Some(v) = range::content_range(self.range, len) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
                headers.insert(header::CONTENT_LENGTH, 0.into());
                ClientBody::empty()
            }
            (_, RangeAnswer::Full) => {
                headers.insert(header::CONTENT_LENGTH, len.into());
                if self.head {
                    ClientBody::empty()
                } else {
                    ClientBody::full(self.entry.body.clone())
                }
            }
        };
        ctx.record.cache = Some(outcome);
        Response::from_parts(self.parts, body)
    }
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
