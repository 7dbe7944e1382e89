//! Keep-alive HTTP/1.1 connections to one origin, driven by the request
//! that holds them.
//!
//! hyper-util's pooled client runs each origin connection in a task of its
//! own, so every proxied request crossed a channel into that task and its
//! response crossed back: two task wakeups, often across worker threads
//! (docs/perf/2026-11-30-proxy.md). Here a request takes an idle
//! connection out of the pool and polls hyper's connection future itself —
//! while it waits for the response head, then from the response body (the
//! edge's connection task polls that) — and puts it back once the body has
//! ended and the connection is ready for the next request. A connection
//! whose body is dropped early, or that the origin closed, is dropped.
//!
//! Idle connections are kept per connection thread (`crate::threads`), in
//! the list of the thread whose reactor the socket is registered with: a
//! request takes one of its own thread's first, so the origin's replies
//! wake the thread that waits for them and no other. Only when its own
//! list is empty does it take another thread's (cheaper than a new
//! connection). Work off the connection threads (a guest's outbound call
//! on a scheduler thread) has a list of its own.
//!
//! Invariants: at most `max_idle` idle connections are kept per list (as
//! nginx's `keepalive` is per worker), none older than `idle_timeout`; a
//! connection is in the pool or held by exactly one request; a connection
//! taken from the pool is polled once before use, so one the origin closed
//! while idle is seen closed and skipped.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use super::origin::{OriginStream, ProxyBody};
use crate::threads::PerThread;

type Conn = http1::Connection<TokioIo<OriginStream>, ProxyBody>;

/// One HTTP/1.1 connection: the handle that sends and the future that
/// does its I/O.
pub(crate) struct H1 {
    sender: http1::SendRequest<ProxyBody>,
    conn: Pin<Box<Conn>>,
    /// The connection future ended (closed or failed).
    done: bool,
    idle_since: Instant,
    /// The idle list it goes back to: that of the connection thread it
    /// was opened on (`None`: opened off the connection threads).
    home: Option<usize>,
}

impl H1 {
    /// A connection over `io` (already connected; TLS done).
    pub(crate) async fn handshake(io: OriginStream) -> hyper::Result<H1> {
        let (sender, conn) = http1::handshake(TokioIo::new(io)).await?;
        Ok(H1 {
            sender,
            conn: Box::pin(conn),
            done: false,
            idle_since: Instant::now(),
            home: crate::threads::current(),
        })
    }

    /// Lets the connection do its I/O; true while it is open.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.done && self.conn.as_mut().poll(cx).is_ready() {
            self.done = true;
        }
        !self.done
    }

    /// Sends `req` and drives the connection until the response head. If
    /// the connection closed before the request was written, the request
    /// comes back with the error (it may be sent on another connection).
    pub(crate) async fn send(
        &mut self,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, (hyper::Error, Option<Request<ProxyBody>>)> {
        let mut sent = std::pin::pin!(self.sender.try_send_request(req));
        let conn = &mut self.conn;
        let done = &mut self.done;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = sent.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            if !*done && conn.as_mut().poll(cx).is_ready() {
                // Closed: the request future fails on its next poll.
                *done = true;
                return sent.as_mut().poll(cx);
            }
            Poll::Pending
        })
        .await
        .map_err(|mut e| {
            let unsent = e.take_message();
            (e.into_error(), unsent)
        })
    }

    /// Whether it can take another request now.
    fn reusable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.drive(&mut cx) && self.sender.is_ready()
    }
}

/// The idle connections of one origin.
pub(crate) struct Pool {
    /// One list per connection thread, and one for every other thread.
    idle: PerThread<Mutex<Vec<H1>>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Pool {
    pub(crate) fn new(max_idle: usize, idle_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            idle: PerThread::new(Mutex::default),
            max_idle,
            idle_timeout,
        })
    }

    /// The most recently used idle connection that is still open: one of
    /// this thread's, else one of another's.
    pub(crate) fn take(&self) -> Option<H1> {
        self.idle.here_first().find_map(|list| self.take_from(list))
    }

    fn take_from(&self, list: &Mutex<Vec<H1>>) -> Option<H1> {
        loop {
            let mut conn = list.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
            if conn.idle_since.elapsed() < self.idle_timeout && conn.reusable() {
                return Some(conn);
            }
            // Stale or closed by the origin: dropped.
        }
    }

    /// Keeps `conn` for the next request if it is reusable and there is
    /// room in its thread's list.
    pub(crate) fn give_back(&self, mut conn: H1) {
        if !conn.reusable() {
            return;
        }
        let now = Instant::now();
        conn.idle_since = now;
        let list = &self.idle[self.idle.index_of(conn.home)];
        let mut idle = list.lock().unwrap_or_else(|p| p.into_inner());
        // The oldest go first when the pool is full or they have expired
        // (one clock read for all: this runs once per proxied request, over
        // up to `max_idle` connections).
        idle.retain(|c| now.saturating_duration_since(c.idle_since) < self.idle_timeout);
        if idle.len() >= self.max_idle {
            if self.max_idle == 0 {
                return;
            }
            idle.remove(0);
        }
        idle.push(conn);
    }
}

/// A response body from an origin that drives its connection while it is
/// read and returns the connection to the pool when it has ended.
pub(crate) struct Driven {
    inner: Incoming,
    conn: Option<H1>,
    pool: Arc<Pool>,
}

impl Driven {
    pub(crate) fn new(inner: Incoming, conn: H1, pool: Arc<Pool>) -> Driven {
        Driven {
            inner,
            conn: Some(conn),
            pool,
        }
    }

    /// The body has ended: one more turn of the connection lets it finish
    /// the exchange, then it goes back to the pool.
    fn release(&mut self, cx: &mut Context<'_>) {
        if let Some(mut conn) = self.conn.take()
            && conn.drive(cx)
        {
            self.pool.give_back(conn);
        }
    }
}

impl Drop for Driven {
    fn drop(&mut self) {
        // A body nobody read to its end (a HEAD, a 204) that is complete
        // still leaves a reusable connection; any other is dropped.
        if self.inner.is_end_stream() {
            let mut cx = Context::from_waker(Waker::noop());
            self.release(&mut cx);
        }
    }
}

impl Body for Driven {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(conn) = &mut this.conn {
            conn.drive(cx);
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.release(cx);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
