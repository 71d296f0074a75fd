//! The `squid` and `combined` access-log formats, checked by a real consumer: goaccess parses
//! generated lines (normal and hostile) with zero failed lines, as it parses Squid's and Apache's.
//!
//! Needs the `goaccess` binary (Debian package `goaccess`, installed by `.ci/run`). Without it
//! the test is skipped with a message, unless `CI=true`, in which case it fails.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use kalmar::access_log::{AccessRecord, Format, Hop};
use kalmar::acl::{Reason, Verdict};
use kalmar::cache::Outcome;
use kalmar::error::ErrorKind;

/// goaccess's own native-Squid format (its predefined `SQUID` expects a syslog prefix).
const SQUID_LOG_FORMAT: &str = "%x.%^ %~%L %h %^/%s %b %m %U";

fn base(i: u64) -> AccessRecord {
    let mut labels = BTreeMap::new();
    labels.insert("namespace".to_owned(), format!("ns-{}", i % 7));
    AccessRecord {
        time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + i * 1_337),
        duration: Duration::from_micros(i * 7_919 % 3_000_000),
        request_id: format!("req-{i}"),
        client: "10.1.2.3:40000".parse().expect("addr"),
        method: http::Method::GET,
        target: format!("http://example.com/item/{i}?q={i}"),
        status: 200,
        bytes_from_client: 100 + i,
        bytes_to_client: 1000 + i,
        resolved: Some("93.184.216.34:80".parse().expect("addr")),
        error: None,
        source_name: Some("project-x".into()),
        labels: Some(Arc::new(labels)),
        // Every other line names a client pod in the user field (squid `%[un`, combined `%u`).
        pod: (i % 2 == 1).then(|| {
            Arc::new(kalmar::acl::PodIdentity::new(
                Arc::from(format!("ns-{}", i % 7).as_str()),
                &format!("worker-{i}"),
                Arc::new(BTreeMap::new()),
                Arc::new(BTreeMap::new()),
                Arc::from("default"),
                Some(Arc::from("node-a")),
            ))
        }),
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

fn header(bytes: &[u8]) -> Option<http::HeaderValue> {
    Some(http::HeaderValue::from_bytes(bytes).expect("valid header value"))
}

/// A spread of realistic and hostile records (standard methods and real status codes only:
/// goaccess rejects extension methods and status 000 in Squid's own lines too).
fn records() -> Vec<AccessRecord> {
    let methods = [
        http::Method::GET,
        http::Method::HEAD,
        http::Method::POST,
        http::Method::PUT,
        http::Method::DELETE,
        http::Method::PATCH,
        http::Method::OPTIONS,
    ];
    let clients: [SocketAddr; 4] = [
        "127.0.0.1:5000".parse().expect("addr"),
        "[::1]:5000".parse().expect("addr"),
        "[::ffff:192.0.2.7]:5000".parse().expect("addr"),
        "[2001:db8::42]:5000".parse().expect("addr"),
    ];
    let mut out = Vec::new();
    for i in 0..200u64 {
        let idx = usize::try_from(i).expect("small");
        let mut rec = base(i);
        rec.method = methods[idx % methods.len()].clone();
        rec.client = clients[idx % clients.len()];
        rec.status = [200, 201, 204, 301, 304, 404, 500, 502][idx % 8];
        match i % 10 {
            0 => {
                rec.method = http::Method::CONNECT;
                rec.target = format!("api-{i}.example.com:443");
                rec.content_type = None;
                rec.cache = None;
            }
            1 => {
                rec.verdict = Some(Verdict::Deny);
                rec.reason = Some(Reason::Rule);
                rec.status = 403;
                rec.resolved = None;
                rec.error = Some(ErrorKind::Denied);
            }
            2 => {
                rec.cache = Some(Outcome::Hit);
                rec.resolved = None;
            }
            3 => {
                rec.route = Hop::Parent("proxy.corp.example:3128".into());
                rec.resolved = Some("192.0.2.10:3128".parse().expect("addr"));
            }
            4 => {
                rec.verdict = None;
                rec.status = 400;
                rec.resolved = None;
                rec.error = Some(ErrorKind::MalformedRequest);
                rec.bytes_to_client = 0;
                rec.content_type = None;
            }
            5 => {
                rec.target = format!(
                    "http://evil.example/{i} a\"b\r\n1700000000.000 0 6.6.6.6 TCP_HIT/200 0 GET http://x/ - HIER_NONE/- -\\\u{1}é"
                );
                rec.user_agent = header(b"Mozilla \"quoted\" \\ \xc3\x28 \t end\\");
                rec.referer = header(b"\"] \"GET /x HTTP/1.1\" 200 \"");
                rec.content_type = header(b"text/\"x\"\xff\xfe;q=\"1\"");
            }
            6 => {
                rec.duration = Duration::from_secs(3 * 3600 + 7);
                rec.bytes_to_client = 5 << 30;
                rec.http_version = http::Version::HTTP_10;
            }
            7 => {
                rec.user_agent = None;
                rec.referer = header(b"http://ref.example/");
            }
            _ => {}
        }
        out.push(rec);
    }
    out
}

/// Run goaccess over `lines` and return its JSON report, or `None` when it is not installed.
fn goaccess(lines: &[u8], args: &[&str]) -> Option<serde_json::Value> {
    let spawned = Command::new("goaccess")
        .arg("-")
        .arg("--no-global-config")
        .args(args)
        .args(["-o", "json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            support::tool_missing("goaccess", "apt-get install goaccess");
            return None;
        }
        Err(e) => panic!("running goaccess: {e}"),
    };
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(lines).expect("feed goaccess");
    drop(stdin);
    let output = child.wait_with_output().expect("goaccess finishes");
    assert!(
        output.status.success(),
        "goaccess failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    // goaccess may print a progress line before the report
    let start = stdout.find('{').expect("a JSON report");
    Some(serde_json::from_str(&stdout[start..]).expect("goaccess JSON parses"))
}

fn render(format: Format, records: &[AccessRecord]) -> Vec<u8> {
    let mut out = Vec::new();
    for rec in records {
        format.write_line(rec, &mut out);
    }
    out
}

fn assert_all_parsed(report: &serde_json::Value, records: &[AccessRecord], what: &str) {
    let general = &report["general"];
    assert_eq!(general["failed_requests"], 0, "{what}: {general}");
    assert_eq!(
        general["valid_requests"].as_u64(),
        Some(records.len() as u64),
        "{what}: {general}"
    );
    // the size column was read from the right place on every line
    let bytes: u64 = records.iter().map(|r| r.bytes_to_client).sum();
    assert_eq!(
        general["bandwidth"].as_u64(),
        Some(bytes),
        "{what}: {general}"
    );
}

#[test]
fn goaccess_parses_squid_lines_with_zero_failures() {
    let records = records();
    let lines = render(Format::Squid, &records);
    let Some(report) = goaccess(
        &lines,
        &[
            &format!("--log-format={SQUID_LOG_FORMAT}"),
            "--date-format=%s",
            "--time-format=%s",
        ],
    ) else {
        return;
    };
    assert_all_parsed(&report, &records, "squid");
}

#[test]
fn goaccess_parses_combined_lines_with_zero_failures() {
    let records = records();
    let lines = render(Format::Combined, &records);
    let Some(report) = goaccess(&lines, &["--log-format=COMBINED"]) else {
        return;
    };
    assert_all_parsed(&report, &records, "combined");
}

/// The skip is only for machines without goaccess: under `CI=true` a missing goaccess
/// fails. Checked by running one test of this binary again with nothing on PATH.
#[test]
fn a_missing_goaccess_fails_under_ci_and_skips_elsewhere() {
    let empty = tempfile::tempdir().unwrap();
    let run = |ci: Option<&str>| {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "goaccess_parses_combined_lines_with_zero_failures",
            "--exact",
            "--nocapture",
        ])
        .env("PATH", empty.path());
        match ci {
            Some(value) => cmd.env("CI", value),
            None => cmd.env_remove("CI"),
        };
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, text) = run(Some("true"));
    assert!(!ok, "CI=true must fail without goaccess: {text}");
    assert!(
        text.contains("goaccess is not installed, and this is CI"),
        "{text}"
    );
    for ci in [None, Some("false"), Some("")] {
        let (ok, text) = run(ci);
        assert!(
            ok && text.contains("SKIPPED: goaccess"),
            "CI={ci:?}: {text}"
        );
    }
}
