//! Kalmar: an egress forward proxy for Kubernetes — HTTP/1.1 forwarding and CONNECT
//! tunnels behind a label-based ACL and an SSRF guard, with an access log and metrics.
//!
//! [`start`] takes bound listeners and a loaded configuration and returns a
//! [`ServerHandle`]; the binary adds only the CLI and signal handling.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod acl;
pub mod admin;
pub mod cache;
pub mod config;
pub mod connect;
pub mod error;
pub mod kubernetes;
pub mod limit;
pub mod metrics;
pub mod net;
pub mod proxy;
pub mod relay;
pub mod server;
pub mod state;
pub mod tls;
pub mod tracker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use access_log::{AccessLog, AccessLogTask};
use config::{Config, ConfigError};
use metrics::Metrics;
use proxy::Proxy;
use state::{ConfigSource, SharedState, Snapshot};
use tracker::Tracker;

/// The two sockets Kalmar serves, bound by the caller (tests bind `127.0.0.1:0`).
pub struct Listeners {
    pub proxy: std::net::TcpListener,
    pub admin: std::net::TcpListener,
}

/// A running proxy.
pub struct ServerHandle {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    proxy: Arc<Proxy>,
    workers: Vec<JoinHandle<()>>,
    control: Option<JoinHandle<()>>,
    log_task: Option<AccessLogTask>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Cache(#[from] cache::disk::DiskError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

/// Bind the listeners named in the configuration.
pub fn bind(config: &Config) -> Result<Listeners, StartError> {
    let bind = |addr: SocketAddr, what: &'static str| {
        std::net::TcpListener::bind(addr).map_err(|source| StartError::Io { what, source })
    };
    Ok(Listeners {
        proxy: bind(config.server.listen, "binding server.listen")?,
        admin: bind(config.server.admin_listen, "binding server.admin_listen")?,
    })
}

/// Start the workers, the admin listener and the reload watcher.
pub fn start(
    config: Config,
    source: ConfigSource,
    listeners: Listeners,
) -> Result<ServerHandle, StartError> {
    let io_err = |what| move |source| StartError::Io { what, source };
    let proxy_addr = listeners
        .proxy
        .local_addr()
        .map_err(io_err("proxy listener"))?;
    let admin_addr = listeners
        .admin
        .local_addr()
        .map_err(io_err("admin listener"))?;
    listeners
        .proxy
        .set_nonblocking(true)
        .map_err(io_err("proxy listener"))?;
    listeners
        .admin
        .set_nonblocking(true)
        .map_err(io_err("admin listener"))?;

    let workers = match config.server.workers {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    };
    let metrics = Arc::new(Metrics::new());
    let (log, log_task) = AccessLog::start(&config.access_log, metrics.clone())
        .map_err(io_err("opening access_log.path"))?;
    let pool = connect::pool::Pool::new(
        config.proxy.max_idle_per_origin,
        config.timeouts.upstream_idle,
    );
    // The resolver spawns its background tasks on first use, so build the snapshot
    // inside the control runtime.
    let control_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("control runtime"))?;
    let (snapshot, kubernetes) = {
        let _context = control_rt.enter();
        let kubernetes = Arc::new(kubernetes::Kubernetes::new(
            control_rt.handle().clone(),
            &metrics,
        ));
        (Snapshot::build(config)?, kubernetes)
    };
    // The cache outlives reloads: it is built once, from the configuration at start.
    let cache = if snapshot.config.cache.enabled {
        Some(cache::Cache::new(&snapshot.config.cache)?)
    } else {
        None
    };
    let state = SharedState::new(snapshot, source, kubernetes)?;
    let tracker = Tracker::new();
    let proxy = Arc::new(Proxy {
        state,
        metrics,
        log,
        pool,
        tracker: tracker.clone(),
        cache,
    });

    let mut handles = Vec::with_capacity(workers);
    for i in 0..workers {
        let listener = listeners
            .proxy
            .try_clone()
            .map_err(io_err("cloning the proxy listener"))?;
        let proxy = proxy.clone();
        let handle = std::thread::Builder::new()
            .name(format!("kalmar-worker-{i}"))
            .spawn(move || run_worker(proxy, listener))
            .map_err(io_err("spawning a worker thread"))?;
        handles.push(handle);
    }

    let control = {
        let proxy = proxy.clone();
        let admin_listener = listeners.admin;
        std::thread::Builder::new()
            .name("kalmar-control".into())
            .spawn(move || control_rt.block_on(run_control(proxy, admin_listener)))
            .map_err(io_err("spawning the control thread"))?
    };
    tracker.ready.store(true, Ordering::Release);
    tracing::info!(listen = %proxy_addr, admin = %admin_addr, workers, "kalmar is serving");
    Ok(ServerHandle {
        proxy_addr,
        admin_addr,
        proxy,
        workers: handles,
        control: Some(control),
        log_task: Some(log_task),
    })
}

fn run_worker(proxy: Arc<Proxy>, listener: std::net::TcpListener) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start a worker runtime");
            return;
        }
    };
    runtime.block_on(async move {
        match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => server::accept_loop(proxy.clone(), listener).await,
            Err(e) => tracing::error!(error = %e, "cannot register the listener"),
        }
        // Keep driving this thread's connections and tunnels until they are done or the
        // grace period is over.
        tokio::select! {
            _ = proxy.tracker.idle() => {}
            _ = proxy.tracker.hard_stop() => {
                // Let tunnels that were just told to stop write their log lines.
                let _ = tokio::time::timeout(Duration::from_secs(1), proxy.tracker.idle()).await;
            }
        }
    });
}

/// Admin listener, config-file watcher and periodic housekeeping.
async fn run_control(proxy: Arc<Proxy>, admin_listener: std::net::TcpListener) {
    let admin = match tokio::net::TcpListener::from_std(admin_listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the admin listener");
            return;
        }
    };
    let state = admin::AdminState {
        metrics: proxy.metrics.clone(),
        ready: proxy.tracker.ready.clone(),
        gate: Some({
            let kubernetes = proxy.state.kubernetes.clone();
            Arc::new(move || (!kubernetes.is_synced()).then_some("kubernetes index not synced yet"))
        }),
        reload: {
            let proxy = proxy.clone();
            Arc::new(move || {
                let proxy = proxy.clone();
                Box::pin(async move { reload(&proxy) })
            })
        },
    };
    let tracker = proxy.tracker.clone();
    let routes = admin::cache::routes(proxy.cache.clone());
    let admin_task = tokio::spawn(admin::serve_with_routes(
        admin,
        state,
        Some(routes),
        async move { tracker.hard_stop().await },
    ));
    let watcher = watch_files(proxy.clone());
    let housekeeping = async {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            proxy.pool.evict_expired();
            proxy.state.load().limits.housekeeping();
        }
    };
    tokio::select! {
        _ = watcher => {}
        _ = housekeeping => {}
        _ = proxy.tracker.hard_stop() => {}
    }
    let _ = admin_task.await;
}

/// Apply a new configuration (SIGHUP, POST /reload, a watched file changed).
/// An invalid one is refused with the key named, and the running one stays.
pub fn reload(proxy: &Proxy) -> Result<String, String> {
    match proxy.state.reload() {
        Ok(_) => {
            proxy.metrics.config_reload(true);
            tracing::info!("configuration reloaded");
            Ok("configuration reloaded".into())
        }
        Err(e) => {
            proxy.metrics.config_reload(false);
            tracing::error!(error = %e, "reload refused; the previous configuration stays in force");
            Err(format!(
                "reload refused, previous configuration stays in force: {e}"
            ))
        }
    }
}

/// Poll the config file and the sources files; reload when one changes. Polling (not
/// inotify) because Kubernetes swaps ConfigMap volumes by renaming a symlink.
async fn watch_files(proxy: Arc<Proxy>) {
    let stamp = |files: &[PathBuf]| -> Vec<Option<(SystemTime, u64)>> {
        files
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
            })
            .collect()
    };
    let mut files = proxy.state.load().watched_files(&proxy.state.source);
    let mut seen = stamp(&files);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = stamp(&files);
        if now != seen {
            let _ = reload(&proxy);
            files = proxy.state.load().watched_files(&proxy.state.source);
            seen = stamp(&files);
        }
    }
}

// === impl ServerHandle ===

impl ServerHandle {
    pub fn reload(&self) -> Result<String, String> {
        reload(&self.proxy)
    }

    pub fn reopen_logs(&self) {
        self.proxy.log.reopen();
    }

    pub fn is_ready(&self) -> bool {
        self.proxy.tracker.ready.load(Ordering::Acquire) && self.proxy.state.kubernetes.is_synced()
    }

    /// The live pod index (tests, tools).
    pub fn kubernetes(&self) -> &Arc<kubernetes::Kubernetes> {
        &self.proxy.state.kubernetes
    }

    pub fn metrics(&self) -> &Metrics {
        &self.proxy.metrics
    }

    /// The response cache, when enabled at start.
    pub fn cache(&self) -> Option<&Arc<cache::Cache>> {
        self.proxy.cache.as_ref()
    }

    /// Begin graceful shutdown without waiting (readiness turns false at once).
    pub fn begin_shutdown(&self) {
        self.proxy.tracker.begin_shutdown();
    }

    /// Stop accepting, let requests and tunnels finish within `server.shutdown_grace`,
    /// end whatever is left, flush the access log.
    pub fn shutdown(mut self) {
        let grace = self.proxy.state.load().config.server.shutdown_grace;
        let tracker = self.proxy.tracker.clone();
        tracker.begin_shutdown();
        let deadline = Instant::now() + grace;
        while tracker.in_flight() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if tracker.in_flight() > 0 {
            tracing::warn!(
                left = tracker.in_flight(),
                "grace period over; closing what is left"
            );
        }
        tracker.stop_now();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
        if let Some(control) = self.control.take() {
            let _ = control.join();
        }
        if let Some(cache) = &self.proxy.cache {
            cache.flush();
        }
        if let Some(task) = self.log_task.take() {
            task.finish();
        }
    }
}

/// `kalmar explain`: how the policy decides for `from` asking for `target`, without
/// sending any traffic (names are resolved, since the destination guard checks addresses).
/// With `sni` (a CONNECT only), also what the tunnel's ClientHello check would decide for a
/// hello naming it (`""`: a hello without a server name).
pub async fn explain(
    config: Config,
    from: std::net::IpAddr,
    target: &str,
    method: &str,
    sni: Option<&str>,
) -> Result<String, String> {
    let snapshot = Snapshot::build(config).map_err(|e| e.to_string())?;
    // A client given https://host/ through a proxy sends `CONNECT host:443`; the path
    // travels inside the tunnel, where the proxy never sees it.
    let connect;
    let target = match https_authority(target)? {
        Some(authority) => {
            connect = authority;
            connect.as_str()
        }
        None => target,
    };
    let (method, uri): (http::Method, http::Uri) = if target.contains("://") {
        (
            method
                .parse()
                .map_err(|_| format!("invalid method {method:?}"))?,
            target.parse().map_err(|e| format!("{target:?}: {e}"))?,
        )
    } else {
        (
            http::Method::CONNECT,
            target.parse().map_err(|e| format!("{target:?}: {e}"))?,
        )
    };
    let target = proxy::target::Target::from_request(&method, &uri).map_err(|e| e.to_string())?;
    let resolved = snapshot
        .resolver
        .resolve(&target.host)
        .await
        .unwrap_or_default();
    let destination = acl::Destination {
        host: &target.host,
        port: target.port,
        method: &method,
        protocol: target.protocol,
    };
    // With `[kubernetes]` on, ask the API who owns the address, as the proxy's index would know.
    let (identity, note) = if snapshot.config.kubernetes.enabled {
        match kubernetes::resolve_once(&snapshot.config.kubernetes, from).await {
            Ok(live) => (snapshot.policy.identify_with(from, live.as_ref()), None),
            Err(e) => (
                snapshot.policy.identify(from),
                Some(format!(
                    "note         kubernetes lookup failed ({e}); static sources only\n"
                )),
            ),
        }
    } else {
        (snapshot.policy.identify(from), None)
    };
    let mut text = note.unwrap_or_default()
        + &snapshot
            .policy
            .explain_identity(from, &identity, &destination, &resolved);
    if let Some(sni) = sni {
        if target.protocol != acl::Protocol::Connect {
            return Err("--sni applies to a CONNECT target (host:port)".into());
        }
        let decision = snapshot.policy.authorize(&identity, &destination);
        let tunnel = tls::policy::Tunnel {
            policy: &snapshot.policy,
            identity: &identity,
            decision: &decision,
            host: &target.host,
            port: target.port,
        };
        text.push_str(&snapshot.tls.explain(&tunnel, sni));
    }
    Ok(text)
}

/// `https://host[:port][/path]` → `host:port` (443 by default), the CONNECT a client
/// sends for it; None for anything else.
fn https_authority(target: &str) -> Result<Option<String>, String> {
    let is_https = target
        .get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"));
    if !is_https {
        return Ok(None);
    }
    let uri: http::Uri = target.parse().map_err(|e| format!("{target:?}: {e}"))?;
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("{target:?}: no host"))?;
    Ok(Some(format!("{host}:{}", uri.port_u16().unwrap_or(443))))
}
