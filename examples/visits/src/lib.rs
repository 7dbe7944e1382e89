//! `visits`: a visit counter on the standard platform interfaces.
//!
//! Each `GET /visits` atomically increments the `visits` counter of the
//! `default` key-value store (`wasi:keyvalue@0.2.0-draft2`), greets with the
//! `greeting` value of `wasi:config`, and asks the origin named by the
//! `origin_url` config value (a named backend in the manifest) for a line
//! to add. The same component runs on any host with these interfaces.

use std::io::{Read as _, Write as _};

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingRequest, OutgoingResponse,
    ResponseOutparam, Scheme,
};

wit_bindgen::generate!({
    path: "../../wit",
    world: "ignis:platform/bindings-draft2",
    generate_all,
});

use wasi::config::store as config;
use wasi::keyvalue0_2_0_draft2::{atomics, store};

/// GETs `url` (http only) and returns the first line of the answer.
fn first_line(url: &str) -> Result<String, String> {
    let rest = url.strip_prefix("http://").ok_or("origin_url must be http://")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let req = OutgoingRequest::new(Fields::new());
    req.set_method(&Method::Get).map_err(|()| "method")?;
    req.set_scheme(Some(&Scheme::Http)).map_err(|()| "scheme")?;
    req.set_authority(Some(authority)).map_err(|()| "authority")?;
    req.set_path_with_query(Some(if path.is_empty() { "/" } else { path }))
        .map_err(|()| "path")?;
    let pending = outgoing_handler::handle(req, None).map_err(|e| format!("{e:?}"))?;
    pending.subscribe().block();
    let resp = pending
        .get()
        .ok_or("no response")?
        .map_err(|()| "response taken twice")?
        .map_err(|e| format!("{e:?}"))?;
    let body = resp.consume().map_err(|()| "body")?;
    let mut text = String::new();
    body.stream()
        .map_err(|()| "stream")?
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    Ok(text.lines().next().unwrap_or_default().to_string())
}

fn page() -> Result<String, String> {
    let greeting = config::get("greeting")
        .map_err(|e| format!("{e:?}"))?
        .unwrap_or_else(|| "Hello".into());
    let bucket = store::open("default").map_err(|e| format!("{e:?}"))?;
    let n = atomics::increment(&bucket, "visits", 1).map_err(|e| format!("{e:?}"))?;
    let mut out = format!("{greeting}! You are visitor #{n}.\n");
    if let Some(url) = config::get("origin_url").map_err(|e| format!("{e:?}"))? {
        match first_line(&url) {
            Ok(line) => out.push_str(&format!("The origin says: {line}\n")),
            Err(e) => out.push_str(&format!("The origin did not answer: {e}\n")),
        }
    }
    Ok(out)
}

struct Visits;

impl wasip2::exports::http::incoming_handler::Guest for Visits {
    fn handle(_request: IncomingRequest, response_out: ResponseOutparam) {
        let (status, text) = match page() {
            Ok(text) => (200, text),
            Err(e) => (500, format!("visits failed: {e}\n")),
        };
        let headers =
            Fields::from_list(&[("content-type".to_string(), b"text/plain".to_vec())]).unwrap();
        let resp = OutgoingResponse::new(headers);
        resp.set_status_code(status).unwrap();
        let body = resp.body().unwrap();
        ResponseOutparam::set(response_out, Ok(resp));
        let mut w = body.write().unwrap();
        w.write_all(text.as_bytes()).unwrap();
        w.flush().unwrap();
        drop(w);
        OutgoingBody::finish(body, None).unwrap();
    }
}

wasip2::http::proxy::export!(Visits);
