//! ACL benches: source lookup with 100k prefixes, the live pod index with 50k pods (the identify
//! stage's lookup with `[kubernetes]` on), and a full decision with 10k rules and 100k sources.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use criterion::{Criterion, criterion_group, criterion_main};
use http::Method;
use ipnet::IpNet;
use kalmar::acl::{
    AclConfig, Action, Destination, DestinationsConfig, Host, Policy, PortSpec, Protocol,
    RuleConfig, RuleProtocol, SelectorConfig, SourceEntry, ToConfig,
};

const SOURCES: usize = 100_000;
const RULES: usize = 10_000;
const NAMESPACES: usize = 1_000;

/// xorshift64*: reproducible data without a rand dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn labels(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// 100k prefixes of mixed lengths (like a cluster's pod /32s, node /24s, namespace ranges and
/// IPv6 pod /128s and /64s), each with namespace labels.
fn sources() -> Vec<SourceEntry> {
    let mut out = Vec::with_capacity(SOURCES);
    let entry = |net: IpNet, i: usize| {
        let ns = format!("ns-{}", i % NAMESPACES);
        let mut l = labels(&[("namespace", ns), ("app", format!("app-{}", i % 37))]);
        if i.is_multiple_of(10) {
            l.insert("network-access-external-ips".into(), "true".into());
        }
        SourceEntry {
            name: Some(format!("pod-{i}")),
            cidr: Some(net),
            labels: l,
            ..SourceEntry::default()
        }
    };
    for i in 0..80_000usize {
        // Pod /32s spread over 10.64.0.0/10.
        let addr = Ipv4Addr::from(0x0A40_0000u32 + (i as u32) * 7);
        out.push(entry(IpNet::new(IpAddr::V4(addr), 32).expect("prefix"), i));
    }
    for i in 0..10_000usize {
        let addr = Ipv4Addr::from(0x6440_0000u32 + ((i as u32) << 8));
        out.push(entry(IpNet::new(IpAddr::V4(addr), 24).expect("prefix"), i));
    }
    for i in 0..1_000usize {
        let addr = Ipv4Addr::from(0xAC10_0000u32 + ((i as u32) << 12));
        if addr.octets()[1] < 32 {
            out.push(entry(IpNet::new(IpAddr::V4(addr), 20).expect("prefix"), i));
        }
    }
    let mut i = 0usize;
    while out.len() < SOURCES {
        let (addr, len) = if i.is_multiple_of(2) {
            (
                Ipv6Addr::from(0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + i as u128),
                128,
            )
        } else {
            (
                Ipv6Addr::from(0xfd01_0000_0000_0000_0000_0000_0000_0000u128 + ((i as u128) << 64)),
                64,
            )
        };
        out.push(entry(IpNet::new(IpAddr::V6(addr), len).expect("prefix"), i));
        i += 1;
    }
    out.push(SourceEntry {
        cidr: Some("10.0.0.0/8".parse().expect("prefix")),
        labels: labels(&[("namespace", "cluster".into())]),
        ..SourceEntry::default()
    });
    out
}

/// 10k rules: per-namespace allows to their own services (exact and wildcard names), per-namespace
/// internal-address rules, unanchored deny lists, report rules, and a final external allow.
fn rules() -> Vec<RuleConfig> {
    let mut out = Vec::with_capacity(RULES);
    let selector = |ns: usize| SelectorConfig {
        match_labels: labels(&[("namespace", format!("ns-{ns}"))]),
        match_expressions: vec![],
        ..Default::default()
    };
    let mut i = 0;
    while out.len() < RULES - 1 {
        let ns = i % NAMESPACES;
        let rule = match i % 10 {
            0..=5 => RuleConfig {
                name: format!("ns-{ns}-svc-{i}"),
                action: Action::Allow,
                from: selector(ns),
                to: ToConfig {
                    domains: vec![
                        format!("svc-{i}.example.com"),
                        format!("*.api-{i}.example.org"),
                    ],
                    ..ToConfig::default()
                },
                allow_cidrs: vec![],
            },
            6 => RuleConfig {
                name: format!("ns-{ns}-internal-{i}"),
                action: Action::Allow,
                from: selector(ns),
                to: ToConfig {
                    domains: vec![format!("db-{i}.svc.cluster.local")],
                    ports: vec![PortSpec::from("5432"), PortSpec::from("8000-8100")],
                    protocol: Some(RuleProtocol::Connect),
                    ..ToConfig::default()
                },
                allow_cidrs: vec![format!("10.96.{}.0/24", i % 256).parse().expect("prefix")],
            },
            7 => RuleConfig {
                name: format!("deny-bad-{i}"),
                action: Action::Deny,
                from: SelectorConfig::default(),
                to: ToConfig {
                    domains: vec![
                        format!("bad-{i}.example.net"),
                        format!("*.bad-{i}.example.net"),
                    ],
                    ..ToConfig::default()
                },
                allow_cidrs: vec![],
            },
            8 => RuleConfig {
                name: format!("report-{i}"),
                action: Action::Report,
                from: selector(ns),
                to: ToConfig {
                    domains: vec![format!("api.*.partner-{i}.example")],
                    methods: vec!["GET".into(), "HEAD".into()],
                    ..ToConfig::default()
                },
                allow_cidrs: vec![],
            },
            _ => RuleConfig {
                name: format!("ns-{ns}-cidr-{i}"),
                action: Action::Allow,
                from: selector(ns),
                to: ToConfig {
                    cidrs: vec![format!("198.51.{}.0/24", i % 256).parse().expect("prefix")],
                    ..ToConfig::default()
                },
                allow_cidrs: vec![],
            },
        };
        out.push(rule);
        i += 1;
    }
    out.push(RuleConfig {
        name: "external".into(),
        action: Action::Allow,
        from: SelectorConfig {
            match_labels: labels(&[("network-access-external-ips", "true".into())]),
            match_expressions: vec![],
            ..Default::default()
        },
        to: ToConfig::default(),
        allow_cidrs: vec![],
    });
    out
}

fn policy(rules: &[RuleConfig], sources: &[SourceEntry]) -> Policy {
    let destinations = DestinationsConfig {
        cluster_cidrs: vec!["10.96.0.0/12".parse().expect("prefix")],
        ..DestinationsConfig::default()
    };
    Policy::compile(&AclConfig {
        sources,
        rules,
        destinations: &destinations,
    })
    .expect("valid bench policy")
}

/// Client addresses: mostly known (each kind of prefix), some unknown.
fn clients(rng: &mut Rng, n: usize) -> Vec<IpAddr> {
    (0..n)
        .map(|_| match rng.below(10) {
            0..=5 => IpAddr::V4(Ipv4Addr::from(
                0x0A40_0000u32 + (rng.below(80_000) as u32) * 7,
            )),
            6 => IpAddr::V4(Ipv4Addr::from(
                0x6440_0000u32 + ((rng.below(10_000) as u32) << 8) + 9,
            )),
            7 => IpAddr::V6(Ipv6Addr::from(
                0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + 2 * rng.below(4_000) as u128,
            )),
            8 => IpAddr::V4(Ipv4Addr::from(0x0A00_0000u32 + rng.below(1 << 20) as u32)),
            _ => IpAddr::V4(Ipv4Addr::from(0xCB00_7100u32 + rng.below(256) as u32)),
        })
        .collect()
}

fn bench_identity(c: &mut Criterion) {
    let sources = sources();
    let policy = policy(&[], &sources);
    assert!(policy.source_count() >= SOURCES);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let lookups = clients(&mut rng, 4096);
    let mut i = 0;
    c.bench_function("acl_identity_lookup_100k", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            black_box(policy.identify(black_box(lookups[i])))
        })
    });
}

/// 50,000 running pods in 50 namespaces, groups of 25 sharing a label set (a ReplicaSet), folded
/// the way the watcher folds them.
fn pod_index() -> (kalmar::acl::WorkloadIndex, Vec<IpAddr>) {
    use kalmar::kubernetes::{Fold, Object, PodObject, Scope};
    use kube::runtime::watcher::Event;
    let mut fold = Fold::new(vec![Scope::Pods(None), Scope::Namespaces, Scope::Nodes]);
    for w in 0..3 {
        fold.apply(w, Event::Init);
    }
    let mut ips = Vec::with_capacity(50_000);
    for i in 0..50_000u32 {
        let ip = IpAddr::V4(Ipv4Addr::from(0x0A01_0000u32 + i));
        let pod: PodObject = serde_json::from_value(serde_json::json!({
            "metadata": {"uid": format!("uid-{i}"), "namespace": format!("ns-{}", i % 50),
                         "name": format!("pod-{i}"), "resourceVersion": "1",
                         "labels": {"app": format!("app-{}", i / 25), "pod-template-hash": format!("h{}", i / 25),
                                    "network-access-external-ips": "true"}},
            "spec": {"serviceAccountName": "default", "nodeName": format!("node-{}", i % 20)},
            "status": {"phase": "Running", "podIP": ip.to_string()}
        }))
        .expect("pod");
        fold.apply(0, Event::InitApply(Object::Pod(pod)));
        ips.push(ip);
    }
    for w in 0..3 {
        fold.apply(w, Event::InitDone);
    }
    (fold.index(), ips)
}

fn bench_pod_index(c: &mut Criterion) {
    let sources = sources();
    let policy = policy(&[], &sources);
    let (index, ips) = pod_index();
    assert_eq!(index.len(), 50_000);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let lookups: Vec<IpAddr> = (0..4096).map(|_| ips[rng.below(ips.len())]).collect();
    let mut i = 0;
    // The whole identify stage for a pod: one index probe, then (for a hit) no prefix lookup.
    c.bench_function("kubernetes_identity_lookup_50k_pods", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            let ip = black_box(lookups[i]);
            black_box(policy.identify_with(ip, index.get(ip)))
        })
    });
}

fn bench_decision(c: &mut Criterion) {
    let sources = sources();
    let rules = rules();
    let policy = policy(&rules, &sources);
    assert_eq!(policy.rule_count(), RULES);
    let mut rng = Rng(0x0fed_cba9_8765_4321);
    let clients = clients(&mut rng, 4096);
    // Targets: rule hits by name and wildcard, deny-list hits, misses, literal addresses.
    let targets: Vec<(Host, u16, Method, Protocol, IpAddr)> = (0..4096)
        .map(|_| {
            let i = rng.below(RULES);
            let public = IpAddr::V4(Ipv4Addr::new(93, 184, 215, 14));
            match rng.below(8) {
                0 | 1 => (
                    Host::Name(format!("svc-{i}.example.com")),
                    443,
                    Method::CONNECT,
                    Protocol::Connect,
                    public,
                ),
                2 => (
                    Host::Name(format!("v2.api-{i}.example.org")),
                    443,
                    Method::CONNECT,
                    Protocol::Connect,
                    public,
                ),
                3 => (
                    Host::Name(format!("db-{i}.svc.cluster.local")),
                    5432,
                    Method::CONNECT,
                    Protocol::Connect,
                    IpAddr::V4(Ipv4Addr::new(10, 96, (i % 256) as u8, 7)),
                ),
                4 => (
                    Host::Name(format!("www.bad-{i}.example.net")),
                    443,
                    Method::CONNECT,
                    Protocol::Connect,
                    public,
                ),
                5 => (
                    Host::Name(format!("api.eu.partner-{i}.example")),
                    80,
                    Method::GET,
                    Protocol::Http,
                    public,
                ),
                6 => {
                    let addr = IpAddr::V4(Ipv4Addr::new(198, 51, (i % 256) as u8, 10));
                    (
                        Host::Ip(addr),
                        443,
                        Method::CONNECT,
                        Protocol::Connect,
                        addr,
                    )
                }
                _ => (
                    Host::Name("www.example.com".into()),
                    443,
                    Method::CONNECT,
                    Protocol::Connect,
                    public,
                ),
            }
        })
        .collect();
    let mut i = 0;
    c.bench_function("acl_decision_10k_rules", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            let (host, port, method, protocol, addr) = &targets[i];
            let id = policy.identify(black_box(clients[i]));
            let dst = Destination {
                host,
                port: *port,
                method,
                protocol: *protocol,
            };
            let decision = policy.authorize(&id, &dst);
            let dial = decision.is_allowed() && policy.check_address(&decision, *addr).is_ok();
            black_box((decision, dial))
        })
    });
}

criterion_group!(benches, bench_identity, bench_pod_index, bench_decision);
criterion_main!(benches);
