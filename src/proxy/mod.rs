//! The request pipeline. `Proxy::handle` runs the stages top to bottom on one per-request
//! value, [`Exchange`], whose methods are the stages; any stage may end the request with a
//! `ProxyError`, which becomes the answer in exactly one place ([`Proxy::respond`]).
//!
//! | # | stage                                   | where                     | may end with            |
//! |---|-----------------------------------------|---------------------------|-------------------------|
//! | 1 | context (id, start, peer)               | `ctx`                     | –                       |
//! | 2 | identify: source IP → live pod, else static source | `state::SharedState::identify` | –            |
//! | 3 | rate limit by source                    | `Proxy::admit`            | 429                     |
//! | 4 | parse target, method checks             | `Proxy::admit`, `target`  | 400 / 405 / 501         |
//! | 5 | authorize: rules × destination × ports  | `Proxy::admit`            | 403                     |
//! | 6 | cache lookup (plain-HTTP GET/HEAD)      | `cache_stage`             | hit / 304 / 504 not-cached |
//! | 7 | connect: route, resolve, vet every address, dial (or a parent) | `connect::Connector` | 403 / 502 / 504 |
//! | 8 | forward the exchange, or check the tunnel's ClientHello and relay it | `forward`, `tunnel`, `tunnel_tls`, `relay` | 502 / 504; tunnels: close + log |
//! | 9 | cache store, while the body streams     | `cache_stage`, `cache::tee` | –                     |
//! |10 | error → response                        | `Proxy::respond`          | –                       |
//! |11 | access-log line + metrics, when the body or tunnel is done | `ctx` | –                    |

pub mod body;
pub mod cache_stage;
pub mod ctx;
pub mod forward;
pub mod headers;
pub mod target;
pub mod tunnel;
pub mod tunnel_tls;

use std::sync::Arc;

use http::{Method, Request, Response};
use hyper::body::Incoming;

use crate::access_log::AccessLog;
use crate::acl::{Decision, Destination, Identity};
use crate::connect::pool::Pool;
use crate::connect::upstream::Route;
use crate::connect::{Connector, Dest};
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::state::{SharedState, Snapshot};
use crate::tracker::Tracker;
use body::ClientBody;
use ctx::{ConnInfo, RequestCtx};
use target::Target;

/// Process-wide services shared by every worker and request.
pub struct Proxy {
    pub state: Arc<SharedState>,
    pub metrics: Arc<Metrics>,
    pub log: AccessLog,
    pub pool: Arc<Pool>,
    pub tracker: Arc<Tracker>,
    /// The response cache; survives reloads (None when disabled at start).
    pub cache: Option<Arc<crate::cache::Cache>>,
}

/// One admitted request on its way through stages 6-9: who asked, for what, what the policy
/// decided and which way it goes. Every later stage is a method of this value.
pub struct Exchange<'a> {
    pub proxy: &'a Arc<Proxy>,
    /// Shared, so that a tunnel's task can hold it for its ClientHello check.
    pub snap: &'a Arc<Snapshot>,
    pub ctx: &'a mut RequestCtx,
    pub identity: Identity,
    pub target: Target,
    pub decision: Decision,
    pub route: Route<'a>,
}

// === impl Proxy ===

impl Proxy {
    /// Serve one request. Never fails: errors become responses here.
    pub async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> Response<ClientBody> {
        // 0. Back-pressure: wait here, before any work, if the access log is behind.
        let slot = self.log.reserve().await;
        // 1. context
        let mut ctx = Box::new(RequestCtx::new(conn, &req, self.metrics.clone(), slot));
        let snap = self.state.load();
        let raw_uri = req.uri().clone();
        // 2. identify: one lock-free load of the live pod index, then the static sources (a
        // miss inside `kubernetes.pod_cidrs` may wait for one bounded direct lookup).
        let identity = self.state.identify(&snap, ctx.client_ip()).await;
        // 3-5, then 6-9
        let result = match self.admit(&snap, &mut ctx, identity, &req) {
            Ok(exchange) => exchange.run(req).await,
            Err(err) => Err(err),
        };
        // 10-11
        self.respond(ctx, result, &raw_uri)
    }

    /// Stages 2-5 for an identified client: record the identity, rate limit, parse the
    /// target, authorize, and pick the route.
    fn admit<'a>(
        self: &'a Arc<Self>,
        snap: &'a Arc<Snapshot>,
        ctx: &'a mut RequestCtx,
        identity: Identity,
        req: &Request<Incoming>,
    ) -> Result<Exchange<'a>, ProxyError> {
        let client_ip = ctx.client_ip();

        // 2. identify (done by the caller, which may wait)
        ctx.set_identity(&identity);

        // 3. rate limit
        snap.limits.check_request(&identity, client_ip)?;

        // 4. target and method
        if req.method() == Method::TRACE && !snap.config.proxy.allow_trace {
            return Err(ProxyError::MethodNotAllowed(Method::TRACE));
        }
        target::check_framing(req.headers())?;
        let target = Target::from_request(req.method(), req.uri())?;
        ctx.record.target = target.log_target();

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
        if let Some(kind) = decision.error_kind() {
            return Err(ProxyError::Denied {
                kind,
                message: decision.message(&target.authority),
            });
        }

        // 7a. route: direct, or through a parent proxy (after the ACL, never instead of it)
        let route = snap
            .upstream
            .route(&target.host, target.port, target.protocol);
        Ok(Exchange {
            proxy: self,
            snap,
            ctx,
            identity,
            target,
            decision,
            route,
        })
    }

    /// Stage 10: the answer. An error becomes Kalmar's own response here and nowhere else;
    /// the context rides on the body and logs the line (stage 11) when the body is done.
    fn respond(
        &self,
        mut ctx: Box<RequestCtx>,
        result: Result<Response<ClientBody>, ProxyError>,
        raw_uri: &http::Uri,
    ) -> Response<ClientBody> {
        let mut response = match result {
            Ok(response) => response,
            Err(err) => {
                ctx.failed(&err);
                if ctx.record.target.is_empty() {
                    ctx.record.target = raw_uri.to_string();
                }
                tracing::debug!(request_id = %ctx.id(), error = %err, "request failed");
                err.to_response(ctx.id())
            }
        };
        ctx.record.status = response.status().as_u16();
        ctx.record.content_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .map(ctx::owned_value);
        let body = std::mem::replace(response.body_mut(), ClientBody::empty());
        *response.body_mut() = body.with_ctx(ctx);
        response
    }
}

// === impl Exchange ===

impl<'a> Exchange<'a> {
    /// Stages 6-9: the CONNECT branch relays, the plain-HTTP branch goes through the cache
    /// around one exchange.
    async fn run(self, req: Request<Incoming>) -> Result<Response<ClientBody>, ProxyError> {
        match self.target.protocol {
            // Boxed, as every branch but plain forwarding: the request future is moved into
            // place per request, and only the common path should size it.
            crate::acl::Protocol::Connect => Box::pin(self.tunnel(req)).await,
            crate::acl::Protocol::Http => self.serve_http(req).await,
        }
    }

    /// The connect step's view of this request's snapshot and the process.
    fn connector(&self) -> Connector<'a> {
        let timeouts = &self.snap.config.timeouts;
        Connector {
            resolver: &self.snap.resolver,
            metrics: &self.proxy.metrics,
            pool: &self.proxy.pool,
            connect_timeout: timeouts.connect,
            answer_timeout: timeouts.upstream_response_header,
            check_resolved: self.snap.upstream.check_resolved,
        }
    }

    fn dest(&self) -> Dest<'_> {
        Dest {
            host: &self.target.host,
            port: self.target.port,
            authority: &self.target.authority,
        }
    }
}
