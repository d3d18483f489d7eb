//! `netblk-mock-node` as a process on 127.0.0.1: serving, stores, refusals,
//! every fault knob, bad input and graceful shutdown.

use std::collections::{HashMap, HashSet};
use std::thread;
use std::time::{Duration, Instant};

use netblk_mock_node::CRASH_EXIT_CODE;
use netblk_protocol::pb::{self, CorruptPart, Status, header::Kind, request::Op};
use netblk_protocol::{
    Decoded, Limits, MAX_HEADER_LEN, PREAMBLE_LEN, Preamble, decode_frame, encode_frame,
};
use netblk_tests::{ClientError, MockNode, NodeClient, handshake, pattern};

const MIB: u64 = 1 << 20;
const OK: i32 = Status::Ok as i32;

fn write_op(offset: u64, len: usize, fua: bool) -> Op {
    Op::Write(pb::Write {
        offset,
        length: len as u32,
        fua,
        crc32c: None,
    })
}

fn read_op(offset: u64, length: u32) -> Op {
    Op::Read(pb::Read { offset, length })
}

#[test]
fn concurrent_pipelined_clients_get_every_reply_even_out_of_order() {
    // Jitter makes replies overtake each other.
    let node = MockNode::start(&["--jitter-us", "3000", "--fault-seed", "7"]);
    let addr = node.addr;
    let workers: Vec<_> = (0..4u64)
        .map(|worker| {
            thread::spawn(move || {
                // Two volumes, two clients each, disjoint regions.
                let volume = if worker % 2 == 0 { "even" } else { "odd" };
                let mut client = NodeClient::open(addr, handshake(volume, 64 * MIB, 65536, 1, 0));
                let base = worker * 8 * MIB;
                let mut expected = HashMap::new();
                let mut sent_order = Vec::new();
                for i in 0..48u64 {
                    let len = 4096 * (1 + (i as usize % 16));
                    let data = pattern(worker * 1000 + i, len);
                    let offset = base + i * 65536;
                    let id = client
                        .send(write_op(offset, len, i % 5 == 0), &data)
                        .expect("send");
                    expected.insert(offset, data);
                    sent_order.push(id);
                }
                let mut got_order = Vec::new();
                for _ in 0..48 {
                    let (reply, _) = client.recv().expect("write reply");
                    assert_eq!(reply.status, OK, "{}", reply.message);
                    got_order.push(reply.id);
                }
                let mut sorted = got_order.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, sent_order, "every write answered exactly once");
                let reordered = got_order != sent_order;

                let mut reads = HashMap::new();
                for (offset, data) in &expected {
                    let id = client
                        .send(read_op(*offset, data.len() as u32), &[])
                        .expect("send");
                    reads.insert(id, *offset);
                }
                for _ in 0..reads.len() {
                    let (reply, data) = client.recv().expect("read reply");
                    assert_eq!(reply.status, OK, "{}", reply.message);
                    let offset = reads.remove(&reply.id).expect("reply to a request we sent");
                    assert_eq!(data, expected[&offset], "data at {offset}");
                }
                reordered
            })
        })
        .collect();
    let reordered = workers
        .into_iter()
        .map(|w| w.join().expect("worker"))
        .filter(|r| *r)
        .count();
    assert!(
        reordered > 0,
        "with jitter, some replies must overtake others"
    );
    let stats = node.admin().stats();
    assert_eq!(stats.volumes, 2);
    assert_eq!(stats.requests, 4 * 96);
}

#[test]
fn volumes_are_separate_and_created_on_first_handshake() {
    let node = MockNode::start(&[]);
    let mut a = NodeClient::open(node.addr, handshake("a", MIB, 4096, 1, 0));
    let mut b = NodeClient::open(node.addr, handshake("b", 2 * MIB, 65536, 2, 1));
    a.write(0, &[1; 4096], false);
    b.write(0, &[2; 4096], false);
    assert_eq!(a.read(0, 4096), vec![1; 4096]);
    assert_eq!(b.read(0, 4096), vec![2; 4096]);
    // b holds half of a 2 MiB volume striped over 2 nodes.
    assert_eq!(b.status_of(read_op(MIB - 4096, 4096), &[]), OK);
    assert_eq!(
        b.status_of(read_op(MIB, 4096), &[]),
        Status::OutOfRange as i32
    );
}

#[test]
fn handshake_refuses_a_different_fingerprint_or_size() {
    let node = MockNode::start(&[]);
    let good = handshake("vol", 3 * MIB, 65536, 3, 1);
    let mut first = NodeClient::open(node.addr, good.clone());
    first.write(0, &[9; 512], false);

    let mut refusals = vec![
        (
            "size",
            handshake("vol", 6 * MIB, 65536, 3, 1),
            "exists with",
        ),
        (
            "stripe unit",
            handshake("vol", 3 * MIB, 131072, 3, 1),
            "exists with",
        ),
        (
            "node count",
            handshake("vol", 3 * MIB, 65536, 4, 1),
            "exists with",
        ),
        (
            "node index",
            handshake("vol", 3 * MIB, 65536, 3, 2),
            "exists with",
        ),
        (
            "bad name",
            handshake("../etc", 3 * MIB, 65536, 3, 1),
            "volume name",
        ),
        (
            "bad stripe",
            handshake("other", 3 * MIB, 1000, 3, 1),
            "stripe unit",
        ),
        (
            "index past count",
            handshake("other", 3 * MIB, 65536, 3, 3),
            "node index",
        ),
    ];
    let mut wrong_version = good.clone();
    wrong_version.protocol_version = 2;
    refusals.push(("version", wrong_version, "protocol version"));
    let mut no_layout = good.clone();
    no_layout.layout = None;
    refusals.push(("no layout", no_layout, "no layout"));
    for revision in [0, netblk_protocol::PROTOCOL_REVISION + 1] {
        let mut other = good.clone();
        other.revision = revision;
        refusals.push(("revision", other, "upgrade the client"));
    }

    for (what, hs, why) in &refusals {
        let mut client = NodeClient::connect(node.addr).expect("connect");
        let reply = client.handshake(hs.clone()).expect("a refusal is a reply");
        assert_eq!(reply.status, Status::Refused as i32, "{what}");
        assert!(reply.message.contains(why), "{what}: {}", reply.message);
        assert!(
            client.is_closed_by_node(),
            "{what}: refused connection is closed"
        );
    }
    // The volume is untouched and the first client still works.
    assert_eq!(first.read(0, 512), vec![9; 512]);
    NodeClient::open(node.addr, good);
    let stats = node.admin().stats();
    assert_eq!(stats.connections_refused, refusals.len() as u64);
    assert!(node.wait_for_log("handshake refused"));
}

#[test]
fn directory_store_is_durable_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = format!("dir:{}", dir.path().display());
    let hs = handshake("durable", 512 * MIB, 65536, 2, 0);
    let writes: Vec<(u64, Vec<u8>)> = (0..20u64)
        .map(|i| (i * 3 * MIB + 512 * i, pattern(i, 4096 + 512 * i as usize)))
        .collect();
    {
        let mut node = MockNode::start(&["--store", &store]);
        let mut client = NodeClient::open(node.addr, hs.clone());
        for (i, (offset, data)) in writes.iter().enumerate() {
            client.write(*offset, data, i % 2 == 0);
        }
        assert_eq!(client.status_of(Op::Flush(pb::Flush {}), &[]), OK);
        assert!(node.terminate().success(), "clean exit on SIGTERM");
    }
    assert!(dir.path().join("durable.vol").exists());
    assert!(dir.path().join("durable.meta").exists());

    let node = MockNode::start(&["--store", &store]);
    // The volume's size and layout survived too.
    let mut wrong = NodeClient::connect(node.addr).expect("connect");
    let reply = wrong
        .handshake(handshake("durable", 1024 * MIB, 65536, 2, 0))
        .expect("reply");
    assert_eq!(reply.status, Status::Refused as i32);
    let mut client = NodeClient::open(node.addr, hs);
    for (offset, data) in &writes {
        assert_eq!(
            &client.read(*offset, data.len() as u32),
            data,
            "at {offset}"
        );
    }
    assert_eq!(client.read(200 * MIB, 4096), vec![0; 4096]);
}

fn resize_op(volume_size: u64) -> Op {
    Op::Resize(pb::Resize { volume_size })
}

/// A volume grown online: new space is writable at once, the old data is
/// where it was, handshakes must present the new size, and (in a directory
/// store, and with a volatile cache in front) all of it survives a restart;
/// a shrink frees what lies past the new end, and a size the layout cannot
/// have is refused without a change.
fn check_resize(store: &str, extra: &[&str]) {
    let mut args = vec!["--store", store];
    args.extend_from_slice(extra);
    let hs = |size: u64| handshake("grown", size, 65536, 2, 1);
    let mut node = MockNode::start(&args);
    let mut client = NodeClient::open(node.addr, hs(64 * MIB));
    // Node 1 of 2 holds half of the volume: 32 MiB, then 64 MiB.
    let old = pattern(1, 65536);
    client.write(32 * MIB - 65536, &old, false);
    let beyond = client.status_of(write_op(32 * MIB, 4096, false), &pattern(2, 4096));
    assert_eq!(beyond, Status::OutOfRange as i32, "not yet grown");
    assert_eq!(
        client.status_of(resize_op(1000), &[]),
        Status::Invalid as i32,
        "not whole sectors"
    );
    assert_eq!(client.status_of(resize_op(128 * MIB), &[]), OK);
    let new = pattern(3, 65536);
    client.write(64 * MIB - 65536, &new, false);
    assert_eq!(
        client.read(32 * MIB - 65536, 65536),
        old,
        "the old end kept its data"
    );
    assert_eq!(
        client.read(32 * MIB, 4096),
        vec![0; 4096],
        "new space reads zeroes"
    );
    assert_eq!(client.status_of(Op::Flush(pb::Flush {}), &[]), OK);
    let reply = NodeClient::handshake_reply(node.addr, hs(64 * MIB));
    assert_eq!(
        reply.status,
        Status::Refused as i32,
        "the old size is refused"
    );
    drop(client);
    let persistent = store.starts_with("dir:");
    if persistent {
        assert!(node.terminate().success());
        node = MockNode::start(&args);
    }
    let mut client = NodeClient::open(node.addr, hs(128 * MIB));
    if persistent {
        assert_eq!(client.read(64 * MIB - 65536, 65536), new, "after a restart");
    }
    // Shrunk back: what was past the new end is gone when it grows again.
    assert_eq!(client.status_of(resize_op(64 * MIB), &[]), OK);
    assert_eq!(client.status_of(resize_op(128 * MIB), &[]), OK);
    assert_eq!(client.read(64 * MIB - 65536, 65536), vec![0; 65536]);
    assert_eq!(client.read(32 * MIB - 65536, 65536), old);
}

#[test]
fn volumes_resize_online_in_memory() {
    check_resize("memory", &[]);
}

#[test]
fn volumes_resize_online_on_disk_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    check_resize(&format!("dir:{}", dir.path().display()), &[]);
    let meta = std::fs::read_to_string(dir.path().join("grown.meta")).expect("meta");
    assert!(
        meta.contains(&format!("volume_size {}", 128 * MIB)),
        "{meta}"
    );
    let vol = std::fs::metadata(dir.path().join("grown.vol")).expect("vol");
    assert_eq!(vol.len(), 64 * MIB, "node 1 of 2 holds half");
}

#[test]
fn volumes_resize_behind_a_volatile_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    check_resize(
        &format!("dir:{}", dir.path().display()),
        &["--volatile-cache"],
    );
}

/// A handshake for an existing volume only: NOT_FOUND (nothing created)
/// where there is none, the volume's size with size 0, a mismatch refused;
/// then Delete: the volume's other connections fail, it is gone (from the
/// directory store too), and a creating handshake makes a new one.
fn check_existing_and_delete(store: &str) {
    let node = MockNode::start(&["--store", store]);
    let existing = |size: u64| pb::Handshake {
        existing: true,
        ..handshake("managed", size, 65536, 2, 0)
    };
    let reply = NodeClient::handshake_reply(node.addr, existing(0));
    assert_eq!(reply.status, Status::NotFound as i32, "{}", reply.message);
    assert_eq!(node.admin().stats().volumes, 0, "nothing created");

    let mut user = NodeClient::open(node.addr, handshake("managed", 64 * MIB, 65536, 2, 0));
    user.write(0, &pattern(5, 4096), false);
    assert_eq!(user.status_of(Op::Flush(pb::Flush {}), &[]), OK);
    let mut manager = NodeClient::connect(node.addr).expect("connect");
    let reply = manager.handshake(existing(0)).expect("reply");
    assert_eq!(reply.status, OK, "{}", reply.message);
    assert_eq!(reply.volume_size, 64 * MIB, "the reply states the size");
    let first_id = reply.volume_id.clone();
    let reply = NodeClient::handshake_reply(node.addr, existing(32 * MIB));
    assert_eq!(
        reply.status,
        Status::Refused as i32,
        "a size that does not match"
    );

    assert_eq!(manager.status_of(Op::Delete(pb::Delete {}), &[]), OK);
    assert_eq!(
        user.status_of(read_op(0, 4096), &[]),
        Status::NotFound as i32,
        "a connection to a deleted volume fails"
    );
    let reply = NodeClient::handshake_reply(node.addr, existing(0));
    assert_eq!(reply.status, Status::NotFound as i32, "deleted");
    let mut fresh = NodeClient::connect(node.addr).expect("connect");
    let reply = fresh
        .handshake(handshake("managed", 64 * MIB, 65536, 2, 0))
        .expect("reply");
    assert_eq!(reply.status, OK);
    assert_ne!(reply.volume_id, first_id, "a new volume, not the old one");
    assert_eq!(fresh.read(0, 4096), vec![0; 4096], "with none of its data");
}

#[test]
fn existing_only_handshakes_and_delete_in_memory() {
    check_existing_and_delete("memory");
}

#[test]
fn existing_only_handshakes_and_delete_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = format!("dir:{}", dir.path().display());
    check_existing_and_delete(&store);
    // The volume was made anew by the last handshake; its files are the new
    // one's. A node restarted on the store finds it as an existing volume.
    let node = MockNode::start(&["--store", &store]);
    let reply = NodeClient::handshake_reply(
        node.addr,
        pb::Handshake {
            existing: true,
            ..handshake("managed", 0, 65536, 2, 0)
        },
    );
    assert_eq!(reply.status, OK, "{}", reply.message);
    assert_eq!(reply.volume_size, 64 * MIB);
}

#[test]
fn memory_store_is_sparse() {
    let node = MockNode::start(&[]);
    let tib = 1u64 << 40;
    let mut client = NodeClient::open(node.addr, handshake("huge", tib, 1 << 20, 1, 0));
    assert_eq!(node.admin().stats().stored_bytes, 0);
    client.write(tib - MIB, &pattern(1, MIB as usize), false);
    client.write(tib / 2, &pattern(2, 4096), false);
    let stored = node.admin().stats().stored_bytes;
    assert!(
        (MIB..=MIB + 128 * 1024).contains(&stored),
        "1 TiB volume with 1 MiB + 4 KiB written holds {stored} bytes"
    );
    assert_eq!(client.read(tib - MIB, MIB as u32), pattern(1, MIB as usize));
    assert_eq!(client.read(12345 * 512, 65536), vec![0; 65536]);
    assert_eq!(
        client.status_of(read_op(tib - 4096, 8192), &[]),
        Status::OutOfRange as i32
    );
    assert_eq!(
        client.status_of(read_op(u64::MAX - 10, 4096), &[]),
        Status::OutOfRange as i32
    );
}

fn check_discard_and_write_zeroes(node: &MockNode) {
    let mut client = NodeClient::open(node.addr, handshake("z", 64 * MIB, 65536, 1, 0));
    let data = pattern(5, 4 * MIB as usize);
    client.write(0, &data, false);
    let before = node.admin().stats().stored_bytes;
    assert!(before >= 4 * MIB);

    let discard = Op::Discard(pb::Discard {
        offset: MIB,
        length: MIB,
    });
    assert_eq!(client.status_of(discard, &[]), OK);
    let zeroes = Op::WriteZeroes(pb::WriteZeroes {
        offset: 2 * MIB + 4096,
        length: MIB - 4096,
    });
    assert_eq!(client.status_of(zeroes, &[]), OK);

    let back = client.read(0, 4 * MIB as u32);
    let (mib, z) = (MIB as usize, 2 * MIB as usize + 4096);
    assert_eq!(&back[..mib], &data[..mib]);
    assert!(
        back[mib..2 * mib].iter().all(|b| *b == 0),
        "discarded range reads zeroes"
    );
    assert_eq!(&back[2 * mib..z], &data[2 * mib..z]);
    assert!(
        back[z..3 * mib].iter().all(|b| *b == 0),
        "write-zeroes range reads zeroes"
    );
    assert_eq!(&back[3 * mib..], &data[3 * mib..]);
    let after = node.admin().stats().stored_bytes;
    assert!(
        after + MIB + MIB / 2 <= before,
        "discard and write-zeroes free space: {before} -> {after}"
    );
}

#[test]
fn discard_and_write_zeroes_free_and_zero_in_memory() {
    check_discard_and_write_zeroes(&MockNode::start(&[]));
}

#[test]
fn discard_and_write_zeroes_free_and_zero_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = format!("dir:{}", dir.path().display());
    check_discard_and_write_zeroes(&MockNode::start(&["--store", &store]));
}

#[test]
fn oversized_reads_are_refused_per_request() {
    let node = MockNode::start(&["--max-io-size", "64K"]);
    let mut client = NodeClient::open(node.addr, handshake("v", 16 * MIB, 65536, 1, 0));
    assert_eq!(
        client.status_of(read_op(0, 65537), &[]),
        Status::Invalid as i32
    );
    assert_eq!(client.read(0, 65536).len(), 65536);
}

// ---- fault knobs, changed over the admin protocol ----

#[test]
fn latency_knob_delays_every_reply() {
    let node = MockNode::start(&[]);
    let mut client = NodeClient::open(node.addr, handshake("v", MIB, 65536, 1, 0));
    let mut admin = node.admin();
    admin.set_faults(pb::Faults {
        latency_us: 200_000,
        ..Default::default()
    });
    let start = Instant::now();
    for _ in 0..3 {
        client
            .send(Op::Ping(pb::Ping { nonce: 1 }), &[])
            .expect("send");
    }
    for _ in 0..3 {
        assert_eq!(client.recv().expect("reply").0.status, OK);
    }
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(200), "took {took:?}");
    assert!(
        took < Duration::from_millis(550),
        "pipelined, not serialised: {took:?}"
    );
    admin.set_faults(pb::Faults::default());
    let start = Instant::now();
    client.ping().expect("ping");
    assert!(start.elapsed() < Duration::from_millis(150));
}

#[test]
fn error_knob_answers_with_the_chosen_errno() {
    let node = MockNode::start(&["--fault-seed", "3"]);
    let mut client = NodeClient::open(node.addr, handshake("v", MIB, 65536, 1, 0));
    let mut admin = node.admin();
    admin.set_faults(pb::Faults {
        error_probability: 1.0,
        error_status: Status::NoSpace as i32,
        ..Default::default()
    });
    for _ in 0..10 {
        assert_eq!(
            client.status_of(write_op(0, 4096, false), &[3; 4096]),
            Status::NoSpace as i32
        );
    }
    // An injected error really skipped the write.
    admin.set_faults(pb::Faults::default());
    assert_eq!(client.read(0, 4096), vec![0; 4096]);

    admin.set_faults(pb::Faults {
        error_probability: 0.5,
        ..Default::default()
    });
    let statuses: Vec<i32> = (0..200)
        .map(|_| client.status_of(Op::Ping(pb::Ping { nonce: 0 }), &[]))
        .collect();
    let errors = statuses
        .iter()
        .filter(|s| **s == Status::IoError as i32)
        .count();
    assert!((50..150).contains(&errors), "{errors} of 200 at p=0.5");
    assert!(
        statuses
            .iter()
            .all(|s| *s == OK || *s == Status::IoError as i32)
    );
    assert_eq!(admin.stats().injected_errors, 10 + errors as u64);

    let refused = admin
        .try_set_faults(pb::Faults {
            error_probability: 2.0,
            ..Default::default()
        })
        .expect("reply");
    assert_eq!(refused.status, Status::Invalid as i32);
}

#[test]
fn drop_after_knob_closes_each_connection_after_n_requests() {
    let node = MockNode::start(&[]);
    node.admin().set_faults(pb::Faults {
        drop_after: 5,
        ..Default::default()
    });
    for round in 0..2 {
        let mut client = NodeClient::open(node.addr, handshake("v", MIB, 65536, 1, 0));
        // All eight in one write: the node closes the socket mid-pipeline.
        let mut pipeline = Vec::new();
        for id in 1..=8 {
            encode_frame(
                &pb::Header::request(id, Op::Ping(pb::Ping { nonce: id })),
                &[],
                &mut pipeline,
            )
            .expect("encode");
        }
        client.send_raw(&pipeline).expect("send");
        for _ in 0..5 {
            assert_eq!(client.recv().expect("one of the first five").0.status, OK);
        }
        assert!(
            matches!(
                client.recv(),
                Err(ClientError::Closed) | Err(ClientError::Io(_))
            ),
            "round {round}: the sixth request ends the connection"
        );
    }
    assert_eq!(node.admin().stats().dropped_connections, 2);
}

#[test]
fn stall_knob_holds_replies_until_cleared() {
    let node = MockNode::start(&[]);
    let mut client = NodeClient::open(node.addr, handshake("v", MIB, 65536, 1, 0));
    let mut admin = node.admin();
    admin.set_faults(pb::Faults {
        stall: true,
        ..Default::default()
    });
    let id = client
        .send(write_op(0, 4096, false), &[4; 4096])
        .expect("send");
    client
        .set_read_timeout(Duration::from_millis(400))
        .expect("timeout");
    let err = client.recv().expect_err("no reply while stalled");
    assert!(err.is_timeout(), "{err}");
    // Nothing was applied while stalled either.
    let mut other = NodeClient::open(node.addr, handshake("v", MIB, 65536, 1, 0));
    other.send(read_op(0, 4096), &[]).expect("send");
    admin.set_faults(pb::Faults::default());
    client
        .set_read_timeout(netblk_tests::WAIT)
        .expect("timeout");
    let (reply, _) = client.recv().expect("reply after the stall");
    assert_eq!((reply.id, reply.status), (id, OK));
    let (_, data) = other.recv().expect("read after the stall");
    assert!(data == vec![0; 4096] || data == vec![4; 4096]);
}

/// The node's threads, counted from /proc.
fn threads(node: &MockNode) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", node.pid()))
        .expect("node's tasks")
        .count()
}

/// Connections share the node's workers: a hundred open connections add no
/// thread (the node served one thread per connection before).
#[test]
fn connections_share_a_few_worker_threads() {
    // One malloc arena: a thread's first allocation would otherwise reserve
    // 64 MiB of address space, whenever under load that thread first runs
    // (the node's workers, its delay thread).
    let node = MockNode::start_one_arena(&["--threads", "2"]);
    // One connection per worker (they take turns), served before anything
    // is measured.
    let mut warm: Vec<NodeClient> = (0..2)
        .map(|_| NodeClient::open(node.addr, handshake("v", MIB, 65536, 1, 0)))
        .collect();
    for client in &mut warm {
        client.ping().expect("ping");
    }
    let before = threads(&node);
    let size_before = status_kib(&node, "VmSize:");
    let mut clients: Vec<NodeClient> = (0..100)
        .map(|_| NodeClient::open(node.addr, handshake("v", MIB, 65536, 1, 0)))
        .collect();
    for (i, client) in clients.iter_mut().enumerate() {
        client.write(i as u64 * 4096, &[i as u8; 4096], false);
    }
    for (i, client) in clients.iter_mut().enumerate() {
        assert_eq!(client.read(i as u64 * 4096, 4096), vec![i as u8; 4096]);
    }
    assert_eq!(threads(&node), before, "threads grew with connections");
    // Nor a receive buffer each (4 MiB): idle connections hold none.
    let grown = status_kib(&node, "VmSize:").saturating_sub(size_before);
    assert!(
        grown < 48 << 10,
        "the node's address space grew by {grown} KiB"
    );
}

/// A request held by a stall waits on the delay thread, not on its worker:
/// with one worker, a connection opened after the stall (not held by it) is
/// served while the older one's request is held, which is answered once
/// the stall ends.
#[test]
fn a_stalled_connection_does_not_hold_the_others_on_its_worker() {
    let node = MockNode::start(&["--threads", "1"]);
    let mut held = NodeClient::open(node.addr, handshake("v", MIB, 65536, 1, 0));
    let mut admin = node.admin();
    admin.set_faults(pb::Faults {
        stall: true,
        stall_open_only: true,
        ..Default::default()
    });
    let id = held
        .send(write_op(0, 4096, false), &[6; 4096])
        .expect("send");
    held.set_read_timeout(Duration::from_millis(300))
        .expect("timeout");
    assert!(held.recv().expect_err("held").is_timeout());
    let mut free = NodeClient::open(node.addr, handshake("v", MIB, 65536, 1, 0));
    let start = Instant::now();
    for _ in 0..20 {
        free.ping().expect("the newer connection is served");
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        free.read(0, 4096),
        vec![0; 4096],
        "the held write was applied"
    );
    admin.set_faults(pb::Faults::default());
    held.set_read_timeout(netblk_tests::WAIT).expect("timeout");
    let (reply, _) = held.recv().expect("reply after the stall");
    assert_eq!((reply.id, reply.status), (id, OK));
    assert_eq!(free.read(0, 4096), vec![6; 4096]);
}

/// Requests the node held back while replies piled up are served once
/// they drain, whoever drained them. With a 64 KiB backlog, 4 KiB read
/// replies fill it while still batched; the flush that follows writes them
/// all at once, so no writability event comes, and the client, waiting on
/// the very requests still in the node's buffer, sends nothing more: the
/// node once served the first sixteen and then nothing (a stall users saw
/// as a timed-out 1 MiB read in `netblk bench`).
#[test]
fn requests_held_back_for_a_full_backlog_are_served_when_it_drains() {
    let node = MockNode::start(&["--threads", "1", "--reply-backlog", "64K"]);
    let mut client = NodeClient::open(node.addr, handshake("v", 4 * MIB, 65536, 1, 0));
    client.write(0, &pattern(3, 4096), false);
    // All of them in one write: every request is in the node's buffer at once.
    let mut pipeline = Vec::new();
    for id in 1..=256u64 {
        encode_frame(
            &pb::Header::request(id, read_op(0, 4096)),
            &[],
            &mut pipeline,
        )
        .expect("encode");
    }
    client.send_raw(&pipeline).expect("send");
    client
        .set_read_timeout(Duration::from_secs(5))
        .expect("timeout");
    for i in 0..256 {
        let (reply, data) = client
            .recv()
            .unwrap_or_else(|e| panic!("reply {i} of 256 never came: {e}"));
        assert_eq!(reply.status, OK);
        assert_eq!(data, pattern(3, 4096), "reply {i}");
    }
    client.ping().expect("served after being held back");
}

/// A figure of the node's /proc status, KiB (`VmRSS:`, `VmSize:`).
fn status_kib(node: &MockNode, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", node.pid()))
        .expect("node's status")
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a figure in KiB")
}

/// A hostile client pipelines 300 reads of 1 MiB and reads no reply: the
/// node stops taking its requests once 8 MiB of replies wait (its memory
/// stays bounded, its other clients are served), and serves the rest as
/// the client reads.
#[test]
fn a_client_that_reads_no_replies_cannot_grow_the_nodes_memory() {
    let node = MockNode::start(&["--threads", "1"]);
    let mut hostile = NodeClient::open(node.addr, handshake("v", 4 * MIB, 65536, 1, 0));
    hostile.write(0, &pattern(7, 1 << 20), false);
    let before = status_kib(&node, "VmRSS:");
    for _ in 0..300 {
        hostile.send(read_op(0, 1 << 20), &[]).expect("send");
    }
    thread::sleep(Duration::from_millis(500));
    let grown = status_kib(&node, "VmRSS:").saturating_sub(before);
    assert!(
        grown < 64 << 10,
        "the node grew by {grown} KiB for unread replies"
    );
    // The worker still serves others.
    let mut other = NodeClient::open(node.addr, handshake("v", 4 * MIB, 65536, 1, 0));
    other.ping().expect("another client is served");
    for i in 0..300 {
        let (reply, data) = hostile.recv().unwrap_or_else(|e| panic!("reply {i}: {e}"));
        assert_eq!(reply.status, OK);
        assert_eq!(data, pattern(7, 1 << 20), "reply {i}");
    }
    // Held back while the client reads as it sends (as a real client
    // does), the connection is served as before and the node idles after:
    // it once stopped reading such a connection for good and spun on it.
    let mut receiver = hostile.try_clone().expect("clone");
    let reader = thread::spawn(move || {
        for i in 0..400 {
            let (reply, _) = receiver.recv().unwrap_or_else(|e| panic!("reply {i}: {e}"));
            assert_eq!(reply.status, OK);
        }
    });
    for _ in 0..400 {
        hostile.send(read_op(0, 1 << 20), &[]).expect("send");
    }
    reader.join().expect("every reply");
    hostile.ping().expect("served after being held back");
    let ticks = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", node.pid())).expect("stat");
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
    };
    let before = ticks();
    thread::sleep(Duration::from_secs(1));
    let busy = ticks() - before;
    assert!(
        busy < 30,
        "an idle node used {busy} of 100 clock ticks in a second"
    );
}

#[test]
fn corrupt_knob_mangles_exactly_the_next_n_replies() {
    let node = MockNode::start(&[]);
    node.admin().set_faults(pb::Faults {
        corrupt_replies: 1,
        ..Default::default()
    });
    let mut client = NodeClient::open(node.addr, handshake("v", MIB, 65536, 1, 0));
    // The default part: the frame no longer decodes as a reply.
    match client.ping() {
        Err(ClientError::Frame(_) | ClientError::Unexpected(_)) => {}
        other => panic!("expected a corrupted frame, got {other:?}"),
    }
    let mut client = NodeClient::open(node.addr, handshake("v", MIB, 65536, 1, 0));
    assert_eq!(client.ping().expect("clean reply").status, OK);
    let mut admin = node.admin();
    assert_eq!(admin.stats().corrupted_replies, 1);
    assert_eq!(admin.faults().corrupt_replies, 0);
}

/// The part of a reply frame a byte offset lies in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum FramePart {
    Preamble,
    Header,
    Payload,
}

/// A read reply as received, and where it differs from the clean frame.
struct Received {
    bytes: Vec<u8>,
    flipped: Option<(usize, FramePart)>,
}

/// Sends `n` reads of `data` (at offset 0) pipelined, after a ping each when
/// `pings`, and compares the raw reply bytes with the clean frames: each
/// corrupted reply differs from its clean frame in exactly one byte (ping
/// replies in none).
fn receive_reads(client: &mut NodeClient, data: &[u8], n: usize, pings: bool) -> Vec<Received> {
    let mut expected = Vec::new();
    for _ in 0..n {
        if pings {
            let id = client
                .send(Op::Ping(pb::Ping { nonce: 5 }), &[])
                .expect("send");
            let reply = pb::Reply {
                id,
                nonce: 5,
                ..Default::default()
            };
            expected.push((false, pb::Header::reply(reply), Vec::new()));
        }
        let id = client
            .send(read_op(0, data.len() as u32), &[])
            .expect("send");
        let reply = pb::Reply {
            id,
            ..Default::default()
        };
        expected.push((true, pb::Header::reply(reply), data.to_vec()));
    }
    let mut received = Vec::new();
    for (is_read, header, payload) in expected {
        let mut clean = Vec::new();
        encode_frame(&header, &payload, &mut clean).expect("encodes");
        let head_len = clean.len() - payload.len();
        let bytes = client.recv_raw(clean.len()).expect("reply bytes");
        let diff: Vec<usize> = (0..clean.len()).filter(|&i| bytes[i] != clean[i]).collect();
        assert!(diff.len() <= 1, "one byte flipped at most: {diff:?}");
        let flipped = diff.first().map(|&at| {
            let part = if at < PREAMBLE_LEN {
                FramePart::Preamble
            } else if at < head_len {
                FramePart::Header
            } else {
                FramePart::Payload
            };
            (at, part)
        });
        if is_read {
            received.push(Received { bytes, flipped });
        } else {
            assert!(flipped.is_none(), "a reply without data is passed over");
        }
    }
    received
}

#[test]
fn corrupted_replies_land_in_every_part_of_the_frame() {
    let node = MockNode::start(&["--fault-seed", "11"]);
    let mut admin = node.admin();
    let data = pattern(3, 4096);
    let limits = Limits::default();
    let mut client = NodeClient::open(node.addr, handshake("v", MIB, 65536, 1, 0));
    client.write(0, &data, false);
    let set = |admin: &mut netblk_tests::AdminClient, n: u32, part: CorruptPart| {
        admin.set_faults(pb::Faults {
            corrupt_replies: n,
            corrupt_part: part as i32,
            ..Default::default()
        })
    };

    // The default: preamble or header, never the payload, and never a frame
    // that still decodes as a reply (nor one that leaves the decoder
    // waiting for more).
    set(&mut admin, 60, CorruptPart::Any);
    let mut parts = HashSet::new();
    for reply in receive_reads(&mut client, &data, 60, false) {
        let (at, part) = reply.flipped.expect("every reply corrupted");
        assert_ne!(part, FramePart::Payload);
        parts.insert(part);
        match decode_frame(&reply.bytes, &limits) {
            Err(_) => {}
            Ok(Decoded::Frame(frame)) => assert!(
                !matches!(frame.header.kind, Some(Kind::Reply(_))),
                "byte {at} flipped, still a reply: {:?}",
                frame.header
            ),
            Ok(Decoded::NeedMore(need)) => panic!("byte {at} flipped: waits for {need} bytes"),
        }
    }
    assert_eq!(
        parts,
        HashSet::from([FramePart::Preamble, FramePart::Header]),
        "60 corruptions hit both"
    );

    // A chosen part: every corrupted byte is in it.
    for (part, want) in [
        (CorruptPart::Preamble, FramePart::Preamble),
        (CorruptPart::Header, FramePart::Header),
        (CorruptPart::Payload, FramePart::Payload),
    ] {
        set(&mut admin, 10, part);
        // Pings in between: payload corruption passes them over.
        let pings = part == CorruptPart::Payload;
        for reply in receive_reads(&mut client, &data, 10, pings) {
            assert_eq!(reply.flipped.map(|(_, p)| p), Some(want), "{part:?}");
            if want == FramePart::Payload {
                // Nothing in the frame tells: only a data digest could.
                let decoded = decode_frame(&reply.bytes, &limits);
                let Ok(Decoded::Frame(frame)) = decoded else {
                    panic!("payload corruption still decodes: {decoded:?}");
                };
                assert!(matches!(frame.header.kind, Some(Kind::Reply(_))));
                assert_ne!(frame.payload, &data[..]);
            }
        }
    }
    assert_eq!(admin.faults().corrupt_replies, 0);
    assert_eq!(admin.stats().corrupted_replies, 60 + 3 * 10);

    // Knob spent: clean replies again on the same connection.
    assert_eq!(client.read(0, 4096), data);
}

#[test]
fn the_same_fault_seed_corrupts_the_same_bytes() {
    let run = |seed: &str| {
        let node = MockNode::start(&[
            "--fault-seed",
            seed,
            "--corrupt-replies",
            "12",
            "--corrupt-part",
            "header",
        ]);
        let faults = node.admin().faults();
        assert_eq!(faults.corrupt_part, CorruptPart::Header as i32);
        let mut client = NodeClient::open(node.addr, handshake("v", MIB, 65536, 1, 0));
        receive_reads(&mut client, &[0; 512], 12, false)
            .into_iter()
            .map(|reply| {
                let (at, part) = reply.flipped.expect("corrupted");
                assert_eq!(part, FramePart::Header);
                (at, reply.bytes)
            })
            .collect::<Vec<_>>()
    };
    let first = run("5");
    assert_eq!(first, run("5"));
    assert_ne!(first, run("6"));
}

#[test]
fn crash_knob_exits_at_once() {
    let mut node = MockNode::start(&[]);
    let _client = NodeClient::open(node.addr, handshake("v", MIB, 65536, 1, 0));
    node.admin().crash();
    let status = node.wait_exit(Duration::from_secs(5)).expect("node exits");
    assert_eq!(status.code(), Some(CRASH_EXIT_CODE));
}

#[test]
fn crash_after_flag_exits_on_the_nth_request() {
    let mut node = MockNode::start(&["--crash-after", "3"]);
    let mut client = NodeClient::open(node.addr, handshake("v", MIB, 65536, 1, 0));
    assert_eq!(client.ping().expect("first").status, OK);
    assert_eq!(client.ping().expect("second").status, OK);
    assert!(client.ping().is_err(), "the third request crashes the node");
    let status = node.wait_exit(Duration::from_secs(5)).expect("node exits");
    assert_eq!(status.code(), Some(CRASH_EXIT_CODE));
}

#[test]
fn fault_flags_are_in_force_from_the_start() {
    let node = MockNode::start(&[
        "--latency-us",
        "150000",
        "--error-probability",
        "1",
        "--error-status",
        "etimedout",
        "--drop-after",
        "9",
        "--corrupt-replies",
        "0",
        "--stall",
    ]);
    let mut admin = node.admin();
    let faults = admin.faults();
    assert_eq!(faults.latency_us, 150_000);
    assert_eq!(faults.error_probability, 1.0);
    assert_eq!(faults.error_status, Status::TimedOut as i32);
    assert_eq!(faults.drop_after, 9);
    assert!(faults.stall);

    let mut client = NodeClient::open(node.addr, handshake("v", MIB, 65536, 1, 0));
    client
        .send(Op::Ping(pb::Ping { nonce: 1 }), &[])
        .expect("send");
    client
        .set_read_timeout(Duration::from_millis(300))
        .expect("timeout");
    assert!(
        client
            .recv()
            .expect_err("stalled from the start")
            .is_timeout()
    );
    admin.set_faults(pb::Faults {
        stall: false,
        ..faults
    });
    client
        .set_read_timeout(netblk_tests::WAIT)
        .expect("timeout");
    let start = Instant::now();
    let (reply, _) = client.recv().expect("reply");
    assert_eq!(reply.status, Status::TimedOut as i32);
    assert!(start.elapsed() >= Duration::from_millis(100));
}

// ---- bad input ----

fn preamble(header_len: u32, payload_len: u32) -> Vec<u8> {
    Preamble {
        header_len,
        payload_len,
        header_digest: false,
    }
    .to_bytes()
    .to_vec()
}

#[test]
fn bad_input_closes_only_the_offending_connection() {
    let node = MockNode::start(&[]);
    let mut good = NodeClient::open(node.addr, handshake("v", MIB, 65536, 1, 0));
    good.write(0, &[1; 4096], false);

    let mut ping = Vec::new();
    encode_frame(
        &pb::Header::request(1, Op::Ping(pb::Ping { nonce: 1 })),
        &[],
        &mut ping,
    )
    .expect("encode");
    // A header that holds only a field this protocol version does not know.
    let unknown = [0xa8, 0x06, 0x01]; // field 101, varint 1
    let mut unknown_message = preamble(unknown.len() as u32, 0);
    unknown_message.extend_from_slice(&unknown);

    let cases: Vec<(&str, bool, Vec<u8>, &str)> = vec![
        (
            "garbage",
            true,
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            "bad magic",
        ),
        (
            "oversized payload",
            true,
            preamble(10, u32::MAX),
            "payload of",
        ),
        (
            "oversized header",
            true,
            preamble(MAX_HEADER_LEN + 1, 0),
            "header of",
        ),
        (
            "cut off mid-way",
            true,
            ping[..ping.len() - 2].to_vec(),
            "middle of a frame",
        ),
        ("unknown message", true, unknown_message, "no known message"),
        (
            "request before handshake",
            false,
            ping.clone(),
            "expected a handshake",
        ),
    ];
    for (what, after_handshake, bytes, reason) in &cases {
        let mut bad = NodeClient::connect(node.addr).expect("connect");
        if *after_handshake {
            let reply = bad.handshake(handshake("v", MIB, 65536, 1, 0)).expect("hs");
            assert_eq!(reply.status, OK);
        }
        bad.send_raw(bytes).expect("send");
        if *what == "cut off mid-way" {
            bad.finish_sending().expect("shutdown");
        }
        assert!(bad.is_closed_by_node(), "{what}: connection closed");
        assert!(
            node.wait_for_log(reason),
            "{what}: log names '{reason}':\n{}",
            node.log()
        );
        // Everyone else is still served.
        assert_eq!(good.read(0, 4096), vec![1; 4096], "after {what}");
    }
    assert_eq!(node.admin().stats().protocol_errors, cases.len() as u64);
}

#[test]
fn a_second_handshake_or_a_reply_from_the_client_is_a_violation() {
    let node = MockNode::start(&[]);
    let mut client = NodeClient::open(node.addr, handshake("v", MIB, 65536, 1, 0));
    let mut bytes = Vec::new();
    encode_frame(
        &pb::Header {
            kind: Some(Kind::Handshake(handshake("v", MIB, 65536, 1, 0))),
        },
        &[],
        &mut bytes,
    )
    .expect("encode");
    client.send_raw(&bytes).expect("send");
    assert!(client.is_closed_by_node());
    assert!(node.wait_for_log("expected a request, got a handshake"));
}

// ---- shutdown ----

#[test]
fn sigterm_finishes_in_flight_requests_then_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = format!("dir:{}", dir.path().display());
    let mut node = MockNode::start(&["--store", &store, "--latency-us", "300000"]);
    let addr = node.addr;
    let mut client = NodeClient::open(addr, handshake("v", 64 * MIB, 65536, 1, 0));
    let mut ids = HashSet::new();
    for i in 0..10u64 {
        let id = client
            .send(write_op(i * MIB, 4096, false), &pattern(i, 4096))
            .expect("send");
        ids.insert(id);
    }
    // Let the node take them off the socket, then ask it to stop.
    thread::sleep(Duration::from_millis(100));
    node.signal(libc::SIGTERM);
    for _ in 0..10 {
        let (reply, _) = client.recv().expect("in-flight request answered");
        assert_eq!(reply.status, OK);
        assert!(ids.remove(&reply.id));
    }
    assert!(client.is_closed_by_node());
    let status = node.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(status.success(), "{status:?}");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "no longer accepting"
    );

    let node = MockNode::start(&["--store", &store]);
    let mut client = NodeClient::open(node.addr, handshake("v", 64 * MIB, 65536, 1, 0));
    for i in 0..10u64 {
        assert_eq!(client.read(i * MIB, 4096), pattern(i, 4096));
    }
}

/// A node whose listening address it cannot reach itself (its network
/// namespace's loopback down) still stops on SIGTERM: its accept loops are
/// woken by shutting the listeners down, not by a connection to itself
/// (which hung the VM's observe scenario in `kill; wait`).
#[test]
fn sigterm_stops_a_node_that_cannot_reach_its_own_address() {
    let host = match netblk_tests::netns::TestHost::new(9) {
        Ok(host) => host,
        Err(why) => {
            eprintln!("SKIPPED: cannot make a network namespace here: {why}");
            return;
        }
    };
    let mut node = MockNode::start_in_netns(
        &host.netns,
        &format!("{}:7610", host.addr),
        &["--store", "memory"],
    );
    // The node serves from outside the namespace all the same.
    let mut client = NodeClient::open(node.addr, handshake("v", MIB, 65536, 1, 0));
    client.write(0, &pattern(1, 4096), false);
    drop(client);
    host.set_loopback(false);
    node.signal(libc::SIGTERM);
    let status = node.wait_exit(Duration::from_secs(5));
    host.set_loopback(true);
    let status =
        status.unwrap_or_else(|| panic!("no exit 5 s after SIGTERM; log:\n{}", node.log()));
    assert!(status.success(), "{status:?}");
}

#[test]
fn admin_requests_are_refused_on_the_data_port() {
    let node = MockNode::start(&[]);
    let mut admin = netblk_tests::AdminClient::connect(node.addr).expect("connect");
    let refused = admin.try_set_faults(pb::Faults {
        stall: true,
        ..Default::default()
    });
    assert!(refused.is_err(), "admin connection closed: {refused:?}");
    assert!(node.wait_for_log("admin requests are not accepted on the data port"));
    // Data connections still work, and nothing was stalled.
    let mut client = NodeClient::open(node.addr, handshake("v", MIB, 65536, 1, 0));
    assert_eq!(client.ping().expect("ping").status, OK);
    // The admin listener takes admin requests only.
    let admin_addr = node.admin_addr.expect("admin listener");
    let mut wrong = NodeClient::connect(admin_addr).expect("connect");
    assert!(
        wrong.handshake(handshake("v", MIB, 65536, 1, 0)).is_err(),
        "a handshake on the admin listener"
    );
    assert!(node.wait_for_log("the admin listener takes admin requests only"));
    assert_eq!(node.admin().stats().volumes, 1, "the admin listener serves");
}

#[test]
fn without_admin_listen_a_node_takes_no_admin_requests() {
    let node = MockNode::start(&["--no-admin-listener"]);
    assert_eq!(node.admin_addr, None);
    let mut admin = netblk_tests::AdminClient::connect(node.addr).expect("connect");
    let refused = admin.try_set_faults(pb::Faults {
        crash_after: 1,
        ..Default::default()
    });
    assert!(refused.is_err(), "{refused:?}");
    let mut client = NodeClient::open(node.addr, handshake("v", MIB, 65536, 1, 0));
    assert_eq!(client.ping().expect("ping").status, OK, "no crash armed");
}

#[test]
fn a_silent_connection_is_closed_after_the_handshake_timeout() {
    let node = MockNode::start(&["--handshake-timeout", "1"]);
    let mut silent = NodeClient::connect(node.addr).expect("connect");
    let start = Instant::now();
    assert!(silent.is_closed_by_node());
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    assert!(node.wait_for_log("no handshake within"));
}

/// The hazard session fencing prevents: a write still held on a node from a
/// client's dead connection must not land after the client resent it on a
/// new connection and then wrote newer data to the same range. Returns what
/// the range holds at the end.
fn stale_write_outcome(node_args: &[&str]) -> (Vec<u8>, MockNode) {
    let node = MockNode::start(node_args);
    let (old_data, new_data) = (vec![0xaa; 4096], vec![0xbb; 4096]);
    let first = handshake("fenced", MIB, 65536, 1, 0);
    let mut old = NodeClient::open(node.addr, first.clone());
    let mut admin = node.admin();
    // The old connection's worker hangs (say, on a slow disk) with the write
    // in hand; connections made later are not held.
    admin.set_faults(pb::Faults {
        stall: true,
        stall_open_only: true,
        ..Default::default()
    });
    old.send(write_op(0, 4096, false), &old_data).expect("send");
    thread::sleep(Duration::from_millis(200));
    // The client gave up on that connection; its new session resends the
    // write, which completes, and then writes newer data over it.
    let mut new = NodeClient::open(
        node.addr,
        pb::Handshake {
            session: first.session + 1,
            ..first.clone()
        },
    );
    new.write(0, &old_data, false);
    new.write(0, &new_data, false);
    // The hung worker comes back.
    admin.set_faults(pb::Faults::default());
    old.set_read_timeout(Duration::from_millis(500))
        .expect("timeout");
    let _ = old.recv();
    thread::sleep(Duration::from_millis(200));
    let data = NodeClient::open(node.addr, handshake("fenced", MIB, 65536, 1, 0)).read(0, 4096);
    (data, node)
}

#[test]
fn stale_write_of_an_older_session_is_fenced_off() {
    let (data, node) = stale_write_outcome(&[]);
    assert!(
        data == vec![0xbb; 4096],
        "the newest write must survive; log:\n{}",
        node.log()
    );
    assert!(node.wait_for_log("older session fenced"), "{}", node.log());
}

#[test]
fn without_fencing_the_stale_write_overtakes_the_newer_one() {
    // The same sequence on a node that does not fence: the test above would
    // catch a node that lets the stale write through.
    let (data, _node) = stale_write_outcome(&["--no-fencing"]);
    assert_eq!(data, vec![0xaa; 4096]);
}

#[test]
fn a_stale_session_is_refused_an_equal_one_joins_and_a_newer_one_fences_all() {
    let node = MockNode::start(&[]);
    let hs = handshake("sessions", MIB, 65536, 1, 0);
    let newer = pb::Handshake {
        session: 5,
        ..hs.clone()
    };
    let mut live = NodeClient::open(node.addr, newer.clone());
    live.write(0, &[1; 4096], false);
    let mut stale = NodeClient::connect(node.addr).expect("connect");
    let reply = stale
        .handshake(pb::Handshake {
            session: 4,
            ..hs.clone()
        })
        .expect("a refusal is a reply");
    assert_eq!(reply.status, pb::Status::Refused as i32);
    assert!(reply.message.contains("stale"), "{}", reply.message);
    // The refused session did not disturb the live one.
    assert_eq!(live.read(0, 4096), vec![1; 4096]);
    // Another connection of the same session (another queue of the same
    // device) is admitted beside it: both serve.
    let mut again = NodeClient::open(node.addr, newer.clone());
    assert_eq!(again.read(0, 4096), vec![1; 4096]);
    assert_eq!(live.read(0, 4096), vec![1; 4096]);
    // Another client's sessions are its own.
    let mut other = NodeClient::open(node.addr, handshake("sessions", MIB, 65536, 1, 0));
    assert_eq!(other.read(0, 4096), vec![1; 4096]);
    assert_eq!(again.read(0, 4096), vec![1; 4096]);
    // A newer session fences every connection of the older one.
    let mut next = NodeClient::open(
        node.addr,
        pb::Handshake {
            session: 6,
            ..newer
        },
    );
    assert!(live.is_closed_by_node());
    assert!(again.is_closed_by_node());
    assert_eq!(next.read(0, 4096), vec![1; 4096]);
    assert_eq!(other.read(0, 4096), vec![1; 4096]);
}

/// A node of another protocol revision (here: one from before revisions,
/// which answers without the field) is refused by the client with an error
/// that says so, before anything is sent on the connection.
#[test]
fn a_node_of_another_revision_is_refused_by_the_client() {
    use netblk_protocol::{Decoded, Limits, decode_frame, encode_frame};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let old_node = thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = std::io::Read::read(&mut stream, &mut chunk).expect("read");
            assert!(n > 0, "the client closed before its handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Ok(Decoded::Frame(_)) = decode_frame(&buf, &Limits::default()) {
                break;
            }
        }
        let reply = pb::Header {
            kind: Some(pb::header::Kind::HandshakeReply(pb::HandshakeReply {
                status: Status::Ok as i32,
                protocol_version: 1,
                max_io_size: 1 << 20,
                volume_id: "0a".into(),
                incarnation: 1,
                volume_size: MIB,
                ..Default::default()
            })),
        };
        let mut bytes = Vec::new();
        encode_frame(&reply, &[], &mut bytes).expect("encode");
        std::io::Write::write_all(&mut stream, &bytes).expect("reply");
    });
    let layout = netblk::layout::Layout::new(MIB, 65536, 1).expect("layout");
    let who = netblk::net::Identity {
        owner_epoch: 0,
        client_id: "new-client",
        volume: "v",
        session: 1,
        volume_id: None,
        digest: false,
        tls: None,
    };
    let timeouts = netblk::net::Timeouts {
        connect: Duration::from_secs(5),
        io: Duration::from_secs(5),
    };
    let err = netblk::net::connect(addr, 0, &layout, &who, timeouts).expect_err("refused");
    let text = err.to_string();
    assert!(
        text.contains("protocol revision 0") && text.contains("upgrade the node"),
        "{text}"
    );
    old_node.join().expect("old node");
}

/// The membership record of a replicated volume (docs/replication.md):
/// compare-and-set on its generation, the stored record returned when a set
/// loses, kept across a node restart by the directory store, gone with the
/// volume.
#[test]
fn the_membership_record_is_a_durable_compare_and_set() {
    use netblk_tests::cluster::Cluster;
    let mut cluster = Cluster::start(1);
    let addr = cluster.nodes[0].addr;
    let hs = handshake("recorded", MIB, 65536, 1, 0);
    let record = |generation: u64, owner: &str| pb::MembershipRecord {
        generation,
        owner_epoch: generation,
        owner: owner.into(),
        clean: false,
        iss: vec![0b1],
        ..Default::default()
    };
    let put = |client: &mut NodeClient, expected: u64, r: pb::MembershipRecord| {
        client
            .call(
                Op::PutRecord(pb::PutRecord {
                    expected_generation: expected,
                    record: Some(r),
                }),
                &[],
            )
            .expect("put")
            .0
    };
    let get = |client: &mut NodeClient| {
        let (reply, _) = client
            .call(Op::GetRecord(pb::GetRecord {}), &[])
            .expect("get");
        assert_eq!(reply.status, OK);
        reply.record.unwrap_or_default()
    };
    let mut client = NodeClient::open(addr, hs.clone());
    assert_eq!(get(&mut client).generation, 0, "none stored yet");
    assert_eq!(put(&mut client, 0, record(1, "a")).status, OK);
    // A set that expects another generation loses and sees the stored one.
    let lost = put(&mut client, 0, record(1, "b"));
    assert_eq!(lost.status, Status::Conflict as i32);
    assert_eq!(lost.record, Some(record(1, "a")));
    // A record must move forward.
    assert_eq!(
        put(&mut client, 1, record(1, "c")).status,
        Status::Conflict as i32
    );
    assert_eq!(put(&mut client, 1, record(2, "c")).status, OK);
    drop(client);
    // Kept across a restart of the node on its store.
    cluster.nodes[0].signal(libc::SIGKILL);
    assert!(cluster.nodes[0].wait_exit(Duration::from_secs(5)).is_some());
    cluster.restart(0, &[]);
    let mut client = NodeClient::open(addr, hs.clone());
    assert_eq!(get(&mut client), record(2, "c"));
    // Gone with the volume.
    assert_eq!(
        client
            .call(Op::Delete(pb::Delete {}), &[])
            .expect("delete")
            .0
            .status,
        OK
    );
    drop(client);
    let mut client = NodeClient::open(addr, hs);
    assert_eq!(get(&mut client).generation, 0, "a new volume has none");
}

/// A client that stores nonsense (hostile or broken) is refused: rows
/// beyond the volume's replicas, a row both in sync and joining, a row
/// rebuilt but not joining, lists of other lengths, members not one per
/// row; nothing of it is stored. A record of that shape done right is.
#[test]
fn a_membership_record_that_cannot_be_this_volumes_is_refused() {
    let node = MockNode::start(&["--store", "memory"]);
    let mut client = NodeClient::open(node.addr, replicated("shape", MIB, 1));
    let record = |iss: Vec<u32>, joining: Vec<u32>, rebuild: Vec<u32>, members: &[&str]| {
        pb::MembershipRecord {
            generation: 1,
            owner_epoch: 1,
            owner: "o".into(),
            iss,
            joining,
            rebuild,
            members: members.iter().map(|m| m.to_string()).collect(),
            ..Default::default()
        }
    };
    let put = |client: &mut NodeClient, r: pb::MembershipRecord| {
        let (reply, _) = client
            .call(
                Op::PutRecord(pb::PutRecord {
                    expected_generation: 0,
                    record: Some(r),
                }),
                &[],
            )
            .expect("put");
        (reply.status, reply.message)
    };
    for (bad, why) in [
        (record(vec![0b100], vec![], vec![], &[]), "beyond"),
        (
            record(vec![0b01], vec![0b01], vec![], &[]),
            "both in sync and joining",
        ),
        (
            record(vec![0b01], vec![], vec![0b10], &[]),
            "rebuilt but not joining",
        ),
        (record(vec![0b01], vec![0b10, 0], vec![], &[]), "columns"),
        (
            record(vec![0b11], vec![], vec![], &["a:1"]),
            "members named",
        ),
    ] {
        let (status, message) = put(&mut client, bad.clone());
        assert_eq!(status, Status::Invalid as i32, "{bad:?}: {message}");
        assert!(message.contains(why), "{bad:?}: {message}");
    }
    let (reply, _) = client
        .call(Op::GetRecord(pb::GetRecord {}), &[])
        .expect("get");
    assert_eq!(
        reply.record.unwrap_or_default().generation,
        0,
        "none stored"
    );
    let good = record(vec![0b01], vec![0b10], vec![0b10], &["a:1", "b:2"]);
    assert_eq!(put(&mut client, good.clone()).0, OK);
    let (reply, _) = client
        .call(Op::GetRecord(pb::GetRecord {}), &[])
        .expect("get");
    assert_eq!(reply.record, Some(good));
}

/// Issue 22: the owner epoch fences. Once a record of a newer owner is
/// stored, an older owner's writes are refused on the connections it
/// holds, its new handshakes are refused, and `GetRecord` says whether the
/// record's owner has connections open.
#[test]
fn a_newer_owner_fences_the_older_ones_writes_and_handshakes() {
    let node = MockNode::start(&["--store", "memory"]);
    let as_owner = |epoch: u64| pb::Handshake {
        owner_epoch: epoch,
        ..handshake("owned", MIB, 65536, 1, 0)
    };
    let record = |generation: u64, owner_epoch: u64| pb::MembershipRecord {
        generation,
        owner_epoch,
        owner: format!("owner-{owner_epoch}"),
        clean: false,
        iss: vec![0b1],
        ..Default::default()
    };
    let put = |client: &mut NodeClient, expected: u64, r: pb::MembershipRecord| {
        client.status_of(
            Op::PutRecord(pb::PutRecord {
                expected_generation: expected,
                record: Some(r),
            }),
            &[],
        )
    };
    let write = pb::Write {
        offset: 0,
        length: 4096,
        fua: false,
        crc32c: None,
    };
    let mut first = NodeClient::open(node.addr, as_owner(1));
    assert_eq!(put(&mut first, 0, record(1, 1)), OK);
    first.write(0, &[0x11; 4096], false);
    let (got, _) = first
        .call(Op::GetRecord(pb::GetRecord {}), &[])
        .expect("get");
    assert!(got.owner_connected, "owner 1's connection is open");
    // A newer owner attaches: owner 1 is fenced.
    let mut second = NodeClient::open(node.addr, as_owner(2));
    assert_eq!(put(&mut second, 1, record(2, 2)), OK);
    assert_eq!(
        first.status_of(Op::Write(write), &[0x22; 4096]),
        Status::Refused as i32,
        "a fenced owner's write"
    );
    assert_eq!(
        first.read(0, 4096),
        vec![0x11; 4096],
        "nothing of it landed"
    );
    second.write(0, &[0x33; 4096], false);
    let refused = NodeClient::handshake_reply(node.addr, as_owner(1));
    assert_eq!(refused.status, Status::Refused as i32);
    assert!(
        refused.message.contains("newer owner"),
        "{}",
        refused.message
    );
    // Without an owner epoch (a tool): may read, not write.
    let mut tool = NodeClient::open(node.addr, as_owner(0));
    assert_eq!(tool.read(0, 4096), vec![0x33; 4096]);
    assert_eq!(
        tool.status_of(Op::Write(write), &[0x44; 4096]),
        Status::Refused as i32
    );
    let (got, _) = tool
        .call(Op::GetRecord(pb::GetRecord {}), &[])
        .expect("get");
    assert!(got.owner_connected, "owner 2's connection is open");
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (got, _) = tool
            .call(Op::GetRecord(pb::GetRecord {}), &[])
            .expect("get");
        if !got.owner_connected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "owner 2's closed connection still counts"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A handshake for the first copy of a one-column volume with two
/// replicas, at owner epoch `owner_epoch` (0: a tool).
fn replicated(volume: &str, volume_size: u64, owner_epoch: u64) -> pb::Handshake {
    pb::Handshake {
        owner_epoch,
        volume_size,
        layout: Some(pb::Layout {
            stripe_unit: 65536,
            node_count: 1,
            node_index: 0,
            replicas: 2,
            replica_index: 0,
        }),
        ..handshake(volume, 0, 65536, 1, 0)
    }
}

/// The activity log over the wire (replicated volumes): a change logs its
/// region, a read does not; only the owner trims, and only regions
/// untouched since it read them; the directory store keeps the log across
/// a restart; a volume with one replica logs nothing; a long log comes in
/// pages.
#[test]
fn the_activity_log_records_changes_and_only_the_owner_trims_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = format!("dir:{}", dir.path().display());
    let mut node = MockNode::start(&["--store", &store]);
    const REGION: u64 = netblk_protocol::geometry::ACTIVITY_REGION;
    let replicated = |volume: &str, owner_epoch: u64| replicated(volume, 2 << 30, owner_epoch);
    let log = |client: &mut NodeClient, from: u64| {
        let (reply, _) = client
            .call(Op::GetActivity(pb::GetActivity { from }), &[])
            .expect("get activity");
        assert_eq!(reply.status, OK, "{}", reply.message);
        let entries: Vec<(u64, u64)> = reply
            .activity_regions
            .iter()
            .copied()
            .zip(reply.activity_seqs.iter().copied())
            .collect();
        (entries, reply.activity_more)
    };
    let regions = |entries: &[(u64, u64)]| entries.iter().map(|(r, _)| *r).collect::<Vec<_>>();
    let trim = |client: &mut NodeClient, entries: &[(u64, u64)]| {
        client.status_of(
            Op::TrimActivity(pb::TrimActivity {
                regions: entries.iter().map(|(r, _)| *r).collect(),
                seqs: entries.iter().map(|(_, s)| *s).collect(),
            }),
            &[],
        )
    };
    let mut owner = NodeClient::open(node.addr, replicated("act", 1));
    owner.write(0, &[1; 4096], false);
    owner.write(2 * REGION + 8192, &[2; 4096], true);
    let _ = owner.read(5 * REGION, 4096);
    assert_eq!(
        owner.status_of(
            Op::WriteZeroes(pb::WriteZeroes {
                offset: 7 * REGION - 4096,
                length: 8192,
            }),
            &[]
        ),
        OK
    );
    let (first, more) = log(&mut owner, 0);
    assert!(!more);
    assert_eq!(regions(&first), [0, 2, 6, 7], "a read logs nothing");
    // A tool (no owner epoch) may read the log, never trim it.
    let mut tool = NodeClient::open(node.addr, replicated("act", 0));
    assert_eq!(trim(&mut tool, &first), Status::Refused as i32);
    assert_eq!(
        log(&mut tool, 0).0,
        first,
        "the refused trim dropped nothing"
    );
    // Region 2 is written again after the owner read the log: it stays.
    owner.write(2 * REGION, &[3; 512], false);
    assert_eq!(trim(&mut owner, &first), OK);
    assert_eq!(regions(&log(&mut owner, 0).0), [2]);
    drop((owner, tool));
    // The directory store keeps the log across a restart.
    node.terminate();
    let addr = node.addr.to_string();
    node = MockNode::start_at(&addr, &["--store", &store]);
    let mut owner = NodeClient::open(node.addr, replicated("act", 1));
    assert_eq!(regions(&log(&mut owner, 0).0), [2], "kept across a restart");
    // A long log comes in pages of at most ACTIVITY_PAGE.
    for region in 10..210 {
        owner.write(region * REGION, &[4; 512], false);
    }
    let (page, more) = log(&mut owner, 0);
    assert!(more);
    assert_eq!(page.len(), netblk_protocol::geometry::ACTIVITY_PAGE);
    let (rest, more) = log(&mut owner, page.last().expect("a page").0 + 1);
    assert!(!more);
    assert_eq!(page.len() + rest.len(), 201);
    // One replica: nothing is logged.
    let mut single = NodeClient::open(node.addr, handshake("single", 8 * MIB, 65536, 1, 0));
    single.write(0, &[5; 4096], false);
    assert!(log(&mut single, 0).0.is_empty());
}

/// `Digest`: the node computes a range's CRC-32C (what scrub compares),
/// equal to the CRC-32C of the bytes a read returns; a range beyond the
/// volume or longer than the limit is refused, and nothing comes back as
/// payload.
#[test]
fn a_digest_is_the_crc32c_of_the_range_computed_on_the_node() {
    let node = MockNode::start(&["--store", "memory", "--max-io-size", "64K"]);
    let mut client = NodeClient::open(node.addr, handshake("dig", 8 * MIB, 65536, 1, 0));
    let data = pattern(7, 3 << 20);
    for (i, chunk) in data.chunks(65536).enumerate() {
        client.write(4096 + i as u64 * 65536, chunk, false);
    }
    let digest = |client: &mut NodeClient, offset: u64, length: u64| {
        let (reply, payload) = client
            .call(Op::Digest(pb::Digest { offset, length }), &[])
            .expect("digest");
        assert!(payload.is_empty(), "a digest carries no payload");
        (reply.status, reply.crc32c)
    };
    // Over chunks of the node's max IO size and a partial one.
    let (status, crc) = digest(&mut client, 4096, 3 << 20);
    assert_eq!(status, OK);
    assert_eq!(crc, Some(crc32c::crc32c(&data)));
    let (status, crc) = digest(&mut client, 0, 8 * MIB);
    assert_eq!(status, OK);
    let mut whole = vec![0u8; 4096];
    whole.extend_from_slice(&data);
    whole.resize((8 * MIB) as usize, 0);
    assert_eq!(
        crc,
        Some(crc32c::crc32c(&whole)),
        "never-written bytes read as zeroes"
    );
    // One byte differs: the digest differs.
    client.write(4096 + 100_000 - 100_000 % 512, &[0xee; 512], false);
    assert_ne!(
        digest(&mut client, 4096, 3 << 20).1,
        Some(crc32c::crc32c(&data))
    );
    assert_eq!(
        digest(&mut client, 8 * MIB - 512, 1024).0,
        Status::OutOfRange as i32
    );
    let node_big = MockNode::start(&["--store", "null"]);
    let mut big = NodeClient::open(node_big.addr, handshake("big", 1 << 30, 65536, 1, 0));
    assert_eq!(
        digest(&mut big, 0, netblk_protocol::geometry::MAX_DIGEST_LEN + 512).0,
        Status::Invalid as i32
    );
    assert_eq!(
        digest(&mut big, 0, netblk_protocol::geometry::MAX_DIGEST_LEN).0,
        OK
    );
}

/// Missed bitmaps over the wire (docs/resync.md): once a record takes row 1
/// out of the column, the node (row 0) collects the 1 MiB regions changed
/// since, including a change applied just before the record (from its
/// activity log); a restart keeps them; the record that puts row 1 back
/// ends the tracking.
#[test]
fn a_node_remembers_what_an_out_member_of_its_column_missed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = format!("dir:{}", dir.path().display());
    let mut node = MockNode::start(&["--store", &store]);
    const REGION: u64 = netblk_protocol::geometry::MISSED_REGION;
    let owner = || replicated("missed", 64 << 20, 1);
    let put = |client: &mut NodeClient, expected: u64, generation: u64, iss: u32| {
        let record = pb::MembershipRecord {
            generation,
            owner_epoch: 1,
            owner: "o".into(),
            clean: false,
            iss: vec![iss],
            ..Default::default()
        };
        client.status_of(
            Op::PutRecord(pb::PutRecord {
                expected_generation: expected,
                record: Some(record),
            }),
            &[],
        )
    };
    let missed = |client: &mut NodeClient, row: u32| {
        let (reply, _) = client
            .call(Op::GetMissed(pb::GetMissed { row, from: 0 }), &[])
            .expect("get missed");
        assert_eq!(reply.status, OK, "{}", reply.message);
        (reply.missed_regions, reply.missed_since)
    };
    let mut client = NodeClient::open(node.addr, owner());
    assert_eq!(put(&mut client, 0, 1, 0b11), OK);
    client.write(0, &[1; 4096], false);
    assert_eq!(
        missed(&mut client, 1),
        (vec![], 0),
        "row 1 in sync: not tracked"
    );
    // A change in flight when row 1 fails lands before the shrink record.
    client.write(9 * REGION, &[2; 4096], false);
    assert_eq!(put(&mut client, 1, 2, 0b01), OK);
    client.write(20 * REGION + 4096, &[3; 2 * REGION as usize], false);
    let (regions, since) = missed(&mut client, 1);
    assert_eq!(since, 2);
    // Activity regions (4 MiB) 0 and 2 seeded it: 0..4 and 8..12; then 20..23.
    assert_eq!(regions, [0, 1, 2, 3, 8, 9, 10, 11, 20, 21, 22]);
    drop(client);
    node.terminate();
    let addr = node.addr.to_string();
    node = MockNode::start_at(&addr, &["--store", &store]);
    let mut client = NodeClient::open(node.addr, owner());
    // Kept across a restart; what was marked since the last store comes
    // back from the activity log, whole 4 MiB regions (23 with 20..22).
    let mut kept = regions.clone();
    kept.push(23);
    assert_eq!(missed(&mut client, 1), (kept, 2), "kept across a restart");
    assert_eq!(put(&mut client, 2, 3, 0b11), OK);
    assert_eq!(
        missed(&mut client, 1),
        (vec![], 0),
        "back in sync: forgotten"
    );
}
