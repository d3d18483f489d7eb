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
//! So a handshake with session `S` for `(volume, client_id)` first fences
//! every connection of that client with a session below `S`: requests not
//! yet executed are discarded (never applied, never answered), and the
//! handshake waits until the ones executing right now are done.
//! Connections of the same session are admitted side by side. A handshake
//! with a session below the newest one seen is refused as stale.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use tracing::info;

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

struct Client {
    newest: u64,
    members: Vec<Arc<Member>>,
}

/// Every client's sessions on this node.
#[derive(Default)]
pub struct Sessions {
    clients: Mutex<HashMap<(String, String), Client>>,
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

    /// Admits a connection of `client_id` on `volume` with `session`: fences
    /// the client's older connections and waits (at most `timeout`) until
    /// none of them is executing anything. `wake` is called after fencing so
    /// that requests held by a stall or a delay get to see it.
    pub fn admit(
        &self,
        volume: &str,
        client_id: &str,
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
            let client = clients
                .entry((volume.to_owned(), client_id.to_owned()))
                .or_insert(Client {
                    newest: 0,
                    members: Vec::new(),
                });
            if session < client.newest {
                return Err(format!(
                    "session {session} of client '{client_id}' is stale: session {} is newer",
                    client.newest
                ));
            }
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
                        "session {} of client '{client_id}' still has requests executing after {timeout:?}; try again",
                        old.session
                    ));
                }
                thread::sleep(Duration::from_millis(1));
            }
            info!(
                client = client_id,
                volume,
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
    pub fn leave(&self, volume: &str, client_id: &str, member: &Arc<Member>) {
        member.fenced.store(true, Ordering::SeqCst);
        let mut clients = lock(&self.clients);
        let key = (volume.to_owned(), client_id.to_owned());
        if let Some(client) = clients.get_mut(&key) {
            client
                .members
                .retain(|m| !Arc::ptr_eq(m, member) || m.busy.load(Ordering::SeqCst) > 0);
        }
    }
}
