//! `kubernetes_initial_sync_50k_pods`: the built binary watching the loopback test API server
//! (`tests/support/kube_api.rs`) that holds 50,000 pods; reports the time from process start to
//! `/readyz` 200 (first full list of every watch) and the resident memory, against the same
//! process watching an empty cluster. A measurement, not a test: it asserts only that the sync
//! completes (within 120 s) and prints the figures.
//!
//!     cargo bench --bench kubernetes_sync

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::json;
use support::kube_api::{Kind, KubeApi, namespace, pod};

const PODS: usize = 50_000;
const NAMESPACES: usize = 50;

struct Figures {
    sync: Duration,
    rss_kib: u64,
    hwm_kib: u64,
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn ready(admin: std::net::SocketAddr) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(admin) else {
        return false;
    };
    let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}

/// Start kalmar against `api`, wait for readiness, let the index settle, measure, stop.
fn measure(api: &KubeApi) -> Figures {
    let dir = tempfile::tempdir().expect("tempdir");
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
    };
    let (listen, admin) = (free(), free());
    let config = format!(
        "sources = []\n[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\nworkers = 1\n\
         [dns]\nnameservers = [\"127.0.0.1:1\"]\nuse_hosts_file = false\n\
         [access_log]\npath = {:?}\n\
         [kubernetes]\nenabled = true\nkubeconfig = {:?}\npod_cidrs = [\"10.1.0.0/16\"]\n",
        dir.path().join("access.log").display().to_string(),
        api.kubeconfig(dir.path()).display().to_string(),
    );
    let path = dir.path().join("kalmar.toml");
    std::fs::write(&path, config).expect("config");
    let start = Instant::now();
    let mut child = std::process::Command::new(support::kalmar_bin())
        .arg("--config")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn kalmar");
    while !ready(admin) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no sync within 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let sync = start.elapsed();
    // Let the list pages' transient memory go back and the index settle.
    std::thread::sleep(Duration::from_secs(2));
    let figures = Figures {
        sync,
        rss_kib: status_kib(child.id(), "VmRSS"),
        hwm_kib: status_kib(child.id(), "VmHWM"),
    };
    let _ = child.kill();
    let _ = child.wait();
    figures
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let empty = runtime.block_on(KubeApi::start());
    let full = runtime.block_on(KubeApi::start());
    for ns in 0..NAMESPACES {
        full.apply(
            Kind::Namespace,
            namespace(&format!("ns-{ns}"), json!({"team": "t"})),
        );
    }
    for i in 0..PODS {
        let ip = std::net::Ipv4Addr::from(0x0A01_0000u32 + i as u32).to_string();
        let labels = json!({"app": format!("app-{}", i / 25), "pod-template-hash": format!("h{}", i / 25),
                            "network-access-external-ips": "true"});
        full.apply(
            Kind::Pod,
            pod(
                &format!("ns-{}", i % NAMESPACES),
                &format!("pod-{i}"),
                &ip,
                labels,
            ),
        );
    }
    let _guard = runtime.enter();
    let base = measure(&empty);
    let loaded = measure(&full);
    let per_pod = (loaded.rss_kib.saturating_sub(base.rss_kib) * 1024) / PODS as u64;
    println!("kubernetes_initial_sync_50k_pods");
    println!(
        "  empty cluster: ready after {:?}, RSS {} KiB (peak {} KiB)",
        base.sync, base.rss_kib, base.hwm_kib
    );
    println!(
        "  {PODS} pods:    ready after {:?}, RSS {} KiB (peak {} KiB)",
        loaded.sync, loaded.rss_kib, loaded.hwm_kib
    );
    println!(
        "  sync time {:?} over the empty start; {per_pod} bytes RSS per indexed pod",
        loaded.sync.saturating_sub(base.sync)
    );
}
