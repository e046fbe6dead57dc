//! A minimal blocking HTTP/1.1 client for tests: one request per connection, `Content-Length`,
//! chunked or read-to-close bodies, and line-by-line reading of a chunked stream (a watch).
//! Used to scrape the agent's `/healthz` and `/metrics` and to test the fake apiserver with
//! plain requests. The `_in` variants connect from inside a network namespace (the socket is
//! made there, see [`crate::topology::in_netns`]), e.g. to the node namespace's 127.0.0.1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// A complete response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("the body is not JSON: {:?}", self.text()))
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn connect(netns: Option<&Path>, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let connect = || {
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connecting to {addr}"))
    };
    let stream = match netns {
        Some(path) => crate::topology::in_netns(path, connect)
            .and_then(|r| r)
            .with_context(|| format!("in netns {}", path.display()))?,
        None => connect()?,
    };
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn send_request(
    stream: &mut TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
) -> Result<()> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kproxy-xtask\r\n\
         Accept: application/json, */*\r\nConnection: close\r\n"
    );
    if let Some((content_type, bytes)) = body {
        head.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            bytes.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some((_, bytes)) = body {
        stream.write_all(bytes)?;
    }
    stream.flush()?;
    Ok(())
}

fn read_head(reader: &mut impl BufRead) -> Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .context("reading the status line")?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {line:?}"))?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).context("reading headers")? == 0 {
            bail!("connection closed inside the headers");
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Ok((status, headers))
}

/// Reads one chunk; `None` at the final (empty) chunk.
fn read_chunk(reader: &mut impl BufRead) -> Result<Option<Vec<u8>>> {
    let mut size_line = String::new();
    if reader.read_line(&mut size_line)? == 0 {
        bail!(ChunkedAborted);
    }
    let size_text = size_line.trim().split(';').next().unwrap_or("");
    let size = usize::from_str_radix(size_text, 16)
        .map_err(|_| anyhow!("bad chunk size line {size_line:?}"))?;
    if size == 0 {
        // Trailers (none expected), then the blank line.
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
        }
        return Ok(None);
    }
    let mut data = vec![0; size];
    reader.read_exact(&mut data).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => anyhow!(ChunkedAborted),
        _ => anyhow!(e),
    })?;
    let mut crlf = [0; 2];
    reader
        .read_exact(&mut crlf)
        .map_err(|_| anyhow!(ChunkedAborted))?;
    Ok(Some(data))
}

/// The connection closed in the middle of a chunked body (no final chunk).
#[derive(Debug)]
pub struct ChunkedAborted;

impl std::fmt::Display for ChunkedAborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the connection closed in the middle of a chunked body")
    }
}

impl std::error::Error for ChunkedAborted {}

/// Sends one request and reads the whole response, everything within `timeout`.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
    timeout: Duration,
) -> Result<Response> {
    request_in(None, addr, method, path, body, timeout)
}

/// [`request`] from inside the network namespace at `netns` (`None`: this process's own).
pub fn request_in(
    netns: Option<&Path>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
    timeout: Duration,
) -> Result<Response> {
    let what = format!("{method} http://{addr}{path}");
    let inner = || -> Result<Response> {
        let mut stream = connect(netns, addr, timeout)?;
        send_request(&mut stream, addr, method, path, body)?;
        let mut reader = BufReader::new(stream);
        let (status, headers) = read_head(&mut reader)?;
        let mut body = Vec::new();
        if header(&headers, "transfer-encoding").is_some_and(|t| t.contains("chunked")) {
            while let Some(chunk) = read_chunk(&mut reader)? {
                body.extend_from_slice(&chunk);
            }
        } else if let Some(len) = header(&headers, "content-length") {
            let len: usize = len.parse().context("bad content-length")?;
            body.resize(len, 0);
            reader.read_exact(&mut body)?;
        } else {
            reader.read_to_end(&mut body)?;
        }
        Ok(Response {
            status,
            headers,
            body,
        })
    };
    inner().with_context(|| what)
}

/// `GET path` (path and query, e.g. `/metrics`).
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response> {
    request(addr, "GET", path, None, timeout)
}

/// [`get`] from inside the network namespace at `netns`.
pub fn get_in(netns: &Path, addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response> {
    request_in(Some(netns), addr, "GET", path, None, timeout)
}

/// What [`LineStream::next`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamItem {
    /// One line, without its newline.
    Line(String),
    /// The body ended properly (final chunk).
    End,
    /// The connection closed without the final chunk.
    Aborted,
}

/// A streaming response read line by line (a Kubernetes watch).
pub struct LineStream {
    reader: BufReader<TcpStream>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    buffer: Vec<u8>,
    finished: Option<StreamItem>,
}

impl LineStream {
    /// Sends `GET path` and reads the response head within `timeout`.
    pub fn open(addr: SocketAddr, path: &str, timeout: Duration) -> Result<LineStream> {
        let mut stream = connect(None, addr, timeout)?;
        send_request(&mut stream, addr, "GET", path, None)?;
        let mut reader = BufReader::new(stream);
        let (status, headers) =
            read_head(&mut reader).with_context(|| format!("GET http://{addr}{path}"))?;
        Ok(LineStream {
            reader,
            status,
            headers,
            buffer: Vec::new(),
            finished: None,
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The next line, the end, or an abort; fails if nothing comes within `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Result<StreamItem> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=i).collect();
                return Ok(StreamItem::Line(
                    String::from_utf8_lossy(&line[..line.len() - 1]).into_owned(),
                ));
            }
            if let Some(done) = &self.finished {
                return Ok(done.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no line within {timeout:?}");
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            match read_chunk(&mut self.reader) {
                Ok(Some(data)) => self.buffer.extend_from_slice(&data),
                Ok(None) => self.finished = Some(StreamItem::End),
                Err(e) if e.is::<ChunkedAborted>() => self.finished = Some(StreamItem::Aborted),
                Err(e) => {
                    let io = e.downcast_ref::<std::io::Error>().map(|e| e.kind());
                    match io {
                        Some(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                            bail!("no line within {timeout:?}")
                        }
                        Some(
                            std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::BrokenPipe,
                        ) => self.finished = Some(StreamItem::Aborted),
                        _ => return Err(e),
                    }
                }
            }
        }
    }

    /// The next line parsed as JSON; fails on anything else.
    pub fn next_json(&mut self, timeout: Duration) -> Result<serde_json::Value> {
        match self.next(timeout)? {
            StreamItem::Line(line) => serde_json::from_str(&line)
                .with_context(|| format!("the line is not JSON: {line:?}")),
            other => bail!("expected a JSON line, got {other:?}"),
        }
    }
}
