//! The gRPC server on a unix socket (what kubelet and the sidecars dial:
//! `unix:///csi/csi.sock`).

use std::io;
use std::path::Path;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::controller::Controller;
use crate::identity::Identity;
use crate::node::Node;
use crate::pb::controller_server::ControllerServer;
use crate::pb::identity_server::IdentityServer;
use crate::pb::node_server::NodeServer;

/// Binds `path` (a socket left by an earlier process is replaced): the
/// listener [`serve`] takes. Must run inside a tokio runtime.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    UnixListener::bind(path)
}

/// The services one process serves: Identity always, Controller and Node
/// as its role says (one process may serve both).
pub struct Services {
    pub identity: Identity,
    pub controller: Option<Controller>,
    pub node: Option<Node>,
}

/// Serves `services` on `listener` until the future is dropped or the
/// listener fails.
pub async fn serve(
    listener: UnixListener,
    services: Services,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(services.identity))
        .add_optional_service(services.controller.map(ControllerServer::new))
        .add_optional_service(services.node.map(NodeServer::new))
        .serve_with_incoming(UnixListenerStream::new(listener))
        .await
}
