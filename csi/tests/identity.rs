//! The Identity service over a real unix socket, as a sidecar dials it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hyper_util::rt::TokioIo;
use netblk_csi::identity::Identity;
use netblk_csi::pb;
use netblk_csi::pb::identity_client::IdentityClient;
use tonic::transport::{Channel, Endpoint};

async fn client(path: PathBuf) -> IdentityClient<Channel> {
    // The URI is required but unused: every connection goes to the socket.
    let channel = Endpoint::try_from("http://localhost")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .expect("connect");
    IdentityClient::new(channel)
}

#[test]
fn identity_names_the_plugin_its_capabilities_and_readiness() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("csi.sock");
    let ready = Arc::new(AtomicBool::new(false));
    let identity = Identity {
        ready: Arc::clone(&ready),
        controller: true,
    };
    runtime.block_on(async {
        let listener = netblk_csi::server::bind(&path).expect("bind");
        tokio::spawn(netblk_csi::server::serve(listener, identity));
        let mut c = client(path.clone()).await;
        let info = c
            .get_plugin_info(pb::GetPluginInfoRequest {})
            .await
            .expect("info")
            .into_inner();
        assert_eq!(info.name, "csi.netblk.io");
        assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
        let caps = c
            .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
            .await
            .expect("capabilities")
            .into_inner()
            .capabilities;
        let has = |want: &pb::plugin_capability::Type| {
            caps.iter().any(|c| c.r#type.as_ref() == Some(want))
        };
        assert!(has(&pb::plugin_capability::Type::Service(
            pb::plugin_capability::Service {
                r#type: pb::plugin_capability::service::Type::ControllerService as i32
            }
        )));
        assert!(has(&pb::plugin_capability::Type::VolumeExpansion(
            pb::plugin_capability::VolumeExpansion {
                r#type: pb::plugin_capability::volume_expansion::Type::Online as i32
            }
        )));
        let probe = |c: &mut IdentityClient<Channel>| {
            let mut c = c.clone();
            async move {
                c.probe(pb::ProbeRequest {})
                    .await
                    .expect("probe")
                    .into_inner()
                    .ready
            }
        };
        assert_eq!(probe(&mut c).await, Some(false), "not ready while starting");
        ready.store(true, Ordering::Release);
        assert_eq!(probe(&mut c).await, Some(true));
    });
}
