//! `limits`: a deliberately misbehaving guest that shows (and tests) how Ignis
//! contains one bad function.
//!
//! Routes are chosen by the last path segment (`/any/prefix/loop` is `/loop`).
//!
//! | path | what it does | what Ignis answers |
//! | --- | --- | --- |
//! | `/loop` | spins forever, never yields | 504 at the CPU or wall deadline |
//! | `/bomb` | allocates until memory runs out | 500 "memory limit exceeded" |
//! | `/trap` | panics (a wasm trap) | 500 with a request id |
//! | `/sleep?ms=N` | waits N ms on the host clock | 200, or 504 past the wall deadline |
//! | `/drip?n=N` | sends N lines, 10 ms apart | a streamed 200 |
//! | `/handles?n=N` | holds N header maps (resources) at once | 200, or 500 past the host's cap |
//! | `/flood?mib=N` | streams N MiB as fast as the client takes it | a streamed 200 |
//! | `/log?lines=N` | prints N lines to stdout | 200; lines go to the log, bounded |
//! | `/noreply` | returns without a response | 500 |
//! | `/consume` | reads the whole request body, then answers its length | 200, or 413 past `max_body` |
//! | `/env?key=K` | prints the environment value K | 200 |
//! | `/instance` | counts the requests this instance served | 200 `instance request N` |

use std::io::Write as _;

use wasip2::clocks::monotonic_clock;
use wasip2::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

struct Limits;

/// Requests this instance has served (shows instance reuse).
static SERVED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn query<'a>(path: &'a str, key: &str) -> Option<&'a str> {
    let query = path.split_once('?')?.1;
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then_some(v)
    })
}

fn num(path: &str, key: &str, default: u64) -> u64 {
    query(path, key).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn respond(out: ResponseOutparam, status: u16, text: &str) {
    let resp = OutgoingResponse::new(Fields::new());
    resp.set_status_code(status).unwrap();
    let body = resp.body().unwrap();
    ResponseOutparam::set(out, Ok(resp));
    let mut stream = body.write().unwrap();
    stream.write_all(text.as_bytes()).unwrap();
    stream.flush().unwrap();
    drop(stream);
    OutgoingBody::finish(body, None).unwrap();
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

impl wasip2::exports::http::incoming_handler::Guest for Limits {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let served = SERVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        // Dispatch on the last path segment, so the guest works under any route prefix.
        let route = path.split('?').next().unwrap_or("/");
        let route = format!("/{}", route.rsplit('/').next().unwrap_or(""));
        match route.as_str() {
            "/loop" => {
                let x = spin();
                respond(out, 200, &format!("{x}"));
            }
            "/bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    let mut chunk = vec![0u8; 1 << 20];
                    chunk[0] = 1;
                    hoard.push(std::hint::black_box(chunk));
                }
            }
            "/trap" => panic!("the limits guest panics on purpose"),
            "/sleep" => {
                monotonic_clock::subscribe_duration(num(&path, "ms", 100) * 1_000_000).block();
                respond(out, 200, "slept\n");
            }
            "/drip" => {
                let resp = OutgoingResponse::new(Fields::new());
                let body = resp.body().unwrap();
                ResponseOutparam::set(out, Ok(resp));
                let mut stream = body.write().unwrap();
                for i in 0..num(&path, "n", 10) {
                    if stream.write_all(format!("drip {i}\n").as_bytes()).is_err() || stream.flush().is_err() {
                        return;
                    }
                    monotonic_clock::subscribe_duration(10_000_000).block();
                }
                drop(stream);
                OutgoingBody::finish(body, None).unwrap();
            }
            "/handles" => {
                let held: Vec<Fields> = (0..num(&path, "n", 10)).map(|_| Fields::new()).collect();
                respond(out, 200, &format!("holding {} header maps\n", held.len()));
            }
            "/flood" => {
                let resp = OutgoingResponse::new(Fields::new());
                let body = resp.body().unwrap();
                ResponseOutparam::set(out, Ok(resp));
                let mut stream = body.write().unwrap();
                let chunk = vec![b'x'; 64 * 1024];
                for _ in 0..num(&path, "mib", 1) * 16 {
                    // Blocks while the client does not read (back-pressure).
                    if stream.write_all(&chunk).is_err() {
                        return;
                    }
                }
                let _ = stream.flush();
                drop(stream);
                OutgoingBody::finish(body, None).unwrap();
            }
            "/log" => {
                let lines = num(&path, "lines", 1);
                for i in 0..lines {
                    println!("guest log line {i} of {lines}");
                }
                respond(out, 200, &format!("printed {lines} lines\n"));
            }
            "/noreply" => {}
            "/consume" => {
                let incoming = request.consume().unwrap();
                let mut input = incoming.stream().unwrap();
                let mut body = Vec::new();
                // A body cut off by the host's size limit is an error here: trap.
                std::io::Read::read_to_end(&mut input, &mut body).expect("request body read failed");
                respond(out, 200, &format!("read {} bytes\n", body.len()));
            }
            "/env" => {
                let key = query(&path, "key").unwrap_or("GREETING");
                respond(out, 200, &std::env::var(key).unwrap_or_default());
            }
            "/instance" => respond(out, 200, &format!("instance request {served}\n")),
            _ => respond(out, 404, "unknown limits route\n"),
        }
    }
}

wasip2::http::proxy::export!(Limits);
