//! Data digests: a CRC-32C on every payload, checked by the receiver. A
//! payload corrupted on the way (the mock node's `--corrupt-writes` and
//! `--corrupt-replies --corrupt-part payload` faults) never reaches the
//! store or the reader with digests on; without them it does (the control).

use netblk::frontend::{Volume, VolumeOptions};
use netblk::layout::VolumeSpec;
use netblk::rng::Rng;
use netblk_protocol::pb::{self, Status, request::Op};
use netblk_tests::cluster::Cluster;
use netblk_tests::{MockNode, NodeClient, handshake};

const MIB: u64 = 1 << 20;

fn options(digest: bool) -> VolumeOptions {
    VolumeOptions {
        depth: 16,
        max_io: MIB as u32,
        data_digest: digest,
        ..VolumeOptions::default()
    }
}

fn spec(cluster: &Cluster, name: &str, size: u64) -> VolumeSpec {
    VolumeSpec {
        replicas: 1,
        name: name.into(),
        size,
        stripe_unit: 64 << 10,
        nodes: cluster.addrs(),
    }
}

fn digest_errors(volume: &Volume) -> u64 {
    volume.figures().iter().map(|f| f.digest_errors.get()).sum()
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.below(256) as u8).collect()
}

#[test]
fn without_digests_a_corrupted_write_reaches_the_store() {
    let cluster = Cluster::start_with(1, &["--corrupt-writes", "1", "--fault-seed", "3"]);
    let volume = Volume::open(&spec(&cluster, "plain", 8 * MIB), &options(false)).expect("open");
    let data = pattern(1, 64 << 10);
    volume.write_at(&data, 0).expect("write");
    volume.flush().expect("flush");
    let held = cluster.node_file(0, "plain");
    let differ = held[..data.len()]
        .iter()
        .zip(&data)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(differ, 1, "the fault flipped one byte, and nobody noticed");
    assert_eq!(cluster.nodes[0].admin().stats().corrupted_writes, 1);
    assert_eq!(digest_errors(&volume), 0);
}

#[test]
fn with_digests_corruption_on_the_wire_never_reaches_the_store_or_the_reader() {
    // Three of each per node: even if all hit one piece in a row, its
    // fourth try (the last of DIGEST_RETRIES) goes through.
    let faults = [
        "--corrupt-writes",
        "3",
        "--corrupt-replies",
        "3",
        "--corrupt-part",
        "payload",
        "--fault-seed",
        "11",
    ];
    let cluster = Cluster::start_with(3, &faults);
    let size = 16 * MIB;
    let spec = spec(&cluster, "checked", size);
    let volume = Volume::open(&spec, &options(true)).expect("open with digests");
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng::new(5);
    // Enough writes and reads of every node's stripes to use up the faults.
    for round in 0..40u64 {
        let len = (rng.below(16) as usize + 1) * (16 << 10);
        let offset = rng.below((size - len as u64) / 4096) * 4096;
        let data = pattern(round, len);
        volume.write_at(&data, offset).expect("write with digests");
        model[offset as usize..offset as usize + len].copy_from_slice(&data);
        let mut back = vec![0u8; len];
        volume
            .read_at(&mut back, offset)
            .expect("read with digests");
        assert!(back == data, "round {round}: read back differs");
    }
    volume.flush().expect("flush");
    let mut all = vec![0u8; size as usize];
    volume.read_at(&mut all, 0).expect("read all");
    assert!(all == model, "the volume differs from the model");
    // What each node stores is exactly its stripes of the model.
    let layout = spec.layout().expect("layout");
    let files: Vec<Vec<u8>> = (0..3).map(|i| cluster.node_file(i, "checked")).collect();
    for p in layout.pieces(0, size) {
        let held = &files[p.column][p.node_offset as usize..][..p.len as usize];
        assert!(
            held == &model[p.buf_offset as usize..][..p.len as usize],
            "node {} holds a corrupted stripe at {}",
            p.column,
            p.node_offset
        );
    }
    let mut corrupted = 0;
    for node in &cluster.nodes {
        let stats = node.admin().stats();
        assert_eq!(stats.corrupted_writes, 3, "every write fault was used");
        assert_eq!(stats.corrupted_replies, 3, "every read fault was used");
        assert_eq!(
            stats.digest_errors, stats.corrupted_writes,
            "each corrupted write was refused"
        );
        corrupted += stats.corrupted_writes + stats.corrupted_replies;
    }
    assert_eq!(
        digest_errors(&volume),
        corrupted,
        "the client counted and resent every corrupted payload"
    );
}

/// Issue 21, point 5: with data digests, every frame's header carries its
/// own CRC-32C. A flipped byte anywhere in a reply's header (its request
/// id, status, length, the payload's crc) is caught and the connection
/// replaced, never taken for another request's answer or a success.
#[test]
fn with_digests_a_corrupted_reply_header_is_caught_never_accepted() {
    let faults = [
        "--corrupt-replies",
        "12",
        "--corrupt-part",
        "header",
        "--fault-seed",
        "21",
    ];
    let cluster = Cluster::start_with(2, &faults);
    let size = 8 * MIB;
    let volume = Volume::open(&spec(&cluster, "headers", size), &options(true)).expect("open");
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng::new(8);
    for round in 0..60u64 {
        let len = (rng.below(8) as usize + 1) * (16 << 10);
        let offset = rng.below((size - len as u64) / 4096) * 4096;
        let data = pattern(100 + round, len);
        volume.write_at(&data, offset).expect("write");
        model[offset as usize..offset as usize + len].copy_from_slice(&data);
        let mut back = vec![0u8; len];
        volume.read_at(&mut back, offset).expect("read");
        assert!(back == data, "round {round}: read back differs");
    }
    let mut all = vec![0u8; size as usize];
    volume.read_at(&mut all, 0).expect("read all");
    assert!(all == model, "the volume differs from the model");
    for node in &cluster.nodes {
        assert_eq!(
            node.admin().stats().corrupted_replies,
            12,
            "every header fault was used"
        );
    }
    let resent: u64 = volume
        .figures()
        .iter()
        .flat_map(|f| f.nodes.iter().map(|n| n.resent.get()))
        .sum();
    assert!(
        resent > 0,
        "the corrupted replies' requests were sent again"
    );
}

#[test]
fn a_payload_corrupted_on_every_try_fails_with_eio_after_the_retries() {
    let cluster = Cluster::start_with(1, &["--corrupt-writes", "100"]);
    let volume = Volume::open(&spec(&cluster, "hopeless", 8 * MIB), &options(true)).expect("open");
    let err = volume
        .write_at(&pattern(2, 4096), 0)
        .expect_err("every try is corrupted");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    let tries = u64::from(netblk::engine::DIGEST_RETRIES) + 1;
    assert_eq!(digest_errors(&volume), tries);
    let stats = cluster.nodes[0].admin().stats();
    assert_eq!(stats.digest_errors, tries);
    assert_eq!(stats.bytes_written, 0, "nothing was written");
    let mut back = vec![1u8; 4096];
    volume.read_at(&mut back, 0).expect("reads still work");
    assert!(back.iter().all(|&b| b == 0));
}

#[test]
fn the_node_checks_write_digests_and_sends_read_digests() {
    let node = MockNode::start(&[]);
    let hs = pb::Handshake {
        data_digest: pb::DataDigest::Crc32c as i32,
        ..handshake("wire", MIB, 65536, 1, 0)
    };
    let reply = NodeClient::handshake_reply(node.addr, hs.clone());
    assert_eq!(reply.data_digest, pb::DataDigest::Crc32c as i32);
    let mut client = NodeClient::open(node.addr, hs);
    let data = pattern(9, 8192);
    let write = |crc32c| {
        Op::Write(pb::Write {
            offset: 0,
            length: data.len() as u32,
            fua: false,
            crc32c,
        })
    };
    assert_eq!(
        client.status_of(write(Some(crc32c::crc32c(&data) ^ 1)), &data),
        Status::DigestMismatch as i32
    );
    assert_eq!(
        client.status_of(write(None), &data),
        Status::Invalid as i32,
        "a write without its digest"
    );
    assert_eq!(node.admin().stats().bytes_written, 0, "nothing written");
    assert_eq!(
        client.status_of(write(Some(crc32c::crc32c(&data))), &data),
        Status::Ok as i32
    );
    let (reply, back) = client
        .call(
            Op::Read(pb::Read {
                offset: 0,
                length: data.len() as u32,
            }),
            &[],
        )
        .expect("read");
    assert_eq!(back, data);
    assert_eq!(reply.crc32c, Some(crc32c::crc32c(&data)));
    assert_eq!(node.admin().stats().digest_errors, 1);
    // Without digests asked for, replies carry none.
    let mut plain = NodeClient::open(node.addr, handshake("wire", MIB, 65536, 1, 0));
    let (reply, _) = plain
        .call(
            Op::Read(pb::Read {
                offset: 0,
                length: 512,
            }),
            &[],
        )
        .expect("read");
    assert_eq!(reply.crc32c, None);
}
