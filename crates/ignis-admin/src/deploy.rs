//! Changing what the node runs through the API: `PUT /v1/functions/{name}`
//! deploys a version (a component and the function's manifest table),
//! `POST /v1/functions/{name}/rollback` restores the version before it,
//! `DELETE /v1/functions/{name}` removes the function; `PUT
//! /v1/actors/{class}` and `POST /v1/actors/{class}/rollback` do the same
//! for an actor class (which swaps between messages, never inside one).
//!
//! The admin crate knows the HTTP side only; building and swapping a
//! version is the [`Deployer`]'s job (the `ignis` crate's, which knows how
//! the node was assembled).
//!
//! Invariants:
//! - A change is all or nothing: the reply says what was swapped in, or
//!   why nothing was (422 for a version that does not parse, compile, link
//!   or instantiate, 409 for a conflict). The old version keeps serving.
//! - Two changes to one function at once: one wins, the other gets 409 at
//!   once (never queued behind it). `expect_version` turns a deploy or a
//!   rollback into compare-and-swap.
//! - A change runs to its end even if its client goes away (the work is a
//!   task of its own), so a dropped connection never leaves it half done.
//! - Bodies are bounded ([`MAX_DEPLOY_BYTES`], read within
//!   [`BODY_TIMEOUT`]); every change is logged once with who asked (the
//!   peer, and the name a client gives in `x-ignis-user`) and what changed.
//! - Error texts go to the token holder, who needs them (a compile error,
//!   a missing import, the manifest key that is wrong); they never reach
//!   the public listener.

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

/// Largest deploy request body (the component in base64 and its table).
pub const MAX_DEPLOY_BYTES: usize = 96 << 20;
/// Longest a deploy request's body may take to arrive.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Longest `x-ignis-user` kept (longer names are cut).
pub const MAX_USER_BYTES: usize = 64;

/// A boxed future of a change's outcome.
pub type Change<'a> = Pin<Box<dyn Future<Output = Result<Deployed, DeployError>> + Send + 'a>>;

/// What a change is to: a function or an actor class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnitKind {
    /// `[functions.NAME]`, `/v1/functions/NAME`.
    Function,
    /// `[actors.NAME]`, `/v1/actors/NAME`.
    Actor,
}

impl UnitKind {
    /// The manifest table holding it.
    pub fn table(self) -> &'static str {
        match self {
            UnitKind::Function => "functions",
            UnitKind::Actor => "actors",
        }
    }

    /// How messages name it.
    pub fn noun(self) -> &'static str {
        match self {
            UnitKind::Function => "function",
            UnitKind::Actor => "actor class",
        }
    }
}

/// Builds and swaps versions of functions and actor classes; implemented
/// by the application.
pub trait Deployer: Send + Sync {
    /// Deploys `request.component` as the next version of `request.name`.
    fn deploy(&self, request: DeployRequest) -> Change<'_>;
    /// Restores the version before the current one of `(kind, name)`.
    fn rollback(
        &self,
        kind: UnitKind,
        name: String,
        expect_version: Option<u64>,
        by: String,
    ) -> Change<'_>;
    /// Removes function `function`.
    fn delete(&self, function: String, by: String) -> Change<'_>;
}

/// One deploy, as the API received it.
#[derive(Debug)]
pub struct DeployRequest {
    /// A function or an actor class.
    pub kind: UnitKind,
    /// Its name.
    pub name: String,
    /// Its manifest table, in TOML, without the `[functions.NAME]` header
    /// (`component` and `build` are ignored: the component is uploaded).
    pub config: String,
    /// The component's bytes.
    pub component: Vec<u8>,
    /// Refuse (409) unless the function's current version is this one
    /// (0: the function must not exist yet).
    pub expect_version: Option<u64>,
    /// Who asked, for the log.
    pub by: String,
}

/// The JSON body of `PUT /v1/functions/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployBody {
    /// The function's manifest table, TOML.
    #[serde(default)]
    pub config: String,
    /// The component, base64 (standard alphabet, padded).
    pub component: String,
    /// Compare-and-swap on the current version.
    #[serde(default)]
    pub expect_version: Option<u64>,
}

/// The JSON body of `POST /v1/functions/{name}/rollback` (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    /// Compare-and-swap on the current version.
    #[serde(default)]
    pub expect_version: Option<u64>,
}

/// What a change did.
#[derive(Debug, Clone, Serialize)]
pub struct Deployed {
    /// `function` or `actor`.
    pub kind: UnitKind,
    /// The function or actor class.
    pub name: String,
    /// `deploy`, `rollback` or `delete`.
    pub action: &'static str,
    /// The version serving now (0 after a delete).
    pub version: u64,
    /// SHA-256 of the component serving now (hex; empty after a delete).
    pub sha256: String,
    /// Whether anything changed (a deploy of the version already serving
    /// changes nothing).
    pub changed: bool,
    /// Milliseconds from the request to the swap (compiling and
    /// pre-instantiating included).
    pub took_ms: u64,
}

/// Why a change was refused; nothing changed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeployError {
    /// Another change to the function is under way, or `expect_version`
    /// did not match, or there is no version to roll back to.
    #[error("{0}")]
    Conflict(String),
    /// The version is not acceptable: its table, its component, a limit the
    /// node was started with.
    #[error("{0}")]
    Invalid(String),
    /// No such function.
    #[error("{0}")]
    NotFound(String),
    /// The node failed while changing (logged in full; nothing swapped).
    #[error("{0}")]
    Internal(String),
}

impl DeployError {
    /// The status the API answers with.
    pub fn status(&self) -> http::StatusCode {
        match self {
            DeployError::Conflict(_) => http::StatusCode::CONFLICT,
            DeployError::Invalid(_) => http::StatusCode::UNPROCESSABLE_ENTITY,
            DeployError::NotFound(_) => http::StatusCode::NOT_FOUND,
            DeployError::Internal(_) => http::StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// One applied change, for `/v1/functions`, `/v1/stats` and the dashboard.
#[derive(Debug, Clone, Serialize)]
pub struct DeployRecord {
    /// When it was swapped in, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// `function` or `actor` (`null` for the start).
    pub kind: Option<UnitKind>,
    /// The function or actor class (`*` for the start).
    pub name: String,
    /// `start`, `deploy`, `rollback`, `delete`, `reload` or `restore` (API
    /// changes served again after a restart).
    pub action: &'static str,
    /// The version serving after it (0 after a delete).
    pub version: u64,
    /// Who asked (`api PEER (NAME)`, `SIGHUP`, `watch`, `start`).
    pub by: String,
}

/// A function's version as the listing shows it.
#[derive(Debug, Clone, Serialize)]
pub struct VersionInfo {
    /// Its number (1 for what the node started with, +1 per deploy).
    pub version: u64,
    /// SHA-256 of its component, hex.
    pub sha256: String,
    /// When it was swapped in, milliseconds since the Unix epoch.
    pub deployed_ms: u64,
    /// The versions a rollback can go back to, newest first.
    pub previous: Vec<u64>,
}

/// The name a client gives in `x-ignis-user`, reduced to visible ASCII and
/// at most [`MAX_USER_BYTES`] (it goes to the log).
pub fn user_name(headers: &http::HeaderMap) -> Option<String> {
    let value = headers.get("x-ignis-user")?.as_bytes();
    let name: String = value
        .iter()
        .filter(|b| b.is_ascii_graphic() || **b == b' ')
        .take(MAX_USER_BYTES)
        .map(|b| char::from(*b))
        .collect();
    (!name.trim().is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(value: &[u8]) -> Option<String> {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "x-ignis-user",
            http::HeaderValue::from_bytes(value).unwrap(),
        );
        user_name(&headers)
    }

    /// `x-ignis-user` goes to the log and the deploy history: only visible
    /// ASCII and spaces are kept, at most 64 bytes; nothing usable is none.
    #[test]
    fn the_user_header_is_cut_to_visible_ascii() {
        assert_eq!(user(b"alice@ci"), Some("alice@ci".into()));
        assert_eq!(user(b"al\tice\xff\xfe"), Some("alice".into()));
        let long = "x".repeat(500);
        assert_eq!(user(long.as_bytes()).map(|u| u.len()), Some(MAX_USER_BYTES));
        assert_eq!(user(b"   "), None);
        assert_eq!(user(b"\xff\xfe\t"), None);
        assert_eq!(user_name(&http::HeaderMap::new()), None);
    }
}
