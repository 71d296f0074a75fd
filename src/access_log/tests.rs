use super::json::json_string;
use super::text::{MAX_UNIX_SECS, put_rfc3339_millis};
use super::*;
use crate::acl::{Reason, Verdict};
use crate::cache::Outcome;
use crate::error::ErrorKind;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::time::UNIX_EPOCH;

fn record() -> AccessRecord {
    let mut labels = BTreeMap::new();
    labels.insert("namespace".to_owned(), "project-x".to_owned());
    labels.insert("network-access-external-ips".to_owned(), "true".to_owned());
    AccessRecord {
        time: UNIX_EPOCH + Duration::from_millis(1_699_999_999_878),
        duration: Duration::from_micros(245_123),
        request_id: "01HF3Z6Q8W".to_owned(),
        client: "127.0.0.1:51234".parse().expect("addr"),
        method: http::Method::GET,
        target: "http://example.com/".to_owned(),
        status: 200,
        bytes_from_client: 78,
        bytes_to_client: 1234,
        resolved: Some("93.184.216.34:80".parse().expect("addr")),
        error: None,
        source_name: Some("project-x".into()),
        labels: Some(Arc::new(labels)),
        pod: None,
        node: None,
        rule: Some("external".into()),
        verdict: Some(Verdict::Allow),
        reason: Some(Reason::Rule),
        route: Hop::Direct,
        cache: Some(Outcome::Miss),
        content_type: Some(http::HeaderValue::from_static("text/html; charset=utf-8")),
        user_agent: Some(http::HeaderValue::from_static("curl/8.5.0")),
        referer: None,
        http_version: http::Version::HTTP_11,
        sni: None,
        alpn: None,
        tls: None,
    }
}

/// Every optional field absent, unknown source, nothing dialled.
fn bare_record() -> AccessRecord {
    AccessRecord {
        resolved: None,
        error: Some(ErrorKind::MalformedRequest),
        source_name: None,
        labels: None,
        rule: None,
        verdict: None,
        reason: None,
        cache: None,
        content_type: None,
        user_agent: None,
        referer: None,
        status: 400,
        bytes_from_client: 0,
        bytes_to_client: 0,
        ..record()
    }
}

/// Values a hostile client or origin could put into a line.
fn hostile_record() -> AccessRecord {
    let mut labels = BTreeMap::new();
    labels.insert("k\"\n".to_owned(), "v\\\r\u{0}".to_owned());
    AccessRecord {
            request_id: "id\"\n{\"injected\":1}".to_owned(),
            target: "http://evil.example/a b\"c\r\n1700000000.000 0 6.6.6.6 TCP_HIT/200 0 GET http://x/ - HIER_NONE/- -\\\u{7f}é".to_owned(),
            method: http::Method::from_bytes(b"PROPFIND").expect("method"),
            labels: Some(Arc::new(labels)),
            source_name: Some("na\tme\"".into()),
            content_type: Some(
                http::HeaderValue::from_bytes(b"text/\"x\"\xff\xfe;q=\"1\"").expect("obs-text"),
            ),
            user_agent: Some(
                http::HeaderValue::from_bytes(b"Mozilla \"quoted\" \\ \xc3\x28 \t end\\")
                    .expect("obs-text"),
            ),
            referer: Some(http::HeaderValue::from_bytes(b"\"] \"GET /x HTTP/1.1\" 200").expect("hv")),
            client: "[::ffff:10.1.2.3]:4000".parse().expect("addr"),
            ..record()
        }
}

fn line(format: Format, rec: &AccessRecord) -> String {
    let mut out = Vec::new();
    format.write_line(rec, &mut out);
    assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1, "one line");
    assert_eq!(out.last(), Some(&b'\n'));
    assert!(
        !out[..out.len() - 1]
            .iter()
            .any(|b| *b == b'\r' || *b == b'\n'),
        "no line break inside: {out:?}"
    );
    String::from_utf8(out).expect("every format is valid UTF-8")
}

fn json(rec: &AccessRecord) -> serde_json::Map<String, serde_json::Value> {
    let text = line(Format::Json, rec);
    match serde_json::from_str(&text).expect("JSON parses back") {
        serde_json::Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

#[test]
fn json_has_every_field_with_the_right_values() {
    let v = json(&record());
    let keys: Vec<&str> = v.keys().map(String::as_str).collect();
    let mut all = fields::ALL.to_vec();
    all.sort_unstable();
    let mut got = keys.clone();
    got.sort_unstable();
    assert_eq!(got, all);
    assert_eq!(v[fields::TIME], "2023-11-14T22:13:19.878Z");
    assert_eq!(v[fields::DURATION_MS].as_f64(), Some(245.123));
    assert_eq!(v[fields::REQUEST_ID], "01HF3Z6Q8W");
    assert_eq!(v[fields::CLIENT], "127.0.0.1:51234");
    assert_eq!(v[fields::METHOD], "GET");
    assert_eq!(v[fields::TARGET], "http://example.com/");
    assert_eq!(v[fields::STATUS], 200);
    assert_eq!(v[fields::BYTES_FROM_CLIENT], 78);
    assert_eq!(v[fields::BYTES_TO_CLIENT], 1234);
    assert_eq!(v[fields::RESOLVED], "93.184.216.34:80");
    assert!(v[fields::ERROR].is_null());
    assert_eq!(v[fields::SOURCE], "project-x");
    assert_eq!(v[fields::LABELS]["namespace"], "project-x");
    assert_eq!(v[fields::LABELS]["network-access-external-ips"], "true");
    assert_eq!(v[fields::RULE], "external");
    assert_eq!(v[fields::VERDICT], "allow");
    assert_eq!(v[fields::REASON], "rule");
    assert_eq!(v[fields::ROUTE], "direct");
    assert_eq!(v[fields::CACHE], "miss");
    assert_eq!(v[fields::CONTENT_TYPE], "text/html; charset=utf-8");
    assert_eq!(v[fields::USER_AGENT], "curl/8.5.0");
    assert!(v[fields::REFERER].is_null());
    assert_eq!(v[fields::HTTP_VERSION], "HTTP/1.1");
}

/// A client the live index identified: a pod in `project-x` on `node-a`.
fn pod_record() -> AccessRecord {
    let pod = crate::acl::PodIdentity::new(
        Arc::from("project-x"),
        "worker-7d9f",
        Arc::new(BTreeMap::new()),
        Arc::new(crate::acl::namespace_name_labels("project-x")),
        Arc::from("runner"),
        Some(Arc::from("node-a")),
    );
    AccessRecord {
        source_name: Some("project-x/worker-7d9f".into()),
        pod: Some(Arc::new(pod)),
        node: Some("node-a".into()),
        ..record()
    }
}

#[test]
fn pod_fields_in_every_format() {
    let v = json(&pod_record());
    assert_eq!(v[fields::POD], "project-x/worker-7d9f");
    assert_eq!(v[fields::NAMESPACE], "project-x");
    assert_eq!(v[fields::SERVICE_ACCOUNT], "runner");
    assert_eq!(v[fields::NODE], "node-a");
    let squid = line(Format::Squid, &pod_record());
    assert!(
        squid.contains(" GET http://example.com/ project-x/worker-7d9f HIER_DIRECT/"),
        "{squid}"
    );
    let combined = line(Format::Combined, &pod_record());
    assert!(
        combined.starts_with("127.0.0.1 - project-x/worker-7d9f [14/Nov/2023:"),
        "{combined}"
    );
    for f in [
        fields::POD,
        fields::NAMESPACE,
        fields::SERVICE_ACCOUNT,
        fields::NODE,
    ] {
        assert!(json(&record())[f].is_null(), "{f}");
    }
}

#[test]
fn json_tunnel_fields_sni_alpn_and_the_check_as_reason() {
    use crate::tls::{TlsCheck, TlsReason};
    let tunnel = AccessRecord {
        method: http::Method::CONNECT,
        target: "pypi.org:443".to_owned(),
        sni: Some("pypi.org".into()),
        alpn: Some(vec!["h2".into(), "http/1.1".into()]),
        tls: Some(TlsCheck {
            verdict: Verdict::Allow,
            reason: TlsReason::Exact,
        }),
        ..record()
    };
    let v = json(&tunnel);
    assert_eq!(v[fields::SNI], "pypi.org");
    assert_eq!(v[fields::ALPN], serde_json::json!(["h2", "http/1.1"]));
    assert_eq!(
        v[fields::REASON],
        "rule",
        "a passed check leaves the policy's reason"
    );
    let refused = AccessRecord {
        sni: Some("evil.example".into()),
        alpn: Some(Vec::new()),
        verdict: Some(Verdict::Deny),
        error: Some(crate::error::ErrorKind::SniMismatch),
        tls: Some(TlsCheck {
            verdict: Verdict::Deny,
            reason: TlsReason::SniMismatch,
        }),
        ..tunnel
    };
    let v = json(&refused);
    assert_eq!(v[fields::ALPN], serde_json::json!([]));
    assert_eq!(v[fields::VERDICT], "deny");
    assert_eq!(v[fields::REASON], "sni-mismatch");
    assert_eq!(v[fields::ERROR], "sni-mismatch");
}

#[test]
fn json_missing_fields_are_null() {
    let v = json(&bare_record());
    assert_eq!(v.len(), fields::ALL.len());
    for f in [
        fields::RESOLVED,
        fields::SOURCE,
        fields::LABELS,
        fields::RULE,
        fields::CACHE,
        fields::CONTENT_TYPE,
        fields::USER_AGENT,
        fields::REFERER,
        fields::SNI,
        fields::ALPN,
    ] {
        assert!(v[f].is_null(), "{f}");
    }
    assert_eq!(v[fields::ERROR], "malformed-request");
}

#[test]
fn json_escapes_hostile_values_and_round_trips_them() {
    let rec = hostile_record();
    let v = json(&rec);
    assert_eq!(v[fields::REQUEST_ID], rec.request_id.as_str());
    assert_eq!(v[fields::TARGET], rec.target.as_str());
    assert_eq!(v[fields::METHOD], "PROPFIND");
    assert_eq!(v[fields::SOURCE], "na\tme\"");
    assert_eq!(v[fields::LABELS]["k\"\n"], "v\\\r\u{0}");
    assert_eq!(v[fields::CLIENT], "10.1.2.3:4000");
    // invalid UTF-8 becomes U+FFFD
    assert_eq!(
        v[fields::CONTENT_TYPE],
        "text/\"x\"\u{FFFD}\u{FFFD};q=\"1\""
    );
    assert_eq!(
        v[fields::USER_AGENT],
        "Mozilla \"quoted\" \\ \u{FFFD}( \t end\\"
    );
    assert!(v.get("injected").is_none());
}

#[test]
fn json_string_escapes_every_control_byte() {
    let all: Vec<u8> = (0u8..=0x7f).collect();
    let mut out = Vec::new();
    json_string(&mut out, &all);
    let back: String = serde_json::from_slice(&out).expect("valid JSON string");
    assert_eq!(back.as_bytes(), &all[..]);
    assert!(!out.iter().any(|b| *b < 0x20));
}

#[test]
fn squid_matches_squids_native_format() {
    let rec = record();
    assert_eq!(
        line(Format::Squid, &rec),
        "1700000000.123    245 127.0.0.1 TCP_MISS/200 1234 GET http://example.com/ - HIER_DIRECT/93.184.216.34 text/html\n"
    );
    let bare = bare_record();
    assert_eq!(
        line(Format::Squid, &bare),
        "1700000000.123    245 127.0.0.1 NONE_NONE/400 0 GET http://example.com/ - HIER_NONE/- -\n"
    );
}

#[test]
fn squid_result_and_hierarchy_codes() {
    let tunnel = AccessRecord {
        method: http::Method::CONNECT,
        target: "example.com:443".to_owned(),
        resolved: Some("[2606:2800:220:1::1]:443".parse().expect("addr")),
        content_type: None,
        cache: None,
        client: "[2001:db8::7]:5000".parse().expect("addr"),
        ..record()
    };
    assert!(
            line(Format::Squid, &tunnel).ends_with(
                " 2001:db8::7 TCP_TUNNEL/200 1234 CONNECT example.com:443 - HIER_DIRECT/2606:2800:220:1::1 -\n"
            ),
            "{}",
            line(Format::Squid, &tunnel)
        );
    let denied = AccessRecord {
        verdict: Some(Verdict::Deny),
        reason: Some(Reason::Rule),
        status: 403,
        resolved: None,
        error: Some(ErrorKind::Denied),
        ..tunnel.clone()
    };
    assert!(
        line(Format::Squid, &denied)
            .contains(" TCP_DENIED/403 1234 CONNECT example.com:443 - HIER_NONE/- -")
    );
    let hit = AccessRecord {
        cache: Some(Outcome::Hit),
        resolved: None,
        ..record()
    };
    assert!(line(Format::Squid, &hit).contains(" TCP_HIT/200 "));
    assert!(line(Format::Squid, &hit).contains(" - HIER_NONE/- text/html\n"));
    let revalidated = AccessRecord {
        cache: Some(Outcome::Revalidated),
        ..record()
    };
    assert!(line(Format::Squid, &revalidated).contains(" TCP_REFRESH_UNMODIFIED/200 "));
    let parent = AccessRecord {
        route: Hop::Parent("proxy.corp.example:3128".into()),
        resolved: None,
        ..record()
    };
    assert!(
        line(Format::Squid, &parent).contains(" - FIRSTUP_PARENT/proxy.corp.example text/html")
    );
    let parent_dialled = AccessRecord {
        route: Hop::Parent("[2001:db8::1]:3128".into()),
        resolved: Some("[2001:db8::1]:3128".parse().expect("addr")),
        ..record()
    };
    assert!(
        line(Format::Squid, &parent_dialled).contains(" - FIRSTUP_PARENT/2001:db8::1 text/html")
    );
    let dns_failure = AccessRecord {
        resolved: None,
        status: 502,
        error: Some(ErrorKind::DnsFailure),
        content_type: None,
        ..record()
    };
    assert!(
        line(Format::Squid, &dns_failure)
            .contains(" TCP_MISS/502 1234 GET http://example.com/ - HIER_NONE/- -\n")
    );
    let no_status = AccessRecord {
        status: 0,
        ..bare_record()
    };
    assert!(line(Format::Squid, &no_status).contains(" NONE_NONE/000 "));
}

#[test]
fn squid_hostile_values_stay_in_their_field() {
    let rec = hostile_record();
    let text = line(Format::Squid, &rec);
    let fields: Vec<&str> = text
        .trim_end()
        .split(' ')
        .filter(|f| !f.is_empty())
        .collect();
    assert_eq!(fields.len(), 10, "{text}");
    assert_eq!(fields[2], "10.1.2.3");
    assert_eq!(fields[5], "PROPFIND");
    assert_eq!(
        fields[6],
        "http://evil.example/a%20b%22c%0D%0A1700000000.000%200%206.6.6.6%20TCP_HIT/200%200%20GET%20http://x/%20-%20HIER_NONE/-%20-%5C%7F%C3%A9"
    );
    assert_eq!(fields[9], "text/%22x%22%FF%FE");
}

#[test]
fn squid_time_is_the_end_and_elapsed_is_padded() {
    let rec = AccessRecord {
        time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_000),
        duration: Duration::from_millis(3_723_004),
        ..record()
    };
    assert!(line(Format::Squid, &rec).starts_with("1700003723.004 3723004 127.0.0.1 "));
    let early = AccessRecord {
        time: UNIX_EPOCH - Duration::from_secs(5),
        duration: Duration::ZERO,
        ..record()
    };
    assert!(line(Format::Squid, &early).starts_with("        0.000      0 "));
}

#[test]
fn combined_matches_apache() {
    let rec = record();
    assert_eq!(
        line(Format::Combined, &rec),
        "127.0.0.1 - - [14/Nov/2023:22:13:19 +0000] \"GET http://example.com/ HTTP/1.1\" 200 1234 \"-\" \"curl/8.5.0\"\n"
    );
    let bare = bare_record();
    assert_eq!(
        line(Format::Combined, &bare),
        "127.0.0.1 - - [14/Nov/2023:22:13:19 +0000] \"GET http://example.com/ HTTP/1.1\" 400 - \"-\" \"-\"\n"
    );
    let tunnel = AccessRecord {
        method: http::Method::CONNECT,
        target: "example.com:443".to_owned(),
        http_version: http::Version::HTTP_10,
        ..record()
    };
    assert!(
        line(Format::Combined, &tunnel).contains("\"CONNECT example.com:443 HTTP/1.0\" 200 1234")
    );
}

#[test]
fn combined_escapes_hostile_values() {
    let rec = hostile_record();
    let text = line(Format::Combined, &rec);
    assert!(text.starts_with("10.1.2.3 - - ["), "{text}");
    assert!(
        text.contains("\"PROPFIND http://evil.example/a%20b%22c%0D%0A1700000000.000%200%206.6.6.6")
    );
    assert!(text.ends_with(
            " \"\\\"] \\\"GET /x HTTP/1.1\\\" 200\" \"Mozilla \\\"quoted\\\" \\\\ \\xc3( \\x09 end\\\\\"\n"
        ), "{text}");
    // exactly 6 unescaped quotes: request, referer, user agent
    let bytes = text.as_bytes();
    let unescaped = (0..bytes.len())
        .filter(|&i| {
            bytes[i] == b'"'
                && (i == 0 || bytes[i - 1] != b'\\' || (i >= 2 && bytes[i - 2] == b'\\'))
        })
        .count();
    assert_eq!(unescaped, 6, "{text}");
}

#[test]
fn civil_time_matches_humantime() {
    let mut secs: u64 = 0;
    while secs < MAX_UNIX_SECS {
        let mut out = Vec::new();
        put_rfc3339_millis(&mut out, secs, 7);
        let expected =
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(secs * 1000 + 7))
                .to_string();
        assert_eq!(String::from_utf8(out).expect("utf8"), expected);
        secs = secs * 3 + 86_399;
    }
    for secs in [951_782_400, 951_868_799, 1_709_164_800, 4_107_542_400] {
        let mut out = Vec::new();
        put_rfc3339_millis(&mut out, secs, 0);
        let expected =
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_secs(secs)).to_string();
        assert_eq!(String::from_utf8(out).expect("utf8"), expected);
    }
    let far = AccessRecord {
        time: UNIX_EPOCH + Duration::from_secs(u64::MAX / 4),
        ..record()
    };
    assert_eq!(json(&far)[fields::TIME], "9999-12-31T23:59:59.999Z");
}

#[test]
fn config_defaults_and_validation() {
    let cfg: AccessLogConfig = serde_json::from_str("{}").expect("defaults");
    assert_eq!(cfg, AccessLogConfig::default());
    assert_eq!(cfg.format, Format::Json);
    assert_eq!(cfg.path, "-");
    assert_eq!(cfg.buffer, DEFAULT_BUFFER);
    let cfg: AccessLogConfig =
        serde_json::from_str(r#"{"format":"squid","path":"/var/log/x","buffer":8}"#)
            .expect("parses");
    assert_eq!(cfg.format, Format::Squid);
    assert!(serde_json::from_str::<AccessLogConfig>(r#"{"fromat":"json"}"#).is_err());
    assert!(serde_json::from_str::<AccessLogConfig>(r#"{"format":"xml"}"#).is_err());
    let round = serde_json::to_string(&cfg).expect("serializes");
    assert_eq!(
        round,
        r#"{"format":"squid","path":"/var/log/x","buffer":8}"#
    );
    let zero = AccessLogConfig {
        buffer: 0,
        ..AccessLogConfig::default()
    };
    let err = zero.validate().expect_err("0 is invalid").to_string();
    assert!(err.contains("access_log.buffer = 0"), "{err}");
    assert!(AccessLog::start(&zero, Arc::new(Metrics::new())).is_err());
    let empty = AccessLogConfig {
        path: String::new(),
        ..AccessLogConfig::default()
    };
    assert!(empty.validate().is_err());
    let missing_dir = AccessLogConfig {
        path: "/nonexistent-dir/kalmar/access.log".to_owned(),
        ..AccessLogConfig::default()
    };
    assert!(AccessLog::start(&missing_dir, Arc::new(Metrics::new())).is_err());
}

// --- the writer

fn file_config(dir: &tempfile::TempDir, buffer: usize) -> (AccessLogConfig, PathBuf) {
    let path = dir.path().join("access.log");
    let cfg = AccessLogConfig {
        format: Format::Json,
        path: path.to_string_lossy().into_owned(),
        buffer,
    };
    (cfg, path)
}

async fn finish(task: AccessLogTask) {
    tokio::task::spawn_blocking(move || task.finish())
        .await
        .expect("join");
}

fn numbered(i: usize) -> AccessRecord {
    AccessRecord {
        request_id: format!("req-{i}"),
        ..record()
    }
}

fn ids(path: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).expect("read log");
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("each line is JSON");
            v[fields::REQUEST_ID].as_str().expect("id").to_owned()
        })
        .collect()
}

#[tokio::test]
async fn writes_every_line_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, path) = file_config(&dir, 16);
    let metrics = Arc::new(Metrics::new());
    let (log, task) = AccessLog::start(&cfg, metrics.clone()).expect("start");
    for i in 0..1000 {
        log.send(numbered(i)).await;
    }
    finish(task).await;
    let got = ids(&path);
    let want: Vec<String> = (0..1000).map(|i| format!("req-{i}")).collect();
    assert_eq!(got, want);
    assert!(
        metrics
            .encode()
            .contains("kalmar_access_log_lines_total 1000")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_pressure_waits_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, path) = file_config(&dir, 2);
    let metrics = Arc::new(Metrics::new());
    let (log, task) = AccessLog::start(&cfg, metrics.clone()).expect("start");
    // Stall the writer: hold both slots of the queue, unsent.
    let a = log.reserve().await;
    let b = log.reserve().await;
    let waiting = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..5 {
        let log = log.clone();
        let waiting = waiting.clone();
        tasks.push(tokio::spawn(async move {
            waiting.fetch_add(1, Ordering::SeqCst);
            let slot = log.reserve().await;
            slot.send(numbered(100 + i));
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(waiting.load(Ordering::SeqCst), 5);
    assert!(
        tasks.iter().all(|t| !t.is_finished()),
        "reserve() must wait while the queue is full"
    );
    assert!(metrics.encode().contains("kalmar_access_log_waits_total 5"));
    a.send(numbered(0));
    b.send(numbered(1));
    for t in tasks {
        t.await.expect("task");
    }
    finish(task).await;
    let mut got = ids(&path);
    got.sort();
    let mut want: Vec<String> = [0, 1, 100, 101, 102, 103, 104]
        .iter()
        .map(|i| format!("req-{i}"))
        .collect();
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test]
async fn finish_waits_for_reserved_slots_and_late_slots_go_to_stderr() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, path) = file_config(&dir, 4);
    let (log, task) = AccessLog::start(&cfg, Arc::new(Metrics::new())).expect("start");
    let slot = log.reserve().await;
    log.send(numbered(0)).await;
    let finishing = tokio::task::spawn_blocking(move || task.finish());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !finishing.is_finished(),
        "finish waits for the reserved slot"
    );
    slot.send(numbered(1));
    finishing.await.expect("join");
    assert_eq!(ids(&path), ["req-0", "req-1"]);
    // After shutdown a slot still never fails (the line goes to stderr).
    let late = log.reserve().await;
    assert!(late.permit.is_none());
    late.send(numbered(2));
}

#[tokio::test]
async fn reopen_after_rename_splits_lines_without_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, path) = file_config(&dir, 8);
    let rotated = dir.path().join("access.log.1");
    let (log, task) = AccessLog::start(&cfg, Arc::new(Metrics::new())).expect("start");
    for i in 0..30 {
        log.send(numbered(i)).await;
    }
    log.flush().await;
    std::fs::rename(&path, &rotated).expect("rename");
    log.reopen();
    for i in 30..50 {
        log.send(numbered(i)).await;
    }
    finish(task).await;
    let old = ids(&rotated);
    let new = ids(&path);
    assert_eq!(old, (0..30).map(|i| format!("req-{i}")).collect::<Vec<_>>());
    assert_eq!(
        new,
        (30..50).map(|i| format!("req-{i}")).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reopen_under_concurrent_writers_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, path) = file_config(&dir, 64);
    let (log, task) = AccessLog::start(&cfg, Arc::new(Metrics::new())).expect("start");
    const WRITERS: usize = 8;
    const PER_WRITER: usize = 2000;
    const TOTAL: usize = WRITERS * PER_WRITER;
    const ROTATIONS: usize = 5;
    let sent = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let log = log.clone();
        let sent = sent.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..PER_WRITER {
                let slot = log.reserve().await;
                slot.send(numbered(w * PER_WRITER + i));
                sent.fetch_add(1, Ordering::Relaxed);
                if i % 16 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    // Rotate while the writers are mid-stream: after each sixth of the lines.
    let mut rotated = Vec::new();
    for r in 0..ROTATIONS {
        while sent.load(Ordering::Relaxed) < (r + 1) * TOTAL / (ROTATIONS + 1) {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let to = dir.path().join(format!("access.log.{r}"));
        std::fs::rename(&path, &to).expect("rename");
        log.reopen();
        rotated.push(to);
    }
    for w in writers {
        w.await.expect("writer");
    }
    finish(task).await;
    let mut all = Vec::new();
    let mut non_empty = 0;
    for f in rotated.iter().chain(std::iter::once(&path)) {
        let lines = ids(f);
        non_empty += usize::from(!lines.is_empty());
        all.extend(lines);
    }
    assert!(
        non_empty >= 3,
        "rotations happened under load ({non_empty} files used)"
    );
    assert_eq!(all.len(), TOTAL, "no line lost or duplicated");
    all.sort();
    all.dedup();
    assert_eq!(all.len(), TOTAL);
}

#[tokio::test]
async fn reopen_failure_keeps_the_old_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    let path = sub.join("access.log");
    let cfg = AccessLogConfig {
        format: Format::Squid,
        path: path.to_string_lossy().into_owned(),
        buffer: 8,
    };
    let metrics = Arc::new(Metrics::new());
    let (log, task) = AccessLog::start(&cfg, metrics.clone()).expect("start");
    log.send(numbered(0)).await;
    log.flush().await;
    let moved = dir.path().join("moved");
    std::fs::rename(&sub, &moved).expect("move the directory away");
    log.reopen();
    log.send(numbered(1)).await;
    finish(task).await;
    let text = std::fs::read_to_string(moved.join("access.log")).expect("read");
    assert_eq!(text.lines().count(), 2);
    assert!(
        metrics
            .encode()
            .contains("kalmar_access_log_write_errors_total 1")
    );
}
