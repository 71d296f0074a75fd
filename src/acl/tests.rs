//! Policy-level tests: config through the `config` crate (TOML), decisions, errors, explain, index equivalence.

use std::collections::BTreeMap;
use std::net::IpAddr;

use http::Method;
use serde::{Deserialize, Serialize};

use super::rules::SourceView;
use super::*;

/// The ACL part of the core's config, as the core deserialises it.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Whole {
    #[serde(default)]
    sources: Vec<SourceEntry>,
    #[serde(default)]
    rules: Vec<RuleConfig>,
    #[serde(default)]
    destinations: DestinationsConfig,
    #[serde(default)]
    rate_limits: Vec<RateLimitConfig>,
}

fn load(toml: &str) -> Result<Whole, String> {
    ::config::Config::builder()
        .add_source(::config::File::from_str(toml, ::config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize::<Whole>())
        .map_err(|e| e.to_string())
}

fn compile(toml: &str) -> Result<Policy, String> {
    let whole = load(toml)?;
    Policy::compile(&AclConfig {
        sources: &whole.sources,
        rules: &whole.rules,
        destinations: &whole.destinations,
    })
    .map_err(|e| e.to_string())
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// Decides `METHOD target` from `client` like the core would: normalise, identify, authorize.
fn decide(policy: &Policy, client: &str, method: &str, host: &str, port: u16) -> Decision {
    let host = normalize_host(host).expect("valid host");
    let method = Method::from_bytes(method.as_bytes()).expect("method");
    let protocol = if method == Method::CONNECT {
        Protocol::Connect
    } else {
        Protocol::Http
    };
    let dst = Destination {
        host: &host,
        port,
        method: &method,
        protocol,
    };
    policy.authorize(&policy.identify(ip(client)), &dst)
}

const SEED_LIKE: &str = r#"
[destinations]
cluster_cidrs = ["10.96.0.0/12"]

[[sources]]
name = "local"
cidr = "127.0.0.0/8"
labels = { network-access-external-ips = "true" }

[[sources]]
name = "processing"
cidrs = ["10.244.1.0/24", "fd00:1::/64"]
labels = { pod-type = "processing-container", namespace = "project-x" }

[[sources]]
name = "ctp"
cidr = "10.244.2.0/24"
labels = { network-access-ctp = true, namespace = "services" }

[[sources]]
name = "team-b"
cidr = "10.244.3.0/24"
labels = { team = "b" }

[[rules]]
name = "deny-evil"
action = "deny"
to = { domains = ["evil.example", "*.evil.example"] }

[[rules]]
name = "report-new-api"
action = "report"
from = { match_labels = { team = "b" } }
to = { domains = ["api.*.example.net"] }

[[rules]]
name = "processing-to-opensearch"
action = "allow"
from = { match_labels = { pod-type = "processing-container" } }
to = { domains = ["opensearch.services.svc.cluster.local"], ports = [9200], protocol = "http", methods = ["GET", "post"] }
allow_cidrs = ["10.96.0.0/16"]

[[rules]]
name = "ctp-internal-ip"
action = "allow"
from = { match_expressions = [{ key = "network-access-ctp", operator = "In", values = ["true"] }] }
to = { cidrs = ["10.96.7.0/24"], ports = ["8080-8090"] }
allow_cidrs = ["10.96.7.0/24"]

[[rules]]
name = "external"
action = "allow"
from = { matchLabels = { network-access-external-ips = "true" } }
"#;

#[test]
fn decisions_for_the_seed_like_policy() {
    let policy = compile(SEED_LIKE).expect("valid config");
    assert_eq!((policy.source_count(), policy.rule_count()), (5, 5));
    use Reason::*;
    use Verdict::*;
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a str,
        u16,
        Verdict,
        Reason,
        Option<&'a str>,
    );
    let cases: &[Case] = &[
        (
            "127.0.0.2",
            "CONNECT",
            "example.com",
            443,
            Allow,
            Rule,
            Some("external"),
        ),
        (
            "::ffff:127.0.0.2",
            "CONNECT",
            "Example.COM.",
            443,
            Allow,
            Rule,
            Some("external"),
        ),
        (
            "127.0.0.2",
            "CONNECT",
            "example.com",
            22,
            Deny,
            PortNotAllowed,
            None,
        ),
        (
            "127.0.0.2",
            "CONNECT",
            "example.com",
            80,
            Deny,
            PortNotAllowed,
            None,
        ),
        (
            "127.0.0.2",
            "GET",
            "example.com",
            80,
            Allow,
            Rule,
            Some("external"),
        ),
        (
            "127.0.0.2",
            "GET",
            "example.com",
            8080,
            Allow,
            Rule,
            Some("external"),
        ),
        (
            "127.0.0.2",
            "GET",
            "example.com",
            25,
            Deny,
            PortNotAllowed,
            None,
        ),
        (
            "127.0.0.2",
            "GET",
            "example.com",
            1024,
            Deny,
            PortNotAllowed,
            None,
        ),
        (
            "127.0.0.2",
            "CONNECT",
            "www.evil.example",
            443,
            Deny,
            Rule,
            Some("deny-evil"),
        ),
        (
            "127.0.0.2",
            "CONNECT",
            "evil.example",
            8443,
            Deny,
            Rule,
            Some("deny-evil"),
        ),
        (
            "127.0.0.2",
            "GET",
            "a.b.EVIL.example.",
            80,
            Deny,
            Rule,
            Some("deny-evil"),
        ),
        (
            "127.0.0.2",
            "CONNECT",
            "notevil.example",
            443,
            Allow,
            Rule,
            Some("external"),
        ),
        (
            "127.0.0.2",
            "CONNECT",
            "8.8.8.8",
            443,
            Allow,
            Rule,
            Some("external"),
        ),
        (
            "127.0.0.2",
            "CONNECT",
            "127.0.0.1",
            443,
            Deny,
            InternalDestination,
            Some("external"),
        ),
        (
            "127.0.0.2",
            "CONNECT",
            "2130706433",
            443,
            Deny,
            InternalDestination,
            Some("external"),
        ),
        (
            "127.0.0.2",
            "CONNECT",
            "0x7f.1",
            443,
            Deny,
            InternalDestination,
            Some("external"),
        ),
        (
            "127.0.0.2",
            "GET",
            "0177.0.0.1",
            80,
            Deny,
            InternalDestination,
            Some("external"),
        ),
        (
            "127.0.0.2",
            "GET",
            "%31%32%37.1",
            80,
            Deny,
            InternalDestination,
            Some("external"),
        ),
        (
            "127.0.0.2",
            "CONNECT",
            "::ffff:127.0.0.1",
            443,
            Deny,
            InternalDestination,
            Some("external"),
        ),
        (
            "127.0.0.2",
            "CONNECT",
            "[::1]",
            443,
            Deny,
            InternalDestination,
            Some("external"),
        ),
        (
            "127.0.0.2",
            "CONNECT",
            "64:ff9b::a9fe:a9fe",
            443,
            Deny,
            InternalDestination,
            Some("external"),
        ),
        (
            "127.0.0.2",
            "CONNECT",
            "169.254.169.254",
            443,
            Deny,
            InternalDestination,
            Some("external"),
        ),
        (
            "127.0.0.2",
            "CONNECT",
            "10.96.0.1",
            443,
            Deny,
            InternalDestination,
            Some("external"),
        ),
        (
            "10.244.3.5",
            "CONNECT",
            "api.eu.example.net",
            443,
            Report,
            Rule,
            Some("report-new-api"),
        ),
        (
            "10.244.3.5",
            "CONNECT",
            "api.example.net",
            443,
            Deny,
            DefaultDeny,
            None,
        ),
        (
            "10.244.3.5",
            "CONNECT",
            "example.com",
            443,
            Deny,
            DefaultDeny,
            None,
        ),
        (
            "10.244.3.5",
            "CONNECT",
            "example.com",
            22,
            Deny,
            PortNotAllowed,
            None,
        ),
        (
            "10.244.3.5",
            "CONNECT",
            "api.evil.example",
            443,
            Deny,
            Rule,
            Some("deny-evil"),
        ),
        (
            "10.244.1.9",
            "GET",
            "opensearch.services.svc.cluster.local",
            9200,
            Allow,
            Rule,
            Some("processing-to-opensearch"),
        ),
        (
            "10.244.1.9",
            "POST",
            "opensearch.services.svc.cluster.local.",
            9200,
            Allow,
            Rule,
            Some("processing-to-opensearch"),
        ),
        (
            "10.244.1.9",
            "DELETE",
            "opensearch.services.svc.cluster.local",
            9200,
            Deny,
            DefaultDeny,
            None,
        ),
        (
            "10.244.1.9",
            "CONNECT",
            "opensearch.services.svc.cluster.local",
            9200,
            Deny,
            PortNotAllowed,
            None,
        ),
        (
            "10.244.1.9",
            "GET",
            "opensearch.services.svc.cluster.local",
            9300,
            Deny,
            DefaultDeny,
            None,
        ),
        (
            "fd00:1::5",
            "GET",
            "opensearch.services.svc.cluster.local",
            9200,
            Allow,
            Rule,
            Some("processing-to-opensearch"),
        ),
        (
            "10.244.2.7",
            "CONNECT",
            "10.96.7.5",
            8080,
            Allow,
            Rule,
            Some("ctp-internal-ip"),
        ),
        (
            "10.244.2.7",
            "CONNECT",
            "::ffff:10.96.7.5",
            8090,
            Allow,
            Rule,
            Some("ctp-internal-ip"),
        ),
        (
            "10.244.2.7",
            "CONNECT",
            "10.96.7.5",
            8091,
            Deny,
            PortNotAllowed,
            None,
        ),
        (
            "10.244.2.7",
            "CONNECT",
            "10.96.8.5",
            8080,
            Deny,
            PortNotAllowed,
            None,
        ),
        (
            "10.244.2.7",
            "CONNECT",
            "example.com",
            443,
            Deny,
            DefaultDeny,
            None,
        ),
        (
            "192.0.2.1",
            "CONNECT",
            "example.com",
            443,
            Deny,
            UnknownSource,
            None,
        ),
        (
            "10.244.4.1",
            "GET",
            "example.com",
            80,
            Deny,
            UnknownSource,
            None,
        ),
    ];
    for &(client, method, host, port, verdict, reason, rule) in cases {
        let d = decide(&policy, client, method, host, port);
        let what = format!("{client} {method} {host}:{port} → {d}");
        assert_eq!(
            (d.verdict, d.reason, d.rule.as_deref()),
            (verdict, reason, rule),
            "{what}"
        );
        assert_eq!(d.is_allowed(), matches!(verdict, Allow | Report), "{what}");
        assert_eq!(
            d.denied_address.is_some(),
            reason == InternalDestination,
            "{what}"
        );
    }
}

#[test]
fn check_address_uses_the_deciding_rules_allow_cidrs() {
    let policy = compile(SEED_LIKE).expect("valid config");
    let opensearch = decide(
        &policy,
        "10.244.1.9",
        "GET",
        "opensearch.services.svc.cluster.local",
        9200,
    );
    let external = decide(&policy, "127.0.0.2", "CONNECT", "example.com", 443);
    let cases = [
        (&opensearch, "10.96.0.10", None),
        (&opensearch, "10.96.255.255", None),
        (&opensearch, "::ffff:10.96.0.10", None),
        (&opensearch, "64:ff9b::a60:a", None),
        (&opensearch, "10.97.0.1", Some("10.96.0.0/12")),
        (&opensearch, "127.0.0.1", Some("127.0.0.0/8")),
        (&opensearch, "93.184.215.14", None),
        (&external, "10.96.0.10", Some("10.96.0.0/12")),
        (&external, "10.1.1.1", Some("10.0.0.0/8")),
        (&external, "::ffff:169.254.169.254", Some("169.254.0.0/16")),
        (&external, "93.184.215.14", None),
        (&external, "2606:2800:220:1::1", None),
    ];
    for (decision, addr, want) in cases {
        let got = policy
            .check_address(decision, ip(addr))
            .err()
            .map(|d| d.range.to_string());
        assert_eq!(got.as_deref(), want, "{addr} under {decision}");
    }
    let err = policy
        .check_address(&external, ip("10.96.0.10"))
        .expect_err("cluster");
    assert!(err.to_string().contains("NO_PROXY"));
}

#[test]
fn error_kinds() {
    let policy = compile(SEED_LIKE).expect("valid config");
    let cases = [
        (("127.0.0.2", "CONNECT", "example.com", 443), None),
        (("10.244.3.5", "CONNECT", "api.eu.example.net", 443), None),
        (
            ("192.0.2.1", "CONNECT", "example.com", 443),
            Some("unknown-source"),
        ),
        (
            ("127.0.0.2", "CONNECT", "example.com", 22),
            Some("port-not-allowed"),
        ),
        (
            ("127.0.0.2", "CONNECT", "127.1", 443),
            Some("internal-destination"),
        ),
        (
            ("127.0.0.2", "CONNECT", "evil.example", 443),
            Some("denied"),
        ),
        (
            ("10.244.3.5", "CONNECT", "example.com", 443),
            Some("denied"),
        ),
    ];
    for ((client, method, host, port), want) in cases {
        let d = decide(&policy, client, method, host, port);
        assert_eq!(d.error_kind().map(|k| k.as_str()), want, "{d}");
    }
    let kinds: Vec<&str> = Reason::ALL.iter().map(Reason::as_str).collect();
    assert_eq!(
        kinds,
        [
            "rule",
            "default-deny",
            "unknown-source",
            "port-not-allowed",
            "internal-destination"
        ]
    );
    assert_eq!(
        [Verdict::Allow, Verdict::Deny, Verdict::Report].map(|v| v.as_str()),
        ["allow", "deny", "report"]
    );
    assert_eq!(
        [Protocol::Connect, Protocol::Http].map(|p| p.as_str()),
        ["connect", "http"]
    );
}

#[test]
fn first_match_wins_in_order() {
    let base = r#"
[destinations]
denied_cidrs = []
[[sources]]
cidr = "10.0.0.0/8"
labels = { team = "a" }
"#;
    let rules = |order: &[&str]| {
        let all: BTreeMap<&str, &str> = [
            ("allow-all", "[[rules]]\nname = \"allow-all\"\naction = \"allow\"\n"),
            ("deny-x", "[[rules]]\nname = \"deny-x\"\naction = \"deny\"\nto = { domains = [\"x.example\"] }\n"),
            ("report-team", "[[rules]]\nname = \"report-team\"\naction = \"report\"\nfrom = { match_labels = { team = \"a\" } }\n"),
            ("deny-other-team", "[[rules]]\nname = \"deny-other-team\"\naction = \"deny\"\nfrom = { match_labels = { team = \"b\" } }\n"),
        ]
        .into();
        let body: String = order.iter().map(|r| all[r]).collect();
        compile(&format!("{base}{body}")).expect("valid")
    };
    let cases: &[(&[&str], &str, &str)] = &[
        (&["allow-all", "deny-x"], "x.example", "allow-all"),
        (&["deny-x", "allow-all"], "x.example", "deny-x"),
        (&["deny-x", "allow-all"], "y.example", "allow-all"),
        (&["report-team", "deny-x"], "x.example", "report-team"),
        (
            &["deny-other-team", "deny-x", "report-team"],
            "x.example",
            "deny-x",
        ),
        (
            &["deny-other-team", "report-team", "allow-all"],
            "x.example",
            "report-team",
        ),
    ];
    for (order, host, want) in cases {
        let d = decide(&rules(order), "10.1.1.1", "CONNECT", host, 443);
        assert_eq!(d.rule.as_deref(), Some(*want), "{order:?} {host}");
    }
    let none = rules(&["deny-other-team"]);
    assert_eq!(
        decide(&none, "10.1.1.1", "CONNECT", "x.example", 443).reason,
        Reason::DefaultDeny
    );
}

#[test]
fn unknown_sources_when_allowed_have_no_labels() {
    let policy = compile(
        r#"
[destinations]
unknown_source = "allow"
[[sources]]
cidr = "10.0.0.0/8"
labels = { team = "a" }
[[rules]]
name = "everyone-known"
action = "allow"
to = { domains = ["known.example"] }
[[rules]]
name = "unlabelled"
action = "allow"
from = { match_expressions = [{ key = "team", operator = "DoesNotExist" }] }
to = { domains = ["open.example"] }
"#,
    )
    .expect("valid");
    assert_eq!(policy.unknown_source(), UnknownSource::Allow);
    let cases = [
        ("10.0.0.1", "known.example", Some("everyone-known")),
        ("10.0.0.1", "open.example", None),
        ("192.0.2.1", "known.example", None),
        ("192.0.2.1", "open.example", Some("unlabelled")),
    ];
    for (client, host, want) in cases {
        let d = decide(&policy, client, "CONNECT", host, 443);
        assert_eq!(d.rule.as_deref(), want, "{client} {host}: {d}");
        assert_ne!(d.reason, Reason::UnknownSource);
    }
}

#[test]
fn default_destinations_and_ports_apply_without_a_section() {
    let policy = compile(
        r#"
[[sources]]
cidr = "0.0.0.0/0"
[[rules]]
name = "all"
action = "allow"
"#,
    )
    .expect("valid");
    let cases = [
        ("CONNECT", "example.com", 443, Reason::Rule),
        ("CONNECT", "example.com", 8443, Reason::PortNotAllowed),
        ("GET", "example.com", 21, Reason::Rule),
        ("GET", "example.com", 777, Reason::Rule),
        ("GET", "example.com", 778, Reason::PortNotAllowed),
        ("GET", "example.com", 65535, Reason::Rule),
        ("GET", "192.168.0.1", 80, Reason::InternalDestination),
        ("GET", "100.64.0.1", 80, Reason::InternalDestination),
        ("GET", "100.128.0.1", 80, Reason::Rule),
    ];
    for (method, host, port, want) in cases {
        assert_eq!(
            decide(&policy, "203.0.113.9", method, host, port).reason,
            want,
            "{method} {host}:{port}"
        );
    }
}

#[test]
fn config_errors_name_the_key_and_the_value() {
    let rule = |to: &str| {
        format!(
            "[[rules]]\nname = \"a\"\naction = \"allow\"\n[[rules]]\nname = \"b\"\naction = \"allow\"\n[[rules]]\nname = \"c\"\naction = \"allow\"\n{to}\n"
        )
    };
    let cases: Vec<(String, &str)> = vec![
        (rule("to = { ports = [\"443\", \"90-80\"] }"), "rules[2].to.ports: invalid port range \"90-80\""),
        (rule("to = { ports = [0] }"), "rules[2].to.ports: invalid port \"0\""),
        (rule("to = { ports = [70000] }"), "rules[2].to.ports: invalid port \"70000\""),
        (rule("to = { domains = [\"ok.example\", \"ex*.com\"] }"), "rules[2].to.domains[1]: invalid domain pattern \"ex*.com\": `*` must be a whole label"),
        (rule("to = { domains = [\".example.com\"] }"), "rules[2].to.domains[0]: invalid domain pattern \".example.com\": a leading dot is ambiguous"),
        (rule("to = { domains = [\"10.0.0.1\"] }"), "rules[2].to.domains[0]: invalid domain pattern \"10.0.0.1\": looks like an address"),
        (rule("to = { methods = [\"GE T\"] }"), "rules[2].to.methods[0]: invalid method \"GE T\""),
        (rule("to = { cidrs = [\"10.0.0.1/8\"] }"), "rules[2].to.cidrs[0]: 10.0.0.1/8 has host bits set (did you mean 10.0.0.0/8?)"),
        (rule("allow_cidrs = [\"fd00::1/64\"]"), "rules[2].allow_cidrs[0]: fd00::1/64 has host bits set (did you mean fd00::/64?)"),
        (rule("from = { match_labels = { \"Bad Key\" = \"x\" } }"), "rules[2].from.match_labels: invalid label key \"Bad Key\""),
        (
            rule("from = { match_expressions = [{ key = \"team\", operator = \"In\" }] }"),
            "rules[2].from.match_expressions[0].values: operator In needs at least one value, got []",
        ),
        (
            "[[rules]]\nname = \"a\"\naction = \"allow\"\n[[rules]]\nname = \"a\"\naction = \"deny\"\n".into(),
            "rules[1].name: duplicate rule name \"a\" (first at rules[0])",
        ),
        ("[[rules]]\nname = \"\"\naction = \"allow\"\n".into(), "rules[0].name: invalid name \"\""),
        ("[destinations]\ndenied_cidrs = [\"10.0.0.0/8\", \"192.168.1.1/16\"]\n".into(), "destinations.denied_cidrs[1]: 192.168.1.1/16 has host bits set"),
        ("[destinations]\ncluster_cidrs = [\"10.96.0.1/12\"]\n".into(), "destinations.cluster_cidrs[0]: 10.96.0.1/12 has host bits set"),
        ("[destinations]\nconnect_ports = [443, \"x\"]\n".into(), "destinations.connect_ports: invalid port \"x\""),
        ("[destinations]\nhttp_ports = [\"1025-65536\"]\n".into(), "destinations.http_ports: invalid port range \"1025-65536\""),
        ("[[sources]]\ncidr = \"10.0.0.0/8\"\nlabels = { team = \"a b\" }\n".into(), "sources[0].labels: invalid value \"a b\" for label \"team\""),
        ("[[sources]]\ncidr = \"10.0.0.0/8\"\n[[sources]]\ncidrs = [\"10.0.0.0/8\"]\n".into(), "sources[1].cidrs[0]: duplicate source prefix \"10.0.0.0/8\" (first at sources[0])"),
    ];
    for (toml, want) in cases {
        let err = match compile(&toml) {
            Ok(_) => panic!("accepted, wanted {want}:\n{toml}"),
            Err(e) => e,
        };
        assert!(err.starts_with(want), "{err}\n  wanted {want}");
    }
}

#[test]
fn unknown_fields_and_bad_enums_are_rejected_by_serde() {
    let cases = [
        (
            "[[rules]]\nname = \"a\"\naction = \"allow\"\nto = { domain = [\"x\"] }\n",
            "domain",
        ),
        ("[[rules]]\nname = \"a\"\naction = \"permit\"\n", "permit"),
        (
            "[[rules]]\nname = \"a\"\naction = \"allow\"\nfrom = { match_expressions = [{ key = \"k\", operator = \"in\" }] }\n",
            "in",
        ),
        (
            "[[rules]]\nname = \"a\"\naction = \"allow\"\nto = { protocol = \"ftp\" }\n",
            "ftp",
        ),
        ("[destinations]\nunknown_source = \"maybe\"\n", "maybe"),
        ("[destinations]\ndenied = []\n", "denied"),
        (
            "[[sources]]\ncidr = \"10.0.0.0/33\"\n",
            "invalid CIDR \"10.0.0.0/33\"",
        ),
        (
            "[[rules]]\nname = \"a\"\naction = \"allow\"\nto = { cidrs = [\"10.0.0.0/8\", \"ten\"] }\n",
            "invalid CIDR \"ten\"",
        ),
        (
            "[destinations]\ndenied_cidrs = [\"::1/129\"]\n",
            "invalid CIDR \"::1/129\"",
        ),
        ("[[sources]]\ncidr = \"10.0.0.0/8\"\nlabel = {}\n", "label"),
        ("[[rate_limits]]\nname = \"x\"\nrps = 5\n", "rps"),
    ];
    for (toml, needle) in cases {
        let err = load(toml).expect_err(toml);
        assert!(err.contains(needle), "{err}\n  wanted mention of {needle}");
    }
}

#[test]
fn bare_addresses_are_host_prefixes() {
    let whole = load("[[sources]]\ncidr = \"10.1.2.3\"\ncidrs = [\"fd00::5\"]\n[destinations]\nallowed_cidrs = [\"169.254.169.254\"]\n").expect("valid");
    assert_eq!(
        whole.sources[0].cidr,
        Some("10.1.2.3/32".parse().expect("net"))
    );
    assert_eq!(
        whole.sources[0].cidrs,
        vec!["fd00::5/128".parse().expect("net")]
    );
    assert_eq!(
        whole.destinations.allowed_cidrs,
        vec!["169.254.169.254/32".parse().expect("net")]
    );
}

#[test]
fn config_round_trips_through_serialize() {
    let whole = load(&format!(
        "{SEED_LIKE}\n[[rate_limits]]\nname = \"default\"\nrequests_per_second = 50\nburst = 100\nmax_tunnels = 20\n"
    ))
    .expect("valid");
    assert_eq!(whole.rate_limits[0].requests_per_second, Some(50.0));
    assert_eq!(whole.sources[2].labels["network-access-ctp"], "true");
    assert_eq!(whole.rules[2].to.ports, vec![PortSpec::from(9200)]);
    assert_eq!(whole.rules[4].from.match_labels.len(), 1);
    let json = serde_json::to_string(&whole).expect("serialize");
    let back: Whole = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, whole);
    assert!(json.contains(r#""ports":["8080-8090"]"#), "{json}");
    assert!(json.contains(r#""ports":[9200]"#), "{json}");
}

#[test]
fn sources_file_is_watched() {
    let dir = std::env::temp_dir().join(format!("kalmar-acl-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("sources.yaml");
    std::fs::write(&path, "- cidr: 10.0.0.0/8\n  labels: {team: a}\n").expect("write");
    let toml = format!(
        "[[sources]]\nfile = {:?}\n[[rules]]\nname = \"a\"\naction = \"allow\"\n",
        path.display().to_string()
    );
    let policy = compile(&toml).expect("valid");
    assert_eq!(policy.watched_files(), std::slice::from_ref(&path));
    assert_eq!(policy.identify(ip("10.1.1.1")).to_string(), "team=a");
    std::fs::write(&path, "").expect("truncate");
    let err = compile(&toml).expect_err("empty file rejected");
    assert!(err.starts_with("sources[0].file: "), "{err}");
}

#[test]
fn explain_tells_labels_rule_verdict_and_addresses() {
    let policy = compile(SEED_LIKE).expect("valid config");
    let host = Host::Name("opensearch.services.svc.cluster.local".into());
    let dst = Destination {
        host: &host,
        port: 9200,
        method: &Method::GET,
        protocol: Protocol::Http,
    };
    let text = policy.explain(ip("10.244.1.9"), &dst, &[ip("10.96.0.10"), ip("10.97.0.1")]);
    for needle in [
        "entry        sources[1] \"processing\" 10.244.1.0/24",
        "labels       namespace=project-x,pod-type=processing-container",
        "rule         rules[2] \"processing-to-opensearch\" (allow)",
        "from       pod-type=processing-container",
        "decision     allow (reason: rule, rule: processing-to-opensearch)",
        "address      10.96.0.10: ok, opened by the rule's allow_cidrs 10.96.0.0/16",
        "address      10.97.0.1: denied by destinations.cluster_cidrs 10.96.0.0/12",
        "verdict      allow (rule)",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }

    let host = Host::Name("example.com".into());
    let ssh = Destination {
        host: &host,
        port: 22,
        method: &Method::CONNECT,
        protocol: Protocol::Connect,
    };
    let text = policy.explain(ip("127.0.0.2"), &ssh, &[ip("93.184.215.14")]);
    assert!(
        text.contains("rule         none matched; port 22 is not a default connect port"),
        "{text}"
    );
    assert!(
        text.contains("verdict      deny (port-not-allowed)"),
        "{text}"
    );

    let host = Host::Name("internal.example".into());
    let dst = Destination {
        host: &host,
        port: 443,
        method: &Method::CONNECT,
        protocol: Protocol::Connect,
    };
    let text = policy.explain(ip("127.0.0.2"), &dst, &[ip("10.0.0.5"), ip("::1")]);
    assert!(
        text.contains("verdict      deny (internal-destination)"),
        "{text}"
    );
    assert!(
        text.contains("message      10.0.0.5 is in the internal range 10.0.0.0/8"),
        "{text}"
    );
    let text = policy.explain(ip("127.0.0.2"), &dst, &[]);
    assert!(text.contains("dns-failure"), "{text}");
    let text = policy.explain(ip("192.0.2.1"), &dst, &[]);
    assert!(
        text.contains("unknown source (destinations.unknown_source = deny)"),
        "{text}"
    );
    assert!(
        text.contains("verdict      deny (unknown-source)"),
        "{text}"
    );
}

/// xorshift64*: deterministic test data without a rand dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }
}

#[test]
fn indexed_first_match_equals_a_linear_scan() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let teams = ["a", "b", "c", "d"];
    let domains = [
        "x.example",
        "*.x.example",
        "api.*.example",
        "*",
        "y.example",
        "*.example",
    ];
    let cidrs = [
        "10.0.0.0/8",
        "10.1.0.0/16",
        "203.0.113.0/24",
        "::/0",
        "0.0.0.0/0",
    ];
    let mut rules = Vec::new();
    for i in 0..400 {
        let mut rule = RuleConfig {
            name: format!("r{i}"),
            action: *rng.pick(&[Action::Allow, Action::Deny, Action::Report]),
            from: SelectorConfig::default(),
            to: ToConfig::default(),
            allow_cidrs: vec![],
        };
        match rng.next() % 6 {
            0 => {}
            4 => rule.from.match_expressions.push(ExpressionConfig {
                key: rng.pick(&["team", "gpu"]).to_string(),
                operator: *rng.pick(&[Operator::Exists, Operator::DoesNotExist]),
                values: vec![],
            }),
            5 => {
                rule.from
                    .match_labels
                    .insert("team".into(), rng.pick(&teams).to_string());
                rule.from.match_expressions.push(ExpressionConfig {
                    key: "gpu".into(),
                    operator: Operator::NotIn,
                    values: vec!["false".into()],
                });
            }
            1 => {
                rule.from
                    .match_labels
                    .insert("team".into(), rng.pick(&teams).to_string());
            }
            2 => rule.from.match_expressions.push(ExpressionConfig {
                key: "team".into(),
                operator: Operator::NotIn,
                values: vec![rng.pick(&teams).to_string()],
            }),
            _ => rule.from.match_expressions.push(ExpressionConfig {
                key: "team".into(),
                operator: Operator::In,
                values: vec![rng.pick(&teams).to_string(), rng.pick(&teams).to_string()],
            }),
        }
        match rng.next() % 4 {
            0 => {}
            1 => rule.to.domains.push(rng.pick(&domains).to_string()),
            2 => rule.to.cidrs.push(rng.pick(&cidrs).parse().expect("cidr")),
            _ => {
                rule.to.domains.push(rng.pick(&domains).to_string());
                rule.to.cidrs.push(rng.pick(&cidrs).parse().expect("cidr"));
            }
        }
        if rng.next().is_multiple_of(3) {
            rule.to
                .ports
                .push(PortSpec::from(*rng.pick(&[443u16, 8443])));
        }
        if rng.next().is_multiple_of(5) {
            rule.to.protocol = Some(*rng.pick(&[RuleProtocol::Connect, RuleProtocol::Http]));
        }
        rules.push(rule);
    }
    // Labels include a value no selector names ("e") and keys none names ("zone").
    let label_sets: [&[(&str, &str)]; 7] = [
        &[("team", "a")],
        &[("team", "b"), ("gpu", "true")],
        &[("team", "c"), ("gpu", "false"), ("zone", "x")],
        &[("team", "d")],
        &[("team", "e"), ("gpu", "true")],
        &[("zone", "x")],
        &[],
    ];
    let sources: Vec<SourceEntry> = label_sets
        .iter()
        .enumerate()
        .map(|(i, pairs)| SourceEntry {
            cidr: Some(format!("10.{i}.0.0/16").parse().expect("cidr")),
            labels: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..SourceEntry::default()
        })
        .collect();
    let destinations = DestinationsConfig::default();
    let policy = Policy::compile(&AclConfig {
        sources: &sources,
        rules: &rules,
        destinations: &destinations,
    })
    .expect("valid");
    let hosts = [
        "x.example",
        "a.x.example",
        "api.v1.example",
        "y.example",
        "z.org",
        "10.1.2.3",
        "203.0.113.7",
        "::ffff:203.0.113.7",
        "2001:db8::1",
    ];
    let clients = [
        "10.0.0.1",
        "10.1.0.1",
        "10.2.0.1",
        "10.3.0.1",
        "10.4.0.1",
        "10.5.0.1",
        "10.6.0.1",
        "192.0.2.1",
    ];
    let mut matched = 0;
    for _ in 0..3000 {
        let host = normalize_host(rng.pick::<&str>(&hosts)).expect("host");
        let port = *rng.pick(&[443u16, 8443, 80]);
        let (method, protocol) = rng
            .pick(&[
                (Method::CONNECT, Protocol::Connect),
                (Method::GET, Protocol::Http),
            ])
            .clone();
        let dst = Destination {
            host: &host,
            port,
            method: &method,
            protocol,
        };
        let id = policy.identify(ip(rng.pick::<&str>(&clients)));
        let ports = policy.default_ports(protocol);
        // Reference: every rule in order, string labels, destination always checked.
        let linear = policy
            .rules
            .rules
            .iter()
            .position(|r| r.matches(SourceView::Strings(&id), &dst, ports, false));
        let indexed = policy
            .rules
            .first_match(&id, policy.generation, &dst, ports);
        assert_eq!(indexed, linear, "{id} {host}:{port} {protocol}");
        // An identity the policy did not issue takes the string path, with the same result.
        let foreign = policy
            .rules
            .first_match(&id, policy.generation + 1, &dst, ports);
        assert_eq!(foreign, linear, "foreign {id} {host}:{port} {protocol}");
        matched += usize::from(linear.is_some());
    }
    assert!(
        matched > 1000,
        "the test data should match often ({matched})"
    );
}

#[test]
fn denial_messages_reveal_only_what_was_asked() {
    let policy = compile(SEED_LIKE).expect("valid config");
    let cases = [
        (("127.0.0.2", "CONNECT", "example.com", 443), ""),
        (
            ("192.0.2.1", "CONNECT", "example.com", 443),
            "example.com:443: this client's address is not a known source",
        ),
        (
            ("127.0.0.2", "CONNECT", "example.com", 22),
            "example.com:22: this port is not allowed",
        ),
        (
            ("127.0.0.2", "CONNECT", "0x7f.1", 443),
            "0x7f.1:443: 127.0.0.1 is in the internal range 127.0.0.0/8, which this proxy does not connect to; in-cluster destinations belong in the client's NO_PROXY",
        ),
        (
            ("127.0.0.2", "CONNECT", "evil.example", 443),
            "evil.example:443: denied by the proxy's access policy",
        ),
        (
            ("10.244.3.5", "CONNECT", "example.com", 443),
            "example.com:443: denied by the proxy's access policy",
        ),
    ];
    for ((client, method, host, port), want) in cases {
        let d = decide(&policy, client, method, host, port);
        let msg = d.message(&format!("{host}:{port}"));
        assert!(msg.starts_with(want), "{msg}\n  wanted {want}");
        assert!(
            !msg.contains("deny-evil"),
            "rule names stay in the log: {msg}"
        );
    }
}

#[test]
fn shared_types_are_thread_safe() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Policy>();
    send_sync::<Identity>();
    send_sync::<Decision>();
    send_sync::<AddressDenied>();
    send_sync::<AclConfigError>();
    send_sync::<crate::limit::Limits>();
    send_sync::<crate::limit::TunnelPermit>();
}

#[test]
fn normalize_host_never_panics_and_is_idempotent() {
    let policy = compile(SEED_LIKE).expect("valid config");
    let id = policy.identify(ip("127.0.0.2"));
    let alphabet: Vec<char> = ".%0123456789abcdefxX:[]*-_ é2E".chars().collect();
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let mut accepted = 0;
    for _ in 0..20_000 {
        let len = (rng.next() % 24) as usize;
        let raw: String = (0..len).map(|_| *rng.pick(&alphabet)).collect();
        let Ok(host) = normalize_host(&raw) else {
            continue;
        };
        accepted += 1;
        if let Host::Name(name) = &host {
            assert!(
                !name.ends_with('.') && !name.contains('%'),
                "{raw:?} → {name:?}"
            );
            assert_eq!(name.to_ascii_lowercase(), *name, "{raw:?}");
        }
        assert_eq!(
            normalize_host(&host.to_string()),
            Ok(host.clone()),
            "{raw:?}"
        );
        for (method, protocol) in [
            (Method::CONNECT, Protocol::Connect),
            (Method::GET, Protocol::Http),
        ] {
            let dst = Destination {
                host: &host,
                port: 443,
                method: &method,
                protocol,
            };
            let _ = policy.authorize(&id, &dst);
            let _ = policy.explain(ip("127.0.0.2"), &dst, &[ip("127.0.0.1")]);
        }
    }
    assert!(accepted > 1000, "{accepted}");
}
