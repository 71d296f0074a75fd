//! The destination guard with its DEFAULT deny list: a canary origin on loopback must never
//! be reached, whatever spelling, name, DNS answer or protocol the client tries.

mod support;

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use support::dns::DnsServer;
use support::origin::Origin;
use support::{GUARDED_CONFIG, Kalmar, raw_exchange};

async fn guarded(extra: &str) -> (Origin, DnsServer, Kalmar) {
    let canary = Origin::start().await;
    let loopback: [IpAddr; 1] = ["127.0.0.1".parse().unwrap()];
    let dns = DnsServer::start(&[
        ("canary.test", &loopback),
        ("mapped.test", &["::ffff:127.0.0.1".parse().unwrap()]),
        ("metadata.test", &["169.254.169.254".parse().unwrap()]),
        (
            "private.test",
            &["10.0.0.1".parse().unwrap(), "192.168.1.1".parse().unwrap()],
        ),
    ])
    .await;
    let config = format!(
        "[dns]\nnameservers = [{:?}]\nhosts = {{ \"static-canary.test\" = [\"127.0.0.1\"] }}\n\
         [destinations]\nconnect_ports = [\"1-65535\"]\n{extra}",
        dns.nameserver()
    );
    let kalmar = Kalmar::start_with(GUARDED_CONFIG, &config);
    (canary, dns, kalmar)
}

fn tricks(port: u16) -> Vec<String> {
    [
        "127.0.0.1",
        "2130706433",
        "0x7f000001",
        "0x7F.0.0.1",
        "0177.0.0.1",
        "0177.0000.0000.0001",
        "127.1",
        "127.0.1",
        "127.000.000.001",
        "127.0.0.1.",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[::127.0.0.1]",
        "[64:ff9b::7f00:1]",
        "[::1]",
        "[0:0:0:0:0:0:0:1]",
        "0.0.0.0",
        "0",
        "localhost",
        "LOCALHOST.",
        "canary.test",
        "CANARY.TEST.",
        "static-canary.test",
        "mapped.test",
        "user:pw@127.0.0.1",
        "evil.example@127.0.0.1",
        "%31%32%37.0.0.1",
        "127.0.0.1%2e",
    ]
    .iter()
    .map(|h| format!("{h}:{port}"))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_never_reaches_the_canary() {
    let (canary, _dns, kalmar) = guarded("").await;
    for authority in tricks(canary.addr.port()) {
        let request = format!(
            "GET http://{authority}/hello HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
        );
        let answer = raw_exchange(kalmar.addr, request.as_bytes()).await;
        let status = &answer[9..12.min(answer.len())];
        assert!(
            status == "403" || status == "400" || status == "502",
            "{authority}: {answer}"
        );
        assert!(!answer.contains("hello"), "{authority}: {answer}");
    }
    assert_eq!(canary.connections(), 0, "the canary was reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_never_reaches_the_canary() {
    let (canary, _dns, kalmar) = guarded("").await;
    for authority in tricks(canary.addr.port()) {
        let answer = support::connect_head(kalmar.addr, &authority).await;
        assert!(!answer.starts_with("HTTP/1.1 200"), "{authority}: {answer}");
    }
    assert_eq!(canary.connections(), 0, "the canary was reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_names_are_403_naming_address_and_range() {
    let (canary, _dns, kalmar) = guarded("").await;
    let client = kalmar.client();
    let r = client
        .get(format!("http://canary.test:{}/", canary.addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["x-kalmar-error"], "internal-destination");
    let body = r.text().await.unwrap();
    assert!(
        body.contains("127.0.0.1") && body.contains("127.0.0.0/8"),
        "{body}"
    );
    assert!(body.contains("NO_PROXY"), "{body}");

    let r = client
        .get("http://metadata.test/latest/meta-data/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("169.254.0.0/16"));

    let r = client.get("http://private.test/").send().await.unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_allow_opens_exactly_what_it_names() {
    let canary = Origin::start().await;
    let config = "[destinations]\nallowed_cidrs = [\"127.0.0.1/32\"]\n[dns]\nhosts = { \"canary.test\" = [\"127.0.0.1\"], \"neighbour.test\" = [\"127.0.0.2\"] }\n";
    let kalmar = Kalmar::start_with(GUARDED_CONFIG, config);
    let client = kalmar.client();
    let r = client
        .get(format!("http://canary.test:{}/hello", canary.addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .get(format!(
            "http://neighbour.test:{}/hello",
            canary.addr.port()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        403,
        "127.0.0.2 is right next to the opened /32 and stays closed"
    );
}

/// The answer for `rebind.test` alternates between an allowed address (127.0.0.2, opened
/// explicitly, with a real origin) and the canary (127.0.0.1), with TTL 0. Kalmar must only
/// ever dial the address it checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_rebinding_never_reaches_the_canary() {
    // Same port on two loopback addresses: the allowed origin and the canary.
    let (allowed, canary) = loop {
        let allowed = Origin::start_on("127.0.0.2:0").await;
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", allowed.addr.port())) {
            drop(listener);
            let canary = Origin::start_on(&format!("127.0.0.1:{}", allowed.addr.port())).await;
            break (allowed, canary);
        }
    };
    let dns = DnsServer::start(&[("rebind.test", &["127.0.0.2".parse().unwrap()])]).await;
    let flipper = {
        let records = dns.records.clone();
        tokio::spawn(async move {
            let mut flip = false;
            loop {
                let ip: IpAddr = if flip { "127.0.0.1" } else { "127.0.0.2" }
                    .parse()
                    .unwrap();
                records.lock().insert("rebind.test".into(), vec![ip]);
                flip = !flip;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    let config = format!(
        "[dns]\nnameservers = [{:?}]\n[destinations]\nallowed_cidrs = [\"127.0.0.2/32\"]\nconnect_ports = [\"1-65535\"]\n",
        dns.nameserver()
    );
    let kalmar = Kalmar::start_with(GUARDED_CONFIG, &config);
    let client = kalmar.client();
    let (mut ok, mut denied) = (0, 0);
    for _ in 0..60 {
        let r = client
            .get(format!("http://rebind.test:{}/hello", allowed.addr.port()))
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            200 => ok += 1,
            403 => denied += 1,
            other => panic!("unexpected status {other}"),
        }
        let answer =
            support::connect_head(kalmar.addr, &format!("rebind.test:{}", allowed.addr.port()))
                .await;
        assert!(
            answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.1 403"),
            "{answer}"
        );
    }
    flipper.abort();
    assert!(
        dns.queries.load(Ordering::SeqCst) > 10,
        "TTL 0: Kalmar asked again and again"
    );
    assert!(
        ok > 0,
        "the allowed answer was served ({ok} ok, {denied} denied)"
    );
    assert_eq!(
        canary.connections(),
        0,
        "the canary was reached ({ok} ok, {denied} denied)"
    );
}

/// The line logged is the answer given: a name whose addresses are all internal is denied
/// after the rule allowed it, and the log says `deny` / `internal-destination` (not the
/// rule's `allow`). Every denied address is named, both of `dual.test`'s here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_after_the_rule_is_logged_as_the_deny_it_was() {
    let canary = Origin::start().await;
    let config = "[dns]\nhosts = { \"dual.test\" = [\"127.0.0.1\", \"::1\"] }\n[destinations]\nconnect_ports = [\"1-65535\"]\n";
    let kalmar = Kalmar::start_with(GUARDED_CONFIG, config);
    let port = canary.addr.port();
    let r = kalmar
        .client()
        .get(format!("http://dual.test:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["x-kalmar-error"], "internal-destination");
    let body = r.text().await.unwrap();
    for named in ["127.0.0.1", "127.0.0.0/8", "::1", "::1/128"] {
        assert!(body.contains(named), "{named} missing from: {body}");
    }
    let answer = support::connect_head(kalmar.addr, &format!("dual.test:{port}")).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");

    let lines = kalmar.log_lines(2);
    for line in &lines[..2] {
        assert_eq!(line["status"], 403, "{line}");
        assert_eq!(line["verdict"], "deny", "{line}");
        assert_eq!(line["reason"], "internal-destination", "{line}");
        assert_eq!(line["error"], "internal-destination", "{line}");
    }
    assert_eq!(canary.connections(), 0, "the canary was reached");
}
