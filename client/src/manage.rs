//! A volume as a whole, for tools that manage volumes rather than serve IO
//! (the CSI controller): look it up, create it, delete it, on every node of
//! its layout, each over a short connection of its own.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use netblk_protocol::pb;

use crate::layout::Layout;
use crate::net::{self, ConnectError, Identity, NodeInfo, Open, Timeouts};

/// A volume by what names it on the nodes: its name, stripe unit and
/// ordered nodes (its size is what the nodes say).
#[derive(Debug, Clone)]
pub struct VolumeRef {
    pub name: String,
    pub stripe_unit: u32,
    pub nodes: Vec<SocketAddr>,
    /// Copies of every stripe column (the nodes are columns × replicas).
    pub replicas: u32,
    /// Mutual TLS to the nodes (None: plaintext).
    pub tls: Option<std::sync::Arc<crate::net::ClientTls>>,
}

impl VolumeRef {
    /// The layout over `size` bytes (a valid stand-in size where the
    /// handshake presents none).
    fn layout(&self, size: Option<u64>) -> Result<Layout, String> {
        let n = u32::try_from(self.nodes.len()).map_err(|_| "too many nodes".to_string())?;
        let size = size.unwrap_or(u64::from(self.stripe_unit) * u64::from(n));
        Layout::replicated(size, self.stripe_unit, self.nodes.len(), self.replicas)
            .map_err(|e| e.to_string())
    }

    fn identity<'a>(&'a self, client_id: &'a str) -> Identity<'a> {
        Identity {
            owner_epoch: 0,
            client_id,
            volume: &self.name,
            session: net::clock_session(),
            volume_id: None,
            digest: false,
            tls: self.tls.as_deref(),
        }
    }

    /// The volume's size if it exists: every node has it, at one size.
    /// None if no node has it; an error if only some do, or they disagree.
    pub fn lookup(&self, client_id: &str, timeouts: Timeouts) -> Result<Option<u64>, String> {
        Ok(self.find(client_id, timeouts)?.map(|found| found.size))
    }

    /// As [`VolumeRef::lookup`], with the volume identity each node states.
    pub fn find(&self, client_id: &str, timeouts: Timeouts) -> Result<Option<Found>, String> {
        let layout = self.layout(None)?;
        let who = self.identity(client_id);
        let mut sizes = Vec::new();
        let mut volume_ids = Vec::new();
        let mut missing = Vec::new();
        for (node, addr) in self.nodes.iter().enumerate() {
            match net::connect_as(*addr, node, &layout, &who, timeouts, Open::Existing) {
                Ok((_, info)) => {
                    sizes.push((node, info.volume_size));
                    volume_ids.push(info.volume_id);
                }
                Err(ConnectError::NotFound { .. }) => missing.push(node),
                Err(err) => return Err(err.to_string()),
            }
        }
        let found = |size: u64| Found { size, volume_ids };
        match (sizes.first(), missing.is_empty()) {
            (None, _) => Ok(None),
            (Some(_), false) => Err(format!(
                "volume '{}' is on nodes {:?} but not on nodes {missing:?}: partly created or deleted",
                self.name,
                sizes.iter().map(|(n, _)| n).collect::<Vec<_>>()
            )),
            (Some((_, size)), true) if sizes.iter().all(|(_, s)| s == size) => {
                Ok(Some(found(*size)))
            }
            (Some(_), true) => Err(format!(
                "the nodes of volume '{}' disagree on its size: {sizes:?}",
                self.name
            )),
        }
    }

    /// Creates the volume at `size` on every node (a node that has it at
    /// that size already accepts; at another, refuses).
    pub fn create(
        &self,
        size: u64,
        client_id: &str,
        timeouts: Timeouts,
    ) -> Result<Vec<NodeInfo>, ConnectError> {
        let layout = self
            .layout(Some(size))
            .map_err(|why| ConnectError::Handshake {
                node: 0,
                addr: self
                    .nodes
                    .first()
                    .copied()
                    .unwrap_or(([0, 0, 0, 0], 0).into()),
                why,
            })?;
        let who = self.identity(client_id);
        self.nodes
            .iter()
            .enumerate()
            .map(|(node, addr)| net::connect(*addr, node, &layout, &who, timeouts).map(|(_, i)| i))
            .collect()
    }

    /// Grows the volume to at least `size` bytes on every node: a node
    /// already that large is left alone, so growing again (or after a grow
    /// cut short) converges. A host that has it mapped keeps working at its
    /// old size (its reconnects present that size as a floor) until it
    /// follows with its own resize. Returns the size every node now has.
    pub fn grow(&self, size: u64, client_id: &str, timeouts: Timeouts) -> Result<u64, String> {
        let layout = self.layout(None)?;
        layout
            .with_size(size)
            .map_err(|e| format!("cannot grow volume '{}' to {size} bytes: {e}", self.name))?;
        let who = self.identity(client_id);
        let mut sizes = Vec::new();
        for (node, addr) in self.nodes.iter().enumerate() {
            let (stream, info) =
                net::connect_as(*addr, node, &layout, &who, timeouts, Open::Existing)
                    .map_err(|e| e.to_string())?;
            let changed =
                resize_node(&stream, &info, size, Change::Grow, timeouts.io).map_err(|why| {
                    format!(
                        "node {node} ({addr}) did not grow volume '{}' to {size} bytes: {why}",
                        self.name
                    )
                })?;
            sizes.push(if changed.is_some() {
                size
            } else {
                info.volume_size
            });
        }
        match sizes.iter().max() {
            Some(max) if sizes.iter().all(|s| s == max) => Ok(*max),
            _ => Err(format!(
                "the nodes of volume '{}' disagree on its size after growing it: {sizes:?}",
                self.name
            )),
        }
    }

    /// Deletes the volume, with its data, from every node that has it; a
    /// node without it is done already, so deleting twice is no error.
    pub fn delete(&self, client_id: &str, timeouts: Timeouts) -> Result<(), String> {
        let layout = self.layout(None)?;
        let who = self.identity(client_id);
        for (node, addr) in self.nodes.iter().enumerate() {
            let stream = match net::connect_as(*addr, node, &layout, &who, timeouts, Open::Existing)
            {
                Ok((stream, _)) => stream,
                Err(ConnectError::NotFound { .. }) => continue,
                Err(err) => return Err(err.to_string()),
            };
            let reply = net::call(
                &stream,
                1,
                pb::request::Op::Delete(pb::Delete {}),
                timeouts.io,
            )
            .map_err(|why| format!("node {node} ({addr}): {why}"))?;
            if reply.status != pb::Status::Ok as i32 {
                return Err(format!(
                    "node {node} ({addr}) did not delete volume '{}': {}",
                    self.name, reply.message
                ));
            }
        }
        Ok(())
    }
}

/// A volume that every node of its layout has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its size, the same on every node.
    pub size: u64,
    /// Each node's identity of it, in node order (fixed when the node
    /// created it: another one later means the node lost it).
    pub volume_ids: Vec<String>,
}

/// How one node's volume is moved to a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// To at least the size: a node already that large (a manager grew it
    /// further) is left alone, for shrinking it would throw that away.
    Grow,
    /// To exactly the size (a forced shrink, or putting a node back).
    Exact,
}

/// One node's part of a resize, over a connection whose handshake said
/// `info`: its volume set to `size` bytes as `change` says. Returns the
/// size the node had if it was changed (None: left as it was). The one
/// place both the CSI controller's grow and a mapped device's resize
/// decide whether a node is resized.
pub fn resize_node(
    stream: &TcpStream,
    info: &NodeInfo,
    size: u64,
    change: Change,
    io: Duration,
) -> Result<Option<u64>, String> {
    let left = match change {
        Change::Grow => info.volume_size >= size,
        Change::Exact => info.volume_size == size,
    };
    if left {
        return Ok(None);
    }
    let op = pb::request::Op::Resize(pb::Resize { volume_size: size });
    let reply = net::call(stream, 1, op, io)?;
    if reply.status != pb::Status::Ok as i32 {
        return Err(reply.message);
    }
    Ok(Some(info.volume_size))
}
