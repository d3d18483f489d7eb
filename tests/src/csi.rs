//! A blocking gRPC client for the CSI driver over its unix socket, as the
//! sidecars and kubelet dial it, and an in-process plugin for host tests.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use netblk_csi::pb::controller_client::ControllerClient;
use netblk_csi::pb::identity_client::IdentityClient;
use netblk_csi::pb::node_client::NodeClient;
use netblk_csi::server::Services;
use tokio::runtime::Runtime;
use tonic::transport::{Channel, Endpoint};

/// The three CSI clients on one connection, and a runtime to wait on them.
pub struct Csi {
    runtime: Runtime,
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

fn runtime() -> io::Result<Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
}

impl Csi {
    /// Connects to the plugin serving on `socket`.
    pub fn connect(socket: &Path) -> Result<Csi, String> {
        let runtime = runtime().map_err(|e| e.to_string())?;
        let path = socket.to_path_buf();
        // The URI is required but unused: every connection goes to the socket.
        let channel = runtime
            .block_on(
                Endpoint::from_static("http://localhost").connect_with_connector(
                    tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            tokio::net::UnixStream::connect(path)
                                .await
                                .map(TokioIo::new)
                        }
                    }),
                ),
            )
            .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
        Ok(Csi {
            runtime,
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        })
    }

    /// Waits for one call: `csi.call(csi.node.clone().node_get_info(..))`.
    pub fn call<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        self.runtime.block_on(call).map(tonic::Response::into_inner)
    }
}

/// A plugin serving `services` in this process, on a thread of its own,
/// at a socket in a temporary directory.
pub struct Plugin {
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Plugin {
    pub fn start(services: Services) -> Plugin {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("csi.sock");
        let path = socket.clone();
        let (bound, is_bound) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = runtime().expect("runtime");
            runtime.block_on(async move {
                let listener = netblk_csi::server::bind(&path).expect("bind");
                let _ = bound.send(());
                let _ = netblk_csi::server::serve(listener, services).await;
            });
        });
        is_bound
            .recv_timeout(crate::WAIT)
            .expect("the plugin binds its socket");
        Plugin { socket, _dir: dir }
    }

    pub fn client(&self) -> Csi {
        Csi::connect(&self.socket).expect("connect to the plugin")
    }
}

/// A node plugin (node id `host-a`) whose `netblk` is a stand-in in `dir`
/// that writes its arguments down and fails: what NodeStage would run, with
/// these TLS files and pools. Returns the plugin and the arguments' file.
pub fn node_plugin_with_stand_in(
    dir: &Path,
    tls: Option<netblk_csi::volume::Tls>,
    pools: netblk_csi::pools::Pools,
) -> (Plugin, PathBuf) {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    let fake = dir.join("netblk");
    let args = dir.join("args");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\necho \"$@\" > {}\nexit 1\n", args.display()),
    )
    .expect("stand-in netblk");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let plugin = Plugin::start(Services {
        identity: netblk_csi::identity::Identity {
            ready: Arc::new(AtomicBool::new(true)),
            controller: false,
        },
        controller: None,
        node: Some(netblk_csi::node::Node {
            node_id: "host-a".into(),
            daemons: netblk_csi::daemons::Daemons {
                netblk: fake,
                log_dir: dir.join("logs"),
                tls,
                pools,
            },
            timeouts: netblk_csi::controller::NODE_TIMEOUTS,
            busy: Default::default(),
        }),
    });
    (plugin, args)
}

/// A ready controller-only plugin serving `controller`.
pub fn controller_plugin(controller: netblk_csi::controller::Controller) -> Plugin {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    Plugin::start(Services {
        identity: netblk_csi::identity::Identity {
            ready: Arc::new(AtomicBool::new(true)),
            controller: true,
        },
        controller: Some(controller),
        node: None,
    })
}
