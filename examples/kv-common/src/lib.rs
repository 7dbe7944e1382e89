//! The HTTP side of the `kv` and `kv-draft` guests: one URL API over
//! `wasi:keyvalue` and `wasi:config`, whatever package version the guest
//! was built against. Each guest implements [`Kv`] with its own bindings.
//!
//! | request | does |
//! |---|---|
//! | `GET /kv/get?key=K` | the value, or 404 |
//! | `PUT /kv/set?key=K` (body, or `&value=V`) | sets it |
//! | `DELETE /kv/delete?key=K` | deletes it |
//! | `GET /kv/exists?key=K` | `true` / `false` |
//! | `POST /kv/incr?key=K&by=N` | atomic increment; the new value |
//! | `POST /kv/cas-incr?key=K` | increment by compare-and-swap; `value retries` |
//! | `GET /kv/list` | every key, one per line (follows the cursors) |
//! | `POST /kv/set-many?n=N&size=B` | sets keys `b0..bN` to B bytes each in one batch |
//! | `GET /kv/get-many?n=N` | reads `b0..bN` in one batch (`&same=1`: `b0`, N times); how many were found |
//! | `POST /kv/delete-many?n=N` | deletes `b0..bN` in one batch |
//! | `GET /config?key=K` | the `wasi:config` value, or 404 |
//!
//! Every key-value request takes `store=S` (default `default`) and, for
//! benchmarks, `spread=N`: the key gets a random number below N appended
//! (`key=b&spread=1000` picks one of the `set-many` keys). A store
//! error answers 500 with the error the host returned.

use std::io::{Read as _, Write as _};

use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

/// One `wasi:keyvalue` + `wasi:config` binding version. Errors are the
/// host's error, printed.
pub trait Kv {
    /// An open store.
    type Bucket;
    /// Opens `name`.
    fn open(name: &str) -> Result<Self::Bucket, String>;
    /// Reads `key`.
    fn get(b: &Self::Bucket, key: &str) -> Result<Option<Vec<u8>>, String>;
    /// Writes `key`.
    fn set(b: &Self::Bucket, key: &str, value: &[u8]) -> Result<(), String>;
    /// Deletes `key`.
    fn delete(b: &Self::Bucket, key: &str) -> Result<(), String>;
    /// Whether `key` exists.
    fn exists(b: &Self::Bucket, key: &str) -> Result<bool, String>;
    /// All keys, following the cursors.
    fn list(b: &Self::Bucket) -> Result<Vec<String>, String>;
    /// Atomic increment.
    fn increment(b: &Self::Bucket, key: &str, by: i64) -> Result<i64, String>;
    /// Increment through compare-and-swap: `(new value, retries)`, or
    /// `None` if this version has no compare-and-swap.
    fn cas_increment(b: &Self::Bucket, key: &str) -> Result<Option<(i64, u32)>, String>;
    /// Batch read.
    fn get_many(b: &Self::Bucket, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, String>;
    /// Batch write.
    fn set_many(b: &Self::Bucket, entries: &[(String, Vec<u8>)]) -> Result<(), String>;
    /// Batch delete.
    fn delete_many(b: &Self::Bucket, keys: &[String]) -> Result<(), String>;
    /// A `wasi:config` value.
    fn config(key: &str) -> Result<Option<String>, String>;
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: &str) -> Self {
        Query(
            q.split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (decode(k), decode(v))
                })
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn num(&self, name: &str, default: i64) -> i64 {
        self.get(name).and_then(|v| v.parse().ok()).unwrap_or(default)
    }
}

fn respond(out: ResponseOutparam, status: u16, body: &[u8]) {
    let headers =
        Fields::from_list(&[("content-type".to_string(), b"text/plain".to_vec())]).unwrap();
    let resp = OutgoingResponse::new(headers);
    resp.set_status_code(status).unwrap();
    let body_res = resp.body().unwrap();
    ResponseOutparam::set(out, Ok(resp));
    let mut w = body_res.write().unwrap();
    w.write_all(body).unwrap();
    w.flush().unwrap();
    drop(w);
    OutgoingBody::finish(body_res, None).unwrap();
}

fn read_body(request: &IncomingRequest) -> Vec<u8> {
    let mut data = Vec::new();
    if let Ok(body) = request.consume() {
        if let Ok(mut stream) = body.stream() {
            let _ = stream.read_to_end(&mut data);
        }
    }
    data
}

fn batch_keys(n: i64) -> Vec<String> {
    (0..n.max(0)).map(|i| format!("b{i}")).collect()
}

/// Serves one request with binding `K`.
pub fn handle<K: Kv>(request: IncomingRequest, out: ResponseOutparam) {
    let path_query = request.path_with_query().unwrap_or_default();
    let (path, query) = path_query.split_once('?').unwrap_or((&path_query, ""));
    let q = Query::parse(query);
    let method = request.method();
    let result = route::<K>(path, &q, &method, &request);
    match result {
        Ok((status, body)) => respond(out, status, &body),
        Err(e) => respond(out, 500, format!("kv error: {e}\n").as_bytes()),
    }
}

fn route<K: Kv>(
    path: &str,
    q: &Query,
    method: &Method,
    request: &IncomingRequest,
) -> Result<(u16, Vec<u8>), String> {
    if path == "/config" {
        let key = q.get("key").unwrap_or_default();
        return Ok(match K::config(key)? {
            Some(v) => (200, v.into_bytes()),
            None => (404, b"no such config key\n".to_vec()),
        });
    }
    let Some(op) = path.strip_prefix("/kv/") else {
        return Ok((404, b"not found\n".to_vec()));
    };
    let bucket = K::open(q.get("store").unwrap_or("default"))?;
    let mut key = q.get("key").unwrap_or("key").to_string();
    let spread = q.num("spread", 0);
    if spread > 0 {
        let r = wasip2::random::random::get_random_u64() % spread as u64;
        key = format!("{key}{r}");
    }
    let ok = |body: Vec<u8>| Ok((200, body));
    match op {
        "get" => match K::get(&bucket, &key)? {
            Some(v) => ok(v),
            None => Ok((404, b"no such key\n".to_vec())),
        },
        "set" => {
            let value = match q.get("value") {
                Some(v) => v.as_bytes().to_vec(),
                None if matches!(method, Method::Get) => b"value".to_vec(),
                None => read_body(request),
            };
            K::set(&bucket, &key, &value)?;
            ok(b"ok\n".to_vec())
        }
        "delete" => {
            K::delete(&bucket, &key)?;
            ok(b"ok\n".to_vec())
        }
        "exists" => ok(K::exists(&bucket, &key)?.to_string().into_bytes()),
        "incr" => ok(K::increment(&bucket, &key, q.num("by", 1))?
            .to_string()
            .into_bytes()),
        "cas-incr" => match K::cas_increment(&bucket, &key)? {
            Some((value, retries)) => ok(format!("{value} {retries}").into_bytes()),
            None => Ok((501, b"no compare-and-swap in this version\n".to_vec())),
        },
        "list" => ok(K::list(&bucket)?.join("\n").into_bytes()),
        "set-many" => {
            let size = q.num("size", 1).max(0) as usize;
            let entries: Vec<(String, Vec<u8>)> = batch_keys(q.num("n", 1))
                .into_iter()
                .map(|k| (k, vec![b'x'; size]))
                .collect();
            K::set_many(&bucket, &entries)?;
            ok(format!("{}", entries.len()).into_bytes())
        }
        "get-many" => {
            let mut keys = batch_keys(q.num("n", 1));
            if q.num("same", 0) == 1 {
                // The same key, n times.
                keys.iter_mut().for_each(|k| *k = "b0".into());
            }
            let found = K::get_many(&bucket, &keys)?
                .iter()
                .filter(|v| v.is_some())
                .count();
            ok(found.to_string().into_bytes())
        }
        "delete-many" => {
            K::delete_many(&bucket, &batch_keys(q.num("n", 1)))?;
            ok(b"ok\n".to_vec())
        }
        _ => Ok((404, b"unknown operation\n".to_vec())),
    }
}
