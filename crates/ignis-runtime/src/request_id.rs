//! Request ids and W3C trace context.
//!
//! A request id is a UUIDv7: 48 bits of Unix milliseconds, then 74 bits
//! that are a per-process random seed plus a counter. Ids therefore sort
//! by time, never repeat within a process (the counter), and collide across
//! restarts or nodes only if two processes drew the same 74-bit seed.
//! Making one costs an atomic add and a clock read: no system call for
//! randomness per request (the seed is drawn once).
//!
//! Each request also carries a trace context (`traceparent`, W3C Trace
//! Context level 1): the trace of a valid incoming `traceparent`, or a new
//! trace whose id is the request id; and a span id of its own, which is the
//! parent id passed on to guests, origins and outbound calls.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderName, HeaderValue};
use uuid::Uuid;

/// The field that carries a request's id (on requests passed on, on
/// responses, and from a trusted proxy).
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The W3C trace context's field.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// One request's id and trace context. Cheap to copy.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId {
    /// Unique in the process, even when `id` was taken from a trusted
    /// proxy (which may send the same id twice): what maps key on.
    seq: u64,
    id: u128,
    trace_id: u128,
    span_id: u64,
    /// The span id of an incoming `traceparent` (0: this request started
    /// its trace).
    parent_span_id: u64,
    flags: u8,
}

struct Seed {
    low: u64,
    high: u16,
    span: u64,
}

fn seed() -> &'static Seed {
    static SEED: OnceLock<Seed> = OnceLock::new();
    SEED.get_or_init(|| {
        let bits = Uuid::new_v4().as_u128();
        Seed {
            low: bits as u64,
            high: (bits >> 64) as u16,
            span: (bits >> 80) as u64 ^ 0x9e37_79b9_7f4a_7c15,
        }
    })
}

fn next() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A bijection on u64 (splitmix64's finaliser): distinct inputs give
/// distinct span ids.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestId {
    /// A fresh id starting a new trace.
    pub fn new() -> RequestId {
        let seed = seed();
        let n = next();
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut random = [0u8; 10];
        random[..2].copy_from_slice(&seed.high.to_be_bytes());
        random[2..].copy_from_slice(&seed.low.wrapping_add(n).to_be_bytes());
        let id = uuid::Builder::from_unix_timestamp_millis(millis, &random)
            .into_uuid()
            .as_u128();
        RequestId {
            seq: n,
            id,
            trace_id: id,
            span_id: mix(seed.span ^ n).max(1),
            parent_span_id: 0,
            flags: 0,
        }
    }

    /// The id for a request that arrived with these headers: its
    /// `x-request-id` if `trust_id` (the peer is a trusted proxy) and it is
    /// a UUID (any version, not nil), else a fresh one; in the trace of its
    /// `traceparent` if that is valid, else a new trace.
    pub fn for_request(headers: &http::HeaderMap, trust_id: bool) -> RequestId {
        let mut id = RequestId::new();
        if trust_id
            && let Some(given) = headers
                .get(&X_REQUEST_ID)
                .and_then(|v| Uuid::try_parse_ascii(v.as_bytes()).ok())
                .filter(|u| !u.is_nil())
        {
            id.id = given.as_u128();
            id.trace_id = id.id;
        }
        if let Some((trace_id, parent, flags)) = headers
            .get(&TRACEPARENT)
            .and_then(|v| parse_traceparent(v.as_bytes()))
        {
            id.trace_id = trace_id;
            id.parent_span_id = parent;
            id.flags = flags;
        }
        id
    }

    /// Whether the request continues a trace from a valid incoming
    /// `traceparent`.
    pub fn continues_trace(&self) -> bool {
        self.parent_span_id != 0
    }

    /// Whether the trace is sampled (the `traceparent` flag passed on).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The same id with the trace's sampled flag set or cleared (a node
    /// that records traces decides for the traces it starts).
    pub fn with_sampled(mut self, sampled: bool) -> RequestId {
        self.flags = (self.flags & !1) | u8::from(sampled);
        self
    }

    /// This request's span id (the parent id it passes on).
    pub fn span_id(&self) -> u64 {
        self.span_id
    }

    /// The span id of the incoming `traceparent`, if any.
    pub fn parent_span_id(&self) -> Option<u64> {
        (self.parent_span_id != 0).then_some(self.parent_span_id)
    }

    /// A number unique to this request in this process (the id itself
    /// may repeat if a trusted proxy sent it twice): key maps on this.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The id as a UUID.
    pub fn as_u128(&self) -> u128 {
        self.id
    }

    /// The id as a header value (the hyphenated UUID). Written into a
    /// buffer on the stack (no formatting machinery): every request makes
    /// one or two of these.
    pub fn header(&self) -> HeaderValue {
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let text = Uuid::from_u128(self.id).hyphenated().encode_lower(&mut buf);
        HeaderValue::from_str(text).expect("a UUID is a valid header value")
    }

    /// The `traceparent` to pass on: this request's trace, with its own
    /// span as the parent (`00-{trace:032x}-{span:016x}-{flags:02x}`).
    pub fn traceparent(&self) -> HeaderValue {
        let mut buf = [0u8; 55];
        buf[..3].copy_from_slice(b"00-");
        hex(&mut buf[3..35], self.trace_id);
        buf[35] = b'-';
        hex(&mut buf[36..52], u128::from(self.span_id));
        buf[52] = b'-';
        hex(&mut buf[53..55], u128::from(self.flags));
        HeaderValue::from_bytes(&buf).expect("hex is a valid header value")
    }

    /// The trace id (32 hex digits in `traceparent`).
    pub fn trace_id(&self) -> u128 {
        self.trace_id
    }
}

/// Writes the low `out.len() * 4` bits of `value` into `out` as lowercase
/// hex, most significant digit first.
fn hex(out: &mut [u8], mut value: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in out.iter_mut().rev() {
        *b = DIGITS[(value & 0xf) as usize];
        value >>= 4;
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Uuid::from_u128(self.id).hyphenated().fmt(f)
    }
}

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// `(trace id, parent id, flags)` of a valid `traceparent` (W3C Trace Context:
/// `VERSION-TRACEID-PARENTID-FLAGS`, lowercase hex; version `ff` and
/// all-zero ids are invalid; a version above 00 may append fields).
fn parse_traceparent(v: &[u8]) -> Option<(u128, u64, u8)> {
    let hex = |s: &[u8]| -> Option<u128> {
        if s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            u128::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
        } else {
            None
        }
    };
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = hex(&v[..2])?;
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let trace_id = hex(&v[3..35])?;
    let parent_id = hex(&v[36..52])?;
    let flags = hex(&v[53..55])? as u8;
    (trace_id != 0 && parent_id != 0).then_some((trace_id, parent_id as u64, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_uuid_v7_distinct_and_time_ordered() {
        let a = RequestId::new();
        let b = RequestId::new();
        assert_ne!(a.as_u128(), b.as_u128());
        let ua = Uuid::from_u128(a.as_u128());
        assert_eq!(ua.get_version_num(), 7);
        assert!(a.to_string() < b.to_string() || a.to_string()[..13] == b.to_string()[..13]);
        assert_eq!(a.to_string().len(), 36);
        assert_ne!(a.span_id, b.span_id);
    }

    #[test]
    fn header_values_match_their_formatted_text() {
        // The header values are encoded by hand (no `format!` per
        // request); they must say exactly what the formatted forms say.
        for id in [RequestId::new(), RequestId::new().with_sampled(true)] {
            assert_eq!(id.header(), id.to_string().as_str());
            let expected = format!(
                "00-{:032x}-{:016x}-{:02x}",
                id.trace_id, id.span_id, id.flags
            );
            assert_eq!(id.traceparent(), expected.as_str());
        }
        let mut buf = [0u8; 6];
        hex(&mut buf, 0xab_cdef_0123);
        assert_eq!(
            &buf, b"ef0123",
            "only the low digits, most significant first"
        );
    }

    #[test]
    fn an_incoming_id_is_kept_only_when_trusted_and_a_uuid() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "x-request-id",
            HeaderValue::from_static("0190f3a2-7c4e-7d1a-9b2c-3d4e5f607182"),
        );
        let kept = RequestId::for_request(&h, true);
        assert_eq!(kept.to_string(), "0190f3a2-7c4e-7d1a-9b2c-3d4e5f607182");
        assert_ne!(
            RequestId::for_request(&h, false).to_string(),
            kept.to_string()
        );
        for bad in [
            "not-a-uuid",
            "00000000-0000-0000-0000-000000000000",
            "0190f3a2-7c4e-7d1a-9b2c-3d4e5f607182\\n",
        ] {
            h.insert("x-request-id", HeaderValue::from_str(bad).unwrap());
            assert_ne!(RequestId::for_request(&h, true).to_string(), bad);
        }
    }

    #[test]
    fn traceparent_is_continued_when_valid_and_restarted_otherwise() {
        let mut h = http::HeaderMap::new();
        let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert("traceparent", HeaderValue::from_static(given));
        let id = RequestId::for_request(&h, false);
        let out = id.traceparent();
        let out = out.to_str().unwrap();
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{out}"
        );
        assert!(out.ends_with("-01"));
        assert_ne!(&out[36..52], "00f067aa0ba902b7", "our hop has its own span");
        assert_eq!(id.parent_span_id(), Some(0x00f0_67aa_0ba9_02b7));
        assert!(id.sampled() && id.continues_trace());
        assert!(!id.with_sampled(false).sampled());
        assert!(
            id.with_sampled(false)
                .traceparent()
                .to_str()
                .unwrap()
                .ends_with("-00")
        );
        let fresh = RequestId::new();
        assert_eq!(fresh.parent_span_id(), None);
        assert!(!fresh.sampled() && fresh.with_sampled(true).sampled());
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            h.insert("traceparent", HeaderValue::from_static(bad));
            let id = RequestId::for_request(&h, false);
            assert_eq!(id.trace_id(), id.as_u128(), "{bad} must start a new trace");
        }
        // A later version may append fields.
        h.insert(
            "traceparent",
            HeaderValue::from_static("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz"),
        );
        assert_eq!(
            RequestId::for_request(&h, false).trace_id(),
            0x4bf92f3577b34da6a3ce929d0e0e4736
        );
    }
}
