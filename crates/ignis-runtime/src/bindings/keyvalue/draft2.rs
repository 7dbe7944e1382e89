//! `wasi:keyvalue@0.2.0-draft2` (Spin) over the shared [`KvView`](super::KvView).

use super::*;

pub(super) mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "wasi:keyvalue/imports@0.2.0-draft2",
        imports: { default: async | trappable },
        with: {
            "wasi:keyvalue/store.bucket": crate::bindings::keyvalue::Bucket,
            "wasi:keyvalue/atomics.cas": crate::bindings::keyvalue::Cas,
        },
    });
}

use bindings::wasi::keyvalue0_2_0_draft2::{atomics, batch, store};

shared_store_items!();

impl store::HostBucket for KvView<'_> {
    shared_bucket_methods!();

    async fn list_keys(
        &mut self,
        b: Resource<Bucket>,
        cursor: Option<String>,
    ) -> R<store::KeyResponse> {
        let from = cursor.as_deref().map_or(ListFrom::Start, ListFrom::After);
        lift(self.list(&b, from).await.map(|r| {
            r.map(|page| store::KeyResponse {
                cursor: if page.more {
                    page.keys.last().cloned()
                } else {
                    None
                },
                keys: page.keys,
            })
        }))
    }
}

impl atomics::Host for KvView<'_> {
    async fn increment(&mut self, b: Resource<Bucket>, key: String, delta: i64) -> R<i64> {
        lift(KvView::increment(self, &b, &key, delta).await)
    }

    async fn swap(
        &mut self,
        cas: Resource<Cas>,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), atomics::CasError>> {
        let (access, rid) = (self.access, self.request_id);
        let Cas { ns, key, seen } = self.table.delete(cas)?;
        let r = async {
            access.check_value(&value)?;
            Ok(access
                .backend()?
                .swap_if(&ns, &key, seen.as_ref().map(|v| v.version), value)
                .await?)
        }
        .await;
        match access.logged(rid, "swap", r) {
            Ok(true) => Ok(Ok(())),
            Err(f) => Ok(Err(atomics::CasError::StoreError(f.into()))),
            Ok(false) => {
                // Someone wrote in between: hand back a fresh handle with
                // the current value, ready for another attempt.
                let fresh = match access.backend() {
                    Ok(backend) => backend.get(&ns, &key).await.map_err(Fail::from),
                    Err(f) => Err(f),
                };
                match access.logged(rid, "swap", fresh) {
                    Ok(seen) => {
                        let handle = self.table.push(Cas { ns, key, seen })?;
                        Ok(Err(atomics::CasError::CasFailed(handle)))
                    }
                    Err(f) => Ok(Err(atomics::CasError::StoreError(f.into()))),
                }
            }
        }
    }
}

impl atomics::HostCas for KvView<'_> {
    async fn new(&mut self, b: Resource<Bucket>, key: String) -> R<Resource<Cas>> {
        let ns = self.ns(&b)?;
        let seen = KvView::get(self, &b, &key).await?;
        match seen {
            Ok(seen) => Ok(Ok(self.table.push(Cas { ns, key, seen })?)),
            Err(f) => Ok(Err(f.into())),
        }
    }

    async fn current(&mut self, cas: Resource<Cas>) -> R<Option<Vec<u8>>> {
        Ok(Ok(self
            .table
            .get(&cas)?
            .seen
            .as_ref()
            .map(|v| v.value.clone())))
    }

    async fn drop(&mut self, cas: Resource<Cas>) -> wasmtime::Result<()> {
        self.table.delete(cas)?;
        Ok(())
    }
}

impl batch::Host for KvView<'_> {
    async fn get_many(
        &mut self,
        b: Resource<Bucket>,
        keys: Vec<String>,
    ) -> R<Vec<(String, Option<Vec<u8>>)>> {
        let r = KvView::get_many(self, &b, &keys).await;
        lift(r.map(|r| r.map(|values| keys.into_iter().zip(values).collect())))
    }

    shared_batch_writes!();
}
