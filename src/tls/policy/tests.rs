//! The tunnel TLS decision, table-driven over modes, CONNECT hosts, server names and rule options.

use super::*;
use crate::acl::{AclConfig, normalize_host};
use crate::config::Config;
use crate::error::ErrorKind;
use crate::tls::client_hello::Invalid;

const RULES: &str = r#"
[[sources]]
name = "pods"
cidr = "10.1.0.0/16"
labels = { team = "a" }

[[rules]]
name = "no-pastebin"
action = "deny"
to = { domains = ["pastebin.com"] }

[[rules]]
name = "github"
action = "allow"
to = { domains = ["github.com", "*.github.com"] }

[[rules]]
name = "no-sni-ok"
action = "allow"
to = { domains = ["nosni.example"], allow_missing_sni = true }

[[rules]]
name = "anything-goes"
action = "allow"
to = { domains = ["ssh.example"], protocol = "any" }

[[rules]]
name = "trial"
action = "report"
to = { domains = ["report.example"] }

[[rules]]
name = "test-net"
action = "allow"
to = { cidrs = ["203.0.113.0/24"] }

[[rules]]
name = "everything"
action = "allow"
to = { domains = ["*"] }
"#;

struct Fixture {
    policy: Policy,
    config: Config,
}

fn fixture(tls: &str) -> Fixture {
    let config = Config::from_toml(&format!("{RULES}\n[tls]\n{tls}\n")).expect("valid config");
    let policy = Policy::compile(&AclConfig {
        sources: &config.sources,
        rules: &config.rules,
        destinations: &config.destinations,
    })
    .expect("valid policy");
    Fixture { policy, config }
}

fn host(s: &str) -> Host {
    normalize_host(s).expect("host")
}

fn hello_for(sni: Option<&str>, ech: bool) -> HelloOutcome {
    HelloOutcome::Hello(ClientHello {
        server_name: sni.map(host),
        alpn: vec!["h2".into()],
        ech,
    })
}

impl Fixture {
    /// The check for a client in `pods` that CONNECTed to `target:443` and then sent `outcome`.
    fn check(&self, target: &str, outcome: &HelloOutcome) -> (TlsCheck, Option<String>) {
        let tls = TlsPolicy::compile(&self.config.tls, &self.config.destinations.connect_ports)
            .expect("tls");
        let identity = self.policy.identify("10.1.2.3".parse().expect("ip"));
        let target = host(target);
        let method = http::Method::CONNECT;
        let decision = self.policy.authorize(
            &identity,
            &Destination {
                host: &target,
                port: 443,
                method: &method,
                protocol: Protocol::Connect,
            },
        );
        assert!(decision.is_allowed(), "{target}: {decision}");
        let tunnel = Tunnel {
            policy: &self.policy,
            identity: &identity,
            decision: &decision,
            host: &target,
            port: 443,
        };
        (
            tls.check(&tunnel, outcome),
            decision.rule.map(|r| r.to_string()),
        )
    }
}

#[test]
fn decisions_by_mode_host_name_and_rule() {
    use TlsReason::*;
    use Verdict::{Allow as A, Deny as D, Report as R};
    let some = |s| hello_for(Some(s), false);
    let none = hello_for(None, false);
    let ech = |s| hello_for(Some(s), true);
    let cases: &[(&str, &str, HelloOutcome, Verdict, TlsReason)] = &[
        // exact
        ("", "api.github.com", some("api.github.com"), A, Exact),
        ("", "api.github.com", some("API.GitHub.com."), A, Exact),
        (
            "",
            "api.github.com",
            some("evil.github.com"),
            D,
            SniMismatch,
        ),
        ("", "api.github.com", some("pastebin.com"), D, SniMismatch),
        ("", "api.github.com", none.clone(), D, SniMissing),
        ("", "nosni.example", none.clone(), A, MissingSniAllowed),
        ("", "nosni.example", some("other.example"), D, SniMismatch),
        ("", "api.github.com", HelloOutcome::NotTls, D, NotTls),
        (
            "",
            "api.github.com",
            HelloOutcome::Invalid(Invalid::Body),
            D,
            ClientHelloInvalid,
        ),
        (
            "",
            "api.github.com",
            HelloOutcome::Timeout,
            D,
            ClientHelloTimeout,
        ),
        ("", "api.github.com", HelloOutcome::Closed, A, ClientClosed),
        ("", "api.github.com", ech("api.github.com"), D, EchDenied),
        (
            "",
            "api.github.com",
            ech("cloudflare-ech.com"),
            D,
            SniMismatch,
        ),
        // protocol = "any": whatever is not a failing ClientHello passes
        ("", "ssh.example", HelloOutcome::NotTls, A, AnyProtocol),
        ("", "ssh.example", HelloOutcome::Timeout, A, AnyProtocol),
        ("", "ssh.example", HelloOutcome::FarEndFirst, A, AnyProtocol),
        ("", "ssh.example", HelloOutcome::Closed, A, AnyProtocol),
        ("", "ssh.example", some("ssh.example"), A, Exact),
        ("", "ssh.example", some("evil.example"), D, SniMismatch),
        // report rules let failures through, as report
        ("", "report.example", some("evil.example"), R, SniMismatch),
        ("", "report.example", HelloOutcome::NotTls, R, NotTls),
        ("", "report.example", some("report.example"), A, Exact),
        // an address is never upgraded by a name
        ("", "203.0.113.7", none.clone(), A, IpLiteral),
        ("", "203.0.113.7", some("203.0.113.7"), A, IpLiteral),
        ("", "203.0.113.7", some("203.0.113.8"), D, SniMismatch),
        ("", "203.0.113.7", some("github.com"), D, SniMismatch),
        (
            "sni = \"same-rule\"",
            "203.0.113.7",
            some("github.com"),
            D,
            SniMismatch,
        ),
        ("sni = \"off\"", "203.0.113.7", some("github.com"), A, Off),
        // same-rule: covered by the deciding rule and not denied earlier
        (
            "sni = \"same-rule\"",
            "api.github.com",
            some("evil.github.com"),
            A,
            SameRule,
        ),
        (
            "sni = \"same-rule\"",
            "api.github.com",
            some("github.com"),
            A,
            SameRule,
        ),
        (
            "sni = \"same-rule\"",
            "api.github.com",
            some("example.org"),
            D,
            SniMismatch,
        ),
        (
            "sni = \"same-rule\"",
            "example.org",
            some("other.org"),
            A,
            SameRule,
        ),
        (
            "sni = \"same-rule\"",
            "example.org",
            some("pastebin.com"),
            D,
            SniMismatch,
        ),
        (
            "sni = \"same-rule\"",
            "example.org",
            none.clone(),
            D,
            SniMissing,
        ),
        // off: the name is not looked at; not-TLS and ECH still decide
        (
            "sni = \"off\"",
            "api.github.com",
            some("pastebin.com"),
            A,
            Off,
        ),
        ("sni = \"off\"", "api.github.com", none.clone(), A, Off),
        (
            "sni = \"off\"",
            "api.github.com",
            HelloOutcome::NotTls,
            D,
            NotTls,
        ),
        (
            "sni = \"off\"",
            "api.github.com",
            ech("x.example"),
            D,
            EchDenied,
        ),
        // ech = "allow": the outer name still has to pass
        (
            "ech = \"allow\"",
            "api.github.com",
            ech("api.github.com"),
            A,
            Exact,
        ),
        (
            "ech = \"allow\"",
            "api.github.com",
            ech("cloudflare-ech.com"),
            D,
            SniMismatch,
        ),
    ];
    for (tls, target, outcome, verdict, reason) in cases {
        let (got, rule) = fixture(tls).check(target, outcome);
        assert_eq!(
            (got.verdict, got.reason),
            (*verdict, *reason),
            "[tls] {tls:?}, CONNECT {target} (rule {rule:?}), {outcome:?}"
        );
    }
}

#[test]
fn kinds_for_the_log_and_closing() {
    let pass = TlsCheck {
        verdict: Verdict::Allow,
        reason: TlsReason::Exact,
    };
    assert_eq!((pass.closes(), pass.error_kind()), (false, None));
    let deny = TlsCheck {
        verdict: Verdict::Deny,
        reason: TlsReason::SniMismatch,
    };
    assert_eq!(
        (deny.closes(), deny.error_kind()),
        (true, Some(ErrorKind::SniMismatch))
    );
    let report = TlsCheck {
        verdict: Verdict::Report,
        reason: TlsReason::NotTls,
    };
    assert_eq!((report.closes(), report.error_kind()), (false, None));
    let gone = TlsCheck {
        verdict: Verdict::Allow,
        reason: TlsReason::ClientClosed,
    };
    assert_eq!(
        (gone.closes(), gone.error_kind()),
        (true, Some(ErrorKind::ClientAborted))
    );
    let labels: Vec<&str> = TlsReason::ALL.iter().map(|r| r.as_str()).collect();
    let mut unique = labels.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), labels.len());
    for (i, reason) in TlsReason::ALL.iter().enumerate() {
        assert_eq!(reason.index(), i);
        // A failure's log kind is spelled as its metric result.
        assert_eq!(
            reason.error_kind().map(|k| k.as_str()),
            reason.is_failure().then(|| reason.as_str())
        );
    }
}

#[test]
fn rule_options_are_config_errors_where_they_mean_nothing() {
    for (to, key) in [
        (
            r#"action = "deny"
to = { domains = ["a.example"], allow_missing_sni = true }"#,
            "rules[0].to.allow_missing_sni: has no effect on a deny rule",
        ),
        (
            r#"action = "allow"
to = { domains = ["a.example"], protocol = "http", allow_missing_sni = true }"#,
            "rules[0].to.allow_missing_sni: has no effect with protocol = \"http\"",
        ),
    ] {
        let config = Config::from_toml(&format!("[[rules]]\nname = \"r\"\n{to}\n")).expect("toml");
        let err = Policy::compile(&AclConfig {
            sources: &config.sources,
            rules: &config.rules,
            destinations: &config.destinations,
        })
        .expect_err("no effect");
        assert!(err.to_string().starts_with(key), "{err}");
    }
    let config = Config::from_toml(
        "[[rules]]\nname = \"r\"\naction = \"allow\"\nto = { protocol = \"tcp\" }\n",
    );
    assert!(config.is_err(), "unknown protocol");
}
