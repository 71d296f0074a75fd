//! The tunnel ClientHello check with real TLS clients through the real proxy: curl, openssl
//! s_client and Python's ssl (a hello split over many segments), plaintext and silence into a
//! TLS port, a crafted ECH hello, report rules, reload, metrics, `explain --sni`. Each case ends
//! with its access-log line.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::origin::{Origin, TlsOrigin};
use support::{Kalmar, curl, have_tool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Names the test DNS answers with loopback, the check on every port, a short hello timeout,
/// and one rule per option.
const TLS_CONFIG: &str = r#"
[dns]
nameservers = ["127.0.0.1:1"]
use_hosts_file = false
hosts = { "allowed.test" = ["127.0.0.1"], "other.test" = ["127.0.0.1"], "any.test" = ["127.0.0.1"], "report.test" = ["127.0.0.1"], "nosni.test" = ["127.0.0.1"] }
[tls]
ports = ["1-65535"]
client_hello_timeout = "1s"

[[rules]]
name = "anything-goes"
action = "allow"
to = { domains = ["any.test"], protocol = "any" }

[[rules]]
name = "trial"
action = "report"
to = { domains = ["report.test"] }

[[rules]]
name = "no-sni"
action = "allow"
to = { domains = ["nosni.test"], allow_missing_sni = true }

[[rules]]
name = "loopback"
action = "allow"
"#;

const NAMES: &[&str] = &[
    "allowed.test",
    "other.test",
    "report.test",
    "localhost",
    "127.0.0.1",
];

fn start(extra: &str) -> Kalmar {
    Kalmar::start(&support::merge(TLS_CONFIG, extra))
}

/// The one CONNECT line of the access log (waits for it).
fn tunnel_line(kalmar: &Kalmar) -> Value {
    let lines = kalmar.log_lines(1);
    let tunnels: Vec<&Value> = lines.iter().filter(|l| l["method"] == "CONNECT").collect();
    assert_eq!(tunnels.len(), 1, "{lines:?}");
    tunnels[0].clone()
}

/// The kinds a tunnel closed at the ClientHello check is logged with.
const CHECK_KINDS: [&str; 7] = [
    "sni-mismatch",
    "sni-missing",
    "not-tls",
    "client-hello-invalid",
    "ech-denied",
    "client-hello-timeout",
    "client-aborted",
];

/// The tunnel passed the check. (Its `error` may still be `tunnel-error`: a TLS client that
/// closes with bytes in flight ends the relay with a reset, check or no check.)
fn check_passed(line: &Value) -> bool {
    line["verdict"] != "deny" && !CHECK_KINDS.contains(&line["error"].as_str().unwrap_or(""))
}

fn ca_file(origin: &TlsOrigin) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, &origin.cert_pem).expect("write ca");
    let path = path.display().to_string();
    (dir, path)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

async fn metrics(kalmar: &Kalmar) -> String {
    let url = format!("http://{}/metrics", kalmar.admin);
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .get(url)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_to_the_allowed_name_works_and_its_sni_and_alpn_are_logged() {
    if !have_tool("curl", "apt-get install curl") {
        return;
    }
    let origin = TlsOrigin::start_for(NAMES).await;
    let kalmar = start("");
    let (_dir, ca) = ca_file(&origin);
    let url = format!("https://allowed.test:{}/hello", origin.addr.port());
    let proxy = kalmar.url();
    let resolve = format!("allowed.test:{}:127.0.0.1", origin.addr.port());
    let (code, out, err) = blocking(move || {
        curl(&[
            "-p",
            "-x",
            &proxy,
            "--resolve",
            &resolve,
            "--cacert",
            &ca,
            &url,
        ])
    })
    .await;
    assert_eq!((code, out.as_str()), (0, "hello"), "{err}");
    let line = tunnel_line(&kalmar);
    assert_eq!(line["verdict"], "allow", "{line}");
    assert_eq!(line["sni"], "allowed.test", "{line}");
    let alpn = line["alpn"].as_array().expect("alpn list");
    assert!(alpn.iter().any(|p| p == "http/1.1"), "{line}");
    assert!(check_passed(&line), "{line}");
    assert!(
        metrics(&kalmar)
            .await
            .contains("kalmar_tunnel_tls_checks_total{result=\"exact\"} 1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_connect_to_with_another_name_is_closed_as_sni_mismatch() {
    if !have_tool("curl", "apt-get install curl") {
        return;
    }
    let origin = TlsOrigin::start_for(NAMES).await;
    let kalmar = start("");
    let (_dir, ca) = ca_file(&origin);
    let port = origin.addr.port();
    // The URL (and so the SNI) names other.test; the tunnel goes to allowed.test.
    let url = format!("https://other.test:{port}/hello");
    let connect_to = format!("other.test:{port}:allowed.test:{port}");
    let proxy = kalmar.url();
    let (code, out, err) = blocking(move || {
        curl(&[
            "-p",
            "-x",
            &proxy,
            "--connect-to",
            &connect_to,
            "--cacert",
            &ca,
            &url,
        ])
    })
    .await;
    assert_ne!(code, 0, "the tunnel must not carry it: {out} {err}");
    let line = tunnel_line(&kalmar);
    assert_eq!(line["target"], format!("allowed.test:{port}"), "{line}");
    assert_eq!(line["sni"], "other.test", "{line}");
    assert_eq!(line["verdict"], "deny", "{line}");
    assert_eq!(line["error"], "sni-mismatch", "{line}");
    assert_eq!(line["reason"], "sni-mismatch", "{line}");
    assert_eq!(
        line["bytes_to_client"], 0,
        "nothing from the origin: {line}"
    );
    let text = metrics(&kalmar).await;
    assert!(text.contains("kalmar_tunnel_tls_checks_total{result=\"sni-mismatch\"} 1"));
    assert!(text.contains("kalmar_denied_total{reason=\"sni-mismatch\"} 1"));
}

/// `openssl s_client -proxy` through Kalmar: (exit code, stdout+stderr).
fn s_client(proxy: SocketAddr, connect: &str, servername: Option<&str>) -> (i32, String) {
    let mut cmd = std::process::Command::new("openssl");
    cmd.args([
        "s_client",
        "-proxy",
        &proxy.to_string(),
        "-connect",
        connect,
    ]);
    match servername {
        Some(name) => cmd.args(["-servername", name]),
        None => cmd.arg("-noservername"),
    };
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl runs");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_with_another_servername_is_closed_and_the_right_one_passes() {
    if !have_tool("openssl", "apt-get install openssl") {
        return;
    }
    let origin = TlsOrigin::start_for(NAMES).await;
    let kalmar = start("");
    let addr = kalmar.addr;
    let connect = format!("allowed.test:{}", origin.addr.port());
    let (code, out) = blocking({
        let connect = connect.clone();
        move || s_client(addr, &connect, Some("other.test"))
    })
    .await;
    assert!(!out.contains("Server certificate"), "{code}: {out}");
    let line = tunnel_line(&kalmar);
    assert_eq!(line["sni"], "other.test", "{line}");
    assert_eq!(line["error"], "sni-mismatch", "{line}");
    assert_eq!(line["verdict"], "deny", "{line}");

    let kalmar = start("");
    let addr = kalmar.addr;
    let (code, out) = blocking(move || s_client(addr, &connect, Some("allowed.test"))).await;
    assert!(out.contains("Server certificate"), "{code}: {out}");
    let line = tunnel_line(&kalmar);
    assert_eq!(line["sni"], "allowed.test", "{line}");
    assert_eq!(line["verdict"], "allow", "{line}");
    assert!(check_passed(&line), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_is_not_upgraded_by_a_name_and_a_hello_without_sni_needs_an_opt_in() {
    if !have_tool("openssl", "apt-get install openssl") {
        return;
    }
    let origin = TlsOrigin::start_for(NAMES).await;
    let port = origin.addr.port();
    let cases = [
        // (CONNECT target, servername, verdict, error)
        (
            format!("127.0.0.1:{port}"),
            Some("allowed.test"),
            "deny",
            Some("sni-mismatch"),
        ),
        (format!("127.0.0.1:{port}"), None, "allow", None),
        (
            format!("allowed.test:{port}"),
            None,
            "deny",
            Some("sni-missing"),
        ),
        (format!("nosni.test:{port}"), None, "allow", None),
    ];
    for (connect, servername, verdict, error) in cases {
        let kalmar = start("");
        let addr = kalmar.addr;
        let (code, out) = blocking({
            let connect = connect.clone();
            move || s_client(addr, &connect, servername)
        })
        .await;
        let line = tunnel_line(&kalmar);
        assert_eq!(line["verdict"], verdict, "{connect} {servername:?}: {line}");
        match error {
            Some(kind) => assert_eq!(line["error"], kind, "{connect} {servername:?}: {line}"),
            None => assert!(check_passed(&line), "{connect} {servername:?}: {line}"),
        }
        assert_eq!(
            out.contains("Server certificate"),
            verdict == "allow",
            "{connect} {servername:?}: {code} {out}"
        );
    }
}

/// A Python `ssl` client whose ClientHello goes out in 7-byte writes (TCP_NODELAY), so it
/// reaches Kalmar over dozens of segments; then a GET. Prints `segments=N` and the body.
const PY_SPLIT_CLIENT: &str = r#"
import socket, ssl, sys, time
proxy_port, target, sni, cafile = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
s = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
head = b""
while not head.endswith(b"\r\n\r\n"):
    b = s.recv(1)
    if not b:
        sys.exit("proxy closed before answering")
    head += b
if not head.startswith(b"HTTP/1.1 200"):
    sys.exit(f"CONNECT refused: {head!r}")
ctx = ssl.create_default_context(cafile=cafile)
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
hello_segments = 0
def flush(split):
    global hello_segments
    data = outgoing.read()
    step = 7 if split else max(len(data), 1)
    for i in range(0, len(data), step):
        s.sendall(data[i:i + step])
        if split:
            hello_segments += 1
            time.sleep(0.002)
first = True
while True:
    try:
        tls.do_handshake()
        flush(False)
        break
    except ssl.SSLWantReadError:
        flush(first)
        first = False
        data = s.recv(65536)
        if not data:
            sys.exit("closed during the handshake")
        incoming.write(data)
tls.write(f"GET /hello HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode())
flush(False)
reply = b""
while True:
    try:
        chunk = tls.read(65536)
        if not chunk:
            break
        reply += chunk
    except ssl.SSLWantReadError:
        data = s.recv(65536)
        if not data:
            break
        incoming.write(data)
    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
        break
print(f"segments={hello_segments}")
print(reply.split(b"\r\n\r\n", 1)[-1].decode())
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_ssl_with_a_hello_split_over_many_segments_passes() {
    if !have_tool("python3", "apt-get install python3") {
        return;
    }
    let origin = TlsOrigin::start_for(NAMES).await;
    let kalmar = start("");
    let (_dir, ca) = ca_file(&origin);
    let proxy_port = kalmar.addr.port().to_string();
    let target = format!("allowed.test:{}", origin.addr.port());
    let out = blocking(move || {
        std::process::Command::new("python3")
            .args([
                "-c",
                PY_SPLIT_CLIENT,
                &proxy_port,
                &target,
                "allowed.test",
                &ca,
            ])
            .output()
            .expect("python3 runs")
    })
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let segments: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("segments="))
        .and_then(|n| n.parse().ok())
        .expect("segment count");
    assert!(segments > 20, "the hello went out in {segments} writes");
    assert!(stdout.trim_end().ends_with("hello"), "{stdout}");
    let line = tunnel_line(&kalmar);
    assert_eq!(line["sni"], "allowed.test", "{line}");
    assert_eq!(line["verdict"], "allow", "{line}");
    assert!(check_passed(&line), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_http_into_a_tls_port_is_closed_unless_the_rule_says_any() {
    let origin = Origin::start().await;
    let kalmar = start("");
    let get = |host: &str| {
        format!("GET /hello HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()
    };
    let target = format!("allowed.test:{}", origin.addr.port());
    let (mut s, head) = support::open_tunnel(kalmar.addr, &target).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(&get("allowed.test")).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    let line = tunnel_line(&kalmar);
    assert_eq!(line["error"], "not-tls", "{line}");
    assert_eq!(line["verdict"], "deny", "{line}");
    assert!(line["sni"].is_null() && line["alpn"].is_null(), "{line}");
    assert_eq!(
        origin
            .counters
            .requests
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the request never reached the origin"
    );

    // protocol = "any": the same bytes are relayed.
    let kalmar = start("");
    let target = format!("any.test:{}", origin.addr.port());
    let (mut s, head) = support::open_tunnel(kalmar.addr, &target).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(&get("any.test")).await.expect("write");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    assert!(answer.ends_with("hello"), "{answer}");
    drop(s);
    let line = tunnel_line(&kalmar);
    assert_eq!(line["verdict"], "allow", "{line}");
    assert!(line["error"].is_null(), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_speaks_first_is_relayed_at_once_under_protocol_any() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        s.write_all(b"SSH-2.0-test\r\n").await.expect("banner");
        let mut got = [0u8; 16];
        let n = s.read(&mut got).await.expect("read");
        s.write_all(&got[..n]).await.expect("echo");
    });
    let kalmar = start("[tls]\nclient_hello_timeout = \"5s\"");
    let started = Instant::now();
    let (mut s, head) = support::open_tunnel(kalmar.addr, &format!("any.test:{port}")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut banner = [0u8; 14];
    s.read_exact(&mut banner)
        .await
        .expect("banner through the tunnel");
    assert_eq!(&banner, b"SSH-2.0-test\r\n");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no wait for the client: {:?}",
        started.elapsed()
    );
    s.write_all(b"SSH-2.0-me\r\n").await.expect("write");
    let mut echo = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut echo)).await;
    assert_eq!(echo, b"SSH-2.0-me\r\n");
    drop(s);
    let line = tunnel_line(&kalmar);
    assert_eq!(line["verdict"], "allow", "{line}");
    assert!(line["error"].is_null(), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_nothing_is_closed_after_the_hello_timeout() {
    let origin = TlsOrigin::start_for(NAMES).await;
    let kalmar = start("");
    let target = format!("allowed.test:{}", origin.addr.port());
    let (mut s, head) = support::open_tunnel(kalmar.addr, &target).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "closed after {waited:?} (client_hello_timeout = 1s)"
    );
    assert!(rest.is_empty());
    let line = tunnel_line(&kalmar);
    assert_eq!(line["error"], "client-hello-timeout", "{line}");
    assert_eq!(line["verdict"], "deny", "{line}");
}

/// A ClientHello for `sni` that carries an `encrypted_client_hello` extension (0xfe0d) with
/// an outer-hello payload, in two records.
fn crafted_ech_hello(sni: &str) -> Vec<u8> {
    let mut ext = Vec::new();
    let mut push_ext = |kind: u16, data: &[u8]| {
        ext.extend_from_slice(&kind.to_be_bytes());
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(data);
    };
    let mut sni_data = ((sni.len() + 3) as u16).to_be_bytes().to_vec();
    sni_data.push(0);
    sni_data.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    sni_data.extend_from_slice(sni.as_bytes());
    push_ext(0, &sni_data);
    // ECHClientHello: outer, HPKE suite, config id, enc, payload.
    let mut ech = vec![0, 0, 1, 0, 1, 42, 0, 32];
    ech.extend_from_slice(&[9u8; 32]);
    ech.extend_from_slice(&[0, 64]);
    ech.extend_from_slice(&[5u8; 64]);
    push_ext(0xfe0d, &ech);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[1u8; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut message = vec![1];
    message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    message.extend_from_slice(&body);
    let (a, b) = message.split_at(message.len() / 2);
    let mut flight = Vec::new();
    for part in [a, b] {
        flight.extend_from_slice(&[22, 3, 1]);
        flight.extend_from_slice(&(part.len() as u16).to_be_bytes());
        flight.extend_from_slice(part);
    }
    flight
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ech_is_denied_by_default_and_forwarded_unchanged_when_allowed() {
    // An origin that reports the bytes it receives.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
                let _ = tx.send(got);
            });
        }
    });
    let hello = crafted_ech_hello("allowed.test");
    let target = format!("allowed.test:{port}");

    let kalmar = start("");
    let (mut s, head) = support::open_tunnel(kalmar.addr, &target).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(&hello).await.expect("write");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    let line = tunnel_line(&kalmar);
    assert_eq!(line["error"], "ech-denied", "{line}");
    assert_eq!(line["sni"], "allowed.test", "the outer name: {line}");
    assert_eq!(line["verdict"], "deny", "{line}");
    let received = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("origin connection ended")
        .expect("bytes");
    assert!(
        received.is_empty(),
        "nothing forwarded: {} bytes",
        received.len()
    );

    let kalmar = start("[tls]\nech = \"allow\"");
    let (mut s, head) = support::open_tunnel(kalmar.addr, &target).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(&hello).await.expect("write");
    s.shutdown().await.expect("half-close");
    let received = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("origin connection ended")
        .expect("bytes");
    assert_eq!(received, hello, "forwarded byte for byte");
    drop(s);
    let line = tunnel_line(&kalmar);
    assert_eq!(line["verdict"], "allow", "{line}");
    assert!(line["error"].is_null(), "{line}");
    assert_eq!(line["bytes_from_client"], hello.len(), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_rule_relays_a_mismatch_logs_it_and_counts_it() {
    if !have_tool("openssl", "apt-get install openssl") {
        return;
    }
    let origin = TlsOrigin::start_for(NAMES).await;
    let kalmar = start("");
    let addr = kalmar.addr;
    let connect = format!("report.test:{}", origin.addr.port());
    let (code, out) = blocking(move || s_client(addr, &connect, Some("other.test"))).await;
    assert!(out.contains("Server certificate"), "relayed: {code} {out}");
    let line = tunnel_line(&kalmar);
    assert_eq!(line["verdict"], "report", "{line}");
    assert_eq!(line["reason"], "sni-mismatch", "{line}");
    assert_eq!(line["rule"], "trial", "{line}");
    assert_eq!(line["sni"], "other.test", "{line}");
    let text = metrics(&kalmar).await;
    assert!(
        text.contains("kalmar_would_deny_total{reason=\"sni-mismatch\"} 1"),
        "{text}"
    );
    assert!(text.contains("kalmar_tunnel_tls_checks_total{result=\"sni-mismatch\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sni_is_reloadable() {
    if !have_tool("openssl", "apt-get install openssl") {
        return;
    }
    let origin = TlsOrigin::start_for(NAMES).await;
    let kalmar = start("");
    let connect = format!("allowed.test:{}", origin.addr.port());
    let text = std::fs::read_to_string(&kalmar.config_path).expect("config");
    let off = text.replace("[tls]\n", "[tls]\nsni = \"off\"\n");
    assert_ne!(off, text);
    std::fs::write(&kalmar.config_path, off).expect("write config");
    kalmar.handle().reload().expect("reload");
    let addr = kalmar.addr;
    let (code, out) = blocking(move || s_client(addr, &connect, Some("other.test"))).await;
    assert!(out.contains("Server certificate"), "{code} {out}");
    let line = tunnel_line(&kalmar);
    assert_eq!(line["verdict"], "allow", "{line}");
    assert_eq!(line["sni"], "other.test", "{line}");
    assert!(
        metrics(&kalmar)
            .await
            .contains("kalmar_tunnel_tls_checks_total{result=\"off\"} 1")
    );

    // An invalid [tls] keeps the running configuration.
    let text = std::fs::read_to_string(&kalmar.config_path).expect("config");
    std::fs::write(
        &kalmar.config_path,
        text.replace(
            "client_hello_timeout = \"1s\"",
            "client_hello_timeout = \"0s\"",
        ),
    )
    .expect("write config");
    let err = kalmar.handle().reload().expect_err("refused");
    assert!(err.contains("tls.client_hello_timeout"), "{err}");
}

#[test]
fn explain_sni_says_what_the_check_would_decide() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("kalmar.toml");
    std::fs::write(
        &config,
        format!("{TLS_CONFIG}\n[destinations]\nallowed_cidrs = [\"127.0.0.0/8\"]\n"),
    )
    .expect("write");
    let explain = |target: &str, sni: &str| {
        let out = std::process::Command::new(support::kalmar_bin())
            .args(["--config", config.to_str().expect("path")])
            .args(["explain", "--from", "127.0.0.1", target, "--sni", sni])
            .output()
            .expect("explain runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = explain("allowed.test:443", "other.test");
    assert!(text.contains("deny (sni-mismatch)"), "{text}");
    assert!(text.contains("tls.sni = exact"), "{text}");
    let text = explain("allowed.test:443", "Allowed.Test.");
    assert!(text.contains("allow (exact)"), "{text}");
    let text = explain("allowed.test:443", "");
    assert!(text.contains("deny (sni-missing)"), "{text}");
    let text = explain("nosni.test:443", "");
    assert!(text.contains("allow (missing-sni-allowed)"), "{text}");
    let text = explain("report.test:443", "other.test");
    assert!(text.contains("report (sni-mismatch)"), "{text}");
}

/// A minimal plain-HTTP parent proxy: answers a CONNECT with 200 and splices to the target.
async fn fake_parent() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head.split_whitespace().nth(1).unwrap_or_default();
                let port = target.rsplit(':').next().unwrap_or_default();
                let Ok(mut origin) =
                    tokio::net::TcpStream::connect(format!("127.0.0.1:{port}")).await
                else {
                    return;
                };
                let _ = client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut origin).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_check_runs_for_tunnels_through_a_parent_too() {
    if !have_tool("openssl", "apt-get install openssl") {
        return;
    }
    let origin = TlsOrigin::start_for(NAMES).await;
    let parent = fake_parent().await;
    let extra = format!("[upstream]\nparents = [\"{parent}\"]\n");
    let connect = format!("allowed.test:{}", origin.addr.port());
    for (servername, verdict, error) in [
        ("allowed.test", "allow", None),
        ("other.test", "deny", Some("sni-mismatch")),
    ] {
        let kalmar = start(&extra);
        let addr = kalmar.addr;
        let (code, out) = blocking({
            let connect = connect.clone();
            move || s_client(addr, &connect, Some(servername))
        })
        .await;
        assert_eq!(
            out.contains("Server certificate"),
            verdict == "allow",
            "{code} {out}"
        );
        let line = tunnel_line(&kalmar);
        assert_eq!(line["route"], parent.to_string(), "{line}");
        assert_eq!(line["verdict"], verdict, "{line}");
        match error {
            Some(kind) => assert_eq!(line["error"], kind, "{line}"),
            None => assert!(check_passed(&line), "{line}"),
        }
        assert_eq!(line["sni"], servername, "{line}");
    }
}
