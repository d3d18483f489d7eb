//! netblk's CSI driver: the `csi.v1` services (generated from
//! `proto/csi.proto`, written from the CSI specification) and their
//! implementations, served over a unix socket.
//!
//! - [`identity`]: who the plugin is, what it offers, whether it is ready.
//! - [`controller`]: volumes made, grown and deleted on the storage nodes.
//! - [`node`]: volumes mapped, formatted, mounted and grown on this host.
//! - [`daemons`]: the detached `netblk map` daemons, found again and
//!   recovered by a plugin started later.
//! - [`host`]: filesystem signatures, mkfs, mounts, usage.
//! - [`busy`]: one operation at a time per volume (ABORTED otherwise).
//! - [`server`]: the gRPC server on a unix socket.
//! - [`volume`]: volume ids, StorageClass parameters, capacities and
//!   capabilities, as the services use them.

pub mod busy;
pub mod controller;
pub mod daemons;
pub mod host;
pub mod identity;
pub mod node;
pub mod pools;
pub mod server;
pub mod volume;

/// The generated `csi.v1` messages, clients and servers.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("csi.v1");
}

/// The driver's name, as Kubernetes knows it (`CSIDriver`, StorageClass
/// `provisioner`).
pub const DRIVER_NAME: &str = "csi.netblk.io";
