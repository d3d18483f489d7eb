//! Mock-cluster tests: the in-process frontend (engine + io_uring driver)
//! against several `netblk-mock-node` processes on 127.0.0.1, with random
//! concurrent workloads checked against an in-memory reference model, and
//! every node's store checked to hold exactly its stripes.

use std::sync::{Arc, Mutex};
use std::thread;

use netblk::frontend::{OpenError, Volume, VolumeOptions};
use netblk::layout::VolumeSpec;
use netblk::net::ConnectError;
use netblk::rng::Rng;
use netblk::uring::SendMode;
use netblk_tests::cluster::Cluster;

const MIB: u64 = 1 << 20;

fn fill(rng: &mut Rng, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        let x = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&x[..chunk.len()]);
    }
}

/// Runs `ops` random operations per thread, each thread in its own region
/// of the volume, checking every read against the model.
fn workload(volume: &Volume, model: &Arc<Mutex<Vec<u8>>>, threads: u64, ops: usize, seed: u64) {
    let region = volume.size() / threads;
    let stripe_unit = u64::from(volume.layout().stripe_unit());
    thread::scope(|s| {
        for t in 0..threads {
            let model = Arc::clone(model);
            s.spawn(move || {
                let mut rng = Rng::new(seed ^ (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let base = t * region;
                for _ in 0..ops {
                    // 512 B to 8 MiB, mostly small; offsets 512-aligned but
                    // not aligned to the stripe unit.
                    let sectors = match rng.below(10) {
                        0 => 1 + rng.below(16 * 1024),
                        1..=3 => 1 + rng.below(2048),
                        _ => 1 + rng.below(64),
                    };
                    let len = (sectors * 512).min(region);
                    let mut offset = base + 512 * rng.below((region - len) / 512 + 1);
                    if rng.below(3) == 0 {
                        // Aligned to the stripe unit (regions are aligned too).
                        offset -= offset % stripe_unit;
                    }
                    let (o, l) = (offset as usize, len as usize);
                    match rng.below(10) {
                        0..=3 => {
                            let mut data = vec![0u8; l];
                            fill(&mut rng, &mut data);
                            if rng.below(8) == 0 {
                                volume.write_at_fua(&data, offset).expect("write fua");
                            } else {
                                volume.write_at(&data, offset).expect("write");
                            }
                            model.lock().expect("model")[o..o + l].copy_from_slice(&data);
                        }
                        4..=7 => {
                            let mut data = vec![0xeeu8; l];
                            volume.read_at(&mut data, offset).expect("read");
                            let model = model.lock().expect("model");
                            assert!(
                                data == model[o..o + l],
                                "read of {l} at {offset} differs from the model"
                            );
                        }
                        8 => volume.flush().expect("flush"),
                        _ => {
                            if rng.below(2) == 0 {
                                volume.discard(offset, len).expect("discard");
                            } else {
                                volume.write_zeroes(offset, len).expect("write zeroes");
                            }
                            model.lock().expect("model")[o..o + l].fill(0);
                        }
                    }
                }
            });
        }
    });
}

fn run_case(nodes: usize, queues: usize, stripe_unit: u32, mode: SendMode, seed: u64) {
    let cluster = Cluster::start(nodes);
    let name = format!("vol-{nodes}-{queues}-{mode}");
    let size = 64 * MIB;
    let spec = VolumeSpec {
        replicas: 1,
        name: name.clone(),
        size,
        stripe_unit,
        nodes: cluster.addrs(),
    };
    let options = VolumeOptions {
        queues,
        depth: 16,
        max_io: MIB as u32,
        send_mode: mode,
        ..VolumeOptions::default()
    };
    let volume = Volume::open(&spec, &options).expect("open volume");
    let model = Arc::new(Mutex::new(vec![0u8; size as usize]));
    workload(&volume, &model, 4, 60, seed);
    volume.flush().expect("final flush");
    // Every byte through the frontend once more.
    let mut all = vec![0u8; size as usize];
    volume.read_at(&mut all, 0).expect("read all");
    let model = model.lock().expect("model");
    assert!(all == *model, "whole volume differs from the model");
    drop(volume);
    // Each node holds exactly its stripes.
    let layout = spec.layout().expect("layout");
    let files: Vec<Vec<u8>> = (0..nodes).map(|i| cluster.node_file(i, &name)).collect();
    for (i, file) in files.iter().enumerate() {
        assert_eq!(file.len() as u64, layout.node_capacity(i), "node {i} size");
    }
    for p in layout.pieces(0, size) {
        let held = &files[p.column][p.node_offset as usize..][..p.len as usize];
        let want = &model[p.buf_offset as usize..][..p.len as usize];
        assert!(
            held == want,
            "node {} at {} does not hold its stripe",
            p.column,
            p.node_offset
        );
    }
}

#[test]
fn one_node_one_queue() {
    run_case(1, 1, 128 << 10, SendMode::ZeroCopy, 1);
}

#[test]
fn three_nodes_one_queue_zero_copy() {
    run_case(3, 1, 64 << 10, SendMode::ZeroCopy, 2);
}

#[test]
fn three_nodes_four_queues_copy() {
    run_case(3, 4, 4 << 10, SendMode::Copy, 3);
}

#[test]
fn eight_nodes_four_queues_zero_copy() {
    run_case(8, 4, 128 << 10, SendMode::ZeroCopy, 4);
}

#[test]
fn eight_nodes_one_queue_copy() {
    run_case(8, 1, 1 << 20, SendMode::Copy, 5);
}

#[test]
fn one_node_four_queues_copy() {
    run_case(1, 4, 64 << 10, SendMode::Copy, 6);
}

#[test]
fn a_refused_handshake_names_the_node() {
    let cluster = Cluster::start(2);
    let mut spec = VolumeSpec {
        replicas: 1,
        name: "refuse".into(),
        size: 16 * MIB,
        stripe_unit: 65536,
        nodes: cluster.addrs(),
    };
    drop(Volume::open(&spec, &VolumeOptions::default()).expect("create"));
    // Same nodes in the other order: the fingerprints no longer match.
    spec.nodes.reverse();
    match Volume::open(&spec, &VolumeOptions::default()) {
        Err(OpenError::Node(ConnectError::Refused {
            node: 0,
            addr,
            message,
        })) => {
            assert_eq!(addr, spec.nodes[0]);
            assert!(message.contains("exists with"), "{message}");
        }
        Err(other) => panic!("expected a refusal from node 0, got {other}"),
        Ok(_) => panic!("expected a refusal from node 0, got a volume"),
    }
}

#[test]
fn an_unreachable_node_is_a_clear_error() {
    let cluster = Cluster::start(1);
    // A port nobody listens on: bind one, then free it.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let spec = VolumeSpec {
        replicas: 1,
        name: "unreachable".into(),
        size: 16 * MIB,
        stripe_unit: 65536,
        nodes: vec![cluster.nodes[0].addr, free],
    };
    match Volume::open(&spec, &VolumeOptions::default()) {
        Err(OpenError::Node(ConnectError::Connect { node: 1, addr, .. })) => assert_eq!(addr, free),
        Err(other) => panic!("expected a connect error for node 1, got {other}"),
        Ok(_) => panic!("expected an error"),
    }
}

#[test]
fn out_of_range_and_node_errors_surface_as_io_errors() {
    let cluster = Cluster::start(2);
    let spec = cluster.spec("errors", 16 * MIB);
    let volume = Volume::open(&spec, &VolumeOptions::default()).expect("open");
    let mut buf = vec![0u8; 4096];
    let err = volume
        .read_at(&mut buf, 16 * MIB - 512)
        .expect_err("beyond the end");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    cluster.nodes[1]
        .admin()
        .set_faults(netblk_protocol::pb::Faults {
            error_probability: 1.0,
            error_status: netblk_protocol::pb::Status::NoSpace as i32,
            ..Default::default()
        });
    // Node 0 alone is fine; anything touching node 1 fails with its errno.
    volume.write_at(&[1; 4096], 0).expect("node 0 only");
    let err = volume.write_at(&[1; 4096], 65536).expect_err("node 1");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    let err = volume
        .read_at(&mut vec![0u8; 131072], 0)
        .expect_err("spans both");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
}

/// A volume over `cluster` with a model, and a workload running in the
/// background while `disturb` does its worst; no IO may fail.
fn survive(cluster: &mut Cluster, name: &str, disturb: impl FnOnce(&mut Cluster)) {
    let size = 32 * MIB;
    let spec = cluster.spec(name, size);
    let options = VolumeOptions {
        queues: 2,
        depth: 16,
        io_timeout: std::time::Duration::from_secs(30),
        ..VolumeOptions::default()
    };
    let volume = Volume::open(&spec, &options).expect("open volume");
    let model = Arc::new(Mutex::new(vec![0u8; size as usize]));
    thread::scope(|s| {
        let worker = s.spawn(|| workload(&volume, &model, 2, 150, 99));
        thread::sleep(std::time::Duration::from_millis(150));
        disturb(cluster);
        worker
            .join()
            .expect("workload: no IO error while nodes come and go");
    });
    let mut all = vec![0u8; size as usize];
    volume.read_at(&mut all, 0).expect("read all");
    assert!(
        all == *model.lock().expect("model"),
        "volume differs from the model"
    );
}

#[test]
fn a_node_killed_and_restarted_mid_workload_costs_no_io_error() {
    let mut cluster = Cluster::start(3);
    survive(&mut cluster, "restart", |cluster| {
        cluster.nodes[1].signal(libc::SIGKILL);
        assert!(
            cluster.nodes[1]
                .wait_exit(std::time::Duration::from_secs(5))
                .is_some()
        );
        thread::sleep(std::time::Duration::from_millis(300));
        cluster.restart(1, &[]);
    });
}

#[test]
fn dropped_connections_and_corrupted_replies_are_survived() {
    let mut cluster = Cluster::start(3);
    cluster.nodes[0]
        .admin()
        .set_faults(netblk_protocol::pb::Faults {
            drop_after: 40,
            ..Default::default()
        });
    survive(&mut cluster, "flaky", |cluster| {
        for _ in 0..3 {
            cluster.nodes[2]
                .admin()
                .set_faults(netblk_protocol::pb::Faults {
                    corrupt_replies: 1,
                    ..Default::default()
                });
            thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    assert!(cluster.nodes[0].admin().stats().dropped_connections > 0);
    assert!(cluster.nodes[2].admin().stats().corrupted_replies > 0);
}

#[test]
fn a_node_down_past_its_timeout_fails_fast_then_recovers() {
    use std::time::{Duration, Instant};
    let mut cluster = Cluster::start(2);
    let spec = cluster.spec("down", 16 * MIB);
    let options = VolumeOptions {
        io_timeout: Duration::from_secs(30),
        node_down_timeout: Duration::from_secs(1),
        ..VolumeOptions::default()
    };
    let volume = Volume::open(&spec, &options).expect("open");
    volume.write_at(&[1; 4096], 65536).expect("node 1 up");
    cluster.nodes[1].signal(libc::SIGKILL);
    assert!(cluster.nodes[1].wait_exit(Duration::from_secs(5)).is_some());

    // Stripes of node 1: EIO well before the 30 s IO timeout.
    let start = Instant::now();
    let err = volume
        .write_at(&[2; 4096], 65536)
        .expect_err("node 1 is down");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    let waited = start.elapsed();
    assert!(waited < Duration::from_secs(5), "failed after {waited:?}");
    // Once given up on, at once.
    let start = Instant::now();
    assert!(volume.write_at(&[2; 4096], 65536).is_err());
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "fast fail took {:?}",
        start.elapsed()
    );
    // Node 0 keeps working meanwhile.
    volume.write_at(&[3; 4096], 0).expect("node 0 is up");

    // Back in place: IO to its stripes works again, no remap.
    cluster.restart(1, &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match volume.write_at(&[4; 4096], 65536) {
            Ok(()) => break,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(100)),
            Err(err) => panic!("node 1 back, IO still fails: {err}"),
        }
    }
    let mut back = vec![0u8; 4096];
    volume.read_at(&mut back, 65536).expect("read from node 1");
    assert_eq!(back, vec![4; 4096]);
    volume.read_at(&mut back, 0).expect("read from node 0");
    assert_eq!(back, vec![3; 4096]);
}

#[test]
fn a_completed_flush_is_durable_even_when_it_crossed_a_reconnect() {
    // Nodes with a volatile write cache: only flushed (or FUA) data survives
    // their crash. Every flush is made to cross a reconnect: each node drops
    // each connection at its next request, so the flush's pieces are lost
    // with their connections and must be sent again on new ones.
    const ROUNDS: u64 = 4;
    let args = ["--volatile-cache"];
    let mut cluster = Cluster::start_with(3, &args);
    let size = 8 * MIB;
    let spec = cluster.spec("flushes", size);
    let options = VolumeOptions {
        queues: 2,
        depth: 16,
        ..VolumeOptions::default()
    };
    let mut model = vec![0u8; size as usize];
    let mut durable = model.clone();
    let mut rng = Rng::new(7);
    {
        let volume = Volume::open(&spec, &options).expect("open volume");
        let write_some = |rng: &mut Rng, model: &mut Vec<u8>| {
            for _ in 0..24 {
                let len = 512 * (1 + rng.below(512));
                let offset = 512 * rng.below((size - len) / 512 + 1);
                let range = offset as usize..(offset + len) as usize;
                fill(rng, &mut model[range.clone()]);
                volume.write_at(&model[range], offset).expect("write");
            }
        };
        for round in 0..ROUNDS {
            write_some(&mut rng, &mut model);
            for node in &cluster.nodes {
                node.admin().set_faults(netblk_protocol::pb::Faults {
                    drop_after: 1,
                    ..Default::default()
                });
            }
            volume
                .flush()
                .unwrap_or_else(|err| panic!("round {round}: flush failed: {err}"));
            durable.copy_from_slice(&model);
            for node in &cluster.nodes {
                node.admin()
                    .set_faults(netblk_protocol::pb::Faults::default());
            }
        }
        // Written, never flushed: a crash may take it.
        write_some(&mut rng, &mut model);
        for (i, node) in cluster.nodes.iter().enumerate() {
            let dropped = node.admin().stats().dropped_connections;
            assert!(
                dropped >= ROUNDS,
                "node {i}: only {dropped} connections dropped; flushes did not cross reconnects"
            );
        }
    }
    for i in 0..cluster.nodes.len() {
        cluster.nodes[i].admin().crash();
        assert!(
            cluster.nodes[i]
                .wait_exit(std::time::Duration::from_secs(5))
                .is_some()
        );
        cluster.restart(i, &args);
    }
    let volume = Volume::open(&spec, &options).expect("open after the crash");
    let mut all = vec![0u8; size as usize];
    volume.read_at(&mut all, 0).expect("read all");
    let first_bad = all.iter().zip(&durable).position(|(a, b)| a != b);
    assert!(
        first_bad.is_none(),
        "after the crash the volume differs from what the last flush covered, first at byte {first_bad:?}"
    );
    assert!(
        all != model,
        "the unflushed writes should have been lost with the caches"
    );
}

#[test]
fn a_stalled_node_times_out_within_the_bound_then_works_again() {
    use std::time::{Duration, Instant};
    let cluster = Cluster::start(2);
    let spec = cluster.spec("stalled", 16 * MIB);
    let timeout = Duration::from_secs(1);
    let options = VolumeOptions {
        io_timeout: timeout,
        ..VolumeOptions::default()
    };
    let volume = Volume::open(&spec, &options).expect("open");
    volume.write_at(&[1; 4096], 65536).expect("node 1 answers");
    cluster.nodes[1]
        .admin()
        .set_faults(netblk_protocol::pb::Faults {
            stall: true,
            ..Default::default()
        });
    // The node takes the request and never answers: EIO at the deadline.
    let start = Instant::now();
    let err = volume
        .write_at(&[2; 4096], 65536)
        .expect_err("node 1 is stalled");
    let waited = start.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert!(
        waited >= timeout - Duration::from_millis(50) && waited < timeout * 3,
        "timed out after {waited:?} with a {timeout:?} IO timeout"
    );
    // The other node is not held up meanwhile.
    let start = Instant::now();
    volume.write_at(&[3; 4096], 0).expect("node 0 answers");
    assert!(start.elapsed() < Duration::from_millis(500));
    // Once the stall ends, the same node serves again, in order.
    cluster.nodes[1]
        .admin()
        .set_faults(netblk_protocol::pb::Faults::default());
    volume.write_at(&[4; 4096], 65536).expect("node 1 is back");
    let mut back = vec![0u8; 4096];
    volume.read_at(&mut back, 65536).expect("read node 1");
    assert_eq!(back, vec![4; 4096]);
    volume.read_at(&mut back, 0).expect("read node 0");
    assert_eq!(back, vec![3; 4096]);
}

#[test]
fn a_slow_node_is_waited_for_and_the_data_is_right() {
    use std::time::{Duration, Instant};
    let cluster = Cluster::start(3);
    let latency = Duration::from_millis(100);
    cluster.nodes[1]
        .admin()
        .set_faults(netblk_protocol::pb::Faults {
            latency_us: latency.as_micros() as u64,
            jitter_us: 50_000,
            ..Default::default()
        });
    let spec = cluster.spec("slow", 16 * MIB);
    let options = VolumeOptions {
        io_timeout: Duration::from_secs(2),
        ..VolumeOptions::default()
    };
    let volume = Volume::open(&spec, &options).expect("open");
    let mut rng = Rng::new(11);
    for round in 0..10u64 {
        // 192 KiB from a stripe boundary: one piece on every node.
        let offset = round * 3 * 65536;
        let mut data = vec![0u8; 3 * 65536];
        fill(&mut rng, &mut data);
        let start = Instant::now();
        volume
            .write_at(&data, offset)
            .expect("write through a slow node");
        let mut back = vec![0u8; data.len()];
        volume
            .read_at(&mut back, offset)
            .expect("read through a slow node");
        let took = start.elapsed();
        assert!(back == data, "round {round}: data differs");
        // Both went through the slow node; neither timed out.
        assert!(
            took >= 2 * latency && took < Duration::from_secs(2),
            "round {round}: write + read took {took:?}"
        );
    }
}
