//! The Node service: a volume mapped once per host (`netblk map`, run
//! detached by [`Daemons`]), formatted and mounted at the staging path
//! (Mount) or left as the device (Block), bind-mounted into each pod's
//! target; grown online; every call idempotent. Every call checks all its
//! arguments (INVALID_ARGUMENT) before it looks anything up (its volume id
//! with [`handle_of`], which answers NOT_FOUND for an id not ours).

use std::path::{Path, PathBuf};

use netblk::net::Timeouts;
use tonic::{Request, Response, Status};

use crate::busy::Busy;
use crate::controller::blocking;
use crate::daemons::{Daemons, Mapped};
use crate::host::{self, Content};
use crate::pb;
use crate::pb::node_service_capability::rpc::Type as Rpc;
use crate::pb::volume_capability::AccessType;
use crate::pb::volume_capability::access_mode::Mode;
use crate::volume::{self, Context, VolumeHandle, handle_of};

/// The Node service.
#[derive(Debug, Clone)]
pub struct Node {
    pub node_id: String,
    pub daemons: Daemons,
    pub timeouts: Timeouts,
    pub busy: Busy,
}

/// What a staged volume is used as.
enum Access {
    Block,
    Mount { fs_type: String, flags: Vec<String> },
}

fn access_of(capability: Option<&pb::VolumeCapability>) -> Result<(Access, bool), Status> {
    let capability =
        capability.ok_or_else(|| Status::invalid_argument("volume_capability is missing"))?;
    volume::supported(capability).map_err(Status::invalid_argument)?;
    let readonly = capability
        .access_mode
        .as_ref()
        .is_some_and(|m| m.mode == Mode::SingleNodeReaderOnly as i32);
    let access = match &capability.access_type {
        Some(AccessType::Mount(m)) => Access::Mount {
            fs_type: if m.fs_type.is_empty() {
                "ext4".into()
            } else {
                m.fs_type.clone()
            },
            flags: m.mount_flags.clone(),
        },
        _ => Access::Block,
    };
    Ok((access, readonly))
}

fn need(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} is empty")))
    } else {
        Ok(())
    }
}

impl Node {
    /// The device serving `handle` on this host: mapped now if it is not
    /// (at the size its nodes hold), recovered if its daemon is gone.
    fn ensure_mapped(&self, handle: &VolumeHandle, context: &Context) -> Result<Mapped, Status> {
        if let Some(mapped) = self.daemons.find(handle) {
            if let Some(ids) = &context.volume_ids
                && !mapped.record.volume_ids.is_empty()
                && mapped.record.volume_ids != *ids
            {
                return Err(Status::failed_precondition(format!(
                    "{} serves volume '{}' with volume identities {:?}, not the {ids:?} it was created with: a node lost it; unmap it",
                    mapped.path(),
                    handle.name,
                    mapped.record.volume_ids
                )));
            }
            if !mapped.alive {
                self.daemons.recover(&mapped).map_err(Status::internal)?;
            }
            return Ok(mapped);
        }
        let not_found = || Status::not_found(format!("no volume '{}' on its nodes", handle.name));
        let volume = self
            .daemons
            .pools
            .volume_ref(handle, self.daemons.tls.as_ref())
            .map_err(Status::unavailable)?
            .ok_or_else(not_found)?;
        context
            .fits(volume.nodes.len())
            .map_err(Status::invalid_argument)?;
        let size = volume
            .lookup(&format!("netblk-csi-node-{}", self.node_id), self.timeouts)
            .map_err(Status::unavailable)?
            .ok_or_else(not_found)?;
        if context.volume_ids.is_none() {
            tracing::info!(
                volume = %handle.name,
                "the volume context pins no volume identities (made by an older controller): mapping with the identities the nodes hold now; it will not be formatted"
            );
        }
        self.daemons
            .map(handle, size, context)
            .map_err(Status::internal)
    }

    fn stage(&self, req: pb::NodeStageVolumeRequest) -> Result<(), Status> {
        need("staging_target_path", &req.staging_target_path)?;
        let (access, readonly) = access_of(req.volume_capability.as_ref())?;
        let context = Context::parse(&req.volume_context).map_err(Status::invalid_argument)?;
        let handle = handle_of(&req.volume_id)?;
        // A pool's volume's nodes are known once read from its record.
        if handle.pool.is_none() {
            context
                .fits(handle.nodes.len())
                .map_err(Status::invalid_argument)?;
        }
        let _claim = self.busy.claim(&handle.name)?;
        let mapped = self.ensure_mapped(&handle, &context)?;
        let dev = mapped.path();
        let Access::Mount { fs_type, flags } = access else {
            return Ok(());
        };
        let staging = Path::new(&req.staging_target_path);
        std::fs::create_dir_all(staging)
            .map_err(|e| Status::internal(format!("cannot create {}: {e}", staging.display())))?;
        if let Some(mount) = host::mounted_at(staging) {
            let ours = host::dev_number(&dev).is_ok_and(|n| n == mount.dev);
            if ours {
                return Ok(());
            }
            return Err(Status::already_exists(format!(
                "{} has {} mounted, not {dev}",
                staging.display(),
                mount.source
            )));
        }
        let content =
            host::probe(&dev).map_err(|e| Status::internal(format!("reading {dev}: {e}")))?;
        match content {
            Content::Blank if readonly => {
                return Err(Status::failed_precondition(format!(
                    "{dev} is blank: a read-only volume cannot be formatted"
                )));
            }
            Content::Blank => {
                // Formatted only if it never had a filesystem (`Context`).
                context.may_format().map_err(|why| {
                    Status::failed_precondition(format!(
                        "{dev} is blank, but {why}: not formatting it (make the filesystem by hand if it holds nothing)"
                    ))
                })?;
                tracing::info!(device = %dev, fs = %fs_type, "formatting a blank volume");
                host::mkfs(&fs_type, &dev).map_err(Status::internal)?;
            }
            found if found.fs_name() == fs_type => {}
            found => {
                return Err(Status::failed_precondition(format!(
                    "{dev} holds {}, not the {fs_type} asked for: not formatting over it",
                    found.fs_name()
                )));
            }
        }
        let mut flags = flags;
        if readonly {
            flags.push("ro".into());
        }
        host::mount_fs(&dev, staging, &fs_type, &flags).map_err(Status::internal)?;
        tracing::info!(device = %dev, staging = %staging.display(), fs = %fs_type, "staged");
        Ok(())
    }

    fn unstage(&self, req: pb::NodeUnstageVolumeRequest) -> Result<(), Status> {
        need("volume_id", &req.volume_id)?;
        need("staging_target_path", &req.staging_target_path)?;
        let Ok(handle) = VolumeHandle::parse(&req.volume_id) else {
            return Ok(());
        };
        let _claim = self.busy.claim(&handle.name)?;
        let staging = Path::new(&req.staging_target_path);
        host::unmount(staging).map_err(Status::internal)?;
        let Some(mapped) = self.daemons.find(&handle) else {
            return Ok(());
        };
        let dev = mapped.path();
        let uses = host::uses_of(&dev);
        if !uses.is_empty() {
            return Err(Status::failed_precondition(format!(
                "{dev} is still in use at {uses:?}: unpublish it first"
            )));
        }
        if !mapped.alive {
            self.daemons.recover(&mapped).map_err(Status::internal)?;
        }
        self.daemons.unmap(&mapped).map_err(Status::internal)?;
        tracing::info!(device = %dev, volume = %handle.name, "unstaged and unmapped");
        Ok(())
    }

    fn publish(&self, req: pb::NodePublishVolumeRequest) -> Result<(), Status> {
        need("staging_target_path", &req.staging_target_path)?;
        need("target_path", &req.target_path)?;
        let (access, readonly) = access_of(req.volume_capability.as_ref())?;
        let readonly = readonly || req.readonly;
        let handle = handle_of(&req.volume_id)?;
        let _claim = self.busy.claim(&handle.name)?;
        let mapped = self.daemons.find(&handle).ok_or_else(|| {
            Status::failed_precondition(format!("volume '{}' is not staged here", handle.name))
        })?;
        let target = PathBuf::from(&req.target_path);
        let source = match access {
            Access::Block => PathBuf::from(mapped.path()),
            Access::Mount { .. } => {
                let staging = PathBuf::from(&req.staging_target_path);
                if host::mounted_at(&staging).is_none() {
                    return Err(Status::failed_precondition(format!(
                        "volume '{}' is not staged at {}",
                        handle.name,
                        staging.display()
                    )));
                }
                staging
            }
        };
        if let Some(mount) = host::mounted_at(&target) {
            let source_dev = match std::fs::metadata(&source) {
                Ok(_) if source.starts_with("/dev") => host::dev_number(&mapped.path()).ok(),
                _ => host::mounted_at(&source).map(|m| m.dev),
            };
            let same = mount.dev == source_dev.unwrap_or((u32::MAX, 0))
                || (mount.fs_type == "devtmpfs"
                    && mount.root == mapped.path().trim_start_matches("/dev"));
            if same {
                return Ok(());
            }
            return Err(Status::already_exists(format!(
                "{} has another volume mounted",
                target.display()
            )));
        }
        let made = if source.starts_with("/dev") {
            if let Some(dir) = target.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Status::internal(e.to_string()))?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&target)
                .map(drop)
        } else {
            std::fs::create_dir_all(&target)
        };
        made.map_err(|e| Status::internal(format!("cannot create {}: {e}", target.display())))?;
        host::bind(&source, &target, readonly).map_err(Status::internal)?;
        tracing::info!(volume = %handle.name, target = %target.display(), readonly, "published");
        Ok(())
    }

    fn unpublish(&self, req: pb::NodeUnpublishVolumeRequest) -> Result<(), Status> {
        need("volume_id", &req.volume_id)?;
        need("target_path", &req.target_path)?;
        let target = Path::new(&req.target_path);
        host::unmount(target).map_err(Status::internal)?;
        // The target itself: kubelet expects it gone.
        let removed = match std::fs::metadata(target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(target),
            Ok(_) => std::fs::remove_file(target),
            Err(_) => Ok(()),
        };
        removed.map_err(|e| Status::internal(format!("cannot remove {}: {e}", target.display())))
    }

    fn stats(
        &self,
        req: pb::NodeGetVolumeStatsRequest,
    ) -> Result<pb::NodeGetVolumeStatsResponse, Status> {
        need("volume_path", &req.volume_path)?;
        let handle = handle_of(&req.volume_id)?;
        let path = Path::new(&req.volume_path);
        let meta = std::fs::metadata(path)
            .map_err(|e| Status::not_found(format!("{}: {e}", path.display())))?;
        let mapped = self.daemons.find(&handle).ok_or_else(|| {
            Status::not_found(format!("volume '{}' is not mapped here", handle.name))
        })?;
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let usage = if meta.is_dir() {
            let [bytes, inodes] = host::usage(path)
                .map_err(|e| Status::internal(format!("statvfs {}: {e}", path.display())))?;
            let usage = |(total, available, used): (u64, u64, u64),
                         unit: pb::volume_usage::Unit| {
                pb::VolumeUsage {
                    available: as_i64(available),
                    total: as_i64(total),
                    used: as_i64(used),
                    unit: unit as i32,
                }
            };
            vec![
                usage(bytes, pb::volume_usage::Unit::Bytes),
                usage(inodes, pb::volume_usage::Unit::Inodes),
            ]
        } else {
            let total = host::device_size(path)
                .map_err(|e| Status::internal(format!("{}: {e}", path.display())))?;
            vec![pb::VolumeUsage {
                available: 0,
                total: as_i64(total),
                used: 0,
                unit: pb::volume_usage::Unit::Bytes as i32,
            }]
        };
        let condition = if mapped.alive {
            pb::VolumeCondition {
                abnormal: false,
                message: format!("{} served by daemon {}", mapped.path(), mapped.record.pid),
            }
        } else {
            pb::VolumeCondition {
                abnormal: true,
                message: format!(
                    "{}: its daemon is gone; IO waits for recovery",
                    mapped.path()
                ),
            }
        };
        Ok(pb::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition),
        })
    }

    fn expand(&self, req: pb::NodeExpandVolumeRequest) -> Result<u64, Status> {
        need("volume_path", &req.volume_path)?;
        if let Some(capability) = &req.volume_capability {
            volume::supported(capability).map_err(Status::invalid_argument)?;
        }
        let asked = match &req.capacity_range {
            Some(range) => Some(volume::capacity(Some(range)).map_err(Status::out_of_range)?),
            None => None,
        };
        let handle = handle_of(&req.volume_id)?;
        let path = PathBuf::from(&req.volume_path);
        if !path.exists() {
            return Err(Status::not_found(format!(
                "{} does not exist",
                path.display()
            )));
        }
        let _claim = self.busy.claim(&handle.name)?;
        let mapped = self.daemons.find(&handle).ok_or_else(|| {
            Status::not_found(format!("volume '{}' is not mapped here", handle.name))
        })?;
        let dev = mapped.path();
        let wanted = asked.unwrap_or(mapped.record.size);
        let size = host::device_size(Path::new(&dev))
            .map_err(|e| Status::internal(format!("{dev}: {e}")))?;
        if wanted > size {
            self.daemons
                .resize(&mapped, wanted)
                .map_err(Status::failed_precondition)?;
        }
        // The filesystem mounted at the path (or the staging path) grows.
        let mount = host::mounted_at(&path).filter(|m| m.fs_type != "devtmpfs");
        if let Some(mount) = mount {
            let content =
                host::probe(&dev).map_err(|e| Status::internal(format!("reading {dev}: {e}")))?;
            host::grow_fs(content, &dev, &mount.point).map_err(Status::internal)?;
        }
        let now = host::device_size(Path::new(&dev))
            .map_err(|e| Status::internal(format!("{dev}: {e}")))?;
        tracing::info!(device = %dev, bytes = now, "expanded");
        Ok(now)
    }
}

macro_rules! off_runtime {
    ($self:ident, $request:ident, $method:ident) => {{
        let node = $self.clone();
        let req = $request.into_inner();
        blocking(move || node.$method(req)).await
    }};
}

#[tonic::async_trait]
impl pb::node_server::Node for Node {
    async fn node_stage_volume(
        &self,
        request: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        off_runtime!(self, request, stage).map(|()| Response::new(pb::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        off_runtime!(self, request, unstage)
            .map(|()| Response::new(pb::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        off_runtime!(self, request, publish)
            .map(|()| Response::new(pb::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        off_runtime!(self, request, unpublish)
            .map(|()| Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        off_runtime!(self, request, stats).map(Response::new)
    }

    async fn node_expand_volume(
        &self,
        request: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        let bytes = off_runtime!(self, request, expand)?;
        Ok(Response::new(pb::NodeExpandVolumeResponse {
            capacity_bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
        }))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        let rpc = |t: Rpc| pb::NodeServiceCapability {
            r#type: Some(pb::node_service_capability::Type::Rpc(
                pb::node_service_capability::Rpc { r#type: t as i32 },
            )),
        };
        Ok(Response::new(pb::NodeGetCapabilitiesResponse {
            capabilities: vec![
                rpc(Rpc::StageUnstageVolume),
                rpc(Rpc::GetVolumeStats),
                rpc(Rpc::ExpandVolume),
                rpc(Rpc::VolumeCondition),
            ],
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}
