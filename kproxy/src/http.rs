//! The one small HTTP server behind `/healthz` and `/livez`, `/metrics` and the
//! `healthCheckNodePort` servers. Each answers from a function of the request path; all of them
//! face whatever can reach the node (the healthz and health-check ports listen on every
//! address), so each keeps to [`Limits`]:
//!
//! - at most `max_connections` connections at once: a new connection over the cap closes the
//!   oldest one (as nginx reuses idle keep-alive connections when it runs out), so a client
//!   that opens many idle connections can neither exhaust the agent's file descriptors nor
//!   starve the health checkers, whose requests take a millisecond;
//! - a client gets `header_timeout` to send each request's headers, counted from the accept or
//!   from the end of the previous response, so a slow or idle connection is closed;
//! - headers are capped at [`MAX_HEADER_BYTES`];
//! - an accept that fails (`EMFILE` when the process is out of file descriptors) is retried
//!   after a back-off (10 ms doubling to 1 s) instead of at once, which would spin.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

/// What a server answers to a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Answer {
    pub fn json(status: StatusCode, body: String) -> Self {
        Self { status, content_type: "application/json", body }
    }

    /// Go's `http.NotFound`, as kube-proxy answers unknown paths.
    pub fn not_found() -> Self {
        Self { status: StatusCode::NOT_FOUND, content_type: "text/plain; charset=utf-8", body: "404 page not found\n".into() }
    }

    fn response(self) -> Response<Full<Bytes>> {
        Response::builder()
            .status(self.status)
            .header("Content-Type", self.content_type)
            .header("X-Content-Type-Options", "nosniff")
            .body(Full::new(Bytes::from(self.body)))
            .expect("static headers are valid")
    }
}

/// What one server allows, see the module documentation.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// Health checkers and Prometheus need a handful of connections, and send their requests at
/// once.
pub const LIMITS: Limits = Limits { max_connections: 128, header_timeout: Duration::from_secs(5) };

/// Request headers larger than this close the connection (hyper's smallest buffer limit).
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one warning per server and kind of trouble in this time.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Binds `addr` (an error names it, so a port clash fails the agent's start clearly).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("listen on {addr}"))
}

/// Serves `answer` on `listener` within `limits` until the task is aborted; `name` says which
/// server it is in logs.
pub fn serve<F>(listener: TcpListener, name: String, limits: Limits, answer: F) -> JoinHandle<()>
where
    F: Fn(&str) -> Answer + Send + Sync + 'static,
{
    tokio::spawn(accept_loop(listener, name, limits, Arc::new(answer)))
}

/// The open connections of one server, oldest first; dropping a connection's sender closes it.
#[derive(Default)]
struct Connections {
    next_id: u64,
    open: BTreeMap<u64, oneshot::Sender<()>>,
}

/// Logs one kind of trouble at most once per [`WARN_EVERY`], with how often it happened.
#[derive(Default)]
struct Warn {
    last: Option<Instant>,
    since: u64,
}

impl Warn {
    /// `Some(count since the last warning)` when a warning is due.
    fn due(&mut self) -> Option<u64> {
        self.since += 1;
        if self.last.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.since))
    }
}

async fn accept_loop<F>(listener: TcpListener, name: String, limits: Limits, answer: Arc<F>)
where
    F: Fn(&str) -> Answer + Send + Sync + 'static,
{
    let connections = Arc::new(Mutex::new(Connections::default()));
    let (mut accept_warn, mut evict_warn) = (Warn::default(), Warn::default());
    let mut backoff: Option<Duration> = None;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => {
                backoff = None;
                stream
            }
            Err(e) => {
                let wait = backoff.map_or(ACCEPT_BACKOFF_FIRST, |b| (b * 2).min(ACCEPT_BACKOFF_MAX));
                backoff = Some(wait);
                if let Some(times) = accept_warn.due() {
                    tracing::warn!(server = %name, times, "accept failed: {e}; accepting again after a pause (up to {ACCEPT_BACKOFF_MAX:?})");
                }
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        let (id, closed) = {
            let mut c = connections.lock().unwrap_or_else(|e| e.into_inner());
            if c.open.len() >= limits.max_connections {
                // Dropping the sender closes the oldest connection.
                c.open.pop_first();
                if let Some(times) = evict_warn.due() {
                    tracing::warn!(
                        server = %name,
                        times,
                        max_connections = limits.max_connections,
                        "connection limit reached: closing the oldest connections"
                    );
                }
            }
            let (tx, rx) = oneshot::channel();
            let id = c.next_id;
            c.next_id += 1;
            c.open.insert(id, tx);
            (id, rx)
        };
        let (answer, connections) = (answer.clone(), connections.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = answer(req.uri().path()).response();
                async move { Ok::<_, Infallible>(response) }
            });
            let mut builder = http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).max_buf_size(MAX_HEADER_BYTES);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = closed => {} // evicted: dropping the connection closes the socket
            }
            connections.lock().unwrap_or_else(|e| e.into_inner()).open.remove(&id);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn server(limits: Limits) -> SocketAddr {
        let listener = bind((std::net::Ipv4Addr::LOCALHOST, 0).into()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        serve(listener, "test".into(), limits, |path| match path {
            "/ok" => Answer::json(StatusCode::OK, "{}".into()),
            _ => Answer::not_found(),
        });
        addr
    }

    /// Sends one request on `s` and reads the status line's code.
    async fn get(s: &mut tokio::net::TcpStream, path: &str) -> u16 {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status in {head:?}"))
    }

    /// Whether the server closed `s` (reads EOF or a reset) within `wait`.
    async fn closed_within(s: &mut tokio::net::TcpStream, wait: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(tokio::time::timeout(wait, s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
    }

    #[tokio::test]
    async fn answers_paths_and_closes_the_oldest_connection_over_the_cap() {
        let addr = server(Limits { max_connections: 3, header_timeout: Duration::from_secs(30) }).await;
        let mut idle = Vec::new();
        for _ in 0..3 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Let the server accept all three before the fourth arrives.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert_eq!(get(&mut client, "/ok").await, 200);
        assert_eq!(get(&mut client, "/metrics").await, 404, "kept alive; unknown paths are 404");
        assert!(closed_within(&mut idle[0], Duration::from_secs(5)).await, "the oldest connection is closed");
        assert!(!closed_within(&mut idle[1], Duration::from_millis(200)).await, "the others stay");
    }

    #[tokio::test]
    async fn a_body_larger_than_the_header_limit_is_sent_whole() {
        let listener = bind((std::net::Ipv4Addr::LOCALHOST, 0).into()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = "x".repeat(300_000);
        let answer = body.clone();
        serve(listener, "test".into(), LIMITS, move |_| Answer::json(StatusCode::OK, answer.clone()));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        let text = String::from_utf8(all).unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{}", &text[..100]);
        assert!(text.ends_with(&body), "{} bytes", text.len());
    }

    #[tokio::test]
    async fn a_client_that_does_not_send_its_headers_in_time_is_cut() {
        let addr = server(Limits { max_connections: 8, header_timeout: Duration::from_millis(300) }).await;
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let started = Instant::now();
        assert!(closed_within(&mut slow, Duration::from_secs(5)).await);
        assert!(started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());
        // An idle keep-alive connection is closed after the same time.
        let mut keep = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert_eq!(get(&mut keep, "/ok").await, 200);
        assert!(closed_within(&mut keep, Duration::from_secs(5)).await);
    }
}
