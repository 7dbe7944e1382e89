//! `noisy`: the noisy-neighbour benchmark component.
//!
//! - `/light`: a few bytes, at once.
//! - `/heavy?ms=N`: busy-loops until `N` ms of the monotonic clock have
//!   passed (default 20), then answers. It never yields on its own.
//!
//! Deployed twice on Ignis (tenants L and H), once on `wasmtime serve`.

use std::io::Write as _;

use wasip2::clocks::monotonic_clock;
use wasip2::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

struct Noisy;

fn query_param(path: &str, key: &str) -> Option<u64> {
    let query = path.split_once('?')?.1;
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
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

impl wasip2::exports::http::incoming_handler::Guest for Noisy {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let route = path.split('?').next().unwrap_or("/");
        if route.ends_with("/light") {
            respond(out, 200, "light\n");
        } else if route.ends_with("/heavy") {
            let ms = query_param(&path, "ms").unwrap_or(20);
            let deadline = monotonic_clock::now() + ms * 1_000_000;
            let mut reads = 0u64;
            while monotonic_clock::now() < deadline {
                reads = reads.wrapping_add(1);
            }
            respond(out, 200, &format!("heavy {ms} ms ({reads} clock reads)\n"));
        } else {
            respond(out, 404, "routes: /light, /heavy?ms=N\n");
        }
    }
}

wasip2::http::proxy::export!(Noisy);
