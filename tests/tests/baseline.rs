//! The wire baseline of `netblk bench` is an upper bound only if it does
//! the same operation netblk does: here, that it keeps exactly the pieces in
//! flight it is asked to, over every connection.

use std::time::Duration;

use netblk::bench::wire::{self, WireLoad};
use netblk::uring::SendMode;
use netblk_tests::cluster::Cluster;

/// Every reply waits this long at the node, so the pieces done in a run
/// say how many were in flight.
const LATENCY_US: u64 = 20_000;

fn run(in_flight: usize, random: bool) -> u64 {
    let cluster = Cluster::start_with(4, &["--latency-us", &LATENCY_US.to_string()]);
    let spec = cluster.spec("baseline", 64 << 20);
    let load = WireLoad {
        write: false,
        piece: 4096,
        queues: 1,
        in_flight,
        mode: SendMode::Copy,
        duration: Duration::from_millis(400),
        random,
    };
    let result = wire::run(&spec, load).expect("baseline run");
    assert_eq!(result.latencies_us.len() as u64, result.pieces);
    assert!(
        result
            .latencies_us
            .iter()
            .all(|l| u64::from(*l) >= LATENCY_US),
        "every piece waited at the node"
    );
    result.pieces
}

#[test]
fn depth_one_over_four_connections_keeps_one_piece_in_flight() {
    // 400 ms of 20 ms round trips, one at a time: about 20 (plus the ones
    // in flight at the end). One per connection would be about 80.
    let pieces = run(1, true);
    assert!((10..=24).contains(&pieces), "{pieces} pieces at depth 1");
}

#[test]
fn eight_in_flight_over_four_connections_are_eight() {
    let pieces = run(8, false);
    assert!((80..=190).contains(&pieces), "{pieces} pieces at depth 8");
}
