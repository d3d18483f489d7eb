//! The kit's side of the wire: one blocking connection to the node (plain
//! or inside TLS), frames written and read whole, raw bytes for the
//! framing checks, and the admin listener's requests.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use netblk_protocol::pb::{self, header::Kind, request::Op};
use netblk_protocol::{Limits, PREAMBLE_LEN, Preamble, decode_header, encode_frame_as};
use prost::Message;

/// Where the node is and how to reach it.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// For each connect and each wait for a reply.
    pub timeout: Duration,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// What came back when a frame was awaited.
#[derive(Debug)]
pub enum Recv {
    Frame(Box<pb::Header>, Vec<u8>),
    /// The node closed the connection (end of stream or reset).
    Closed,
    /// Nothing within the timeout.
    Silent,
}

/// One connection to the node.
pub struct Conn {
    stream: Stream,
    /// Frames carry header digests (the handshake agreed on data digests).
    pub digest: bool,
    next_id: u64,
    /// The node's largest payload, once a handshake said it.
    pub max_io: u32,
}

impl Target {
    /// A new connection (TLS first, where asked for).
    pub fn connect(&self) -> Result<Conn, String> {
        let tcp = TcpStream::connect_timeout(&self.addr, self.timeout)
            .map_err(|e| format!("cannot connect to {}: {e}", self.addr))?;
        tcp.set_read_timeout(Some(self.timeout))
            .and_then(|()| tcp.set_write_timeout(Some(self.timeout)))
            .and_then(|()| tcp.set_nodelay(true))
            .map_err(|e| format!("socket options: {e}"))?;
        let stream = match &self.tls {
            None => Stream::Plain(tcp),
            Some(config) => {
                let conn = netblk_tls::handshake::client(
                    &tcp,
                    Arc::clone(config),
                    netblk_tls::config::server_name(self.addr),
                )?;
                Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)))
            }
        };
        Ok(Conn {
            stream,
            digest: false,
            next_id: 1,
            max_io: netblk_protocol::DEFAULT_MAX_PAYLOAD_LEN,
        })
    }
}

/// A frame's bytes built by hand (for frames the codec refuses to make):
/// preamble fields as given, then `header` and `payload`.
pub fn raw_frame(version: u16, flags: u16, header: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PREAMBLE_LEN + header.len() + payload.len());
    out.extend_from_slice(&netblk_protocol::MAGIC);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&(header.len() as u32).to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(payload);
    out
}

impl Conn {
    /// Sends bytes as they are.
    pub fn raw(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .and_then(|()| self.stream.flush())
            .map_err(|e| format!("send: {e}"))
    }

    /// Sends one frame (with a header digest once the handshake agreed on
    /// data digests).
    pub fn frame(&mut self, header: &pb::Header, payload: &[u8]) -> Result<(), String> {
        let mut bytes = Vec::with_capacity(64 + payload.len());
        encode_frame_as(header, payload, self.digest, &mut bytes).map_err(|e| e.to_string())?;
        self.raw(&bytes)
    }

    /// The next frame, or that the node closed the connection or said
    /// nothing in time. A frame that does not decode is an error.
    pub fn recv(&mut self) -> Result<Recv, String> {
        let mut preamble = [0u8; PREAMBLE_LEN];
        match self.stream.read_exact(&mut preamble) {
            Ok(()) => {}
            Err(e) => return closed_or(e),
        }
        let limits = Limits {
            header_digest: self.digest,
            max_payload_len: u32::MAX,
        };
        let preamble = Preamble::parse(&preamble, &limits)
            .map_err(|e| format!("the node sent a bad preamble: {e}"))?;
        let mut header = vec![0u8; preamble.header_len as usize];
        self.stream
            .read_exact(&mut header)
            .map_err(|e| format!("the node's frame was cut short: {e}"))?;
        let header = decode_header(&preamble, &header)
            .map_err(|e| format!("the node sent a bad header: {e}"))?;
        let mut payload = vec![0u8; preamble.payload_len as usize];
        self.stream
            .read_exact(&mut payload)
            .map_err(|e| format!("the node's payload was cut short: {e}"))?;
        Ok(Recv::Frame(Box::new(header), payload))
    }

    /// Sends `hs` and returns the node's reply (accepted or not).
    pub fn handshake(&mut self, hs: pb::Handshake) -> Result<pb::HandshakeReply, String> {
        let digest = hs.data_digest == pb::DataDigest::Crc32c as i32;
        self.frame(
            &pb::Header {
                kind: Some(Kind::Handshake(hs)),
            },
            &[],
        )?;
        match self.recv()? {
            Recv::Frame(header, _) => match header.kind {
                Some(Kind::HandshakeReply(reply)) => {
                    let ok = reply.status == pb::Status::Ok as i32;
                    self.digest =
                        ok && digest && reply.data_digest == pb::DataDigest::Crc32c as i32;
                    if ok {
                        self.max_io = reply.max_io_size;
                    }
                    Ok(reply)
                }
                other => Err(format!("a handshake answered with {other:?}")),
            },
            Recv::Closed => Err("the node closed the connection instead of answering".into()),
            Recv::Silent => Err("no handshake reply in time".into()),
        }
    }

    /// Sends one request without waiting; returns its id.
    pub fn send(&mut self, op: Op, payload: &[u8]) -> Result<u64, String> {
        let id = self.next_id;
        self.next_id += 1;
        self.frame(&pb::Header::request(id, op), payload)?;
        Ok(id)
    }

    /// The next reply, whichever request it answers.
    pub fn reply(&mut self) -> Result<(pb::Reply, Vec<u8>), String> {
        match self.recv()? {
            Recv::Frame(header, payload) => match header.kind {
                Some(Kind::Reply(reply)) => Ok((reply, payload)),
                other => Err(format!("expected a reply, got {other:?}")),
            },
            Recv::Closed => Err("the node closed the connection".into()),
            Recv::Silent => Err("no reply in time".into()),
        }
    }

    /// One request and its reply.
    pub fn call(&mut self, op: Op, payload: &[u8]) -> Result<(pb::Reply, Vec<u8>), String> {
        let id = self.send(op, payload)?;
        let (reply, data) = self.reply()?;
        if reply.id != id {
            return Err(format!(
                "a reply for request {} while only {id} was outstanding",
                reply.id
            ));
        }
        Ok((reply, data))
    }

    /// Ok if the node closes the connection without sending a frame.
    pub fn closed_without_reply(&mut self) -> Result<(), String> {
        match self.recv() {
            Ok(Recv::Closed) => Ok(()),
            Ok(Recv::Frame(header, _)) => Err(format!("the node answered: {header:?}")),
            Ok(Recv::Silent) => Err("the node kept the connection open".into()),
            // Bytes that do not make a frame, then the end: not a reply.
            Err(_) => Ok(()),
        }
    }

    /// Shuts the connection down both ways.
    pub fn close(&self) {
        let _ = self.stream.tcp().shutdown(Shutdown::Both);
    }
}

fn closed_or(e: io::Error) -> Result<Recv, String> {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => Ok(Recv::Closed),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Ok(Recv::Silent),
        _ => Err(format!("receive: {e}")),
    }
}

/// Replaces the mock node's faults through its admin listener (`addr`).
pub fn set_faults(addr: SocketAddr, faults: pb::Faults, timeout: Duration) -> Result<(), String> {
    let tcp = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to the admin listener {addr}: {e}"))?;
    tcp.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut conn = Conn {
        stream: Stream::Plain(tcp),
        digest: false,
        next_id: 1,
        max_io: 0,
    };
    conn.frame(
        &pb::Header {
            kind: Some(Kind::Admin(pb::Admin {
                cmd: Some(pb::admin::Cmd::SetFaults(faults)),
            })),
        },
        &[],
    )?;
    match conn.recv()? {
        Recv::Frame(header, _) => match header.kind {
            Some(Kind::AdminReply(reply)) if reply.status == pb::Status::Ok as i32 => Ok(()),
            other => Err(format!("the admin listener answered {other:?}")),
        },
        other => Err(format!("the admin listener answered {other:?}")),
    }
}

/// A protobuf encoding of `message` with an extra field the schema does
/// not have (number 1000, a varint): what a newer peer might send.
pub fn with_unknown_field<M: Message>(message: &M) -> Vec<u8> {
    let mut bytes = message.encode_to_vec();
    // Field 1000, wire type 0 (varint): key (1000 << 3) = 8000, then 1.
    prost::encoding::encode_varint(8000, &mut bytes);
    prost::encoding::encode_varint(1, &mut bytes);
    bytes
}
