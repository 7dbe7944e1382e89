//! `ignis cluster apply` and `ignis cluster status`: the operator's side of
//! a cluster, talking to its database directly (the nodes' shared source
//! of truth; docs/cluster.md, "Shared deployments").
//!
//! `apply` records a manifest's shared sections (functions, actor
//! classes, routes, cron triggers) and its components as the cluster's
//! next change, then waits for the live nodes to take it: every node
//! applies the latest change within a second (`NOTIFY`, or its poll) and
//! reports the number it took and, if it refused it, why
//! (`ignis_nodes.applied_seq`, `applied_error`). The command fails if a
//! live node refused the change or did not report within the wait.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ignis_store::{Member, PgOptions, PgStore};

use crate::app::ComponentPaths;

/// How often `apply` looks at the nodes' reports while it waits.
const POLL: Duration = Duration::from_millis(100);

async fn open(url: &str) -> anyhow::Result<PgStore> {
    let options = PgOptions {
        max_connections: 2,
        ..PgOptions::default()
    };
    PgStore::open(url, &options)
        .await
        .context("opening the cluster's database")
}

/// Who is recorded as having made a change.
fn operator() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    format!("{user} (ignis cluster apply)")
}

/// Records `manifest` (its components at `paths`) as the cluster's next
/// change and waits up to `wait` for every live node to report it. Returns
/// what to print; fails, after printing the reports, if a node refused it
/// or did not report in time.
pub async fn apply(
    url: &str,
    manifest: &Path,
    paths: &ComponentPaths,
    wait: Duration,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("reading {}", manifest.display()))?;
    let store = open(url).await?;
    let seq = crate::deploy::record_manifest(&store, &text, paths, &operator()).await?;
    writeln!(
        out,
        "recorded {} as change {seq}; waiting for the nodes",
        manifest.display()
    )?;
    let deadline = Instant::now() + wait;
    let members = loop {
        let members: Vec<Member> = store
            .members()
            .await
            .context("reading the cluster's nodes")?
            .into_iter()
            .filter(|m| m.alive)
            .collect();
        if members.iter().all(|m| m.applied_seq >= seq) || Instant::now() >= deadline {
            break members;
        }
        tokio::time::sleep(POLL).await;
    };
    if members.is_empty() {
        writeln!(
            out,
            "no node is running; each applies change {seq} when it starts"
        )?;
        return Ok(());
    }
    let mut failed = 0;
    for m in &members {
        let line = match (&m.applied_error, m.applied_seq) {
            (None, s) if s == seq => format!("applied change {seq}"),
            (_, s) if s > seq => format!("took a later change ({s})"),
            (Some(e), s) if s == seq => {
                failed += 1;
                format!("REFUSED change {seq}: {e}")
            }
            (_, s) => {
                failed += 1;
                format!("did not report within {wait:?} (last change taken: {s})")
            }
        };
        writeln!(out, "node {} ({}): {line}", m.node, m.address)?;
    }
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} live nodes did not apply change {seq}; they serve what they had (fix the manifest and apply again)",
        members.len()
    );
    Ok(())
}

/// The cluster's nodes: alive or not, their internal address and the
/// change each took.
pub async fn status(url: &str) -> anyhow::Result<String> {
    let store = open(url).await?;
    let latest = store
        .latest_deploy()
        .await
        .context("reading the cluster's deployments")?;
    let members = store
        .members()
        .await
        .context("reading the cluster's nodes")?;
    let mut out = String::new();
    match &latest {
        Some(row) => writeln!(
            out,
            "latest change: {} by {} on {}",
            row.seq, row.by, row.node
        ),
        None => writeln!(out, "latest change: none (the nodes serve their manifests)"),
    }?;
    writeln!(
        out,
        "{:<16} {:<6} {:<24} {:<8} ERROR",
        "NODE", "ALIVE", "ADDRESS", "APPLIED"
    )?;
    for m in members {
        writeln!(
            out,
            "{:<16} {:<6} {:<24} {:<8} {}",
            m.node,
            if m.alive { "yes" } else { "no" },
            m.address,
            m.applied_seq,
            m.applied_error.as_deref().unwrap_or("-")
        )?;
    }
    Ok(out)
}
