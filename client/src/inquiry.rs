//! Inquiries (docs/protocol.md section 13): asking a node what it holds
//! without presenting a layout, over a short connection of its own.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use netblk_protocol::pb::{self, header::Kind, inquiry::What};
use netblk_protocol::{PROTOCOL_REVISION, PROTOCOL_VERSION, encode_head};

use crate::net::{ClientTls, read_head};

/// Where to ask and how: TLS (None: plaintext), and how long connecting
/// and the answer may take each.
#[derive(Clone, Copy)]
pub struct Asker<'a> {
    pub tls: Option<&'a ClientTls>,
    pub timeout: Duration,
}

impl Asker<'_> {
    /// The volume `name` as the node at `addr` holds it (None: it has
    /// none of that name).
    pub fn describe(
        &self,
        addr: SocketAddr,
        name: &str,
    ) -> Result<Option<pb::VolumeDescription>, String> {
        let what = What::Describe(pb::DescribeVolume {
            volume: name.to_owned(),
        });
        let reply = self.ask(addr, what)?;
        match pb::Status::try_from(reply.status) {
            Ok(pb::Status::NotFound) => Ok(None),
            Ok(pb::Status::Ok) => match <[pb::VolumeDescription; 1]>::try_from(reply.volumes) {
                Ok([described]) if described.volume == name => Ok(Some(described)),
                Ok([other]) => Err(format!(
                    "{addr} described volume '{}' when asked for '{name}'",
                    other.volume
                )),
                Err(all) => Err(format!(
                    "{addr} described {} volumes when asked for one",
                    all.len()
                )),
            },
            _ => Err(format!(
                "{addr} did not describe '{name}': {}",
                reply.message
            )),
        }
    }

    /// Every volume the node at `addr` holds (that this client may open).
    pub fn list(&self, addr: SocketAddr) -> Result<Vec<pb::VolumeDescription>, String> {
        let reply = self.ask(addr, What::List(pb::ListVolumes {}))?;
        if reply.status != pb::Status::Ok as i32 {
            return Err(format!(
                "{addr} did not list its volumes: {}",
                reply.message
            ));
        }
        Ok(reply.volumes)
    }

    fn ask(&self, addr: SocketAddr, what: What) -> Result<pb::InquiryReply, String> {
        let stream = TcpStream::connect_timeout(&addr, self.timeout)
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .and_then(|()| stream.set_nodelay(true))
            .map_err(|e| format!("{addr}: {e}"))?;
        let inquiry = pb::Header {
            kind: Some(Kind::Inquiry(pb::Inquiry {
                protocol_version: u32::from(PROTOCOL_VERSION),
                revision: PROTOCOL_REVISION,
                what: Some(what),
            })),
        };
        let mut bytes = Vec::new();
        encode_head(&inquiry, 0, &mut bytes).map_err(|e| e.to_string())?;
        let answered = match self.tls {
            Some(config) => {
                let mut conn = netblk_tls::handshake::client(
                    &stream,
                    config.get(),
                    netblk_tls::config::server_name(addr),
                )
                .map_err(|why| format!("{addr}: TLS: {why}"))?;
                let mut sock = &stream;
                let mut io = netblk_tls::rustls::Stream::new(&mut conn, &mut sock);
                io.write_all(&bytes)
                    .map_err(|e| e.to_string())
                    .and_then(|()| read_head(&mut io))
            }
            None => (&stream)
                .write_all(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|()| read_head(&stream)),
        };
        match answered {
            Ok((
                pb::Header {
                    kind: Some(Kind::InquiryReply(reply)),
                },
                0,
            )) => {
                if reply.revision != PROTOCOL_REVISION {
                    return Err(format!(
                        "{addr} speaks protocol revision {}; this client needs {PROTOCOL_REVISION}: upgrade the node ({})",
                        reply.revision, reply.message
                    ));
                }
                Ok(reply)
            }
            Ok((other, len)) => Err(format!(
                "{addr} answered an inquiry with {other:?} and {len} payload bytes"
            )),
            Err(why) => Err(format!(
                "{addr} did not answer an inquiry: {why} (a node from before inquiries closes the connection; one with TLS closes a plaintext client)"
            )),
        }
    }
}
