//! Operations with real traffic: /metrics parsed by a real Prometheus parser, the admin
//! endpoints, access-log formats read by goaccess, and log reopening under load.

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::origin::Origin;
use support::{Kalmar, KalmarProcess, client_from, raw_exchange};

async fn admin_get(kalmar: &Kalmar, method: &str, path: &str) -> String {
    raw_exchange(
        kalmar.admin,
        format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

/// Scrape /metrics and index samples by "name{sorted labels}".
async fn scrape(kalmar: &Kalmar) -> HashMap<String, f64> {
    let answer = admin_get(kalmar, "GET", "/metrics").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split_once("\r\n\r\n").unwrap().1;
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition format");
    let mut out = HashMap::new();
    for sample in scrape.samples {
        let mut labels: Vec<String> = sample
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        labels.sort();
        let value = match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => continue,
        };
        out.insert(format!("{}{{{}}}", sample.metric, labels.join(",")), value);
    }
    out
}

fn get(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| {
        panic!(
            "no sample {key}; have {:?}",
            m.keys()
                .filter(|k| k.starts_with(key.split('{').next().unwrap()))
                .collect::<Vec<_>>()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_by_the_right_amounts_after_real_traffic() {
    let origin = Origin::start().await;
    let kalmar = Kalmar::start(
        "[[sources]]\nname = \"pods\"\ncidr = \"127.0.0.0/29\"\nlabels = { \"network-access-external-ips\" = \"true\" }\n",
    );
    let before = scrape(&kalmar).await;
    let client = kalmar.client();
    for _ in 0..7 {
        assert_eq!(
            client
                .get(origin.url("/hello"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let r = client
        .post(origin.url("/echo"))
        .body(vec![1u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 1000);
    // An unknown source (outside 127.0.0.0/29) is denied.
    let denied = client_from(&kalmar.url(), "127.0.0.9")
        .get(origin.url("/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 403);
    // A refused connection.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    assert_eq!(
        client
            .get(format!("http://{closed}/"))
            .send()
            .await
            .unwrap()
            .status(),
        502
    );
    // A tunnel, closed at once.
    let tls = support::origin::TlsOrigin::start().await;
    let r = client
        .get(format!("https://127.0.0.1:{}/hello", tls.addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "hello");
    drop(client);
    kalmar.log_lines(11);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let after = scrape(&kalmar).await;
    let delta = |key: &str| get(&after, key) - before.get(key).copied().unwrap_or(0.0);
    assert_eq!(
        delta("kalmar_requests_total{method=GET,status=2xx,verdict=allow}"),
        7.0
    );
    assert_eq!(
        delta("kalmar_requests_total{method=POST,status=2xx,verdict=allow}"),
        1.0
    );
    assert_eq!(
        delta("kalmar_requests_total{method=GET,status=4xx,verdict=deny}"),
        1.0
    );
    assert_eq!(
        delta("kalmar_requests_total{method=GET,status=5xx,verdict=allow}"),
        1.0
    );
    assert_eq!(
        delta("kalmar_requests_total{method=CONNECT,status=2xx,verdict=allow}"),
        1.0
    );
    assert_eq!(delta("kalmar_denied_total{reason=unknown-source}"), 1.0);
    assert!(delta("kalmar_client_received_bytes_total{}") >= 1000.0);
    assert!(delta("kalmar_client_sent_bytes_total{}") >= 1000.0 + 7.0 * 5.0);
    assert_eq!(delta("kalmar_tunnel_duration_seconds_count{}"), 1.0);
    assert_eq!(get(&after, "kalmar_active_tunnels{}"), 0.0);
    assert!(delta("kalmar_connect_duration_seconds_count{result=error}") >= 1.0);
    assert!(delta("kalmar_connect_duration_seconds_count{result=ok}") >= 2.0);
    assert_eq!(
        delta("kalmar_request_duration_seconds_count{}"),
        10.0,
        "CONNECT is timed as a tunnel, not a request"
    );
    assert_eq!(
        get(
            &after,
            &format!("kalmar_build_info{{version={}}}", env!("CARGO_PKG_VERSION"))
        ),
        1.0
    );
    // No host names, URLs or client addresses as label values (the test URLs' path is
    // /hello; `client-hello-timeout` is a bounded TLS-check result).
    for key in after.keys() {
        assert!(
            !key.contains("127.0.0.1") && !key.contains("/hello"),
            "unbounded label in {key}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let kalmar = Kalmar::start("");
    assert!(
        admin_get(&kalmar, "GET", "/healthz")
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert!(
        admin_get(&kalmar, "GET", "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
    );
    let reload = admin_get(&kalmar, "POST", "/reload").await;
    assert!(
        reload.starts_with("HTTP/1.1 200") && reload.contains("reloaded"),
        "{reload}"
    );
    assert!(
        admin_get(&kalmar, "GET", "/reload")
            .await
            .starts_with("HTTP/1.1 405")
    );
    assert!(
        admin_get(&kalmar, "GET", "/nope")
            .await
            .starts_with("HTTP/1.1 404")
    );
    // A broken config: the reload says so and the old one stays.
    std::fs::write(&kalmar.config_path, "[server]\nlisten = \"nope\"\n").unwrap();
    let reload = admin_get(&kalmar, "POST", "/reload").await;
    assert!(
        reload.starts_with("HTTP/1.1 500") && reload.contains("server.listen"),
        "{reload}"
    );
    // The admin port is not a proxy, and the proxy port is not the admin.
    let on_proxy = raw_exchange(
        kalmar.addr,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(on_proxy.starts_with("HTTP/1.1 400"), "{on_proxy}");
}

/// Run goaccess over `log` and return (valid, failed) request counts.
fn goaccess(log: &[u8], args: &[&str]) -> Option<(u64, u64)> {
    let child = Command::new("goaccess")
        .args(["-", "--no-global-config", "-o", "json"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            support::tool_missing("goaccess", "apt-get install goaccess");
            return None;
        }
        Err(e) => panic!("running goaccess: {e}"),
    };
    child.stdin.take().unwrap().write_all(log).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap();
    Some((
        report["general"]["valid_requests"].as_u64().unwrap(),
        report["general"]["failed_requests"].as_u64().unwrap(),
    ))
}

async fn traffic_in_format(format: &str) -> Vec<u8> {
    let origin = Origin::start().await;
    let tls = support::origin::TlsOrigin::start().await;
    let kalmar = Kalmar::start(&format!("[access_log]\nformat = \"{format}\""));
    let client = kalmar.client();
    for path in ["/hello", "/headers?a=1&b=\"x\"", "/nope"] {
        client
            .get(origin.url(path))
            .header("user-agent", "curl/8 \"quoted\"")
            .header("referer", "http://r.example/")
            .send()
            .await
            .unwrap();
    }
    client
        .post(origin.url("/echo"))
        .body("x")
        .send()
        .await
        .unwrap();
    client.head(origin.url("/hello")).send().await.unwrap();
    client
        .get(format!("https://127.0.0.1:{}/hello", tls.addr.port()))
        .send()
        .await
        .unwrap();
    client_from(&kalmar.url(), "127.0.0.1")
        .get("http://127.0.0.1:22/")
        .send()
        .await
        .unwrap();
    drop(client);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read(&kalmar.log_path).unwrap_or_default();
        if text.iter().filter(|&&b| b == b'\n').count() >= 7 || std::time::Instant::now() > deadline
        {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaccess_reads_kalmar_squid_format_like_squid_own() {
    let log = traffic_in_format("squid").await;
    let lines = log.iter().filter(|&&b| b == b'\n').count() as u64;
    assert_eq!(lines, 7, "{}", String::from_utf8_lossy(&log));
    let Some((valid, failed)) = goaccess(
        &log,
        &[
            "--log-format=%x.%^ %~%L %h %^/%s %b %m %U",
            "--date-format=%s",
            "--time-format=%s",
        ],
    ) else {
        return;
    };
    assert_eq!(failed, 0, "{}", String::from_utf8_lossy(&log));
    assert_eq!(valid, lines);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaccess_reads_kalmar_combined_format() {
    let log = traffic_in_format("combined").await;
    let lines = log.iter().filter(|&&b| b == b'\n').count() as u64;
    assert_eq!(lines, 7);
    let Some((valid, failed)) = goaccess(&log, &["--log-format=COMBINED"]) else {
        return;
    };
    assert_eq!(failed, 0, "{}", String::from_utf8_lossy(&log));
    assert_eq!(valid, lines);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopen_under_load_loses_no_line() {
    let origin = Origin::start().await;
    let kalmar = KalmarProcess::spawn("");
    let rotated = kalmar.dir.path().join("access.log.1");
    let url = origin.url("/hello");
    let proxy = kalmar.url();
    const TASKS: usize = 8;
    const PER_TASK: usize = 150;
    let load: Vec<_> = (0..TASKS)
        .map(|_| {
            let client = support::client_via(&proxy);
            let url = url.clone();
            tokio::spawn(async move {
                for _ in 0..PER_TASK {
                    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
                }
            })
        })
        .collect();
    // Rotate as logrotate's `create` mode does, while the load runs.
    tokio::time::sleep(Duration::from_millis(150)).await;
    std::fs::rename(&kalmar.log_path, &rotated).unwrap();
    kalmar.signal("USR1");
    for task in load {
        task.await.unwrap();
    }
    let count = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while count(&rotated) + count(&kalmar.log_path) < TASKS * PER_TASK
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (old, new) = (count(&rotated), count(&kalmar.log_path));
    assert_eq!(old + new, TASKS * PER_TASK, "old {old} + new {new}");
    assert!(
        old > 0 && new > 0,
        "both files got lines: old {old}, new {new}"
    );
}
