//! `hello`: the smallest useful `wasi:http` function.
//!
//! `curl localhost:8080/hello` prints `Hello from Ignis!` (and the
//! `GREETING` environment value when the manifest sets one).

use std::io::Write as _;

use wasip2::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

struct Hello;

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(_request: IncomingRequest, response_out: ResponseOutparam) {
        let headers = Fields::from_list(&[("content-type".to_string(), b"text/plain".to_vec())]).unwrap();
        let resp = OutgoingResponse::new(headers);
        let body = resp.body().unwrap();
        ResponseOutparam::set(response_out, Ok(resp));
        let mut out = body.write().unwrap();
        match std::env::var("GREETING") {
            Ok(greeting) => writeln!(out, "{greeting}").unwrap(),
            Err(_) => out.write_all(b"Hello from Ignis!\n").unwrap(),
        }
        out.flush().unwrap();
        drop(out);
        OutgoingBody::finish(body, None).unwrap();
    }
}

wasip2::http::proxy::export!(Hello);
