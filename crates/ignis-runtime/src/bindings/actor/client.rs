//! `ignis:actor/client`: a guest sends a request to actor `(class, id)` and
//! waits for its (durably committed) reply. The directory that delivers it
//! lives above the runtime (`ignis-actors`) and is installed into a
//! [`CallerSlot`] once built.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use ignis_store::ActorKey;

use super::R;
use super::generated::ignis::actor::{client, types};
use crate::RequestId;
use crate::error::{Error, ErrorKind};

/// A boxed future of an actor call.
pub type ActorCallFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Bytes>, Error>> + Send>>;

/// Who calls an actor: a function or an actor class, and its tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerId {
    /// The caller's tenant.
    pub tenant: Arc<str>,
    /// The function or actor class name.
    pub name: Arc<str>,
}

/// Sends messages to actors. Implemented by the actor directory
/// (`ignis-actors`), installed into the runtime after it is built.
pub trait ActorCaller: Send + Sync {
    /// Delivers `request` (of request `request_id`, from `caller`) to actor
    /// `(class, id)` and resolves with its reply once the writes it made
    /// are durable. The directory decides whether `caller` may.
    fn call(
        &self,
        class: &str,
        id: &str,
        request: http::Request<Bytes>,
        request_id: RequestId,
        caller: &CallerId,
    ) -> ActorCallFuture;
}

/// Where the actor caller will be, shared by every store.
pub type CallerSlot = Arc<OnceLock<Arc<dyn ActorCaller>>>;

/// The client state of one store: the way to the directory, who is
/// calling (an actor may not call itself: it would wait for itself), and
/// the request id.
pub struct ClientState {
    caller: CallerSlot,
    me: CallerId,
    this_actor: Option<ActorKey>,
    request_id: RequestId,
}

impl ClientState {
    /// The client of `me` (a function, or the actor `this_actor`).
    pub fn new(
        caller: CallerSlot,
        me: CallerId,
        this_actor: Option<ActorKey>,
        request_id: RequestId,
    ) -> ClientState {
        ClientState {
            caller,
            me,
            this_actor,
            request_id,
        }
    }

    pub(crate) fn begin(&mut self, request_id: RequestId) {
        self.request_id = request_id;
    }
}

/// The client view of a store's host state.
pub struct ClientView<'a> {
    state: &'a ClientState,
}

impl<'a> ClientView<'a> {
    /// The view over `state`.
    pub fn new(state: &'a ClientState) -> ClientView<'a> {
        ClientView { state }
    }
}

impl types::Host for ClientView<'_> {}

impl client::Host for ClientView<'_> {
    async fn call(
        &mut self,
        class: String,
        id: String,
        method: String,
        path: String,
        body: Vec<u8>,
    ) -> R<client::Response> {
        let s = self.state;
        if s.this_actor
            .as_ref()
            .is_some_and(|me| me.class() == class && me.id() == id)
        {
            return Ok(Err(types::Error::Invalid(
                "an actor cannot send a message to itself (it would wait for itself)".into(),
            )));
        }
        let Some(caller) = s.caller.get().cloned() else {
            return Ok(Err(types::Error::NoSuchClass(class)));
        };
        let request = match http::Request::builder()
            .method(method.as_str())
            .uri(format!("http://{class}.actor{path}"))
            .body(Bytes::from(body))
        {
            Ok(r) => r,
            Err(e) => return Ok(Err(types::Error::Invalid(format!("bad request: {e}")))),
        };
        Ok(
            match caller.call(&class, &id, request, s.request_id, &s.me).await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    Ok(client::Response {
                        status: parts.status.as_u16(),
                        headers: parts
                            .headers
                            .iter()
                            .map(|(k, v)| {
                                (
                                    k.to_string(),
                                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                )
                            })
                            .collect(),
                        body: body.to_vec(),
                    })
                }
                Err(e) => {
                    // The guest gets the interface's error; the cause is logged
                    // here, the one place that sees it.
                    e.log(&s.me.name, s.request_id);
                    Err(match e.kind() {
                        ErrorKind::NotFound => types::Error::NoSuchClass(class),
                        ErrorKind::Forbidden => types::Error::Forbidden(e.public()),
                        ErrorKind::BadRequest => types::Error::Invalid(e.public()),
                        _ => types::Error::Unavailable(e.public()),
                    })
                }
            },
        )
    }
}
