//! A loopback Kubernetes API server for pods, namespaces and nodes that speaks the real wire
//! protocol, enough for kube-rs and kubectl:
//!
//! - discovery: `/version`, `/api`, `/api/v1`, `/apis`;
//! - `GET` list (`/api/v1/pods`, `/api/v1/namespaces/{ns}/pods`, `/api/v1/namespaces`,
//!   `/api/v1/nodes`) with `metadata.resourceVersion`, `labelSelector`, `fieldSelector`,
//!   `limit` + `continue`; `GET` of one object (404 `Status` when absent);
//! - `watch=1` streams of `ADDED` / `MODIFIED` / `DELETED` / `BOOKMARK` events from a
//!   `resourceVersion` (none or `0`: synthetic `ADDED` for what exists), bookmarks when
//!   `allowWatchBookmarks=true`, `timeoutSeconds`;
//! - a watch from a `resourceVersion` older than the kept history gets an `ERROR` event with a
//!   `410 Gone` `Status` (as kube-apiserver sends it), a list continue token likewise a 410.
//!
//! Tests change objects through [`KubeApi::apply`] and [`KubeApi::delete`], can expire every
//! open watch ([`KubeApi::expire_watches`]) and kill and restart the server on the same port
//! ([`KubeApi::stop`], [`KubeApi::restart`]), which forgets the event history like a restarted
//! API server whose watch cache is empty.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::{Value, json};

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// The three kinds it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Pod,
    Namespace,
    Node,
}

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    kind: Kind,
    kind_of_event: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    /// (kind, namespace or "", name) → object.
    objects: BTreeMap<(Kind, String, String), Value>,
    events: Vec<Event>,
    /// Events at or below this resourceVersion are forgotten: watching from there is 410.
    floor: u64,
    uids: u64,
    /// Bumped to end every open watch with a 410.
    expiry: u64,
    /// Request lines seen (`GET /api/v1/pods?...`), for assertions.
    requests: Vec<String>,
    /// Watch streams hold events back (a slow watch: the client must not depend on it).
    paused: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: tokio::sync::Notify,
}

pub struct KubeApi {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

// === impl Kind ===

impl Kind {
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Namespace => "namespaces",
            Kind::Node => "nodes",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
        }
    }

    fn namespaced(self) -> bool {
        self == Kind::Pod
    }
}

// === impl KubeApi ===

impl KubeApi {
    /// Serve on 127.0.0.1:0.
    pub async fn start() -> KubeApi {
        let listener = bind("127.0.0.1:0".parse().expect("addr"));
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: tokio::sync::Notify::new(),
        });
        let task = Some(tokio::spawn(serve(listener, shared.clone())));
        KubeApi { addr, shared, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Kill the server: the listener and every open connection (watches break mid-stream).
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Serve again on the same port, with the objects kept and the event history forgotten (a
    /// watch from an old resourceVersion gets 410 and must re-list).
    pub fn restart(&mut self) {
        self.stop();
        {
            let mut s = self.shared.state.lock();
            s.floor = s.rv;
            s.events.clear();
        }
        let listener = bind(self.addr);
        self.task = Some(tokio::spawn(serve(listener, self.shared.clone())));
    }

    /// End every open watch with an `ERROR` 410 event and forget the history.
    pub fn expire_watches(&self) {
        {
            let mut s = self.shared.state.lock();
            s.floor = s.rv;
            s.events.clear();
            s.expiry += 1;
        }
        self.shared.changed.notify_waiters();
    }

    /// Create or replace an object (kept as given, plus uid, resourceVersion and
    /// creationTimestamp): an `ADDED` or `MODIFIED` event. Returns the stored object.
    pub fn apply(&self, kind: Kind, mut object: Value) -> Value {
        let stored = {
            let mut s = self.shared.state.lock();
            s.rv += 1;
            let rv = s.rv;
            let ns = object["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let name = object["metadata"]["name"]
                .as_str()
                .expect("metadata.name")
                .to_owned();
            let key = (
                kind,
                if kind.namespaced() { ns } else { String::new() },
                name,
            );
            let existing = s.objects.get(&key).cloned();
            let uid = match (&existing, object["metadata"]["uid"].as_str()) {
                (_, Some(uid)) => uid.to_owned(),
                (Some(old), None) => old["metadata"]["uid"].as_str().unwrap_or_default().into(),
                (None, None) => {
                    s.uids += 1;
                    format!("00000000-0000-4000-8000-{:012}", s.uids)
                }
            };
            object["apiVersion"] = json!("v1");
            object["kind"] = json!(kind.name());
            let meta = &mut object["metadata"];
            meta["uid"] = json!(uid);
            meta["resourceVersion"] = json!(rv.to_string());
            if meta["creationTimestamp"].is_null() {
                meta["creationTimestamp"] = json!("2026-12-01T10:00:00Z");
            }
            let kind_of_event = if existing.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            };
            s.objects.insert(key, object.clone());
            s.events.push(Event {
                rv,
                kind,
                kind_of_event,
                object: object.clone(),
            });
            object
        };
        self.shared.changed.notify_waiters();
        stored
    }

    /// Delete an object: a `DELETED` event carrying its last state. Returns whether it existed.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let found = {
            let mut s = self.shared.state.lock();
            let key = (
                kind,
                if kind.namespaced() {
                    namespace.to_owned()
                } else {
                    String::new()
                },
                name.to_owned(),
            );
            match s.objects.remove(&key) {
                None => false,
                Some(mut object) => {
                    s.rv += 1;
                    let rv = s.rv;
                    object["metadata"]["resourceVersion"] = json!(rv.to_string());
                    s.events.push(Event {
                        rv,
                        kind,
                        kind_of_event: "DELETED",
                        object,
                    });
                    true
                }
            }
        };
        self.shared.changed.notify_waiters();
        found
    }

    /// Hold back (true) or release (false) watch events; lists still answer at once.
    pub fn pause_watches(&self, paused: bool) {
        self.shared.state.lock().paused = paused;
        self.shared.changed.notify_waiters();
    }

    /// Every object of a kind, in key order.
    pub fn objects(&self, kind: Kind) -> Vec<Value> {
        let s = self.shared.state.lock();
        s.objects
            .iter()
            .filter(|((k, _, _), _)| *k == kind)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.state.lock().rv
    }

    /// Request lines seen so far.
    pub fn requests(&self) -> Vec<String> {
        self.shared.state.lock().requests.clone()
    }

    /// A kubeconfig file for this server (plain HTTP, no credentials) in `dir`.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\ncurrent-context: test\nusers:\n- name: test\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }
}

fn bind(addr: SocketAddr) -> tokio::net::TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("reuseaddr");
    socket.bind(addr).expect("bind the api server");
    socket.listen(128).expect("listen")
}

/// Accepts until aborted; aborting also ends every connection (they run in a JoinSet).
async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                connections.spawn(async move {
                    let svc = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(route(req, shared).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

fn full(status: StatusCode, body: Value) -> Response<BoxBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("response")
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) if hex.len() == 2 => {
                        out.push(v);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn route(req: Request<Incoming>, shared: Arc<Shared>) -> Response<BoxBody> {
    let path = req.uri().path().to_owned();
    shared
        .state
        .lock()
        .requests
        .push(format!("{} {}", req.method(), req.uri()));
    if req.method() != hyper::Method::GET {
        return full(
            StatusCode::METHOD_NOT_ALLOWED,
            status(405, "MethodNotAllowed", "this test server is read-only"),
        );
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["version"] => full(
            StatusCode::OK,
            json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0",
                   "gitCommit": "0000000", "gitTreeState": "clean",
                   "buildDate": "2026-12-01T00:00:00Z", "goVersion": "go1.24",
                   "compiler": "gc", "platform": "linux/amd64"}),
        ),
        ["api"] => full(
            StatusCode::OK,
            json!({"kind": "APIVersions", "versions": ["v1"],
                   "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                   "serverAddress": "127.0.0.1"}]}),
        ),
        ["apis"] => full(
            StatusCode::OK,
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
        ),
        ["api", "v1"] => full(StatusCode::OK, resource_list()),
        ["api", "v1", plural] => collection(&req, &shared, kind_of(plural), None).await,
        ["api", "v1", "namespaces", ns, "pods"] => {
            collection(&req, &shared, Some(Kind::Pod), Some(ns)).await
        }
        ["api", "v1", plural, name] => get_one(&shared, kind_of(plural), "", name),
        ["api", "v1", "namespaces", ns, "pods", name] => {
            get_one(&shared, Some(Kind::Pod), ns, name)
        }
        _ => full(
            StatusCode::NOT_FOUND,
            status(
                404,
                "NotFound",
                &format!("the server could not find {path}"),
            ),
        ),
    }
}

fn kind_of(plural: &str) -> Option<Kind> {
    [Kind::Pod, Kind::Namespace, Kind::Node]
        .into_iter()
        .find(|k| k.plural() == plural)
}

fn resource_list() -> Value {
    let verbs = json!(["get", "list", "watch"]);
    let resource = |name: &str, singular: &str, kind: &str, namespaced: bool, short: &str| {
        json!({"name": name, "singularName": singular, "namespaced": namespaced, "kind": kind,
               "verbs": verbs, "shortNames": [short]})
    };
    json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
        resource("pods", "pod", "Pod", true, "po"),
        resource("namespaces", "namespace", "Namespace", false, "ns"),
        resource("nodes", "node", "Node", false, "no"),
    ]})
}

fn get_one(shared: &Shared, kind: Option<Kind>, ns: &str, name: &str) -> Response<BoxBody> {
    let Some(kind) = kind else {
        return full(
            StatusCode::NOT_FOUND,
            status(404, "NotFound", "no such resource"),
        );
    };
    let key = (kind, ns.to_owned(), name.to_owned());
    match shared.state.lock().objects.get(&key) {
        Some(obj) => full(StatusCode::OK, obj.clone()),
        None => full(
            StatusCode::NOT_FOUND,
            status(
                404,
                "NotFound",
                &format!("{} \"{name}\" not found", kind.plural()),
            ),
        ),
    }
}

/// What a list or watch selects.
struct Filter {
    kind: Kind,
    namespace: Option<String>,
    labels: Vec<LabelReq>,
    fields: Vec<(String, bool, String)>,
}

enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    Absent(String),
}

impl Filter {
    fn parse(
        kind: Kind,
        namespace: Option<&str>,
        q: &BTreeMap<String, String>,
    ) -> Result<Self, String> {
        let mut labels = Vec::new();
        let selector = q.get("labelSelector").map(String::as_str).unwrap_or("");
        for part in split_selector(selector) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let req = if let Some((k, v)) = part.split_once("!=") {
                LabelReq::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                LabelReq::NotIn(k.trim().into(), set(rest)?)
            } else if let Some((k, rest)) = part.split_once(" in ") {
                LabelReq::In(k.trim().into(), set(rest)?)
            } else if let Some(k) = part.strip_prefix('!') {
                LabelReq::Absent(k.trim().into())
            } else {
                LabelReq::Exists(part.into())
            };
            labels.push(req);
        }
        let mut fields = Vec::new();
        let selector = q.get("fieldSelector").map(String::as_str).unwrap_or("");
        for part in selector.split(',').filter(|p| !p.is_empty()) {
            let (path, eq, value) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (k, true, v)
            } else {
                return Err(format!("invalid field selector {part:?}"));
            };
            let known = [
                "metadata.name",
                "metadata.namespace",
                "status.podIP",
                "status.phase",
                "spec.nodeName",
            ];
            if !known.contains(&path) {
                return Err(format!("field label not supported: {path}"));
            }
            fields.push((path.to_owned(), eq, value.to_owned()));
        }
        Ok(Filter {
            kind,
            namespace: namespace.map(str::to_owned),
            labels,
            fields,
        })
    }

    fn matches(&self, kind: Kind, obj: &Value) -> bool {
        if kind != self.kind {
            return false;
        }
        let meta = &obj["metadata"];
        if let Some(ns) = &self.namespace
            && meta["namespace"].as_str() != Some(ns)
        {
            return false;
        }
        let label = |k: &str| meta["labels"][k].as_str().map(str::to_owned);
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => label(k).as_deref() == Some(v),
            LabelReq::Ne(k, v) => label(k).as_deref() != Some(v),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.contains(&l)),
            LabelReq::NotIn(k, vs) => label(k).is_none_or(|l| !vs.contains(&l)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::Absent(k) => label(k).is_none(),
        });
        labels_ok
            && self.fields.iter().all(|(path, eq, want)| {
                let mut v = obj;
                for p in path.split('.') {
                    v = &v[p];
                }
                (v.as_str().unwrap_or("") == want) == *eq
            })
    }
}

/// Splits on commas outside parentheses.
fn split_selector(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn set(rest: &str) -> Result<Vec<String>, String> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("invalid set {rest:?}"))?;
    Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
}

async fn collection(
    req: &Request<Incoming>,
    shared: &Arc<Shared>,
    kind: Option<Kind>,
    namespace: Option<&str>,
) -> Response<BoxBody> {
    let Some(kind) = kind else {
        return full(
            StatusCode::NOT_FOUND,
            status(404, "NotFound", "no such resource"),
        );
    };
    let q = query(req);
    let filter = match Filter::parse(kind, namespace, &q) {
        Ok(f) => f,
        Err(e) => return full(StatusCode::BAD_REQUEST, status(400, "BadRequest", &e)),
    };
    let watching = matches!(q.get("watch").map(String::as_str), Some("1" | "true"));
    if watching {
        return watch(shared.clone(), filter, &q);
    }
    list(shared, &filter, &q)
}

/// A list; with `limit`, pages whose `continue` token is `<rv>:<offset>` (410 once the
/// history no longer reaches that rv, as an expired continue token is).
fn list(shared: &Shared, filter: &Filter, q: &BTreeMap<String, String>) -> Response<BoxBody> {
    let s = shared.state.lock();
    let (snapshot_rv, offset) = match q.get("continue").filter(|c| !c.is_empty()) {
        None => (s.rv, 0usize),
        Some(token) => {
            let parsed = token
                .split_once(':')
                .and_then(|(rv, off)| Some((rv.parse::<u64>().ok()?, off.parse::<usize>().ok()?)));
            match parsed {
                Some((rv, off)) if rv >= s.floor && rv == s.rv => (rv, off),
                _ => {
                    return full(
                        StatusCode::GONE,
                        status(
                            410,
                            "Expired",
                            "The provided continue parameter is too old to display a consistent list result.",
                        ),
                    );
                }
            }
        }
    };
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let matching: Vec<&Value> = s
        .objects
        .iter()
        .filter(|((k, _, _), v)| filter.matches(*k, v))
        .map(|(_, v)| v)
        .collect();
    let end = limit.map_or(matching.len(), |l| (offset + l).min(matching.len()));
    let items: Vec<Value> = matching
        .get(offset..end)
        .unwrap_or_default()
        .iter()
        .map(|v| (*v).clone())
        .collect();
    let mut metadata = json!({"resourceVersion": snapshot_rv.to_string()});
    if end < matching.len() {
        metadata["continue"] = json!(format!("{snapshot_rv}:{end}"));
        metadata["remainingItemCount"] = json!(matching.len() - end);
    }
    full(
        StatusCode::OK,
        json!({"kind": format!("{}List", filter.kind.name()), "apiVersion": "v1",
               "metadata": metadata, "items": items}),
    )
}

fn event_line(kind_of_event: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind_of_event, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// A watch stream: events after `resourceVersion` (or synthetic ADDED for what exists), then
/// new ones as they happen, bookmarks every second when asked for, until `timeoutSeconds`.
fn watch(shared: Arc<Shared>, filter: Filter, q: &BTreeMap<String, String>) -> Response<BoxBody> {
    let from = q
        .get("resourceVersion")
        .filter(|rv| !rv.is_empty() && *rv != "0")
        .and_then(|rv| rv.parse::<u64>().ok());
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let (mut cursor, expiry) = {
            let s = shared.state.lock();
            (from, s.expiry)
        };
        // No resourceVersion: the current objects as ADDED, then changes after now.
        if cursor.is_none() {
            let (rv, initial): (u64, Vec<Bytes>) = {
                let s = shared.state.lock();
                let lines = s
                    .objects
                    .iter()
                    .filter(|((k, _, _), v)| filter.matches(*k, v))
                    .map(|(_, v)| event_line("ADDED", v))
                    .collect();
                (s.rv, lines)
            };
            for line in initial {
                if tx.send(Ok(Frame::data(line))).await.is_err() {
                    return;
                }
            }
            cursor = Some(rv);
        }
        let mut cursor = cursor.unwrap_or_default();
        let mut bookmark = tokio::time::interval(Duration::from_secs(1));
        bookmark.tick().await;
        loop {
            let notified = shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (lines, gone) = {
                let s = shared.state.lock();
                if cursor < s.floor || s.expiry != expiry {
                    (Vec::new(), true)
                } else if s.paused {
                    (Vec::new(), false)
                } else {
                    let lines: Vec<Bytes> = s
                        .events
                        .iter()
                        .filter(|e| e.rv > cursor && filter.matches(e.kind, &e.object))
                        .map(|e| event_line(e.kind_of_event, &e.object))
                        .collect();
                    cursor = s.rv;
                    (lines, false)
                }
            };
            if gone {
                let st = status(410, "Expired", "too old resource version");
                let _ = tx.send(Ok(Frame::data(event_line("ERROR", &st)))).await;
                return;
            }
            for line in lines {
                if tx.send(Ok(Frame::data(line))).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = bookmark.tick(), if bookmarks => {
                    let obj = json!({"kind": filter.kind.name(), "apiVersion": "v1",
                                     "metadata": {"resourceVersion": cursor.to_string()}});
                    if tx.send(Ok(Frame::data(event_line("BOOKMARK", &obj)))).await.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tx.closed() => return,
            }
        }
    });
    let body = StreamBody::new(tokio_stream_from(rx));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(BodyExt::boxed(body))
        .expect("response")
}

/// An mpsc receiver as a stream (no tokio-stream dependency).
fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

/// A pod object for [`KubeApi::apply`].
pub fn pod(ns: &str, name: &str, ip: &str, labels: Value) -> Value {
    json!({
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"serviceAccountName": "default", "nodeName": "node-a",
                 "containers": [{"name": "main", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

/// A namespace object.
pub fn namespace(name: &str, labels: Value) -> Value {
    let mut labels = labels;
    labels["kubernetes.io/metadata.name"] = json!(name);
    json!({"metadata": {"name": name, "labels": labels}, "status": {"phase": "Active"}})
}

/// A node object with one InternalIP.
pub fn node(name: &str, ip: &str) -> Value {
    json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
           "status": {"addresses": [{"type": "InternalIP", "address": ip},
                                    {"type": "Hostname", "address": name}]}})
}
