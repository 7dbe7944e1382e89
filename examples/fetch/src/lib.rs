//! `fetch`: calls an origin over outbound HTTP and relays its answer.
//!
//! The origin is `?url=http://host:port/path`, or the `ORIGIN` environment
//! value. Ignis only lets the call through when the host is listed in the
//! function's `allowed_outbound_hosts`; a refused call answers 502 with the
//! error code the host returned. `&count=N` makes N calls in the one
//! request and reports each on its own line.

use std::io::{Read as _, Write as _};

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingRequest, OutgoingResponse,
    ResponseOutparam, Scheme,
};

struct Fetch;

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn target(path: &str) -> Option<String> {
    let from_query = path.split_once('?').and_then(|(_, q)| {
        q.split('&').find_map(|kv| kv.strip_prefix("url=").map(decode))
    });
    from_query.or_else(|| std::env::var("ORIGIN").ok())
}

fn fetch(url: &str) -> Result<(u16, Vec<u8>), String> {
    let (scheme, rest) = if let Some(r) = url.strip_prefix("http://") {
        (Scheme::Http, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (Scheme::Https, r)
    } else {
        return Err(format!("unsupported url {url}"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let req = OutgoingRequest::new(Fields::new());
    req.set_method(&Method::Get).map_err(|_| "method")?;
    req.set_scheme(Some(&scheme)).map_err(|_| "scheme")?;
    req.set_authority(Some(authority)).map_err(|_| "authority")?;
    req.set_path_with_query(Some(path)).map_err(|_| "path")?;
    let body = req.body().map_err(|_| "body")?;
    OutgoingBody::finish(body, None).map_err(|e| format!("{e:?}"))?;
    let pending = outgoing_handler::handle(req, None).map_err(|e| format!("{e:?}"))?;
    pending.subscribe().block();
    let resp = pending
        .get()
        .ok_or("no response")?
        .map_err(|_| "response taken twice")?
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status();
    let incoming = resp.consume().map_err(|_| "consume")?;
    let mut stream = incoming.stream().map_err(|_| "stream")?;
    let mut data = Vec::new();
    stream.read_to_end(&mut data).map_err(|e| e.to_string())?;
    Ok((status, data))
}

impl wasip2::exports::http::incoming_handler::Guest for Fetch {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let count = path
            .split_once('?')
            .and_then(|(_, q)| q.split('&').find_map(|kv| kv.strip_prefix("count=")))
            .and_then(|n| n.parse::<u32>().ok());
        let (status, data) = match (target(&path), count) {
            (None, _) => (400, b"give ?url= or set ORIGIN\n".to_vec()),
            (Some(url), None) => match fetch(&url) {
                Ok(ok) => ok,
                Err(e) => (502, format!("outbound request failed: {e}\n").into_bytes()),
            },
            // `count=N`: N calls in this one request, one line per call.
            (Some(url), Some(n)) => {
                let mut report = String::new();
                for i in 0..n {
                    match fetch(&url) {
                        Ok((status, _)) => report.push_str(&format!("{i}: {status}\n")),
                        Err(e) => report.push_str(&format!("{i}: failed {e}\n")),
                    }
                }
                (200, report.into_bytes())
            }
        };
        let resp = OutgoingResponse::new(Fields::new());
        resp.set_status_code(status).unwrap();
        let body = resp.body().unwrap();
        ResponseOutparam::set(response_out, Ok(resp));
        let mut out = body.write().unwrap();
        out.write_all(&data).unwrap();
        out.flush().unwrap();
        drop(out);
        OutgoingBody::finish(body, None).unwrap();
    }
}

wasip2::http::proxy::export!(Fetch);
