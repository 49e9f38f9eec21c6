//! The load generator: HTTP/1.1 keep-alive connections on raw TCP sockets, each sending
//! pre-built requests one after the other and timing each answer. It does as little as a client
//! can (no header map, no pooling layer, no per-request allocation beyond the response buffer), so
//! that on a 2-core machine it takes as little CPU as possible away from the server it measures,
//! and it costs the same whichever server it measures.
//!
//! Two ways to drive it: [`closed_loop`] (every connection sends its next request as soon as the
//! previous one is answered: the server's maximum rate at that concurrency) and [`paced`] (requests
//! start on a fixed schedule whatever the answers do: latency at a given rate).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::Barrier,
};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("a load task panicked or was cancelled: {0}")]
    Task(String),
}

/// What happened to one request.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// The request's index in the list given to the run.
    pub index: usize,
    /// When its first byte was written.
    pub sent: Instant,
    /// When its answer was completely read (or the connection failed).
    pub done: Instant,
    /// The HTTP status; 0 when the connection failed.
    pub status: u16,
    /// Paced runs: how long after its scheduled time the request started (timer granularity, or
    /// every connection busy). Zero in closed-loop runs.
    pub lag: Duration,
}

impl Outcome {
    pub fn latency(&self) -> Duration {
        self.done.duration_since(self.sent)
    }
}

/// A finished run: one outcome per request, in completion order.
#[derive(Debug)]
pub struct Run {
    pub outcomes: Vec<Outcome>,
    /// From the moment every connection was open to the last answer.
    pub elapsed: Duration,
}

impl Run {
    pub fn ok(&self) -> usize {
        self.outcomes.iter().filter(|o| o.status == 200).count()
    }

    pub fn errors(&self) -> usize {
        self.outcomes.len() - self.ok()
    }

    /// Answered requests per second.
    pub fn rate(&self) -> f64 {
        self.outcomes.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn latencies(&self) -> Vec<Duration> {
        self.outcomes.iter().map(Outcome::latency).collect()
    }

    /// The largest start lag of the 99 % least late requests (paced runs).
    pub fn lag_p99(&self) -> Duration {
        crate::latency::Distribution::new(self.outcomes.iter().map(|o| o.lag).collect()).p99()
    }
}

/// A `POST` request with its headers and body, ready to be written to a socket as is.
pub fn post_request(host: SocketAddr, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut head = format!("POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {}\r\n", body.len());
    for (name, value) in headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    request
}

/// Sends every request as fast as `connections` keep-alive connections allow.
pub async fn closed_loop(addr: SocketAddr, requests: Arc<Vec<Vec<u8>>>, connections: usize) -> Result<Run, LoadError> {
    run(addr, requests, connections, None).await
}

/// Starts request `i` at `i / rate` seconds after the start, on whichever of the `connections`
/// is free (open loop: a slow answer does not delay the requests behind it unless every
/// connection is busy, which shows in [`Outcome::lag`]).
pub async fn paced(
    addr: SocketAddr,
    requests: Arc<Vec<Vec<u8>>>,
    connections: usize,
    rate: f64,
) -> Result<Run, LoadError> {
    run(addr, requests, connections, Some(rate.max(1.0))).await
}

async fn run(
    addr: SocketAddr,
    requests: Arc<Vec<Vec<u8>>>,
    connections: usize,
    rate: Option<f64>,
) -> Result<Run, LoadError> {
    let connections = connections.clamp(1, requests.len().max(1));
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        streams.push(connect(addr).await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    // Every task starts its clock at the same instant, once all connections are open.
    let barrier = Arc::new(Barrier::new(connections + 1));
    let start_cell = Arc::new(std::sync::OnceLock::<Instant>::new());
    let mut tasks = Vec::with_capacity(connections);
    for stream in streams {
        let (requests, next, barrier, start_cell) =
            (requests.clone(), next.clone(), barrier.clone(), start_cell.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let start = *start_cell.get_or_init(Instant::now);
            drive(addr, stream, &requests, &next, start, rate).await
        }));
    }
    barrier.wait().await;
    let start = *start_cell.get_or_init(Instant::now);
    let mut outcomes = Vec::with_capacity(requests.len());
    for task in tasks {
        outcomes.extend(task.await.map_err(|e| LoadError::Task(e.to_string()))?);
    }
    let last = outcomes.iter().map(|o| o.done).max().unwrap_or(start);
    Ok(Run { outcomes, elapsed: last.duration_since(start) })
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, LoadError> {
    let stream = TcpStream::connect(addr).await.map_err(|source| LoadError::Connect { addr, source })?;
    // Requests are written in one piece: Nagle would only delay them.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// One connection's loop: takes the next request index, waits for its slot when paced, sends it
/// and reads the answer. A broken connection is reopened for the next request.
async fn drive(
    addr: SocketAddr,
    mut stream: TcpStream,
    requests: &[Vec<u8>],
    next: &AtomicUsize,
    start: Instant,
    rate: Option<f64>,
) -> Vec<Outcome> {
    let mut outcomes = Vec::with_capacity(requests.len() / 16 + 1);
    let mut buf = Vec::with_capacity(4096);
    loop {
        let index = next.fetch_add(1, Ordering::Relaxed);
        let Some(request) = requests.get(index) else { break };
        let mut lag = Duration::ZERO;
        if let Some(rate) = rate {
            let due = start + Duration::from_secs_f64(index as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
            lag = Instant::now().saturating_duration_since(due);
        }
        let sent = Instant::now();
        let status = match exchange(&mut stream, request, &mut buf).await {
            Ok(status) => status,
            Err(_) => {
                if let Ok(fresh) = connect(addr).await {
                    stream = fresh;
                }
                0
            }
        };
        outcomes.push(Outcome { index, sent, done: Instant::now(), status, lag });
    }
    outcomes
}

/// Writes one request and reads its whole answer; returns the status code.
async fn exchange(stream: &mut TcpStream, request: &[u8], buf: &mut Vec<u8>) -> std::io::Result<u16> {
    stream.write_all(request).await?;
    buf.clear();
    let (status, head_len, body_len) = loop {
        if let Some(parsed) = parse_head(buf)? {
            break parsed;
        }
        read_more(stream, buf).await?;
    };
    while buf.len() < head_len + body_len {
        read_more(stream, buf).await?;
    }
    Ok(status)
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// `(status, head length, body length)` once the head is complete. Only `content-length` bodies
/// are supported: both servers measured answer small bodies that way.
fn parse_head(buf: &[u8]) -> std::io::Result<Option<(u16, usize, usize)>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { return Ok(None) };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| invalid("the answer's head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| invalid("no status line"))?;
    let mut body_len = 0;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                body_len = value.trim().parse().map_err(|_| invalid("bad content-length"))?;
            } else if name.trim().eq_ignore_ascii_case("transfer-encoding") {
                return Err(invalid("chunked answers are not supported"));
            }
        }
    }
    Ok(Some((status, end + 4, body_len)))
}

fn invalid(what: &'static str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_head_is_read_once_complete_with_its_body_length() {
        let answer =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nContent-Length: 15\r\n\r\n{\"status\":\"ok\"}";
        assert!(parse_head(&answer[..20]).unwrap().is_none(), "incomplete head");
        let (status, head, body) = parse_head(answer).unwrap().unwrap();
        assert_eq!((status, body), (200, 15));
        assert_eq!(&answer[head..], br#"{"status":"ok"}"#);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
    }

    #[test]
    fn a_request_carries_its_headers_and_exact_length() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 8080));
        let request = post_request(addr, "/hook", &[("x-a", "1")], b"body");
        let text = String::from_utf8(request).unwrap();
        assert!(text.starts_with("POST /hook HTTP/1.1\r\nhost: 127.0.0.1:8080\r\ncontent-length: 4\r\n"));
        assert!(text.ends_with("x-a: 1\r\n\r\nbody"));
    }
}
