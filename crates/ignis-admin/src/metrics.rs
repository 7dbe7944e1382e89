//! The Prometheus exposition (`GET /metrics`, OpenMetrics text).
//!
//! Nothing here is counted per request: the collector reads, at scrape
//! time, the atomics the runtime, the admission gates, the actor directory,
//! the upstreams and the edge already keep. Label values are names from the
//! manifest (functions, tenants, actor classes, upstreams, origin URLs) and
//! status codes, so the number of series is bounded by the configuration,
//! never by clients (no actor ids, paths or addresses).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use ignis_runtime::GuestStats;
use ignis_runtime::histogram::Snapshot;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use crate::Node;

/// Renders every metric of `node` in the OpenMetrics text format.
pub fn render(node: &std::sync::Arc<Node>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(NodeCollector(node.clone(), node.parts())));
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// The node, and its parts as they were when the scrape began (one
/// deploy's worth of functions for the whole exposition).
struct NodeCollector(std::sync::Arc<Node>, std::sync::Arc<crate::NodeParts>);

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// A counter read off [`GuestStats`]: name, help, reader.
type StatCounter = (&'static str, &'static str, fn(&GuestStats) -> u64);

/// One metric family: its descriptor, then one sample per label set.
fn family<'a, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (Labels<'a>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut samples = samples.into_iter().peekable();
    if samples.peek().is_none() {
        return Ok(());
    }
    let ty = {
        let (_, first) = samples.peek().expect("peeked");
        first.metric_type()
    };
    let mut metric = encoder.encode_descriptor(name, help, unit, ty)?;
    for (labels, m) in samples {
        m.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One counter family per entry of `table`, with a sample per subject.
fn stat_counters(
    e: &mut DescriptorEncoder<'_>,
    table: &[StatCounter],
    subjects: &[(Labels<'_>, &GuestStats)],
) -> Result<(), std::fmt::Error> {
    for (name, help, get) in table {
        family(
            e,
            name,
            help,
            None,
            subjects
                .iter()
                .map(|(labels, s)| (labels.clone(), counter(get(s)))),
        )?;
    }
    Ok(())
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn load(v: &std::sync::atomic::AtomicU64) -> u64 {
    v.load(Ordering::Relaxed)
}

/// A histogram snapshot as a metric.
#[derive(Debug)]
struct Hist(Snapshot);

impl prometheus_client::metrics::TypedMetric for Hist {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Hist {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.0.sum_seconds,
            self.0.count,
            &self.0.buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let node = &self.0;
        family(
            &mut e,
            "ignis_build_info",
            "The running Ignis version.",
            None,
            [(
                vec![("version", env!("CARGO_PKG_VERSION"))],
                ConstGauge::new(1i64),
            )],
        )?;
        family(
            &mut e,
            "ignis_start_time",
            "When this process started, in seconds since the Unix epoch.",
            Some(&Unit::Seconds),
            [(Vec::new(), ConstGauge::new(node.started_unix_seconds()))],
        )?;
        family(
            &mut e,
            "ignis_ready",
            "1 while the node serves (listeners bound), 0 once it drains.",
            None,
            [(Vec::new(), ConstGauge::new(i64::from(node.is_ready())))],
        )?;
        self.traffic(&mut e)?;
        self.functions(&mut e)?;
        self.tenants(&mut e)?;
        self.actors(&mut e)?;
        self.upstreams(&mut e)?;
        self.cron(&mut e)?;
        self.storage(&mut e)
    }
}

impl NodeCollector {
    /// What the edge recorded: requests by target and status code,
    /// durations, bytes.
    fn traffic(&self, e: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let traffic = self.1.traffic.clone();
        let codes: Vec<_> = traffic
            .all()
            .map(|t| (t.clone(), t.by_code()))
            .collect::<Vec<_>>();
        let code_text: Vec<Vec<(String, u64)>> = codes
            .iter()
            .map(|(_, by)| by.iter().map(|(c, n)| (c.to_string(), *n)).collect())
            .collect();
        family(
            e,
            "ignis_requests",
            "Requests that ended (response sent whole, or cut short), by what served them and status code. kind=edge: answered by the edge itself (no route, malformed).",
            None,
            codes.iter().zip(&code_text).flat_map(|((t, _), by)| {
                by.iter().map(move |(code, n)| {
                    (
                        vec![
                            ("kind", t.kind.as_str()),
                            ("name", &*t.name),
                            ("tenant", &*t.tenant),
                            ("code", code.as_str()),
                        ],
                        counter(*n),
                    )
                })
            }),
        )?;
        family(
            e,
            "ignis_request_duration",
            "Time from a request's arrival at the edge to the end of its response body.",
            Some(&Unit::Seconds),
            traffic.all().map(|t| {
                (
                    vec![
                        ("kind", t.kind.as_str()),
                        ("name", &*t.name),
                        ("tenant", &*t.tenant),
                    ],
                    Hist(t.duration.snapshot()),
                )
            }),
        )?;
        family(
            e,
            "ignis_response_body",
            "Response body bytes sent.",
            Some(&Unit::Bytes),
            traffic.all().map(|t| {
                (
                    vec![
                        ("kind", t.kind.as_str()),
                        ("name", &*t.name),
                        ("tenant", &*t.tenant),
                    ],
                    counter(load(&t.bytes_sent)),
                )
            }),
        )
    }

    fn functions(&self, e: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let fns: Vec<(&str, &str, &GuestStats, &ignis_actors::AdmissionStats)> = self
            .1
            .functions
            .iter()
            .map(|(name, (f, gate))| (name.as_str(), f.tenant(), &**f.stats(), gate.stats()))
            .collect();
        let labels = |name, tenant| vec![("function", name), ("tenant", tenant)];
        let counters: [StatCounter; 6] = [
            (
                "ignis_function_instantiations",
                "Fresh instances created (one per request unless reused).",
                |s| load(&s.fresh_instances),
            ),
            (
                "ignis_function_instance_reuses",
                "Requests served by an instance kept from an earlier request.",
                |s| load(&s.reused),
            ),
            (
                "ignis_function_traps",
                "Guest traps, memory-limit traps included.",
                |s| load(&s.traps),
            ),
            (
                "ignis_function_cancelled",
                "Requests whose client left before the guest finished.",
                |s| load(&s.cancelled),
            ),
            (
                "ignis_function_demoted",
                "Requests whose guest outlived its first CPU slice and moved to the fair scheduler.",
                |s| load(&s.demoted),
            ),
            (
                "ignis_function_guest_requests",
                "Requests that reached the function (admitted or not yet).",
                |s| load(&s.requests),
            ),
        ];
        let subjects: Vec<_> = fns
            .iter()
            .map(|(n, t, s, _)| (labels(*n, *t), *s))
            .collect();
        stat_counters(e, &counters, &subjects)?;
        family(
            e,
            "ignis_function_kills",
            "Runs stopped by a limit, by limit (memory, cpu, wall).",
            None,
            fns.iter().flat_map(|(n, t, s, _)| {
                [
                    ("memory", load(&s.memory_kills)),
                    ("cpu", load(&s.cpu_kills)),
                    ("wall", load(&s.wall_kills)),
                ]
                .map(|(why, v)| {
                    let mut l = labels(*n, *t);
                    l.push(("limit", why));
                    (l, counter(v))
                })
            }),
        )?;
        family(
            e,
            "ignis_function_cpu",
            "CPU time guests used.",
            Some(&Unit::Seconds),
            fns.iter().map(|(n, t, s, _)| {
                (
                    labels(*n, *t),
                    ConstCounter::new(load(&s.cpu_nanos) as f64 / 1e9),
                )
            }),
        )?;
        family(
            e,
            "ignis_function_instantiation_duration",
            "Time to instantiate the component, per fresh instance.",
            Some(&Unit::Seconds),
            fns.iter()
                .map(|(n, t, s, _)| (labels(*n, *t), Hist(s.instantiation.snapshot()))),
        )?;
        family(
            e,
            "ignis_function_memory_high_water",
            "The most linear memory one instance held.",
            Some(&Unit::Bytes),
            fns.iter().map(|(n, t, s, _)| {
                (
                    labels(*n, *t),
                    ConstGauge::new(load(&s.memory_high_water) as i64),
                )
            }),
        )?;
        family(
            e,
            "ignis_function_active_requests",
            "Requests running in an instance now.",
            None,
            fns.iter()
                .map(|(n, t, s, _)| (labels(*n, *t), ConstGauge::new(load(&s.active) as i64))),
        )?;
        family(
            e,
            "ignis_function_idle_instances",
            "Instances kept for reuse, waiting for a request now.",
            None,
            fns.iter().map(|(n, t, s, _)| {
                (
                    labels(*n, *t),
                    ConstGauge::new(load(&s.idle_instances) as i64),
                )
            }),
        )?;
        family(
            e,
            "ignis_function_queue_depth",
            "Requests waiting in the mailbox for an instance slot now.",
            None,
            fns.iter().map(|(n, t, _, a)| {
                (
                    labels(*n, *t),
                    ConstGauge::new(i64::from(a.waiting.load(Ordering::Relaxed))),
                )
            }),
        )?;
        family(
            e,
            "ignis_function_queued",
            "Requests that waited in the mailbox.",
            None,
            fns.iter()
                .map(|(n, t, _, a)| (labels(*n, *t), counter(load(&a.queued)))),
        )?;
        family(
            e,
            "ignis_function_shed",
            "Requests shed by admission control (503), by reason: the mailbox was full, or the queue deadline passed.",
            None,
            fns.iter().flat_map(|(n, t, _, a)| {
                [
                    ("mailbox_full", load(&a.shed_full)),
                    ("queue_timeout", load(&a.shed_timeout)),
                ]
                .map(|(why, v)| {
                    let mut l = labels(*n, *t);
                    l.push(("reason", why));
                    (l, counter(v))
                })
            }),
        )
    }

    /// CPU by tenant: the sum over its functions and actor classes (a
    /// tenant's share is its rate over the sum of all tenants' rates).
    fn tenants(&self, e: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut cpu: BTreeMap<&str, u64> = BTreeMap::new();
        for (f, _) in self.1.functions.values() {
            *cpu.entry(f.tenant()).or_default() += load(&f.stats().cpu_nanos);
        }
        let classes = self
            .1
            .directory
            .as_ref()
            .map(|d| d.classes())
            .unwrap_or_default();
        for class in &classes {
            *cpu.entry(&class.config().tenant).or_default() += load(&class.stats().cpu_nanos);
        }
        family(
            e,
            "ignis_tenant_cpu",
            "CPU time the tenant's guests used (functions and actor classes).",
            Some(&Unit::Seconds),
            cpu.iter().map(|(tenant, nanos)| {
                (
                    vec![("tenant", *tenant)],
                    ConstCounter::new(*nanos as f64 / 1e9),
                )
            }),
        )?;
        family(
            e,
            "ignis_tenant_weight",
            "The tenant's scheduling weight.",
            None,
            cpu.keys().map(|tenant| {
                let weight = self.1.weights.get(*tenant).copied().unwrap_or(1);
                (
                    vec![("tenant", *tenant)],
                    ConstGauge::new(i64::from(weight)),
                )
            }),
        )
    }

    fn actors(&self, e: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(directory) = &self.1.directory else {
            return Ok(());
        };
        let mut classes = directory.classes();
        classes.sort_by(|a, b| a.name().cmp(b.name()));
        let per_class: [StatCounter; 2] = [
            (
                "ignis_actor_class_messages",
                "Messages and alarms delivered to the class's activations.",
                |s| load(&s.requests),
            ),
            (
                "ignis_actor_class_traps",
                "Guest traps in the class's activations.",
                |s| load(&s.traps),
            ),
        ];
        let subjects: Vec<_> = classes
            .iter()
            .map(|c| {
                let labels = vec![("class", c.name()), ("tenant", c.config().tenant.as_str())];
                (labels, &**c.stats())
            })
            .collect();
        stat_counters(e, &per_class, &subjects)?;
        family(
            e,
            "ignis_actor_class_cpu",
            "CPU time the class's activations used.",
            Some(&Unit::Seconds),
            classes.iter().map(|c| {
                (
                    vec![("class", c.name()), ("tenant", c.config().tenant.as_str())],
                    ConstCounter::new(load(&c.stats().cpu_nanos) as f64 / 1e9),
                )
            }),
        )?;
        let counts = directory.class_counts();
        let tenants: BTreeMap<&str, &str> = classes
            .iter()
            .map(|c| (c.name(), c.config().tenant.as_str()))
            .collect();
        fn labels<'a>(
            tenants: &BTreeMap<&'a str, &'a str>,
            c: &'a ignis_actors::ClassStats,
        ) -> Labels<'a> {
            let tenant = tenants.get(c.class.as_str()).copied().unwrap_or("-");
            vec![("class", c.class.as_str()), ("tenant", tenant)]
        }
        family(
            e,
            "ignis_actor_class_activations",
            "Activations of the class started.",
            None,
            counts
                .iter()
                .map(|c| (labels(&tenants, c), counter(c.activations))),
        )?;
        family(
            e,
            "ignis_actor_class_evictions",
            "Activations of the class evicted (idle, or to make room).",
            None,
            counts
                .iter()
                .map(|c| (labels(&tenants, c), counter(c.evictions))),
        )?;
        family(
            e,
            "ignis_actor_class_active",
            "Live activations of the class now.",
            None,
            counts
                .iter()
                .map(|c| (labels(&tenants, c), ConstGauge::new(c.live as i64))),
        )?;
        let s = directory.stats();
        let node_counters = [
            (
                "ignis_actor_activations",
                "Activations started.",
                &s.activations,
            ),
            (
                "ignis_actor_evictions",
                "Activations evicted (idle or for room).",
                &s.evictions,
            ),
            (
                "ignis_actor_messages",
                "Messages delivered to activations.",
                &s.messages,
            ),
            (
                "ignis_actor_commits",
                "Storage batches committed (group commits).",
                &s.commits,
            ),
            (
                "ignis_actor_resets",
                "Activations reset after a failed message or commit.",
                &s.resets,
            ),
            (
                "ignis_actor_alarms_fired",
                "Alarms delivered.",
                &s.alarms_fired,
            ),
            (
                "ignis_actor_alarm_retries",
                "Alarm deliveries retried.",
                &s.alarm_retries,
            ),
            (
                "ignis_actor_shed",
                "Messages shed (mailbox or activation cap full).",
                &s.shed_full,
            ),
            (
                "ignis_actor_forwarded",
                "Messages forwarded to the actor's owner on another node (cluster).",
                &s.forwarded,
            ),
            (
                "ignis_actor_fenced_commits",
                "Commits refused because the actor's lease had moved (cluster).",
                &s.fenced,
            ),
            (
                "ignis_actor_lease_refused",
                "Messages answered 503 because the node's membership lapsed or the lease went (cluster).",
                &s.lease_refused,
            ),
        ];
        for (name, help, v) in node_counters {
            family(e, name, help, None, [(Vec::new(), counter(load(v)))])?;
        }
        family(
            e,
            "ignis_actor_active",
            "Live activations now.",
            None,
            [(Vec::new(), ConstGauge::new(load(&s.active) as i64))],
        )
    }

    /// The embedded store (key-value and actor storage share its writer)
    /// and the functions' key-value calls.
    fn storage(&self, e: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let ops: Vec<(&str, &str, Vec<ignis_runtime::bindings::keyvalue::OpCount>)> = self
            .1
            .functions
            .iter()
            .map(|(name, (f, _))| (name.as_str(), f.tenant(), f.kv_op_counts()))
            .filter(|(_, _, ops)| !ops.is_empty())
            .collect();
        let samples = |get: fn(&ignis_runtime::bindings::keyvalue::OpCount) -> u64| {
            ops.iter().flat_map(move |(f, t, ops)| {
                ops.iter().map(move |o| {
                    (
                        vec![("function", *f), ("tenant", *t), ("op", o.op)],
                        counter(get(o)),
                    )
                })
            })
        };
        family(
            e,
            "ignis_kv_operations",
            "Key-value calls by function and operation.",
            None,
            samples(|o| o.calls),
        )?;
        family(
            e,
            "ignis_kv_failures",
            "Key-value calls that returned an error to the guest.",
            None,
            samples(|o| o.failures),
        )?;
        let Some(s) = &self.1.storage else {
            return Ok(());
        };
        let counters = [
            (
                "ignis_storage_commits",
                "Transactions committed by the store's writer (one fsync each; a group of writes).",
                &s.commits,
            ),
            (
                "ignis_storage_writes",
                "Write jobs answered; writes / commits is the mean group size.",
                &s.writes,
            ),
            (
                "ignis_storage_failed_commits",
                "Commits that failed (every write of the group got the error).",
                &s.failed_commits,
            ),
        ];
        for (name, help, v) in counters {
            family(e, name, help, None, [(Vec::new(), counter(load(v)))])?;
        }
        family(
            e,
            "ignis_storage_commit_duration",
            "Time to run and commit one group of writes, fsync included.",
            Some(&Unit::Seconds),
            [(Vec::new(), Hist(s.commit_duration.snapshot()))],
        )
    }

    fn cron(&self, e: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let triggers = self.1.cron.triggers();
        family(
            e,
            "ignis_cron_runs",
            "Cron runs, by outcome: ok (a 2xx or 3xx answer) or failed.",
            None,
            triggers.iter().flat_map(|t| {
                let s = t.stats();
                [("ok", load(&s.succeeded)), ("failed", load(&s.failed))].map(|(outcome, v)| {
                    (
                        vec![("trigger", t.config().name.as_str()), ("outcome", outcome)],
                        counter(v),
                    )
                })
            }),
        )?;
        family(
            e,
            "ignis_cron_skipped",
            "Cron occurrences skipped because the trigger's previous run was still going.",
            None,
            triggers.iter().map(|t| {
                (
                    vec![("trigger", t.config().name.as_str())],
                    counter(load(&t.stats().skipped)),
                )
            }),
        )
    }

    fn upstreams(&self, e: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let stats: Vec<(&str, Vec<ignis_edge::OriginStats>)> = self
            .1
            .upstreams
            .iter()
            .map(|(name, u)| (name.as_str(), u.origin_stats()))
            .collect();
        let each = || {
            stats
                .iter()
                .flat_map(|(u, origins)| origins.iter().map(move |o| (*u, o)))
        };
        fn labels<'a>(u: &'a str, o: &'a ignis_edge::OriginStats) -> Labels<'a> {
            vec![("upstream", u), ("origin", o.url.as_str())]
        }
        family(
            e,
            "ignis_upstream_origin_up",
            "1 if the origin takes requests (healthy and not ejected), else 0.",
            None,
            each().map(|(u, o)| (labels(u, o), ConstGauge::new(i64::from(o.usable)))),
        )?;
        family(
            e,
            "ignis_upstream_origin_in_flight",
            "Requests the origin is serving now.",
            None,
            each().map(|(u, o)| (labels(u, o), ConstGauge::new(o.in_flight as i64))),
        )?;
        family(
            e,
            "ignis_upstream_origin_requests",
            "Requests sent to the origin (retries included).",
            None,
            each().map(|(u, o)| (labels(u, o), counter(o.sent))),
        )?;
        family(
            e,
            "ignis_upstream_origin_failures",
            "Requests to the origin that failed (unreachable, reset, bad response, timeout).",
            None,
            each().map(|(u, o)| (labels(u, o), counter(o.failed))),
        )
    }
}
