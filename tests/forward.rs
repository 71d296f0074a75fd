//! Plain-HTTP forwarding through a real Kalmar with real clients and a real origin.

mod support;

use std::time::Duration;

use support::origin::Origin;
use support::{Kalmar, curl, raw_exchange};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_head_post_put_with_bodies() {
    let origin = Origin::start().await;
    let kalmar = Kalmar::start("");
    let client = kalmar.client();

    let r = client.get(origin.url("/hello")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-origin"], "test");
    assert_eq!(r.headers()["via"], "1.1 kalmar");
    assert_eq!(r.text().await.unwrap(), "hello");

    let r = client.head(origin.url("/hello")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "");

    let r = client
        .post(origin.url("/echo"))
        .body("posted body")
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "posted body");

    let r = client
        .put(origin.url("/sink"))
        .body(vec![7u8; 12345])
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "12345");

    let r = client
        .patch(origin.url("/echo"))
        .body("patch")
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "patch");

    let r = client.delete(origin.url("/hello")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_the_proxy() {
    let origin = Origin::start().await;
    let kalmar = Kalmar::start("");
    let url = origin.url("/hello");
    let proxy = kalmar.url();
    let (code, out, err) = tokio::task::spawn_blocking(move || curl(&["-x", &proxy, &url]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_is_rewritten_to_origin_form_without_hop_by_hop_headers() {
    let origin = Origin::start().await;
    let kalmar = Kalmar::start("");
    let request = format!(
        "GET http://user:secret@{}/headers?q=1 HTTP/1.1\r\nHost: wrong.example\r\nConnection: close, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nX-End: kept\r\n\r\n",
        origin.addr
    );
    let answer = raw_exchange(kalmar.addr, request.as_bytes()).await;
    let body = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(body.starts_with("get /headers?q=1 http/1.1"), "{answer}");
    assert!(body.contains(&format!("host: {}", origin.addr)), "{body}");
    assert!(body.contains("x-end: kept"), "{body}");
    assert!(body.contains("via: 1.1 kalmar"), "{body}");
    for gone in [
        "x-hop",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te:",
        "secret",
        "x-forwarded-for",
    ] {
        assert!(!body.contains(gone), "{gone} reached the origin: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_loses_hop_by_hop_headers_and_forged_kalmar_error() {
    let origin = Origin::start().await;
    let kalmar = Kalmar::start("");
    let r = kalmar
        .client()
        .get(origin.url("/hop"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-hop-secret").is_none());
    assert!(r.headers().get("keep-alive").is_none());
    assert!(r.headers().get("x-kalmar-error").is_none());
    assert_eq!(r.headers()["x-end-to-end"], "kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_modes() {
    let origin = Origin::start().await;
    for (mode, expect) in [("on", Some("127.0.0.1")), ("off", None), ("delete", None)] {
        let kalmar = Kalmar::start(&format!(
            "[proxy]\nx_forwarded_for = \"{mode}\"\nvia = false"
        ));
        let body = kalmar
            .client()
            .get(origin.url("/headers"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        match expect {
            Some(ip) => assert!(
                body.contains(&format!("x-forwarded-for: {ip}")),
                "{mode}: {body}"
            ),
            None => assert!(!body.contains("x-forwarded-for"), "{mode}: {body}"),
        }
        assert!(!body.contains("via:"), "via = false: {body}");
    }
    // "off" passes a client's header through untouched; "delete" removes it.
    let kalmar = Kalmar::start("[proxy]\nx_forwarded_for = \"delete\"");
    let body = kalmar
        .client()
        .get(origin.url("/headers"))
        .header("x-forwarded-for", "10.1.1.1")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!body.contains("x-forwarded-for"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_is_reused_on_both_sides() {
    use http_body_util::BodyExt;
    let origin = Origin::start().await;
    let kalmar = Kalmar::start("");
    // One client connection, twenty requests on it: hyper's client refuses to send on a
    // connection the proxy closed, so twenty answers prove client-side keep-alive.
    let stream = tokio::net::TcpStream::connect(kalmar.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for _ in 0..20 {
        sender.ready().await.unwrap();
        let req = http::Request::get(origin.url("/hello"))
            .header("host", origin.addr.to_string())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let r = sender.send_request(req).await.unwrap();
        assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), "hello");
    }
    assert_eq!(origin.requests(), 20);
    assert_eq!(
        origin.connections(),
        1,
        "Kalmar must pool its origin connection"
    );
    let metrics = kalmar.handle().metrics().encode();
    let accepted = metrics
        .lines()
        .find(|l| l.starts_with("kalmar_client_connections_accepted_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(accepted, Some(1.0), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_both_ways() {
    let origin = Origin::start().await;
    let kalmar = Kalmar::start("");
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = (0..50)
        .map(|i| Ok(bytes::Bytes::from(format!("chunk-{i};"))))
        .collect();
    let expected: usize = (0..50).map(|i| format!("chunk-{i};").len()).sum();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let r = kalmar
        .client()
        .post(origin.url("/sink"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), expected.to_string());

    let r = kalmar
        .client()
        .get(origin.url("/chunked"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "one,two,three");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_streams_both_ways_in_flat_memory() {
    use futures_util::StreamExt;
    const SIZE: u64 = 100 * 1024 * 1024;
    let origin = Origin::start().await;
    // A process of its own, so that its peak RSS is Kalmar's alone.
    let kalmar = support::KalmarProcess::spawn("[server]\nworkers = 1");
    let client = support::client_via(&kalmar.url());
    let warm = client.get(origin.url("/hello")).send().await.unwrap();
    assert_eq!(warm.text().await.unwrap(), "hello");
    let baseline = kalmar.status_kib("VmHWM:");

    let r = client
        .get(origin.url(&format!("/bytes/{SIZE}")))
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    let mut got = 0u64;
    while let Some(chunk) = stream.next().await {
        got += chunk.unwrap().len() as u64;
    }
    assert_eq!(got, SIZE);

    let chunk = bytes::Bytes::from(vec![b'u'; 64 * 1024]);
    let upload = futures_util::stream::iter(
        (0..SIZE / chunk.len() as u64).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    let r = client
        .post(origin.url("/sink"))
        .body(reqwest::Body::wrap_stream(upload))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), SIZE.to_string());

    // Peak resident memory may grow by socket and allocator buffers, never by the body.
    let grown_mib = kalmar.status_kib("VmHWM:").saturating_sub(baseline) / 1024;
    assert!(
        grown_mib < 16,
        "Kalmar's peak RSS grew by {grown_mib} MiB while streaming 2 x 100 MiB"
    );
    let text = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let text = std::fs::read_to_string(&kalmar.log_path).unwrap_or_default();
            if text.lines().count() >= 3 {
                return text;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[1]["bytes_to_client"], SIZE);
    assert_eq!(lines[2]["bytes_from_client"], SIZE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_form_request_is_a_clear_400() {
    let kalmar = Kalmar::start("");
    let answer = raw_exchange(
        kalmar.addr,
        b"GET /index.html HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("x-kalmar-error: not-proxy-request"),
        "{answer}"
    );
    assert!(answer.contains("forward proxy"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_is_refused_by_default() {
    let origin = Origin::start().await;
    let kalmar = Kalmar::start("");
    let r = kalmar
        .client()
        .request(reqwest::Method::TRACE, origin.url("/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["x-kalmar-error"], "method-not-allowed");
    assert_eq!(origin.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_json_line_per_request() {
    let origin = Origin::start().await;
    let kalmar = Kalmar::start("");
    let r = kalmar
        .client()
        .post(origin.url("/echo"))
        .body("abc")
        .send()
        .await
        .unwrap();
    let id = r
        .headers()
        .get("x-kalmar-request-id")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(r.text().await.unwrap(), "abc");
    let lines = kalmar.log_lines(1);
    let line = &lines[0];
    assert_eq!(line["method"], "POST");
    assert_eq!(line["target"], origin.url("/echo"));
    assert_eq!(line["status"], 200);
    assert_eq!(line["bytes_from_client"], 3);
    assert_eq!(line["bytes_to_client"], 3);
    assert_eq!(line["resolved"], origin.addr.to_string());
    assert_eq!(line["route"], "direct");
    assert!(line["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(line["request_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(line["duration_ms"].is_number());
    assert!(line["time"].as_str().unwrap().ends_with('Z'));
    assert!(line["error"].is_null());
    // Successful responses carry no request id header (it is only added on errors).
    assert!(id.is_none());
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_reaches_the_origin_only_when_configured() {
    let origin = Origin::start().await;
    let off = Kalmar::start("");
    let body = off
        .client()
        .get(origin.url("/headers"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!body.contains("x-request-id"), "{body}");

    let on = Kalmar::start("[proxy]\nrequest_id_header = \"X-Request-Id\"");
    let body = on
        .client()
        .get(origin.url("/headers"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sent = body
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .expect("header sent")
        .to_owned();
    let lines = on.log_lines(1);
    assert_eq!(
        lines[0]["request_id"],
        sent.as_str(),
        "the origin's id joins the access-log line"
    );
}
