//! Cron triggers: runs on schedule, through the function's gate or to an
//! actor, counted; an occurrence during a run is skipped, never queued.

use std::time::Duration;

use ignis::app::{self, Sources};
use ignis_actors::cron::CronStats;
use ignis_config::Manifest;

use crate::harness::*;

fn load(triggers: &str) -> app::App {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ncache_dir = \"{}\"\n\
         [storage]\npath = \"{}\"\n\
         [functions.hello]\ncomponent = \"{}\"\n\
         [functions.limits]\ncomponent = \"{}\"\nwall_time = \"10s\"\n\
         [actors.counter]\ncomponent = \"{}\"\n\
         [functions.kv]\ncomponent = \"{}\"\nkey_value_stores = [\"default\"]\n\
         {triggers}",
        shared_cache(),
        tempfile::tempdir()
            .unwrap()
            .keep()
            .join("cron.db")
            .display(),
        wasm("hello"),
        wasm("limits"),
        wasm("counter"),
        wasm("kv"),
    );
    let manifest = Manifest::from_str_at(&text, &repo().join("cron.toml")).expect("manifest");
    app::load(&manifest, Sources::PrebuiltOnly).expect("load")
}

async fn wait(stats: &CronStats, what: &str, check: impl Fn(&CronStats) -> bool) {
    tokio::time::timeout(Duration::from_secs(20), stats.wait_until(check))
        .await
        .unwrap_or_else(|_| panic!("cron: {what} within 20 s"));
}

fn n(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_triggers_call_functions_and_actors_on_schedule_and_count_each_run() {
    let app = load(
        "[[triggers.cron]]\nname = \"tick\"\nschedule = \"* * * * * *\"\nfunction = \"hello\"\npath = \"/hello\"\n\
         [[triggers.cron]]\nname = \"boom\"\nschedule = \"* * * * * *\"\nfunction = \"limits\"\npath = \"/trap\"\n\
         [[triggers.cron]]\nname = \"count\"\nschedule = \"* * * * * *\"\nactor = \"counter\"\nid = \"nightly\"\npath = \"/incr\"\n\
         [[triggers.cron]]\nname = \"store\"\nschedule = \"* * * * * *\"\nfunction = \"kv\"\npath = \"/kv/set?key=cron&value=1\"\n",
    );
    let tasks = app.cron.start();
    let tick = app.cron.trigger("tick").unwrap().stats();
    let boom = app.cron.trigger("boom").unwrap().stats();
    let count = app.cron.trigger("count").unwrap().stats();
    wait(tick, "two runs of `tick`", |s| n(&s.succeeded) >= 2).await;
    wait(boom, "a failed run of `boom`", |s| n(&s.failed) >= 1).await;
    wait(count, "a run of `count`", |s| n(&s.succeeded) >= 1).await;
    let store = app.cron.trigger("store").unwrap().stats();
    wait(store, "a run of `store`", |s| n(&s.succeeded) >= 1).await;
    // Each run was a real request of the function (its own instance).
    let hello = &app.functions["hello"];
    assert!(n(&hello.stats().requests) >= 2);
    assert_eq!(n(&tick.failed), 0);
    assert_eq!(n(&boom.succeeded), 0, "a trap is a failed run");
    assert!(n(&app.functions["limits"].stats().traps) >= 1);
    assert!(
        app.directory
            .as_ref()
            .unwrap()
            .is_active("counter", "nightly")
    );

    // The runs are in the metrics.
    let text = ignis_admin::metrics::render(&app.node);
    let ok_line = text
        .lines()
        .find(|l| l.starts_with("ignis_cron_runs_total{trigger=\"tick\",outcome=\"ok\"}"))
        .unwrap_or_else(|| panic!("{text}"));
    let ok: f64 = ok_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(ok >= 2.0, "{ok_line}");
    assert!(text.contains("ignis_cron_runs_total{trigger=\"boom\",outcome=\"failed\"}"));
    // What those runs did shows in the storage, key-value and actor metrics.
    let value = |prefix: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(value("ignis_kv_operations_total{function=\"kv\",tenant=\"kv\",op=\"set\"}") >= 1.0);
    assert_eq!(
        value("ignis_kv_failures_total{function=\"kv\",tenant=\"kv\",op=\"set\"}"),
        0.0
    );
    assert!(value("ignis_storage_commits_total") >= 1.0);
    assert!(value("ignis_storage_writes_total") >= value("ignis_storage_commits_total"));
    assert!(value("ignis_storage_commit_duration_seconds_count") >= 1.0);
    assert!(value("ignis_actor_class_activations_total{class=\"counter\"") >= 1.0);
    assert_eq!(value("ignis_actor_class_active{class=\"counter\""), 1.0);
    assert_eq!(
        value("ignis_actor_class_evictions_total{class=\"counter\""),
        0.0
    );
    // hello declares no store: no key-value series for it.
    assert!(!text.contains("ignis_kv_operations_total{function=\"hello\""));

    // Shutting the set down stops every trigger and its runs.
    let mut tasks = tasks;
    tasks.shutdown().await;
    assert!(tasks.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_occurrence_during_a_run_is_skipped_and_counted() {
    // Each run sleeps 2.5 s; the schedule fires every second.
    let app = load(
        "[[triggers.cron]]\nname = \"slow\"\nschedule = \"* * * * * *\"\nfunction = \"limits\"\npath = \"/sleep?ms=2500\"\nmethod = \"GET\"\n",
    );
    let _tasks = app.cron.start();
    let slow = app.cron.trigger("slow").unwrap().stats();
    wait(slow, "a finished run and a skipped occurrence", |s| {
        n(&s.succeeded) >= 1 && n(&s.skipped) >= 1
    })
    .await;
    // Never two at once: the function never had two requests in flight.
    let limits = &app.functions["limits"];
    assert!(n(&limits.stats().requests) <= n(&slow.succeeded) + n(&slow.failed) + 1);
}
