//! `GET /v1/functions`: what the node runs (functions, routes, actor
//! classes with their live activations, upstreams with their origins'
//! health), for `ignis ls` and scripts.

use std::sync::atomic::Ordering;

use ignis_config::RouteTarget;
use serde::Serialize;

use crate::Node;

/// The whole listing.
#[derive(Debug, Serialize)]
pub struct Listing {
    /// When the process started, seconds since the Unix epoch.
    pub loaded_at_unix: f64,
    /// Functions, by name.
    pub functions: Vec<FunctionInfo>,
    /// Routes, in manifest order.
    pub routes: Vec<RouteInfo>,
    /// Actor classes, by name.
    pub actors: Vec<ActorInfo>,
    /// Upstreams, by name.
    pub upstreams: Vec<UpstreamInfo>,
    /// Recent changes, newest first.
    pub deploys: Vec<crate::deploy::DeployRecord>,
}

/// One function.
#[derive(Debug, Serialize)]
pub struct FunctionInfo {
    /// Its name.
    pub name: String,
    /// Its tenant.
    pub tenant: String,
    /// Requests that reached it so far.
    pub requests: u64,
    /// Requests running in an instance now.
    pub active: u64,
    /// Its instance cap.
    pub max_concurrency: u32,
    /// Its memory limit per instance, in bytes.
    pub memory_bytes: u64,
    /// The version serving (absent only for a node without a deployer).
    pub version: Option<crate::deploy::VersionInfo>,
}

/// One route.
#[derive(Debug, Serialize)]
pub struct RouteInfo {
    /// Host pattern (`null`: any host).
    pub host: Option<String>,
    /// Path pattern.
    pub path: String,
    /// `function`, `actor` or `upstream`.
    pub kind: &'static str,
    /// The target's name.
    pub target: String,
    /// For a function in front of an upstream: the upstream.
    pub upstream: Option<String>,
}

/// One actor class.
#[derive(Debug, Serialize)]
pub struct ActorInfo {
    /// The class.
    pub class: String,
    /// Its tenant.
    pub tenant: String,
    /// Live activations now.
    pub live: u64,
    /// Activations started so far.
    pub activations: u64,
    /// The version serving (absent only for a node without a deployer).
    pub version: Option<crate::deploy::VersionInfo>,
}

/// One upstream.
#[derive(Debug, Serialize)]
pub struct UpstreamInfo {
    /// Its name.
    pub name: String,
    /// Its origins: URL and whether each takes requests now.
    pub origins: Vec<(String, bool)>,
}

/// Lists what `node` runs now.
pub fn read(node: &Node) -> Listing {
    let parts = node.parts();
    let functions = parts
        .functions
        .iter()
        .map(|(name, (f, _))| FunctionInfo {
            name: name.clone(),
            tenant: f.tenant().to_string(),
            requests: f.stats().requests.load(Ordering::Relaxed),
            active: f.stats().active.load(Ordering::Relaxed),
            max_concurrency: f.limits().max_concurrency,
            memory_bytes: f.limits().memory_bytes,
            version: parts.versions.get(name).cloned(),
        })
        .collect();
    let routes = parts
        .routes
        .iter()
        .map(|r| {
            let (kind, target) = match &r.target {
                RouteTarget::Function(n) => ("function", n),
                RouteTarget::Actor(n) => ("actor", n),
                RouteTarget::Upstream(n) => ("upstream", n),
            };
            RouteInfo {
                host: r.host.clone(),
                path: r.path.clone(),
                kind,
                target: target.clone(),
                upstream: r.upstream.clone(),
            }
        })
        .collect();
    let actors = parts.directory.as_ref().map_or_else(Vec::new, |d| {
        d.class_counts()
            .into_iter()
            .map(|c| ActorInfo {
                tenant: d
                    .class(&c.class)
                    .map_or_else(String::new, |k| k.config().tenant.clone()),
                version: parts.actor_versions.get(&c.class).cloned(),
                class: c.class,
                live: c.live,
                activations: c.activations,
            })
            .collect()
    });
    let upstreams = parts
        .upstreams
        .iter()
        .map(|(name, u)| UpstreamInfo {
            name: name.clone(),
            origins: u
                .origin_stats()
                .into_iter()
                .map(|o| (o.url, o.usable))
                .collect(),
        })
        .collect();
    Listing {
        loaded_at_unix: node.started_unix_seconds(),
        functions,
        routes,
        actors,
        upstreams,
        deploys: parts.deploys.clone(),
    }
}
