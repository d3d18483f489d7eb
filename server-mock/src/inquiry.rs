//! Inquiries (docs/protocol.md section 13): what this node holds, asked on a
//! connection of its own without a layout. One answer, then the connection
//! closes; nothing is created or changed and no session is admitted.

use netblk_protocol::pb::{self, Status, inquiry::What};
use netblk_protocol::{PROTOCOL_REVISION, PROTOCOL_VERSION};

use crate::node::{Broken, Node};
use crate::peer::Peer;
use crate::policy;
use crate::store::VolumeMeta;

/// The reply to `inquiry` from `peer`.
pub fn answer(node: &Node, inquiry: &pb::Inquiry, peer: &Peer) -> pb::InquiryReply {
    let mut reply = pb::InquiryReply {
        status: Status::Ok as i32,
        protocol_version: u32::from(PROTOCOL_VERSION),
        revision: PROTOCOL_REVISION,
        node_id: node.config.node_id.clone(),
        ..Default::default()
    };
    match volumes(node, inquiry, peer) {
        Ok(volumes) => reply.volumes = volumes,
        Err((status, why)) => {
            reply.status = status as i32;
            reply.message = why;
        }
    }
    reply
}

fn volumes(
    node: &Node,
    inquiry: &pb::Inquiry,
    peer: &Peer,
) -> Result<Vec<pb::VolumeDescription>, (Status, String)> {
    if inquiry.protocol_version != u32::from(PROTOCOL_VERSION) {
        return Err((
            Status::Refused,
            format!(
                "protocol version {} is not supported; this node speaks {PROTOCOL_VERSION}",
                inquiry.protocol_version
            ),
        ));
    }
    if inquiry.revision != PROTOCOL_REVISION {
        return Err((
            Status::Refused,
            format!(
                "the client speaks protocol revision {}; this node speaks revision {PROTOCOL_REVISION}",
                inquiry.revision
            ),
        ));
    }
    match &inquiry.what {
        Some(What::Describe(describe)) => {
            let name = &describe.volume;
            netblk_protocol::geometry::check_volume_name(name)
                .map_err(|why| (Status::Invalid, why))?;
            // Counted and logged like any refusal: this client named it.
            node.authorize(peer, name, policy::Op::Open)
                .map_err(|why| (Status::Refused, why))?;
            match node.describe(name) {
                Err((Status::NotFound, _)) if node.breaks(Broken::DescribeCreates) => {
                    let meta = VolumeMeta {
                        volume_size: 1 << 20,
                        stripe_unit: 64 << 10,
                        node_count: 1,
                        node_index: 0,
                        replicas: 1,
                        replica_index: 0,
                    };
                    node.volume(name, meta, false)
                        .map_err(|why| (Status::IoError, why))?;
                    Ok(vec![node.describe(name)?])
                }
                described => Ok(vec![described?]),
            }
        }
        Some(What::List(_)) => {
            let mut volumes = Vec::new();
            for name in node.volume_names().map_err(|why| (Status::IoError, why))? {
                if !node.may(peer, &name, policy::Op::Open) {
                    continue;
                }
                match node.describe(&name) {
                    Ok(described) => volumes.push(described),
                    // Deleted between the listing and now.
                    Err((Status::NotFound, _)) => {}
                    Err(err) => return Err(err),
                }
            }
            Ok(volumes)
        }
        None => Err((
            Status::Invalid,
            "an inquiry that asks nothing (neither list nor describe)".into(),
        )),
    }
}
