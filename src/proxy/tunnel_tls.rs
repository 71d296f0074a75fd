//! Stage 8a for CONNECT on a `tls.ports` port: after the `200`, before the relay, read the client's ClientHello and let `tls::policy` decide; close the tunnel or hand every byte read to the relay.
//!
//! ```text
//! kalmar -> client:  HTTP/1.1 200 OK
//! client -> kalmar:  16 03 01 ... ClientHello (server_name "pypi.org", ALPN h2)   <- read here
//! kalmar -> origin:  the same bytes, unchanged; then the relay (splice) as before
//! ```
//! Nothing is decrypted and nothing is answered: a refused tunnel is closed and its log line
//! says verdict `deny` and the kind (`sni-mismatch`, `not-tls`, ...). The relay afterwards is
//! the ordinary one, so the check costs one read and one parse per tunnel, never per byte.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::TcpStream;

use super::ctx::RequestCtx;
use crate::acl::{Decision, Host, Identity, Verdict};
use crate::metrics::Metrics;
use crate::state::Snapshot;
use crate::tls::policy::Tunnel;
use crate::tls::{HelloOutcome, read_client_hello};

/// What the check of one tunnel needs from the request that opened it.
pub struct Inspection {
    snap: Arc<Snapshot>,
    identity: Identity,
    decision: Decision,
    host: Host,
    port: u16,
}

/// The stage's answer.
pub enum Inspected {
    /// Relay, sending these bytes (everything read from the client so far) to the far end first.
    Relay(Bytes),
    /// Close the tunnel; `read` bytes were taken from the client and not forwarded.
    Close { read: u64 },
}

// === impl Inspection ===

impl Inspection {
    /// `None` when the stage does not run for this tunnel (its port is not in `tls.ports`).
    pub fn new(
        snap: &Arc<Snapshot>,
        identity: &Identity,
        decision: &Decision,
        host: &Host,
        port: u16,
    ) -> Option<Inspection> {
        snap.tls.applies(port).then(|| Inspection {
            snap: Arc::clone(snap),
            identity: identity.clone(),
            decision: decision.clone(),
            host: host.clone(),
            port,
        })
    }

    /// Does the deciding rule let bytes that are not TLS through (then the far end speaking
    /// first ends the wait)?
    pub fn any_protocol(&self) -> bool {
        self.snap.policy.tunnel_options(&self.decision).any_protocol
    }

    /// Read the ClientHello (after `buffered`, what hyper had read past the CONNECT head),
    /// decide, and note the outcome in the tunnel's record (sni, alpn, the check, verdict and
    /// kind of a refusal; the line's metrics follow from it) and in the checks counter.
    pub async fn run(
        self,
        client: &mut TcpStream,
        buffered: Bytes,
        far_end_first: impl Future<Output = ()>,
        ctx: &mut RequestCtx,
        metrics: &Metrics,
    ) -> Inspected {
        let tls = &self.snap.tls;
        let read =
            read_client_hello(client, buffered, tls.client_hello_timeout, far_end_first).await;
        let tunnel = Tunnel {
            policy: &self.snap.policy,
            identity: &self.identity,
            decision: &self.decision,
            host: &self.host,
            port: self.port,
        };
        let check = tls.check(&tunnel, &read.outcome);
        metrics.tunnel_tls_check(check.reason);
        tracing::debug!(request_id = %ctx.id(), check = %check, "tunnel TLS check");
        let record = &mut ctx.record;
        if let HelloOutcome::Hello(hello) = &read.outcome {
            record.sni = hello.server_name.as_ref().map(|h| h.to_string().into());
            record.alpn = Some(hello.alpn.clone());
        }
        record.tls = Some(check);
        if check.verdict == Verdict::Deny {
            record.verdict = Some(Verdict::Deny);
        }
        if let Some(kind) = check.error_kind() {
            ctx.note_error(kind);
        }
        if check.closes() {
            Inspected::Close {
                read: read.bytes.len() as u64,
            }
        } else {
            Inspected::Relay(read.bytes)
        }
    }
}
