//! `ignis bench SCENARIO`: runs a scenario file (see
//! `ignis_bench::scenario`) against the peers it names, in one run, and
//! writes a markdown report, the raw JSON and a latency plot (SVG).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use ignis_bench::scenario::{Outcome, Peer, Scenario};

use crate::guest_build;

/// Where to find `wasmtime` for `kind = "wasmtime"` peers, and where to write.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The wasmtime binary (wasmtime-cli 48).
    pub wasmtime: PathBuf,
    /// Output directory for `<name>.md`, `<name>.json`, `<name>.svg`.
    pub out: PathBuf,
}

fn free_addr() -> anyhow::Result<String> {
    // The port is free when we let go of it; the peer binds it a moment later.
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

fn peers(scenario: &Scenario, base: &Path, options: &BenchOptions) -> anyhow::Result<Vec<Peer>> {
    let me = std::env::current_exe().context("locating the ignis binary")?;
    let mut peers = Vec::new();
    for spec in &scenario.peers {
        let addr = free_addr()?;
        let mut command = match spec.kind.as_str() {
            "ignis" => {
                let Some(app) = &spec.app else {
                    bail!("peer `{}`: kind `ignis` needs `app`", spec.name);
                };
                let mut c = Command::new(&me);
                c.arg("up")
                    .arg(base.join(app))
                    .args(["--listen", &addr])
                    .env("IGNIS_LOG", "warn");
                c
            }
            "wasmtime" => {
                let Some(guest) = &spec.guest else {
                    bail!("peer `{}`: kind `wasmtime` needs `guest`", spec.name);
                };
                guest_build::ensure_target()?;
                let wasm = guest_build::build_crate(&base.join(guest))?;
                let mut c = Command::new(&options.wasmtime);
                c.args(["serve", "-Scli"])
                    .args(&spec.flags)
                    .args(["--addr", &addr])
                    .arg(wasm);
                c
            }
            other => bail!(
                "peer `{}`: unknown kind `{other}` (ignis, wasmtime)",
                spec.name
            ),
        };
        for (name, value) in &spec.env {
            let value = match value.strip_prefix('$') {
                Some(var) => std::env::var(var).with_context(|| {
                    format!(
                        "peer `{}`: env {name} = ${var}, but {var} is not set",
                        spec.name
                    )
                })?,
                None => value.clone(),
            };
            command.env(name, value);
        }
        peers.push(Peer {
            name: spec.name.clone(),
            command,
            addr,
        });
    }
    Ok(peers)
}

/// Runs the scenario at `path` and writes its report; returns the outcome.
pub async fn run(path: &Path, options: &BenchOptions) -> anyhow::Result<Outcome> {
    let scenario = Scenario::load(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let peers = peers(&scenario, base, options)?;
    let outcome = ignis_bench::scenario::run(&scenario, peers).await?;
    let name = path
        .file_stem()
        .map_or("scenario".into(), |s| s.to_string_lossy().into_owned());
    std::fs::create_dir_all(&options.out)?;
    let md = outcome.markdown();
    let report = format!(
        "# {name}\n\n{}\n\nMeasured {} s per phase after {} s of warm-up.\n\n{md}",
        scenario.description, scenario.seconds, scenario.warmup
    );
    std::fs::write(options.out.join(format!("{name}.md")), &report)?;
    std::fs::write(
        options.out.join(format!("{name}.json")),
        serde_json::to_vec_pretty(&outcome)?,
    )?;
    std::fs::write(
        options.out.join(format!("{name}.svg")),
        outcome.svg(&scenario.description),
    )?;
    println!("{report}");
    println!("wrote {}/{name}.{{md,json,svg}}", options.out.display());
    Ok(outcome)
}
