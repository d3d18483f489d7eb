//! What the engine simulations share: which seeds a run takes, and handing
//! a node's reply to an engine the way the driver does.

use netblk::engine::{Engine, ReplySink};
use netblk_protocol::pb;

/// The seeds of a run: `NETBLK_SIM_SEED` alone (to replay one), else
/// `default`.
pub fn seeds(default: std::ops::Range<u64>) -> Vec<u64> {
    match std::env::var("NETBLK_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => vec![seed],
        None => default.collect(),
    }
}

/// Hands `reply` from `node` to `engine`, and its payload (all of it,
/// arrived) into the request buffer it names, one buffer per tag.
pub fn deliver_reply(
    engine: &mut Engine,
    buffers: &mut [Vec<u8>],
    node: usize,
    reply: &pb::Reply,
    payload: &[u8],
) {
    match engine
        .handle_reply(node, reply, payload.len() as u32)
        .expect("valid reply")
    {
        ReplySink::Buffer { id, slice, .. } => {
            buffers[usize::from(slice.tag)][slice.offset as usize..][..slice.len as usize]
                .copy_from_slice(payload);
            engine.handle_payload(id, true);
        }
        ReplySink::Done | ReplySink::Discard => {}
    }
}
