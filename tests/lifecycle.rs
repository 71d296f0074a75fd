//! Process lifecycle: check-config, environment overrides, the binary's signals, and
//! graceful shutdown with work in flight.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Kalmar, kalmar_bin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn fixtures(kind: &str) -> Vec<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(kind);
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

#[test]
fn check_config_accepts_valid_fixtures_and_the_embedded_default() {
    let out = Command::new(kalmar_bin())
        .arg("check-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("listen = \"127.0.0.1:3128\""), "{text}");
    for file in fixtures("valid") {
        let out = Command::new(kalmar_bin())
            .arg("check-config")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn check_config_rejects_invalid_fixtures_naming_the_key() {
    // Each fixture with the start of its error line: the key as written in the file,
    // then what is wrong, with the accepted values where there is a fixed set.
    let expect = [
        (
            "bad_action.toml",
            "rules[0].action: unknown value \"alow\", expected one of: allow, deny, report",
        ),
        (
            "bad_direct.toml",
            "upstream.direct[1]: \"10.0.0.0/99\": not a CIDR",
        ),
        (
            "bad_duration.toml",
            "timeouts.connect: invalid value \"ten seconds\", expected a duration",
        ),
        (
            "bad_format.toml",
            "access_log.format: unknown value \"xml\", expected one of: json, squid, combined",
        ),
        (
            "bad_listen.toml",
            "server.listen: \"not-an-address\": invalid socket address syntax",
        ),
        (
            "bad_nameserver.toml",
            "dns.nameservers[0]: \"dns.example.org\": not an IP address",
        ),
        (
            "bad_operator.toml",
            "rules[0].from.match_expressions[0].operator: unknown value \"Inn\", expected one of: In, NotIn, Exists, DoesNotExist",
        ),
        (
            "bad_port_range.toml",
            "rules[0].to.ports: invalid port range \"90-80\"",
        ),
        (
            "bad_parent.toml",
            "upstream.parents[1]: socks5://proxy.example.org:1080: unsupported scheme",
        ),
        (
            "bad_selection.toml",
            "upstream.selection: unknown value \"random\", expected one of: ordered, round-robin",
        ),
        ("cache_object_size.toml", "cache.max_object_size: 2.0 MiB"),
        (
            "not_toml.toml",
            "tests/fixtures/invalid/not_toml.toml:1:8: TOML syntax error: unclosed table",
        ),
        (
            "same_ports.toml",
            "server.admin_listen: 127.0.0.1:3128 is also server.listen",
        ),
        (
            "unknown_key.toml",
            "server.listne: unknown key, expected one of: listen, admin_listen,",
        ),
        (
            "unknown_nested_key.toml",
            "rules[0].to.prots: unknown key, expected one of: domains, cidrs, ports, methods, protocol, allow_missing_sni",
        ),
        (
            "tls_sni.toml",
            "tls.sni: unknown value \"loose\", expected one of: exact, same-rule, off",
        ),
        (
            "allow_missing_sni_on_deny.toml",
            "rules[0].to.allow_missing_sni: has no effect on a deny rule",
        ),
    ];
    let files = fixtures("invalid");
    assert_eq!(
        files.len(),
        expect.len(),
        "every invalid fixture has its expectation"
    );
    for (name, want) in expect {
        let file = files.iter().find(|f| f.ends_with(name)).unwrap();
        let out = Command::new(kalmar_bin())
            .arg("check-config")
            .arg(file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{name} should be rejected");
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err.trim_end();
        assert!(
            line.starts_with("invalid configuration: ") && line.contains(want),
            "{name}:\n  got  {line}\n  want {want}"
        );
        // No Rust-speak from the config crate: its key suffix and its enum wording.
        for rust in ["for key `", "variant constructor", "enum "] {
            assert!(!line.contains(rust), "{name}: {line}");
        }
        let key = want.split(": ").next().unwrap();
        assert_eq!(
            line.matches(key).count(),
            1,
            "{name}: key said once: {line}"
        );
    }
    let out = Command::new(kalmar_bin())
        .args(["check-config", "/nonexistent/kalmar.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/kalmar.toml"));
}

#[test]
fn environment_overrides_win_over_file_and_default() {
    let out = Command::new(kalmar_bin())
        .arg("check-config")
        .arg(
            fixtures("valid")
                .iter()
                .find(|f| f.ends_with("minimal.toml"))
                .unwrap(),
        )
        .env("KALMAR_SERVER__LISTEN", "127.0.0.1:4128")
        .env("KALMAR_TIMEOUTS__CONNECT", "3s")
        .env("KALMAR_DNS__NAMESERVERS", "127.0.0.1:5353,127.0.0.2")
        // Not config keys: the log filter, and what Kubernetes service links inject.
        .env("KALMAR_LOG", "debug")
        .env("KALMAR_PORT_3128_TCP_ADDR", "10.0.0.1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("listen = \"127.0.0.1:4128\""), "{text}");
    assert!(text.contains("connect = \"3s\""), "{text}");
    assert!(text.contains("\"127.0.0.2:53\""), "{text}");

    let out = Command::new(kalmar_bin())
        .arg("check-config")
        .env("KALMAR_SERVER__MAX_CONNECTIONS", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_connections"));
}

#[test]
fn version_flag() {
    let out = Command::new(kalmar_bin())
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_and_exits_zero_on_sigterm() {
    let origin = support::origin::Origin::start().await;
    let (port, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kalmar.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nworkers = 1\n\
             [dns]\nnameservers = [\"127.0.0.1:1\"]\nuse_hosts_file = false\n\
             [destinations]\nallowed_cidrs = [\"127.0.0.0/8\"]\n"
        ),
    )
    .unwrap();
    let child = Command::new(kalmar_bin())
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let proxy = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "kalmar did not start listening");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = support::client_via(&proxy)
        .get(origin.url("/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "hello");
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(status.status.success(), "exit status {:?}", status.status);
    // The access log went to stdout (the default), one JSON object per line.
    let stdout = String::from_utf8_lossy(&status.stdout);
    let line: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(line["status"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_a_tunnel_finish() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut kalmar = Kalmar::start("[server]\nshutdown_grace = \"20s\"");
    let mut s = tokio::net::TcpStream::connect(kalmar.addr).await.unwrap();
    s.write_all(format!("CONNECT {addr} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "tunnel closed early");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"));

    let proxy_addr = kalmar.addr;
    let admin = kalmar.admin;
    kalmar.handle().begin_shutdown();
    assert!(!kalmar.handle().is_ready());
    // Readiness turns false at once, so Kubernetes stops sending traffic.
    let ready = support::raw_exchange(
        admin,
        b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    // New clients are no longer accepted...
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = tokio::net::TcpStream::connect(proxy_addr).await;
    if let Ok(mut c) = refused {
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut buf)).await;
        assert!(buf.is_empty(), "a new client was served during shutdown");
    }
    // ...but the tunnel in flight still works.
    s.write_all(b"still-open").await.unwrap();
    let mut echo = [0u8; 10];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"still-open");

    let started = Instant::now();
    let shutdown = std::thread::spawn(move || kalmar.shutdown());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!shutdown.is_finished(), "shutdown must wait for the tunnel");
    drop(s);
    tokio::task::spawn_blocking(move || shutdown.join().unwrap())
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_does_not_hold_up_shutdown() {
    let mut kalmar =
        Kalmar::start("[timeouts]\nrequest_header = \"30s\"\n[server]\nshutdown_grace = \"20s\"");
    let _silent = tokio::net::TcpStream::connect(kalmar.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    tokio::task::spawn_blocking(move || kalmar.shutdown())
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
}

/// Run the serving binary with stderr on a pipe (as in a pod) and `env`, make it log
/// (start, one request, SIGTERM), and return what it wrote to stderr.
async fn serving_stderr(env: &[(&str, &str)]) -> String {
    let origin = support::origin::Origin::start().await;
    let (port, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kalmar.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nworkers = 1\n\
             [dns]\nnameservers = [\"127.0.0.1:1\"]\nuse_hosts_file = false\n\
             [destinations]\nallowed_cidrs = [\"127.0.0.0/8\"]\n\
             [access_log]\npath = {:?}\n",
            dir.path().join("access.log").display().to_string()
        ),
    )
    .unwrap();
    let child = Command::new(kalmar_bin())
        .arg("--config")
        .arg(&config)
        .envs(env.iter().copied())
        .env_remove("KALMAR_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "kalmar did not start listening");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = support::client_via(&format!("http://127.0.0.1:{port}"))
        .get(origin.url("/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "exit status {:?}", out.status);
    String::from_utf8(out.stderr).expect("diagnostics are UTF-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnostics_on_a_pipe_carry_no_colour_codes() {
    for env in [&[][..], &[("KALMAR_LOG_FORMAT", "text")][..]] {
        let stderr = serving_stderr(env).await;
        assert!(stderr.contains("kalmar is serving"), "{stderr}");
        assert!(stderr.contains("shutting down"), "{stderr}");
        assert!(
            !stderr.contains('\u{1b}'),
            "escape codes on a pipe: {stderr:?}"
        );
    }
    // The same for a diagnostic written before anything is served.
    let out = Command::new(kalmar_bin())
        .arg("--config")
        .arg(
            fixtures("invalid")
                .iter()
                .find(|f| f.ends_with("bad_action.toml"))
                .unwrap(),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ERROR") && stderr.contains("rules[0].action"),
        "{stderr}"
    );
    assert!(!stderr.contains('\u{1b}'), "{stderr:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_diagnostics_one_object_per_line() {
    let stderr = serving_stderr(&[("KALMAR_LOG_FORMAT", "json")]).await;
    assert!(!stderr.contains('\u{1b}'), "{stderr:?}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let serving = lines
        .iter()
        .find(|l| l["message"] == "kalmar is serving")
        .unwrap_or_else(|| panic!("no start line: {stderr}"));
    assert_eq!(serving["level"], "INFO");
    assert_eq!(serving["workers"], 1);
    assert!(
        serving["listen"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(serving["timestamp"].is_string());
    assert!(
        lines.iter().any(|l| l["message"] == "shutting down"),
        "{stderr}"
    );

    let out = Command::new(kalmar_bin())
        .arg("check-config")
        .env("KALMAR_LOG_FORMAT", "yaml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("KALMAR_LOG_FORMAT: unknown value \"yaml\", expected one of: text, json")
    );
}
