//! `echo`: streams the request body back as it arrives, without buffering it.
//!
//! `curl --data-binary @file localhost:8080/echo` prints the file.

use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingBody, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Echo;

impl wasip2::exports::http::incoming_handler::Guest for Echo {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let content_type: Vec<(String, Vec<u8>)> = request
            .headers()
            .get("content-type")
            .into_iter()
            .map(|v| ("content-type".to_string(), v))
            .collect();
        let incoming = request.consume().unwrap();
        let mut input = incoming.stream().unwrap();
        let resp = OutgoingResponse::new(Fields::from_list(&content_type).unwrap());
        let body = resp.body().unwrap();
        ResponseOutparam::set(response_out, Ok(resp));
        let mut output = body.write().unwrap();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match std::io::Read::read(&mut input, &mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                // The client went away or the body was cut off by a limit.
                Err(_) => return,
            };
            if output.write_all(&buf[..n]).is_err() {
                return;
            }
            let _ = output.flush();
        }
        drop(input);
        IncomingBody::finish(incoming);
        drop(output);
        OutgoingBody::finish(body, None).unwrap();
    }
}

wasip2::http::proxy::export!(Echo);
