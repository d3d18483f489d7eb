//! Re-establishing lost node connections, off the queue thread, with a
//! bounded exponential backoff.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::{Frontend, QueueDriver};
use crate::layout::Layout;
use crate::net::{ConnectError, NodeInfo};
use crate::recv::ReplyReader;

/// How a queue re-establishes a lost node connection (in the background,
/// with a bounded exponential backoff); in-flight pieces are sent again
/// once it is back.
#[derive(Debug, Clone)]
pub struct Reconnect {
    pub addrs: Vec<SocketAddr>,
    pub layout: Layout,
    /// The volume's size now (a resize changes it): what a handshake
    /// presents.
    pub size: crate::layout::LiveSize,
    /// The device's client id (one for all its queues).
    pub client_id: String,
    /// Each node's fencing epoch, shared by the device's queues: what a
    /// handshake presents as its session.
    pub epochs: std::sync::Arc<crate::epochs::Epochs>,
    pub volume: String,
    /// For one connect + handshake, and the IO timeout.
    pub timeouts: crate::net::Timeouts,
    /// The volume identity each node held at the first connect: a node that
    /// comes back with another one lost the volume and is refused.
    pub volume_ids: Vec<String>,
    /// Data digests on every connection.
    pub digest: bool,
    /// Mutual TLS on every connection.
    pub tls: Option<std::sync::Arc<crate::net::ClientTls>>,
    /// The owner epoch handshakes present (replicated volumes; 0: none).
    pub owner_epoch: u64,
}

impl Reconnect {
    /// The layout a handshake presents now: the volume's current size (it
    /// may have been resized since the map).
    pub fn layout_now(&self) -> Layout {
        self.layout
            .with_size(self.size.get())
            .unwrap_or(self.layout)
    }
}

/// A reconnect attempt's outcome: node, epoch, the address reached, the new
/// connection.
pub(super) type Reconnected = (
    usize,
    u64,
    SocketAddr,
    Result<(TcpStream, NodeInfo), ConnectError>,
);

pub(super) const RECONNECT_MIN: Duration = Duration::from_millis(50);
pub(super) const RECONNECT_MAX: Duration = Duration::from_secs(2);

impl<F: Frontend> QueueDriver<F> {
    /// Installs finished reconnects and starts due ones. True while a node is down.
    pub(super) fn reconnect_step(&mut self, now: Instant) -> bool {
        let Some(reconnect) = &self.reconnect else {
            return false;
        };
        while let Ok((node, epoch, addr, result)) = self.reconnected.1.try_recv() {
            // Where the member is now (a replace moves it).
            let member_at = self
                .engine
                .membership()
                .pins
                .addr(node)
                .unwrap_or(reconnect.addrs[node]);
            let out = self.engine.is_out(node);
            let conn = &mut self.conns[node];
            conn.connecting = false;
            match result {
                Ok(_) if out || addr != member_at => {
                    // The member left, or moved, while it was being
                    // reached: what answered there is not the member
                    // (after a replace, the old node). Reached anew, where
                    // it is, once it takes requests.
                    tracing::info!(
                        node,
                        %addr,
                        now_at = %member_at,
                        "reconnected to a member that left or moved meanwhile: not used"
                    );
                    conn.next_attempt = now;
                }
                Ok(_) if !reconnect.epochs.may_send(node, epoch) => {
                    // A connection at this epoch ended while this one was
                    // being made: it may not carry requests; connect again
                    // at once, at the epoch now current.
                    tracing::debug!(node, epoch, "reconnected at an epoch already over");
                    conn.next_attempt = now;
                }
                Ok((stream, info)) => {
                    let down_ms = conn.outage.take().map_or(0, |o| {
                        now.saturating_duration_since(o.since).as_millis() as u64
                    });
                    tracing::info!(
                        node,
                        %addr,
                        epoch,
                        incarnation = info.incarnation,
                        down_ms,
                        "reconnected"
                    );
                    conn.fd = stream.as_raw_fd();
                    conn.local = crate::net::delivered_locally(&stream);
                    conn.stream = Some(stream);
                    conn.epoch = epoch;
                    conn.generation = conn.generation.wrapping_add(1);
                    conn.ops = 0;
                    conn.chain.clear();
                    conn.chain_left = 0;
                    conn.rstart = 0;
                    conn.rend = 0;
                    conn.reader = ReplyReader::new();
                    conn.recv_posted = false;
                    conn.broken = false;
                    conn.lost_reported = false;
                    conn.backoff = RECONNECT_MIN;
                    self.engine.handle_incarnation(
                        node,
                        info.incarnation,
                        info.durable_incarnation,
                    );
                    self.engine.handle_connection_restored(node);
                    if let Some(f) = self.engine.figures() {
                        f.node_up(node, epoch, true);
                    }
                }
                Err(why @ (ConnectError::VolumeLost { .. } | ConnectError::NotFound { .. })) => {
                    // Answering, but not with our data: no point waiting for
                    // the node-down timeout. Tried again, slowly, in case the
                    // volume is put back.
                    if let Some(o) = conn.outage.as_mut() {
                        o.attempts += 1;
                        if !o.refused {
                            o.refused = true;
                            tracing::error!(node, error = %why, "node refused: it lost the volume");
                        }
                    }
                    if let Some(f) = self.engine.figures() {
                        f.node_down(node, now, &why.to_string());
                    }
                    self.engine.handle_node_refused(node);
                    conn.next_attempt = now + RECONNECT_MAX;
                    conn.backoff = RECONNECT_MAX;
                }
                Err(why) => {
                    if let Some(o) = conn.outage.as_mut() {
                        o.attempts += 1;
                        if o.attempts == 1 {
                            tracing::warn!(node, error = %why, "reconnect failed; retrying with backoff");
                        }
                    }
                    if let Some(f) = self.engine.figures() {
                        f.node_down(node, now, &why.to_string());
                    }
                    conn.next_attempt = now + conn.backoff;
                    conn.backoff = (conn.backoff * 2).min(RECONNECT_MAX);
                }
            }
        }
        let mut down = false;
        for (node, conn) in self.conns.iter_mut().enumerate() {
            // A replica out of sync gets nothing: no point reconnecting.
            if !conn.lost_reported || self.engine.is_out(node) {
                continue;
            }
            down = true;
            if let Some(o) = conn.outage.as_mut() {
                let down_s = now.saturating_duration_since(o.since).as_secs();
                if !o.given_up && self.engine.node_given_up(node, now) {
                    o.given_up = true;
                    tracing::error!(
                        node,
                        down_s,
                        "node given up: IO to its stripes fails until it is back"
                    );
                }
                if now.saturating_duration_since(o.summarized) >= super::conn::OUTAGE_SUMMARY {
                    o.summarized = now;
                    tracing::warn!(node, down_s, attempts = o.attempts, "node still down");
                }
            }
            if conn.connecting || now < conn.next_attempt {
                continue;
            }
            conn.connecting = true;
            let epoch = reconnect.epochs.current(node);
            // A replaced member is reached where it is now.
            let addr = self
                .engine
                .membership()
                .pins
                .addr(node)
                .unwrap_or(reconnect.addrs[node]);
            let timeouts = reconnect.timeouts;
            let layout = reconnect.layout_now();
            let (client_id, volume) = (reconnect.client_id.clone(), reconnect.volume.clone());
            // A member rebuilt under a new identity is held to that one.
            let pinned = self
                .engine
                .membership()
                .pin(node)
                .or_else(|| reconnect.volume_ids.get(node).cloned());
            let digest = reconnect.digest;
            let tls = reconnect.tls.clone();
            let owner_epoch = reconnect.owner_epoch;
            let done = self.reconnected.0.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("reconnect-{node}"))
                .spawn(move || {
                    let who = crate::net::Identity {
                        owner_epoch,
                        client_id: &client_id,
                        volume: &volume,
                        session: epoch,
                        volume_id: pinned.as_deref(),
                        digest,
                        tls: tls.as_deref(),
                    };
                    let result = crate::net::connect(addr, node, &layout, &who, timeouts);
                    let _ = done.send((node, epoch, addr, result));
                });
            if spawned.is_err() {
                conn.connecting = false;
                conn.next_attempt = now + conn.backoff;
            }
        }
        down
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::LiveSize;

    #[test]
    fn a_reconnect_presents_the_size_after_a_resize() {
        let layout = Layout::new(64 << 20, 65536, 2).expect("layout");
        let reconnect = Reconnect {
            addrs: Vec::new(),
            layout,
            size: LiveSize::new(layout.size()),
            client_id: "c".into(),
            epochs: std::sync::Arc::new(crate::epochs::Epochs::new(2, 1)),
            volume: "v".into(),
            timeouts: crate::net::Timeouts {
                connect: Duration::from_secs(1),
                io: Duration::from_secs(1),
            },
            volume_ids: Vec::new(),
            digest: false,
            tls: None,
            owner_epoch: 0,
        };
        assert_eq!(reconnect.layout_now(), layout);
        reconnect.size.set(128 << 20);
        let now = reconnect.layout_now();
        assert_eq!(now.size(), 128 << 20);
        assert_eq!(now.stripe_unit(), 65536, "the striping stays");
        assert_eq!(now.node_count(), 2);
    }
}
