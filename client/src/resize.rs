//! Online resize of a mapped volume (`netblk resize`, run by the serving
//! daemon): the nodes, the size the queues check requests against and
//! present at reconnects, and the block device, in an order that never lets
//! a request reach bytes some part does not hold yet. Growing: nodes, then
//! the queues, then the kernel; shrinking (only when forced): the kernel,
//! then the queues, then the nodes. A node that cannot follow undoes the
//! whole resize.

use std::net::SocketAddr;

use netblk_protocol::pb;

use crate::layout::{Layout, LiveSize, VolumeSpec};
use crate::net::{self, Identity, Timeouts};
use crate::ublk::ctrl::Control;
use crate::ublk::sys;

/// What a resize of one device needs to know.
pub struct Resizer {
    pub dev_id: u32,
    /// The volume's name, stripe unit and nodes (its size is the map's).
    pub spec: VolumeSpec,
    /// The size the queues use now.
    pub size: LiveSize,
    pub client_id: String,
    /// The volume identity each node must hold.
    pub volume_ids: Vec<String>,
    pub timeouts: Timeouts,
    pub block_size: u32,
    /// Mutual TLS to the nodes, as the device's own connections.
    pub tls: Option<std::sync::Arc<crate::net::ClientTls>>,
}

impl Resizer {
    /// Resizes to `new` bytes; shrinking only with `force`. Returns the
    /// size before. Nothing is changed when it fails for a reason known
    /// beforehand (bad size, shrink without force, a kernel without
    /// `UBLK_F_UPDATE_SIZE`), and what was changed is undone when a node or
    /// the kernel refuses half way.
    pub fn resize(&self, new: u64, force: bool) -> Result<u64, String> {
        let old = self.size.get();
        let dev = format!("/dev/ublkb{}", self.dev_id);
        let node_count = self.spec.nodes.len() as u32;
        let from = Layout::new(old, self.spec.stripe_unit, node_count)
            .map_err(|e| format!("{dev}: its current layout is unusable: {e}"))?;
        from.with_size(new)
            .map_err(|e| format!("cannot resize {dev} to {new} bytes: {e}"))?;
        if !new.is_multiple_of(u64::from(self.block_size)) {
            return Err(format!(
                "cannot resize {dev} to {new} bytes: not a multiple of its {}-byte blocks",
                self.block_size
            ));
        }
        if new == old {
            return Ok(old);
        }
        if new < old && !force {
            return Err(format!(
                "shrinking {dev} from {old} to {new} bytes throws away everything past {new}: refused without --force"
            ));
        }
        let mut ctrl = Control::open().map_err(|e| e.to_string())?;
        let features = ctrl.features().map_err(|e| e.to_string())?;
        if features & sys::UBLK_F_UPDATE_SIZE == 0 {
            return Err(format!(
                "this kernel's ublk driver cannot resize a device (no UBLK_F_UPDATE_SIZE, Linux 6.16+): {dev} and its nodes were not changed"
            ));
        }
        let kernel = |ctrl: &mut Control, size: u64| {
            ctrl.update_size(self.dev_id, size / 512)
                .map_err(|e| e.to_string())
        };
        if new > old {
            self.tell_nodes(&from, new)?;
            self.size.set(new);
            if let Err(why) = kernel(&mut ctrl, new) {
                self.size.set(old);
                let undone = self.tell_nodes(&from.with_size(new).unwrap_or(from), old);
                return Err(undo_report(&dev, &why, undone));
            }
        } else {
            kernel(&mut ctrl, new)?;
            self.size.set(new);
            if let Err(why) = self.tell_nodes(&from, new) {
                self.size.set(old);
                let undone = kernel(&mut ctrl, old);
                return Err(undo_report(&dev, &why, undone));
            }
        }
        tracing::info!(device = %dev, from = old, to = new, "resized");
        Ok(old)
    }

    /// Tells every node the volume is now `to` bytes (each handshakes with
    /// `from`'s size); if one refuses, the ones already told are put back.
    /// The node part of [`Resizer::resize`], public for tests.
    pub fn tell_nodes(&self, from: &Layout, to: u64) -> Result<(), String> {
        let nodes = &self.spec.nodes;
        for (node, addr) in nodes.iter().enumerate() {
            if let Err(why) = self.tell(node, *addr, from, to) {
                let moved = from.with_size(to).unwrap_or(*from);
                for (back, back_addr) in nodes.iter().enumerate().take(node) {
                    if let Err(e) = self.tell(back, *back_addr, &moved, from.size()) {
                        tracing::error!(node = back, error = %e, "could not put a node back to the old size");
                    }
                }
                return Err(format!("node {node} ({addr}) did not resize: {why}"));
            }
        }
        Ok(())
    }

    /// One node: a connection of its own (not one of the queues'), the
    /// resize, its answer.
    fn tell(&self, node: usize, addr: SocketAddr, layout: &Layout, to: u64) -> Result<(), String> {
        let client_id = format!("{}/resize", self.client_id);
        let who = Identity {
            client_id: &client_id,
            volume: &self.spec.name,
            session: net::clock_session(),
            volume_id: self.volume_ids.get(node).map(String::as_str),
            digest: false,
            tls: self.tls.as_deref(),
        };
        let (stream, _) =
            net::connect(addr, node, layout, &who, self.timeouts).map_err(|e| e.to_string())?;
        let op = pb::request::Op::Resize(pb::Resize { volume_size: to });
        let reply = net::call(&stream, 1, op, self.timeouts.io)?;
        if reply.status == pb::Status::Ok as i32 {
            Ok(())
        } else {
            Err(reply.message)
        }
    }
}

fn undo_report(dev: &str, why: &str, undone: Result<(), String>) -> String {
    match undone {
        Ok(()) => format!("resizing {dev} failed: {why}; everything was put back"),
        Err(e) => format!(
            "resizing {dev} failed: {why}; putting it back failed too ({e}): check the nodes and `blockdev --getsize64 {dev}`"
        ),
    }
}
