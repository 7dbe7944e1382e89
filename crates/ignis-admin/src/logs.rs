//! Following the node's log over the admin API (`GET /v1/logs`, `ignis
//! logs`).
//!
//! Invariants:
//! - Nothing is formatted for followers while there are none: the process's
//!   log setup asks [`LogTap::followed`] before formatting a line for the
//!   tap, so an unfollowed node pays one atomic load per event.
//! - Lines go out through a broadcast channel of [`BUFFERED_LINES`]; a
//!   follower that falls that far behind skips lines and is told how many
//!   (`... N lines skipped`), so a slow follower never holds memory or slows
//!   logging. At most [`MAX_FOLLOWERS`] follow at once (503 past it).
//! - Followers see what the node's log shows (the same `IGNIS_LOG` filter),
//!   as text lines without colours, from the moment they connect.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};

/// Lines kept for followers that fall behind.
pub const BUFFERED_LINES: usize = 4096;
/// Followers at once.
pub const MAX_FOLLOWERS: usize = 8;

/// Where log lines go for followers.
pub struct LogTap {
    lines: broadcast::Sender<Bytes>,
    followers: Arc<Semaphore>,
}

impl LogTap {
    /// The process's tap.
    pub fn global() -> &'static LogTap {
        static TAP: OnceLock<LogTap> = OnceLock::new();
        TAP.get_or_init(|| LogTap {
            lines: broadcast::channel(BUFFERED_LINES).0,
            followers: Arc::new(Semaphore::new(MAX_FOLLOWERS)),
        })
    }

    /// Whether anyone follows now (else lines need not be formatted).
    pub fn followed(&self) -> bool {
        self.lines.receiver_count() > 0
    }

    /// Hands one formatted line (ending in a newline) to the followers.
    pub fn publish(&self, line: Bytes) {
        let _ = self.lines.send(line);
    }

    /// A body that streams the lines logged from now on; `None` if
    /// [`MAX_FOLLOWERS`] already follow.
    pub fn follow(&self) -> Option<LogStream> {
        let permit = self.followers.clone().try_acquire_owned().ok()?;
        let mut rx = self.lines.subscribe();
        let (tx, out) = mpsc::channel::<Bytes>(64);
        tokio::spawn(async move {
            let _permit: OwnedSemaphorePermit = permit;
            loop {
                let line = match rx.recv().await {
                    Ok(line) => line,
                    Err(broadcast::error::RecvError::Lagged(n)) => Bytes::from(format!(
                        "... {n} lines skipped (this follower fell behind)\n"
                    )),
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                // The follower left: stop following.
                if tx.send(line).await.is_err() {
                    return;
                }
            }
        });
        Some(LogStream { lines: out })
    }
}

/// The body of `GET /v1/logs`: lines as they are logged, until the client
/// leaves.
pub struct LogStream {
    lines: mpsc::Receiver<Bytes>,
}

impl Body for LogStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.lines
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(Frame::data(l))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_get_lines_from_now_on_and_a_slow_one_is_told_what_it_missed() {
        let tap = LogTap {
            lines: broadcast::channel(4).0,
            followers: Arc::new(Semaphore::new(2)),
        };
        assert!(!tap.followed());
        tap.publish(Bytes::from_static(b"before\n"));
        let mut a = tap.follow().unwrap();
        let _b = tap.follow().unwrap();
        assert!(tap.follow().is_none(), "a third follower is refused");
        assert!(tap.followed());
        for i in 0..10 {
            tap.publish(Bytes::from(format!("line {i}\n")));
        }
        let mut seen = String::new();
        while !seen.contains("line 9\n") {
            let frame = std::future::poll_fn(|cx| Pin::new(&mut a).poll_frame(cx))
                .await
                .unwrap()
                .unwrap();
            seen.push_str(std::str::from_utf8(frame.data_ref().unwrap()).unwrap());
        }
        assert!(!seen.contains("before"), "{seen}");
        // The channel holds 4 lines; the follower's forwarding task may take
        // some before they are overwritten, but not all ten.
        assert!(seen.contains("lines skipped"), "{seen}");
    }
}
