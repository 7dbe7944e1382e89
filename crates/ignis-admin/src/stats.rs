//! `GET /v1/stats`: the node's counters as one JSON document, for the
//! dashboard (which turns two successive documents into rates and
//! percentiles) and for scripts. Cumulative values only, read at request
//! time like the Prometheus exposition ([`crate::metrics`]).

use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::Node;

/// The whole document.
#[derive(Debug, Serialize)]
pub struct Stats {
    /// Milliseconds since the Unix epoch when it was read.
    pub time_ms: u64,
    /// Whether the node is ready.
    pub ready: bool,
    /// The Ignis version.
    pub version: &'static str,
    /// Upper bounds (seconds) of the duration buckets; the last bucket of
    /// each `duration` has no bound (+Inf).
    pub duration_bounds: &'static [f64],
    /// What the edge served, per target (functions, actor classes,
    /// upstreams, then the edge's own answers).
    pub targets: Vec<Target>,
    /// Per tenant.
    pub tenants: Vec<Tenant>,
    /// Durable actors.
    pub actors: Actors,
    /// Cron triggers.
    pub cron: Vec<Cron>,
    /// Recent changes (deploys, rollbacks, deletes, reloads), newest first.
    pub deploys: Vec<crate::deploy::DeployRecord>,
}

/// One target's counters.
#[derive(Debug, Serialize)]
pub struct Target {
    /// `function`, `actor`, `upstream` or `edge`.
    pub kind: &'static str,
    /// Its name.
    pub name: String,
    /// Its tenant (`-` for upstreams and the edge).
    pub tenant: String,
    /// Requests ended.
    pub requests: u64,
    /// Of those, answered 5xx.
    pub errors: u64,
    /// Request durations: counts per bucket of `duration_bounds` (not
    /// cumulative), the last past the last bound.
    pub duration: Vec<u64>,
    /// For functions: requests running now and waiting in the mailbox.
    pub active: Option<u64>,
    /// For functions: requests waiting in the mailbox now.
    pub queued: Option<u64>,
    /// For functions: requests shed so far.
    pub shed: Option<u64>,
}

/// One tenant.
#[derive(Debug, Serialize)]
pub struct Tenant {
    /// Its name.
    pub name: String,
    /// CPU its guests used, in seconds.
    pub cpu_seconds: f64,
    /// Its scheduling weight.
    pub weight: u32,
}

/// Actor counters.
#[derive(Debug, Serialize)]
pub struct Actors {
    /// Live activations now.
    pub active: u64,
    /// Activations started so far.
    pub activations: u64,
    /// Evictions so far.
    pub evictions: u64,
    /// Per class: messages delivered so far.
    pub classes: Vec<(String, u64)>,
}

/// One cron trigger.
#[derive(Debug, Serialize)]
pub struct Cron {
    /// Its name.
    pub name: String,
    /// Its schedule.
    pub schedule: String,
    /// Runs that succeeded.
    pub ok: u64,
    /// Runs that failed.
    pub failed: u64,
    /// Occurrences skipped.
    pub skipped: u64,
}

/// Reads the node's counters now.
pub fn read(node: &Node) -> Stats {
    let parts = node.parts();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let targets = parts
        .traffic
        .all()
        .map(|t| {
            let codes = t.by_code();
            let function = (t.kind == ignis_edge::observe::Kind::Function)
                .then(|| parts.functions.get(&*t.name))
                .flatten();
            Target {
                kind: t.kind.as_str(),
                name: t.name.to_string(),
                tenant: t.tenant.to_string(),
                requests: codes.iter().map(|(_, n)| n).sum(),
                errors: codes
                    .iter()
                    .filter(|(c, _)| *c >= 500)
                    .map(|(_, n)| n)
                    .sum(),
                duration: t.duration.snapshot().buckets.iter().map(|b| b.1).collect(),
                active: function.map(|(f, _)| load(&f.stats().active)),
                queued: function.map(|(_, g)| u64::from(g.stats().waiting.load(Ordering::Relaxed))),
                shed: function
                    .map(|(_, g)| load(&g.stats().shed_full) + load(&g.stats().shed_timeout)),
            }
        })
        .collect();
    let mut cpu: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for (f, _) in parts.functions.values() {
        *cpu.entry(f.tenant().to_string()).or_default() += load(&f.stats().cpu_nanos);
    }
    let mut actors = Actors {
        active: 0,
        activations: 0,
        evictions: 0,
        classes: Vec::new(),
    };
    if let Some(d) = &parts.directory {
        let s = d.stats();
        actors.active = load(&s.active);
        actors.activations = load(&s.activations);
        actors.evictions = load(&s.evictions);
        for class in d.classes() {
            *cpu.entry(class.config().tenant.clone()).or_default() +=
                load(&class.stats().cpu_nanos);
            actors
                .classes
                .push((class.name().to_string(), load(&class.stats().requests)));
        }
        actors.classes.sort();
    }
    Stats {
        time_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        ready: node.is_ready(),
        version: env!("CARGO_PKG_VERSION"),
        duration_bounds: &ignis_runtime::histogram::BOUNDS_SECONDS,
        targets,
        tenants: cpu
            .into_iter()
            .map(|(name, nanos)| Tenant {
                weight: parts.weights.get(&name).copied().unwrap_or(1),
                name,
                cpu_seconds: nanos as f64 / 1e9,
            })
            .collect(),
        actors,
        cron: parts
            .cron
            .triggers()
            .iter()
            .map(|t| Cron {
                name: t.config().name.clone(),
                schedule: t.config().schedule.clone(),
                ok: load(&t.stats().succeeded),
                failed: load(&t.stats().failed),
                skipped: load(&t.stats().skipped),
            })
            .collect(),
        deploys: parts.deploys.clone(),
    }
}
