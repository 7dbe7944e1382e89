//! Connection bounds: how many connections the node and one client address
//! may hold, and how long a connection may sit without doing useful work.
//!
//! Invariants:
//! - At most `max_connections` connections are open; at the cap the accept
//!   loop waits for one to close (new clients wait in the kernel's backlog
//!   instead of taking file descriptors).
//! - At most `max_connections_per_ip` are open from one client address
//!   (IPv6 counted per /64, which one client typically owns whole); past it a
//!   new connection is closed at once. The per-address map only has entries
//!   for open connections, so it is bounded by `max_connections`.
//! - Every connection is watched by [`Watch`]: closed if it brought no
//!   request by `header_read_timeout`, drained (HTTP/2 `GOAWAY`, HTTP/1.1
//!   close) after `idle_timeout` with no request in flight, and closed if a
//!   response has had data ready for the client and the client has taken
//!   none of it for `write_idle_timeout` (an h2 stream with a zero window,
//!   or a client that stopped reading its socket).
//!
//! "Ready for the client" is tracked per response: after the body hands
//! hyper a frame, the ball is in the client's court until hyper polls the
//! body again; a body that answers `Pending` (the guest has not written yet)
//! is waiting on the guest, which is not the client's fault and is bounded
//! by the guest's own wall time.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use ignis_config::ServerConfig;

use crate::observe::Exchange;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The node's connection caps.
pub(crate) struct Caps {
    total: Arc<Semaphore>,
    max_total: u32,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    max_per_ip: u32,
}

/// One open connection's share of the caps; released on drop.
pub(crate) struct Slot {
    caps: Arc<Caps>,
    key: IpAddr,
    _permit: OwnedSemaphorePermit,
}

impl Caps {
    pub(crate) fn new(config: &ServerConfig) -> Arc<Caps> {
        Arc::new(Caps {
            total: Arc::new(Semaphore::new(config.max_connections as usize)),
            max_total: config.max_connections,
            per_ip: Mutex::new(HashMap::new()),
            max_per_ip: config.max_connections_per_ip,
        })
    }

    /// Waits until the node may hold one more connection.
    pub(crate) async fn reserve(&self) -> OwnedSemaphorePermit {
        self.total
            .clone()
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed")
    }

    /// Waits until every connection has closed (for shutdown).
    pub(crate) async fn all_closed(&self) {
        let _all = self
            .total
            .acquire_many(self.max_total)
            .await
            .expect("the connection semaphore is never closed");
    }

    /// Admits a connection from `peer` with the node-wide `permit`, or
    /// `None` if that address already holds its share.
    pub(crate) fn admit(
        self: &Arc<Self>,
        peer: IpAddr,
        permit: OwnedSemaphorePermit,
    ) -> Option<Slot> {
        let key = client_key(peer);
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let held = per_ip.entry(key).or_insert(0);
        if *held >= self.max_per_ip {
            return None;
        }
        *held += 1;
        Some(Slot {
            caps: self.clone(),
            key,
            _permit: permit,
        })
    }

    #[cfg(test)]
    fn tracked_addresses(&self) -> usize {
        self.per_ip.lock().unwrap().len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per_ip = self.caps.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = per_ip.get_mut(&self.key) {
            *held -= 1;
            if *held == 0 {
                per_ip.remove(&self.key);
            }
        }
    }
}

/// The address a per-client cap is counted against: the IPv4 address, or
/// the /64 of an IPv6 one (IPv4-mapped addresses count as IPv4).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// A response body's state, shared with its connection's [`Watch`]:
/// [`WAITING_ON_GUEST`], or the millisecond (since the connection opened)
/// at which it last handed data to hyper.
type Progress = AtomicU64;

const WAITING_ON_GUEST: u64 = u64::MAX;

/// What a connection is doing, as its task needs to know to close it.
pub(crate) struct Watch {
    opened: Instant,
    served: AtomicBool,
    in_flight: AtomicUsize,
    /// Millisecond at which `in_flight` last dropped to zero.
    idle_since: AtomicU64,
    responses: Mutex<Vec<Weak<Progress>>>,
    limits: WatchLimits,
}

/// The timeouts a [`Watch`] enforces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WatchLimits {
    pub(crate) first_request: Duration,
    pub(crate) idle: Duration,
    pub(crate) write_idle: Duration,
}

impl WatchLimits {
    pub(crate) fn new(config: &ServerConfig) -> Self {
        WatchLimits {
            first_request: config.header_read_timeout,
            idle: config.idle_timeout,
            write_idle: config.write_idle_timeout,
        }
    }
}

/// What the connection task should do now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing yet; look again at this instant.
    Wait(Instant),
    /// No request in flight for `idle_timeout`: close gracefully.
    Drain,
    /// Close now, for this reason.
    Close(&'static str),
}

impl Watch {
    pub(crate) fn new(limits: WatchLimits) -> Arc<Watch> {
        Arc::new(Watch {
            opened: Instant::now(),
            served: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            responses: Mutex::new(Vec::new()),
            limits,
        })
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.opened + Duration::from_millis(ms)
    }

    /// A request arrived; the guard keeps it in flight until its response
    /// body is done (or the request is dropped).
    pub(crate) fn request(self: &Arc<Self>) -> InFlight {
        self.served.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight {
            watch: self.clone(),
        }
    }

    /// Wraps a response body so the watch sees whether the client takes it.
    pub(crate) fn track<B: Body>(
        &self,
        body: B,
        in_flight: InFlight,
        exchange: Exchange,
    ) -> Tracked<B> {
        let progress = Arc::new(AtomicU64::new(self.now_ms()));
        let mut responses = self.responses.lock().unwrap_or_else(|p| p.into_inner());
        responses.retain(|w| w.strong_count() > 0);
        responses.push(Arc::downgrade(&progress));
        Tracked {
            inner: body,
            progress,
            in_flight,
            exchange: Some(exchange),
            ended: false,
        }
    }

    /// Decides what to do at `now`.
    pub(crate) fn verdict(&self, now: Instant) -> Verdict {
        let now_ms = now.saturating_duration_since(self.opened).as_millis() as u64;
        let limits = &self.limits;
        if !self.served.load(Ordering::Relaxed) {
            let by = limits.first_request.as_millis() as u64;
            if now_ms >= by {
                return Verdict::Close("no request within header_read_timeout");
            }
            return Verdict::Wait(self.at(by));
        }
        let mut next = now_ms + limits.idle.as_millis() as u64;
        if self.in_flight.load(Ordering::SeqCst) == 0 {
            let idle_until =
                self.idle_since.load(Ordering::SeqCst) + limits.idle.as_millis() as u64;
            if now_ms >= idle_until {
                return Verdict::Drain;
            }
            next = next.min(idle_until);
        }
        let write_idle = limits.write_idle.as_millis() as u64;
        let responses = self.responses.lock().unwrap_or_else(|p| p.into_inner());
        for progress in responses.iter().filter_map(Weak::upgrade) {
            let handed = progress.load(Ordering::Relaxed);
            if handed == WAITING_ON_GUEST {
                continue;
            }
            let stalled_at = handed + write_idle;
            if now_ms >= stalled_at {
                return Verdict::Close(
                    "the client took no response data within write_idle_timeout",
                );
            }
            next = next.min(stalled_at);
        }
        Verdict::Wait(self.at(next))
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
}

/// Keeps a request counted as in flight on its connection.
pub(crate) struct InFlight {
    watch: Arc<Watch>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.watch.now_ms();
        self.watch.idle_since.store(now, Ordering::SeqCst);
        self.watch.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body whose progress its connection's [`Watch`] can see.
pub(crate) struct Tracked<B: Body> {
    inner: B,
    progress: Arc<Progress>,
    in_flight: InFlight,
    /// The request's record, ended when this body is dropped.
    exchange: Option<Exchange>,
    /// Whether the body reported its end.
    ended: bool,
}

impl<B: Body> Drop for Tracked<B> {
    fn drop(&mut self) {
        if let Some(exchange) = self.exchange.take() {
            exchange.end(self.ended || self.inner.is_end_stream());
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let state = match &polled {
            Poll::Pending => WAITING_ON_GUEST,
            Poll::Ready(ready) => {
                match ready {
                    Some(Ok(frame)) => {
                        if let (Some(data), Some(x)) = (frame.data_ref(), &mut self.exchange) {
                            x.sent(data.len());
                        }
                    }
                    None => self.ended = true,
                    Some(Err(_)) => {}
                }
                self.in_flight.watch.now_ms()
            }
        };
        self.progress.store(state, Ordering::Relaxed);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> ServerConfig {
        let mut config = ignis_config::Manifest::from_str_at("", std::path::Path::new("t.toml"))
            .expect("an empty manifest is valid")
            .server;
        config.max_connections = 3;
        config.max_connections_per_ip = 2;
        config
    }

    #[tokio::test]
    async fn per_address_cap_counts_ipv6_per_64_and_forgets_closed_addresses() {
        let caps = Caps::new(&server());
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let first = caps.admit(a, caps.reserve().await).expect("first admitted");
        let second = caps
            .admit(b, caps.reserve().await)
            .expect("second admitted");
        // Same /64: the third is refused (its node-wide permit comes back).
        assert!(caps.admit(a, caps.reserve().await).is_none());
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let third = caps
            .admit(v4, caps.reserve().await)
            .expect("another address");
        assert_eq!(caps.tracked_addresses(), 2);
        // The node-wide cap (3) is full: reserving waits.
        assert!(
            tokio::time::timeout(Duration::from_millis(1), caps.reserve())
                .await
                .is_err()
        );
        drop((first, second));
        assert_eq!(caps.tracked_addresses(), 1);
        let again = caps
            .admit(mapped, caps.reserve().await)
            .expect("mapped v4 counts as v4");
        assert!(caps.admit(v4, caps.reserve().await).is_none());
        drop((third, again));
        assert_eq!(caps.tracked_addresses(), 0);
        caps.all_closed().await;
    }

    const LIMITS: WatchLimits = WatchLimits {
        first_request: Duration::from_secs(2),
        idle: Duration::from_secs(10),
        write_idle: Duration::from_secs(5),
    };

    #[tokio::test]
    async fn verdicts_follow_first_request_idle_and_write_idle() {
        let watch = Watch::new(LIMITS);
        let start = watch.opened;
        let s = |secs| start + Duration::from_secs(secs);
        assert_eq!(watch.verdict(start), Verdict::Wait(s(2)));
        assert_eq!(
            watch.verdict(s(2)),
            Verdict::Close("no request within header_read_timeout")
        );

        let watch = Watch::new(LIMITS);
        let start = watch.opened;
        let s = |secs| start + Duration::from_secs(secs);
        let body = http_body_util::Full::new(Bytes::from_static(b"x"));
        let mut tracked = watch.track(body, watch.request(), Exchange::detached());
        // Handed to hyper when the response was made (about 0 ms) and not
        // polled since: the client has until about 5 s.
        let Verdict::Wait(by) = watch.verdict(start) else {
            panic!("a fresh response is not stalled");
        };
        assert!(by >= s(5) && by < s(6), "{:?}", by - start);
        // As if hyper last took data at 3 s: the clock restarts there.
        tracked.progress.store(3000, Ordering::Relaxed);
        assert_eq!(watch.verdict(s(7)), Verdict::Wait(s(8)));
        assert_eq!(
            watch.verdict(s(8)),
            Verdict::Close("the client took no response data within write_idle_timeout")
        );
        // A poll that hands out a frame records the time it happened.
        let frame = std::future::poll_fn(|cx| Pin::new(&mut tracked).poll_frame(cx)).await;
        assert!(frame.is_some());
        assert!(tracked.progress.load(Ordering::Relaxed) < 1000);
        assert_eq!(watch.in_flight(), 1);
        drop(tracked);
        assert_eq!(watch.in_flight(), 0);
        // Idle since about 0 s: drained at about 10 s, not before.
        assert!(matches!(watch.verdict(s(9)), Verdict::Wait(at) if at >= s(10)));
        assert_eq!(watch.verdict(s(11)), Verdict::Drain);
    }

    #[tokio::test]
    async fn a_body_waiting_on_its_guest_is_not_stalled() {
        let watch = Watch::new(LIMITS);
        let start = watch.opened;
        let mut tracked = watch.track(
            http_body_util::Empty::<Bytes>::new(),
            watch.request(),
            Exchange::detached(),
        );
        tracked.progress.store(WAITING_ON_GUEST, Ordering::Relaxed);
        // Waiting on the guest for a minute: only the idle recheck is due.
        let later = start + Duration::from_secs(60);
        assert_eq!(
            watch.verdict(later),
            Verdict::Wait(later + Duration::from_secs(10))
        );
        let end = std::future::poll_fn(|cx| Pin::new(&mut tracked).poll_frame(cx)).await;
        assert!(end.is_none());
        assert_ne!(tracked.progress.load(Ordering::Relaxed), WAITING_ON_GUEST);
    }
}
