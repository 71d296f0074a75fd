//! The request pipeline. `Proxy::handle` runs the stages top to bottom; any stage may end
//! the request with a `ProxyError`, which is turned into a response in exactly one place.
//!
//! | # | stage                                   | may end with            |
//! |---|-----------------------------------------|-------------------------|
//! | 1 | context (id, start, peer)               | –                       |
//! | 2 | identify: source IP → labels            | –                       |
//! | 3 | rate limit by source                    | 429                     |
//! | 4 | parse target, method checks             | 400 / 405 / 501         |
//! | 5 | authorize: rules × destination × ports  | 403                     |
//! | 6 | cache lookup (plain-HTTP GET/HEAD)      | hit / 304 / 504 not-cached |
//! | 7 | route (direct / parent), resolve, vet every address, dial | 403 / 502 / 504 |
//! | 8 | forward the exchange, or tunnel bytes   | 502 / 504               |
//! | 9 | cache store, while the body streams     | –                       |
//! |10 | error → response (`ProxyError::to_response`) | –                  |
//! |11 | access-log line + metrics, when the body or tunnel is done | –    |

pub mod body;
pub mod cache_stage;
pub mod ctx;
pub mod forward;
pub mod headers;
pub mod relay;
pub mod target;
pub mod tunnel;

use std::sync::Arc;

use http::{Method, Request, Response};
use hyper::body::Incoming;

use crate::access_log::AccessLog;
use crate::acl::{Destination, Verdict};
use crate::connect;
use crate::connect::pool::Pool;
use crate::connect::upstream::Route;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::state::{SharedState, Snapshot};
use body::ClientBody;
use ctx::{ConnInfo, RequestCtx};
use target::Target;

/// Process-wide services shared by every worker and request.
pub struct Proxy {
    pub state: Arc<SharedState>,
    pub metrics: Arc<Metrics>,
    pub log: AccessLog,
    pub pool: Arc<Pool>,
    pub tracker: Arc<crate::server::Tracker>,
    /// The response cache; survives reloads (None when disabled at start).
    pub cache: Option<Arc<crate::cache::Cache>>,
}

// === impl Proxy ===

impl Proxy {
    /// Serve one request. Never fails: errors become responses here.
    pub async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> Response<ClientBody> {
        // Back-pressure: wait here, before any work, if the access log is behind.
        let slot = self.log.reserve().await;
        let mut ctx = Box::new(RequestCtx::new(conn, &req, self.metrics.clone(), slot));
        let snap = self.state.load();
        let raw_uri = req.uri().clone();
        let mut response = match self.process(&snap, &mut ctx, req).await {
            Ok(response) => response,
            Err(err) => {
                ctx.note_error(err.kind());
                if ctx.target.is_empty() {
                    ctx.target = raw_uri.to_string();
                }
                if let ProxyError::Denied { kind, .. } = &err {
                    self.metrics.denied(kind);
                }
                if matches!(err, ProxyError::RateLimited { .. }) {
                    self.metrics.rate_limited();
                }
                tracing::debug!(request_id = %ctx.id, error = %err, "request failed");
                let mut response: Response<ClientBody> = err.to_response(&ctx.id);
                if let ProxyError::RateLimited { retry_after, .. } = &err {
                    response.headers_mut().insert(
                        http::header::RETRY_AFTER,
                        retry_after.as_secs().max(1).into(),
                    );
                }
                response
            }
        };
        ctx.status = response.status().as_u16();
        ctx.content_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .map(ctx::owned_value);
        let body = std::mem::replace(response.body_mut(), ClientBody::empty());
        *response.body_mut() = body.with_ctx(ctx);
        response
    }

    async fn process(
        self: &Arc<Self>,
        snap: &Arc<Snapshot>,
        ctx: &mut RequestCtx,
        req: Request<Incoming>,
    ) -> Result<Response<ClientBody>, ProxyError> {
        let client_ip = ctx.client.ip();

        // 2. identify
        let identity = snap.policy.identify(client_ip);
        ctx.set_identity(&identity);

        // 3. rate limit
        snap.limits
            .check_request(&identity, client_ip)
            .map_err(|e| ProxyError::RateLimited {
                retry_after: e.retry_after,
                limit: e.limit.to_string(),
            })?;

        // 4. target and method
        if req.method() == Method::TRACE && !snap.config.proxy.allow_trace {
            return Err(ProxyError::MethodNotAllowed(Method::TRACE));
        }
        let target = Target::from_request(req.method(), req.uri())?;
        ctx.target = target.log_target();

        // 5. authorize
        let decision = snap.policy.authorize(
            &identity,
            &Destination {
                host: &target.host,
                port: target.port,
                method: req.method(),
                protocol: target.protocol,
            },
        );
        ctx.set_decision(&decision);
        if decision.verdict == Verdict::Report {
            self.metrics.denied_report(decision.reason.as_str());
        }
        if !decision.verdict.is_allowed() {
            return Err(ProxyError::Denied {
                kind: decision.error_kind().unwrap_or("denied"),
                message: decision.message(&target.authority),
            });
        }

        // 6-9. cache (plain HTTP), connect and exchange
        let check = |ip| {
            snap.policy
                .check_address(&decision, ip)
                .map_err(|denied| ProxyError::Denied {
                    kind: "internal-destination",
                    message: denied.to_string(),
                })
        };
        // 7a. route: direct, or through a parent proxy (after the ACL, never instead of it)
        let route = snap
            .upstream
            .route(&target.host, target.port, target.protocol);
        if let Route::Parents(_) = route {
            Box::pin(connect::vet_for_parent(
                &snap.resolver,
                &self.metrics,
                &target.host,
                snap.upstream.check_resolved,
                &check,
            ))
            .await?;
        }
        match target.protocol {
            crate::acl::Protocol::Connect => {
                let permit = snap
                    .limits
                    .acquire_tunnel(&identity, client_ip)
                    .map_err(|e| ProxyError::RateLimited {
                        retry_after: e.retry_after,
                        limit: e.limit.to_string(),
                    })?;
                // Boxed, as every branch but plain forwarding: the request future is moved
                // into place per request, and only the common path should size it.
                match route {
                    Route::Direct(_) => {
                        Box::pin(tunnel::open(self, snap, ctx, &target, check, req, permit)).await
                    }
                    Route::Parents(parents) => {
                        Box::pin(tunnel::open_via_parent(
                            self, snap, ctx, &target, parents, req, permit,
                        ))
                        .await
                    }
                }
            }
            crate::acl::Protocol::Http => {
                cache_stage::serve(self, snap, ctx, &target, &route, check, req).await
            }
        }
    }
}
