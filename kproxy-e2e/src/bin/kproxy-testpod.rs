//! `kproxy-testpod`: the workload of kproxy's tests, demo and benchmarks.
//!
//! - `serve`: a pod. HTTP/1.1 on `--tcp` (thread per connection, keep-alive) and a UDP echo on
//!   `--udp`; both answer with `NAME\nclient IP\n`, IP being the client's address as the
//!   server sees it. Prints `ready tcp=... udp=...` once bound.
//! - `http`: a client. `--count` sequential GET requests, a new connection each (unless
//!   `--keepalive`), recording which backend answered and what `getpeername()` says.
//! - `udp`: a client. `--count` datagrams with `sendto` on one unconnected socket (or, with
//!   `--connected`, `connect` + `send`; with `--new-socket`, a fresh socket per datagram),
//!   recording the backend and each reply's source address.
//! - `udp-flows`: a client of many flows. `--count` unconnected sockets, one datagram each,
//!   then (after `--go-file` appears) one more each, recording which sockets changed backend.
//! - `flood`: `--count` UDP sockets `connect`ed to the address (no traffic; `getpeername()`
//!   once each), held open until the last is connected (as many as the limit of open files
//!   allows), as a process that opens very many sockets does.
//!
//! Clients print one JSON line, see `kproxy_e2e::report`. They are bounded: `--count` requests, each
//! socket operation limited by `--timeout-ms`, and the whole run by `--max-ms` (requests not
//! attempted by then count as `NotAttempted` errors).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser};
use kproxy_e2e::report::{Latency, Report};

#[derive(Parser)]
#[command(
    name = "kproxy-testpod",
    about = "Test workload for kproxy: pod servers and clients"
)]
enum Cli {
    /// Serve HTTP (and UDP), answering every request with `NAME\nclient IP\n`.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        tcp: SocketAddr,
        #[arg(long)]
        udp: Option<SocketAddr>,
    },
    /// Send sequential HTTP GET requests and print a JSON report.
    Http {
        #[command(flatten)]
        run: RunArgs,
        /// Reuse one connection for all requests (reconnecting after an error).
        #[arg(long)]
        keepalive: bool,
    },
    /// Send UDP datagrams, wait for each reply, and print a JSON report.
    Udp {
        #[command(flatten)]
        run: RunArgs,
        #[command(flatten)]
        mode: UdpMode,
    },
    /// Many UDP flows, two rounds: one datagram on each of `--count` unconnected sockets,
    /// then, once `--go-file` exists, one more on each. The report's `by_backend` counts the
    /// second round's answers, `moved` the sockets whose backend changed ("old->new").
    UdpFlows {
        #[command(flatten)]
        run: RunArgs,
        /// Created (empty) once the first round is done.
        #[arg(long)]
        ready_file: std::path::PathBuf,
        /// The second round starts when this file exists (or at `--max-ms`).
        #[arg(long)]
        go_file: std::path::PathBuf,
    },
    /// Open `--count` UDP sockets connected to `--addr` (no datagram sent), call
    /// `getpeername()` on each, and hold them until the last is connected (beyond the limit of
    /// open files, raised to its hard limit, the oldest are closed). `ok` counts the sockets
    /// connected, `peers` what getpeername() said.
    Flood {
        #[command(flatten)]
        run: RunArgs,
    },
}

#[derive(Args, Clone, Copy)]
struct UdpMode {
    /// connect() the socket and use send/recv instead of sendto to the address.
    #[arg(long)]
    connected: bool,
    /// Use a fresh socket (new source port) for every datagram, as DNS resolvers do, instead of
    /// one socket for the whole run.
    #[arg(long)]
    new_socket: bool,
    /// After a failed datagram, open a new socket for the next one (as an application does
    /// when its connected socket reports an error).
    #[arg(long)]
    reconnect_on_error: bool,
    /// With `--connected`: record `getpeername()` after every datagram, not only at connect.
    #[arg(long)]
    peer_each_datagram: bool,
}

#[derive(Args, Clone, Copy)]
struct RunArgs {
    /// The address to send to, e.g. a service's 10.96.0.10:80.
    #[arg(long)]
    addr: SocketAddr,
    /// Number of requests (datagrams) to send.
    #[arg(long)]
    count: u32,
    /// Pause between two requests.
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Limit of each socket operation (connect, send, receive).
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Limit of the whole run.
    #[arg(long, default_value_t = 60_000)]
    max_ms: u64,
}

impl RunArgs {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.max(1))
    }
}

fn main() -> Result<()> {
    match Cli::parse() {
        Cli::Serve { name, tcp, udp } => serve(&name, tcp, udp),
        Cli::Http { run, keepalive } => {
            print_report(http_client(run, keepalive));
            Ok(())
        }
        Cli::Udp { run, mode } => {
            print_report(udp_client(run, mode));
            Ok(())
        }
        Cli::UdpFlows { run, ready_file, go_file } => {
            print_report(udp_flows(run, &ready_file, &go_file));
            Ok(())
        }
        Cli::Flood { run } => {
            print_report(flood(run));
            Ok(())
        }
    }
}

fn print_report(report: Report) {
    println!("{}", report.to_json());
}

// ---------------------------------------------------------------------------------------------
// Servers

fn serve(name: &str, tcp: SocketAddr, udp: Option<SocketAddr>) -> Result<()> {
    let name: Arc<str> = name.into();
    let listener = TcpListener::bind(tcp).with_context(|| format!("binding TCP {tcp}"))?;
    let udp_socket = match udp {
        Some(addr) => Some(UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?),
        None => None,
    };
    let udp_text = udp.map_or("-".to_string(), |a| a.to_string());
    println!("ready tcp={tcp} udp={udp_text}");
    io::stdout().flush()?;

    if let Some(socket) = udp_socket {
        let name = name.clone();
        thread::spawn(move || serve_udp(&socket, &name));
    }
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let name = name.clone();
                thread::spawn(move || {
                    if let Err(e) = serve_http_connection(stream, &name) {
                        if !is_client_going_away(&e) {
                            eprintln!("http connection: {e}");
                        }
                    }
                });
            }
            // E.g. out of file descriptors under a benchmark: back off instead of spinning.
            Err(e) => {
                eprintln!("accept: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
    Ok(())
}

/// Errors that only mean the client left (or idled out): not worth a log line.
fn is_client_going_away(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | WouldBlock | TimedOut
    )
}

/// What a server answers to `client`.
fn answer(name: &str, client: SocketAddr) -> String {
    format!("{name}\nclient {}\n", client.ip())
}

fn serve_udp(socket: &UdpSocket, name: &str) {
    let mut buf = [0u8; 2048];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((_, from)) => {
                if let Err(e) = socket.send_to(answer(name, from).as_bytes(), from) {
                    eprintln!("udp reply to {from}: {e}");
                }
            }
            Err(e) => {
                eprintln!("udp receive: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Idle connections are closed after this long.
const SERVER_IDLE: Duration = Duration::from_secs(30);
const MAX_HEADERS: usize = 100;

fn serve_http_connection(stream: TcpStream, name: &str) -> io::Result<()> {
    let body = answer(name, stream.peer_addr()?);
    stream.set_read_timeout(Some(SERVER_IDLE))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let Some(head) = read_head(&mut reader)? else {
            return Ok(()); // the client closed the connection
        };
        let version = head.start.split_whitespace().nth(2).unwrap_or("HTTP/1.0");
        let connection = head.header("connection").map(str::to_ascii_lowercase);
        let keep_alive = if version == "HTTP/1.0" {
            connection.as_deref() == Some("keep-alive")
        } else {
            connection.as_deref() != Some("close")
        };
        // Discard a request body, if any.
        let length = head.content_length()?;
        io::copy(&mut (&mut reader).take(length), &mut io::sink())?;
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: {}\r\n\r\n{body}",
            body.len(),
            if keep_alive { "keep-alive" } else { "close" },
        );
        writer.write_all(response.as_bytes())?;
        if !keep_alive {
            return Ok(());
        }
    }
}

/// The start line and headers of an HTTP message.
struct Head {
    start: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> io::Result<u64> {
        self.header("content-length").map_or(Ok(0), |v| {
            v.parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length"))
        })
    }
}

/// Reads a start line and headers; `None` if the peer closed before sending anything.
fn read_head(reader: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut start = String::new();
    if reader.read_line(&mut start)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if headers.len() == MAX_HEADERS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too many headers",
            ));
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok(Some(Head {
        start: start.trim_end().to_string(),
        headers,
    }))
}

// ---------------------------------------------------------------------------------------------
// Clients

/// Why one request failed: a kind for counting and a detail for the first error.
struct Failure {
    kind: String,
    detail: String,
}

impl Failure {
    fn io(stage: &str, e: io::Error) -> Failure {
        let kind = match e.kind() {
            // A socket timeout surfaces as EAGAIN.
            io::ErrorKind::WouldBlock => "TimedOut".to_string(),
            other => format!("{other:?}"),
        };
        Failure {
            kind,
            detail: format!("{stage}: {e}"),
        }
    }

    fn protocol(kind: &str, detail: String) -> Failure {
        Failure {
            kind: kind.to_string(),
            detail,
        }
    }
}

/// Collects one run's samples into a [`Report`].
struct Recorder {
    start: Instant,
    report: Report,
    connect_ms: Vec<f64>,
    request_ms: Vec<f64>,
    failure_ms: Vec<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Recorder {
    fn new() -> Recorder {
        Recorder {
            start: Instant::now(),
            report: Report::default(),
            connect_ms: Vec::new(),
            request_ms: Vec::new(),
            failure_ms: Vec::new(),
        }
    }

    /// A request answered with `answer` (see [`answer`]).
    fn success(&mut self, answer: &str, took: Duration) {
        self.report.ok += 1;
        let mut lines = answer.lines();
        let backend = lines.next().unwrap_or_default().trim();
        *self.report.by_backend.entry(backend.to_string()).or_default() += 1;
        if let Some(client) = lines.find_map(|l| l.strip_prefix("client ")) {
            *self.report.seen_as.entry(client.trim().to_string()).or_default() += 1;
        }
        self.request_ms.push(ms(took));
    }

    fn failure(&mut self, failure: Failure, took: Duration) {
        *self.report.errors.entry(failure.kind).or_default() += 1;
        self.failure_ms.push(ms(took));
        if self.report.first_error.is_none() {
            self.report.first_error_ms = Some(ms(self.start.elapsed()));
            self.report.first_error = Some(failure.detail);
        }
    }

    fn peer(&mut self, addr: io::Result<SocketAddr>) {
        let key = addr.map_or_else(|e| format!("error: {e}"), |a| a.to_string());
        *self.report.peers.entry(key).or_default() += 1;
    }

    fn source(&mut self, addr: SocketAddr) {
        *self.report.sources.entry(addr.to_string()).or_default() += 1;
    }

    /// Runs `request` `run.count` times, `run.interval_ms` apart, within `run.max_ms`.
    fn run(mut self, run: RunArgs, mut request: impl FnMut(&mut Recorder)) -> Report {
        let deadline = self.start + Duration::from_millis(run.max_ms);
        for i in 0..run.count {
            if i > 0 && run.interval_ms > 0 {
                thread::sleep(Duration::from_millis(run.interval_ms));
            }
            if Instant::now() >= deadline {
                let left = u64::from(run.count - i);
                *self.report.errors.entry("NotAttempted".into()).or_default() += left;
                break;
            }
            request(&mut self);
        }
        self.finish()
    }

    fn finish(mut self) -> Report {
        self.report.connect_ms = Latency::from_samples(&self.connect_ms);
        self.report.request_ms = Latency::from_samples(&self.request_ms);
        self.report.failure_ms = Latency::from_samples(&self.failure_ms);
        self.report.elapsed_ms = ms(self.start.elapsed());
        self.report
    }
}

struct HttpConnection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

fn http_client(run: RunArgs, keepalive: bool) -> Report {
    let mut connection: Option<HttpConnection> = None;
    Recorder::new().run(run, |rec| {
        let started = Instant::now();
        let result = (|| {
            if connection.is_none() {
                connection = Some(http_connect(run, rec)?);
            }
            let conn = connection.as_mut().expect("connected above");
            let (backend, server_closes) = http_get(conn, run.addr, keepalive)?;
            if !keepalive || server_closes {
                connection = None;
            }
            Ok(backend)
        })();
        match result {
            Ok(backend) => rec.success(&backend, started.elapsed()),
            Err(failure) => {
                connection = None;
                rec.failure(failure, started.elapsed());
            }
        }
    })
}

fn http_connect(run: RunArgs, rec: &mut Recorder) -> Result<HttpConnection, Failure> {
    let started = Instant::now();
    let stream = TcpStream::connect_timeout(&run.addr, run.timeout())
        .map_err(|e| Failure::io("connect", e))?;
    rec.connect_ms.push(ms(started.elapsed()));
    rec.peer(stream.peer_addr());
    let setup = || -> io::Result<TcpStream> {
        stream.set_read_timeout(Some(run.timeout()))?;
        stream.set_write_timeout(Some(run.timeout()))?;
        stream.set_nodelay(true)?;
        stream.try_clone()
    };
    let writer = setup().map_err(|e| Failure::io("socket setup", e))?;
    Ok(HttpConnection {
        reader: BufReader::new(stream),
        writer,
    })
}

const MAX_BODY: u64 = 64 * 1024;

/// One GET on `conn`: the backend's name and whether the server closes the connection.
fn http_get(
    conn: &mut HttpConnection,
    addr: SocketAddr,
    keepalive: bool,
) -> Result<(String, bool), Failure> {
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kproxy-testpod\r\nConnection: {}\r\n\r\n",
        if keepalive { "keep-alive" } else { "close" }
    );
    conn.writer
        .write_all(request.as_bytes())
        .map_err(|e| Failure::io("send", e))?;
    let head = read_head(&mut conn.reader)
        .map_err(|e| Failure::io("receive", e))?
        .ok_or_else(|| Failure::io("receive", io::ErrorKind::UnexpectedEof.into()))?;
    let status = head.start.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(Failure::protocol(
            &format!("HttpStatus{status}"),
            format!("response {:?}", head.start),
        ));
    }
    let length = head
        .content_length()
        .map_err(|e| Failure::io("receive", e))?;
    if length > MAX_BODY {
        return Err(Failure::protocol(
            "BadResponse",
            format!("body of {length} bytes"),
        ));
    }
    let mut body = String::new();
    (&mut conn.reader)
        .take(length)
        .read_to_string(&mut body)
        .map_err(|e| Failure::io("receive body", e))?;
    if body.len() as u64 != length {
        return Err(Failure::io(
            "receive body",
            io::ErrorKind::UnexpectedEof.into(),
        ));
    }
    let closes = head
        .header("connection")
        .is_some_and(|v| v.eq_ignore_ascii_case("close"));
    Ok((body.trim().to_string(), closes))
}

fn udp_client(run: RunArgs, mode: UdpMode) -> Report {
    let mut socket: Option<UdpSocket> = None;
    let mut seq = 0u32;
    Recorder::new().run(run, |rec| {
        let started = Instant::now();
        seq += 1;
        if mode.new_socket {
            socket = None;
        }
        let result = (|| {
            if socket.is_none() {
                socket = Some(udp_socket(run, mode.connected, rec)?);
            }
            let socket = socket.as_ref().expect("opened above");
            let payload = format!("kproxy-testpod {seq}\n");
            let sent = if mode.connected {
                socket.send(payload.as_bytes())
            } else {
                socket.send_to(payload.as_bytes(), run.addr)
            };
            sent.map_err(|e| Failure::io("send", e))?;
            let mut buf = [0u8; 2048];
            let (n, from) = socket
                .recv_from(&mut buf)
                .map_err(|e| Failure::io("receive", e))?;
            rec.source(from);
            if mode.connected && mode.peer_each_datagram {
                rec.peer(socket.peer_addr());
            }
            Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
        })();
        match result {
            Ok(backend) => rec.success(&backend, started.elapsed()),
            Err(failure) => {
                if mode.reconnect_on_error {
                    socket = None;
                }
                rec.failure(failure, started.elapsed());
            }
        }
    })
}

/// A UDP socket with the run's timeouts, connected to the address if asked (recording the
/// peer address).
fn udp_socket(run: RunArgs, connected: bool, rec: &mut Recorder) -> Result<UdpSocket, Failure> {
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| Failure::io("bind", e))?;
    let setup = || -> io::Result<()> {
        socket.set_read_timeout(Some(run.timeout()))?;
        socket.set_write_timeout(Some(run.timeout()))
    };
    setup().map_err(|e| Failure::io("socket setup", e))?;
    if connected {
        socket
            .connect(run.addr)
            .map_err(|e| Failure::io("connect", e))?;
        rec.peer(socket.peer_addr());
    }
    Ok(socket)
}

/// One datagram on `socket` to `addr` and its answer: the backend's name, or why not.
fn udp_exchange(socket: &UdpSocket, addr: SocketAddr, payload: &str) -> Result<String, Failure> {
    socket.send_to(payload.as_bytes(), addr).map_err(|e| Failure::io("send", e))?;
    let mut buf = [0u8; 2048];
    let (n, _) = socket.recv_from(&mut buf).map_err(|e| Failure::io("receive", e))?;
    let answer = String::from_utf8_lossy(&buf[..n]);
    Ok(answer.lines().next().unwrap_or_default().trim().to_string())
}

fn udp_flows(run: RunArgs, ready_file: &std::path::Path, go_file: &std::path::Path) -> Report {
    let mut rec = Recorder::new();
    let deadline = rec.start + Duration::from_millis(run.max_ms);
    let mut flows: Vec<(UdpSocket, Option<String>)> = Vec::new();
    for i in 0..run.count {
        match udp_socket(run, false, &mut rec) {
            Ok(socket) => {
                let first = match udp_exchange(&socket, run.addr, &format!("flow {i} round 1\n")) {
                    Ok(backend) => Some(backend),
                    Err(failure) => {
                        rec.failure(failure, Duration::ZERO);
                        None
                    }
                };
                flows.push((socket, first));
            }
            Err(failure) => rec.failure(failure, Duration::ZERO),
        }
    }
    if let Err(e) = std::fs::write(ready_file, b"") {
        rec.failure(Failure::io("write the ready file", e), Duration::ZERO);
        return rec.finish();
    }
    while !go_file.exists() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    for (i, (socket, first)) in flows.iter().enumerate() {
        let started = Instant::now();
        match udp_exchange(socket, run.addr, &format!("flow {i} round 2\n")) {
            Ok(backend) => {
                if let Some(first) = first.as_ref().filter(|f| **f != backend) {
                    *rec.report.moved.entry(format!("{first}->{backend}")).or_default() += 1;
                }
                rec.success(&backend, started.elapsed());
            }
            Err(failure) => rec.failure(failure, started.elapsed()),
        }
    }
    rec.finish()
}

/// Raises the soft limit of open files to the hard one (as Go programs do at start) and
/// returns it.
fn raise_nofile_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, ..limit };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            limit = raised;
        }
    }
    limit.rlim_cur as u64
}

fn flood(run: RunArgs) -> Report {
    let mut rec = Recorder::new();
    let deadline = rec.start + Duration::from_millis(run.max_ms);
    // Beyond what the limit of open files allows, the oldest sockets are closed as new ones
    // open (as a process cycling through short-lived sockets does).
    let room = (raise_nofile_limit().saturating_sub(64) as usize).max(1);
    let mut held = std::collections::VecDeque::with_capacity((run.count as usize).min(room));
    for _ in 0..run.count {
        if held.len() >= room {
            held.pop_front();
        }
        if Instant::now() >= deadline {
            *rec.report.errors.entry("NotAttempted".into()).or_default() += 1;
            continue;
        }
        let started = Instant::now();
        let socket = UdpSocket::bind("0.0.0.0:0")
            .map_err(|e| Failure::io("bind", e))
            .and_then(|s| s.connect(run.addr).map(|()| s).map_err(|e| Failure::io("connect", e)));
        match socket {
            Ok(socket) => {
                rec.report.ok += 1;
                rec.connect_ms.push(ms(started.elapsed()));
                rec.peer(socket.peer_addr());
                held.push_back(socket);
            }
            Err(failure) => rec.failure(failure, started.elapsed()),
        }
    }
    drop(held);
    rec.finish()
}
