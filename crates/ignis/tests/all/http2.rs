//! HTTP/2 limits on the wire (raw frames, so nothing on the client side
//! hides what the server does): the settings it advertises are the
//! configured ones and it enforces the stream cap; the rapid-reset and
//! CONTINUATION floods end in GOAWAY without hurting other connections; an
//! oversized header list is refused.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const REFUSED_STREAM: u32 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK literal field without indexing, new name, no Huffman.
fn field(block: &mut Vec<u8>, name: &str, value: &str) {
    for s in [name, value] {
        assert!(s.len() < 127);
        block.push(s.len() as u8);
        block.extend_from_slice(s.as_bytes());
    }
}

fn literal(block: &mut Vec<u8>, name: &str, value: &str) {
    block.push(0x00);
    field(block, name, value);
}

fn request_block(method: &str, path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    for (n, v) in [
        (":method", method),
        (":scheme", "http"),
        (":path", path),
        (":authority", "a.test"),
    ] {
        literal(&mut block, n, v);
    }
    block
}

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// A client speaking raw HTTP/2 frames.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
    /// The server's SETTINGS, by identifier.
    settings: Vec<(u16, u32)>,
    /// Its connection window increment, if it sent one before its first ACK.
    connection_increment: Option<u32>,
}

impl Raw {
    /// Connects, sends the preface and empty SETTINGS, reads the server's
    /// SETTINGS (and a connection WINDOW_UPDATE) and acknowledges them.
    async fn connect(addr: SocketAddr) -> Raw {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        s.write_all(&hello).await.unwrap();
        let mut raw = Raw {
            s,
            buf: Vec::new(),
            settings: Vec::new(),
            connection_increment: None,
        };
        loop {
            let f = raw.read().await.expect("server settings");
            match (f.kind, f.flags) {
                (SETTINGS, 0) => {
                    raw.settings = f
                        .payload
                        .chunks(6)
                        .map(|c| {
                            (
                                u16::from_be_bytes([c[0], c[1]]),
                                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                            )
                        })
                        .collect();
                    raw.s
                        .write_all(&frame(SETTINGS, ACK, 0, &[]))
                        .await
                        .unwrap();
                }
                (WINDOW_UPDATE, _) if f.stream == 0 => {
                    raw.connection_increment =
                        Some(u32::from_be_bytes(f.payload[..4].try_into().unwrap()));
                }
                (SETTINGS, ACK) => return raw,
                _ => {}
            }
        }
    }

    fn setting(&self, id: u16) -> Option<u32> {
        self.settings
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, v)| *v)
    }

    /// The next frame, or `None` once the server closed (at most 20 s).
    async fn read(&mut self) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(f) = frames(&self.buf).into_iter().next() {
                self.buf.drain(..9 + f.payload.len());
                return Some(f);
            }
            let mut chunk = [0u8; 65536];
            let n = tokio::time::timeout_at(deadline, self.s.read(&mut chunk))
                .await
                .expect("the server neither answered nor closed");
            match n {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads until a frame of `kind` (returned) or the end of the connection.
    async fn until(&mut self, kind: u8, stream: Option<u32>) -> Option<Frame> {
        while let Some(f) = self.read().await {
            if f.kind == kind && stream.is_none_or(|s| s == f.stream) {
                return Some(f);
            }
        }
        None
    }
}

/// The whole frames in `buf`.
fn frames(mut buf: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    while buf.len() >= 9 {
        let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
        if buf.len() < 9 + len {
            break;
        }
        out.push(Frame {
            kind: buf[3],
            flags: buf[4],
            stream: u32::from_be_bytes(buf[5..9].try_into().unwrap()) & 0x7fff_ffff,
            payload: buf[9..9 + len].to_vec(),
        });
        buf = &buf[9 + len..];
    }
    out
}

fn error_code(f: &Frame) -> u32 {
    let at = if f.kind == GOAWAY { 4 } else { 0 };
    u32::from_be_bytes(f.payload[at..at + 4].try_into().unwrap())
}

fn manifest(http2: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ncache_dir = \"{}\"\nmax_header_bytes = \"8KiB\"\n[server.http2]\n{http2}\n[functions.echo]\ncomponent = \"{}\"\n[functions.hello]\ncomponent = \"{}\"\n[[routes]]\npath = \"/echo\"\nfunction = \"echo\"\n[[routes]]\npath = \"/hello\"\nfunction = \"hello\"\n",
        shared_cache(),
        wasm("echo"),
        wasm("hello")
    )
}

impl Raw {
    /// GET /hello on `stream`: answered 200.
    async fn hello(&mut self, stream: u32) {
        self.s
            .write_all(&frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                stream,
                &request_block("GET", "/hello"),
            ))
            .await
            .unwrap();
        let f = self.until(HEADERS, Some(stream)).await.expect("a response");
        // :status 200 is index 8 of the static table.
        assert_eq!(f.payload.first(), Some(&0x88), "{:?}", f.payload);
    }
}

/// The server still serves a new HTTP/2 connection.
async fn still_serves(addr: SocketAddr) {
    Raw::connect(addr).await.hello(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advertised_settings_are_the_configured_limits_and_extra_streams_are_refused() {
    let server = TestServer::start_full(&manifest(
        "max_concurrent_streams = 4\nstream_window = \"128KiB\"\nconnection_window = \"4MiB\"\n",
    ))
    .await;
    let mut raw = Raw::connect(server.addr).await;
    assert_eq!(raw.setting(0x3), Some(4), "{:?}", raw.settings);
    assert_eq!(raw.setting(0x4), Some(128 * 1024), "{:?}", raw.settings);
    assert_eq!(raw.setting(0x6), Some(8 * 1024), "{:?}", raw.settings);
    let increment = match raw.connection_increment {
        Some(i) => i,
        None => {
            let f = raw
                .until(WINDOW_UPDATE, Some(0))
                .await
                .expect("a connection window");
            u32::from_be_bytes(f.payload[..4].try_into().unwrap())
        }
    };
    assert_eq!(increment, (4 << 20) - 65_535);
    // Four POSTs whose bodies never come hold four streams; the fifth is refused.
    let mut bytes = Vec::new();
    for stream in [1, 3, 5, 7, 9] {
        bytes.extend(frame(
            HEADERS,
            END_HEADERS,
            stream,
            &request_block("POST", "/echo"),
        ));
    }
    raw.s.write_all(&bytes).await.unwrap();
    let reset = raw.until(RST_STREAM, None).await.expect("a refused stream");
    assert_eq!((reset.stream, error_code(&reset)), (9, REFUSED_STREAM));
    drop(raw);
    still_serves(server.addr).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_flood_gets_goaway_and_others_are_served() {
    let server = TestServer::start_full(&manifest("max_pending_resets = 20\n")).await;
    let hello = server.function("hello").stats().clone();
    let mut raw = Raw::connect(server.addr).await;
    let mut flood = Vec::new();
    for i in 0..2_000u32 {
        let stream = 1 + 2 * i;
        flood.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            stream,
            &request_block("GET", "/hello"),
        ));
        flood.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()));
    }
    // The server may stop reading part-way: a write error is fine.
    let _ = raw.s.write_all(&flood).await;
    let goaway = raw.until(GOAWAY, None).await.expect("GOAWAY");
    assert_eq!(error_code(&goaway), ENHANCE_YOUR_CALM);
    // Then the server closes the connection (`read` fails the test after
    // 20 s if it does not).
    while raw.read().await.is_some() {}
    let served = hello.requests.load(std::sync::atomic::Ordering::Relaxed);
    assert!(served < 2_000, "{served} of the reset streams ran a guest");
    still_serves(server.addr).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_cut_off_and_others_are_served() {
    let server = TestServer::start_full(&manifest("")).await;
    let raw = Raw::connect(server.addr).await;
    let Raw { s, mut buf, .. } = raw;
    let (mut read, mut write) = s.into_split();
    // A header block that never ends: HEADERS without END_HEADERS, then
    // CONTINUATION frames of junk header bytes, 64 MiB in all.
    let writer = tokio::spawn(async move {
        let mut block = request_block("GET", "/hello");
        literal(&mut block, "x-a", "b");
        write
            .write_all(&frame(HEADERS, 0, 1, &block))
            .await
            .map_err(|e| e.to_string())?;
        let mut chunk = Vec::new();
        while chunk.len() < 16_000 {
            literal(&mut chunk, "x-flood", &"v".repeat(100));
        }
        let continuation = frame(CONTINUATION, 0, 1, &chunk);
        let mut sent = 0usize;
        while sent < 64 << 20 {
            write
                .write_all(&continuation)
                .await
                .map_err(|e| format!("{e} after {sent} bytes"))?;
            sent += continuation.len();
        }
        Ok::<usize, String>(sent)
    });
    // The server answers with GOAWAY (or just closes) long before the end.
    let mut chunk = [0u8; 65536];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(20), read.read(&mut chunk))
            .await
            .expect("the server neither answered nor closed");
        match n {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let goaway = frames(&buf).into_iter().find(|f| f.kind == GOAWAY);
    let sent = writer.await.unwrap();
    assert!(
        sent.is_err(),
        "the server read all 64 MiB of one header block"
    );
    let goaway = goaway.expect("a GOAWAY before the close");
    assert_eq!(error_code(&goaway), ENHANCE_YOUR_CALM);
    still_serves(server.addr).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_header_list_is_refused_and_the_connection_serves_on() {
    let server = TestServer::start_full(&manifest("")).await;
    let hello = server.function("hello").stats().clone();
    let mut raw = Raw::connect(server.addr).await;
    let mut block = request_block("GET", "/hello");
    for _ in 0..100 {
        literal(&mut block, "x-big", &"v".repeat(100));
    }
    assert!(block.len() > 8 * 1024 && block.len() < 16_384);
    raw.s
        .write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &block))
        .await
        .unwrap();
    let f = loop {
        let f = raw.read().await.expect("an answer");
        if f.stream == 1 && (f.kind == HEADERS || f.kind == RST_STREAM) || f.kind == GOAWAY {
            break f;
        }
    };
    match f.kind {
        // :status 431 (not in HPACK's static table: a literal value, plain
        // or Huffman-coded, 0x69 0x90 0xff being "431").
        HEADERS => assert!(
            f.payload
                .windows(3)
                .any(|w| w == b"431" || w == [0x69, 0x90, 0xff]),
            "{:?}",
            f.payload
        ),
        RST_STREAM => {}
        _ => panic!("the whole connection went away: {:?}", f.payload),
    }
    assert_eq!(
        hello.requests.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the guest ran"
    );
    // The same connection serves the next stream.
    raw.hello(3).await;
    drop(raw);
    server.shutdown().await;
}
