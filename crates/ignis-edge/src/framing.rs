//! A request-head scanner in front of hyper's HTTP/1 parser: the framing
//! leniencies RFC 9112 allows a recipient but that a proxy must not pass
//! on are refused before hyper sees the request.
//!
//! hyper merges a repeated identical `Content-Length` into one and accepts
//! a bare LF as a line end. Neither can split a request while hyper is the
//! only parser, but Ignis forwards requests to origins, and two parsers
//! that read one request two ways are what request smuggling needs. So
//! every HTTP/1 request head is held here until it is complete, checked,
//! and only then handed to hyper:
//! - a bare LF anywhere in the head, or more than one `Content-Length`
//!   field, is refused: hyper gets a request line it rejects, so the client
//!   gets hyper's 400 and the connection closes (the bytes of the bad head
//!   never reach hyper, and nothing after them is read);
//! - to find the next head the scanner follows each body's framing
//!   (`Content-Length`, or chunked with its size lines and trailers),
//!   handing body bytes on as they come (no body is buffered);
//! - it steps aside for what is not HTTP/1 framing: an HTTP/2 connection
//!   (ALPN, or the h2c preface), and a connection upgraded by a 101 (seen
//!   on the write side after a request that asked for an upgrade);
//! - what it cannot follow (an unparsable length or chunk size, a head
//!   longer than `limit`) it leaves to hyper, which refuses it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What hyper is fed instead of a refused head: a method with a NUL, which
/// its parser answers with 400 and a close.
const REFUSED: &[u8] = b"\0 / HTTP/1.1\r\n\r\n";

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Where the scanner is in the byte stream.
#[derive(Debug, PartialEq)]
enum State {
    /// Collecting a request head.
    Head,
    /// Inside a body of known length: this many bytes left.
    Fixed(u64),
    /// A chunk-size line.
    ChunkSize,
    /// Chunk data: this many bytes left, then CRLF.
    ChunkData(u64),
    /// The line end after chunk data.
    ChunkEnd,
    /// Trailer lines, until an empty one.
    Trailers,
    /// Not scanning (HTTP/2, upgraded, refused or given up).
    Off,
}

/// An HTTP/1 server connection whose request heads are checked before
/// hyper reads them.
pub(crate) struct Framed<IO> {
    inner: IO,
    state: State,
    /// Read from the connection, not yet classified.
    pending: Vec<u8>,
    /// Classified, for hyper to read.
    ready: Vec<u8>,
    ready_at: usize,
    /// The current line (chunk size, trailer) or head.
    line: Vec<u8>,
    /// Longest head collected before giving up to hyper (which answers 431).
    limit: usize,
    /// The connection's first bytes are still to be seen.
    first: bool,
    /// The last request asked for an upgrade: a 101 turns scanning off.
    upgrade_asked: bool,
    /// Nothing more is read: a head was refused.
    refused: bool,
    /// Where reads land before they are classified (allocated and zeroed
    /// once, on the first read).
    scratch: Vec<u8>,
}

impl<IO> Framed<IO> {
    /// Scans `inner` (heads up to `limit` bytes are checked).
    pub(crate) fn new(inner: IO, limit: usize) -> Self {
        Framed {
            inner,
            state: State::Head,
            pending: Vec::new(),
            ready: Vec::new(),
            ready_at: 0,
            line: Vec::new(),
            limit,
            first: true,
            upgrade_asked: false,
            refused: false,
            scratch: Vec::new(),
        }
    }

    /// Passes `inner` through untouched (an HTTP/2 connection).
    pub(crate) fn off(inner: IO) -> Self {
        let mut framed = Self::new(inner, 0);
        framed.state = State::Off;
        framed
    }

    /// Classifies what was read: body bytes and checked heads move to
    /// `ready`; a partial head or line waits in `line`.
    fn classify(&mut self) {
        let mut input = std::mem::take(&mut self.pending);
        let mut at = 0;
        while at < input.len() {
            match self.state {
                State::Off => {
                    self.ready.extend_from_slice(&input[at..]);
                    at = input.len();
                }
                State::Fixed(left) | State::ChunkData(left) => {
                    // Body bytes (a whole body, or one chunk's data).
                    let n = (left as usize).min(input.len() - at);
                    self.ready.extend_from_slice(&input[at..at + n]);
                    at += n;
                    let left = left - n as u64;
                    self.state = match (&self.state, left) {
                        (State::Fixed(_), 0) => State::Head,
                        (State::Fixed(_), left) => State::Fixed(left),
                        (_, 0) => State::ChunkEnd,
                        (_, left) => State::ChunkData(left),
                    };
                }
                State::ChunkSize | State::ChunkEnd | State::Trailers => {
                    // Line by line, passed on as read.
                    let end = input[at..].iter().position(|&b| b == b'\n');
                    let stop = end.map_or(input.len(), |e| at + e + 1);
                    self.ready.extend_from_slice(&input[at..stop]);
                    self.line.extend_from_slice(&input[at..stop]);
                    at = stop;
                    if end.is_none() {
                        if self.line.len() > 4096 {
                            // Not a chunk line hyper will accept either.
                            self.state = State::Off;
                        }
                        continue;
                    }
                    let line = std::mem::take(&mut self.line);
                    let text = line.strip_suffix(b"\n").unwrap_or(&line);
                    let text = text.strip_suffix(b"\r").unwrap_or(text);
                    self.state = match self.state {
                        State::ChunkEnd => State::ChunkSize,
                        State::Trailers if text.is_empty() => State::Head,
                        State::Trailers => State::Trailers,
                        _ => match chunk_size(text) {
                            Some(0) => State::Trailers,
                            Some(n) => State::ChunkData(n),
                            None => State::Off,
                        },
                    };
                }
                State::Head => {
                    // Blank lines before a request line are ignored (RFC
                    // 9112 section 2.2), as hyper does.
                    if self.line.is_empty() {
                        while at < input.len() && matches!(input[at], b'\r' | b'\n') {
                            self.ready.push(input[at]);
                            at += 1;
                        }
                        if at == input.len() {
                            break;
                        }
                    }
                    let before = self.line.len();
                    self.line.extend_from_slice(&input[at..]);
                    at = input.len();
                    if self.first && self.line.len() >= PREFACE.len().min(4) {
                        self.first = false;
                        if PREFACE.starts_with(&self.line[..self.line.len().min(PREFACE.len())]) {
                            // h2c by prior knowledge: not ours to scan.
                            let line = std::mem::take(&mut self.line);
                            self.ready.extend_from_slice(&line);
                            self.state = State::Off;
                            continue;
                        }
                    }
                    let Some(end) = head_end(&self.line, before.saturating_sub(3)) else {
                        if self.line.len() > self.limit {
                            // Hyper answers 431.
                            let line = std::mem::take(&mut self.line);
                            self.ready.extend_from_slice(&line);
                            self.state = State::Off;
                        }
                        continue;
                    };
                    let mut line = std::mem::take(&mut self.line);
                    let rest = line.split_off(end);
                    match check_head(&line) {
                        Err(why) => {
                            tracing::debug!(reason = why, "request head refused");
                            self.ready.extend_from_slice(REFUSED);
                            self.refused = true;
                            self.state = State::Off;
                            return;
                        }
                        Ok(head) => {
                            self.ready.extend_from_slice(&line);
                            self.upgrade_asked = head.upgrade;
                            self.state = head.body;
                        }
                    }
                    // The buffer is kept for the next head.
                    line.clear();
                    self.line = line;
                    // What followed the head is classified next.
                    input = rest;
                    at = 0;
                }
            }
        }
        // The buffer is kept for the next read.
        input.clear();
        if self.pending.capacity() < input.capacity() {
            self.pending = input;
        }
    }
}

/// Where a head ends (just past its blank line), searching from `from`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        if buf[i] == b'\n' {
            // "\n\n" or "\n\r\n".
            if buf.get(i + 1) == Some(&b'\n') {
                return Some(i + 2);
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

/// What a checked head says about what follows it.
struct Head {
    body: State,
    upgrade: bool,
}

/// Checks a complete head: no bare LF, at most one `Content-Length`; and
/// reads its body framing.
fn check_head(head: &[u8]) -> Result<Head, &'static str> {
    for (i, &b) in head.iter().enumerate() {
        if b == b'\n' && (i == 0 || head[i - 1] != b'\r') {
            return Err("a bare LF in the request head");
        }
    }
    let mut lengths = 0u32;
    let mut length = None;
    let mut chunked = None;
    let mut upgrade = false;
    for line in head.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        let value = line[colon + 1..].trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths += 1;
            length = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok());
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = true;
        }
    }
    if lengths > 1 {
        return Err("more than one Content-Length");
    }
    let body = match (chunked, lengths, length) {
        (Some(true), _, _) => State::ChunkSize,
        // Hyper refuses these; nothing more to follow.
        (Some(false), _, _) | (None, 1.., None) => State::Off,
        (None, _, Some(0)) | (None, 0, _) => State::Head,
        (None, _, Some(n)) => State::Fixed(n),
    };
    Ok(Head { body, upgrade })
}

/// A chunk-size line's size (extensions after `;` ignored).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.split(|&b| b == b';').next()?.trim_ascii();
    let digits = std::str::from_utf8(digits).ok()?;
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

impl<IO: AsyncRead + Unpin> AsyncRead for Framed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.ready_at < this.ready.len() {
                let n = (this.ready.len() - this.ready_at).min(buf.remaining());
                buf.put_slice(&this.ready[this.ready_at..this.ready_at + n]);
                this.ready_at += n;
                if this.ready_at == this.ready.len() {
                    this.ready.clear();
                    this.ready_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.refused {
                // Nothing after a refused head is read.
                return Poll::Ready(Ok(()));
            }
            if this.state == State::Off && this.line.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            if this.scratch.is_empty() {
                this.scratch = vec![0; 8192];
            }
            let mut read = ReadBuf::new(&mut this.scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    // End of stream: hand on whatever was held back (hyper
                    // sees an incomplete message).
                    let held = std::mem::take(&mut this.line);
                    this.ready.extend_from_slice(&held);
                    if this.ready.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    this.state = State::Off;
                }
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    this.pending.extend_from_slice(&this.scratch[..n]);
                    this.classify();
                }
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> Framed<IO> {
    /// A response to a request that asked for an upgrade: a 101 means the
    /// connection stops being HTTP/1, and the bytes held back are not a head.
    fn saw_write(&mut self, first: &[u8]) {
        if self.upgrade_asked && first.starts_with(b"HTTP/1.1 101") {
            self.upgrade_asked = false;
            let held = std::mem::take(&mut self.line);
            self.ready.extend_from_slice(&held);
            self.state = State::Off;
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Framed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.saw_write(buf);
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            let first: &[u8] = first;
            self.saw_write(first);
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns what hyper would read.
    fn scan(input: &[u8], step: usize) -> Vec<u8> {
        let mut f = Framed::new((), 16 * 1024);
        for piece in input.chunks(step) {
            if f.refused {
                break;
            }
            f.pending.extend_from_slice(piece);
            f.classify();
        }
        f.ready
    }

    #[test]
    fn good_requests_pass_byte_for_byte_whatever_the_read_sizes() {
        let pipelined: &[u8] = b"\r\nPOST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
            POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n0\r\nx-trailer: 1\r\n\r\n\
            GET /c HTTP/1.1\r\nHost: a\r\n\r\n";
        for step in [1, 2, 3, 7, 64, 4096] {
            assert_eq!(scan(pipelined, step), pipelined, "step {step}");
        }
    }

    #[test]
    fn body_bytes_that_look_like_bad_heads_are_not_heads() {
        // A body containing a bare LF and two Content-Length lines is data.
        let body = b"x\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
        let mut req = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        req.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        for step in [1, 5, 4096] {
            assert_eq!(scan(&req, step), req, "step {step}");
        }
    }

    #[test]
    fn bare_lf_and_repeated_content_length_are_refused() {
        let cases: [&[u8]; 4] = [
            b"GET / HTTP/1.1\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\n\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nHost: a\r\ncontent-length : 5\r\nContent-Length: 5\r\n\r\nhello",
        ];
        for case in cases {
            for step in [1, 4096] {
                assert_eq!(
                    scan(case, step),
                    REFUSED,
                    "{}",
                    String::from_utf8_lossy(case)
                );
            }
        }
        // A good request before the bad one goes through; nothing after.
        let mut two = b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        let good = two.len();
        two.extend_from_slice(b"GET /bad HTTP/1.1\nHost: a\r\n\r\nGET /after HTTP/1.1\r\n\r\n");
        let mut want = two[..good].to_vec();
        want.extend_from_slice(REFUSED);
        assert_eq!(scan(&two, 4096), want);
    }

    #[test]
    fn http2_prior_knowledge_and_oversized_heads_are_left_alone() {
        let preface =
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00bare\nLF";
        assert_eq!(scan(preface, 4096), preface);
        assert_eq!(scan(preface, 1), preface);
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 20_000));
        assert_eq!(scan(&big, 4096), big);
    }
}
