//! Shared test harness: Kalmar in-process on 127.0.0.1:0, real origin servers (plain and
//! TLS) on loopback, a loopback DNS server, and helpers for real clients (reqwest, curl).
#![allow(dead_code)]

pub mod dns;
pub mod kube_api;
pub mod origin;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kalmar::config::Config;
use kalmar::state::ConfigSource;

/// The test configuration every Kalmar in the tests starts from. Loopback is where the
/// test origins live, so it is opened explicitly; DNS goes to a dead loopback port unless
/// a test starts its own server, so no query can ever leave the machine.
pub const BASE_CONFIG: &str = r#"
[server]
workers = 2
shutdown_grace = "5s"
[dns]
nameservers = ["127.0.0.1:1"]
use_hosts_file = false
[destinations]
allowed_cidrs = ["127.0.0.0/8", "::1/128"]
connect_ports = ["1-65535"]
[tls]
# Every port is a CONNECT port here (origins listen on random ones); the ClientHello check
# stays on 443 unless a test opens it wider (tests/tunnel_tls.rs does).
ports = ["443"]
"#;

pub struct Kalmar {
    handle: Option<kalmar::ServerHandle>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub log_path: PathBuf,
    pub config_path: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Kalmar {
    /// Start with [`BASE_CONFIG`] plus `extra` (TOML; later keys win) and a JSON access
    /// log in a temporary directory.
    pub fn start(extra: &str) -> Kalmar {
        Self::start_with(BASE_CONFIG, extra)
    }

    /// Start with exactly `base` + `extra` over the embedded default.
    pub fn start_with(base: &str, extra: &str) -> Kalmar {
        let dir = tempfile::tempdir().expect("tempdir");
        let log_path = dir.path().join("access.log");
        let config_path = dir.path().join("kalmar.toml");
        let text = merge_toml(base, extra, &log_path);
        std::fs::write(&config_path, &text).expect("write config");
        let config = Config::load_with_env(Some(&config_path), std::iter::empty())
            .expect("test config is valid");
        let listeners = kalmar::Listeners {
            proxy: std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy"),
            admin: std::net::TcpListener::bind("127.0.0.1:0").expect("bind admin"),
        };
        let handle = kalmar::start(
            config,
            ConfigSource {
                path: Some(config_path.clone()),
            },
            listeners,
        )
        .expect("start kalmar");
        Kalmar {
            addr: handle.proxy_addr,
            admin: handle.admin_addr,
            handle: Some(handle),
            log_path,
            config_path,
            dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn handle(&self) -> &kalmar::ServerHandle {
        self.handle.as_ref().expect("running")
    }

    /// A reqwest client that sends everything (plain and CONNECT) through this proxy.
    pub fn client(&self) -> reqwest::Client {
        client_via(&self.url())
    }

    /// Wait until the access log has at least `n` lines and return them parsed.
    pub fn log_lines(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
            let lines: Vec<serde_json::Value> = text
                .lines()
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_str(l).expect("json log line"))
                .collect();
            if lines.len() >= n || Instant::now() > deadline {
                assert!(
                    lines.len() >= n,
                    "expected {n} access-log lines, got {}: {text}",
                    lines.len()
                );
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Graceful shutdown, waiting for it to finish.
    pub fn shutdown(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown();
        }
    }
}

impl Drop for Kalmar {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.begin_shutdown();
            // Tests that end with tunnels or connections open need not wait for the grace.
            std::thread::spawn(move || handle.shutdown());
        }
    }
}

/// `base`, the access-log section, then `extra`, as one TOML document. Tables named in
/// both are merged by the `config` crate's layering when `extra` is a separate layer, so
/// here the simplest correct thing is to let later tables win key by key.
fn merge_toml(base: &str, extra: &str, log_path: &std::path::Path) -> String {
    let mut doc: toml::Table = base.parse().expect("base toml");
    let log: toml::Table = format!(
        "[access_log]\nformat = \"json\"\npath = {:?}\n",
        log_path.display().to_string()
    )
    .parse()
    .expect("log toml");
    let extra: toml::Table = extra.parse().expect("extra toml");
    for layer in [log, extra] {
        merge_into(&mut doc, layer);
    }
    doc.to_string()
}

/// `extra` over `base` (both TOML), table by table and key by key, as one document.
pub fn merge(base: &str, extra: &str) -> String {
    let mut doc: toml::Table = base.parse().expect("base toml");
    merge_into(&mut doc, extra.parse().expect("extra toml"));
    doc.to_string()
}

fn merge_into(doc: &mut toml::Table, layer: toml::Table) {
    for (key, value) in layer {
        match (doc.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(new)) => {
                merge_into(existing, new)
            }
            (_, value) => {
                doc.insert(key, value);
            }
        }
    }
}

pub fn client_via(proxy: &str) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(proxy).expect("proxy url"))
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Whether this is a CI run: `CI` is `true` or `1`, as CI services set it (and `.ci/run`
/// exports it). Then a test whose tool is missing fails instead of skipping.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// `tool` is not installed: under CI this panics (the test fails); elsewhere it says the
/// test is skipped, and the caller returns.
pub fn tool_missing(tool: &str, install: &str) {
    assert!(
        !in_ci(),
        "{tool} is not installed, and this is CI (CI=true): {install} (.ci/run installs it)"
    );
    eprintln!("SKIPPED: {tool} is not installed ({install}); with CI=true this test fails");
}

/// Run the `curl` binary with `args`; returns (exit status, stdout, stderr).
pub fn curl(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl is installed");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Send raw bytes to `addr` and read the answer until the peer closes (or 10 s).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The kalmar binary built by cargo for integration tests.
pub fn kalmar_bin() -> &'static str {
    env!("CARGO_BIN_EXE_kalmar")
}

/// Kalmar as a separate process (the built binary), for what needs a process of its own:
/// signals, exit codes, its own memory figures.
pub struct KalmarProcess {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

impl KalmarProcess {
    /// Start `kalmar --config <file>` with [`BASE_CONFIG`] plus `extra`, a file access
    /// log, and free loopback ports; returns once `/readyz` answers 200.
    pub fn spawn(extra: &str) -> KalmarProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let log_path = dir.path().join("access.log");
        let config_path = dir.path().join("kalmar.toml");
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let (addr, admin) = (free(), free());
        let ports = format!("[server]\nlisten = \"{addr}\"\nadmin_listen = \"{admin}\"\n");
        let mut text = merge_toml(BASE_CONFIG, &ports, &log_path);
        text = merge_toml(&text, extra, &log_path);
        std::fs::write(&config_path, text).expect("write config");
        let child = std::process::Command::new(kalmar_bin())
            .arg("--config")
            .arg(&config_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn kalmar");
        let process = KalmarProcess {
            child,
            addr,
            admin,
            dir,
            config_path,
            log_path,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(admin) {
                use std::io::{Read, Write};
                let _ =
                    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                if out.starts_with("HTTP/1.1 200") {
                    return process;
                }
            }
            assert!(
                Instant::now() < deadline,
                "kalmar process did not become ready"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// A figure from /proc/PID/status in KiB (VmRSS, VmHWM).
    pub fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

impl Drop for KalmarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A reqwest client through `proxy` whose connections come from `source` (127.0.0.x),
/// so that Kalmar sees a distinct client address.
pub fn client_from(proxy: &str, source: &str) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(proxy).expect("proxy url"))
        .local_address(source.parse::<std::net::IpAddr>().expect("source ip"))
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// The config every test starts from, without the loopback opening: the default
/// destination guard (every non-public range denied) stays in force.
pub const GUARDED_CONFIG: &str = r#"
[server]
workers = 2
shutdown_grace = "5s"
[dns]
nameservers = ["127.0.0.1:1"]
use_hosts_file = false
"#;

/// Send `CONNECT target` through `proxy`; returns the stream after the response head, and
/// the head (read byte by byte, so no tunnel bytes are consumed; 10 s at most).
pub async fn open_tunnel(proxy: SocketAddr, target: &str) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

/// Send `CONNECT target` and return the response head only (the tunnel, if any, is closed).
pub async fn connect_head(proxy: SocketAddr, target: &str) -> String {
    open_tunnel(proxy, target).await.1
}

/// A listener that never accepts, with its accept queue filled: SYNs to it go unanswered,
/// so a connect to it times out (while staying on loopback).
pub fn black_hole() -> (socket2::Socket, SocketAddr, Vec<std::net::TcpStream>) {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("addr").into())
        .expect("bind");
    socket.listen(0).expect("listen");
    let addr = socket
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("inet");
    let mut fillers = Vec::new();
    for _ in 0..8 {
        if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            fillers.push(s);
        }
    }
    (socket, addr, fillers)
}

/// The `X-Kalmar-Error` kind of a response ("" when absent).
pub fn error_kind(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-kalmar-error")
        .map(|v| v.to_str().unwrap_or("?").to_owned())
        .unwrap_or_default()
}

/// Is the program `tool` on the PATH? When it is not, [`tool_missing`] decides: the test
/// fails under CI, and is skipped with a message elsewhere.
pub fn have_tool(tool: &str, install: &str) -> bool {
    // Spawning is the test: whatever `--version` answers, the program is there.
    let found = std::process::Command::new(tool)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !found {
        tool_missing(tool, install);
    }
    found
}

/// The sum of the samples of `name` carrying every one of `labels` (text exposition format).
pub fn metric(kalmar: &Kalmar, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = kalmar.handle().metrics().encode();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let wanted = labels
                .iter()
                .all(|(k, v)| label_text.split(',').any(|p| p == format!("{k}=\"{v}\"")));
            (metric == name && wanted).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}
