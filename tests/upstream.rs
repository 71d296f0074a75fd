//! Upstream chaining against real parents: a second Kalmar, a TLS-terminated parent with a
//! CA made at test time, and Debian's Squid with Basic authentication (`basic_ncsa_auth`).

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kalmar::config::Config;
use support::origin::{Origin, TlsOrigin};
use support::{Kalmar, client_via, curl};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn upstream(parents: &[String], extra: &str) -> String {
    let list: Vec<String> = parents.iter().map(|p| format!("{p:?}")).collect();
    format!("[upstream]\nparents = [{}]\n{extra}", list.join(", "))
}

// --- Kalmar chained to Kalmar ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chained_to_a_second_kalmar() {
    let origin = Origin::start().await;
    let tls_origin = TlsOrigin::start().await;
    let parent = Kalmar::start("");
    let kalmar = Kalmar::start(&upstream(&[format!("http://{}", parent.addr)], ""));
    let client = kalmar.client();

    let r = client.get(origin.url("/headers")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = r.text().await.unwrap();
    // The origin got origin-form from the parent, with both proxies in Via.
    assert!(seen.starts_with("GET /headers"), "{seen}");
    assert!(seen.contains("via: 1.1 kalmar, 1.1 kalmar"), "{seen}");

    let url = format!("https://127.0.0.1:{}/hello", tls_origin.addr.port());
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "hello");

    drop(client); // a tunnel logs when it closes
    let label = parent.addr.to_string();
    let lines = kalmar.log_lines(2);
    assert!(
        lines.iter().all(|l| l["route"] == label.as_str()),
        "{lines:?}"
    );
    assert!(
        lines.iter().all(|l| l["resolved"] == label.as_str()),
        "{lines:?}"
    );
    let parent_lines = parent.log_lines(2);
    assert!(parent_lines.iter().all(|l| l["route"] == "direct"));
    // The parent got the CONNECT for the name as the client wrote it.
    assert!(
        parent_lines.iter().any(|l| l["method"] == "CONNECT"
            && l["target"] == format!("127.0.0.1:{}", tls_origin.addr.port())),
        "{parent_lines:?}"
    );
}

/// A parent that is a plain origin server shows exactly what Kalmar sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_with_credentials_over_one_pooled_connection() {
    let fake_parent = Origin::start().await;
    // Not resolved locally: the name goes to the parent as written.
    let kalmar = Kalmar::start(&upstream(
        &[format!("http://al%40ice:pw@{}", fake_parent.addr)],
        "check_resolved_destinations = false",
    ));
    let client = kalmar.client();
    for _ in 0..3 {
        let r = client
            .get("http://origin.test:8080/headers")
            .header("proxy-authorization", "Basic Y2xpZW50OnNlY3JldA==")
            .send()
            .await
            .unwrap();
        let seen = r.text().await.unwrap();
        assert!(
            seen.starts_with("GET http://origin.test:8080/headers HTTP/1.1"),
            "{seen}"
        );
        // al@ice:pw, the client's own credentials never passed on.
        assert!(
            seen.contains("proxy-authorization: Basic YWxAaWNlOnB3\n"),
            "{seen}"
        );
        assert_eq!(seen.matches("proxy-authorization").count(), 1, "{seen}");
        assert!(seen.contains("host: origin.test:8080"), "{seen}");
    }
    assert_eq!(fake_parent.connections(), 1, "keep-alive to the parent");
    let lines = kalmar.log_lines(3);
    let text = std::fs::read_to_string(&kalmar.log_path).unwrap();
    assert!(
        !text.contains("pw@") && !text.contains("YWxAaWNl"),
        "{text}"
    );
    assert_eq!(lines[0]["route"], fake_parent.addr.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_errors_become_upstream_kinds() {
    // A 407 from the parent (here: a Kalmar parent's generated error would be 403; a
    // fake parent answering 407 stands in for an authenticating proxy).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let body = "<html>parent login page</html>";
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 407 Proxy Authentication Required\r\nproxy-authenticate: Basic realm=x\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    let kalmar = Kalmar::start(&upstream(&[addr.to_string()], ""));
    let r = kalmar
        .client()
        .get("http://127.0.0.1:8080/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(support::error_kind(&r), "upstream-refused");
    let body = r.text().await.unwrap();
    assert!(
        body.contains("407") && body.contains(&addr.to_string()),
        "{body}"
    );
    assert!(!body.contains("login page"), "{body}");
    let (_s, head) = support::open_tunnel(kalmar.addr, "127.0.0.1:443").await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert!(head.contains("x-kalmar-error: upstream-refused"), "{head}");

    // Nothing listening: upstream-unavailable; then the parent is marked down.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let kalmar = Kalmar::start(&upstream(&[closed.to_string()], ""));
    for expect in ["connection refused", "marked down"] {
        let r = kalmar
            .client()
            .get("http://127.0.0.1:8080/")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502);
        assert_eq!(support::error_kind(&r), "upstream-unavailable");
        let body = r.text().await.unwrap().to_lowercase();
        assert!(body.contains(expect), "{body}");
    }

    // A parent whose accept backlog is full: 504 upstream-timeout.
    let (_socket, hole, _fillers) = support::black_hole();
    let kalmar = Kalmar::start(&upstream(
        &[hole.to_string()],
        "[timeouts]\nconnect = \"500ms\"",
    ));
    let started = Instant::now();
    let r = kalmar
        .client()
        .get("http://127.0.0.1:8080/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(support::error_kind(&r), "upstream-timeout");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_round_robin_and_bypass() {
    let a = Origin::start().await;
    let b = Origin::start().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // Ordered: the dead first parent is skipped, then stays marked down.
    let kalmar = Kalmar::start(&upstream(&[closed.to_string(), a.addr.to_string()], ""));
    for _ in 0..2 {
        let r = kalmar
            .client()
            .get("http://127.0.0.1:8080/hello")
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), "hello");
    }
    assert_eq!(a.requests(), 2);

    // Round-robin spreads; `direct` goes around both parents.
    let direct_origin = Origin::start().await;
    let kalmar = Kalmar::start(&upstream(
        &[a.addr.to_string(), b.addr.to_string()],
        &format!(
            "selection = \"round-robin\"\ndirect = [\"127.0.0.1:{}\", \".bypass.test\"]",
            direct_origin.addr.port()
        ),
    ));
    let client = kalmar.client();
    for _ in 0..4 {
        let r = client
            .get("http://127.0.0.1:8080/hello")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!((a.requests(), b.requests()), (4, 2));
    let r = client
        .get(direct_origin.url("/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "hello");
    assert_eq!((a.requests(), b.requests()), (4, 2), "direct went around");
    assert_eq!(direct_origin.requests(), 1);
    let lines = kalmar.log_lines(5);
    assert_eq!(lines[4]["route"], "direct");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_destinations_stay_denied_through_a_parent() {
    let parent = Origin::start().await;
    let dns = support::dns::DnsServer::start(&[
        ("internal.test", &["10.1.2.3".parse().unwrap()]),
        (
            "mixed.test",
            &[
                "93.184.216.34".parse().unwrap(),
                "192.168.1.1".parse().unwrap(),
            ],
        ),
        ("public.test", &["93.184.216.34".parse().unwrap()]),
    ])
    .await;
    let extra = format!("[dns]\nnameservers = [\"{}\"]", dns.nameserver());
    let kalmar = Kalmar::start(&upstream(&[parent.addr.to_string()], &extra));
    let client = kalmar.client();
    for url in [
        "http://internal.test/",
        "http://mixed.test/",
        "http://10.9.9.9/",
        "http://169.254.169.254/latest/meta-data/",
    ] {
        let r = client.get(url).send().await.unwrap();
        assert_eq!(r.status(), 403, "{url}");
    }
    let (_s, head) = support::open_tunnel(kalmar.addr, "internal.test:443").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert_eq!(parent.requests(), 0, "nothing internal reached the parent");
    // Public, and unknown to local DNS (NXDOMAIN): the parent resolves it.
    for url in [
        "http://public.test/hello",
        "http://only-the-parent-knows.test/hello",
    ] {
        let r = client.get(url).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "hello", "{url}");
    }
    // Switched off: names are not resolved locally (literal IPs still are).
    let kalmar = Kalmar::start(&upstream(
        &[parent.addr.to_string()],
        &format!("check_resolved_destinations = false\n{extra}"),
    ));
    let r = kalmar
        .client()
        .get("http://internal.test/hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = kalmar
        .client()
        .get("http://10.9.9.9/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

// --- TLS to the parent ---------------------------------------------------------------------

/// A TLS terminator in front of `backend` with a certificate for `localhost` and
/// 127.0.0.1 issued by a CA made here; returns its address and the CA's PEM.
async fn tls_front(backend: SocketAddr) -> (SocketAddr, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kalmar test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let Ok(mut back) = TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut back).await;
            });
        }
    });
    (addr, ca.pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_parent_with_a_ca_made_at_test_time() {
    let origin = Origin::start().await;
    let tls_origin = TlsOrigin::start().await;
    let parent = Kalmar::start("");
    let (front, ca_pem) = tls_front(parent.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let kalmar = Kalmar::start(&upstream(
        &[format!("https://localhost:{}", front.port())],
        &format!(
            "ca_file = {:?}\n[dns]\nhosts = {{ \"localhost\" = [\"127.0.0.1\"] }}",
            ca_file.display().to_string()
        ),
    ));
    let client = kalmar.client();
    let r = client.get(origin.url("/hello")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "hello");
    let r = client
        .get(format!(
            "https://127.0.0.1:{}/hello",
            tls_origin.addr.port()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "hello");
    let r = client
        .get(origin.url(&format!("/bytes/{}", 3 * 1024 * 1024)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 3 * 1024 * 1024);
    drop(client);
    let lines = kalmar.log_lines(3);
    let label = format!("localhost:{}", front.port());
    assert!(
        lines.iter().all(|l| l["route"] == label.as_str()),
        "{lines:?}"
    );
    assert_eq!(parent.log_lines(3).len(), 3);

    // Without the CA the parent's certificate is not trusted: the parent is unusable.
    let untrusting = Kalmar::start(&upstream(
        &[format!("https://127.0.0.1:{}", front.port())],
        "",
    ));
    let r = untrusting
        .client()
        .get(origin.url("/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(support::error_kind(&r), "upstream-unavailable");
    assert!(r.text().await.unwrap().contains("TLS"));
}

// --- Squid as the institutional parent ----------------------------------------------------

const SQUID: &str = "/usr/sbin/squid";
const NCSA: &str = "/usr/lib/squid/basic_ncsa_auth";

/// Squid in the foreground on a free loopback port, Basic auth against an htpasswd file
/// made here, its pid file, logs and (memory-only) cache in a temp dir of its own.
struct Squid {
    child: Option<std::process::Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Squid {
    /// None (with a message) when Squid is not installed; under `CI=true` that fails.
    fn start(user: &str, password: &str) -> Option<Squid> {
        if !std::path::Path::new(SQUID).exists() || !std::path::Path::new(NCSA).exists() {
            support::tool_missing(&format!("squid ({SQUID}, {NCSA})"), "apt-get install squid");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name).display().to_string();
        let hash = std::process::Command::new("openssl")
            .args(["passwd", "-apr1", password])
            .output()
            .expect("openssl");
        let hash = String::from_utf8(hash.stdout).unwrap();
        std::fs::write(path("htpasswd"), format!("{user}:{}\n", hash.trim())).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        // Started as root, Squid drops to `proxy`, which must be able to write here.
        let root = running_as_root();
        let user_line = if root {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
            "cache_effective_user proxy\n"
        } else {
            ""
        };
        let conf = format!(
            "http_port 127.0.0.1:{port}\n\
             pid_filename {pid}\n\
             access_log stdio:{access} squid\n\
             cache_log {cache}\n\
             cache deny all\n\
             cache_mem 8 MB\n\
             coredump_dir {dir}\n\
             {user_line}\
             shutdown_lifetime 0 seconds\n\
             pinger_enable off\n\
             buffered_logs off\n\
             auth_param basic program {NCSA} {htpasswd}\n\
             auth_param basic children 2\n\
             auth_param basic realm kalmar-test\n\
             acl authed proxy_auth REQUIRED\n\
             http_access allow authed\n\
             http_access deny all\n",
            pid = path("squid.pid"),
            access = path("access.log"),
            cache = path("cache.log"),
            dir = dir.path().display(),
            htpasswd = path("htpasswd"),
        );
        std::fs::write(path("squid.conf"), conf).unwrap();
        let child = std::process::Command::new(SQUID)
            .args(["-N", "-f", &path("squid.conf")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn squid");
        let squid = Squid {
            child: Some(child),
            addr,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "squid did not listen on {addr}: {}",
                std::fs::read_to_string(squid.dir.path().join("cache.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(squid)
    }

    fn url(&self, user: &str, password: &str) -> String {
        format!("http://{user}:{password}@{}", self.addr)
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// Wait until Squid's access log mentions `needle`.
    fn wait_logged(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.access_log();
            if log.contains(needle) || Instant::now() > deadline {
                assert!(log.contains(needle), "squid never logged {needle}: {log}");
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Helpers exit on their own once Squid's pipes close; make sure the port is free.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(self.addr).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        self.kill();
    }
}

fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squid_as_the_institutional_parent() {
    let Some(squid) = tokio::task::spawn_blocking(|| Squid::start("alice", "s@cret:x"))
        .await
        .unwrap()
    else {
        return;
    };
    let origin = Origin::start().await;
    let tls_origin = TlsOrigin::start().await;
    let bypassed = Origin::start().await;
    let kalmar = Kalmar::start(&upstream(
        &[squid.url("alice", "s%40cret:x")],
        &format!("direct = [\"127.0.0.1:{}\"]", bypassed.addr.port()),
    ));
    let client = kalmar.client();

    // Plain HTTP through Squid.
    let r = client.get(origin.url("/headers")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = r.text().await.unwrap();
    assert!(seen.contains("squid"), "Squid's Via: {seen}");
    assert!(
        !seen.to_lowercase().contains("proxy-authorization"),
        "{seen}"
    );

    // CONNECT through Squid, with reqwest and with curl.
    let https = format!("https://127.0.0.1:{}/hello", tls_origin.addr.port());
    let r = client.get(&https).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "hello");
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &tls_origin.cert_pem).unwrap();
    let (proxy, ca, url) = (kalmar.url(), ca.display().to_string(), https.clone());
    let (code, out, err) =
        tokio::task::spawn_blocking(move || curl(&["-x", &proxy, "--cacert", &ca, &url]))
            .await
            .unwrap();
    assert_eq!((code, out.as_str()), (0, "hello"), "{err}");

    // The bypass list: straight to the origin, never through Squid.
    let r = client.get(bypassed.url("/hello")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "hello");

    let log = squid.wait_logged(&format!("CONNECT 127.0.0.1:{}", tls_origin.addr.port()));
    assert!(log.contains(&origin.url("/headers")), "{log}");
    assert!(log.contains(" alice "), "authenticated as alice: {log}");
    assert!(
        !log.contains(&format!(":{}", bypassed.addr.port())),
        "a direct destination reached Squid: {log}"
    );
    drop(client);
    let lines = kalmar.log_lines(4);
    let label = squid.addr.to_string();
    assert_eq!(lines[0]["route"], label.as_str());
    assert!(lines.iter().any(|l| l["route"] == "direct"), "{lines:?}");

    // Wrong credentials: 502 naming Squid's 407, for both kinds of request.
    let wrong = Kalmar::start(&upstream(&[squid.url("alice", "nope")], ""));
    let r = wrong
        .client()
        .get(origin.url("/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(support::error_kind(&r), "upstream-refused");
    let body = r.text().await.unwrap();
    assert!(body.contains("status 407"), "{body}");
    assert!(!body.contains("nope"), "{body}");
    let (_s, head) =
        support::open_tunnel(wrong.addr, &format!("127.0.0.1:{}", tls_origin.addr.port())).await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert!(head.contains("upstream-refused"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squid_stopped_mid_test() {
    let Some(mut squid) = tokio::task::spawn_blocking(|| Squid::start("bob", "pw"))
        .await
        .unwrap()
    else {
        return;
    };
    let origin = Origin::start().await;
    let tls_origin = TlsOrigin::start().await;
    let backup = Kalmar::start("");
    let chained = Kalmar::start(&upstream(
        &[squid.url("bob", "pw"), backup.addr.to_string()],
        "down_backoff = \"1m\"",
    ));
    let alone = Kalmar::start(&upstream(&[squid.url("bob", "pw")], ""));
    for k in [&chained, &alone] {
        let r = k.client().get(origin.url("/hello")).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "hello");
    }
    squid.wait_logged(&origin.url("/hello"));

    tokio::task::spawn_blocking(move || squid.kill())
        .await
        .unwrap();

    // Fail-over to the second parent, for plain HTTP and CONNECT (fresh clients: no
    // kept-alive connection to Kalmar hides anything).
    let r = client_via(&chained.url())
        .get(origin.url("/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "hello");
    let r = client_via(&chained.url())
        .get(format!(
            "https://127.0.0.1:{}/hello",
            tls_origin.addr.port()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "hello");
    let lines = chained.log_lines(3);
    assert_eq!(lines[1]["route"], backup.addr.to_string());
    assert_eq!(lines[2]["route"], backup.addr.to_string());

    // Squid was the only parent: 502 upstream-unavailable.
    let r = client_via(&alone.url())
        .get(origin.url("/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(support::error_kind(&r), "upstream-unavailable");
}

// --- configuration -------------------------------------------------------------------------

#[test]
fn malformed_parent_urls_name_the_key() {
    let table = [
        (
            "parents = [\"http://ok:1\", \"socks5://p:1080\"]",
            "upstream.parents[1]: socks5://p:1080: unsupported scheme",
        ),
        (
            "http_parents = [\"proxy.example.org\"]",
            "upstream.http_parents[0]: proxy.example.org: no port",
        ),
        (
            "https_parents = [\"https://u:hunter2@p\"]",
            "upstream.https_parents[0]: https://***@p: no port",
        ),
        (
            "parents = [\"http://p:3128/x\"]",
            "upstream.parents[0]: http://p:3128/x: a parent proxy URL has no path",
        ),
        (
            "direct = [\"ok.test\", \"10.0.0.0/99\"]",
            "upstream.direct[1]: \"10.0.0.0/99\": not a CIDR",
        ),
        ("selection = \"random\"", "selection"),
        ("down_backoff = \"0s\"", "upstream.down_backoff"),
        (
            "credentials_file = \"/nonexistent/creds\"\nparents = [\"p:1\"]",
            "upstream.credentials_file: /nonexistent/creds",
        ),
        (
            "credentials_env = \"KALMAR_TEST_UNSET_CREDS\"\nparents = [\"p:1\"]",
            "KALMAR_TEST_UNSET_CREDS",
        ),
    ];
    for (toml, want) in table {
        let err = Config::from_toml(&format!("[upstream]\n{toml}"))
            .and_then(|c| Ok(kalmar::connect::upstream::Upstream::compile(&c.upstream)?))
            .map(|_| ())
            .expect_err(toml)
            .to_string();
        assert!(err.contains(want), "{toml}:\n  got  {err}\n  want {want}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}

#[test]
fn env_lists_and_redacted_output() {
    let env = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    };
    // The deploy manifests set these, possibly empty.
    let config = Config::load_with_env(
        None,
        env(&[
            ("KALMAR_UPSTREAM__HTTP_PARENTS", ""),
            ("KALMAR_UPSTREAM__HTTPS_PARENTS", ""),
            ("KALMAR_UPSTREAM__DIRECT", ""),
        ]),
    )
    .expect("empty values mean no parents");
    let upstream = kalmar::connect::upstream::Upstream::compile(&config.upstream).unwrap();
    assert_eq!(upstream.labels().count(), 0);

    let config = Config::load_with_env(
        None,
        env(&[
            (
                "KALMAR_UPSTREAM__HTTP_PARENTS",
                "http://svc:t0psecret@proxy.example.org:8080, backup.example.org:3128",
            ),
            ("KALMAR_UPSTREAM__HTTPS_PARENTS", "proxy.example.org:8080"),
            ("KALMAR_UPSTREAM__DIRECT", ".example.org,10.0.0.0/8"),
        ]),
    )
    .unwrap();
    let upstream = kalmar::connect::upstream::Upstream::compile(&config.upstream).unwrap();
    let labels: Vec<&str> = upstream.labels().collect();
    assert_eq!(
        labels,
        [
            "proxy.example.org:8080",
            "backup.example.org:3128",
            "proxy.example.org:8080"
        ]
    );
    assert_eq!(config.upstream.direct.len(), 2);
    let printed = config.to_toml();
    assert!(
        printed.contains("http://***@proxy.example.org:8080"),
        "{printed}"
    );
    assert!(
        !printed.contains("t0psecret") && !printed.contains("svc:"),
        "{printed}"
    );
    let debug = format!("{config:?}");
    assert!(!debug.contains("t0psecret"), "{debug}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_from_a_file() {
    let fake_parent = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file: PathBuf = dir.path().join("creds");
    std::fs::write(&file, "svc:from-file\n").unwrap();
    let extra = format!("credentials_file = {:?}", file.display().to_string());
    let kalmar = Kalmar::start(&upstream(&[fake_parent.addr.to_string()], &extra));
    let seen = kalmar
        .client()
        .get("http://127.0.0.1:8080/headers")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // base64("svc:from-file")
    assert!(
        seen.contains("proxy-authorization: Basic c3ZjOmZyb20tZmlsZQ==\n"),
        "{seen}"
    );
    let config = Config::load_with_env(Some(&kalmar.config_path), std::iter::empty()).unwrap();
    assert!(!config.to_toml().contains("from-file"));
}
