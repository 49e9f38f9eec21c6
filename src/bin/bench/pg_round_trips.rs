//! Counting PostgreSQL round trips: a TCP proxy between Parley and PostgreSQL that forwards every
//! byte untouched and reads the frontend protocol on the way. A round trip is a message after which
//! the client waits for the server's `ReadyForQuery`: a `Sync` (extended protocol: sqlx sends
//! Bind/Execute/Sync per query, plus Parse/Describe/Sync the first time a connection prepares a
//! statement) or a `Query` (simple protocol). This counts exactly what crosses the wire, whatever
//! the code paths; Parley must connect with `sslmode=disable` so that the stream is readable.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// The codes of the startup packets after which another startup packet follows.
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

struct Counts {
    /// Frontend messages by type byte.
    by_type: [AtomicU64; 256],
    connections: AtomicU64,
}

impl Default for Counts {
    fn default() -> Self {
        Self { by_type: std::array::from_fn(|_| AtomicU64::new(0)), connections: AtomicU64::new(0) }
    }
}

impl Counts {
    fn get(&self, kind: u8) -> u64 {
        self.by_type[kind as usize].load(Ordering::Relaxed)
    }
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoundTrips {
    /// `Sync` + `Query` messages: each one waits for the server.
    pub round_trips: u64,
    /// `Parse` messages: statements prepared (once per connection and statement with sqlx's cache).
    pub parses: u64,
    /// Connections opened through the proxy.
    pub connections: u64,
    /// `Execute` messages: statements run with the extended protocol.
    pub executes: u64,
}

impl std::ops::Sub for RoundTrips {
    type Output = RoundTrips;
    fn sub(self, earlier: RoundTrips) -> RoundTrips {
        RoundTrips {
            round_trips: self.round_trips.saturating_sub(earlier.round_trips),
            parses: self.parses.saturating_sub(earlier.parses),
            connections: self.connections.saturating_sub(earlier.connections),
            executes: self.executes.saturating_sub(earlier.executes),
        }
    }
}

pub struct PgRoundTripCounter {
    pub addr: SocketAddr,
    counts: Arc<Counts>,
    task: JoinHandle<()>,
}

impl PgRoundTripCounter {
    /// Listens on a free loopback port and forwards each connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Counts::default());
        let shared = counts.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counts = shared.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        counts.connections.fetch_add(1, Ordering::Relaxed);
                        relay(client, server, &counts).await;
                    }
                });
            }
        });
        Ok(Self { addr, counts, task })
    }

    pub fn now(&self) -> RoundTrips {
        let c = &self.counts;
        RoundTrips {
            round_trips: c.get(b'S') + c.get(b'Q'),
            parses: c.get(b'P'),
            connections: c.connections.load(Ordering::Relaxed),
            executes: c.get(b'E'),
        }
    }
}

impl Drop for PgRoundTripCounter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, server: TcpStream, counts: &Counts) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let downstream = async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    let upstream = async move {
        let mut framer = Framer::default();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            framer.feed(&buf[..n], counts);
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    tokio::join!(downstream, upstream);
}

/// Splits the client's byte stream into protocol messages: the startup packet (length, code), then
/// messages of one type byte and a length that counts itself.
struct Framer {
    startup: bool,
    header: [u8; 8],
    have: usize,
    /// Bytes of the current message's payload still to pass.
    skip: usize,
}

impl Default for Framer {
    fn default() -> Self {
        Self { startup: true, header: [0; 8], have: 0, skip: 0 }
    }
}

impl Framer {
    fn feed(&mut self, mut data: &[u8], counts: &Counts) {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let need = if self.startup { 8 } else { 5 };
            let n = (need - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have < need {
                continue;
            }
            self.have = 0;
            let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
            if self.startup {
                let (len, code) = (be(&self.header[0..4]), be(&self.header[4..8]) as u32);
                self.skip = len.saturating_sub(8);
                self.startup = code == SSL_REQUEST || code == GSSENC_REQUEST;
            } else {
                self.skip = be(&self.header[1..5]).saturating_sub(4);
                counts.by_type[self.header[0] as usize].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&((payload.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn syncs_and_queries_are_counted_however_the_stream_is_cut() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&12u32.to_be_bytes());
        stream.extend_from_slice(&196_608u32.to_be_bytes());
        stream.extend_from_slice(b"user");
        for _ in 0..3 {
            stream.extend(message(b'P', b"SELECT 1\0\0\0"));
            stream.extend(message(b'B', &[0; 10]));
            stream.extend(message(b'E', &[0; 5]));
            stream.extend(message(b'S', &[]));
        }
        stream.extend(message(b'Q', b"SELECT 1\0"));
        for chunk in [1, 3, 7, 4096] {
            let counts = Counts::default();
            let mut framer = Framer::default();
            for piece in stream.chunks(chunk) {
                framer.feed(piece, &counts);
            }
            assert_eq!(counts.get(b'S'), 3, "chunk {chunk}");
            assert_eq!(counts.get(b'Q'), 1, "chunk {chunk}");
            assert_eq!(counts.get(b'P'), 3, "chunk {chunk}");
            assert_eq!(counts.get(b'E'), 3, "chunk {chunk}");
        }
    }
}
