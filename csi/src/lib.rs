//! netblk's CSI driver: the `csi.v1` services (generated from
//! `proto/csi.proto`, written from the CSI specification) and their
//! implementations, served over a unix socket.
//!
//! - [`identity`]: who the plugin is, what it offers, whether it is ready.
//! - [`server`]: the gRPC server on a unix socket.
//! - [`volume`]: volume ids, StorageClass parameters, capacities and
//!   capabilities, as the services will use them.

pub mod identity;
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
