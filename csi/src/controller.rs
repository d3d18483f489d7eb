//! The Controller service: volumes made, grown and deleted on the storage
//! nodes (`netblk::manage`). Everything a volume is lives on its nodes and in
//! its id, so the controller keeps no state and any replica can answer.
//! Every call checks all its arguments (INVALID_ARGUMENT) before it looks
//! anything up (its volume id with [`handle_of`]: NOT_FOUND if not ours).

use std::time::Duration;

use netblk::net::Timeouts;
use tonic::{Request, Response, Status};

use crate::busy::Busy;
use crate::pb;
use crate::pb::controller_service_capability::rpc::Type as Rpc;
use crate::pools::Pools;
use crate::volume::{self, Context, Parameters, Tls, VolumeHandle, handle_of};

/// How long the controller waits on a storage node.
pub const NODE_TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(5),
    io: Duration::from_secs(20),
};

/// The Controller service.
#[derive(Debug, Clone)]
pub struct Controller {
    /// The client id the controller's connections present to the nodes.
    pub client_id: String,
    pub timeouts: Timeouts,
    pub busy: Busy,
    /// Mutual TLS to the storage nodes (None: plaintext).
    pub tls: Option<Tls>,
    /// Where StorageClasses' pools are.
    pub pools: Pools,
}

impl Controller {
    pub fn new() -> Controller {
        Controller {
            client_id: format!("netblk-csi-controller-{}", std::process::id()),
            timeouts: NODE_TIMEOUTS,
            busy: Busy::default(),
            tls: None,
            pools: Pools::default(),
        }
    }
}

impl Default for Controller {
    fn default() -> Self {
        Controller::new()
    }
}

impl Controller {
    /// The size of `handle`'s volume if its nodes hold it (a pool's: the
    /// nodes its placement record names).
    async fn lookup(&self, handle: &VolumeHandle) -> Result<Option<u64>, Status> {
        let (client_id, timeouts) = (self.client_id.clone(), self.timeouts);
        let (tls, pools, handle) = (self.tls.clone(), self.pools.clone(), handle.clone());
        blocking(move || {
            match pools
                .volume_ref(&handle, tls.as_ref())
                .map_err(Status::unavailable)?
            {
                Some(volume) => volume
                    .lookup(&client_id, timeouts)
                    .map_err(Status::unavailable),
                None => Ok(None),
            }
        })
        .await
    }
}

/// Runs blocking node IO off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Status::internal(format!("a worker failed: {e}")))?
}

fn check_capabilities(capabilities: &[pb::VolumeCapability]) -> Result<(), String> {
    if capabilities.is_empty() {
        return Err("volume_capabilities is empty".into());
    }
    capabilities.iter().try_for_each(volume::supported)
}

#[tonic::async_trait]
impl pb::controller_server::Controller for Controller {
    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("name is empty"));
        }
        netblk_protocol::geometry::check_volume_name(&req.name)
            .map_err(Status::invalid_argument)?;
        check_capabilities(&req.volume_capabilities).map_err(Status::invalid_argument)?;
        let params = Parameters::parse(&req.parameters).map_err(Status::invalid_argument)?;
        let size = volume::capacity(req.capacity_range.as_ref()).map_err(Status::out_of_range)?;
        let range = req.capacity_range.unwrap_or_default();
        let handle = VolumeHandle {
            name: req.name.clone(),
            stripe_unit: params.stripe_unit,
            nodes: params.nodes.clone(),
            replicas: params.replicas,
            pool: params.pool.as_ref().map(|p| p.name.clone()),
        };
        let claim = self.busy.claim(&req.name)?;
        let (client_id, timeouts) = (self.client_id.clone(), self.timeouts);
        let (tls, pools) = (self.tls.clone(), self.pools.clone());
        let wanted = handle.clone();
        // The nodes' volume identities go into the context: the node
        // plugin maps with them pinned (see `Context`).
        let (capacity, volume_ids) = blocking(move || {
            let _claim = claim;
            let fits = |have: u64| {
                i64::try_from(have).is_ok_and(|h| {
                    h >= range.required_bytes && (range.limit_bytes == 0 || h <= range.limit_bytes)
                })
            };
            let exists = |have: u64| {
                Status::already_exists(format!(
                    "volume '{}' exists with {have} bytes, outside the range asked for",
                    wanted.name
                ))
            };
            if let Some(placed) = &params.pool {
                let pool = pools
                    .load(&placed.name)
                    .map_err(Status::failed_precondition)?;
                let asker = Pools::asker(tls.as_ref());
                let volume =
                    match netblk::pooled::volume_ref(&pool, &wanted.name, &asker, tls.clone())
                        .map_err(Status::unavailable)?
                    {
                        Some((_, located)) if !fits(located.size) => {
                            return Err(exists(located.size));
                        }
                        Some((volume, _)) => volume,
                        None => {
                            let new = netblk::pooled::NewVolume {
                                name: wanted.name.clone(),
                                size,
                                columns: placed.columns,
                                replicas: wanted.replicas,
                                spread: placed.spread,
                                stripe_unit: wanted.stripe_unit,
                            };
                            let created = netblk::pooled::create(
                                &pool,
                                &new,
                                &asker,
                                tls.clone(),
                                &client_id,
                                timeouts,
                            )
                            .map_err(Status::unavailable)?;
                            tracing::info!(
                                volume = %wanted.name,
                                nodes = %netblk::pooled::members(&created.located.nodes),
                                "placed over pool '{}'", placed.name
                            );
                            created.located.volume_ref(&wanted.name, tls.clone())
                        }
                    };
                return match volume
                    .find(&client_id, timeouts)
                    .map_err(Status::unavailable)?
                {
                    Some(found) => Ok((found.size, found.volume_ids)),
                    None => Err(Status::unavailable(format!(
                        "volume '{}' was placed but its nodes do not hold it",
                        wanted.name
                    ))),
                };
            }
            let volume = wanted.volume_ref(tls.as_ref());
            match volume.find(&client_id, timeouts) {
                Ok(Some(found)) if fits(found.size) => Ok((found.size, found.volume_ids)),
                Ok(Some(found)) => Err(exists(found.size)),
                // Absent, or partly made by a call cut short: making it
                // (again) converges; nodes that have it at another size refuse.
                Ok(None) | Err(_) => volume
                    .create(size, &client_id, timeouts)
                    .map(|infos| (size, infos.into_iter().map(|i| i.volume_id).collect()))
                    .map_err(|e| Status::unavailable(e.to_string())),
            }
        })
        .await?;
        tracing::info!(volume = %handle.id(), bytes = capacity, "volume ready");
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(pb::Volume {
                capacity_bytes: i64::try_from(capacity)
                    .map_err(|_| Status::out_of_range("capacity too large"))?,
                volume_id: handle.id(),
                volume_context: Context::created(
                    params.queues,
                    volume_ids,
                    &req.volume_capabilities,
                )
                .to_map(),
            }),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is empty"));
        }
        // An id that is not ours names no volume: deleting it is done.
        let Ok(handle) = VolumeHandle::parse(&req.volume_id) else {
            return Ok(Response::new(pb::DeleteVolumeResponse {}));
        };
        let claim = self.busy.claim(&handle.name)?;
        let (client_id, timeouts) = (self.client_id.clone(), self.timeouts);
        let (tls, pools) = (self.tls.clone(), self.pools.clone());
        blocking(move || {
            let _claim = claim;
            // A pool's volume no node of it holds is deleted already.
            match pools
                .volume_ref(&handle, tls.as_ref())
                .map_err(Status::unavailable)?
            {
                Some(volume) => volume
                    .delete(&client_id, timeouts)
                    .map_err(Status::unavailable),
                None => Ok(()),
            }
        })
        .await?;
        tracing::info!(volume = %req.volume_id, "volume deleted");
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        if req.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is empty"));
        }
        let handle = handle_of(&req.volume_id)?;
        let found = self.lookup(&handle).await?;
        if found.is_none() {
            return Err(Status::not_found(format!(
                "no volume '{}' on its nodes",
                handle.name
            )));
        }
        let verdict = check_capabilities(&req.volume_capabilities).and_then(|()| {
            if req.parameters.is_empty() {
                return Ok(());
            }
            let params = Parameters::parse(&req.parameters)?;
            if params.nodes != handle.nodes
                || params.pool.map(|p| p.name) != handle.pool
                || params.stripe_unit != handle.stripe_unit
                || params.replicas != handle.replicas
            {
                return Err(
                    "the parameters name other nodes or another pool, another stripe unit or another replica count"
                        .into(),
                );
            }
            Ok(())
        });
        Ok(Response::new(match verdict {
            Ok(()) => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                }),
                message: String::new(),
            },
            Err(why) => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: why,
            },
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        let rpc = |t: Rpc| pb::ControllerServiceCapability {
            r#type: Some(pb::controller_service_capability::Type::Rpc(
                pb::controller_service_capability::Rpc { r#type: t as i32 },
            )),
        };
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse {
            capabilities: vec![rpc(Rpc::CreateDeleteVolume), rpc(Rpc::ExpandVolume)],
        }))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let Some(range) = req.capacity_range else {
            return Err(Status::invalid_argument("capacity_range is missing"));
        };
        let size = volume::capacity(Some(&range)).map_err(Status::out_of_range)?;
        if let Some(capability) = &req.volume_capability {
            volume::supported(capability).map_err(Status::invalid_argument)?;
        }
        let handle = handle_of(&req.volume_id)?;
        let claim = self.busy.claim(&handle.name)?;
        let (client_id, timeouts) = (self.client_id.clone(), self.timeouts);
        let (tls, pools) = (self.tls.clone(), self.pools.clone());
        let grown = blocking(move || {
            let _claim = claim;
            let volume = pools
                .volume_ref(&handle, tls.as_ref())
                .map_err(Status::unavailable)?;
            match volume {
                Some(volume)
                    if volume
                        .lookup(&client_id, timeouts)
                        .map_err(Status::unavailable)?
                        .is_some() =>
                {
                    volume
                        .grow(size, &client_id, timeouts)
                        .map_err(Status::unavailable)
                }
                _ => Err(Status::not_found(format!(
                    "no volume '{}' on its nodes",
                    handle.name
                ))),
            }
        })
        .await?;
        tracing::info!(volume = %req.volume_id, bytes = grown, "volume grown on its nodes");
        Ok(Response::new(pb::ControllerExpandVolumeResponse {
            capacity_bytes: i64::try_from(grown)
                .map_err(|_| Status::out_of_range("capacity too large"))?,
            // A host that has it mapped grows its device (and filesystem).
            node_expansion_required: true,
        }))
    }
}
