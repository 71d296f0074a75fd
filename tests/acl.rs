//! The ACL with real clients from distinct loopback source addresses: identity by CIDR,
//! label rules, ports, rate limits, hot reload, and `kalmar explain`.

mod support;

use std::time::{Duration, Instant};

use support::origin::Origin;
use support::{Kalmar, KalmarProcess, client_from, kalmar_bin};

const TEAMS: &str = r#"
[[sources]]
name = "team-a-pod"
cidr = "127.0.0.2/32"
labels = { namespace = "project-a", "network-access-external-ips" = "true" }
[[sources]]
name = "team-b-range"
cidr = "127.0.0.0/29"
labels = { namespace = "project-b" }
[[sources]]
name = "ops"
cidr = "127.0.0.1/32"
labels = { namespace = "ops", tier = "admin" }

[[rules]]
name = "b-may-get-hello"
action = "allow"
from = { match_labels = { namespace = "project-b" } }
to = { methods = ["GET"] }
[[rules]]
name = "ops-report-only"
action = "report"
from = { match_expressions = [{ key = "tier", operator = "In", values = ["admin", "root"] }] }
[[rules]]
name = "external"
action = "allow"
from = { match_labels = { "network-access-external-ips" = "true" } }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_get_labels_by_longest_prefix_and_rules_decide() {
    let origin = Origin::start().await;
    let kalmar = Kalmar::start(TEAMS);
    let proxy = kalmar.url();

    // 127.0.0.2/32 wins over 127.0.0.0/29: team a, may do anything.
    let a = client_from(&proxy, "127.0.0.2");
    assert_eq!(
        a.post(origin.url("/echo"))
            .body("x")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // 127.0.0.3 is only in the /29: team b, GET only.
    let b = client_from(&proxy, "127.0.0.3");
    assert_eq!(
        b.get(origin.url("/hello")).send().await.unwrap().status(),
        200
    );
    let r = b.post(origin.url("/echo")).body("x").send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(support::error_kind(&r), "denied");

    // 127.0.0.9 is in no entry: unknown, denied.
    let unknown = client_from(&proxy, "127.0.0.9");
    let r = unknown.get(origin.url("/hello")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(support::error_kind(&r), "unknown-source");

    // ops: a report rule lets it through but logs and counts a would-deny.
    let ops = client_from(&proxy, "127.0.0.1");
    assert_eq!(
        ops.get(origin.url("/hello")).send().await.unwrap().status(),
        200
    );

    assert_eq!(
        origin.requests(),
        3,
        "only allowed requests reach the origin"
    );
    let lines = kalmar.log_lines(5);
    let by_client = |ip: &str, status: u64| {
        lines
            .iter()
            .find(|l| {
                l["client"].as_str().unwrap().starts_with(&format!("{ip}:"))
                    && l["status"] == status
            })
            .unwrap_or_else(|| panic!("no line for {ip} {status}: {lines:?}"))
            .clone()
    };
    let denied_b = by_client("127.0.0.3", 403);
    assert_eq!(denied_b["labels"]["namespace"], "project-b");
    assert_eq!(denied_b["source"], "team-b-range");
    assert_eq!(denied_b["verdict"], "deny");
    let unknown = by_client("127.0.0.9", 403);
    assert!(unknown["labels"].is_null());
    assert_eq!(unknown["reason"], "unknown-source");
    let report = by_client("127.0.0.1", 200);
    assert_eq!(report["verdict"], "report");
    assert_eq!(report["rule"], "ops-report-only");
    let metrics = kalmar.handle().metrics().encode();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("kalmar_would_deny_total") && l.ends_with(" 1")),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("kalmar_denied_total{reason=\"unknown-source\"} 1")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_outside_the_lists_are_denied() {
    let kalmar = Kalmar::start("[destinations]\nconnect_ports = [\"443\"]");
    let client = kalmar.client();
    let r = client.get("http://127.0.0.1:22/").send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(support::error_kind(&r), "port-not-allowed");
    let answer = support::connect_head(kalmar.addr, "127.0.0.1:8443").await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(
        answer.contains("x-kalmar-error: port-not-allowed"),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after() {
    let origin = Origin::start().await;
    let kalmar = Kalmar::start(
        r#"
[[rate_limits]]
name = "tight"
from = { match_labels = { "network-access-external-ips" = "true" } }
requests_per_second = 1
burst = 2
max_tunnels = 1
"#,
    );
    let client = client_from(&kalmar.url(), "127.0.0.5");
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..4 {
        let r = client.get(origin.url("/hello")).send().await.unwrap();
        statuses.push(r.status().as_u16());
        last = Some(r);
    }
    assert_eq!(&statuses[..2], &[200, 200], "{statuses:?}");
    let r = last.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(support::error_kind(&r), "rate-limited");
    assert!(
        r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    // Another source has its own budget.
    let other = client_from(&kalmar.url(), "127.0.0.6");
    assert_eq!(
        other
            .get(origin.url("/hello"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tunnels_per_source_are_limited() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let kalmar = Kalmar::start(
        r#"
[[rate_limits]]
name = "one-tunnel"
from = {}
requests_per_second = 1000
burst = 1000
max_tunnels = 1
"#,
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connect = format!("CONNECT {addr} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let mut first = tokio::net::TcpStream::connect(kalmar.addr).await.unwrap();
    first.write_all(connect.as_bytes()).await.unwrap();
    let mut buf = [0u8; 12];
    first.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    let second = support::connect_head(kalmar.addr, &addr.to_string()).await;
    assert!(second.starts_with("HTTP/1.1 429"), "{second}");
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut third = tokio::net::TcpStream::connect(kalmar.addr).await.unwrap();
    third.write_all(connect.as_bytes()).await.unwrap();
    third.read_exact(&mut buf).await.unwrap();
    assert_eq!(
        &buf, b"HTTP/1.1 200",
        "the permit came back when the first tunnel closed"
    );
}

async fn wait_for_status(client: &reqwest::Client, url: &str, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = client.get(url).send().await.unwrap().status().as_u16();
        if got == status {
            return;
        }
        assert!(Instant::now() < deadline, "still {got}, expected {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_valid_changes_keeps_old_config_on_invalid_and_keeps_tunnels() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start().await;
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = echo.accept().await.unwrap();
        let mut buf = [0u8; 64];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    let kalmar = Kalmar::start("");
    let client = kalmar.client();
    assert_eq!(
        client
            .get(origin.url("/hello"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // A tunnel opened under the old policy.
    let mut tunnel = tokio::net::TcpStream::connect(kalmar.addr).await.unwrap();
    tunnel
        .write_all(format!("CONNECT {echo_addr} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tunnel.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }

    // Invalid change: refused, old config stays.
    let original = std::fs::read_to_string(&kalmar.config_path).unwrap();
    std::fs::write(
        &kalmar.config_path,
        format!("{original}\n[[rules]]\nname = \"broken\"\naction = \"maybe\"\n"),
    )
    .unwrap();
    let err = kalmar.handle().reload().unwrap_err();
    assert!(err.contains("action") || err.contains("maybe"), "{err}");
    assert_eq!(
        client
            .get(origin.url("/hello"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Valid change: everyone denied from now on.
    std::fs::write(
        &kalmar.config_path,
        format!("{original}\n[[rules]]\nname = \"nobody\"\naction = \"deny\"\n"),
    )
    .unwrap();
    kalmar.handle().reload().unwrap();
    let r = client.get(origin.url("/hello")).send().await.unwrap();
    assert_eq!(r.status(), 403);

    // The tunnel opened before the reload still relays.
    tunnel.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    tunnel.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"ping");

    // The file watcher picks up an edit without any signal.
    std::fs::write(&kalmar.config_path, &original).unwrap();
    wait_for_status(&client, &origin.url("/hello"), 200).await;
    let metrics = kalmar.handle().metrics().encode();
    // The explicit reload failed once; the file watcher may have tried the same file too.
    let failed = metrics
        .lines()
        .find(|l| l.starts_with("kalmar_config_reloads_total{result=\"error\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(failed >= 1.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sources_file_rewritten_by_another_process_is_picked_up() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let sources = dir.path().join("sources.yaml");
    std::fs::write(&sources, "- name: pod-a\n  cidr: 127.0.0.7/32\n  labels: { network-access-external-ips: \"true\" }\n").unwrap();
    let kalmar = Kalmar::start(&format!(
        "[[sources]]\nfile = {:?}\n",
        sources.display().to_string()
    ));
    let a = client_from(&kalmar.url(), "127.0.0.7");
    let b = client_from(&kalmar.url(), "127.0.0.8");
    assert_eq!(
        a.get(origin.url("/hello")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        b.get(origin.url("/hello")).send().await.unwrap().status(),
        403
    );
    // Swap the file the way a controller would: write a new one, rename over.
    let tmp = dir.path().join("sources.json.tmp");
    std::fs::write(&tmp, r#"[{"name": "pod-b", "cidr": "127.0.0.8/32", "labels": {"network-access-external-ips": "true"}}]"#).unwrap();
    std::fs::rename(&tmp, &sources).unwrap();
    wait_for_status(&b, &origin.url("/hello"), 200).await;
    assert_eq!(
        a.get(origin.url("/hello")).send().await.unwrap().status(),
        403
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_binary() {
    let origin = Origin::start().await;
    let kalmar = KalmarProcess::spawn("");
    let client = support::client_via(&kalmar.url());
    assert_eq!(
        client
            .get(origin.url("/hello"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let original = std::fs::read_to_string(&kalmar.config_path).unwrap();
    // Same size and mtime granularity do not matter: SIGHUP reloads regardless.
    std::fs::write(
        &kalmar.config_path,
        format!("{original}\n[[rules]]\nname = \"nobody\"\naction = \"deny\"\n"),
    )
    .unwrap();
    kalmar.signal("HUP");
    wait_for_status(&client, &origin.url("/hello"), 403).await;
}

#[test]
fn explain_prints_labels_rule_and_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kalmar.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[dns]\nnameservers = [\"127.0.0.1:1\"]\nuse_hosts_file = false\nhosts = {{ \"internal.test\" = [\"10.1.2.3\"], \"public.test\" = [\"192.0.2.80\"] }}\n",
            TEAMS
        ),
    )
    .unwrap();
    let explain = |from: &str, target: &str| {
        let out = std::process::Command::new(kalmar_bin())
            .args([
                "--config",
                config.to_str().unwrap(),
                "explain",
                "--from",
                from,
                target,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = explain("127.0.0.2", "http://public.test/");
    assert!(text.contains("team-a-pod"), "{text}");
    assert!(text.contains("project-a"), "{text}");
    assert!(text.contains("external"), "{text}");
    assert!(text.to_lowercase().contains("allow"), "{text}");

    let text = explain("127.0.0.2", "http://internal.test/");
    assert!(text.contains("10.1.2.3"), "{text}");
    assert!(text.contains("10.0.0.0/8"), "{text}");

    let text = explain("127.0.0.3", "public.test:443");
    assert!(text.contains("project-b"), "{text}");
    assert!(text.to_lowercase().contains("deny"), "{text}");

    let text = explain("127.0.0.99", "public.test:443");
    assert!(text.contains("unknown"), "{text}");

    // An https:// URL is the CONNECT a client sends for it, 443 unless it says otherwise.
    let text = explain("127.0.0.3", "https://public.test/some/path");
    assert!(text.contains("CONNECT public.test:443"), "{text}");
    assert_eq!(text, explain("127.0.0.3", "public.test:443"));
    let text = explain("127.0.0.2", "HTTPS://public.test:8443");
    assert!(text.contains("CONNECT public.test:8443"), "{text}");
}
