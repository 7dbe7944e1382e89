//! `kv-draft`: the key-value and config URL API of `kv-common` over
//! `wasi:keyvalue@0.2.0-draft` (the version wasmtime and wasmCloud speak)
//! and `wasi:config@0.2.0-rc.1`. This version has no compare-and-swap.

wit_bindgen::generate!({
    path: "../../wit",
    world: "ignis:platform/bindings-draft",
    generate_all,
});

use wasi::config::store as config;
use wasi::keyvalue0_2_0_draft::{atomics, batch, store};

struct Draft;

fn err(e: impl std::fmt::Debug) -> String {
    format!("{e:?}")
}

impl kv_common::Kv for Draft {
    type Bucket = store::Bucket;

    fn open(name: &str) -> Result<store::Bucket, String> {
        store::open(name).map_err(err)
    }

    fn get(b: &store::Bucket, key: &str) -> Result<Option<Vec<u8>>, String> {
        b.get(key).map_err(err)
    }

    fn set(b: &store::Bucket, key: &str, value: &[u8]) -> Result<(), String> {
        b.set(key, value).map_err(err)
    }

    fn delete(b: &store::Bucket, key: &str) -> Result<(), String> {
        b.delete(key).map_err(err)
    }

    fn exists(b: &store::Bucket, key: &str) -> Result<bool, String> {
        b.exists(key).map_err(err)
    }

    fn list(b: &store::Bucket) -> Result<Vec<String>, String> {
        let mut all = Vec::new();
        let mut cursor = None;
        loop {
            let page = b.list_keys(cursor).map_err(err)?;
            all.extend(page.keys);
            match page.cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(all),
            }
        }
    }

    fn increment(b: &store::Bucket, key: &str, by: i64) -> Result<i64, String> {
        let by = u64::try_from(by).map_err(|_| "this version only adds".to_string())?;
        let n = atomics::increment(b, key, by).map_err(err)?;
        i64::try_from(n).map_err(|_| "counter out of range".to_string())
    }

    fn cas_increment(_b: &store::Bucket, _key: &str) -> Result<Option<(i64, u32)>, String> {
        Ok(None)
    }

    fn get_many(b: &store::Bucket, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, String> {
        let found = batch::get_many(b, keys).map_err(err)?;
        Ok(found.into_iter().map(|kv| kv.map(|(_, v)| v)).collect())
    }

    fn set_many(b: &store::Bucket, entries: &[(String, Vec<u8>)]) -> Result<(), String> {
        batch::set_many(b, entries).map_err(err)
    }

    fn delete_many(b: &store::Bucket, keys: &[String]) -> Result<(), String> {
        batch::delete_many(b, keys).map_err(err)
    }

    fn config(key: &str) -> Result<Option<String>, String> {
        config::get(key).map_err(err)
    }
}

struct Handler;

impl wasip2::exports::http::incoming_handler::Guest for Handler {
    fn handle(
        request: wasip2::http::types::IncomingRequest,
        out: wasip2::http::types::ResponseOutparam,
    ) {
        kv_common::handle::<Draft>(request, out);
    }
}

wasip2::http::proxy::export!(Handler);
