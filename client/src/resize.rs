//! Online resize of a mapped volume (`netblk resize`, run by the serving
//! daemon): the nodes, the size the queues check requests against and
//! present at reconnects, and the block device, in an order that never lets
//! a request reach bytes some part does not hold yet. Growing: nodes, then
//! the queues, then the kernel; shrinking (only when forced): the kernel,
//! then the queues, then the nodes. A node that cannot follow undoes the
//! whole resize, putting every node back to the size it had before (never
//! below: a manager may have grown the nodes before the device followed).

use std::net::SocketAddr;

use crate::layout::{Layout, LiveSize, VolumeSpec};
use crate::manage::{Change, resize_node};
use crate::net::{self, Identity, Open, Timeouts};
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
        let from = self.layout_at(old)?;
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
        self.change(new, |size| {
            ctrl.update_size(self.dev_id, size / 512)
                .map_err(|e| e.to_string())
        })?;
        tracing::info!(device = %dev, from = old, to = new, "resized");
        Ok(old)
    }

    /// Moves the nodes, the queues' size and the kernel (`kernel` sets the
    /// device's size) from the current size to `new`, in the order its
    /// direction needs, and undoes what was done when a step fails. `new`
    /// is checked by [`Resizer::resize`]; public for tests (a host without
    /// ublk has no device to resize).
    pub fn change(
        &self,
        new: u64,
        mut kernel: impl FnMut(u64) -> Result<(), String>,
    ) -> Result<(), String> {
        let old = self.size.get();
        let dev = format!("/dev/ublkb{}", self.dev_id);
        let from = self.layout_at(old)?;
        if new > old {
            let before = self.tell_nodes(&from, new, Change::Grow)?;
            self.size.set(new);
            if let Err(why) = kernel(new) {
                self.size.set(old);
                let undone = self.put_back(&from, &before);
                return Err(undo_report(&dev, &why, undone));
            }
        } else if new < old {
            kernel(new)?;
            self.size.set(new);
            if let Err(why) = self.tell_nodes(&from, new, Change::Exact) {
                self.size.set(old);
                let undone = kernel(old);
                return Err(undo_report(&dev, &why, undone));
            }
        }
        Ok(())
    }

    /// The device's layout at `size` bytes: its stripe unit, nodes and
    /// replicas (the nodes refuse any other).
    fn layout_at(&self, size: u64) -> Result<Layout, String> {
        VolumeSpec {
            size,
            ..self.spec.clone()
        }
        .layout()
        .map_err(|e| {
            format!(
                "/dev/ublkb{}: its current layout is unusable: {e}",
                self.dev_id
            )
        })
    }

    /// Tells every node the volume is now `to` bytes (a grow leaves a node
    /// already that large alone); if one refuses, the ones changed are put
    /// back. Returns, per node, the size it had if it was changed.
    fn tell_nodes(&self, at: &Layout, to: u64, change: Change) -> Result<Vec<Option<u64>>, String> {
        let mut before = Vec::with_capacity(self.spec.nodes.len());
        for (node, addr) in self.spec.nodes.iter().enumerate() {
            match self.tell(node, *addr, at, to, change) {
                Ok(was) => before.push(was),
                Err(why) => {
                    // Logged there; the refusal is what the caller hears.
                    let _ = self.put_back(at, &before);
                    return Err(format!("node {node} ({addr}) did not resize: {why}"));
                }
            }
        }
        Ok(before)
    }

    /// Puts every node [`Resizer::tell_nodes`] changed back to the size it
    /// had before this resize, never below it (a manager may have grown it
    /// before the device followed).
    fn put_back(&self, at: &Layout, before: &[Option<u64>]) -> Result<(), String> {
        let mut failed = Vec::new();
        for (node, (addr, was)) in self.spec.nodes.iter().zip(before).enumerate() {
            let Some(was) = *was else { continue };
            if let Err(e) = self.tell(node, *addr, at, was, Change::Exact) {
                tracing::error!(node, size = was, error = %e, "could not put a node back to its size before the resize");
                failed.push(format!("node {node} ({addr}): {e}"));
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }

    /// One node: a connection of its own (not one of the queues'; an
    /// existing-only handshake, pinned to the volume identity), its size
    /// changed as `change` says. Returns its size before if it changed.
    fn tell(
        &self,
        node: usize,
        addr: SocketAddr,
        layout: &Layout,
        to: u64,
        change: Change,
    ) -> Result<Option<u64>, String> {
        let client_id = format!("{}/resize", self.client_id);
        let who = Identity {
            owner_epoch: 0,
            client_id: &client_id,
            volume: &self.spec.name,
            session: net::clock_session(),
            volume_id: self.volume_ids.get(node).map(String::as_str),
            digest: false,
            tls: self.tls.as_deref(),
        };
        let (stream, info) =
            net::connect_as(addr, node, layout, &who, self.timeouts, Open::Existing)
                .map_err(|e| e.to_string())?;
        resize_node(&stream, &info, to, change, self.timeouts.io)
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
