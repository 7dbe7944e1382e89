//! Cron triggers (`[[triggers.cron]]`): a request to a function, or a
//! message to one actor, on a schedule.
//!
//! Invariants:
//! - Schedules are read in UTC (croner: 5 fields, or 6 with seconds
//!   first). Each trigger has one task that sleeps until its next
//!   occurrence; an occurrence fires at most once, even if the task wakes a
//!   little early or the wall clock steps back (the next one is searched
//!   after the later of now and the last one fired).
//! - A run is an ordinary request with its own id and limits: a function's
//!   goes through its admission gate (it can be shed like any request, and
//!   is then counted as failed), an actor's through the directory.
//! - At most one run of a trigger is in flight: an occurrence that comes
//!   while the previous run is still going is skipped, counted and logged,
//!   never queued (a slow job cannot pile up behind itself).
//! - Every run is logged once under `ignis::cron` with its outcome, and
//!   counted ([`CronStats`]). The response body is read and dropped as it
//!   arrives (nothing is buffered).
//! - In a cluster every node schedules every trigger, and each occurrence
//!   runs on one node: the first to claim it ([`CronClaim`], one row per
//!   trigger and occurrence in the database). A node that cannot reach the
//!   database skips the occurrence (counted as failed): at most once.
//! - A deploy builds the next triggers with [`CronTriggers::next`]: a
//!   trigger of the same name keeps its counters and its in-flight flag
//!   (an old run still going makes the new trigger skip, as before), and
//!   the old tasks are retired with [`CronTasks::retire`]: they schedule
//!   nothing more, and a run in flight finishes on the old version.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::BodyExt;
use ignis_config::{CronTarget, CronTrigger, Manifest};
use ignis_runtime::{Error, ErrorKind, RequestId, RequestMeta};

use crate::{ActorDirectory, FunctionGate};

/// Counters of one trigger.
#[derive(Debug, Default)]
pub struct CronStats {
    /// Runs that got a 2xx or 3xx answer.
    pub succeeded: AtomicU64,
    /// Runs that failed (an error, a shed request, a 4xx or 5xx answer).
    pub failed: AtomicU64,
    /// Occurrences skipped because the previous run was still going.
    pub skipped: AtomicU64,
    running: AtomicBool,
    changed: tokio::sync::Notify,
}

impl CronStats {
    /// Waits until `check` holds; re-checked after every run or skip.
    pub async fn wait_until(&self, check: impl Fn(&Self) -> bool) {
        ignis_runtime::wait_on(&self.changed, || check(self)).await;
    }

    fn bump(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
    }
}

enum Target {
    Function(Arc<FunctionGate>),
    Actor {
        directory: Arc<ActorDirectory>,
        class: String,
        id: String,
    },
}

/// One trigger: its configuration, parsed schedule, target and counters.
pub struct Trigger {
    config: CronTrigger,
    schedule: croner::Cron,
    target: Target,
    stats: Arc<CronStats>,
    claim: Option<Arc<dyn CronClaim>>,
}

impl Trigger {
    /// Its configuration.
    pub fn config(&self) -> &CronTrigger {
        &self.config
    }

    /// Its counters.
    pub fn stats(&self) -> &CronStats {
        &self.stats
    }

    /// What it calls, for logs: `function NAME` or `actor CLASS/ID`.
    fn target_name(&self) -> String {
        match &self.config.target {
            CronTarget::Function(f) => format!("function {f}"),
            CronTarget::Actor { class, id } => format!("actor {class}/{id}"),
        }
    }
}

/// Decides which node of a cluster runs an occurrence.
pub trait CronClaim: Send + Sync + 'static {
    /// Claims occurrence `at_ms` (Unix milliseconds) of trigger `name` for
    /// this node: `Ok(true)` if no node had, `Ok(false)` if another did.
    fn claim<'a>(&'a self, name: &'a str, at_ms: i64) -> crate::ClusterFuture<'a, bool>;
}

/// The manifest's cron triggers.
pub struct CronTriggers {
    triggers: Vec<Arc<Trigger>>,
    claim: Option<Arc<dyn CronClaim>>,
}

/// A trigger whose target is not deployed (the manifest checker makes
/// this impossible for a manifest it accepted).
#[derive(Debug, thiserror::Error)]
#[error("cron trigger `{trigger}`: {why}")]
pub struct CronError {
    trigger: String,
    why: String,
}

impl CronTriggers {
    /// The triggers of `manifest`, bound to the functions' gates and the
    /// actor directory.
    pub fn new(
        manifest: &Manifest,
        gates: &std::collections::BTreeMap<String, Arc<FunctionGate>>,
        directory: Option<&Arc<ActorDirectory>>,
    ) -> Result<CronTriggers, CronError> {
        Self::build(manifest, gates, directory, None, None)
    }

    /// The triggers of `manifest` on a node of a cluster: each occurrence
    /// runs on the one node that claims it.
    pub fn in_cluster(
        manifest: &Manifest,
        gates: &std::collections::BTreeMap<String, Arc<FunctionGate>>,
        directory: Option<&Arc<ActorDirectory>>,
        claim: Option<Arc<dyn CronClaim>>,
    ) -> Result<CronTriggers, CronError> {
        Self::build(manifest, gates, directory, None, claim)
    }

    /// The triggers of `manifest` after a deploy: those named as before
    /// keep their counters and in-flight flag.
    pub fn next(
        &self,
        manifest: &Manifest,
        gates: &std::collections::BTreeMap<String, Arc<FunctionGate>>,
        directory: Option<&Arc<ActorDirectory>>,
    ) -> Result<CronTriggers, CronError> {
        Self::build(manifest, gates, directory, Some(self), self.claim.clone())
    }

    fn build(
        manifest: &Manifest,
        gates: &std::collections::BTreeMap<String, Arc<FunctionGate>>,
        directory: Option<&Arc<ActorDirectory>>,
        previous: Option<&CronTriggers>,
        claim: Option<Arc<dyn CronClaim>>,
    ) -> Result<CronTriggers, CronError> {
        let mut triggers = Vec::new();
        for config in &manifest.cron {
            let fail = |why: String| CronError {
                trigger: config.name.clone(),
                why,
            };
            let schedule = <croner::Cron as std::str::FromStr>::from_str(&config.schedule)
                .map_err(|e| fail(format!("schedule `{}`: {e}", config.schedule)))?;
            let target = match &config.target {
                CronTarget::Function(f) => Target::Function(
                    gates
                        .get(f)
                        .cloned()
                        .ok_or_else(|| fail(format!("no function `{f}`")))?,
                ),
                CronTarget::Actor { class, id } => {
                    let directory = directory
                        .filter(|d| d.class(class).is_some())
                        .ok_or_else(|| fail(format!("no actor class `{class}`")))?;
                    Target::Actor {
                        directory: directory.clone(),
                        class: class.clone(),
                        id: id.clone(),
                    }
                }
            };
            triggers.push(Arc::new(Trigger {
                config: config.clone(),
                schedule,
                target,
                stats: previous
                    .and_then(|p| p.trigger(&config.name))
                    .map_or_else(Default::default, |t| t.stats.clone()),
                claim: claim.clone(),
            }));
        }
        Ok(CronTriggers { triggers, claim })
    }

    /// Every trigger, in manifest order.
    pub fn triggers(&self) -> &[Arc<Trigger>] {
        &self.triggers
    }

    /// The trigger named `name`.
    pub fn trigger(&self, name: &str) -> Option<&Arc<Trigger>> {
        self.triggers.iter().find(|t| t.config.name == name)
    }

    /// Starts one task per trigger on the current tokio runtime; they stop
    /// when the returned tasks are dropped (runs in flight are dropped too,
    /// which cancels their guests) or retired.
    pub fn start(&self) -> CronTasks {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        for t in &self.triggers {
            tasks.spawn(schedule(t.clone(), stopped.clone()));
        }
        CronTasks { tasks, stop }
    }
}

/// The running triggers of one [`CronTriggers`].
#[derive(Debug)]
pub struct CronTasks {
    tasks: tokio::task::JoinSet<()>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl CronTasks {
    /// Stops every trigger and cancels its runs in flight; returns when all
    /// have ended.
    pub async fn shutdown(&mut self) {
        self.tasks.shutdown().await;
    }

    /// Whether no trigger task is left.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Stops scheduling; runs in flight finish (in a task of their own).
    pub fn retire(mut self) {
        let _ = self.stop.send(true);
        let mut tasks = std::mem::take(&mut self.tasks);
        tokio::spawn(async move { while tasks.join_next().await.is_some() {} });
    }
}

/// Fires `trigger` at each occurrence until told to stop.
async fn schedule(trigger: Arc<Trigger>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut runs = tokio::task::JoinSet::new();
    let mut last: Option<DateTime<Utc>> = None;
    loop {
        if *stop.borrow() {
            while runs.join_next().await.is_some() {}
            return;
        }
        let now = Utc::now();
        let from = last.map_or(now, |l| l.max(now));
        let next = match trigger.schedule.find_next_occurrence(&from, false) {
            Ok(next) => next,
            Err(e) => {
                tracing::warn!(target: "ignis::cron", trigger = %trigger.config.name, error = %e, "cron trigger has no next occurrence; it stops");
                return;
            }
        };
        let wait = (next - now).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            // Reap finished runs while waiting.
            Some(_) = runs.join_next(), if !runs.is_empty() => continue,
            _ = stop.changed() => continue,
        }
        last = Some(next);
        if trigger.stats.running.swap(true, Ordering::SeqCst) {
            tracing::info!(target: "ignis::cron", trigger = %trigger.config.name, scheduled = %next.to_rfc3339(), "cron run skipped: the previous run is still going");
            trigger.stats.bump(&trigger.stats.skipped);
            continue;
        }
        runs.spawn(run(trigger.clone(), next));
    }
}

/// Clears `running` however the run ends (also when its task is dropped).
struct Running(Arc<Trigger>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.stats.running.store(false, Ordering::SeqCst);
        self.0.stats.changed.notify_waiters();
    }
}

/// One run of `trigger`, for the occurrence `at`.
async fn run(trigger: Arc<Trigger>, at: DateTime<Utc>) {
    let _running = Running(trigger.clone());
    let id = RequestId::new();
    let name = &trigger.config.name;
    if let Some(claim) = &trigger.claim {
        match claim.claim(name, at.timestamp_millis()).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(target: "ignis::cron", trigger = %name, scheduled = %at.to_rfc3339(), "cron occurrence runs on another node");
                return;
            }
            Err(e) => {
                tracing::warn!(target: "ignis::cron", trigger = %name, scheduled = %at.to_rfc3339(), error = %e.detail(), "cron occurrence skipped: it could not be claimed");
                trigger.stats.bump(&trigger.stats.failed);
                return;
            }
        }
    }
    let started = Instant::now();
    let outcome = call(&trigger, at, id).await;
    let took_ms = started.elapsed().as_secs_f64() * 1000.0;
    match outcome {
        Ok(status) => {
            let ok = status < 400;
            tracing::info!(target: "ignis::cron", trigger = %name, request_id = %id, to = %trigger.target_name(), status, duration_ms = took_ms, "cron run");
            trigger.stats.bump(if ok {
                &trigger.stats.succeeded
            } else {
                &trigger.stats.failed
            });
        }
        Err(e) => {
            e.log(name, id);
            tracing::info!(target: "ignis::cron", trigger = %name, request_id = %id, to = %trigger.target_name(), status = e.status(), duration_ms = took_ms, "cron run failed");
            trigger.stats.bump(&trigger.stats.failed);
        }
    }
}

/// Sends the request and drains the answer; returns its status.
async fn call(trigger: &Trigger, at: DateTime<Utc>, id: RequestId) -> Result<u16, Error> {
    let c = &trigger.config;
    let request = http::Request::builder()
        .method(c.method.clone())
        .uri(format!("http://localhost{}", c.path))
        .header(http::header::HOST, "localhost")
        .header("ignis-cron", c.name.as_str())
        .header("ignis-cron-scheduled", at.to_rfc3339())
        .header(ignis_runtime::X_REQUEST_ID, id.header())
        .header(ignis_runtime::TRACEPARENT, id.traceparent());
    match &trigger.target {
        Target::Function(gate) => {
            let request = request
                .body(
                    http_body_util::Empty::<Bytes>::new()
                        .map_err(|never| -> ignis_runtime::HttpError { match never {} }),
                )
                .map_err(bad_request)?;
            let resp = gate.call(request, RequestMeta::new(id)).await?;
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            while let Some(frame) = body.frame().await {
                if frame.is_err() {
                    return Err(Error::new(ErrorKind::Internal)
                        .context("the response body of a cron run failed"));
                }
            }
            Ok(status)
        }
        Target::Actor {
            directory,
            class,
            id: actor,
        } => {
            let request = request.body(Bytes::new()).map_err(bad_request)?;
            let resp = directory.send(class, actor, request, id, None).await?;
            Ok(resp.status().as_u16())
        }
    }
}

fn bad_request(e: http::Error) -> Error {
    Error::new(ErrorKind::Internal)
        .context("building a cron request")
        .with_source(e)
}
