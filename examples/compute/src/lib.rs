//! `compute`: CPU-bound work whose size is set by the query string.
//!
//! - `/compute?n=N`: counts the primes below `N` (trial division), prints the count.
//! - `/compute?ms=N`: busy-loops until `N` ms of the monotonic clock have passed.
//!
//! It never yields on its own; the host's epoch slices preempt it.

use std::io::Write as _;

use wasip2::clocks::monotonic_clock;
use wasip2::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

struct Compute;

fn query_param(path: &str, key: &str) -> Option<u64> {
    let query = path.split_once('?')?.1;
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

fn count_primes(n: u64) -> u64 {
    (2..n).filter(|&c| (2..).take_while(|d| d * d <= c).all(|d| c % d != 0)).count() as u64
}

fn spin_for(ms: u64) -> u64 {
    let deadline = monotonic_clock::now() + ms * 1_000_000;
    let mut iterations = 0u64;
    while monotonic_clock::now() < deadline {
        iterations = iterations.wrapping_add(1);
    }
    iterations
}

impl wasip2::exports::http::incoming_handler::Guest for Compute {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let text = if let Some(ms) = query_param(&path, "ms") {
            format!("spun {ms} ms ({} clock reads)\n", spin_for(ms))
        } else {
            let n = query_param(&path, "n").unwrap_or(10_000);
            format!("primes below {n}: {}\n", count_primes(n))
        };
        let resp = OutgoingResponse::new(Fields::new());
        let body = resp.body().unwrap();
        ResponseOutparam::set(response_out, Ok(resp));
        let mut out = body.write().unwrap();
        out.write_all(text.as_bytes()).unwrap();
        out.flush().unwrap();
        drop(out);
        OutgoingBody::finish(body, None).unwrap();
    }
}

wasip2::http::proxy::export!(Compute);
