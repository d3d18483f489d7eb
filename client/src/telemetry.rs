//! What a process tells about its devices, off the data path: the queues'
//! figures ([`QueueStats`]) summed per device and per node, pushed into the
//! `metrics` facade when `/metrics` is scraped ([`Telemetry::collect`]),
//! and the per-node state `netblk status` shows ([`Source::status`]).
//!
//! Metric names follow Prometheus conventions (base units, `_total`
//! counters, `_seconds` histograms); labels are `volume`, `device`, `node`
//! (its address), `op`, `errno`: never a request id or an offset.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netblk_observe::histogram::Snapshot;

use crate::membership::Membership;
use crate::stats::{ERRNOS, OPS, QueueStats};

/// One device (or in-process volume, or bench workload) and its queues.
#[derive(Debug, Clone)]
pub struct Source {
    pub volume: String,
    /// `/dev/ublkbN`, or empty for an in-process volume.
    pub device: String,
    pub nodes: Vec<SocketAddr>,
    /// `copy`, `partial zero copy` or `full zero copy`.
    pub data_path: String,
    pub queues: Vec<Arc<QueueStats>>,
    /// A replicated volume's membership (None: one replica).
    pub membership: Option<Arc<Membership>>,
}

/// A node's figures summed over a device's queues.
#[derive(Debug, Clone, Default)]
pub struct NodeFigures {
    /// Every queue's connection is up.
    pub connected: bool,
    /// The earliest moment a queue's connection went down, if one is down.
    pub down_for: Option<Duration>,
    pub session: u64,
    pub reconnects: u64,
    pub resent: u64,
    pub timeouts: u64,
    pub in_flight: u64,
    pub sent_bytes: u64,
    pub received_bytes: u64,
    /// Since the newest reply on any queue.
    pub last_reply_age: Option<Duration>,
    pub last_error: String,
    pub latency: Snapshot,
}

impl Source {
    fn labels(&self) -> [(&'static str, String); 2] {
        [
            ("volume", self.volume.clone()),
            ("device", self.device.clone()),
        ]
    }

    /// Node `node`'s figures, summed over the queues, as of `now`.
    pub fn node(&self, node: usize, now: Instant) -> NodeFigures {
        let mut f = NodeFigures {
            connected: true,
            ..NodeFigures::default()
        };
        for q in &self.queues {
            let Some(n) = q.nodes.get(node) else { continue };
            f.connected &= n.connected.get() == 1;
            let at = |ns: u64| q.epoch + Duration::from_nanos(ns);
            if n.down_since_ns.get() != 0 {
                let down = now.saturating_duration_since(at(n.down_since_ns.get()));
                f.down_for = Some(f.down_for.map_or(down, |d| d.max(down)));
            }
            if n.last_reply_ns.get() != 0 {
                let age = now.saturating_duration_since(at(n.last_reply_ns.get()));
                f.last_reply_age = Some(f.last_reply_age.map_or(age, |a| a.min(age)));
            }
            f.session = f.session.max(n.session.get());
            f.reconnects += n.reconnects.get();
            f.resent += n.resent.get();
            f.timeouts += n.timeouts.get();
            f.in_flight += n.in_flight.get();
            f.sent_bytes += n.sent_bytes.get();
            f.received_bytes += n.received_bytes.get();
            f.latency.merge(&n.piece_latency.snapshot());
            let error = n.last_error.lock().unwrap_or_else(|p| p.into_inner());
            if !error.is_empty() {
                f.last_error.clone_from(&error);
            }
        }
        f.connected &= !self.queues.is_empty();
        f
    }

    /// An operation's latency summed over the queues.
    fn op_latency(&self, op: usize) -> Snapshot {
        let mut s = Snapshot::default();
        for q in &self.queues {
            s.merge(&q.ops[op].latency.snapshot());
        }
        s
    }

    fn sum(&self, f: impl Fn(&QueueStats) -> u64) -> u64 {
        self.queues.iter().map(|q| f(q)).sum()
    }

    /// The `netblk status` view of the device: `latency_since` holds each
    /// node's latency snapshot of about a minute ago (p50/p99 are over what
    /// came since).
    pub fn status(
        &self,
        state: &str,
        latency_since: &[Snapshot],
        now: Instant,
    ) -> serde_json::Value {
        // Replaced members where they are now.
        let addrs = match &self.membership {
            Some(m) => m.pins.addrs(&self.nodes),
            None => self.nodes.clone(),
        };
        let nodes: Vec<serde_json::Value> = addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let f = self.node(i, now);
                let recent = latency_since
                    .get(i)
                    .map_or(f.latency, |earlier| f.latency.since(earlier));
                let ms = |q: f64| recent.quantile_ns(q).map(|ns| ns as f64 / 1e6);
                serde_json::json!({
                    "node": i,
                    "address": addr.to_string(),
                    "connected": f.connected,
                    "down_for_s": f.down_for.map(|d| d.as_secs_f64()),
                    "session": f.session,
                    "in_flight": f.in_flight,
                    "last_error": f.last_error,
                    "reconnects": f.reconnects,
                    "resent": f.resent,
                    "timeouts": f.timeouts,
                    "last_reply_age_s": f.last_reply_age.map(|d| d.as_secs_f64()),
                    "p50_ms": ms(0.5),
                    "p99_ms": ms(0.99),
                    "pieces_last_minute": recent.count(),
                })
            })
            .collect();
        serde_json::json!({
            "device": self.device,
            "volume": self.volume,
            "data_path": self.data_path,
            "state": state,
            "queues": self.queues.len(),
            "nodes": nodes,
            "replication": self.replication(now),
        })
    }

    /// Per column the replicas in sync and those out (since when, why),
    /// the record's generation and owner epoch; null with one replica.
    fn replication(&self, now: Instant) -> serde_json::Value {
        let Some(m) = &self.membership else {
            return serde_json::Value::Null;
        };
        let view = m.view();
        let r = m.replication();
        let departures = m.departures();
        let failed = m.failed();
        let progress = m.progress();
        let columns: Vec<serde_json::Value> = (0..r.columns() as usize)
            .map(|c| {
                let in_sync: Vec<usize> = r
                    .members(c)
                    .filter(|n| view.in_sync(c, r.row_of(*n)))
                    .collect();
                // Each member out now, as it last left.
                let out: Vec<serde_json::Value> = departures
                    .iter()
                    .enumerate()
                    .filter(|(i, d)| {
                        r.column_of(d.node) == c
                            && !view.takes_writes(c, r.row_of(d.node))
                            && !departures[i + 1..].iter().any(|l| l.node == d.node)
                    })
                    .map(|(_, d)| {
                        serde_json::json!({
                            "node": d.node,
                            "reason": d.reason,
                            "since_unix": d.at_unix,
                            "generation": d.generation,
                        })
                    })
                    .collect();
                let leaving: Vec<usize> = failed
                    .keys()
                    .copied()
                    .filter(|n| r.column_of(*n) == c)
                    .collect();
                let joining: Vec<serde_json::Value> = r
                    .members(c)
                    .filter(|n| view.joining(c, r.row_of(*n)))
                    .map(|n| {
                        let p = progress.get(&n);
                        serde_json::json!({
                            "node": n,
                            "rebuild": p.map(|p| p.rebuild),
                            "percent": p.map(|p| p.percent()),
                            "remaining_bytes": p.map(|p| p.remaining()),
                            "eta_s": p.and_then(|p| p.eta(now)).map(|d| d.as_secs_f64()),
                        })
                    })
                    .collect();
                serde_json::json!({
                    "column": c,
                    "in_sync": in_sync,
                    "out": out,
                    "joining": joining,
                    "leaving": leaving,
                    "degraded": view.in_sync_count(c) < r.replicas(),
                })
            })
            .collect();
        serde_json::json!({
            "replicas": r.replicas(),
            "generation": view.generation,
            "owner_epoch": view.owner_epoch,
            "fenced": view.fenced,
            "columns": columns,
            "resync_bytes": m.resync_bytes.load(std::sync::atomic::Ordering::Relaxed),
            "scrub_mismatches": m.scrub_mismatches.load(std::sync::atomic::Ordering::Relaxed),
            // What the attach copied between replicas after an unclean
            // stop (null: the last owner stopped cleanly).
            "reconciled": m.reconciled().map(|r| serde_json::json!({
                "regions": r.regions,
                "bytes": r.bytes,
                "millis": r.millis,
            })),
        })
    }
}

/// Each node's latency snapshots over the last minute, taken every few
/// seconds, so quantiles can be told over about a minute.
#[derive(Debug)]
pub struct LatencyWindow {
    samples: VecDeque<(Instant, Vec<Snapshot>)>,
}

/// How far back [`LatencyWindow`] looks.
pub const WINDOW: Duration = Duration::from_secs(60);

impl LatencyWindow {
    /// A window that starts empty at `now`: until a minute has passed,
    /// quantiles cover everything since.
    pub fn starting(nodes: usize, now: Instant) -> LatencyWindow {
        LatencyWindow {
            samples: VecDeque::from([(now, vec![Snapshot::default(); nodes])]),
        }
    }

    /// Takes a sample of `source`'s node latencies.
    pub fn sample(&mut self, source: &Source, now: Instant) {
        let snaps = (0..source.nodes.len())
            .map(|n| source.node(n, now).latency)
            .collect();
        self.samples.push_back((now, snaps));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// The oldest sample within the window (empty: none yet).
    pub fn oldest(&self) -> &[Snapshot] {
        self.samples.front().map_or(&[], |(_, s)| s.as_slice())
    }
}

/// The devices of this process, as metrics see them.
#[derive(Debug, Default)]
pub struct Telemetry {
    sources: Mutex<Vec<Published>>,
}

#[derive(Debug)]
struct Published {
    source: Source,
    /// What the facade's histograms already hold.
    ops: Vec<Snapshot>,
    nodes: Vec<Snapshot>,
}

impl Telemetry {
    pub fn new() -> Arc<Telemetry> {
        Arc::new(Telemetry::default())
    }

    /// Reports `source` from now on.
    pub fn add(&self, source: Source) {
        let nodes = source.nodes.len();
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Published {
                source,
                ops: vec![Snapshot::default(); OPS.len()],
                nodes: vec![Snapshot::default(); nodes],
            });
    }

    /// Pushes every source's figures into the `metrics` facade.
    pub fn collect(&self) {
        let now = Instant::now();
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        for p in sources.iter_mut() {
            publish(p, now);
        }
    }
}

fn publish(p: &mut Published, now: Instant) {
    let s = &p.source;
    let labels = s.labels();
    metrics::gauge!(
        "netblk_data_path_info",
        &[
            labels[0].clone(),
            labels[1].clone(),
            ("path", s.data_path.clone()),
        ]
    )
    .set(1.0);
    for (i, op) in OPS.iter().enumerate() {
        let l = [
            labels[0].clone(),
            labels[1].clone(),
            ("op", (*op).to_string()),
        ];
        metrics::counter!("netblk_requests_total", &l).absolute(s.sum(|q| q.ops[i].requests.get()));
        metrics::counter!("netblk_request_bytes_total", &l)
            .absolute(s.sum(|q| q.ops[i].bytes.get()));
        metrics::gauge!("netblk_requests_in_flight", &l)
            .set(s.sum(|q| q.ops[i].in_flight.get()) as f64);
        for (e, (_, name)) in ERRNOS.iter().enumerate() {
            let count = s.sum(|q| q.ops[i].errors[e].get());
            if count > 0 {
                let le = [
                    l[0].clone(),
                    l[1].clone(),
                    l[2].clone(),
                    ("errno", (*name).to_string()),
                ];
                metrics::counter!("netblk_request_errors_total", &le).absolute(count);
            }
        }
        let latency = s.op_latency(i);
        latency.publish_since(
            &p.ops[i],
            &metrics::histogram!("netblk_request_duration_seconds", &l),
        );
        p.ops[i] = latency;
    }
    for (n, addr) in s.nodes.iter().enumerate() {
        let f = s.node(n, now);
        let l = [
            labels[0].clone(),
            labels[1].clone(),
            ("node", addr.to_string()),
        ];
        f.latency.publish_since(
            &p.nodes[n],
            &metrics::histogram!("netblk_node_piece_duration_seconds", &l),
        );
        p.nodes[n] = f.latency;
        metrics::gauge!("netblk_node_connected", &l).set(if f.connected { 1.0 } else { 0.0 });
        metrics::gauge!("netblk_node_session", &l).set(f.session as f64);
        metrics::gauge!("netblk_node_pieces_in_flight", &l).set(f.in_flight as f64);
        metrics::counter!("netblk_node_sent_bytes_total", &l).absolute(f.sent_bytes);
        metrics::counter!("netblk_node_received_bytes_total", &l).absolute(f.received_bytes);
        metrics::counter!("netblk_node_reconnects_total", &l).absolute(f.reconnects);
        metrics::counter!("netblk_node_resent_pieces_total", &l).absolute(f.resent);
        metrics::counter!("netblk_node_timeouts_total", &l).absolute(f.timeouts);
        if let Some(age) = f.last_reply_age {
            metrics::gauge!("netblk_node_last_reply_age_seconds", &l).set(age.as_secs_f64());
        }
    }
    if let Some(m) = &s.membership {
        let view = m.view();
        let r = m.replication();
        metrics::gauge!("netblk_membership_generation", &labels).set(view.generation as f64);
        metrics::gauge!("netblk_fenced", &labels).set(if view.fenced { 1.0 } else { 0.0 });
        let reconciled = m.reconciled().unwrap_or_default();
        metrics::gauge!("netblk_reconciled_regions", &labels).set(reconciled.regions as f64);
        metrics::gauge!("netblk_reconciled_bytes", &labels).set(reconciled.bytes as f64);
        metrics::counter!("netblk_resync_bytes_total", &labels)
            .absolute(m.resync_bytes.load(std::sync::atomic::Ordering::Relaxed));
        let remaining: u64 = m.progress().values().map(|p| p.remaining()).sum();
        metrics::gauge!("netblk_resync_remaining_bytes", &labels).set(remaining as f64);
        metrics::counter!("netblk_scrub_mismatches_total", &labels).absolute(
            m.scrub_mismatches
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        for c in 0..r.columns() as usize {
            let l = [
                labels[0].clone(),
                labels[1].clone(),
                ("column", c.to_string()),
            ];
            let in_sync = view.in_sync_count(c);
            metrics::gauge!("netblk_column_in_sync_replicas", &l).set(f64::from(in_sync));
            metrics::gauge!("netblk_column_degraded", &l).set(if in_sync < r.replicas() {
                1.0
            } else {
                0.0
            });
        }
    }
    metrics::counter!("netblk_zerocopy_sends_total", &labels).absolute(s.sum(|q| q.zc_sends.get()));
    metrics::counter!("netblk_digest_errors_total", &labels)
        .absolute(s.sum(|q| q.digest_errors.get()));
    metrics::counter!("netblk_zerocopy_notifications_total", &labels)
        .absolute(s.sum(|q| q.zc_notifications.get()));
    for (name, mode, bytes) in [
        (
            "netblk_payload_sent_bytes_total",
            "zerocopy",
            s.sum(|q| q.zc_bytes.get()),
        ),
        (
            "netblk_payload_sent_bytes_total",
            "copy",
            s.sum(|q| q.copied_bytes.get()),
        ),
        (
            "netblk_payload_received_bytes_total",
            "direct",
            s.sum(|q| q.recv_direct_bytes.get()),
        ),
        (
            "netblk_payload_received_bytes_total",
            "copy",
            s.sum(|q| q.recv_copied_bytes.get()),
        ),
    ] {
        let l = [
            labels[0].clone(),
            labels[1].clone(),
            ("mode", mode.to_string()),
        ];
        metrics::counter!(name, &l).absolute(bytes);
    }
}
