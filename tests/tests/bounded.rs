//! Every wait is bounded, whatever a node does: a node that stops reading
//! (SIGSTOP: its socket fills and stays full), a node that vanishes without
//! a RST (its link set down), a node that runs a request late. A request
//! fails with EIO within `io_timeout` + 1 s, the connection that held it is
//! torn down (so the kernel returns its buffers, and the node fences what it
//! still holds from it), and IO works again once the node is back, with no
//! remap.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use netblk::frontend::{Volume, VolumeOptions};
use netblk::layout::VolumeSpec;
use netblk_protocol::pb;
use netblk_tests::MockNode;
use netblk_tests::netns::TestHost;

const MIB: u64 = 1 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// What the bound allows beyond the IO timeout.
const SLACK: Duration = Duration::from_secs(1);

fn options(queues: usize, depth: u16) -> VolumeOptions {
    VolumeOptions {
        queues,
        depth,
        io_timeout: IO_TIMEOUT,
        // Long enough that the node is not given up on meanwhile: every
        // failure below is a request's own deadline.
        node_down_timeout: Duration::from_secs(60),
        ..VolumeOptions::default()
    }
}

/// One finished write: how long it took and whether it failed.
type Outcome = (Duration, Result<(), i32>);

/// `writers` threads write 1 MiB again and again, each in its own region,
/// until told to stop; every call's duration and result come back.
struct Writers {
    stop: Arc<AtomicBool>,
    done: mpsc::Receiver<Vec<Outcome>>,
    writers: usize,
}

impl Writers {
    fn start(volume: &Arc<Volume>, writers: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, done) = mpsc::channel();
        for w in 0..writers {
            let (volume, stop, tx) = (Arc::clone(volume), Arc::clone(&stop), tx.clone());
            thread::spawn(move || {
                let data = vec![w as u8 + 1; MIB as usize];
                let mut outcomes = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let offset = (w as u64 * 8 + i % 8) * MIB;
                    let start = Instant::now();
                    let result = volume
                        .write_at(&data, offset)
                        .map_err(|e| e.raw_os_error().unwrap_or(0));
                    outcomes.push((start.elapsed(), result));
                    i += 1;
                }
                let _ = tx.send(outcomes);
            });
        }
        Writers {
            stop,
            done,
            writers,
        }
    }

    /// Stops the writers and collects their outcomes; None if one of them
    /// is still stuck in a call after `grace`.
    fn finish(self, grace: Duration) -> Option<Vec<Outcome>> {
        self.stop.store(true, Ordering::Release);
        let deadline = Instant::now() + grace;
        let mut all = Vec::new();
        for _ in 0..self.writers {
            let left = deadline.saturating_duration_since(Instant::now());
            all.extend(self.done.recv_timeout(left).ok()?);
        }
        Some(all)
    }
}

/// Checks that writes failed, with EIO, and none took longer than the bound.
fn assert_bounded(outcomes: &[Outcome]) {
    let bound = IO_TIMEOUT + SLACK;
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.1.is_err()).collect();
    assert!(
        !failed.is_empty(),
        "no write failed while the node was away"
    );
    for (took, result) in outcomes {
        assert!(
            *took <= bound,
            "a write took {took:?} ({result:?}), bound {bound:?}"
        );
        if let Err(errno) = result {
            assert_eq!(*errno, libc::EIO, "failed with errno {errno}");
        }
    }
}

/// Writes and reads back through every queue, retrying while the node
/// reconnects; panics if IO does not work again within `within`.
fn works_again(volume: &Volume, queues: usize, within: Duration) {
    let deadline = Instant::now() + within;
    let data = vec![0x5a; MIB as usize];
    for q in 0..queues as u64 {
        let offset = 200 * MIB + q * MIB;
        loop {
            let attempt = volume.write_at(&data, offset).and_then(|()| {
                let mut back = vec![0u8; MIB as usize];
                volume.read_at(&mut back, offset).map(|()| back)
            });
            match attempt {
                Ok(back) => {
                    assert!(back == data, "read back differs");
                    break;
                }
                Err(err) if Instant::now() < deadline => {
                    eprintln!("not yet: {err}");
                    thread::sleep(Duration::from_millis(200));
                }
                Err(err) => panic!("IO does not work again: {err}"),
            }
        }
    }
}

fn spec(name: &str, nodes: Vec<SocketAddr>) -> VolumeSpec {
    VolumeSpec {
        replicas: 1,
        name: name.into(),
        size: 256 * MIB,
        stripe_unit: 128 << 10,
        nodes,
    }
}

#[test]
fn a_node_that_stops_reading_fails_writes_within_the_bound() {
    let nodes: Vec<MockNode> = (0..2)
        .map(|_| MockNode::start(&["--store", "memory"]))
        .collect();
    let spec = spec("stopped", nodes.iter().map(|n| n.addr).collect());
    let volume = Arc::new(Volume::open(&spec, &options(1, 16)).expect("open"));
    let writers = Writers::start(&volume, 16);
    thread::sleep(Duration::from_millis(300));
    nodes[1].signal(libc::SIGSTOP);
    // Long enough for the socket to the stopped node to fill and for
    // several rounds of deadlines.
    thread::sleep(3 * IO_TIMEOUT);
    let outcomes = writers.finish(IO_TIMEOUT + SLACK);
    nodes[1].signal(libc::SIGCONT);
    let outcomes = outcomes.expect("a write was still waiting past the bound");
    assert_bounded(&outcomes);
    works_again(&volume, 1, Duration::from_secs(20));
}

#[test]
fn a_silent_peer_fails_writes_within_the_bound_and_works_again_after() {
    let host = match TestHost::new(1) {
        Ok(host) => host,
        Err(why) => {
            eprintln!("SKIPPED: cannot make a network namespace here: {why}");
            return;
        }
    };
    let local = MockNode::start(&["--store", "memory"]);
    let far = MockNode::start_in_netns(
        &host.netns,
        &format!("{}:7600", host.addr),
        &["--store", "memory"],
    );
    let spec = spec("silent", vec![local.addr, far.addr]);
    let volume = Arc::new(Volume::open(&spec, &options(2, 16)).expect("open"));
    let writers = Writers::start(&volume, 16);
    thread::sleep(Duration::from_millis(300));
    host.set_link(false);
    thread::sleep(3 * IO_TIMEOUT);
    let outcomes = writers.finish(IO_TIMEOUT + SLACK);
    host.set_link(true);
    let outcomes = outcomes.expect("a write was still waiting past the bound");
    assert_bounded(&outcomes);
    works_again(&volume, 2, Duration::from_secs(30));
}

/// A write that timed out can never land later: write A to a slow node
/// times out through queue 0, write B to the same range through queue 1
/// succeeds, and long after A would have run, the range holds B.
#[test]
fn a_write_that_timed_out_never_lands_after_a_newer_one() {
    let node = MockNode::start(&["--store", "memory"]);
    let spec = spec("late", vec![node.addr]);
    let volume = Volume::open(&spec, &options(2, 4)).expect("open");
    let range = 64 << 10;
    volume.write_at(&vec![0x11; range], 0).expect("first write");
    let delay = 3 * IO_TIMEOUT / 2;
    node.admin().set_faults(pb::Faults {
        latency_us: delay.as_micros() as u64,
        ..Default::default()
    });
    // Queue 0 (calls go round the queues in turn).
    let start = Instant::now();
    let err = volume
        .write_at(&vec![0xaa; range], 0)
        .expect_err("A times out");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert!(
        start.elapsed() <= IO_TIMEOUT + SLACK,
        "{:?}",
        start.elapsed()
    );
    node.admin().set_faults(pb::Faults::default());
    // Queue 1.
    volume.write_at(&vec![0xbb; range], 0).expect("B");
    // Past the time A would have been executed by the node.
    thread::sleep(
        (start + delay + Duration::from_millis(500)).saturating_duration_since(Instant::now()),
    );
    for _ in 0..2 {
        let mut back = vec![0u8; range];
        volume.read_at(&mut back, 0).expect("read");
        assert!(
            back.iter().all(|b| *b == 0xbb),
            "the range holds {:#x}, not B",
            back[0]
        );
    }
}
