//! What the directory needs from a cluster: where an actor lives, this
//! node's membership, and a way to hand a message to another node. The
//! binary implements it on PostgreSQL (`ignis_store::cluster`) and HTTP/2
//! between nodes; the directory only relies on the contract below.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use ignis_runtime::{Error, RequestId};
use ignis_store::{ActorKey, Fence};

/// A boxed future of a cluster operation.
pub type ClusterFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>;

/// Where an actor's messages go.
#[derive(Debug, Clone)]
pub enum Placement {
    /// This node owns the actor under `fence`.
    Local(Fence),
    /// Another live node owns it.
    Remote {
        /// Its id.
        node: String,
        /// Its advertised internal address.
        address: String,
    },
}

/// A message for an actor that another node owns.
pub struct Forward {
    /// The owner's internal address.
    pub address: String,
    /// The actor.
    pub key: ActorKey,
    /// The message, with its `ignis-caller` header already set (or removed).
    pub request: http::Request<Bytes>,
    /// The request's id, kept across nodes.
    pub request_id: RequestId,
    /// Nodes it went through before this hop (1 for the first forward).
    pub hops: u32,
}

/// Forwards a message at most this many times: an owner that changed
/// between a node's placement and the next node's is followed again, up to
/// this; past it the request is refused as a loop (508).
pub const MAX_HOPS: u32 = 3;

/// A cluster of nodes sharing actors (see the module docs).
///
/// The contract the directory relies on: while [`Cluster::session`] returns
/// the same `Some(n)`, no other node can take over an actor this node was
/// given ([`Placement::Local`]) in that session; so an activation started
/// in session `n` may serve messages without asking the database again
/// until the session changes. A session ends when the node's membership
/// may have expired by the database's clock (its heartbeat failed for a
/// lease); a later successful heartbeat starts a new one.
pub trait Cluster: Send + Sync + 'static {
    /// This node's membership session now, `None` while it has lapsed.
    fn session(&self) -> Option<u64>;

    /// Where `key` lives, taking it over if nobody live owns it.
    fn place<'a>(&'a self, key: &'a ActorKey) -> ClusterFuture<'a, Placement>;

    /// Sends a message to its owner and returns the owner's answer.
    fn forward(&self, message: Forward) -> ClusterFuture<'static, http::Response<Bytes>>;

    /// Alarms this node should schedule: those of actors it owns and of
    /// actors nobody live owns, due soon.
    fn due_alarms(&self) -> ClusterFuture<'_, Vec<(ActorKey, u64)>>;

    /// How often [`Cluster::due_alarms`] is asked again.
    fn alarm_poll(&self) -> Duration;
}

/// The error of a message that arrived while this node's membership had
/// lapsed, or for an activation whose lease went: retryable.
pub(super) fn lease_gone(why: &str) -> Error {
    Error::unavailable(why.to_string())
}
