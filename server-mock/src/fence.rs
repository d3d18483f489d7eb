//! Session fencing: a client's newer session (its fencing epoch) is
//! accepted only once nothing from its older sessions can still be applied.
//!
//! A client (one client process serving one device: its `client_id`) may
//! hold several connections to this node at once, one per queue, all at the
//! same session. When one of them ends, the client moves to a higher
//! session, and requests it sent on the older connections may still sit in
//! this node (read but not yet executed: in the delay queue, held by a
//! stall, or mid-execution). The client resends them on a new connection,
//! and may then write the same range again through any of its queues; if
//! the stale copy were applied after that, it would overwrite newer data.
//! So a handshake with session `S` for `(volume, client)` first fences
//! every connection of that client with a session below `S`: requests not
//! yet executed are discarded (never applied, never answered), and the
//! handshake waits until the ones executing right now are done.
//! Connections of the same session are admitted side by side. A handshake
//! with a session below the newest one seen is refused as stale.
//!
//! A client is keyed by who it is ([`Peer`]: the identity its certificate
//! names, or anonymous without TLS) and its `client_id`, so a client with
//! another certificate can never fence, or lock out, this one's sessions.
//! And a session may move forward by at most [`MAX_SESSION_STEP`] above
//! the newest one seen for a client this node knows, so that no handshake
//! can push a client's session to the end of the range and leave every
//! later one stale.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use tracing::info;

use crate::peer::Peer;

/// How far a handshake may move a known client's session forward. A
/// recovered daemon jumps to the next `generation << 32` (at most 2^32 up);
/// a tool's session (`netblk::net::clock_session`) moves by the
/// milliseconds since its last use, and 2^40 ms is 34 years. Walking a
/// session from 0 to the end of the range takes 2^24 handshakes.
pub const MAX_SESSION_STEP: u64 = 1 << 40;

/// One data connection as fencing sees it.
pub struct Member {
    pub session: u64,
    fenced: AtomicBool,
    /// Requests taken off the socket and neither discarded nor answered.
    busy: AtomicUsize,
    discarded: AtomicU64,
    stream: TcpStream,
}

impl Member {
    /// True once a newer session of the same client took over: nothing more
    /// from this connection may be applied.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// A request was taken off the socket.
    pub fn begin(&self) {
        self.busy.fetch_add(1, Ordering::SeqCst);
    }

    /// A request was answered, or discarded (`applied` false).
    pub fn end(&self, applied: bool) {
        if !applied {
            self.discarded.fetch_add(1, Ordering::Relaxed);
        }
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A client of a volume: who it is, and its `client_id`.
type Key = (String, Peer, String);

/// A client of a volume as a handshake names it: the volume, who the
/// client is, and its `client_id`.
#[derive(Debug, Clone, Copy)]
pub struct ClientOf<'a> {
    pub volume: &'a str,
    pub peer: &'a Peer,
    pub client_id: &'a str,
}

impl ClientOf<'_> {
    fn key(&self) -> Key {
        (
            self.volume.to_owned(),
            self.peer.clone(),
            self.client_id.to_owned(),
        )
    }
}

struct Client {
    newest: u64,
    members: Vec<Arc<Member>>,
}

/// Every client's sessions on this node.
#[derive(Default)]
pub struct Sessions {
    clients: Mutex<HashMap<Key, Client>>,
    /// Older sessions fenced so far.
    fenced: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Sessions {
    /// Older sessions fenced by newer ones so far.
    pub fn fenced(&self) -> u64 {
        self.fenced.load(Ordering::Relaxed)
    }

    /// Admits a connection of `client` with `session` (refused if stale, or too far above the newest session
    /// seen: [`MAX_SESSION_STEP`]): fences the client's older connections and waits (at most `timeout`) until
    /// none of them is executing anything. `wake` is called after fencing so
    /// that requests held by a stall or a delay get to see it.
    pub fn admit(
        &self,
        client: ClientOf<'_>,
        session: u64,
        stream: &TcpStream,
        timeout: Duration,
        wake: impl Fn(),
    ) -> Result<Arc<Member>, String> {
        let member = Arc::new(Member {
            session,
            fenced: AtomicBool::new(false),
            busy: AtomicUsize::new(0),
            discarded: AtomicU64::new(0),
            stream: stream
                .try_clone()
                .map_err(|err| format!("cannot track the connection: {err}"))?,
        });
        let older = {
            let mut clients = lock(&self.clients);
            let key = client.key();
            if let Some(known) = clients.get(&key) {
                check_step(known.newest, session, client)?;
            }
            let client = clients.entry(key).or_insert(Client {
                newest: session,
                members: Vec::new(),
            });
            client.newest = session;
            // Members whose connection ended and who hold nothing are gone.
            client
                .members
                .retain(|m| !(m.is_fenced() && m.busy.load(Ordering::SeqCst) == 0));
            let (older, same): (Vec<_>, Vec<_>) = std::mem::take(&mut client.members)
                .into_iter()
                .partition(|m| m.session < session);
            client.members = same;
            client.members.push(Arc::clone(&member));
            older
        };
        for old in &older {
            old.fenced.store(true, Ordering::SeqCst);
            // Its reader stops; replies it would still send go nowhere.
            let _ = old.stream.shutdown(Shutdown::Both);
        }
        wake();
        let deadline = Instant::now() + timeout;
        for old in &older {
            while old.busy.load(Ordering::SeqCst) > 0 {
                if Instant::now() >= deadline {
                    member.fenced.store(true, Ordering::SeqCst);
                    return Err(format!(
                        "session {} of {}, client id '{}', still has requests executing after {timeout:?}; try again",
                        old.session, client.peer, client.client_id
                    ));
                }
                thread::sleep(Duration::from_millis(1));
            }
            info!(
                identity = %client.peer,
                client = client.client_id,
                volume = client.volume,
                old = old.session,
                new = session,
                discarded = old.discarded.load(Ordering::Relaxed),
                "older session fenced"
            );
            self.fenced.fetch_add(1, Ordering::Relaxed);
        }
        Ok(member)
    }

    /// The connection of `member` ended: it takes nothing more.
    pub fn leave(&self, client: ClientOf<'_>, member: &Arc<Member>) {
        member.fenced.store(true, Ordering::SeqCst);
        let mut clients = lock(&self.clients);
        if let Some(client) = clients.get_mut(&client.key()) {
            client
                .members
                .retain(|m| !Arc::ptr_eq(m, member) || m.busy.load(Ordering::SeqCst) > 0);
        }
    }
}

/// Whether a client whose newest session is `newest` may present
/// `session`: not below it (stale), and at most [`MAX_SESSION_STEP`] above.
fn check_step(newest: u64, session: u64, client: ClientOf<'_>) -> Result<(), String> {
    let ClientOf {
        peer, client_id, ..
    } = client;
    if session < newest {
        return Err(format!(
            "session {session} of {peer}, client id '{client_id}', is stale: session {newest} is newer"
        ));
    }
    if session - newest > MAX_SESSION_STEP {
        return Err(format!(
            "session {session} of {peer}, client id '{client_id}', is more than {MAX_SESSION_STEP} above its newest session {newest}: refused (a session moves forward by at most that much per handshake)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_moves_forward_by_a_bounded_step() {
        let peer = Peer::Certified("host-a".into());
        let c = ClientOf {
            volume: "v",
            peer: &peer,
            client_id: "c",
        };
        assert!(check_step(5, 5, c).is_ok());
        assert!(check_step(5, 5 + MAX_SESSION_STEP, c).is_ok());
        // A recovered daemon's jump to the next generation.
        assert!(check_step((3 << 32) + 17, 4 << 32, c).is_ok());
        let far = check_step(5, u64::MAX, c).expect_err("too far");
        assert!(far.contains("more than"), "{far}");
        let stale = check_step(5, 4, c).expect_err("stale");
        assert!(
            stale.contains("stale") && stale.contains("client 'host-a'"),
            "{stale}"
        );
    }
}
