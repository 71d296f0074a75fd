//! A kept-alive origin connection that the origin closes just as the next request goes out
//! (its keep-alive timeout firing while the request is on the wire). Kalmar sends a request
//! with an idempotent method again, once, on a fresh connection, from the copy it kept; it
//! never sends any other request twice (RFC 9112 §9.3.1). Real clients (reqwest, curl)
//! through a real Kalmar, against a scripted origin that does exactly that.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use support::{Kalmar, curl, error_kind, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request as the origin read it: which connection, the method, the body.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    conn: usize,
    method: String,
    body: Vec<u8>,
}

/// An origin whose first connection answers one request and then reads the next one whole
/// and resets the connection without a word. Every later connection answers every request
/// with `METHOD BODY`, after a 103 Early Hints when the path asks for `/hints`.
struct ClosingOrigin {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ClosingOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ClosingOrigin {
    async fn start() -> ClosingOrigin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            for conn in 0.. {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(stream, conn, log.clone()));
            }
        });
        ClosingOrigin { addr, seen, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }
}

async fn serve(mut stream: TcpStream, conn: usize, log: Arc<Mutex<Vec<Seen>>>) {
    let mut buf = Vec::new();
    for n in 0.. {
        let Some((method, target, body)) = read_request(&mut stream, &mut buf).await else {
            return;
        };
        log.lock().push(Seen {
            conn,
            method: method.clone(),
            body: body.clone(),
        });
        if conn == 0 && n == 1 {
            // SO_LINGER 0: the close is a reset, as when a server's timer closes a socket
            // that data has just arrived on.
            let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
            return;
        }
        if target == "/hints"
            && stream
                .write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
                .await
                .is_err()
        {
            return;
        }
        let mut answer = method.into_bytes();
        answer.push(b' ');
        answer.extend_from_slice(&body);
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\r\n",
            answer.len()
        );
        if stream.write_all(head.as_bytes()).await.is_err()
            || stream.write_all(&answer).await.is_err()
        {
            return;
        }
    }
}

/// One request's method, target and Content-Length body from `stream` (`buf` keeps what was
/// read past it); `None` at end of stream.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Option<(String, String, Vec<u8>)> {
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut words = head.split(' ');
    let method = words.next().unwrap_or_default().to_string();
    let target = words.next().unwrap_or_default().to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf[head_end..head_end + length].to_vec();
    buf.drain(..head_end + length);
    Some((method, target, body))
}

fn retries(kalmar: &Kalmar, reason: &str) -> f64 {
    metric(
        kalmar,
        "kalmar_upstream_retries_total",
        &[("reason", reason)],
    )
}

/// An origin, a Kalmar and a client, after one request that opened the connection the
/// origin will close on the next.
async fn primed() -> (ClosingOrigin, Kalmar, reqwest::Client) {
    let origin = ClosingOrigin::start().await;
    let kalmar = Kalmar::start("");
    let client = kalmar.client();
    let r = client.get(origin.url("/first")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "GET ");
    (origin, kalmar, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_is_sent_again_on_a_fresh_connection() {
    let (origin, kalmar, client) = primed().await;

    let r = client.get(origin.url("/second")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", origin.seen());
    assert_eq!(r.text().await.unwrap(), "GET ");
    let conns: Vec<usize> = origin.seen().iter().map(|s| s.conn).collect();
    assert_eq!(
        conns,
        [0, 0, 1],
        "the second GET went out twice, the second time anew"
    );
    assert_eq!(retries(&kalmar, "closed"), 1.0);
    let lines = kalmar.log_lines(2);
    assert_eq!(lines[1]["status"], 200, "the log says what the client got");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_is_sent_again_with_its_whole_body() {
    let (origin, kalmar, _client) = primed().await;

    // A curl upload, as a pod would send one: PUT is idempotent, so it may go twice.
    let body = "x".repeat(40_000);
    let (code, out, err) = curl(&[
        "-sS",
        "-x",
        &kalmar.url(),
        "-X",
        "PUT",
        "--data-binary",
        &body,
        "-w",
        "\n%{http_code}",
        &origin.url("/config/1"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("PUT {body}\n200"));
    let seen = origin.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(
        seen[1],
        seen[2].clone_on(0),
        "the same request, byte for byte"
    );
    assert_eq!(seen[2].conn, 1);
    assert_eq!(retries(&kalmar, "closed"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origins_early_hints_reach_the_client_on_the_second_try() {
    let (origin, kalmar, _client) = primed().await;
    let dump = kalmar.dir.path().join("headers.txt");
    let (code, out, err) = curl(&[
        "-sS",
        "-x",
        &kalmar.url(),
        "-D",
        dump.to_str().unwrap(),
        &origin.url("/hints"),
    ]);
    assert_eq!((code, out.as_str()), (0, "GET "), "{err}");
    let heads = std::fs::read_to_string(&dump).unwrap().to_ascii_lowercase();
    assert!(heads.starts_with("http/1.1 103"), "{heads}");
    assert!(heads.contains("link: </a.css>; rel=preload"), "{heads}");
    assert!(heads.contains("http/1.1 200"), "{heads}");
    assert_eq!(retries(&kalmar, "closed"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_never_sent_twice() {
    let (origin, kalmar, client) = primed().await;

    let r = client
        .post(origin.url("/order"))
        .body("one order")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(error_kind(&r), "bad-upstream-response");
    let posts = origin
        .seen()
        .into_iter()
        .filter(|s| s.method == "POST")
        .count();
    assert_eq!(
        posts, 1,
        "a POST the origin may have acted on is not repeated"
    );
    assert_eq!(retries(&kalmar, "closed"), 0.0);
    let lines = kalmar.log_lines(2);
    assert_eq!(lines[1]["status"], 502);
    assert_eq!(lines[1]["error"], "bad-upstream-response");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_past_the_copy_limit_is_sent_once() {
    let (origin, _kalmar, client) = primed().await;

    let body = vec![b'y'; 65 * 1024];
    let r = client
        .put(origin.url("/big"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let puts = origin
        .seen()
        .into_iter()
        .filter(|s| s.method == "PUT")
        .count();
    assert_eq!(puts, 1, "no copy was kept of a body over 64 KiB");
    // The proxy keeps serving: the next request opens a new connection.
    let r = client.get(origin.url("/after")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

impl Seen {
    fn clone_on(&self, conn: usize) -> Seen {
        Seen {
            conn,
            ..self.clone()
        }
    }
}
