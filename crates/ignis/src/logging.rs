//! The process's log: stderr through one background writer, plus the
//! admin API's followers ([`ignis_admin::logs::LogTap`]).

use std::io::Write;

use bytes::Bytes;
use ignis_admin::logs::LogTap;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{FilterExt, filter_fn};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

/// Installs the global subscriber: `IGNIS_LOG` (default `info`) filters
/// both the stderr log (text or JSON) and what followers of `/v1/logs`
/// get (text). Lines are formatted where they happen and written by one
/// thread, which drains every queued line into a buffer and writes it at
/// once: with an access line per request, a write(2) per line cost about
/// 20% of hello throughput (docs/BENCHMARKS.md). Never lossy: when 128k
/// lines wait, loggers wait. The returned guard flushes what is queued
/// when dropped (a kill -9 loses what was still queued).
pub fn init(json: bool) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = || EnvFilter::try_from_env("IGNIS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("ignis-log")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let stderr = if json {
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(writer)
            .with_filter(filter())
            .boxed()
    } else {
        fmt::layer()
            .with_ansi(ansi)
            .with_writer(writer)
            .with_filter(filter())
            .boxed()
    };
    // Formatted only while someone follows.
    let followers = fmt::layer()
        .with_ansi(false)
        .with_writer(TapWriter)
        .with_filter(filter_fn(|_| LogTap::global().followed()).and(filter()));
    tracing_subscriber::registry()
        .with(stderr)
        .with(followers)
        .init();
    guard
}

/// Makes one [`TapLine`] per event.
struct TapWriter;

impl<'a> MakeWriter<'a> for TapWriter {
    type Writer = TapLine;

    fn make_writer(&'a self) -> TapLine {
        TapLine(Vec::new())
    }
}

/// One formatted event, handed to the followers when it is complete.
struct TapLine(Vec<u8>);

impl Write for TapLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for TapLine {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            LogTap::global().publish(Bytes::from(std::mem::take(&mut self.0)));
        }
    }
}
