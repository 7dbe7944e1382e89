//! Guest stdout/stderr, captured line by line into the structured log.
//!
//! Each request gets its own capture, tagged with the function (or actor
//! class) name and the request id. Capture is bounded: past
//! [`MAX_CAPTURED_BYTES`] per request the rest is counted and dropped (the
//! guest's writes still succeed, so a chatty guest is never failed by its
//! logging), and one warning says how much. An actor's instance lives across
//! messages: [`GuestLog::begin`] starts each message's capture with its own
//! request id and its own budget.

use crate::RequestId;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Bytes of output kept per request and stream.
pub const MAX_CAPTURED_BYTES: usize = 64 * 1024;
/// Longest single line; longer lines are split.
const MAX_LINE: usize = 4096;

struct State {
    function: Arc<str>,
    request_id: RequestId,
    stream: &'static str,
    line: Vec<u8>,
    logged: usize,
    dropped: usize,
}

impl State {
    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        tracing::info!(target: "ignis::guest", function = %self.function, request_id = %self.request_id, stream = self.stream, "{}", text.trim_end_matches('\r'));
        self.line.clear();
    }

    fn write(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() {
            if self.logged >= MAX_CAPTURED_BYTES {
                self.dropped += buf.len();
                return;
            }
            let room = MAX_CAPTURED_BYTES - self.logged;
            let take = buf.len().min(room);
            let chunk = &buf[..take];
            match chunk.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    self.line.extend_from_slice(&chunk[..nl]);
                    self.logged += nl + 1;
                    self.emit();
                    buf = &buf[nl + 1..];
                }
                None => {
                    self.line.extend_from_slice(chunk);
                    self.logged += take;
                    if self.line.len() >= MAX_LINE {
                        self.emit();
                    }
                    buf = &buf[take..];
                }
            }
        }
    }
}

impl State {
    /// Flushes the partial line and reports what was dropped.
    fn finish(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
        if self.dropped > 0 {
            tracing::warn!(target: "ignis::guest", function = %self.function, request_id = %self.request_id, stream = self.stream, dropped_bytes = self.dropped, "guest output over the per-request log limit was dropped");
        }
        self.logged = 0;
        self.dropped = 0;
    }
}

impl Drop for State {
    fn drop(&mut self) {
        self.finish();
    }
}

/// One request's capture of one stream.
#[derive(Clone)]
pub(crate) struct LogCapture(Arc<Mutex<State>>);

impl LogCapture {
    pub(crate) fn new(function: Arc<str>, request_id: RequestId, stream: &'static str) -> Self {
        LogCapture(Arc::new(Mutex::new(State {
            function,
            request_id,
            stream,
            line: Vec::new(),
            logged: 0,
            dropped: 0,
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A guest's stdout and stderr captures: the host state of its log output.
pub(crate) struct GuestLog {
    pub(crate) stdout: LogCapture,
    pub(crate) stderr: LogCapture,
}

impl GuestLog {
    pub(crate) fn new(owner: Arc<str>, request_id: RequestId) -> GuestLog {
        GuestLog {
            stdout: LogCapture::new(owner.clone(), request_id, "stdout"),
            stderr: LogCapture::new(owner, request_id, "stderr"),
        }
    }

    /// Starts the capture of a new request (an actor's next message) with
    /// its own id and its own budget.
    pub(crate) fn begin(&self, request_id: RequestId) {
        for capture in [&self.stdout, &self.stderr] {
            let mut state = capture.state();
            state.finish();
            state.request_id = request_id;
        }
    }

    /// Ends the current request's capture: its partial line is logged, and
    /// what it dropped is reported now rather than when the instance goes.
    pub(crate) fn end(&self) {
        for capture in [&self.stdout, &self.stderr] {
            capture.state().finish();
        }
    }
}

impl IsTerminal for LogCapture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogCapture {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for LogCapture {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.state().write(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
