//! `wasi:keyvalue@0.2.0-draft` (wasmtime, wasmCloud) over the shared [`KvView`](super::KvView).

use super::*;

pub(super) mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "wasi:keyvalue/imports@0.2.0-draft",
        imports: { default: async | trappable },
        with: {
            "wasi:keyvalue/store.bucket": crate::bindings::keyvalue::Bucket,
        },
    });
}

use bindings::wasi::keyvalue0_2_0_draft::{atomics, batch, store};

shared_store_items!();

impl store::HostBucket for KvView<'_> {
    shared_bucket_methods!();

    async fn list_keys(
        &mut self,
        b: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> R<store::KeyResponse> {
        let skip = cursor.unwrap_or(0);
        lift(self.list(&b, ListFrom::Skip(skip)).await.map(|r| {
            r.map(|page| {
                let next = skip + page.keys.len() as u64;
                store::KeyResponse {
                    cursor: page.more.then_some(next),
                    keys: page.keys,
                }
            })
        }))
    }
}

impl atomics::Host for KvView<'_> {
    async fn increment(&mut self, b: Resource<Bucket>, key: String, delta: u64) -> R<u64> {
        let (access, rid) = (self.access, self.request_id);
        let Ok(delta) = i64::try_from(delta) else {
            let r = Err(Fail::Other(format!("delta {delta} is out of range")));
            return Ok(access.logged(rid, "increment", r).map_err(Into::into));
        };
        let r = KvView::increment(self, &b, &key, delta).await?;
        let r = r.and_then(|n| {
            u64::try_from(n).map_err(|_| Fail::Other(format!("`{key}` holds a negative counter")))
        });
        Ok(access.logged(rid, "increment", r).map_err(Into::into))
    }
}

impl batch::Host for KvView<'_> {
    async fn get_many(
        &mut self,
        b: Resource<Bucket>,
        keys: Vec<String>,
    ) -> R<Vec<Option<(String, Vec<u8>)>>> {
        let r = KvView::get_many(self, &b, &keys).await;
        lift(r.map(|r| {
            r.map(|values| {
                keys.into_iter()
                    .zip(values)
                    .map(|(k, v)| v.map(|v| (k, v)))
                    .collect()
            })
        }))
    }

    shared_batch_writes!();
}
