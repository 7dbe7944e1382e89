//! The process's log: stderr through one background writer, plus the
//! admin API's followers ([`ignis_admin::logs::LogTap`]).

use std::io::Write;

use bytes::Bytes;
use ignis_admin::logs::LogTap;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{FilterExt, LevelFilter, filter_fn};
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
    subscriber(json, ansi, writer, filter).init();
    guard
}

/// The subscriber [`init`] installs, writing to `writer`.
///
/// Its max level hint must be the filter's: `init` also sets the `log`
/// crate's max level from it, and with no hint that is TRACE, so every
/// `log::trace!` in wasmtime's component-model code reached the log
/// bridge and the filters before being dropped: 12% of the server's CPU
/// on the WASI 0.3 hello (docs/perf/2026-12-01-reuse-path.md).
fn subscriber<W>(
    json: bool,
    ansi: bool,
    writer: W,
    filter: impl Fn() -> EnvFilter,
) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
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
    // Formatted only while someone follows. A bare `filter_fn` has no level
    // hint, and `and` keeps the lesser of two hints (none): give it the
    // filter's.
    let level = filter().max_level_hint().unwrap_or(LevelFilter::TRACE);
    let followed = filter_fn(|_| LogTap::global().followed()).with_max_level_hint(level);
    let followers = fmt::layer()
        .with_ansi(false)
        .with_writer(TapWriter)
        .with_filter(followed.and(filter()));
    tracing_subscriber::registry().with(stderr).with(followers)
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

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Subscriber;

    /// Fails on the code before the hint was given (the hint was `None`,
    /// which `init` turns into a TRACE max level for the `log` crate).
    #[test]
    fn the_subscriber_hints_the_filter_level() {
        for (directives, level) in [
            ("info", LevelFilter::INFO),
            ("warn", LevelFilter::WARN),
            ("ignis=debug,warn", LevelFilter::DEBUG),
        ] {
            for json in [false, true] {
                let s = subscriber(json, false, std::io::sink, || EnvFilter::new(directives));
                assert_eq!(s.max_level_hint(), Some(level), "{directives} json={json}");
            }
        }
    }
}
