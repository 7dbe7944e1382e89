//! `{{name}}`: a durable actor for Ignis. Every id is one counter with its
//! own transactional storage; Ignis runs one message per id at a time, so
//! the read-modify-write below never loses an update, and a reply leaves
//! only once the write behind it is durable.
//!
//! | request | does |
//! |---|---|
//! | `POST /{{name}}/{id}/incr` | adds one; the new count |
//! | `GET /{{name}}/{id}/get` | the count |
//! | `POST /{{name}}/{id}/reset-in?ms=N` | sets an alarm that resets the count N ms from now |

use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wit_bindgen::generate!({
    path: "wit",
    world: "ignis:actor/actor",
});

use ignis::actor::{alarms, context, storage};

fn count() -> u64 {
    storage::get("count")
        .expect("storage get")
        .and_then(|v| String::from_utf8_lossy(&v).parse().ok())
        .unwrap_or(0)
}

fn set_count(n: u64) {
    storage::put("count", n.to_string().as_bytes()).expect("storage put");
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn route(method: &str, path: &str, query: &str) -> (u16, String) {
    match (method, path.rsplit('/').next().unwrap_or_default()) {
        ("POST", "incr") => {
            let n = count() + 1;
            set_count(n);
            (200, format!("{} is at {n}\n", context::id()))
        }
        ("GET", "get") => (200, format!("{} is at {}\n", context::id(), count())),
        ("POST", "reset-in") => {
            let ms: u64 = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("ms="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(1000);
            alarms::set(now_ms() + ms).expect("set alarm");
            (200, format!("{} resets in {ms} ms\n", context::id()))
        }
        _ => (404, "try POST .../incr, GET .../get or POST .../reset-in?ms=N\n".into()),
    }
}

struct Actor;

impl exports::ignis::actor::alarm_handler::Guest for Actor {
    fn on_alarm(_retry: u32) -> Result<(), String> {
        set_count(0);
        Ok(())
    }
}

export!(Actor);

impl wasip2::exports::http::incoming_handler::Guest for Actor {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let method = match request.method() {
            wasip2::http::types::Method::Get => "GET",
            wasip2::http::types::Method::Post => "POST",
            _ => "other",
        };
        let pq = request.path_with_query().unwrap_or_default();
        let (path, query) = pq.split_once('?').unwrap_or((&pq, ""));
        let (status, text) = route(method, path, query);
        let headers =
            Fields::from_list(&[("content-type".to_string(), b"text/plain".to_vec())]).unwrap();
        let response = OutgoingResponse::new(headers);
        response.set_status_code(status).unwrap();
        let body = response.body().unwrap();
        ResponseOutparam::set(response_out, Ok(response));
        let mut out = body.write().unwrap();
        out.write_all(text.as_bytes()).unwrap();
        out.flush().unwrap();
        drop(out);
        OutgoingBody::finish(body, None).unwrap();
    }
}

wasip2::http::proxy::export!(Actor);
