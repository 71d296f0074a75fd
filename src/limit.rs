//! Per-source rate limits: requests per second (governor, keyed by client IP) and concurrent tunnels, chosen by label selector.
//!
//! The first `[[rate_limits]]` item whose selector matches the client's identity applies; a
//! dimension it leaves unset is unlimited (later items are not consulted). Keys are client IPs
//! (IPv4-mapped IPv6 as IPv4). Memory: the governor state of idle clients is dropped by
//! [`Limits::housekeeping`], which the core calls about once a minute; the tunnel table only holds
//! clients with open tunnels.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;

use crate::acl::{AclConfigError, Identity, Problem, RateLimitConfig, Selector};

/// The compiled `[[rate_limits]]`. Replace it on reload; [`Limits::inherit`] carries the state over.
#[derive(Debug, Default)]
pub struct Limits {
    rules: Vec<LimitRule>,
}

#[derive(Debug)]
struct LimitRule {
    name: Arc<str>,
    selector: Selector,
    rate: Option<Rate>,
    max_tunnels: Option<u32>,
    /// Shared with the permits it issued (and with a successor `Limits` that inherits it).
    tunnels: Arc<TunnelTable>,
}

struct Rate {
    quota: Quota,
    limiter: Arc<DefaultKeyedRateLimiter<IpAddr>>,
}

/// Open tunnels per client IP; entries at zero are removed.
#[derive(Debug, Default)]
struct TunnelTable {
    open: Mutex<HashMap<IpAddr, u32>>,
}

/// A concurrent-tunnel slot; released when dropped, into the table that issued it.
#[derive(Debug)]
#[must_use = "the tunnel slot is released when the permit is dropped"]
pub struct TunnelPermit {
    slot: Option<(Arc<TunnelTable>, IpAddr)>,
}

/// Over a limit: answer 429 with `Retry-After` and `X-Kalmar-Error: rate-limited`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("over rate limit {limit:?} ({kind}); retry after {}s", self.retry_after_secs())]
pub struct RateLimited {
    pub retry_after: Duration,
    pub limit: Arc<str>,
    pub kind: LimitKind,
}

impl From<RateLimited> for crate::error::ProxyError {
    fn from(e: RateLimited) -> Self {
        crate::error::ProxyError::RateLimited {
            retry_after: e.retry_after,
            limit: e.limit,
        }
    }
}

/// Which dimension was exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    Requests,
    Tunnels,
}

/// Suggested wait when the tunnel limit is hit (no natural refill time).
const TUNNEL_RETRY: Duration = Duration::from_secs(1);

// === impl Limits ===

impl Limits {
    pub fn compile(cfgs: &[RateLimitConfig]) -> Result<Limits, AclConfigError> {
        let mut rules = Vec::with_capacity(cfgs.len());
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, cfg) in cfgs.iter().enumerate() {
            let key = format!("rate_limits[{i}]");
            if cfg.name.is_empty()
                || cfg.name.chars().count() > 128
                || cfg.name.chars().any(char::is_control)
            {
                return Err(AclConfigError::new(
                    format!("{key}.name"),
                    Problem::InvalidName(cfg.name.clone()),
                ));
            }
            if let Some(first) = names.insert(cfg.name.as_str(), i) {
                return Err(AclConfigError::new(
                    format!("{key}.name"),
                    Problem::Duplicate {
                        what: "rate limit name",
                        value: cfg.name.clone(),
                        first: format!("rate_limits[{first}]"),
                    },
                ));
            }
            let selector = Selector::compile(&cfg.from, &format!("{key}.from"))?;
            let rate = match (cfg.requests_per_second, cfg.burst) {
                (None, None) => None,
                (None, Some(burst)) => {
                    return Err(AclConfigError::new(
                        format!("{key}.burst"),
                        Problem::BurstWithoutRate(burst),
                    ));
                }
                (Some(rps), burst) => Some(quota(&key, rps, burst)?),
            };
            if rate.is_none() && cfg.max_tunnels.is_none() {
                return Err(AclConfigError::new(key, Problem::NoLimit));
            }
            rules.push(LimitRule {
                name: Arc::from(cfg.name.as_str()),
                selector,
                rate: rate.map(|quota| Rate {
                    quota,
                    limiter: Arc::new(RateLimiter::keyed(quota)),
                }),
                max_tunnels: cfg.max_tunnels,
                tunnels: Arc::default(),
            });
        }
        Ok(Limits { rules })
    }

    /// Carries state over from the `Limits` this one replaces: for each limit with the same name,
    /// the open-tunnel counts (always) and the request state (when the quota is unchanged), so that
    /// a reload neither forgets open tunnels nor hands every client a fresh burst.
    pub fn inherit(mut self, previous: &Limits) -> Limits {
        for rule in &mut self.rules {
            let Some(old) = previous.rules.iter().find(|o| o.name == rule.name) else {
                continue;
            };
            rule.tunnels = Arc::clone(&old.tunnels);
            if let (Some(new), Some(old)) = (&mut rule.rate, &old.rate)
                && new.quota == old.quota
            {
                new.limiter = Arc::clone(&old.limiter);
            }
        }
        self
    }

    /// Counts one request from `client`.
    pub fn check_request(&self, id: &Identity, client: IpAddr) -> Result<(), RateLimited> {
        let Some(rule) = self.rule_for(id) else {
            return Ok(());
        };
        let Some(rate) = &rule.rate else {
            return Ok(());
        };
        rate.limiter
            .check_key(&client.to_canonical())
            .map_err(|not_until| RateLimited {
                retry_after: not_until.wait_time_from(rate.limiter.clock().now()),
                limit: Arc::clone(&rule.name),
                kind: LimitKind::Requests,
            })
    }

    /// Takes a tunnel slot for `client`, held until the permit is dropped.
    pub fn acquire_tunnel(
        &self,
        id: &Identity,
        client: IpAddr,
    ) -> Result<TunnelPermit, RateLimited> {
        let Some((rule, max)) = self
            .rule_for(id)
            .and_then(|r| r.max_tunnels.map(|m| (r, m)))
        else {
            return Ok(TunnelPermit { slot: None });
        };
        let client = client.to_canonical();
        let mut open = rule.tunnels.open.lock();
        let count = open.entry(client).or_insert(0);
        if *count >= max {
            if *count == 0 {
                open.remove(&client);
            }
            return Err(RateLimited {
                retry_after: TUNNEL_RETRY,
                limit: Arc::clone(&rule.name),
                kind: LimitKind::Tunnels,
            });
        }
        *count += 1;
        drop(open);
        Ok(TunnelPermit {
            slot: Some((Arc::clone(&rule.tunnels), client)),
        })
    }

    /// Drops the request state of clients idle long enough to be back at full burst. Call it
    /// periodically (about once a minute).
    pub fn housekeeping(&self) {
        for rate in self.rules.iter().filter_map(|r| r.rate.as_ref()) {
            rate.limiter.retain_recent();
            rate.limiter.shrink_to_fit();
        }
    }

    /// Clients with request state, over all limits (a gauge for memory).
    pub fn tracked_clients(&self) -> usize {
        self.rules
            .iter()
            .filter_map(|r| r.rate.as_ref())
            .map(|r| r.limiter.len())
            .sum()
    }

    /// Open tunnels of `client` under the limit that applies to `id`.
    pub fn open_tunnels(&self, id: &Identity, client: IpAddr) -> u32 {
        self.rule_for(id)
            .and_then(|r| r.tunnels.open.lock().get(&client.to_canonical()).copied())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    fn rule_for(&self, id: &Identity) -> Option<&LimitRule> {
        self.rules.iter().find(|r| r.selector.matches(id))
    }
}

/// `rps` per second with `burst` (default: `rps` rounded up, at least 1).
fn quota(key: &str, rps: f64, burst: Option<u32>) -> Result<Quota, AclConfigError> {
    let bad_rate = || {
        AclConfigError::new(
            format!("{key}.requests_per_second"),
            Problem::InvalidRate(rps),
        )
    };
    if !(rps.is_finite() && rps > 0.0 && rps <= 1e9) {
        return Err(bad_rate());
    }
    let period = Duration::try_from_secs_f64(1.0 / rps).map_err(|_| bad_rate())?;
    let burst = match burst {
        Some(b) => NonZeroU32::new(b)
            .ok_or_else(|| AclConfigError::new(format!("{key}.burst"), Problem::InvalidBurst(b)))?,
        None => NonZeroU32::new(rps.ceil().clamp(1.0, f64::from(u32::MAX)) as u32)
            .unwrap_or(NonZeroU32::MIN),
    };
    Quota::with_period(period)
        .map(|q| q.allow_burst(burst))
        .ok_or_else(bad_rate)
}

// === impl Rate ===

impl fmt::Debug for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rate")
            .field("quota", &self.quota)
            .finish_non_exhaustive()
    }
}

// === impl TunnelPermit ===

impl TunnelPermit {
    /// A permit that counts nothing (no tunnel limit applies).
    pub fn unlimited() -> Self {
        Self { slot: None }
    }
}

impl Drop for TunnelPermit {
    fn drop(&mut self) {
        if let Some((table, client)) = self.slot.take() {
            let mut open = table.open.lock();
            if let Some(count) = open.get_mut(&client) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    open.remove(&client);
                }
            }
        }
    }
}

// === impl RateLimited ===

impl RateLimited {
    /// For the `Retry-After` header: whole seconds, rounded up, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        let secs = self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0);
        secs.max(1)
    }
}

// === impl LimitKind ===

impl LimitKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            LimitKind::Requests => "requests",
            LimitKind::Tunnels => "tunnels",
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::acl::{ExpressionConfig, Operator, SelectorConfig};

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn identity(team: &str) -> Identity {
        let labels: BTreeMap<String, String> = [("team".to_string(), team.to_string())].into();
        Identity::known(None, "10.0.0.0/8".parse().expect("net"), labels)
    }

    fn limit(
        name: &str,
        team: Option<&str>,
        rps: Option<f64>,
        burst: Option<u32>,
        tunnels: Option<u32>,
    ) -> RateLimitConfig {
        RateLimitConfig {
            name: name.into(),
            from: SelectorConfig {
                match_labels: team
                    .map(|t| [("team".to_string(), t.to_string())].into())
                    .unwrap_or_default(),
                match_expressions: vec![],
                ..Default::default()
            },
            requests_per_second: rps,
            burst,
            max_tunnels: tunnels,
        }
    }

    #[test]
    fn burst_then_limited_per_client_ip() {
        let limits =
            Limits::compile(&[limit("slow", None, Some(1.0), Some(3), None)]).expect("valid");
        let id = identity("a");
        for _ in 0..3 {
            assert_eq!(limits.check_request(&id, ip("10.0.0.1")), Ok(()));
        }
        let err = limits
            .check_request(&id, ip("10.0.0.1"))
            .expect_err("over burst");
        assert_eq!(&*err.limit, "slow");
        assert_eq!(err.kind, LimitKind::Requests);
        assert!(
            err.retry_after <= Duration::from_secs(1),
            "{:?}",
            err.retry_after
        );
        assert_eq!(err.retry_after_secs(), 1);
        // The mapped form is the same client; another IP has its own budget.
        assert!(limits.check_request(&id, ip("::ffff:10.0.0.1")).is_err());
        assert_eq!(limits.check_request(&id, ip("10.0.0.2")), Ok(()));
        assert_eq!(limits.tracked_clients(), 2);
        limits.housekeeping();
    }

    #[test]
    fn first_matching_limit_applies_and_unknown_sources_skip_empty_selectors() {
        let limits = Limits::compile(&[
            limit("team-a-tunnels-only", Some("a"), None, None, Some(1)),
            limit("everyone", None, Some(1.0), Some(1), Some(5)),
        ])
        .expect("valid");
        let a = identity("a");
        let b = identity("b");
        for _ in 0..10 {
            assert_eq!(
                limits.check_request(&a, ip("10.0.0.1")),
                Ok(()),
                "team a has no request limit"
            );
        }
        assert_eq!(limits.check_request(&b, ip("10.0.0.2")), Ok(()));
        assert!(limits.check_request(&b, ip("10.0.0.2")).is_err());
        for _ in 0..10 {
            assert_eq!(
                limits.check_request(&Identity::unknown(), ip("192.0.2.1")),
                Ok(())
            );
        }
        let selects_unlabelled = Limits::compile(&[RateLimitConfig {
            from: SelectorConfig {
                match_labels: BTreeMap::new(),
                match_expressions: vec![ExpressionConfig {
                    key: "team".into(),
                    operator: Operator::DoesNotExist,
                    values: vec![],
                }],
                ..Default::default()
            },
            ..limit("unlabelled", None, Some(1.0), Some(1), None)
        }])
        .expect("valid");
        assert_eq!(
            selects_unlabelled.check_request(&Identity::unknown(), ip("192.0.2.1")),
            Ok(())
        );
        assert!(
            selects_unlabelled
                .check_request(&Identity::unknown(), ip("192.0.2.1"))
                .is_err()
        );
    }

    #[test]
    fn tunnel_permits_release_on_drop_and_survive_replacement() {
        let cfg = [limit("tunnels", None, None, None, Some(2))];
        let old = Limits::compile(&cfg).expect("valid");
        let id = identity("a");
        let client = ip("10.0.0.1");
        let p1 = old.acquire_tunnel(&id, client).expect("first");
        let p2 = old
            .acquire_tunnel(&id, ip("::ffff:10.0.0.1"))
            .expect("second");
        let err = old.acquire_tunnel(&id, client).expect_err("third");
        assert_eq!((err.kind, err.retry_after_secs()), (LimitKind::Tunnels, 1));
        assert!(
            old.acquire_tunnel(&id, ip("10.0.0.2")).is_ok(),
            "other clients unaffected"
        );
        drop(p1);
        let p3 = old.acquire_tunnel(&id, client).expect("slot freed");
        assert_eq!(old.open_tunnels(&id, client), 2);

        // A reload: the successor inherits the counts, permits release into the shared table.
        let new = Limits::compile(&cfg).expect("valid").inherit(&old);
        drop(old);
        assert!(new.acquire_tunnel(&id, client).is_err(), "still two open");
        drop(p2);
        let p4 = new
            .acquire_tunnel(&id, client)
            .expect("released into the shared table");
        drop((p3, p4));
        assert_eq!(new.open_tunnels(&id, client), 0);

        // Without inherit, old permits still release into the Limits that issued them.
        let fresh = Limits::compile(&cfg).expect("valid");
        let p5 = new.acquire_tunnel(&id, client).expect("old limits");
        assert_eq!(fresh.open_tunnels(&id, client), 0);
        drop(new);
        drop(p5);
    }

    #[test]
    fn no_tunnel_limit_gives_unlimited_permits() {
        let limits = Limits::compile(&[limit("rate", None, Some(5.0), None, None)]).expect("valid");
        let permits: Vec<_> = (0..100)
            .map(|_| {
                limits
                    .acquire_tunnel(&identity("a"), ip("10.0.0.1"))
                    .expect("unlimited")
            })
            .collect();
        assert_eq!(permits.len(), 100);
        assert!(Limits::default().is_empty());
        let _ = TunnelPermit::unlimited();
    }

    #[test]
    fn inherit_keeps_request_state_when_quota_unchanged() {
        let cfg = [limit("r", None, Some(1.0), Some(1), None)];
        let old = Limits::compile(&cfg).expect("valid");
        let id = identity("a");
        assert!(old.check_request(&id, ip("10.0.0.1")).is_ok());
        let same = Limits::compile(&cfg).expect("valid").inherit(&old);
        assert!(same.check_request(&id, ip("10.0.0.1")).is_err());
        let changed = Limits::compile(&[limit("r", None, Some(2.0), Some(1), None)])
            .expect("valid")
            .inherit(&old);
        assert!(changed.check_request(&id, ip("10.0.0.1")).is_ok());
    }

    #[test]
    fn config_errors_name_key_and_value() {
        let cases: Vec<(Vec<RateLimitConfig>, &str)> = vec![
            (
                vec![limit("x", None, Some(0.0), None, None)],
                "rate_limits[0].requests_per_second: requests_per_second must be a positive number of at most 1e9, got 0.0",
            ),
            (
                vec![limit("x", None, Some(-1.0), None, None)],
                "rate_limits[0].requests_per_second: requests_per_second must be a positive number of at most 1e9, got -1.0",
            ),
            (
                vec![limit("x", None, Some(f64::NAN), None, None)],
                "rate_limits[0].requests_per_second: requests_per_second must be a positive number of at most 1e9, got NaN",
            ),
            (
                vec![limit("x", None, Some(1e-300), None, None)],
                "rate_limits[0].requests_per_second: requests_per_second must be a positive number of at most 1e9, got 1e-300",
            ),
            (
                vec![limit("x", None, Some(1.0), Some(0), None)],
                "rate_limits[0].burst: burst must be at least 1, got 0",
            ),
            (
                vec![limit("x", None, None, Some(5), Some(1))],
                "rate_limits[0].burst: burst 5 is set without requests_per_second",
            ),
            (
                vec![limit("x", None, None, None, None)],
                "rate_limits[0]: sets neither requests_per_second nor max_tunnels",
            ),
            (
                vec![limit("", None, None, None, Some(1))],
                "rate_limits[0].name: invalid name \"\"",
            ),
            (
                vec![
                    limit("x", None, None, None, Some(1)),
                    limit("x", None, None, None, Some(1)),
                ],
                "rate_limits[1].name: duplicate rate limit name \"x\" (first at rate_limits[0])",
            ),
            (
                vec![limit("x", Some("-bad"), None, None, Some(1))],
                "rate_limits[0].from.match_labels: invalid value \"-bad\"",
            ),
        ];
        for (cfgs, want) in cases {
            let err = Limits::compile(&cfgs).expect_err(want).to_string();
            assert!(err.starts_with(want), "{err}\n  wanted {want}");
        }
        assert!(Limits::compile(&[limit("tiny", None, Some(0.001), None, None)]).is_ok());
        assert!(Limits::compile(&[limit("huge", None, Some(1e9), None, None)]).is_ok());
    }
}
