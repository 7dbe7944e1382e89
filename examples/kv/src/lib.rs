//! `kv`: the key-value and config URL API of `kv-common` over
//! `wasi:keyvalue@0.2.0-draft2` (the version Spin speaks) and
//! `wasi:config@0.2.0-rc.1`.

wit_bindgen::generate!({
    path: "../../wit",
    world: "ignis:platform/bindings-draft2",
    generate_all,
});

use wasi::config::store as config;
use wasi::keyvalue0_2_0_draft2::{atomics, batch, store};

struct Draft2;

fn err(e: impl std::fmt::Debug) -> String {
    format!("{e:?}")
}

impl kv_common::Kv for Draft2 {
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
            let page = b.list_keys(cursor.as_deref()).map_err(err)?;
            all.extend(page.keys);
            match page.cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(all),
            }
        }
    }

    fn increment(b: &store::Bucket, key: &str, by: i64) -> Result<i64, String> {
        atomics::increment(b, key, by).map_err(err)
    }

    fn cas_increment(b: &store::Bucket, key: &str) -> Result<Option<(i64, u32)>, String> {
        let mut cas = atomics::Cas::new(b, key).map_err(err)?;
        let mut retries = 0;
        loop {
            let current = cas.current().map_err(err)?;
            let n: i64 = match current {
                None => 0,
                Some(bytes) => String::from_utf8_lossy(&bytes)
                    .parse()
                    .map_err(|_| format!("`{key}` is not a number"))?,
            };
            match atomics::swap(cas, (n + 1).to_string().as_bytes()) {
                Ok(()) => return Ok(Some((n + 1, retries))),
                Err(atomics::CasError::CasFailed(fresh)) => {
                    retries += 1;
                    cas = fresh;
                }
                Err(atomics::CasError::StoreError(e)) => return Err(err(e)),
            }
        }
    }

    fn get_many(b: &store::Bucket, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, String> {
        let found = batch::get_many(b, keys).map_err(err)?;
        Ok(found.into_iter().map(|(_, v)| v).collect())
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
        kv_common::handle::<Draft2>(request, out);
    }
}

wasip2::http::proxy::export!(Handler);
