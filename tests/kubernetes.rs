//! Pod identity from the Kubernetes API, end to end: a loopback API server that speaks the real
//! wire protocol (checked with the real `kubectl`), Kalmar watching it, and real clients bound
//! to distinct 127.0.0.x addresses going through the proxy while pods, labels, namespaces and
//! the API server itself change under them.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::kube_api::{Kind, KubeApi, namespace, node, pod};
use support::origin::Origin;
use support::{Kalmar, client_from, error_kind, metric};

/// The real kubectl: `KUBECTL`, else on PATH. Missing fails under `CI=true`, else skips.
fn kubectl() -> Option<String> {
    let candidate = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let works = Command::new(&candidate)
        .args(["version", "--client", "-o", "json"])
        .output()
        .is_ok_and(|o| o.status.success());
    if works {
        return Some(candidate);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "kubectl is required in CI (install it in .ci/run)"
    );
    eprintln!("SKIPPED: no working kubectl on PATH (set KUBECTL=...)");
    None
}

const RULES: &str = r#"
[[sources]]
name = "static-vm"
cidr = "127.0.0.250/32"
labels = { "network-access-external-ips" = "true" }

[[rules]]
name = "external"
action = "allow"
from = { match_labels = { "network-access-external-ips" = "true" } }
[[rules]]
name = "gold-namespaces"
action = "allow"
from = { namespace_selector = { match_labels = { tier = "gold" } } }
[[rules]]
name = "ci-runner"
action = "allow"
from = { service_accounts = ["ci/runner"] }
[[rules]]
name = "nodes-head-only"
action = "allow"
from = { match_labels = { "kalmar.io/source" = "node" } }
to = { methods = ["HEAD"] }
"#;

fn config(kubeconfig: &std::path::Path, extra: &str) -> String {
    format!(
        "{RULES}\n[kubernetes]\nenabled = true\nkubeconfig = {:?}\npod_cidrs = [\"127.0.0.0/26\"]\n{extra}",
        kubeconfig.display().to_string()
    )
}

fn external() -> Value {
    json!({"network-access-external-ips": "true", "app": "worker"})
}

/// GET `url` from `source` through the proxy: the status and the `X-Kalmar-Error` kind.
async fn get(proxy: &str, source: &str, url: &str) -> (u16, String) {
    let r = client_from(proxy, source)
        .get(url)
        .send()
        .await
        .expect("response from the proxy");
    (r.status().as_u16(), error_kind(&r))
}

/// Polls until `source` gets `want` (status, kind), at most `within`; returns how long it took.
async fn eventually(
    proxy: &str,
    source: &str,
    url: &str,
    want: (u16, &str),
    within: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let (status, kind) = get(proxy, source, url).await;
        if (status, kind.as_str()) == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{source}: wanted {want:?} within {within:?}, still ({status}, {kind:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The first access-log line that `pick` accepts (waiting for it up to 10 s).
fn log_line(kalmar: &Kalmar, pick: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&kalmar.log_path).unwrap_or_default();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| pick(l));
        if let Some(line) = found {
            return line;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no such line in {text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn indexed_now(kalmar: &Kalmar, ip: &str) -> String {
    match kalmar.handle().kubernetes().lookup(ip.parse().expect("ip")) {
        None => "-".to_owned(),
        Some(kalmar::acl::Workload::Conflict) => "conflict".to_owned(),
        Some(kalmar::acl::Workload::Pod(p)) => p.full_name().to_owned(),
        Some(kalmar::acl::Workload::Node(n)) => n.full_name().to_owned(),
    }
}

/// Polls until the index holds `want` for `ip`: `namespace/name`, `node/<name>`, `conflict` or
/// `-` (nothing).
async fn indexed(kalmar: &Kalmar, ip: &str, want: &str, within: Duration) {
    let start = Instant::now();
    loop {
        let got = indexed_now(kalmar, ip);
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{ip}: index holds {got}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_ready(kalmar: &Kalmar, within: Duration) {
    let start = Instant::now();
    while !kalmar.handle().is_ready() {
        assert!(start.elapsed() < within, "not ready within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn readyz(kalmar: &Kalmar) -> (u16, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let r = reqwest::get(format!("http://{}/readyz", kalmar.admin))
        .await
        .expect("readyz");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_sees_exactly_what_the_test_api_server_holds() {
    let Some(kubectl) = kubectl() else { return };
    let api = KubeApi::start().await;
    api.apply(Kind::Namespace, namespace("proj", json!({"tier": "gold"})));
    api.apply(Kind::Pod, pod("proj", "web-1", "127.0.0.21", external()));
    api.apply(
        Kind::Pod,
        pod("proj", "web-2", "127.0.0.22", json!({"app": "web"})),
    );
    api.apply(Kind::Pod, pod("other", "batch", "127.0.0.23", json!({})));
    api.apply(Kind::Node, node("node-a", "127.0.0.25"));
    let dir = tempfile::tempdir().expect("tempdir");
    let empty_kubeconfig = dir.path().join("none");
    std::fs::write(&empty_kubeconfig, "").expect("write");
    let base = |args: &[&str]| {
        let mut cmd = Command::new(&kubectl);
        cmd.arg("--kubeconfig")
            .arg(&empty_kubeconfig)
            .args(["--server", &api.url()])
            .args(args)
            .env("HOME", dir.path());
        cmd
    };

    let out = base(&["get", "pods", "-A", "-o", "json"])
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout).expect("kubectl json");
    assert_eq!(listed["items"], Value::Array(api.objects(Kind::Pod)));

    // Label and field selectors are the server's job: kubectl passes them through.
    let out = base(&[
        "get",
        "pods",
        "-A",
        "-l",
        "app in (web,worker)",
        "--field-selector",
        "metadata.namespace=proj",
        "-o",
        "name",
    ])
    .output()
    .expect("run kubectl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "pod/web-1\npod/web-2\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = base(&["get", "nodes", "-o", "json"])
        .output()
        .expect("kubectl");
    let nodes: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(nodes["items"], Value::Array(api.objects(Kind::Node)));

    // --watch: the initial objects, then each change as the server streams it.
    let mut child = base(&["get", "pods", "-n", "proj", "--watch", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl --watch");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        // kubectl -o json prints one pretty-printed object after another.
        let mut buf = String::new();
        let mut depth = 0i32;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            depth += line.matches('{').count() as i32 - line.matches('}').count() as i32;
            buf.push_str(&line);
            buf.push('\n');
            if depth == 0 && !buf.trim().is_empty() {
                if let Ok(v) = serde_json::from_str::<Value>(&buf) {
                    let _ = tx.send(v);
                }
                buf.clear();
            }
        }
    });
    let next = || {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("kubectl printed an object")
    };
    let first = [next(), next()];
    let held = api.objects(Kind::Pod);
    let proj: Vec<&Value> = held
        .iter()
        .filter(|p| p["metadata"]["namespace"] == "proj")
        .collect();
    assert_eq!(first.iter().collect::<Vec<_>>(), proj);
    let changed = api.apply(Kind::Pod, pod("proj", "web-2", "127.0.0.22", external()));
    assert_eq!(next(), changed, "the MODIFIED object, as stored");
    let added = api.apply(Kind::Pod, pod("proj", "web-3", "127.0.0.24", json!({})));
    assert_eq!(next(), added);
    let _ = child.kill();
    let _ = child.wait();

    let requests = api.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.contains("watch=true") || r.contains("watch=1")),
        "{requests:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_are_identified_live_through_the_proxy() {
    let origin = Origin::start().await;
    let url = origin.url("/hello");
    let mut api = KubeApi::start().await;
    api.apply(Kind::Namespace, namespace("proj", json!({})));
    api.apply(
        Kind::Namespace,
        namespace("gold-ns", json!({"tier": "silver"})),
    );
    api.apply(Kind::Namespace, namespace("ci", json!({})));
    api.apply(Kind::Node, node("node-a", "127.0.0.30"));
    api.apply(Kind::Pod, pod("proj", "labelled", "127.0.0.21", external()));
    api.apply(
        Kind::Pod,
        pod("proj", "plain", "127.0.0.22", json!({"app": "worker"})),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let kalmar = Kalmar::start(&config(&api.kubeconfig(dir.path()), ""));
    wait_ready(&kalmar, Duration::from_secs(10)).await;
    let proxy = kalmar.url();
    let second = Duration::from_secs(1);

    // Labelled vs unlabelled neighbours.
    assert_eq!(get(&proxy, "127.0.0.21", &url).await, (200, String::new()));
    assert_eq!(
        get(&proxy, "127.0.0.22", &url).await,
        (403, "denied".into())
    );
    // A static source still works, and an address nobody owns is unknown.
    assert_eq!(get(&proxy, "127.0.0.250", &url).await.0, 200);
    assert_eq!(
        get(&proxy, "127.0.0.40", &url).await,
        (403, "unknown-source".into())
    );

    // Label added → allowed within a second; removed → denied.
    api.apply(Kind::Pod, pod("proj", "plain", "127.0.0.22", external()));
    let took = eventually(&proxy, "127.0.0.22", &url, (200, ""), second).await;
    eprintln!("label added: allowed after {took:?}");
    api.apply(Kind::Pod, pod("proj", "plain", "127.0.0.22", json!({})));
    eventually(&proxy, "127.0.0.22", &url, (403, "denied"), second).await;

    // Delete and reuse: the old pod's DELETE arrives after the new pod took its address. Until
    // then two live pods claim it (nobody is attributed); afterwards the new pod owns it.
    api.apply(Kind::Pod, pod("proj", "old", "127.0.0.23", json!({})));
    indexed(&kalmar, "127.0.0.23", "proj/old", second).await;
    assert_eq!(
        get(&proxy, "127.0.0.23", &url).await,
        (403, "denied".into())
    );
    api.apply(Kind::Pod, pod("proj", "new", "127.0.0.23", external()));
    indexed(&kalmar, "127.0.0.23", "conflict", second).await;
    assert_eq!(
        get(&proxy, "127.0.0.23", &url).await,
        (403, "unknown-source".into())
    );
    assert!(metric(&kalmar, "kalmar_kubernetes_ip_conflicts_total", &[]) >= 1.0);
    api.delete(Kind::Pod, "proj", "old");
    eventually(&proxy, "127.0.0.23", &url, (200, ""), second).await;
    let line = log_line(&kalmar, |l| {
        l["client"]
            .as_str()
            .unwrap_or("")
            .starts_with("127.0.0.23:")
            && l["status"] == 200
    });
    assert_eq!(line["source"], "proj/new");
    assert_eq!(line["labels"]["app"], "worker");
    assert_eq!(line["pod"], "proj/new");
    assert_eq!(line["namespace"], "proj");
    assert_eq!(line["service_account"], "default");
    assert_eq!(line["node"], "node-a");

    // A Completed pod keeps its podIP but no longer owns it.
    let mut done = pod("proj", "job", "127.0.0.24", external());
    api.apply(Kind::Pod, done.clone());
    eventually(&proxy, "127.0.0.24", &url, (200, ""), second).await;
    done["status"]["phase"] = json!("Succeeded");
    api.apply(Kind::Pod, done);
    eventually(&proxy, "127.0.0.24", &url, (403, "unknown-source"), second).await;

    // A hostNetwork pod is never its node's address: the node is (HEAD only, by rule).
    let mut host = pod("kube-system", "agent", "127.0.0.30", external());
    host["spec"]["hostNetwork"] = json!(true);
    api.apply(Kind::Pod, host);
    assert_eq!(
        get(&proxy, "127.0.0.30", &url).await,
        (403, "denied".into())
    );
    let head = client_from(&proxy, "127.0.0.30")
        .head(&url)
        .send()
        .await
        .expect("head");
    assert_eq!(head.status(), 200);

    // Namespace relabel: the namespace selector follows it.
    api.apply(Kind::Pod, pod("gold-ns", "svc", "127.0.0.26", json!({})));
    eventually(&proxy, "127.0.0.26", &url, (403, "denied"), second).await;
    api.apply(
        Kind::Namespace,
        namespace("gold-ns", json!({"tier": "gold"})),
    );
    eventually(&proxy, "127.0.0.26", &url, (200, ""), second).await;

    // Service accounts.
    let mut runner = pod("ci", "runner-1", "127.0.0.27", json!({}));
    runner["spec"]["serviceAccountName"] = json!("runner");
    api.apply(Kind::Pod, runner);
    eventually(&proxy, "127.0.0.27", &url, (200, ""), second).await;

    // A pod that sends before its watch event arrives: one direct lookup finds it.
    let found = |k: &Kalmar| {
        metric(
            k,
            "kalmar_kubernetes_direct_lookups_total",
            &[("result", "found")],
        )
    };
    let found_before = found(&kalmar);
    api.pause_watches(true);
    api.apply(Kind::Pod, pod("proj", "fresh", "127.0.0.28", external()));
    assert_eq!(get(&proxy, "127.0.0.28", &url).await, (200, String::new()));
    assert!(
        api.requests()
            .iter()
            .any(|r| r.contains("fieldSelector=status.podIP%3D127.0.0.28")
                || r.contains("fieldSelector=status.podIP=127.0.0.28")),
        "{:?}",
        api.requests()
    );
    assert_eq!(found(&kalmar), found_before + 1.0);
    assert_eq!(
        indexed_now(&kalmar, "127.0.0.28"),
        "-",
        "the watch has not told yet"
    );
    // Outside pod_cidrs nothing is asked; inside, a miss is remembered briefly.
    let not_found = |k: &Kalmar| {
        metric(
            k,
            "kalmar_kubernetes_direct_lookups_total",
            &[("result", "not-found")],
        )
    };
    let cached = |k: &Kalmar| {
        metric(
            k,
            "kalmar_kubernetes_direct_lookups_total",
            &[("result", "cached")],
        )
    };
    let (misses, hits) = (not_found(&kalmar), cached(&kalmar));
    assert_eq!(get(&proxy, "127.0.0.99", &url).await.1, "unknown-source");
    assert_eq!(get(&proxy, "127.0.0.41", &url).await.1, "unknown-source");
    assert_eq!(get(&proxy, "127.0.0.41", &url).await.1, "unknown-source");
    assert!(!api.requests().iter().any(|r| r.contains("127.0.0.99")));
    assert_eq!(not_found(&kalmar), misses + 1.0);
    assert_eq!(cached(&kalmar), hits + 1.0);
    api.pause_watches(false);

    // The API server dies: the last-known index keeps answering; the age shows it.
    api.stop();
    assert_eq!(get(&proxy, "127.0.0.21", &url).await.0, 200);
    let start = Instant::now();
    while metric(&kalmar, "kalmar_kubernetes_sync_age_seconds", &[]) < 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "sync age stays 0"
        );
        assert_eq!(get(&proxy, "127.0.0.21", &url).await.0, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        kalmar.handle().is_ready(),
        "still ready with the last-known index"
    );
    // Changes while it is down are seen after the restart (re-list, since the restarted
    // server has no history); .21 is served throughout.
    api.apply(Kind::Pod, pod("proj", "plain", "127.0.0.22", external()));
    api.delete(Kind::Pod, "proj", "labelled");
    api.restart();
    eventually(
        &proxy,
        "127.0.0.22",
        &url,
        (200, ""),
        Duration::from_secs(15),
    )
    .await;
    eventually(&proxy, "127.0.0.21", &url, (403, "unknown-source"), second).await;
    let start = Instant::now();
    while metric(&kalmar, "kalmar_kubernetes_sync_age_seconds", &[]) > 0.0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "age not back to 0"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        metric(
            &kalmar,
            "kalmar_kubernetes_watch_restarts_total",
            &[("kind", "pod")]
        ) >= 1.0
    );

    // 410 Gone in the middle of a watch: re-list, and later changes still arrive.
    let restarts = metric(&kalmar, "kalmar_kubernetes_watch_restarts_total", &[]);
    api.expire_watches();
    api.apply(Kind::Pod, pod("proj", "plain", "127.0.0.22", json!({})));
    eventually(
        &proxy,
        "127.0.0.22",
        &url,
        (403, "denied"),
        Duration::from_secs(5),
    )
    .await;
    assert!(metric(&kalmar, "kalmar_kubernetes_watch_restarts_total", &[]) > restarts);
    let listed_again = api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch"))
        .count();
    assert!(listed_again >= 3, "initial list, after restart, after 410");
    assert_eq!(
        metric(&kalmar, "kalmar_kubernetes_objects", &[("kind", "node")]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_first_list_is_in() {
    let mut api = KubeApi::start().await;
    api.apply(Kind::Pod, pod("proj", "labelled", "127.0.0.21", external()));
    api.stop();
    let dir = tempfile::tempdir().expect("tempdir");
    let kalmar = Kalmar::start(&config(&api.kubeconfig(dir.path()), ""));
    assert_eq!(
        readyz(&kalmar).await,
        (503, "not ready: kubernetes index not synced yet\n".into())
    );
    api.restart();
    wait_ready(&kalmar, Duration::from_secs(15)).await;
    assert_eq!(readyz(&kalmar).await, (200, "ready\n".into()));
    let origin = Origin::start().await;
    assert_eq!(
        get(&kalmar.url(), "127.0.0.21", &origin.url("/hello"))
            .await
            .0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_switches_the_section_without_dropping_requests() {
    let origin = Origin::start().await;
    let url = origin.url("/hello");
    let api = KubeApi::start().await;
    api.apply(Kind::Pod, pod("proj", "labelled", "127.0.0.21", external()));
    api.apply(Kind::Pod, pod("kaapana", "k", "127.0.0.22", external()));
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = api.kubeconfig(dir.path());
    let kalmar = Kalmar::start(&config(&kubeconfig, ""));
    wait_ready(&kalmar, Duration::from_secs(10)).await;
    let proxy = kalmar.url();
    assert_eq!(get(&proxy, "127.0.0.21", &url).await.0, 200);

    // An invalid section is refused and the old one stays.
    let text = std::fs::read_to_string(&kalmar.config_path).expect("config");
    std::fs::write(
        &kalmar.config_path,
        text.replace("[kubernetes]", "[kubernetes]\nnamespaces = [\"Bad_NS\"]"),
    )
    .expect("write");
    let err = kalmar.handle().reload().expect_err("invalid");
    assert!(err.contains("kubernetes.namespaces[0]"), "{err}");
    assert_eq!(get(&proxy, "127.0.0.21", &url).await.0, 200);

    // Only namespace kaapana: .21 is no pod of ours any more; requests keep being answered
    // while the new watchers list.
    std::fs::write(
        &kalmar.config_path,
        text.replace("[kubernetes]", "[kubernetes]\nnamespaces = [\"kaapana\"]"),
    )
    .expect("write");
    kalmar.handle().reload().expect("reload");
    eventually(
        &proxy,
        "127.0.0.21",
        &url,
        (403, "unknown-source"),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(get(&proxy, "127.0.0.22", &url).await.0, 200);
    assert!(
        api.requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/namespaces/kaapana/pods?"))
    );
}
