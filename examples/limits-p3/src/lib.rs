//! `limits-p3`: a `wasi:http@0.3.0` `service` guest for testing how Ignis
//! runs (and reuses) 0.3 instances. Routes by the last path segment:
//!
//! | path | what it does | what Ignis answers |
//! | --- | --- | --- |
//! | `/instance` | counts the requests this instance served | 200 `instance request N` |
//! | `/trap?ms=N` | waits N ms (default 0), then panics (a wasm trap) | 500 with a request id |
//! | `/loop` | spins forever | 504 at the CPU or wall deadline |
//! | `/sleep?ms=N` | waits N ms on the host clock | 200 `instance request N`, or 504 past the wall deadline |
//! | `/busy?ms=N` | spins for N ms of the host clock | 200 `instance request N`, or 504 past the CPU budget |
//! | `/stream?ms=N` | answers `instance ID request N` at once, then `done` N ms later | 200, the body in two parts |
//! | `/stream-trap?ms=N` | answers the first part at once, traps N ms later | 200, then the body ends in an error |
//! | `/big?kib=N` | answers N KiB (default 1024) in 1 KiB writes, KiB `i` all the letter `a + i % 26` | 200, the body in N writes |
//! | `/who?ms=N` | waits N ms, then names its instance | 200 `instance ID request N` (ID: the clock when the instance first ran) |

use std::sync::atomic::{AtomicU64, Ordering};

use wasip3::clocks::monotonic_clock;
use wasip3::http::types::{ErrorCode, Fields, Request, Response};
use wasip3::{wit_bindgen, wit_future, wit_stream};

wasip3::http::service::export!(LimitsP3);

struct LimitsP3;

/// Requests this instance has served (shows instance reuse).
static SERVED: AtomicU64 = AtomicU64::new(0);

/// This instance's name: the monotonic clock when it first ran (distinct
/// for instances made apart in time).
static ID: AtomicU64 = AtomicU64::new(0);

fn instance_id() -> u64 {
    let _ = ID.compare_exchange(0, monotonic_clock::now(), Ordering::Relaxed, Ordering::Relaxed);
    ID.load(Ordering::Relaxed)
}

fn num(path: &str, key: &str, default: u64) -> u64 {
    path.split_once('?')
        .and_then(|(_, q)| {
            q.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == key).then(|| v.parse().ok()).flatten()
            })
        })
        .unwrap_or(default)
}

#[inline(never)]
fn spin() -> u64 {
    let mut x = 1u64;
    loop {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        if x == 0 {
            return x;
        }
    }
}

#[inline(never)]
fn spin_once() -> u64 {
    std::hint::black_box(6364136223846793005u64).wrapping_mul(3)
}

fn text(status: u16, body: String) -> Result<Response, ErrorCode> {
    parts(status, body, None)
}

/// A `text/plain` response with `status` whose body is what the returned
/// stream is given.
fn streamed(status: u16) -> Result<(Response, wit_bindgen::StreamWriter<u8>), ErrorCode> {
    let (body_tx, body_rx) = wit_stream::new();
    let (body_result_tx, body_result_rx) = wit_future::new(|| Ok(None));
    let headers = Fields::from_list(&[("content-type".to_string(), b"text/plain".to_vec())])
        .map_err(|_| ErrorCode::InternalError(Some("headers".into())))?;
    let (response, _sent) = Response::new(headers, Some(body_rx), body_result_rx);
    response
        .set_status_code(status)
        .map_err(|()| ErrorCode::InternalError(Some("status".into())))?;
    drop(body_result_tx);
    Ok((response, body_tx))
}

/// A response whose body is `first`, then, `wait_ms` later, `then` (or a
/// trap, for `None`).
fn parts(
    status: u16,
    first: String,
    later: Option<(u64, Option<String>)>,
) -> Result<Response, ErrorCode> {
    let (response, mut body_tx) = streamed(status)?;
    wit_bindgen::spawn_local(async move {
        let remaining = body_tx.write_all(first.into_bytes()).await;
        assert!(remaining.is_empty());
        if let Some((wait_ms, then)) = later {
            monotonic_clock::wait_for(wait_ms * 1_000_000).await;
            let Some(then) = then else {
                panic!("the limits-p3 guest panics mid-body on purpose");
            };
            let remaining = body_tx.write_all(then.into_bytes()).await;
            assert!(remaining.is_empty());
        }
    });
    Ok(response)
}

/// A body of `kib` KiB written 1 KiB at a time as fast as the host takes
/// it; KiB `i` is all the letter `a + i % 26`.
fn big(kib: u64) -> Result<Response, ErrorCode> {
    let (response, mut body_tx) = streamed(200)?;
    wit_bindgen::spawn_local(async move {
        for i in 0..kib {
            let chunk = vec![b'a' + (i % 26) as u8; 1024];
            let remaining = body_tx.write_all(chunk).await;
            assert!(remaining.is_empty());
        }
    });
    Ok(response)
}

impl wasip3::exports::http::handler::Guest for LimitsP3 {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let served = SERVED.fetch_add(1, Ordering::Relaxed) + 1;
        let id = instance_id();
        let path = request.get_path_with_query().unwrap_or_default();
        let route = path.split('?').next().unwrap_or("/");
        match route.rsplit('/').next().unwrap_or("") {
            "instance" => text(200, format!("instance request {served}\n")),
            "trap" => {
                monotonic_clock::wait_for(num(&path, "ms", 0) * 1_000_000).await;
                panic!("the limits-p3 guest panics on purpose")
            }
            "loop" => text(200, format!("{}", spin())),
            "sleep" => {
                monotonic_clock::wait_for(num(&path, "ms", 100) * 1_000_000).await;
                text(200, format!("instance request {served}\n"))
            }
            "who" => {
                monotonic_clock::wait_for(num(&path, "ms", 100) * 1_000_000).await;
                text(200, format!("instance {id} request {served}\n"))
            }
            "stream" => parts(
                200,
                format!("instance {id} request {served}\n"),
                Some((num(&path, "ms", 100), Some("done\n".to_string()))),
            ),
            "stream-trap" => parts(
                200,
                format!("instance {id} request {served}\n"),
                Some((num(&path, "ms", 100), None)),
            ),
            "big" => big(num(&path, "kib", 1024)),
            "busy" => {
                let until = monotonic_clock::now() + num(&path, "ms", 10) * 1_000_000;
                while monotonic_clock::now() < until {
                    std::hint::black_box(spin_once());
                }
                text(200, format!("instance request {served}\n"))
            }
            _ => text(404, "unknown limits-p3 route\n".to_string()),
        }
    }
}
