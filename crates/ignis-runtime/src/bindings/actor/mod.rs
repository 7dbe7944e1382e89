//! `ignis:actor`: storage, alarms and context for actors
//! ([`add_storage_to_linker`]), and the client every guest may use to call
//! an actor ([`add_client_to_linker`]). docs/actors.md states the
//! semantics.

mod client;
mod overlay;
mod storage;

pub use client::{ActorCallFuture, ActorCaller, CallerId, CallerSlot, ClientState, ClientView};
pub use overlay::Overlay;
pub(crate) use storage::WriteLimits;
pub use storage::{ActorState, ActorView};

use wasmtime::component::{HasData, Linker};

mod generated {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "ignis:actor/actor-imports",
        imports: { default: async | trappable },
    });
}

use generated::ignis::actor::{
    alarms, client as client_iface, context, storage as storage_iface, types,
};

struct HasClient;

impl HasData for HasClient {
    type Data<'a> = ClientView<'a>;
}

struct HasActor;

impl HasData for HasActor {
    type Data<'a> = ActorView<'a>;
}

/// Adds `ignis:actor/types` and `ignis:actor/client` to `linker`.
pub fn add_client_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> ClientView<'_>,
) -> wasmtime::Result<()> {
    types::add_to_linker::<T, HasClient>(linker, get)?;
    client_iface::add_to_linker::<T, HasClient>(linker, get)
}

/// Adds `ignis:actor/storage`, `alarms` and `context` to `linker` (an
/// actor class's linker; `types` comes with the client).
pub fn add_storage_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> ActorView<'_>,
) -> wasmtime::Result<()> {
    storage_iface::add_to_linker::<T, HasActor>(linker, get)?;
    alarms::add_to_linker::<T, HasActor>(linker, get)?;
    context::add_to_linker::<T, HasActor>(linker, get)
}

type R<T> = wasmtime::Result<Result<T, types::Error>>;
