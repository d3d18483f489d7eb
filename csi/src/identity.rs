//! The Identity service: the plugin's name and version, its capabilities
//! (a controller service, online volume expansion), and readiness.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tonic::{Request, Response, Status};

use crate::pb;
use crate::pb::plugin_capability::{Service, VolumeExpansion, service, volume_expansion};

/// The Identity service; `ready` says whether the plugin has finished
/// starting (a node plugin re-attaches its devices first).
#[derive(Debug, Clone)]
pub struct Identity {
    pub ready: Arc<AtomicBool>,
    /// Whether this process serves the Controller service.
    pub controller: bool,
}

#[tonic::async_trait]
impl pb::identity_server::Identity for Identity {
    async fn get_plugin_info(
        &self,
        _request: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: crate::DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        let mut capabilities = vec![pb::PluginCapability {
            r#type: Some(pb::plugin_capability::Type::VolumeExpansion(
                VolumeExpansion {
                    r#type: volume_expansion::Type::Online as i32,
                },
            )),
        }];
        if self.controller {
            capabilities.push(pb::PluginCapability {
                r#type: Some(pb::plugin_capability::Type::Service(Service {
                    r#type: service::Type::ControllerService as i32,
                })),
            });
        }
        Ok(Response::new(pb::GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(
        &self,
        _request: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        Ok(Response::new(pb::ProbeResponse {
            ready: Some(self.ready.load(Ordering::Acquire)),
        }))
    }
}
