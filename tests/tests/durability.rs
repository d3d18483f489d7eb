//! A flush never claims durability a node lost. Each node states its volume
//! identity (fixed at creation) and incarnation (new per process start) in
//! every handshake: a node that restarted while holding acknowledged,
//! unflushed writes fails the next flush with EIO; a node that lost the
//! volume altogether (a memory store that came back empty) is refused; a
//! node whose store kept everything costs nothing.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use netblk::frontend::{Volume, VolumeOptions};
use netblk::layout::{Layout, VolumeSpec};
use netblk::net::{self, ConnectError, Identity, Timeouts};
use netblk_tests::MockNode;
use netblk_tests::cluster::Cluster;

const MIB: u64 = 1 << 20;
const UNIT: u64 = 64 << 10;

fn options() -> VolumeOptions {
    VolumeOptions {
        io_timeout: Duration::from_secs(10),
        ..VolumeOptions::default()
    }
}

/// Kills node `i` at once (no flush) and starts it again in place.
fn crash_and_restart(cluster: &mut Cluster, i: usize, args: &[&str]) {
    cluster.nodes[i].signal(libc::SIGKILL);
    assert!(cluster.nodes[i].wait_exit(Duration::from_secs(5)).is_some());
    cluster.restart(i, args);
}

/// Writes one stripe unit to each node of a 3-node volume (unflushed).
fn write_every_node(volume: &Volume, byte: u8) {
    for n in 0..3 {
        volume
            .write_at(&vec![byte + n as u8; UNIT as usize], n * UNIT)
            .expect("write");
    }
}

#[test]
fn a_node_that_crashed_with_unflushed_writes_fails_the_next_flush() {
    let args = ["--volatile-cache"];
    let mut cluster = Cluster::start_with(3, &args);
    let volume = Volume::open(&cluster.spec("lost", 16 * MIB), &options()).expect("open");
    // Without a crash: write, flush, fine.
    write_every_node(&volume, 0x10);
    volume.flush().expect("flush without a crash");
    // Acknowledged, not flushed, then node 1 crashes: its cache is gone.
    write_every_node(&volume, 0x20);
    crash_and_restart(&mut cluster, 1, &args);
    let err = volume.flush().expect_err("node 1 lost acknowledged writes");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    // What the flush said is true: node 1's unit holds the flushed data.
    let mut back = vec![0u8; UNIT as usize];
    volume.read_at(&mut back, UNIT).expect("read node 1");
    assert!(
        back.iter().all(|b| *b == 0x11),
        "node 1 holds {:#x}",
        back[0]
    );
    // Reported once; from here the volume is usable again.
    write_every_node(&volume, 0x30);
    volume.flush().expect("next flush");
    crash_and_restart(&mut cluster, 1, &args);
    volume
        .flush()
        .expect("a restart after a flush loses nothing");
    volume.read_at(&mut back, UNIT).expect("read node 1");
    assert!(back.iter().all(|b| *b == 0x31));
}

/// Issue 21, point 1: durability belongs to the device, not to a queue. A
/// write acknowledged through queue 0, then the node restarts without its
/// cache: a flush through queue 1 must fail, and once it has, queue 0's FUA
/// writes and flushes (which that failure covered) succeed.
#[test]
fn a_flush_through_another_queue_fails_over_writes_the_node_lost() {
    let args = ["--volatile-cache"];
    let mut cluster = Cluster::start_with(1, &args);
    let opts = VolumeOptions {
        queues: 2,
        ..options()
    };
    let volume = Volume::open(&cluster.spec("queues", 16 * MIB), &opts).expect("open");
    // Requests go to the queues in turn: this write through queue 0...
    volume
        .write_at(&vec![0x5a; UNIT as usize], 0)
        .expect("write");
    crash_and_restart(&mut cluster, 0, &args);
    // ...this flush through queue 1.
    let err = volume
        .flush()
        .expect_err("the node lost a write queue 0 acknowledged");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    // Queue 0, then queue 1: reported once for the device.
    volume
        .write_at_fua(&vec![0x6b; UNIT as usize], UNIT)
        .expect("FUA after the loss was reported");
    volume.flush().expect("flush after the loss was reported");
    let mut back = vec![0u8; UNIT as usize];
    volume.read_at(&mut back, 0).expect("read");
    assert!(back.iter().all(|b| *b == 0), "the lost write is gone");
}

#[test]
fn a_fua_write_in_the_window_fails_too() {
    let args = ["--volatile-cache"];
    let mut cluster = Cluster::start_with(3, &args);
    let volume = Volume::open(&cluster.spec("fua", 16 * MIB), &options()).expect("open");
    write_every_node(&volume, 0x40);
    crash_and_restart(&mut cluster, 0, &args);
    let err = volume
        .write_at_fua(&vec![0x50; UNIT as usize], 0)
        .expect_err("FUA after a lost incarnation");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    let err = volume.flush().expect_err("the flush after it");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    volume.flush().expect("reported once");
}

#[test]
fn a_directory_store_restarted_keeps_everything_it_acknowledged() {
    let mut cluster = Cluster::start(3);
    let volume = Volume::open(&cluster.spec("kept", 16 * MIB), &options()).expect("open");
    write_every_node(&volume, 0x60);
    volume.flush().expect("flush");
    // Restarted after the flush.
    crash_and_restart(&mut cluster, 2, &[]);
    // Acknowledged, unflushed, then killed: the store wrote it to its file,
    // and the new process made it durable before serving.
    write_every_node(&volume, 0x70);
    crash_and_restart(&mut cluster, 2, &[]);
    volume.flush().expect("nothing was lost");
    let mut back = vec![0u8; 3 * UNIT as usize];
    volume.read_at(&mut back, 0).expect("read");
    for n in 0..3 {
        let unit = &back[(n * UNIT) as usize..][..UNIT as usize];
        assert!(unit.iter().all(|b| *b == 0x70 + n as u8), "node {n}");
    }
}

#[test]
fn a_node_that_lost_the_volume_is_refused_and_named() {
    let mut nodes: Vec<MockNode> = (0..2)
        .map(|_| MockNode::start(&["--store", "memory"]))
        .collect();
    let spec = VolumeSpec {
        replicas: 1,
        name: "gone".into(),
        size: 16 * MIB,
        stripe_unit: UNIT as u32,
        nodes: nodes.iter().map(|n| n.addr).collect(),
    };
    let volume = Volume::open(&spec, &options()).expect("open");
    volume.write_at(&[7; 4096], UNIT).expect("write to node 1");
    volume.flush().expect("flush");
    // Node 1's memory store comes back empty: a new volume, not ours.
    let addr = nodes[1].addr.to_string();
    nodes[1].signal(libc::SIGKILL);
    nodes[1].wait_exit(Duration::from_secs(5));
    nodes[1] = MockNode::start_at(&addr, &["--store", "memory"]);
    // Its stripes fail with EIO (once the reconnect saw the identity), well
    // before any timeout, instead of reading back zeroes.
    let start = Instant::now();
    let mut back = vec![0u8; 4096];
    let err = match volume.read_at(&mut back, UNIT) {
        Err(err) => err,
        Ok(()) => panic!("read {:#x} from a node that lost the volume", back[0]),
    };
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert!(start.elapsed() < Duration::from_secs(5));
    let fast = Instant::now();
    assert!(volume.read_at(&mut back, UNIT).is_err());
    assert!(fast.elapsed() < Duration::from_millis(500), "fails at once");
    // Node 0's stripes still work.
    volume.read_at(&mut back, 0).expect("node 0");
    // Issue 21, point 4: the client's reconnects never made an empty volume
    // under its name (that would pass for the volume with every other
    // client and tool): a pinned handshake opens an existing volume only.
    assert_eq!(
        nodes[1].admin().stats().volumes,
        0,
        "a reconnect created a volume"
    );
    let lookup = netblk::manage::VolumeRef {
        replicas: 1,
        name: "gone".into(),
        stripe_unit: UNIT as u32,
        nodes: spec.nodes.clone(),
        tls: None,
    }
    .lookup("probe-lookup", timeouts());
    assert!(lookup.is_err(), "the volume is incomplete: {lookup:?}");
    // The error a pinned connection gets names the node and the volume.
    let layout = spec.layout().expect("layout");
    let pinned = volume.nodes()[1].volume_id.clone();
    let err = connect_pinned(nodes[1].addr, &layout, "gone", &pinned).expect_err("refused");
    let text = err.to_string();
    assert!(
        matches!(err, ConnectError::NotFound { node: 1, .. }),
        "{text}"
    );
    assert!(
        text.contains(&addr) && text.contains("no volume 'gone'"),
        "{text}"
    );
    // A volume made anew under the name by someone else is refused by its
    // identity, naming both.
    let who = Identity {
        owner_epoch: 0,
        client_id: "someone-else",
        volume: "gone",
        session: 1,
        volume_id: None,
        digest: false,
        tls: None,
    };
    net::connect(nodes[1].addr, 1, &layout, &who, timeouts()).expect("made anew");
    let err = connect_pinned(nodes[1].addr, &layout, "gone", &pinned).expect_err("refused");
    let text = err.to_string();
    assert!(
        matches!(err, ConnectError::VolumeLost { node: 1, .. }),
        "{text}"
    );
    assert!(
        text.contains(&addr) && text.contains(&pinned) && text.contains("lost volume 'gone'"),
        "{text}"
    );
}

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(5),
        io: Duration::from_secs(5),
    }
}

fn connect_pinned(
    addr: SocketAddr,
    layout: &Layout,
    volume: &str,
    pinned: &str,
) -> Result<(), ConnectError> {
    let who = Identity {
        owner_epoch: 0,
        client_id: "probe",
        volume,
        session: 1,
        volume_id: Some(pinned),
        digest: false,
        tls: None,
    };
    net::connect(addr, 1, layout, &who, timeouts()).map(|_| ())
}
