//! Benchmark scenarios described in files, run against several peers in one
//! run.
//!
//! A scenario (TOML) names loads (a path, and an open-loop rate or a
//! closed-loop connection count), phases (which loads run together) and the
//! ratios to report. [`run`] starts each peer in turn, runs every phase
//! against it, stops it, and returns the reports; [`Outcome::markdown`] and
//! [`Outcome::svg`] turn them into a table and a plot.
//!
//! ```toml
//! description = "L at a fixed rate, alone and next to a CPU-heavy flood"
//! seconds = 15
//! warmup = 2
//!
//! [[peers]]
//! name = "ignis"
//! kind = "ignis"
//! app = "noisy-neighbour"   # a directory with an ignis.toml
//!
//! [[loads]]
//! name = "L"
//! path = "/light"
//! rate = 200          # open loop, requests/s
//! connections = 8
//!
//! [[loads]]
//! name = "H"
//! path = "/heavy?ms=20"
//! connections = 8     # closed loop: no rate
//!
//! [[phases]]
//! name = "alone"
//! loads = ["L"]
//!
//! [[phases]]
//! name = "with H"
//! loads = ["L", "H"]
//!
//! [[ratios]]
//! name = "L p99 with H / alone, Ignis"
//! target = "<= 3"
//! num = { peer = "ignis", phase = "with H", load = "L", metric = "p99" }
//! den = { peer = "ignis", phase = "alone", load = "L", metric = "p99" }
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::plot::{Panel, Series, percentile_svg};
use crate::{LoadSpec, Report};

/// A scenario file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// What it measures.
    pub description: String,
    /// Measured seconds per phase.
    pub seconds: f64,
    /// Unmeasured warm-up seconds per phase.
    #[serde(default = "default_warmup")]
    pub warmup: f64,
    /// The servers to measure.
    pub peers: Vec<PeerSpec>,
    /// The loads.
    pub loads: Vec<Load>,
    /// The phases, run in order against each peer.
    pub phases: Vec<Phase>,
    /// Ratios to compute from the results.
    #[serde(default)]
    pub ratios: Vec<Ratio>,
}

fn default_warmup() -> f64 {
    1.0
}

/// A server to measure, as the scenario file describes it; the caller
/// (`ignis bench`) turns it into a command line.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSpec {
    /// Its name in reports and ratios.
    pub name: String,
    /// `ignis` (serves `app` with `ignis up`) or `wasmtime` (`wasmtime serve`
    /// of the component built from `guest`).
    pub kind: String,
    /// For `ignis`: a directory holding an `ignis.toml`, relative to the scenario file.
    pub app: Option<std::path::PathBuf>,
    /// For `wasmtime`: a Rust guest crate directory, relative to the scenario file.
    pub guest: Option<std::path::PathBuf>,
    /// For `wasmtime`: extra `serve` flags (`-Skeyvalue`, ...), after `-Scli`.
    #[serde(default)]
    pub flags: Vec<String>,
    /// Environment variables for the peer's process. A value `$NAME` is the
    /// bench's own variable `NAME` (it must be set): a connection string,
    /// say, that the script starting the bench made up.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
}

/// One stream of requests.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Load {
    /// Its name in phases and ratios.
    pub name: String,
    /// Request path and query.
    pub path: String,
    /// Open-loop rate in requests/s; closed loop when absent.
    pub rate: Option<f64>,
    /// Keep-alive connections.
    pub connections: usize,
}

/// Loads that run at the same time.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// Its name.
    pub name: String,
    /// Names of the loads.
    pub loads: Vec<String>,
}

/// A figure to compute: `num / den`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Ratio {
    /// What it is.
    pub name: String,
    /// The goal, as text (`"<= 3"`, `">= 0.9"`), checked and printed.
    pub target: Option<String>,
    /// Numerator.
    pub num: Pick,
    /// Denominator.
    pub den: Pick,
}

/// One number from the results.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pick {
    /// Peer name.
    pub peer: String,
    /// Phase name.
    pub phase: String,
    /// Load name.
    pub load: String,
    /// `p50`, `p90`, `p99`, `p999`, `max` (microseconds), `throughput`, `errors`.
    pub metric: String,
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let s: Scenario =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        for phase in &s.phases {
            for l in &phase.loads {
                if !s.loads.iter().any(|x| &x.name == l) {
                    bail!(
                        "{}: phase `{}` names unknown load `{l}`",
                        path.display(),
                        phase.name
                    );
                }
            }
        }
        if s.seconds <= 0.0 || s.phases.is_empty() {
            bail!(
                "{}: needs seconds > 0 and at least one phase",
                path.display()
            );
        }
        Ok(s)
    }
}

/// A server to measure: started before its phases, killed after.
#[derive(Debug)]
pub struct Peer {
    /// Its name in reports and ratios.
    pub name: String,
    /// How to start it.
    pub command: Command,
    /// `host:port` it listens on.
    pub addr: String,
}

/// Results: `peer -> phase -> load -> report`.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The scenario that ran.
    pub scenario: Scenario,
    /// Reports.
    pub results: BTreeMap<String, BTreeMap<String, BTreeMap<String, Report>>>,
    /// Peer names in run order.
    pub peers: Vec<String>,
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `addr` answers 200 on `path` (a peer starting up), for at most 60 s.
pub async fn wait_ready(addr: &str, path: &str) -> anyhow::Result<()> {
    let spec = LoadSpec {
        addr: addr.to_string(),
        path: path.to_string(),
        connections: 1,
        duration: Duration::from_millis(100),
        warmup: Duration::ZERO,
        rate: None,
        ..LoadSpec::new("", "", 0, Duration::ZERO)
    };
    for _ in 0..600 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            let r = crate::run(&spec).await;
            if r.statuses.get(&200).copied().unwrap_or(0) > 0 {
                return Ok(());
            }
        }
        // Polling a child process that is starting up; nothing to wait on.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{addr} did not answer 200 on {path} within 60 s")
}

/// Runs every phase of `scenario` against each peer, one peer at a time.
pub async fn run(scenario: &Scenario, peers: Vec<Peer>) -> anyhow::Result<Outcome> {
    let mut results = BTreeMap::new();
    let mut names = Vec::new();
    for mut peer in peers {
        let child = peer
            .command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", peer.name))?;
        let running = Running(child);
        let first = &scenario.loads[0].path;
        wait_ready(&peer.addr, first)
            .await
            .with_context(|| format!("peer {}", peer.name))?;
        let mut phases = BTreeMap::new();
        for phase in &scenario.phases {
            let tasks: Vec<_> = phase
                .loads
                .iter()
                .map(|name| {
                    let load = scenario
                        .loads
                        .iter()
                        .find(|l| &l.name == name)
                        .expect("checked at load");
                    let spec = LoadSpec {
                        addr: peer.addr.clone(),
                        path: load.path.clone(),
                        connections: load.connections,
                        duration: Duration::from_secs_f64(scenario.seconds),
                        warmup: Duration::from_secs_f64(scenario.warmup),
                        rate: load.rate,
                        ..LoadSpec::new("", "", 0, Duration::ZERO)
                    };
                    let name = name.clone();
                    tokio::spawn(async move { (name, crate::run(&spec).await) })
                })
                .collect();
            let mut loads = BTreeMap::new();
            for t in tasks {
                let (name, report) = t.await.context("load task")?;
                eprintln!(
                    "{:>10} | {:<12} | {:<4} | {:>8.0} req/s | p50 {:>8} us p99 {:>9} us p99.9 {:>9} us | statuses {:?} io errors {} unfinished {}",
                    peer.name,
                    phase.name,
                    name,
                    report.throughput,
                    report.latency_us.p50,
                    report.latency_us.p99,
                    report.latency_us.p999,
                    report.statuses,
                    report.io_errors,
                    report.unfinished
                );
                loads.insert(name, report);
            }
            phases.insert(phase.name.clone(), loads);
        }
        drop(running);
        results.insert(peer.name.clone(), phases);
        names.push(peer.name);
    }
    Ok(Outcome {
        scenario: scenario.clone(),
        results,
        peers: names,
    })
}

/// A ratio from the scenario, computed.
#[derive(Debug, Clone, Serialize)]
pub struct RatioValue {
    /// Its name.
    pub name: String,
    /// `num / den`, if both exist and `den > 0`.
    pub value: Option<f64>,
    /// The goal.
    pub target: Option<String>,
    /// Whether the goal is met (when both a value and a parsable goal exist).
    pub met: Option<bool>,
}

/// Failed requests of a report: non-2xx statuses, I/O errors, unfinished.
pub fn errors(r: &Report) -> u64 {
    r.io_errors
        + r.unfinished
        + r.statuses
            .iter()
            .filter(|(s, _)| !(200..300).contains(*s))
            .map(|(_, n)| n)
            .sum::<u64>()
}

fn metric(r: &Report, m: &str) -> Option<f64> {
    Some(match m {
        "p50" => r.latency_us.p50 as f64,
        "p90" => r.latency_us.p90 as f64,
        "p99" => r.latency_us.p99 as f64,
        "p999" => r.latency_us.p999 as f64,
        "max" => r.latency_us.max as f64,
        "throughput" => r.throughput,
        "errors" => errors(r) as f64,
        // A constant, to report a count as a "ratio" with a target.
        "one" => 1.0,
        _ => return None,
    })
}

fn meets(value: f64, target: &str) -> Option<bool> {
    let t = target.trim();
    let (op, rest) = if let Some(r) = t.strip_prefix("<=") {
        ("<=", r)
    } else if let Some(r) = t.strip_prefix(">=") {
        (">=", r)
    } else {
        return None;
    };
    let bound: f64 = rest.trim().parse().ok()?;
    Some(if op == "<=" {
        value <= bound
    } else {
        value >= bound
    })
}

impl Outcome {
    fn pick(&self, p: &Pick) -> Option<f64> {
        let r = self.results.get(&p.peer)?.get(&p.phase)?.get(&p.load)?;
        metric(r, &p.metric)
    }

    /// The ratios, computed.
    pub fn ratios(&self) -> Vec<RatioValue> {
        self.scenario
            .ratios
            .iter()
            .map(|r| {
                let value = match (self.pick(&r.num), self.pick(&r.den)) {
                    (Some(n), Some(d)) if d > 0.0 => Some(n / d),
                    _ => None,
                };
                let met = match (value, &r.target) {
                    (Some(v), Some(t)) => meets(v, t),
                    _ => None,
                };
                RatioValue {
                    name: r.name.clone(),
                    value,
                    target: r.target.clone(),
                    met,
                }
            })
            .collect()
    }

    /// A markdown table of every report, then the ratios.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "| peer | phase | load | throughput (req/s) | p50 / p90 / p99 / p99.9 / max (ms) | statuses | errors |"
        );
        let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- |");
        let ms = |us: u64| us as f64 / 1000.0;
        for peer in &self.peers {
            for phase in &self.scenario.phases {
                for load in &phase.loads {
                    let r = &self.results[peer][&phase.name][load];
                    let l = &r.latency_us;
                    let _ = writeln!(
                        md,
                        "| {peer} | {} | {load} | {:.0} | {:.2} / {:.2} / {:.2} / {:.2} / {:.2} | {:?} | {} |",
                        phase.name,
                        r.throughput,
                        ms(l.p50),
                        ms(l.p90),
                        ms(l.p99),
                        ms(l.p999),
                        ms(l.max),
                        r.statuses,
                        errors(r)
                    );
                }
            }
        }
        let _ = writeln!(md);
        for RatioValue {
            name,
            value,
            target,
            met,
        } in self.ratios()
        {
            let value = value.map_or("n/a".to_string(), |v| format!("{v:.4}"));
            let target = target.map_or(String::new(), |t| format!(" (target {t})"));
            let met = match met {
                Some(true) => " met",
                Some(false) => " NOT met",
                None => "",
            };
            let _ = writeln!(md, "- {name}: **{value}**{target}{met}");
        }
        md
    }

    /// Latency distributions of every load, one panel per peer.
    pub fn svg(&self, title: &str) -> String {
        let panels: Vec<Panel> = self
            .peers
            .iter()
            .map(|peer| Panel {
                title: peer.clone(),
                series: self
                    .scenario
                    .phases
                    .iter()
                    .flat_map(|phase| phase.loads.iter().map(move |load| (phase, load)))
                    .map(|(phase, load)| {
                        let r = &self.results[peer][&phase.name][load];
                        Series {
                            label: format!(
                                "{load}, {}: p99 {:.2} ms, {} errors",
                                phase.name,
                                r.latency_us.p99 as f64 / 1000.0,
                                errors(r)
                            ),
                            points: r.curve.clone(),
                        }
                    })
                    .collect(),
            })
            .collect();
        percentile_svg(title, &panels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_checked() {
        assert_eq!(meets(2.5, "<= 3"), Some(true));
        assert_eq!(meets(3.5, "<= 3"), Some(false));
        assert_eq!(meets(0.95, ">= 0.9"), Some(true));
        assert_eq!(meets(1.0, "about 1"), None);
    }

    #[test]
    fn the_bundled_noisy_neighbour_scenario_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/noisy-neighbour.toml");
        let s = Scenario::load(&path).unwrap();
        assert_eq!(s.phases.len(), 2);
        assert!(s.ratios.len() >= 4);
    }
}
