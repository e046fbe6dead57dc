//! The HTTP side of the fake apiserver: hyper 1 (HTTP/1.1, keep-alive) on a tokio runtime,
//! routing Kubernetes API paths to [`Store`] calls. Watches are chunked responses fed by a
//! channel, one JSON event per line.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::task::AbortHandle;

use super::selector::{FieldSelector, LabelSelector, Selectors};
use super::store::{ApiError, Kind, RequestRecord, Store, WatchMsg, WatchStart};

type ResponseBody = BoxBody<Bytes, io::Error>;

/// State shared by the handle and every connection task.
pub(crate) struct Shared {
    pub store: Mutex<Store>,
    /// Open connections, aborted when the server stops listening.
    pub conns: Mutex<HashMap<u64, AbortHandle>>,
    pub next_conn: AtomicU64,
}

impl Shared {
    pub fn new(store: Store) -> Shared {
        Shared {
            store: Mutex::new(store),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
        }
    }

    /// The store, even if a panicking test thread poisoned the lock.
    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<u64, AbortHandle>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Aborts every open connection (their sockets close).
    pub fn abort_connections(&self) {
        for (_, conn) in self.conns().drain() {
            conn.abort();
        }
    }
}

/// Accepts connections until the task is aborted; each connection runs in its own task.
pub(crate) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("fake apiserver: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let conn_shared = shared.clone();
        // Held while spawning, so the task's removal of itself comes after the insertion.
        let mut conns = shared.conns();
        let task = tokio::spawn(async move {
            let service_shared = conn_shared.clone();
            let service = service_fn(move |req| handle(req, service_shared.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
            conn_shared.conns().remove(&id);
        });
        conns.insert(id, task.abort_handle());
    }
}

/// Sends BOOKMARK events every `interval` until the task is aborted.
pub(crate) async fn bookmark_loop(shared: Arc<Shared>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        shared.store().send_bookmarks();
    }
}

/// The body of a watch response: lines from the store until the timeout, an End, or a Cut
/// (which fails the body, so hyper drops the connection without the final chunk).
struct WatchBody {
    rx: UnboundedReceiver<WatchMsg>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    done: bool,
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(WatchMsg::Line(line))) => {
                return Poll::Ready(Some(Ok(Frame::data(line))))
            }
            Poll::Ready(Some(WatchMsg::Cut)) => {
                self.done = true;
                return Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "watch cut by the fake apiserver",
                ))));
            }
            Poll::Ready(Some(WatchMsg::End) | None) => {
                self.done = true;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.done = true;
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn json_response(status: u16, value: &Value) -> Response<ResponseBody> {
    let body = serde_json::to_vec(value).expect("serializing a JSON value");
    let mut response = Response::new(full(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(e: &ApiError) -> Response<ResponseBody> {
    json_response(e.code, &e.status())
}

/// The parsed request path.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    group: String,
    version: String,
    namespace: Option<String>,
    resource: String,
    name: Option<String>,
}

/// `/api/v1[/namespaces/NS]/RESOURCE[/NAME]` or `/apis/GROUP/VERSION[/namespaces/NS]/...`.
fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, resource, rest @ ..] => (Some(ns.to_string()), {
            let mut v = vec![*resource];
            v.extend_from_slice(rest);
            v
        }),
        other => (None, other.to_vec()),
    };
    let (resource, name) = match rest.as_slice() {
        [resource] => (*resource, None),
        [resource, name] => (*resource, Some(name.to_string())),
        _ => return None,
    };
    Some(Target {
        group: group.into(),
        version: version.into(),
        namespace,
        resource: resource.into(),
        name,
    })
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn selectors(
    params: &[(String, String)],
    namespace: Option<String>,
) -> Result<Selectors, ApiError> {
    let labels = LabelSelector::parse(param(params, "labelSelector").unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?;
    let fields = FieldSelector::parse(param(params, "fieldSelector").unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    Ok(Selectors {
        labels,
        fields,
        namespace,
    })
}

async fn read_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let bytes = req
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<ResponseBody>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let at = Instant::now();
    let response = route(req, &shared, &method, &path, &params)
        .await
        .unwrap_or_else(|e| error_response(&e));
    shared.store().log_request(RequestRecord {
        seq: 0,
        at,
        method: method.to_string(),
        path,
        query,
        params,
        status: response.status().as_u16(),
    });
    Ok(response)
}

async fn route(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    params: &[(String, String)],
) -> Result<Response<ResponseBody>, ApiError> {
    match path {
        "/version" => {
            return Ok(json_response(
                200,
                &json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0-kproxy-fake",
                        "platform": "linux/amd64"}),
            ))
        }
        "/healthz" | "/livez" | "/readyz" => {
            let mut r = Response::new(full("ok"));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            return Ok(r);
        }
        _ => {}
    }
    let target = parse_path(path).ok_or_else(|| {
        ApiError::new(404, "NotFound", format!("the server could not find {path}"))
    })?;
    let events_api =
        target.version == "v1" && (target.group == "events.k8s.io" || target.group.is_empty());
    if target.resource == "events" && events_api {
        return events(req, shared, method, &target).await;
    }
    let kind =
        Kind::from_path(&target.group, &target.version, &target.resource).ok_or_else(|| {
            ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource {path}"),
            )
        })?;
    if target.namespace.is_some() && !kind.namespaced() {
        return Err(ApiError::new(
            404,
            "NotFound",
            format!("{} are cluster-scoped", kind.plural()),
        ));
    }
    let namespace = target.namespace.clone().unwrap_or_default();
    match (method, &target.name) {
        (&Method::GET, None) => {
            let sel = selectors(params, target.namespace.clone())?;
            if matches!(param(params, "watch"), Some("true" | "1")) {
                return watch(shared, kind, sel, params);
            }
            let limit = match param(params, "limit") {
                None | Some("") => 0,
                Some(l) => l
                    .parse()
                    .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
            };
            // A continued list pages through the snapshot its first page took (with that
            // page's selectors).
            let cont = param(params, "continue");
            let list = shared.store().list(kind, &sel, limit, cont)?;
            Ok(json_response(200, &list))
        }
        (&Method::GET, Some(name)) => {
            let object = shared
                .store()
                .get(kind, &namespace, name)
                .ok_or_else(|| ApiError::not_found(kind.kind(), name))?;
            Ok(json_response(200, &object))
        }
        (&Method::POST, None) => {
            let mut object = read_json(req).await?;
            if let (Some(ns), Some(meta)) = (
                &target.namespace,
                object.get_mut("metadata").and_then(Value::as_object_mut),
            ) {
                meta.entry("namespace").or_insert_with(|| ns.clone().into());
            }
            let created = shared.store().create(object)?;
            Ok(json_response(201, &created))
        }
        (&Method::PUT, Some(_)) => {
            let object = read_json(req).await?;
            let updated = shared.store().update_checked(object, true)?;
            Ok(json_response(200, &updated))
        }
        (&Method::PATCH, Some(name)) => {
            let patch = read_json(req).await?;
            let patched = shared.store().patch(kind, &namespace, name, &patch)?;
            Ok(json_response(200, &patched))
        }
        (&Method::DELETE, Some(name)) => {
            let deleted = shared.store().delete(kind, &namespace, name)?;
            Ok(json_response(200, &deleted))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on {path}"),
        )),
    }
}

fn watch(
    shared: &Arc<Shared>,
    kind: Kind,
    sel: Selectors,
    params: &[(String, String)],
) -> Result<Response<ResponseBody>, ApiError> {
    let timeout = match param(params, "timeoutSeconds") {
        None | Some("") => Duration::from_secs(1800),
        Some(t) => Duration::from_secs(
            t.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))?,
        ),
    };
    let bookmarks = matches!(param(params, "allowWatchBookmarks"), Some("true" | "1"));
    let rv = param(params, "resourceVersion").unwrap_or("");
    let (tx, rx) = unbounded_channel();
    match shared.store().start_watch(kind, sel, rv, bookmarks, tx)? {
        WatchStart::Started | WatchStart::Gone => {}
    }
    let body = WatchBody {
        rx,
        deadline: Box::pin(tokio::time::sleep(timeout)),
        done: false,
    };
    let mut response = Response::new(body.boxed());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

async fn events(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    method: &Method,
    target: &Target,
) -> Result<Response<ResponseBody>, ApiError> {
    let namespace = target.namespace.clone().unwrap_or_else(|| "default".into());
    match (method, &target.name) {
        (&Method::POST, None) => {
            let event = read_json(req).await?;
            let stored = shared.store().post_event(&namespace, event);
            Ok(json_response(201, &stored))
        }
        (&Method::PATCH, Some(name)) => {
            let patch = read_json(req).await?;
            let stored = shared
                .store()
                .change_event(&namespace, name, &patch, false)?;
            Ok(json_response(200, &stored))
        }
        (&Method::PUT, Some(name)) => {
            let event = read_json(req).await?;
            let stored = shared
                .store()
                .change_event(&namespace, name, &event, true)?;
            Ok(json_response(200, &stored))
        }
        (&Method::GET, None) => {
            let items: Vec<Value> = shared
                .store()
                .posted_events()
                .iter()
                .filter(|e| {
                    target.namespace.is_none()
                        || e.pointer("/metadata/namespace").and_then(Value::as_str)
                            == Some(namespace.as_str())
                })
                .cloned()
                .collect();
            let rv = shared.store().resource_version().to_string();
            Ok(json_response(
                200,
                &json!({"kind": "EventList", "apiVersion": format!("{}{}", 
                    if target.group.is_empty() { String::new() } else { format!("{}/", target.group) },
                    target.version),
                    "metadata": {"resourceVersion": rv}, "items": items}),
            ))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on events"),
        )),
    }
}

/// Binds `addr` (SO_REUSEADDR, as std does on Unix), retrying for a moment while the port is
/// still taken (e.g. right after a restart).
pub(crate) fn bind(addr: SocketAddr, patience: Duration) -> io::Result<std::net::TcpListener> {
    let deadline = Instant::now() + patience;
    loop {
        match std::net::TcpListener::bind(addr) {
            Ok(listener) => {
                listener.set_nonblocking(true)?;
                return Ok(listener);
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_api_paths() {
        assert_eq!(
            parse_path("/api/v1/services"),
            Some(Target {
                group: "".into(),
                version: "v1".into(),
                namespace: None,
                resource: "services".into(),
                name: None
            })
        );
        let t = parse_path("/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices/web").unwrap();
        assert_eq!(
            (
                t.group.as_str(),
                t.namespace.as_deref(),
                t.resource.as_str(),
                t.name.as_deref()
            ),
            (
                "discovery.k8s.io",
                Some("ns"),
                "endpointslices",
                Some("web")
            )
        );
        let t = parse_path("/api/v1/nodes/node-1").unwrap();
        assert_eq!(
            (t.resource.as_str(), t.name.as_deref()),
            ("nodes", Some("node-1"))
        );
        assert_eq!(parse_path("/metrics"), None);
        assert_eq!(parse_path("/api/v1/namespaces/a/services/b/status"), None);
    }
}
