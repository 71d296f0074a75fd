//! The cache's RFC 9111 / RFC 5861 behaviour through a real Kalmar with real clients (curl,
//! reqwest) and real origins: Python's `http.server` (whose 304 repeats no validator), and
//! a scripted origin that answers each connection with the next canned response, so that
//! disconnects, 5xx, interim 103 and changed validators are exactly as written.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use support::{Kalmar, curl};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An origin that answers its n-th connection with the n-th script entry (then closes);
/// `None` closes the connection without an answer. Every request head is recorded.
struct Scripted {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scripted {
    async fn start(script: Vec<Option<String>>) -> Scripted {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        let task = tokio::spawn(async move {
            for answer in script {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                seen.lock().push(String::from_utf8_lossy(&buf).into_owned());
                if let Some(answer) = answer {
                    let _ = stream.write_all(answer.as_bytes()).await;
                    let _ = stream.shutdown().await;
                }
            }
        });
        Scripted { addr, heads, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().clone()
    }

    /// Wait (bounded) until `n` requests have arrived.
    async fn wait_for(&self, n: usize) {
        for _ in 0..200 {
            if self.heads.lock().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "the origin saw {} requests, not {n}",
            self.heads.lock().len()
        );
    }
}

/// A response with `head` lines (CRLF added), `Date: now`, a Content-Length, and close.
fn answer(status: &str, head: &[&str], body: &str) -> Option<String> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nDate: {}\r\n",
        httpdate::fmt_http_date(std::time::SystemTime::now())
    );
    for line in head {
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    Some(out)
}

/// `curl -x kalmar -D - url` with extra args: (status of the final response, the whole
/// header dump including interim responses, body).
fn curl_via(kalmar: &Kalmar, url: &str, extra: &[&str]) -> (u16, String, String) {
    let proxy = kalmar.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("headers");
    let dump_s = dump.to_str().unwrap();
    let mut args = vec!["-x", &proxy, "-D", dump_s];
    args.extend_from_slice(extra);
    args.push(url);
    let (code, body, err) = curl(&args);
    assert_eq!(code, 0, "curl failed: {err}");
    let headers = std::fs::read_to_string(&dump).unwrap();
    let last = headers
        .split("\r\n\r\n")
        .filter(|b| b.starts_with("HTTP/"))
        .last()
        .unwrap_or("");
    let status = last
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, headers.to_ascii_lowercase(), body)
}

/// The value of `name` in the final response of a curl header dump (lower-cased).
fn final_header(dump: &str, name: &str) -> String {
    let last = dump
        .split("\r\n\r\n")
        .filter(|b| b.starts_with("http/"))
        .last()
        .unwrap_or("");
    last.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or("")
        .to_owned()
}

/// python3, or None outside CI (skipped, saying so); a missing python3 fails under CI.
fn python3() -> Option<&'static str> {
    let found = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("python3");
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "python3 is required for this test in CI"
    );
    eprintln!("skipped: python3 is not installed");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_http_server_origin_every_fetch_gets_the_whole_file() {
    let Some(python) = python3() else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pkg-1.0.tar.gz");
    let content = "a package, byte for byte\n".repeat(100);
    std::fs::write(&file, &content).unwrap();
    // Modified two days ago: heuristically fresh for hours, so only a client that asks
    // for validation (pip sends max-age=0) makes Kalmar ask the origin.
    let old = std::time::SystemTime::now() - Duration::from_secs(2 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = dir.path().join("server.log");
    let mut server = std::process::Command::new(python)
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .current_dir(dir.path())
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/pkg-1.0.tar.gz");
    let mut up = false;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(up, "python http.server did not start");

    let kalmar = Kalmar::start("");
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let (status, dump, body) = curl_via(&kalmar, &url, &["-H", "Cache-Control: max-age=0"]);
        assert_eq!(status, 200, "{dump}");
        assert_eq!(body, content, "every fetch gets the whole file");
        assert!(final_header(&dump, "date").ends_with(" gmt"), "{dump}");
        statuses.push(final_header(&dump, "cache-status"));
    }
    // the first is stored; the next two are validated by the origin's 304, which repeats
    // no Last-Modified, and still answered with the stored file
    assert_eq!(statuses[0], "kalmar; fwd=miss; stored");
    assert_eq!(statuses[1], "kalmar; fwd=request; fwd-status=304");
    assert_eq!(statuses[2], "kalmar; fwd=request; fwd-status=304");
    // a plain fetch is a hit
    let (status, dump, body) = curl_via(&kalmar, &url, &[]);
    assert_eq!((status, body.len()), (200, content.len()));
    assert_eq!(final_header(&dump, "cache-status"), "kalmar; hit");
    let _ = server.kill();
    let _ = server.wait();
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        log.matches("\"GET /pkg-1.0.tar.gz HTTP/1.1\" 304").count(),
        2,
        "{log}"
    );
    assert_eq!(
        log.matches("\"GET /pkg-1.0.tar.gz HTTP/1.1\" 200").count(),
        1,
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_get_never_gets_the_origins_304() {
    // no-cache + ETag: every use is validated; the client did not ask for a 304
    let cc = ["Cache-Control: no-cache", "ETag: \"v1\""];
    let origin = Scripted::start(vec![
        answer("200 OK", &cc, "body v1"),
        answer("304 Not Modified", &["ETag: \"v1\""], ""),
        answer("304 Not Modified", &[], ""),
        answer("304 Not Modified", &["ETag: \"v1\""], ""),
    ])
    .await;
    let kalmar = Kalmar::start("");
    let url = origin.url("/nc");
    for _ in 0..3 {
        let (status, dump, body) = curl_via(&kalmar, &url, &[]);
        assert_eq!((status, body.as_str()), (200, "body v1"), "{dump}");
    }
    let heads = origin.heads();
    assert!(
        heads[1]
            .to_ascii_lowercase()
            .contains("if-none-match: \"v1\""),
        "{}",
        heads[1]
    );
    // only a client that asked a conditional of its own gets a 304 (its ETag matches)
    let (status, dump, body) = curl_via(&kalmar, &url, &["-H", "If-None-Match: \"v1\""]);
    assert_eq!((status, body.as_str()), (304, ""), "{dump}");
    assert_eq!(origin.heads().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_and_an_unreachable_origin_serve_the_stored_response() {
    let origin = Scripted::start(vec![
        answer(
            "200 OK",
            &["Cache-Control: max-age=1, stale-if-error=60"],
            "kept",
        ),
        answer("503 Service Unavailable", &[], "down"),
        None,
    ])
    .await;
    let kalmar = Kalmar::start("");
    let url = origin.url("/sie");
    let (status, _, body) = curl_via(&kalmar, &url, &[]);
    assert_eq!((status, body.as_str()), (200, "kept"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, dump, body) = curl_via(&kalmar, &url, &[]);
    assert_eq!((status, body.as_str()), (200, "kept"), "{dump}");
    assert_eq!(
        final_header(&dump, "cache-status"),
        "kalmar; fwd=stale; fwd-status=503; detail=stale-if-error"
    );
    let (status, dump, body) = curl_via(&kalmar, &url, &[]);
    assert_eq!((status, body.as_str()), (200, "kept"), "{dump}");
    assert_eq!(
        final_header(&dump, "cache-status"),
        "kalmar; fwd=stale; detail=origin-unreachable"
    );
    let lines = kalmar.log_lines(3);
    assert_eq!(lines[2]["cache"], "stale", "{lines:?}");

    // must-revalidate: never stale, the origin's failure is the answer
    let origin = Scripted::start(vec![
        answer(
            "200 OK",
            &["Cache-Control: max-age=1, must-revalidate"],
            "strict",
        ),
        None,
    ])
    .await;
    let url = origin.url("/mr");
    curl_via(&kalmar, &url, &[]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, dump, _) = curl_via(&kalmar, &url, &[]);
    assert_eq!(status, 502, "{dump}");
    assert!(final_header(&dump, "x-kalmar-error").len() > 3, "{dump}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_serves_at_once_and_refreshes_in_the_background() {
    let origin = Scripted::start(vec![
        answer(
            "200 OK",
            &[
                "Cache-Control: max-age=1, stale-while-revalidate=30",
                "ETag: \"a\"",
            ],
            "v1",
        ),
        answer(
            "200 OK",
            &["Cache-Control: max-age=60", "ETag: \"b\""],
            "v2",
        ),
    ])
    .await;
    let kalmar = Kalmar::start("");
    let url = origin.url("/swr");
    curl_via(&kalmar, &url, &[]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, dump, body) = curl_via(&kalmar, &url, &[]);
    assert_eq!((status, body.as_str()), (200, "v1"), "{dump}");
    assert_eq!(
        final_header(&dump, "cache-status"),
        "kalmar; hit; detail=stale-while-revalidate"
    );
    origin.wait_for(2).await;
    assert!(
        origin.heads()[1]
            .to_ascii_lowercase()
            .contains("if-none-match: \"a\"")
    );
    // the background answer is stored once it has arrived whole
    let mut body = String::new();
    for _ in 0..100 {
        let (_, dump, b) = curl_via(&kalmar, &url, &[]);
        body = b;
        if body == "v2" {
            assert_eq!(final_header(&dump, "cache-status"), "kalmar; hit");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(body, "v2");
    assert_eq!(origin.heads().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_head_updates_and_early_hints() {
    let body = "0123456789A";
    let mut hinted = "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n".to_owned();
    hinted.push_str(
        &answer(
            "200 OK",
            &["Cache-Control: max-age=60", "ETag: \"r\"", "X-A: 1"],
            body,
        )
        .unwrap(),
    );
    let origin = Scripted::start(vec![
        Some(hinted),
        // the HEAD: same validator and length, a new field and freshness
        Some(
            "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nETag: \"r\"\r\nX-A: 2\r\n\
             Content-Length: 11\r\nConnection: close\r\n\r\n"
                .to_owned(),
        ),
    ])
    .await;
    let kalmar = Kalmar::start("");
    let url = origin.url("/r");

    // the origin's 103 reaches the client before the final response
    let (status, dump, got) = curl_via(&kalmar, &url, &[]);
    assert_eq!((status, got.as_str()), (200, body));
    assert!(dump.starts_with("http/1.1 103"), "{dump}");
    assert!(dump.contains("link: </a.css>; rel=preload"), "{dump}");
    // a stored response answers ranges: resumed downloads
    let (status, dump, got) = curl_via(&kalmar, &url, &["-r", "0-1"]);
    assert_eq!((status, got.as_str()), (206, "01"), "{dump}");
    assert_eq!(final_header(&dump, "content-range"), "bytes 0-1/11");
    assert!(!dump.contains(" 103"), "no interim from the cache: {dump}");
    let (status, _, got) = curl_via(&kalmar, &url, &["-r", "5-"]);
    assert_eq!((status, got.as_str()), (206, "56789A"));
    let (status, dump, _) = curl_via(&kalmar, &url, &["-r", "50-"]);
    assert_eq!(status, 416, "{dump}");
    assert_eq!(final_header(&dump, "content-range"), "bytes */11");
    // a HEAD the client wants validated goes to the origin and refreshes the stored GET
    let (status, dump, _) = curl_via(&kalmar, &url, &["-I", "-H", "Cache-Control: no-cache"]);
    assert_eq!(status, 200, "{dump}");
    assert_eq!(final_header(&dump, "x-a"), "2");
    let (status, dump, got) = curl_via(&kalmar, &url, &[]);
    assert_eq!((status, got.as_str()), (200, body));
    assert_eq!(final_header(&dump, "x-a"), "2", "{dump}");
    assert_eq!(final_header(&dump, "cache-status"), "kalmar; hit");
    assert_eq!(origin.heads().len(), 2);
    assert!(origin.heads()[1].starts_with("HEAD /r "));
}
