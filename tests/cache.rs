//! The response cache through a real Kalmar, with real clients and a counting origin that
//! serves each caching header combination (chosen by the query string, so each combination
//! is its own URL and cache key).

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use support::Kalmar;

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// An origin that counts requests per `METHOD path?query` and builds each response from
/// the query:
///
/// | param          | effect                                                          |
/// |----------------|-----------------------------------------------------------------|
/// | `cc=...`       | `Cache-Control: ...`                                            |
/// | `etag=1`       | `ETag: "v<version>"`; a matching If-None-Match gets 304         |
/// | `lm=1`         | `Last-Modified` midnight ten days ago; If-Modified-Since on or after it: 304 |
/// | `expires=S`    | `Expires` S seconds from now                                    |
/// | `age=S`        | `Age: S`                                                        |
/// | `vary=H`       | `Vary: H`; the body names the request's H value                 |
/// | `size=N`       | N bytes of `y` as the body                                      |
/// | `chunked=1`    | the body in chunks, no Content-Length                           |
/// | `cookie=1`     | a `Set-Cookie`                                                  |
/// | `delay=MS`     | answer after MS milliseconds                                    |
/// | `forge=1`      | a forged `X-Kalmar-Error` and a Connection-named hop header     |
/// | `status=N`     | that status                                                     |
/// | `location=P`   | `Location: P` (percent-decoded); `clocation=P`: Content-Location |
///
/// The default body is `v<version> <path?query>[ <vary value>]`; [`CountingOrigin::bump`]
/// changes the version of a path.
struct CountingOrigin {
    addr: SocketAddr,
    state: Arc<OriginState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct OriginState {
    hits: Mutex<HashMap<String, usize>>,
    versions: Mutex<HashMap<String, u32>>,
    /// The conditional headers of the last request, per `path?query`.
    conditionals: Mutex<HashMap<String, String>>,
}

impl Drop for CountingOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CountingOrigin {
    async fn start() -> CountingOrigin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(OriginState::default());
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| respond(req, s.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        CountingOrigin { addr, state, task }
    }

    fn url(&self, pq: &str) -> String {
        format!("http://{}{}", self.addr, pq)
    }

    fn hits(&self, method: &str, pq: &str) -> usize {
        *self
            .state
            .hits
            .lock()
            .get(&format!("{method} {pq}"))
            .unwrap_or(&0)
    }

    fn gets(&self, pq: &str) -> usize {
        self.hits("GET", pq)
    }

    fn bump(&self, path: &str) {
        *self
            .state
            .versions
            .lock()
            .entry(path.to_owned())
            .or_insert(1) += 1;
    }

    fn last_conditionals(&self, pq: &str) -> String {
        self.state
            .conditionals
            .lock()
            .get(pq)
            .cloned()
            .unwrap_or_default()
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn http_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

async fn respond(
    req: Request<Incoming>,
    state: Arc<OriginState>,
) -> Result<Response<BoxBody>, Infallible> {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let path = req.uri().path().to_owned();
    *state
        .hits
        .lock()
        .entry(format!("{} {pq}", req.method()))
        .or_default() += 1;
    let params: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), decode(v)))
        .collect();
    let inm = req
        .headers()
        .get("if-none-match")
        .map(|v| v.to_str().unwrap().to_owned());
    let ims = req
        .headers()
        .get("if-modified-since")
        .map(|v| v.to_str().unwrap().to_owned());
    state.conditionals.lock().insert(
        pq.clone(),
        format!(
            "inm={} ims={}",
            inm.clone().unwrap_or_default(),
            ims.clone().unwrap_or_default()
        ),
    );
    if let Some(ms) = params.get("delay") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
    }
    let version = *state.versions.lock().get(&path).unwrap_or(&1);
    let now = SystemTime::now();
    // Midnight ten days ago: the same value on every request.
    let days = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86400;
    let last_modified = SystemTime::UNIX_EPOCH + Duration::from_secs((days - 10) * 86400);
    let etag = format!("\"v{version}\"");

    let mut b = Response::builder().header("date", http_date(now));
    if let Some(cc) = params.get("cc") {
        b = b.header("cache-control", cc.as_str());
    }
    if params.contains_key("etag") {
        b = b.header("etag", etag.as_str());
    }
    if params.contains_key("lm") {
        b = b.header("last-modified", http_date(last_modified));
    }
    if let Some(s) = params.get("expires") {
        let secs: u64 = s.parse().unwrap();
        b = b.header("expires", http_date(now + Duration::from_secs(secs)));
    }
    if let Some(age) = params.get("age") {
        b = b.header("age", age.as_str());
    }
    if params.contains_key("cookie") {
        b = b.header("set-cookie", "session=secret");
    }
    if params.contains_key("forge") {
        b = b
            .header("x-kalmar-error", "forged-by-origin")
            .header("connection", "x-hop")
            .header("x-hop", "must-not-pass");
    }
    if let Some(loc) = params.get("location") {
        b = b.header("location", loc.as_str());
    }
    if let Some(loc) = params.get("clocation") {
        b = b.header("content-location", loc.as_str());
    }
    let mut varied = String::new();
    if let Some(name) = params.get("vary") {
        b = b.header("vary", name.as_str());
        if name != "*" {
            varied = format!(
                " {}",
                req.headers()
                    .get(name.as_str())
                    .map(|v| v.to_str().unwrap())
                    .unwrap_or("-")
            );
        }
    }

    // Validation: If-None-Match first, then If-Modified-Since (RFC 9110 13.2.2).
    let not_modified = match (&inm, &ims) {
        (Some(inm), _) if params.contains_key("etag") => inm
            .split(',')
            .any(|t| t.trim().trim_start_matches("W/") == etag),
        (None, Some(ims)) if params.contains_key("lm") => httpdate::parse_http_date(ims)
            .map(|since| since >= last_modified)
            .unwrap_or(false),
        _ => false,
    };
    if not_modified && req.method() == hyper::Method::GET {
        return Ok(b.status(304).body(empty()).unwrap());
    }
    if let Some(status) = params.get("status") {
        b = b.status(status.parse::<u16>().unwrap());
    }
    let body: Bytes = match params.get("size") {
        Some(n) => Bytes::from(vec![b'y'; n.parse().unwrap()]),
        None => Bytes::from(format!("v{version} {pq}{varied}")),
    };
    let body = if params.contains_key("chunked") {
        let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = body
            .chunks(8192)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        StreamBody::new(futures_util::stream::iter(chunks)).boxed()
    } else {
        Full::new(body).map_err(|never| match never {}).boxed()
    };
    Ok(b.body(body).unwrap())
}

fn empty() -> BoxBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

/// One GET through the proxy: (status, headers, body).
async fn get(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = client.get(url);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap())
}

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    h.get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
}

fn cache_status(h: &reqwest::header::HeaderMap) -> &str {
    header(h, "cache-status")
}

/// A client for the admin listener (no proxy).
fn admin_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// `cache` fields of the access-log lines for `url`, in order.
fn logged(kalmar: &Kalmar, url: &str, n: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let lines = kalmar.log_lines(0);
        let found: Vec<String> = lines
            .iter()
            .filter(|l| l["target"] == url)
            .map(|l| l["cache"].as_str().unwrap_or("null").to_owned())
            .collect();
        if found.len() >= n || std::time::Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_responses_are_served_from_memory_with_age_and_cache_status() {
    let origin = CountingOrigin::start().await;
    let kalmar = Kalmar::start("");
    let client = kalmar.client();
    let pq = "/fresh?cc=max-age=60&forge=1";
    let url = origin.url(pq);

    let (status, h, body) = get(&client, &url, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(cache_status(&h), "kalmar; fwd=miss; stored");
    assert_eq!(body, format!("v1 {pq}"));

    let (status, h, cached) = get(&client, &url, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(cached, body);
    assert_eq!(cache_status(&h), "kalmar; hit");
    assert!(header(&h, "age").parse::<u64>().unwrap() <= 1, "{h:?}");
    assert_eq!(header(&h, "via"), "1.1 kalmar");
    assert_eq!(header(&h, "content-length"), body.len().to_string());
    // never stored: Kalmar's own error marker, hop-by-hop headers
    assert!(h.get("x-kalmar-error").is_none(), "{h:?}");
    assert!(h.get("x-hop").is_none(), "{h:?}");

    // HEAD is answered from the stored GET: same head, no body
    let r = client.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(cache_status(r.headers()), "kalmar; hit");
    assert_eq!(
        header(r.headers(), "content-length"),
        body.len().to_string()
    );
    assert_eq!(r.text().await.unwrap(), "");
    assert_eq!(origin.gets(pq), 1);
    assert_eq!(origin.hits("HEAD", pq), 0);

    // the origin's Age counts into ours
    let aged = origin.url("/aged?cc=max-age=600&age=100");
    get(&client, &aged, &[]).await;
    let (_, h, _) = get(&client, &aged, &[]).await;
    assert_eq!(cache_status(&h), "kalmar; hit");
    let age: u64 = header(&h, "age").parse().unwrap();
    assert!((100..=102).contains(&age), "age {age}");

    // a HEAD miss is forwarded as HEAD and not stored
    let head_only = origin.url("/head-only?cc=max-age=60");
    let r = client.head(&head_only).send().await.unwrap();
    assert_eq!(cache_status(r.headers()), "kalmar; fwd=miss");
    assert_eq!(origin.hits("HEAD", "/head-only?cc=max-age=60"), 1);

    assert_eq!(logged(&kalmar, &url, 3), ["miss", "hit", "hit"]);
    let metrics = admin_client()
        .get(format!("http://{}/metrics", kalmar.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("kalmar_cache_requests_total{status=\"hit\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("kalmar_cache_requests_total{status=\"miss\"} 3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_comes_from_s_maxage_expires_and_heuristics() {
    let origin = CountingOrigin::start().await;
    let kalmar = Kalmar::start("");
    let client = kalmar.client();
    // (path?query, stored and served fresh?)
    let cases = [
        ("/a?cc=s-maxage=60,max-age=0", true),
        ("/a?expires=60", true),
        ("/a?cc=public,max-age=60", true),
        ("/a?cc=max-age=60,immutable", true),
        // heuristic: Last-Modified ten days ago -> fresh for a day
        ("/a?lm=1", true),
        ("/a?lm=1&status=404", true),
        ("/a?cc=max-age=0", false),
        ("/a?expires=0", false),
        // s-maxage 0 wins over max-age for a shared cache
        ("/a?cc=max-age=60,s-maxage=0", false),
        // no freshness and no validator: nothing to gain from storing
        ("/a", false),
        // Set-Cookie is a header like any other for a shared cache (RFC 9111 3.1, 7.3):
        // an origin that sets per-user cookies says private or no-store
        ("/a?cc=max-age=60&cookie=1", true),
        ("/a?cc=public,max-age=60&cookie=1", true),
    ];
    for (pq, cached) in cases {
        let url = origin.url(pq);
        let (_, _, first) = get(&client, &url, &[]).await;
        let (_, h, second) = get(&client, &url, &[]).await;
        assert_eq!(first, second, "{pq}");
        let expected_hits = if cached { 1 } else { 2 };
        assert_eq!(origin.gets(pq), expected_hits, "{pq}: {h:?}");
        assert_eq!(cache_status(&h) == "kalmar; hit", cached, "{pq}: {h:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_store_private_and_no_cache_are_honoured() {
    let origin = CountingOrigin::start().await;
    let kalmar = Kalmar::start("");
    let client = kalmar.client();

    for pq in [
        "/n?cc=no-store",
        "/n?cc=private,max-age=60",
        "/n?cc=max-age=60,no-store",
    ] {
        let url = origin.url(pq);
        let (_, h1, _) = get(&client, &url, &[]).await;
        let (_, h2, _) = get(&client, &url, &[]).await;
        assert_eq!(origin.gets(pq), 2, "{pq}");
        assert_eq!(cache_status(&h1), "kalmar; fwd=miss", "{pq}");
        assert_eq!(cache_status(&h2), "kalmar; fwd=miss", "{pq}");
        assert_eq!(logged(&kalmar, &url, 2), ["uncacheable", "uncacheable"]);
    }

    // no-cache: stored, but validated with the origin before every use
    let pq = "/n?cc=no-cache&etag=1";
    let url = origin.url(pq);
    get(&client, &url, &[]).await;
    for _ in 0..2 {
        let (status, h, body) = get(&client, &url, &[]).await;
        assert_eq!(status, 200);
        assert_eq!(body, format!("v1 {pq}"));
        assert_eq!(cache_status(&h), "kalmar; fwd=stale; fwd-status=304");
        assert_eq!(origin.last_conditionals(pq), "inm=\"v1\" ims=");
    }
    assert_eq!(origin.gets(pq), 3);
    assert_eq!(
        logged(&kalmar, &url, 3),
        ["miss", "revalidated", "revalidated"]
    );

    // a request that says no-store is forwarded and not stored
    let pq = "/n?cc=max-age=60&r=nostore";
    let url = origin.url(pq);
    get(&client, &url, &[("cache-control", "no-store")]).await;
    get(&client, &url, &[]).await;
    assert_eq!(origin.gets(pq), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_is_cached_only_where_rfc_9111_allows() {
    let origin = CountingOrigin::start().await;
    let kalmar = Kalmar::start("");
    let client = kalmar.client();
    let auth = [("authorization", "Bearer secret")];
    let cases = [
        ("/auth?cc=max-age=60", false),
        ("/auth?cc=public,max-age=60", true),
        ("/auth?cc=s-maxage=60", true),
        ("/auth?cc=must-revalidate,max-age=60", true),
    ];
    for (pq, cached) in cases {
        let url = origin.url(pq);
        get(&client, &url, &auth).await;
        let (_, h, _) = get(&client, &url, &auth).await;
        assert_eq!(origin.gets(pq), if cached { 1 } else { 2 }, "{pq}");
        assert_eq!(cache_status(&h) == "kalmar; hit", cached, "{pq}");
    }
    // the authorization value itself is not kept on the stored entry (only its presence)
    let url = origin.url("/auth?cc=public,max-age=60");
    let (_, h, _) = get(&client, &url, &[("authorization", "Bearer other")]).await;
    assert_eq!(cache_status(&h), "kalmar; hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_cache_control_is_honoured() {
    let origin = CountingOrigin::start().await;
    let kalmar = Kalmar::start("");
    let client = kalmar.client();
    let pq = "/rcc?cc=max-age=60&etag=1";
    let url = origin.url(pq);
    get(&client, &url, &[]).await;

    // no-cache and max-age=0: validated first (the entry was fresh: fwd=request)
    for directive in ["no-cache", "max-age=0"] {
        let (status, h, _) = get(&client, &url, &[("cache-control", directive)]).await;
        assert_eq!(status, 200);
        assert_eq!(
            cache_status(&h),
            "kalmar; fwd=request; fwd-status=304",
            "{directive}"
        );
    }
    assert_eq!(origin.gets(pq), 3);
    // Pragma: no-cache without Cache-Control
    let (_, h, _) = get(&client, &url, &[("pragma", "no-cache")]).await;
    assert_eq!(cache_status(&h), "kalmar; fwd=request; fwd-status=304");
    // min-fresh beyond the remaining lifetime
    let (_, h, _) = get(&client, &url, &[("cache-control", "min-fresh=120")]).await;
    assert_eq!(cache_status(&h), "kalmar; fwd=request; fwd-status=304");
    assert_eq!(origin.gets(pq), 5);
    // max-age within the age, min-fresh within the lifetime: a hit
    let (_, h, _) = get(
        &client,
        &url,
        &[("cache-control", "max-age=30, min-fresh=5")],
    )
    .await;
    assert_eq!(cache_status(&h), "kalmar; hit");

    // only-if-cached: served when stored, 504 not-cached otherwise
    let (_, h, _) = get(&client, &url, &[("cache-control", "only-if-cached")]).await;
    assert_eq!(cache_status(&h), "kalmar; hit");
    let missing = origin.url("/rcc?cc=max-age=60&r=missing");
    let (status, h, _) = get(&client, &missing, &[("cache-control", "only-if-cached")]).await;
    assert_eq!(status, 504);
    assert_eq!(header(&h, "x-kalmar-error"), "not-cached");
    assert_eq!(origin.gets("/rcc?cc=max-age=60&r=missing"), 0);
    assert_eq!(origin.gets(pq), 5);

    // max-stale: a stale entry is acceptable to this client without validation
    let pq = "/rcc?cc=max-age=1&r=stale";
    let url = origin.url(pq);
    get(&client, &url, &[]).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (_, h, _) = get(&client, &url, &[("cache-control", "max-stale=60")]).await;
    assert_eq!(cache_status(&h), "kalmar; hit");
    assert!(header(&h, "age").parse::<u64>().unwrap() >= 1);
    assert_eq!(origin.gets(pq), 1);
    let (_, h, _) = get(&client, &url, &[]).await;
    assert_eq!(cache_status(&h), "kalmar; fwd=stale; stored");
    assert_eq!(origin.gets(pq), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_selects_variants_and_vary_star_is_never_served() {
    let origin = CountingOrigin::start().await;
    let kalmar = Kalmar::start("");
    let client = kalmar.client();
    let pq = "/vary?cc=max-age=60&vary=accept-language";
    let url = origin.url(pq);
    // the first response makes the URL vary; a second language is a vary-miss
    for (lang, fwd) in [("de", "miss"), ("en", "vary-miss")] {
        let (_, h, body) = get(&client, &url, &[("accept-language", lang)]).await;
        assert_eq!(body, format!("v1 {pq} {lang}"));
        assert_eq!(cache_status(&h), format!("kalmar; fwd={fwd}; stored"));
    }
    for lang in ["de", "en", "de"] {
        let (_, h, body) = get(&client, &url, &[("accept-language", lang)]).await;
        assert_eq!(body, format!("v1 {pq} {lang}"));
        assert_eq!(cache_status(&h), "kalmar; hit", "{lang}");
    }
    // no accept-language at all is another variant
    let (_, h, body) = get(&client, &url, &[]).await;
    assert_eq!(body, format!("v1 {pq} -"));
    assert_eq!(cache_status(&h), "kalmar; fwd=vary-miss; stored");
    assert_eq!(origin.gets(pq), 3);

    let pq = "/vary?cc=max-age=60&vary=*";
    let url = origin.url(pq);
    get(&client, &url, &[]).await;
    let (_, h, _) = get(&client, &url, &[]).await;
    assert_eq!(cache_status(&h), "kalmar; fwd=miss");
    assert_eq!(origin.gets(pq), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_entries_are_revalidated_with_304_and_200_answers() {
    let origin = CountingOrigin::start().await;
    let kalmar = Kalmar::start("");
    let client = kalmar.client();

    // ETag: If-None-Match, 304 refreshes the entry
    // (max-age=2: the refreshed entry must still be fresh on the very next request)
    let pq = "/reval?cc=max-age=2&etag=1";
    let url = origin.url(pq);
    let (_, _, body) = get(&client, &url, &[]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, h, again) = get(&client, &url, &[]).await;
    assert_eq!((status, again.as_str()), (200, body.as_str()));
    assert_eq!(cache_status(&h), "kalmar; fwd=stale; fwd-status=304");
    assert_eq!(header(&h, "etag"), "\"v1\"");
    assert_eq!(origin.last_conditionals(pq), "inm=\"v1\" ims=");
    // refreshed: fresh again without asking
    let (_, h, _) = get(&client, &url, &[]).await;
    assert_eq!(cache_status(&h), "kalmar; hit");
    assert_eq!(origin.gets(pq), 2);

    // the resource changed: the origin answers 200, which replaces the entry
    origin.bump("/reval");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (_, h, changed) = get(&client, &url, &[]).await;
    assert_eq!(changed, format!("v2 {pq}"));
    assert_eq!(cache_status(&h), "kalmar; fwd=stale; stored");
    let (_, h, cached) = get(&client, &url, &[]).await;
    assert_eq!(cached, changed);
    assert_eq!(cache_status(&h), "kalmar; hit");
    assert_eq!(origin.gets(pq), 3);
    assert_eq!(
        logged(&kalmar, &url, 5),
        ["miss", "revalidated", "hit", "miss", "hit"]
    );

    // Last-Modified only: If-Modified-Since
    let pq = "/reval?cc=max-age=1&lm=1";
    let url = origin.url(pq);
    get(&client, &url, &[]).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, h, _) = get(&client, &url, &[]).await;
    assert_eq!(cache_status(&h), "kalmar; fwd=stale; fwd-status=304");
    assert!(origin.last_conditionals(pq).starts_with("inm= ims="));
    assert!(origin.last_conditionals(pq).len() > "inm= ims=".len());

    // stale without a validator: simply fetched again
    let pq = "/reval?cc=max-age=1";
    let url = origin.url(pq);
    get(&client, &url, &[]).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, h, _) = get(&client, &url, &[]).await;
    assert_eq!(cache_status(&h), "kalmar; fwd=stale; stored");
    assert_eq!(origin.last_conditionals(pq), "inm= ims=");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_conditionals_are_answered_from_fresh_entries() {
    let origin = CountingOrigin::start().await;
    let kalmar = Kalmar::start("");
    let client = kalmar.client();
    let pq = "/cond?cc=max-age=60&etag=1&lm=1";
    let url = origin.url(pq);
    let (_, h, body) = get(&client, &url, &[]).await;
    let last_modified = header(&h, "last-modified").to_owned();

    let (status, h, empty) = get(&client, &url, &[("if-none-match", "\"v1\"")]).await;
    assert_eq!((status, empty.as_str()), (304, ""));
    assert_eq!(cache_status(&h), "kalmar; hit");
    assert_eq!(header(&h, "etag"), "\"v1\"");
    let (status, _, _) = get(&client, &url, &[("if-none-match", "W/\"x\", \"v1\"")]).await;
    assert_eq!(status, 304);
    let (status, _, full) = get(&client, &url, &[("if-none-match", "\"v0\"")]).await;
    assert_eq!((status, full.as_str()), (200, body.as_str()));
    let (status, _, _) = get(&client, &url, &[("if-modified-since", &last_modified)]).await;
    assert_eq!(status, 304);
    let earlier = http_date(SystemTime::now() - Duration::from_secs(30 * 86400));
    let (status, _, _) = get(&client, &url, &[("if-modified-since", &earlier)]).await;
    assert_eq!(status, 200);
    assert_eq!(origin.gets(pq), 1);

    // a conditional miss goes to the origin as the client sent it
    let pq = "/cond?cc=max-age=60&etag=1&r=2";
    let (status, _, _) = get(&client, &origin.url(pq), &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(status, 304);
    assert_eq!(origin.last_conditionals(pq), "inm=\"v1\" ims=");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successful_unsafe_methods_invalidate() {
    let origin = CountingOrigin::start().await;
    let kalmar = Kalmar::start("");
    let client = kalmar.client();
    let pq = "/inv?cc=max-age=60";
    let url = origin.url(pq);
    get(&client, &url, &[]).await;
    get(&client, &url, &[]).await;
    assert_eq!(origin.gets(pq), 1);

    let r = client.post(&url).body("x").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(cache_status(r.headers()), "kalmar; fwd=method");
    let (_, h, _) = get(&client, &url, &[]).await;
    assert_eq!(cache_status(&h), "kalmar; fwd=miss; stored");
    assert_eq!(origin.gets(pq), 2);

    // Location and Content-Location of the same origin
    let a = "/inv/a?cc=max-age=60";
    let b = "/inv/b?cc=max-age=60";
    for pq in [a, b] {
        get(&client, &origin.url(pq), &[]).await;
    }
    let post = origin
        .url("/inv/form?location=%2Finv%2Fa%3Fcc%3Dmax-age%3D60&clocation=b%3Fcc%3Dmax-age%3D60");
    let r = client.put(&post).body("x").send().await.unwrap();
    assert_eq!(r.status(), 200);
    for pq in [a, b] {
        let (_, h, _) = get(&client, &origin.url(pq), &[]).await;
        assert_eq!(cache_status(&h), "kalmar; fwd=miss; stored", "{pq}");
        assert_eq!(origin.gets(pq), 2, "{pq}");
    }

    // an error answer invalidates nothing
    let r = client
        .delete(origin.url("/inv?cc=max-age=60&status=500"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let (_, h, _) = get(&client, &url, &[]).await;
    assert_eq!(cache_status(&h), "kalmar; hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_collapse_into_one_origin_request() {
    let origin = CountingOrigin::start().await;
    let kalmar = Kalmar::start("");
    let client = kalmar.client();
    let pq = "/collapse?cc=max-age=60&delay=400&size=100000";
    let url = origin.url(pq);
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move { get(&client, &url, &[]).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        let (status, h, body) = t.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body.len(), 100000);
        statuses.push(cache_status(&h).to_owned());
    }
    assert_eq!(origin.gets(pq), 1, "{statuses:?}");
    statuses.sort();
    assert_eq!(statuses[0], "kalmar; fwd=miss; collapsed");
    assert_eq!(statuses[8], "kalmar; fwd=miss; collapsed");
    assert_eq!(statuses[9], "kalmar; fwd=miss; stored");
    let mut logged = logged(&kalmar, &url, 10);
    logged.sort();
    assert_eq!(logged, [&["hit"; 9][..], &["miss"]].concat());

    // the wait is bounded: past cache.collapse_wait the waiters fetch on their own
    let kalmar = Kalmar::start("[cache]\ncollapse_wait = \"100ms\"");
    let client = kalmar.client();
    let pq = "/collapse?cc=max-age=60&delay=700";
    let url = origin.url(pq);
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move { get(&client, &url, &[]).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().0, 200);
    }
    assert_eq!(origin.gets(pq), 3);
    assert!(started.elapsed() < Duration::from_millis(1300));

    // a leader whose response is not stored releases the waiters at once
    let pq = "/collapse?cc=no-store&delay=300";
    let url = origin.url(pq);
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move { get(&client, &url, &[]).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().0, 200);
    }
    assert_eq!(origin.gets(pq), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_bounds_pass_large_objects_through_and_bound_memory() {
    let origin = CountingOrigin::start().await;
    let kalmar = Kalmar::start("[cache]\nmemory_size = \"256KiB\"\nmax_object_size = \"64KiB\"");
    let client = kalmar.client();

    // larger than max_object_size: streamed whole, not stored (known length and chunked)
    for pq in [
        "/big?cc=max-age=60&size=100000",
        "/big?cc=max-age=60&size=100000&chunked=1",
    ] {
        let url = origin.url(pq);
        for _ in 0..2 {
            let (status, h, body) = get(&client, &url, &[]).await;
            assert_eq!(status, 200);
            assert_eq!(body.len(), 100000);
            assert_ne!(cache_status(&h), "kalmar; hit");
        }
        assert_eq!(origin.gets(pq), 2, "{pq}");
    }
    // just under it: stored, chunked too
    let pq = "/big?cc=max-age=60&size=60000&chunked=1";
    let url = origin.url(pq);
    get(&client, &url, &[]).await;
    let (_, h, body) = get(&client, &url, &[]).await;
    assert_eq!(cache_status(&h), "kalmar; hit");
    assert_eq!(body.len(), 60000);

    // 40 objects of 30 KB through a 256 KiB memory tier
    for i in 0..40 {
        get(
            &client,
            &origin.url(&format!("/m{i}?cc=max-age=60&size=30000")),
            &[],
        )
        .await;
    }
    let cache = kalmar.handle().cache().expect("cache enabled");
    let bytes = cache.memory_bytes();
    assert!(bytes <= 256 * 1024, "memory tier holds {bytes} bytes");
    let mut refetched = 0;
    for i in 0..40 {
        let pq = format!("/m{i}?cc=max-age=60&size=30000");
        get(&client, &origin.url(&pq), &[]).await;
        refetched += origin.gets(&pq) - 1;
    }
    // at most 256 KiB / 30 KB = 8 objects can have stayed
    assert!(refetched >= 32, "only {refetched} of 40 were evicted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_client_is_never_served_a_cached_response() {
    let origin = CountingOrigin::start().await;
    let kalmar = Kalmar::start(
        r#"
[[sources]]
name = "localhost"
cidr = "127.0.0.0/8"
labels = { "network-access-external-ips" = "true" }
[[sources]]
name = "outsider"
cidr = "127.0.0.3/32"
labels = { "team" = "none" }
"#,
    );
    let pq = "/secret?cc=public,max-age=600";
    let url = origin.url(pq);
    let (_, _, _) = get(&kalmar.client(), &url, &[]).await;
    let (_, h, _) = get(&kalmar.client(), &url, &[]).await;
    assert_eq!(cache_status(&h), "kalmar; hit");

    let outsider = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(kalmar.url()).unwrap())
        .local_address(Some("127.0.0.3".parse().unwrap()))
        .build()
        .unwrap();
    for extra in [&[][..], &[("cache-control", "only-if-cached")][..]] {
        let (status, h, body) = get(&outsider, &url, extra).await;
        assert_eq!(status, 403, "{body}");
        assert!(h.get("cache-status").is_none(), "{h:?}");
        assert!(!h.contains_key("age"));
        assert!(!body.contains("v1"), "{body}");
    }
    assert_eq!(origin.gets(pq), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_and_clear_on_the_admin_listener_only() {
    let origin = CountingOrigin::start().await;
    let kalmar = Kalmar::start("");
    let client = kalmar.client();
    let admin = admin_client();
    let (a, b) = ("/p/a?cc=max-age=60", "/p/b?cc=max-age=60");
    let v = "/p/v?cc=max-age=60&vary=accept";
    for pq in [a, b] {
        get(&client, &origin.url(pq), &[]).await;
    }
    get(&client, &origin.url(v), &[("accept", "text/a")]).await;
    get(&client, &origin.url(v), &[("accept", "text/b")]).await;

    // purge one URL (percent-encoded)
    let raw = origin.url(a);
    let encoded: String = raw
        .bytes()
        .map(|c| match c {
            b'?' | b'=' | b'&' | b':' | b'/' => format!("%{c:02X}"),
            c => (c as char).to_string(),
        })
        .collect();
    let r = admin
        .post(format!("http://{}/cache/purge?url={encoded}", kalmar.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().starts_with("purged 1 from"));
    let (_, h, _) = get(&client, &origin.url(a), &[]).await;
    assert_eq!(cache_status(&h), "kalmar; fwd=miss; stored");
    let (_, h, _) = get(&client, &origin.url(b), &[]).await;
    assert_eq!(cache_status(&h), "kalmar; hit");

    // purging a varying URL takes every variant
    let r = admin
        .post(format!(
            "http://{}/cache/purge?url={}",
            kalmar.admin,
            origin.url(v).replace('&', "%26")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap().split(' ').nth(1), Some("3"));
    let (_, h, _) = get(&client, &origin.url(v), &[("accept", "text/a")]).await;
    assert_eq!(cache_status(&h), "kalmar; fwd=miss; stored");

    // not cached, bad URL, wrong method
    let r = admin
        .post(format!(
            "http://{}/cache/purge?url=http://127.0.0.1:1/none",
            kalmar.admin
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = admin
        .post(format!("http://{}/cache/purge?url=nonsense", kalmar.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = admin
        .get(format!("http://{}/cache/clear", kalmar.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(header(r.headers(), "allow"), "POST");

    // clear
    let r = admin
        .post(format!("http://{}/cache/clear", kalmar.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, h, _) = get(&client, &origin.url(b), &[]).await;
    assert_eq!(cache_status(&h), "kalmar; fwd=miss; stored");
    assert_eq!(origin.gets(b), 2);

    // the proxy port does not serve the admin routes
    let r = admin
        .post(format!("http://{}/cache/clear", kalmar.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(header(r.headers(), "x-kalmar-error"), "not-proxy-request");
    let (_, h, _) = get(&client, &origin.url(b), &[]).await;
    assert_eq!(cache_status(&h), "kalmar; hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_through_connect_is_not_cached() {
    // A CONNECT tunnel is opaque: there is nothing to cache, and no Cache-Status.
    let origin = support::origin::TlsOrigin::start().await;
    let kalmar = Kalmar::start("");
    let url = format!("https://127.0.0.1:{}/hello", origin.addr.port());
    for _ in 0..2 {
        let r = kalmar.client().get(&url).send().await.unwrap();
        assert!(r.headers().get("cache-status").is_none());
        assert_eq!(r.text().await.unwrap(), "hello");
    }
    assert_eq!(
        origin
            .counters
            .requests
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
}

fn disk_config(dir: &std::path::Path) -> String {
    format!(
        "[cache]\ndir = {:?}\ndisk_size = \"16MiB\"\n",
        dir.display().to_string()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_tier_survives_restarts_and_discards_corrupt_entries() {
    let origin = CountingOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = disk_config(dir.path());
    let (a, b, c) = (
        "/d/a?cc=max-age=600",
        "/d/b?cc=max-age=600&size=50000",
        "/d/c?cc=max-age=600&size=20000",
    );
    let v = "/d/v?cc=max-age=600&vary=accept";

    let mut kalmar = Kalmar::start(&config);
    let client = kalmar.client();
    for pq in [a, b, c] {
        get(&client, &origin.url(pq), &[]).await;
    }
    get(&client, &origin.url(v), &[("accept", "text/x")]).await;
    kalmar.shutdown();

    // restart: everything is there, without asking the origin
    let mut kalmar = Kalmar::start(&config);
    let client = kalmar.client();
    for pq in [a, b, c] {
        let (_, h, body) = get(&client, &origin.url(pq), &[]).await;
        assert_eq!(cache_status(&h), "kalmar; hit", "{pq}");
        assert!(body.starts_with("v1") || body.starts_with("yyy"), "{pq}");
    }
    let (_, h, body) = get(&client, &origin.url(v), &[("accept", "text/x")]).await;
    assert_eq!(cache_status(&h), "kalmar; hit");
    assert_eq!(body, format!("v1 {v} text/x"));
    let (_, h, _) = get(&client, &origin.url(v), &[("accept", "text/y")]).await;
    assert_eq!(cache_status(&h), "kalmar; fwd=vary-miss; stored");
    kalmar.shutdown();

    // corrupt one file (a flipped body byte), truncate another
    let path = |pq: &str| kalmar::cache::disk::Disk::path_for(dir.path(), &origin.url(pq));
    let mut bytes = std::fs::read(path(b)).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(path(b), &bytes).unwrap();
    let bytes = std::fs::read(path(c)).unwrap();
    std::fs::write(path(c), &bytes[..bytes.len() - 100]).unwrap();

    let mut kalmar = Kalmar::start(&config);
    let client = kalmar.client();
    for pq in [b, c] {
        let (status, h, body) = get(&client, &origin.url(pq), &[]).await;
        assert_eq!(status, 200);
        assert_eq!(cache_status(&h), "kalmar; fwd=miss; stored", "{pq}");
        assert!(
            body.bytes().all(|c| c == b'y'),
            "{pq}: corrupt bytes served"
        );
        assert_eq!(origin.gets(pq), 2, "{pq}");
    }
    let (_, h, _) = get(&client, &origin.url(a), &[]).await;
    assert_eq!(cache_status(&h), "kalmar; hit");
    kalmar.shutdown();
    // the bad files were replaced by good ones
    let mut kalmar = Kalmar::start(&config);
    let client = kalmar.client();
    for pq in [b, c] {
        let (_, h, _) = get(&client, &origin.url(pq), &[]).await;
        assert_eq!(cache_status(&h), "kalmar; hit", "{pq}");
    }
    // clear empties the directory
    admin_client()
        .post(format!("http://{}/cache/clear", kalmar.admin))
        .send()
        .await
        .unwrap();
    kalmar.shutdown();
    let left = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(left, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_tier_survives_a_binary_restart() {
    let origin = CountingOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = disk_config(dir.path());
    let pq = "/bin?cc=max-age=600";
    let url = origin.url(pq);
    let kalmar = support::KalmarProcess::spawn(&config);
    let client = support::client_via(&kalmar.url());
    get(&client, &url, &[]).await;
    kalmar.signal("TERM");
    let mut kalmar = kalmar;
    let status = tokio::task::spawn_blocking(move || {
        let status = kalmar.child.wait().unwrap();
        (kalmar, status)
    })
    .await
    .unwrap();
    assert!(status.1.success());
    drop(status.0);

    let kalmar = support::KalmarProcess::spawn(&config);
    let client = support::client_via(&kalmar.url());
    let (_, h, body) = get(&client, &url, &[]).await;
    assert_eq!(cache_status(&h), "kalmar; hit");
    assert_eq!(body, format!("v1 {pq}"));
    assert_eq!(origin.gets(pq), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_cache_forwards_everything() {
    let origin = CountingOrigin::start().await;
    let kalmar = Kalmar::start("[cache]\nenabled = false");
    let client = kalmar.client();
    let pq = "/off?cc=max-age=60";
    for _ in 0..2 {
        let (_, h, _) = get(&client, &origin.url(pq), &[]).await;
        assert!(h.get("cache-status").is_none());
    }
    assert_eq!(origin.gets(pq), 2);
    assert_eq!(logged(&kalmar, &origin.url(pq), 2), ["null", "null"]);
    let r = admin_client()
        .post(format!("http://{}/cache/clear", kalmar.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}
