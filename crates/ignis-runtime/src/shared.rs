//! What the runtime shares with every function and actor class it loads:
//! the platform services behind the bindings, the epoch ticker, the fair
//! scheduler and the time slice. Functions and classes hold it (not the
//! [`Runtime`](crate::Runtime)), so the runtime's modules import each
//! other in one direction only; the ticker stops when the last holder is
//! gone.

use std::sync::Arc;
use std::time::Duration;

use ignis_store::{ActorStorage, KvBackend};

use crate::bindings::actor::CallerSlot;
use crate::bindings::keyvalue::KvLimits;
use crate::sched::GuestScheduler;
use crate::ticker::{StoreLease, Ticker};

/// Process-wide services behind the platform bindings.
#[derive(Clone, Default)]
pub struct Platform {
    /// The key-value engine (`None`: no function declares a store).
    pub kv: Option<Arc<dyn KvBackend>>,
    /// Key, value and batch limits.
    pub kv_limits: KvLimits,
    /// Named outbound backends, by name.
    pub backends: std::collections::BTreeMap<String, Arc<crate::outbound::Backend>>,
    /// The edge's upstreams, by name (guests reach the ones their routes
    /// put them in front of).
    pub upstreams: std::collections::BTreeMap<String, Arc<dyn crate::outbound::UpstreamClient>>,
    /// Durable actor storage (`None`: no actor classes).
    pub actor_storage: Option<Arc<dyn ActorStorage>>,
    /// Where the actor directory installs itself once built (guests call
    /// actors through it).
    pub actor_caller: CallerSlot,
    /// Each tenant's outbound connection and DNS budget, shared by its
    /// functions (a tenant without settings gets the defaults, once).
    pub tenant_outbound: Arc<crate::outbound::TenantBudgets>,
}

/// The services behind every store (see the module docs).
pub(crate) struct Shared {
    pub(crate) platform: Platform,
    pub(crate) ticker: Arc<Ticker>,
    pub(crate) scheduler: Option<Arc<dyn GuestScheduler>>,
    /// The epoch slice; a guest still running after half of it in the
    /// caller's task moves to the fair scheduler.
    pub(crate) epoch_tick: Duration,
}

impl Shared {
    /// A lease that keeps the epoch ticker running while a store exists.
    pub(crate) fn store_lease(&self) -> StoreLease {
        self.ticker.lease()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.ticker.stop();
    }
}
