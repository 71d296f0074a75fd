//! HTTP/1.1 message handling (RFC 9110 / 9112) at the proxy's front door: what must be
//! rejected is rejected with Kalmar's own answer and never forwarded, on the first request
//! of a connection and on later kept-alive ones alike; a client that half-closes after a
//! complete request still gets its whole answer.

mod support;

use std::time::Duration;

use support::Kalmar;
use support::origin::Origin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Requests that must be refused, each with the status and `X-Kalmar-Error` it gets.
fn bad_requests(origin: &Origin) -> Vec<(&'static str, String, u16, &'static str)> {
    let a = origin.addr;
    vec![
        (
            "two Host fields",
            format!("GET http://{a}/hello HTTP/1.1\r\nHost: {a}\r\nHost: other.example\r\n\r\n"),
            400,
            "malformed-request",
        ),
        (
            "an invalid Host",
            format!("GET http://{a}/hello HTTP/1.1\r\nHost: a b\r\n\r\n"),
            400,
            "malformed-request",
        ),
        (
            "obs-fold",
            format!("GET http://{a}/hello HTTP/1.1\r\nHost: {a}\r\nX-A: 1\r\n  folded\r\n\r\n"),
            400,
            "malformed-request",
        ),
        (
            "a bare CR",
            format!("GET http://{a}/hello HTTP/1.1\r\nHost: {a}\r\nX-A: 1\r2\r\n\r\n"),
            400,
            "malformed-request",
        ),
        (
            "whitespace before the colon",
            format!("GET http://{a}/hello HTTP/1.1\r\nHost: {a}\r\nX-A : 1\r\n\r\n"),
            400,
            "malformed-request",
        ),
        (
            "conflicting Content-Length",
            format!(
                "POST http://{a}/sink HTTP/1.1\r\nHost: {a}\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
            ),
            400,
            "malformed-request",
        ),
        (
            "Transfer-Encoding with Content-Length",
            format!(
                "POST http://{a}/sink HTTP/1.1\r\nHost: {a}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
            ),
            400,
            "malformed-request",
        ),
        (
            "an unknown transfer coding",
            format!(
                "POST http://{a}/sink HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: br, chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
            ),
            501,
            "unsupported",
        ),
        (
            "a transfer coding that does not end in chunked",
            format!(
                "POST http://{a}/sink HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: gzip\r\n\r\nabcd"
            ),
            400,
            "malformed-request",
        ),
    ]
}

/// One answer: its head and its `Content-Length` body (10 s at most).
async fn read_answer(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if out.len() >= end + 4 + length {
                return text;
            }
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => return String::from_utf8_lossy(&out).into_owned(),
        }
    }
}

/// Everything the proxy sends until it closes (10 s at most).
async fn read_all(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn assert_kalmar_answer(what: &str, answer: &str, status: u16, kind: &str) {
    let last = answer;
    assert!(
        last.starts_with(&format!("HTTP/1.1 {status} ")),
        "{what}: {answer}"
    );
    assert!(
        last.contains(&format!("x-kalmar-error: {kind}")),
        "{what}: Kalmar's own answer, not a bare one: {answer}"
    );
    assert!(
        last.contains("connection: close"),
        "{what}: a request that could not be framed ends its connection: {answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_first_requests_get_kalmars_answer_and_are_never_forwarded() {
    let origin = Origin::start().await;
    let kalmar = Kalmar::start("");
    let cases = bad_requests(&origin);
    for (what, request, status, kind) in &cases {
        let mut stream = TcpStream::connect(kalmar.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = read_answer(&mut stream).await;
        assert_kalmar_answer(what, &answer, *status, kind);
    }
    assert_eq!(
        origin.requests(),
        0,
        "a rejected request reached the origin"
    );
    // Lines of connections refused before hyper arrive from a task of their own, so their
    // order is not the order of the cases: compare the (status, error) pairs as sets.
    let lines = kalmar.log_lines(cases.len());
    let mut logged: Vec<String> = lines
        .iter()
        .map(|l| format!("{} {}", l["status"], l["error"].as_str().unwrap_or("-")))
        .collect();
    let mut expected: Vec<String> = cases
        .iter()
        .map(|(_, _, status, kind)| format!("{status} {kind}"))
        .collect();
    logged.sort();
    expected.sort();
    assert_eq!(logged, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_later_requests_on_a_kept_alive_connection_get_kalmars_answer_too() {
    let origin = Origin::start().await;
    let kalmar = Kalmar::start("");
    let a = origin.addr;
    let good = format!("GET http://{a}/hello HTTP/1.1\r\nHost: {a}\r\n\r\n");
    // hyper drops a later request's Content-Length when Transfer-Encoding is present and
    // reads the body as chunked; that case is checked by
    // `a_later_request_with_both_lengths_goes_upstream_chunked_only` instead.
    let cases: Vec<_> = bad_requests(&origin)
        .into_iter()
        .filter(|(what, ..)| *what != "Transfer-Encoding with Content-Length")
        .collect();
    for (what, bad, status, kind) in &cases {
        let mut stream = TcpStream::connect(kalmar.addr).await.unwrap();
        stream.write_all(good.as_bytes()).await.unwrap();
        // The first answer comes whole before the bad request is sent.
        let mut first = vec![0u8; 4096];
        let mut got = 0;
        while !String::from_utf8_lossy(&first[..got]).ends_with("hello") {
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut first[got..]))
                .await
                .expect("first answer in time")
                .unwrap();
            assert!(n > 0, "{what}: closed before the first answer");
            got += n;
        }
        assert!(first.starts_with(b"HTTP/1.1 200"), "{what}");
        stream.write_all(bad.as_bytes()).await.unwrap();
        let answer = read_answer(&mut stream).await;
        assert_kalmar_answer(what, &answer, *status, kind);
    }
    assert_eq!(
        origin.requests(),
        cases.len(),
        "only the good requests reached the origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_after_its_request_gets_the_whole_answer() {
    let origin = Origin::start().await;
    let kalmar = Kalmar::start("");
    let a = origin.addr;
    let mut stream = TcpStream::connect(kalmar.addr).await.unwrap();
    stream
        .write_all(format!("GET http://{a}/bytes/200000 HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let answer = read_all(&mut stream).await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{}",
        &answer[..answer.len().min(200)]
    );
    let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    assert_eq!(body.len(), 200_000);
    let lines = kalmar.log_lines(1);
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[0]["error"], serde_json::Value::Null, "{}", lines[0]);
    assert_eq!(lines[0]["bytes_to_client"], 200_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_request_with_both_lengths_goes_upstream_chunked_only() {
    let origin = Origin::start().await;
    let kalmar = Kalmar::start("");
    let a = origin.addr;
    let mut stream = TcpStream::connect(kalmar.addr).await.unwrap();
    let requests = format!(
        "GET http://{a}/hello HTTP/1.1\r\nHost: {a}\r\n\r\n\
         POST http://{a}/headers HTTP/1.1\r\nHost: {a}\r\nContent-Length: 100\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
    );
    stream.write_all(requests.as_bytes()).await.unwrap();
    let answer = read_all(&mut stream).await.to_ascii_lowercase();
    let second = &answer[answer.rfind("http/1.1 ").unwrap()..];
    assert!(second.starts_with("http/1.1 200"), "{answer}");
    // The origin saw the body framed one way only.
    assert!(!second.contains("content-length: 100"), "{answer}");
    assert!(second.contains("transfer-encoding: chunked"), "{answer}");
}
