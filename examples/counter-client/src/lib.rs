//! `counter-client`: a function that talks to the `counter` actor through
//! `ignis:actor/client`. `GET /bump?id=X` increments counter X and answers
//! `counter X is now N`; `&class=C` calls another class, `&op=OP` sends
//! `OP` instead of `incr` (with GET) and answers the actor's body.

use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wit_bindgen::generate!({
    path: "../../wit",
    world: "ignis:actor/actor-client",
});

use ignis::actor::client;

struct Client;

fn answer(request: &IncomingRequest) -> (u16, String) {
    let pq = request.path_with_query().unwrap_or_default();
    let id = pq
        .split_once('?')
        .and_then(|(_, q)| q.split('&').find_map(|kv| kv.strip_prefix("id=")))
        .unwrap_or("default")
        .to_string();
    let class = pq
        .split_once('?')
        .and_then(|(_, q)| q.split('&').find_map(|kv| kv.strip_prefix("class=")))
        .unwrap_or("counter")
        .to_string();
    let op = pq
        .split_once('?')
        .and_then(|(_, q)| q.split('&').find_map(|kv| kv.strip_prefix("op=")))
        .unwrap_or("incr")
        .to_string();
    if op != "incr" {
        return match client::call(&class, &id, "GET", &format!("/counter/{id}/{op}"), &[]) {
            Ok(resp) => (resp.status, String::from_utf8_lossy(&resp.body).into_owned()),
            Err(e) => (502, format!("actor call failed: {e:?}")),
        };
    }
    match client::call(&class, &id, "POST", &format!("/counter/{id}/incr"), &[]) {
        Ok(resp) if resp.status == 200 => (
            200,
            format!("counter {id} is now {}", String::from_utf8_lossy(&resp.body)),
        ),
        Ok(resp) => (502, format!("actor answered {}", resp.status)),
        Err(e) => (502, format!("actor call failed: {e:?}")),
    }
}

impl wasip2::exports::http::incoming_handler::Guest for Client {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let (status, body) = answer(&request);
        let resp = OutgoingResponse::new(Fields::new());
        resp.set_status_code(status).unwrap();
        let out = resp.body().unwrap();
        ResponseOutparam::set(response_out, Ok(resp));
        let mut w = out.write().unwrap();
        w.write_all(body.as_bytes()).unwrap();
        w.flush().unwrap();
        drop(w);
        OutgoingBody::finish(out, None).unwrap();
    }
}

wasip2::http::proxy::export!(Client);
