//! The HTTP/2 link between nodes, on the `h2` crate itself rather than
//! hyper's client and server.
//!
//! Why: a forward is a small request and a small answer, and on this
//! two-core machine its cost was task hand-offs, not computation (a
//! profile put 55% of the forwarding node's time in the kernel's
//! scheduler; docs/perf/2026-11-30-cluster.md). Hyper's HTTP/2 client
//! passes each request from the caller's task to a dispatch task, then
//! to the connection task, and the answer back through a per-request
//! task; its server spawns a task per stream. Here:
//! - the forwarding node's request task opens the stream and writes its
//!   frames itself, and the connection task (which owns the socket) wakes
//!   it once, when the answer has arrived;
//! - the owner answers every stream inside the connection's own task (the
//!   streams of one connection are polled together with it), so the only
//!   hand-off left on that side is the one every message makes, to the
//!   actor's activation and back.
//!
//! - each connection thread of the edge (`ignis_edge::PerThread`)
//!   has its own connection to each peer, driven on that thread: a
//!   current-thread runtime polls its reactor only on its own thread, so
//!   a forward sent on another thread's connection woke that thread twice
//!   (to write the request, to hand the answer back).
//!
//! Invariants:
//! - One connection per peer address and connection thread (plus one for
//!   every other thread), opened on first use and forgotten when it ends
//!   (error, peer gone, a keep-alive ping unanswered for
//!   [`KEEP_ALIVE_TIMEOUT`], or its runtime shut down); the maps hold only
//!   live connections.
//! - Bodies are read with flow control released as they are consumed and
//!   a byte limit; every stream and header list is bounded by the
//!   settings below.
//! - Connection-specific headers (RFC 9113 §8.2.2) never go on the wire:
//!   the sender strips them from requests and answers.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::{Ping, PingPong, Reason, RecvStream};
use http::{HeaderMap, Request, Response};
use ignis_edge::PerThread;
use tokio::net::TcpStream;

/// A ping goes out on an idle or busy connection this often...
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(10);
/// ...and a connection whose peer does not answer it within this is
/// dropped (a node that vanished without closing its sockets).
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Opening a connection to a peer takes at most this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection to the internal listener finishes its preface within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams one connection carries at once (the owner's setting; past it,
/// the forwarding node's requests wait in h2's queue for a free stream).
pub const MAX_STREAMS: u32 = 256;
/// Largest header list either side accepts.
pub const MAX_HEADER_LIST: u32 = 64 << 10;
/// Flow-control windows: a forwarded message of up to a megabyte goes in
/// one flight.
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 8 << 20;

/// Headers that are about one connection, not the message (RFC 9113
/// §8.2.2 forbids them in HTTP/2; h2 refuses to send them).
const CONNECTION_HEADERS: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
];

/// Removes the connection-specific headers (and `Host`, which HTTP/2
/// carries as `:authority`) from `headers`.
pub fn strip_connection_headers(headers: &mut HeaderMap) {
    for name in CONNECTION_HEADERS {
        headers.remove(name);
    }
    headers.remove(http::header::HOST);
}

/// Why a forward failed.
#[derive(Debug)]
pub enum LinkError {
    /// Nothing reached the owner's actor: the connection could not be
    /// made, was gone before the stream opened, or the owner refused the
    /// stream unprocessed. Safe to retry.
    NotSent(String),
    /// The stream was open when the link broke: the owner may have run the
    /// message.
    Broken(h2::Error),
    /// The answer was longer than the limit.
    TooLarge,
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::NotSent(why) => write!(f, "not sent: {why}"),
            LinkError::Broken(e) => write!(f, "link broke: {e}"),
            LinkError::TooLarge => f.write_str("answer too large"),
        }
    }
}

impl std::error::Error for LinkError {}

/// Why a body could not be read.
#[derive(Debug)]
pub enum BodyError {
    TooLarge,
    Stream(h2::Error),
}

/// Reads a whole body, releasing flow control as it goes; at most `limit`
/// bytes.
pub async fn read_body(body: &mut RecvStream, limit: usize) -> Result<Bytes, BodyError> {
    let mut first: Option<Bytes> = None;
    let mut more = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(BodyError::Stream)?;
        let n = chunk.len();
        body.flow_control()
            .release_capacity(n)
            .map_err(BodyError::Stream)?;
        let have = first.as_ref().map_or(0, Bytes::len) + more.len();
        if have + n > limit {
            return Err(BodyError::TooLarge);
        }
        match &first {
            None if more.is_empty() => first = Some(chunk),
            _ => {
                if let Some(f) = first.take() {
                    more.extend_from_slice(&f);
                }
                more.extend_from_slice(&chunk);
            }
        }
    }
    Ok(first.unwrap_or_else(|| more.freeze()))
}

/// Resolves when the peer has not answered a ping for
/// [`KEEP_ALIVE_TIMEOUT`]; never if the connection has no ping handle or
/// fails otherwise (its own future reports that).
async fn keep_alive(ping: Option<PingPong>) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEP_ALIVE_EVERY).await;
        match tokio::time::timeout(KEEP_ALIVE_TIMEOUT, ping.ping(Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}

type Sender = h2::client::SendRequest<Bytes>;
/// One thread's connections: peer address -> (connection id, handle).
type Conns = Mutex<HashMap<String, (u64, Sender)>>;

/// The forwarding side: one HTTP/2 connection per peer address and
/// connection thread.
pub struct Peers {
    /// One map per connection thread, and one for every other thread.
    conns: PerThread<Conns>,
    next: AtomicU64,
}

impl Default for Peers {
    fn default() -> Peers {
        Peers {
            conns: PerThread::new(Mutex::default),
            next: AtomicU64::new(0),
        }
    }
}

/// Forgets its connection when dropped: when the connection's task ends,
/// or is dropped with its runtime (connection threads end with the last
/// listener).
struct ForgetOnDrop {
    peers: std::sync::Weak<Peers>,
    list: usize,
    address: String,
    id: u64,
}

impl Drop for ForgetOnDrop {
    fn drop(&mut self) {
        if let Some(peers) = self.peers.upgrade() {
            peers.forget(self.list, &self.address, self.id);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Peers {
    /// This thread's connection to `address`, opened (and driven on this
    /// thread) if there is none.
    async fn sender(
        self: &Arc<Self>,
        list: usize,
        address: &str,
    ) -> Result<(u64, Sender), LinkError> {
        if let Some(s) = lock(&self.conns[list]).get(address) {
            return Ok(s.clone());
        }
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(LinkError::NotSent(format!("connecting to {address}: {e}"))),
            Err(_) => {
                return Err(LinkError::NotSent(format!(
                    "connecting to {address} took over {CONNECT_TIMEOUT:?}"
                )));
            }
        };
        let _ = stream.set_nodelay(true);
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|e| LinkError::NotSent(format!("HTTP/2 handshake with {address}: {e}")))?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        // Another task may have connected meanwhile: the first one stays,
        // this one closes once its handle is dropped.
        let chosen = lock(&self.conns[list])
            .entry(address.to_string())
            .or_insert((id, send))
            .clone();
        let ping = conn.ping_pong();
        let forget = ForgetOnDrop {
            peers: Arc::downgrade(self),
            list,
            address: address.to_string(),
            id,
        };
        // On the current runtime: this connection thread's own.
        tokio::spawn(async move {
            let address = &forget.address;
            tokio::select! {
                r = &mut conn => if let Err(e) = r {
                    tracing::debug!(peer = %address, error = %e, "cluster connection ended");
                },
                () = keep_alive(ping) => {
                    tracing::warn!(peer = %address, "a cluster peer stopped answering pings; its connection is dropped");
                }
            }
            drop(forget);
        });
        Ok(chosen)
    }

    fn forget(&self, list: usize, address: &str, id: u64) {
        let mut conns = lock(&self.conns[list]);
        if conns.get(address).is_some_and(|(i, _)| *i == id) {
            conns.remove(address);
        }
    }

    /// Sends `request` with `body` to `address` and reads the answer (at
    /// most `limit` bytes of body). The request's URI must be absolute and
    /// its headers free of connection-specific ones.
    pub async fn request(
        self: &Arc<Self>,
        address: &str,
        request: Request<()>,
        body: Bytes,
        limit: usize,
    ) -> Result<Response<Bytes>, LinkError> {
        let list = self.conns.index_here();
        let (id, send) = self.sender(list, address).await?;
        let not_sent = |e: h2::Error| {
            self.forget(list, address, id);
            LinkError::NotSent(format!("the connection to {address} is gone: {e}"))
        };
        let mut send = send.ready().await.map_err(not_sent)?;
        let end = body.is_empty();
        let (answer, mut stream) = send.send_request(request, end).map_err(not_sent)?;
        if !end {
            stream.send_data(body, true).map_err(LinkError::Broken)?;
        }
        let answer = answer.await.map_err(|e| match e.reason() {
            Some(Reason::REFUSED_STREAM) => {
                LinkError::NotSent(format!("{address} refused the stream: {e}"))
            }
            _ => LinkError::Broken(e),
        })?;
        let (parts, mut body) = answer.into_parts();
        let body = read_body(&mut body, limit).await.map_err(|e| match e {
            BodyError::TooLarge => LinkError::TooLarge,
            BodyError::Stream(e) => LinkError::Broken(e),
        })?;
        Ok(Response::from_parts(parts, body))
    }
}

/// Serves one connection to the internal listener: every stream is
/// answered by `handle`, polled inside this task together with the
/// connection. Returns when the peer closes, the connection fails or stops
/// answering pings.
pub async fn serve<F, Fut>(io: TcpStream, handle: F)
where
    F: Fn(Request<RecvStream>) -> Fut,
    Fut: Future<Output = Response<Bytes>>,
{
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake::<_, Bytes>(io);
    let mut conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "cluster listener: HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("cluster listener: no HTTP/2 preface in time");
            return;
        }
    };
    let keep_alive = keep_alive(conn.ping_pong());
    tokio::pin!(keep_alive);
    let mut streams = FuturesUnordered::new();
    loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((request, mut respond))) => {
                    let answer = handle(request);
                    streams.push(async move {
                        let (mut parts, body) = answer.await.into_parts();
                        strip_connection_headers(&mut parts.headers);
                        let end = body.is_empty();
                        match respond.send_response(Response::from_parts(parts, ()), end) {
                            Ok(mut stream) if !end => {
                                if let Err(e) = stream.send_data(body, true) {
                                    tracing::debug!(error = %e, "cluster listener: answer not sent");
                                }
                            }
                            Ok(_) => {}
                            Err(e) => tracing::debug!(error = %e, "cluster listener: answer not sent"),
                        }
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "cluster listener: connection failed");
                    return;
                }
                None => break,
            },
            Some(()) = streams.next(), if !streams.is_empty() => {}
            () = &mut keep_alive => {
                tracing::warn!("a cluster peer stopped answering pings; its connection is dropped");
                return;
            }
        }
    }
    // The peer is closing: finish what it already sent, then flush.
    while !streams.is_empty() {
        tokio::select! {
            _ = streams.next() => {}
            _ = std::future::poll_fn(|cx| conn.poll_closed(cx)) => return,
        }
    }
    let _ = std::future::poll_fn(|cx| conn.poll_closed(cx)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A connection is driven by the runtime that opened it; when that
    /// runtime ends (connection threads end with the last listener), the
    /// connection is forgotten and the next forward opens a new one. Fails
    /// before `ForgetOnDrop`: the task that forgot the connection was
    /// dropped with its runtime before reaching that line, the map kept the
    /// dead connection, and every later forward to the peer was refused
    /// as not sent.
    #[test]
    fn a_connection_whose_runtime_ended_is_replaced() {
        let server = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = server
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let address = listener.local_addr().unwrap().to_string();
        server.spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                tokio::spawn(serve(io, |_req| async {
                    Response::new(Bytes::from_static(b"answered"))
                }));
            }
        });
        let peers = Arc::new(Peers::default());
        let forward = |peers: Arc<Peers>, address: String| async move {
            let request = Request::builder()
                .uri(format!("http://{address}/"))
                .body(())
                .unwrap();
            peers.request(&address, request, Bytes::new(), 1024).await
        };
        for round in 0..3 {
            let runtime = current_thread();
            let answer = runtime
                .block_on(forward(peers.clone(), address.clone()))
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(answer.body().as_ref(), b"answered");
            drop(runtime);
            assert!(
                peers.conns.here_first().all(|m| lock(m).is_empty()),
                "round {round}: the connection outlived its runtime in the map"
            );
        }
    }
}
