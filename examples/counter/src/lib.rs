//! `counter`: a durable actor. Each id (`/counter/{id}/...`) is one
//! counter with its own storage; messages run one at a time, and a reply is
//! sent only once the writes that produced it are durable.
//!
//! | request | does |
//! |---|---|
//! | `POST .../incr?spin_ms=N` | reads `count`, adds one, writes it back (a read-modify-write that would lose updates if two messages ever interleaved); the new value. With `spin_ms`, first prints `incr spinning N ms` and keeps the actor busy for N ms |
//! | `GET .../get` | the count |
//! | `POST .../trap` | writes `count = 1000000`, then traps: the write must vanish |
//! | `POST .../bulk?n=N` | writes N keys `k0..kN` in one message |
//! | `POST .../txn` | `begin`, write `a`, `rollback`, write `b`, `begin`, write `c`, `commit`; lists the keys |
//! | `GET .../list?prefix=P` | the keys with prefix P; the storage error (507) if refused |
//! | `POST .../alarm?in_ms=N&trap_first=1` | sets the alarm N ms ahead (the first attempt traps if asked) |
//! | `GET .../alarms` | `fired=F retry=R pending=T` |
//! | `GET .../whoami` | `class/id` |
//! | `POST .../spin?ms=N` | keeps the actor busy for N ms |
//! | `POST .../put?key=K&size=N` | writes N bytes at K; the storage error if refused |
//! | `POST .../say?text=T&fill=N` | prints T, then about N bytes of filler lines, to stdout |
//! | `GET .../caller` | the `ignis-caller` header (`tenant/name` of the guest that sent the message), or `none` |

use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wit_bindgen::generate!({
    path: "../../wit",
    world: "ignis:actor/actor",
});

use ignis::actor::{alarms, context, storage};

fn text(key: &str) -> Option<String> {
    storage::get(key)
        .expect("storage get")
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

fn number(key: &str) -> u64 {
    text(key).and_then(|t| t.parse().ok()).unwrap_or(0)
}

fn put(key: &str, value: impl ToString) {
    storage::put(key, value.to_string().as_bytes()).expect("storage put");
}

fn param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn keys(prefix: &str) -> String {
    try_keys(prefix).expect("storage list")
}

fn try_keys(prefix: &str) -> Result<String, storage::Error> {
    let entries = storage::list(&storage::ListOptions {
        prefix: Some(prefix.to_string()),
        start: None,
        end: None,
        limit: None,
        reverse: false,
    })?;
    Ok(entries
        .into_iter()
        .map(|(k, _)| k)
        .collect::<Vec<_>>()
        .join(","))
}

fn route(path: &str, query: &str) -> (u16, String) {
    let op = path.rsplit('/').next().unwrap_or_default();
    match op {
        "incr" => {
            if let Some(ms) = param(query, "spin_ms").and_then(|n| n.parse::<u64>().ok()) {
                println!("incr spinning {ms} ms");
                let until = now_ms() + ms;
                while now_ms() < until {}
            }
            let n = number("count") + 1;
            put("count", n);
            (200, n.to_string())
        }
        "get" => (200, number("count").to_string()),
        "trap" => {
            put("count", 1_000_000);
            panic!("trapping on purpose after a write");
        }
        "bulk" => {
            let n: u32 = param(query, "n").and_then(|n| n.parse().ok()).unwrap_or(1);
            for i in 0..n {
                if let Err(e) = storage::put(&format!("k{i}"), b"x") {
                    return (507, format!("{e:?}"));
                }
            }
            (200, format!("wrote {n}"))
        }
        "txn" => {
            storage::begin().expect("begin");
            put("t:a", 1);
            storage::rollback().expect("rollback");
            put("t:b", 2);
            storage::begin().expect("begin");
            put("t:c", 3);
            storage::commit().expect("commit");
            (200, keys("t:"))
        }
        "list" => match try_keys(param(query, "prefix").unwrap_or("")) {
            Ok(keys) => (200, keys),
            Err(e) => (507, format!("{e:?}")),
        },
        "alarm" => {
            let in_ms: u64 = param(query, "in_ms").and_then(|n| n.parse().ok()).unwrap_or(0);
            put("trap_first", param(query, "trap_first").unwrap_or("0"));
            alarms::set(now_ms() + in_ms).expect("set alarm");
            (200, "alarm set".into())
        }
        "alarms" => {
            let pending = alarms::get().expect("get alarm").is_some();
            (
                200,
                format!(
                    "fired={} retry={} pending={pending}",
                    number("alarm_fired"),
                    number("alarm_retry")
                ),
            )
        }
        "whoami" => (200, format!("{}/{}", context::class(), context::id())),
        "put" => {
            let key = param(query, "key").unwrap_or("key");
            let size: usize = param(query, "size").and_then(|n| n.parse().ok()).unwrap_or(1);
            match storage::put(key, &vec![b'v'; size]) {
                Ok(()) => (200, "ok".into()),
                Err(e) => (507, format!("{e:?}")),
            }
        }
        "spin" => {
            let ms: u64 = param(query, "ms").and_then(|n| n.parse().ok()).unwrap_or(0);
            let until = now_ms() + ms;
            while now_ms() < until {}
            (200, format!("spun {ms} ms"))
        }
        "say" => {
            println!("{}", param(query, "text").unwrap_or(""));
            let fill: usize = param(query, "fill").and_then(|n| n.parse().ok()).unwrap_or(0);
            let line = "x".repeat(99);
            for _ in 0..fill / 100 {
                println!("{line}");
            }
            (200, "said".into())
        }
        _ => (404, "unknown operation".into()),
    }
}

struct Counter;

impl exports::ignis::actor::alarm_handler::Guest for Counter {
    fn on_alarm(retry: u32) -> Result<(), String> {
        if text("trap_first").as_deref() == Some("1") && retry == 0 {
            put("alarm_fired", 1_000); // rolled back by the trap
            panic!("alarm handler traps on its first attempt");
        }
        put("alarm_fired", number("alarm_fired") + 1);
        put("alarm_retry", retry);
        Ok(())
    }
}

export!(Counter);

impl wasip2::exports::http::incoming_handler::Guest for Counter {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let pq = request.path_with_query().unwrap_or_default();
        let (path, query) = pq.split_once('?').unwrap_or((&pq, ""));
        let (status, body) = if path.ends_with("/caller") {
            let caller = request.headers().get("ignis-caller");
            let caller = caller.first().map(|v| String::from_utf8_lossy(v).into_owned());
            (200, caller.unwrap_or_else(|| "none".into()))
        } else {
            route(path, query)
        };
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

wasip2::http::proxy::export!(Counter);
