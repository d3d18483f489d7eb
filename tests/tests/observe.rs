//! What an operator sees: `/metrics` of an in-process volume and of a mock
//! node, scraped over HTTP and parsed as Prometheus exposition (by a parser,
//! not a pattern), counters that move by exactly the IO done, a killed node
//! that shows as disconnected and then back; and the log of a node restart:
//! one "connection lost" and one "reconnected" event per connection, not a
//! line per retry.
//!
//! One process holds one metrics recorder and one log subscriber, so the
//! whole story is one test.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netblk::frontend::{Volume, VolumeOptions};
use netblk::telemetry::{Source, Telemetry};
use netblk_observe::endpoint;
use netblk_tests::cluster::Cluster;
use netblk_tests::{MockNode, NodeClient, handshake};
use prometheus_parse::{Sample, Scrape, Value};

/// Log lines, as JSON, kept for the test to read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Every event whose message is `message`, as JSON.
    fn events(&self, message: &str) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["message"] == message)
            .collect()
    }
}

fn scrape(addr: SocketAddr) -> Vec<Sample> {
    let (code, body) = endpoint::get(addr, "/metrics").expect("scrape");
    assert_eq!(code, 200, "{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text format")
        .samples
}

/// The value of the one sample named `metric` whose labels include `labels`.
fn value(samples: &[Sample], metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert!(
        found.len() <= 1,
        "{metric} {labels:?} is not one series: {found:?}"
    );
    found.first().map(|s| match &s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
        Value::Summary(_) => f64::NAN,
    })
}

/// Waits (bounded) until `check` holds for a fresh scrape.
fn until(addr: SocketAddr, what: &str, check: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let samples = scrape(addr);
        if check(&samples) {
            return samples;
        }
        if Instant::now() >= deadline {
            let mine: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.metric.starts_with("netblk_node_"))
                .collect();
            panic!("never: {what}: {mine:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metrics_and_logs_tell_what_happened() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_writer(move || writer.clone())
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .init();

    let telemetry = Telemetry::new();
    let collector = Arc::clone(&telemetry);
    let addr = endpoint::serve("127.0.0.1:0".parse().expect("addr"), move || {
        collector.collect()
    })
    .expect("metrics endpoint");

    let mut cluster = Cluster::start(3);
    let spec = cluster.spec("observed", 16 << 20);
    let options = VolumeOptions {
        queues: 2,
        depth: 8,
        ..VolumeOptions::default()
    };
    let volume = Volume::open(&spec, &options).expect("open");
    telemetry.add(Source {
        volume: "observed".into(),
        device: String::new(),
        nodes: spec.nodes.clone(),
        data_path: "in-process".into(),
        queues: volume.figures(),
        membership: None,
    });
    let nodes: Vec<String> = spec.nodes.iter().map(ToString::to_string).collect();
    let op = |op: &'static str| [("volume", "observed"), ("op", op)];

    // Nothing done yet: every counter at zero, every node connected.
    let before = scrape(addr);
    assert_eq!(
        value(&before, "netblk_requests_total", &op("write")),
        Some(0.0)
    );
    assert_eq!(
        value(
            &before,
            "netblk_data_path_info",
            &[("volume", "observed"), ("path", "in-process")]
        ),
        Some(1.0)
    );
    for node in &nodes {
        let l = [("volume", "observed"), ("node", node.as_str())];
        assert_eq!(
            value(&before, "netblk_node_connected", &l),
            Some(1.0),
            "{node}"
        );
    }

    // 20 writes of 4 KiB, 12 reads of 64 KiB (one stripe unit each: one
    // piece), 3 flushes: the counters move by exactly that.
    for i in 0..20u64 {
        volume.write_at(&[i as u8; 4096], i * 65536).expect("write");
    }
    let mut buf = vec![0u8; 65536];
    for i in 0..12u64 {
        volume.read_at(&mut buf, i * 65536).expect("read");
    }
    for _ in 0..3 {
        volume.flush().expect("flush");
    }
    let after = scrape(addr);
    assert_eq!(
        value(&after, "netblk_requests_total", &op("write")),
        Some(20.0)
    );
    assert_eq!(
        value(&after, "netblk_request_bytes_total", &op("write")),
        Some(20.0 * 4096.0)
    );
    assert_eq!(
        value(&after, "netblk_requests_total", &op("read")),
        Some(12.0)
    );
    assert_eq!(
        value(&after, "netblk_request_bytes_total", &op("read")),
        Some(12.0 * 65536.0)
    );
    assert_eq!(
        value(&after, "netblk_requests_total", &op("flush")),
        Some(3.0)
    );
    assert_eq!(
        value(&after, "netblk_requests_in_flight", &op("write")),
        Some(0.0)
    );
    assert_eq!(
        value(
            &after,
            "netblk_request_duration_seconds_count",
            &op("write")
        ),
        Some(20.0),
        "every write is in the latency histogram"
    );
    assert!(
        value(&after, "netblk_request_duration_seconds_sum", &op("read")).is_some_and(|s| s > 0.0)
    );
    // Pieces: 20 writes + 12 reads, one piece each, plus 3 flushes to every
    // node; the histogram's count over the nodes says the same.
    let pieces: f64 = nodes
        .iter()
        .map(|n| {
            value(
                &after,
                "netblk_node_piece_duration_seconds_count",
                &[("volume", "observed"), ("node", n.as_str())],
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(pieces, 20.0 + 12.0 + 3.0 * 3.0);
    let sent: f64 = nodes
        .iter()
        .map(|n| {
            value(
                &after,
                "netblk_node_sent_bytes_total",
                &[("volume", "observed"), ("node", n.as_str())],
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(sent, 20.0 * 4096.0, "payload bytes to the nodes");
    // Zero copy by default, but 4 KiB payloads are below its threshold: the
    // kernel copies them. One 64 KiB write (one stripe unit) goes zero-copy.
    let payload = |s: &[Sample], mode: &str| {
        value(
            s,
            "netblk_payload_sent_bytes_total",
            &[("volume", "observed"), ("mode", mode)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(
        payload(&after, "copy"),
        20.0 * 4096.0,
        "small payloads copied"
    );
    assert_eq!(payload(&after, "zerocopy"), 0.0);
    volume.write_at(&[7; 65536], 0).expect("write");
    let after = scrape(addr);
    assert_eq!(
        payload(&after, "zerocopy"),
        65536.0,
        "large payloads zero-copy"
    );
    assert_eq!(payload(&after, "copy"), 20.0 * 4096.0);
    // A 1 MiB write is 16 pieces of 64 KiB over the 3 nodes (6, 5 and 5),
    // each node's queued at once: one chain per node. Where the kernel
    // sends a vectored SENDMSG_ZC from a registered buffer, each chain is
    // one zero-copy send; before 6.15, one SEND_ZC per piece.
    let sends = |s: &[Sample]| {
        value(s, "netblk_zerocopy_sends_total", &[("volume", "observed")]).unwrap_or(0.0)
    };
    let sends_before = sends(&after);
    let big: Vec<u8> = (0..1 << 20).map(|i: u32| (i / 4096) as u8 ^ 0x5a).collect();
    volume.write_at(&big, 2 << 20).expect("write");
    let mut back = vec![0u8; big.len()];
    volume.read_at(&mut back, 2 << 20).expect("read");
    assert!(back == big, "the 1 MiB write reads back");
    let after = until(addr, "every zero-copy notification back", |s| {
        value(
            s,
            "netblk_zerocopy_notifications_total",
            &[("volume", "observed")],
        ) == Some(sends(s))
    });
    let chains = if netblk::uring::probe_sendmsg_zc_fixed() {
        3.0
    } else {
        16.0
    };
    assert_eq!(
        sends(&after) - sends_before,
        chains,
        "zero-copy sends of a 1 MiB write"
    );
    assert_eq!(payload(&after, "zerocopy"), 65536.0 + f64::from(1u32 << 20));
    // Read payloads are received into the connection buffer and copied
    // into the request buffers (user buffer mode): the 12 reads of 64 KiB.
    let received = |mode: &str| {
        value(
            &after,
            "netblk_payload_received_bytes_total",
            &[("volume", "observed"), ("mode", mode)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(received("copy"), 12.0 * 65536.0 + f64::from(1u32 << 20));
    assert_eq!(received("direct"), 0.0);

    // Node 1 killed: disconnected (once the client notices), then back.
    let node1 = [("volume", "observed"), ("node", nodes[1].as_str())];
    cluster.nodes[1].signal(libc::SIGKILL);
    cluster.nodes[1].wait_exit(Duration::from_secs(5));
    // Traffic to node 1 (the second stripe unit) makes the queues notice.
    let unit = 65536u64;
    let _ = volume.write_at(&[9; 4096], unit);
    let _ = volume.write_at(&[9; 4096], unit);
    until(addr, "node 1 disconnected", |s| {
        value(s, "netblk_node_connected", &node1) == Some(0.0)
    });
    // Down for a while: the reconnects fail several times meanwhile.
    std::thread::sleep(Duration::from_secs(3));
    cluster.restart(1, &[]);
    for q in 0..2u64 {
        let mut ok = false;
        for _ in 0..100 {
            if volume.write_at(&[q as u8 + 1; 4096], unit).is_ok() {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(ok, "IO to node 1 works again");
    }
    let back = until(addr, "node 1 connected again", |s| {
        value(s, "netblk_node_connected", &node1) == Some(1.0)
    });
    assert!(
        value(&back, "netblk_node_reconnects_total", &node1).is_some_and(|r| r >= 2.0),
        "each queue reconnected"
    );
    assert!(value(&back, "netblk_node_last_reply_age_seconds", &node1).is_some_and(|a| a < 5.0));

    // The log: one "connection lost" and one "reconnected" per connection
    // (2 queues), however many attempts failed in between.
    let for_node1 = |events: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        events.into_iter().filter(|e| e["node"] == 1).collect()
    };
    let lost = for_node1(logs.events("connection lost"));
    let back = for_node1(logs.events("reconnected"));
    let retries = for_node1(logs.events("reconnect failed; retrying with backoff"));
    assert_eq!(lost.len(), 2, "one lost event per connection: {lost:?}");
    assert_eq!(
        back.len(),
        2,
        "one reconnected event per connection: {back:?}"
    );
    assert!(
        retries.len() <= 2,
        "failed attempts are not logged one by one: {retries:?}"
    );
    for e in &back {
        assert!(e["epoch"].as_u64().is_some_and(|s| s >= 2), "{e}");
        assert!(e["down_ms"].as_u64().is_some_and(|ms| ms >= 2000), "{e}");
        assert_eq!(e["span"]["volume"], "observed", "{e}");
    }
    drop(volume);

    // Two copies: a replicated volume (2 columns x 2 replicas) sends every
    // written byte twice, from the same pages, zero-copy as with one (no
    // copy per replica), and shows its columns whole.
    let mirrors = Cluster::start(4);
    let spec = netblk::layout::VolumeSpec {
        replicas: 2,
        ..mirrors.spec("mirrored", 16 << 20)
    };
    let volume = Volume::open(&spec, &options).expect("open the replicated volume");
    telemetry.add(Source {
        volume: "mirrored".into(),
        device: String::new(),
        nodes: spec.nodes.clone(),
        data_path: "in-process".into(),
        queues: volume.figures(),
        membership: Some(Arc::clone(volume.membership())),
    });
    let mirrored = |s: &[Sample], metric: &str, extra: (&str, &str)| {
        value(s, metric, &[("volume", "mirrored"), extra]).unwrap_or(0.0)
    };
    let before = scrape(addr);
    volume.write_at(&big, 0).expect("replicated write");
    let after = until(
        addr,
        "every zero-copy notification back (replicated)",
        |s| {
            value(
                s,
                "netblk_zerocopy_notifications_total",
                &[("volume", "mirrored")],
            ) == value(s, "netblk_zerocopy_sends_total", &[("volume", "mirrored")])
        },
    );
    let moved = |metric: &str, extra: (&str, &str)| {
        mirrored(&after, metric, extra) - mirrored(&before, metric, extra)
    };
    assert_eq!(
        moved("netblk_payload_sent_bytes_total", ("mode", "zerocopy")),
        2.0 * f64::from(1u32 << 20),
        "R x the written bytes, all zero-copy"
    );
    assert_eq!(
        moved("netblk_payload_sent_bytes_total", ("mode", "copy")),
        0.0,
        "no copy per replica"
    );
    // Each column's two members received the same bytes.
    let to_node = |i: usize| {
        moved(
            "netblk_node_sent_bytes_total",
            ("node", spec.nodes[i].to_string().as_str()),
        )
    };
    assert_eq!(to_node(0), to_node(2), "column 0's members");
    assert_eq!(to_node(1), to_node(3), "column 1's members");
    assert_eq!(to_node(0) + to_node(1), f64::from(1u32 << 20));
    // One chain per member (vectored zero-copy sends), or a send per piece
    // per member.
    let sends = moved("netblk_zerocopy_sends_total", ("volume", "mirrored"));
    let chains = if netblk::uring::probe_sendmsg_zc_fixed() {
        4.0
    } else {
        32.0
    };
    assert_eq!(sends, chains, "zero-copy sends of a replicated 1 MiB write");
    for column in ["0", "1"] {
        assert_eq!(
            mirrored(&after, "netblk_column_in_sync_replicas", ("column", column)),
            2.0
        );
        assert_eq!(
            mirrored(&after, "netblk_column_degraded", ("column", column)),
            0.0
        );
    }
    assert_eq!(
        value(&after, "netblk_reconciled_bytes", &[("volume", "mirrored")]),
        Some(0.0),
        "a fresh volume reconciles nothing"
    );
    drop(volume);
}

/// The mock node's own `/metrics`: requests by op and status, bytes.
#[test]
fn the_mock_node_serves_its_counters() {
    let node = MockNode::start(&["--store", "memory", "--metrics-addr", "127.0.0.1:0"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let addr: SocketAddr = loop {
        let log = node.log();
        if let Some(at) = log
            .lines()
            .find_map(|l| l.split("metrics at http://").nth(1))
            .and_then(|rest| rest.split('/').next())
            .and_then(|a| a.parse().ok())
        {
            break at;
        }
        assert!(
            Instant::now() < deadline,
            "no metrics address in the log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut client = NodeClient::open(node.addr, handshake("m", 1 << 20, 65536, 1, 0));
    for i in 0..7u64 {
        client.write(i * 4096, &[1; 4096], false);
    }
    let _ = client.read(0, 4096);
    let samples = scrape(addr);
    assert_eq!(
        value(
            &samples,
            "netblk_mock_requests_total",
            &[("op", "write"), ("status", "ok")]
        ),
        Some(7.0)
    );
    assert_eq!(
        value(
            &samples,
            "netblk_mock_requests_total",
            &[("op", "read"), ("status", "ok")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, "netblk_mock_written_bytes_total", &[]),
        Some(7.0 * 4096.0)
    );
    assert_eq!(
        value(&samples, "netblk_mock_connections_open", &[]),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, "netblk_mock_protocol_errors_total", &[]),
        Some(0.0)
    );
    let (code, _) = endpoint::get(addr, "/nothing").expect("get");
    assert_eq!(code, 404);
}
