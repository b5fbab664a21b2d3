//! QUIC's TLS sessions, kept by the proxy and across its restarts, so that a fleet of QUIC agents
//! returning to a restarted proxy resumes instead of running full handshakes.
//!
//! TLS over TCP takes sealed session tickets ([`crate::tickets`]), but such a ticket carries the
//! node's certificate chain, and offered back over QUIC it makes the ClientHello too large for one
//! Initial datagram (measured: more datagrams lost and a slower return than without). Over QUIC
//! the proxy gives a 32-byte random id instead (rustls' stateful TLS 1.3 tickets) and keeps the
//! session itself here:
//! - single use: a resumption takes its session out, and the new session it makes comes with a
//!   new id (one taken in the seconds before a crash is still in the file after it: QUIC takes
//!   no 0-RTT, whose data a second use could replay);
//! - only for nodes: both QUIC ports require a node certificate in the handshake;
//! - bounded ([`CAPACITY`] sessions in at most `BUDGET` bytes, none over `MAX_SESSION`; the
//!   oldest go first, also across a restart), each living one to two epochs ([`EPOCH`]) like the
//!   sealed tickets (the ticket's own lifetime, which rustls sets to a day, is only the client's
//!   upper bound);
//! - written every few seconds, when it changed, to `DATA_DIR/quic-sessions` (0600), sealed with
//!   the ticket keys: so a restarted proxy reads them only if it is the same proxy (its QUIC
//!   secret) under the same host CAs; a change of the host CAs forgets them all at once.
//!
//! Sessions made in the last seconds before a crash are lost: their agents run a full handshake.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burrow_daemon::fsutil::write_private_atomic;
use burrow_daemon::unix_now;
use prometheus_client::metrics::counter::Counter;
use rustls::server::StoresServerSessions;
use tokio_util::sync::CancellationToken;

use crate::tickets::{EPOCH, Tickets};

/// At most this many sessions are kept (about 0.7 KB each: the node's chain is most of one)...
pub const CAPACITY: usize = 65_536;
/// ...in at most this many bytes of sessions.
const BUDGET: usize = 64 << 20;
/// A larger session is not kept (its node gets no ticket): the client chooses the chain it
/// presents, and with it the session's size.
const MAX_SESSION: usize = 4096;
/// How often a changed store is written.
const SAVE_EVERY: Duration = Duration::from_secs(5);
const ID_LEN: usize = 32;
const MAGIC: &[u8] = b"burrow-quic-sessions-1\n";

type Id = [u8; ID_LEN];

pub struct Sessions {
    inner: Mutex<Inner>,
    tickets: Arc<Tickets>,
    path: PathBuf,
    capacity: usize,
    /// Sessions handed to TLS for a resumption.
    resumed: Counter,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Id, Session>,
    /// Ids in the order they were put, for eviction; may hold ids already taken.
    order: VecDeque<Id>,
    /// The sessions' bytes.
    bytes: usize,
    changed: bool,
    /// Moves on when every session is forgotten: a save begun before does not write.
    generation: u64,
}

struct Session {
    epoch: u64,
    value: Arc<[u8]>,
}

impl Inner {
    fn insert(&mut self, id: Id, session: Session) {
        self.bytes += session.value.len();
        self.order.push_back(id);
        if let Some(old) = self.map.insert(id, session) {
            self.bytes -= old.value.len();
        }
    }

    fn remove(&mut self, id: &Id) -> Option<Session> {
        let session = self.map.remove(id)?;
        self.bytes -= session.value.len();
        Some(session)
    }
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Sessions {
    /// The sessions saved at `path` by this proxy's last run, if its ticket keys read them.
    /// `resumed` counts the sessions handed to TLS for a resumption.
    pub fn load(path: PathBuf, tickets: Arc<Tickets>, resumed: Counter) -> Self {
        Self::with_capacity(path, tickets, CAPACITY, resumed)
    }

    fn with_capacity(
        path: PathBuf,
        tickets: Arc<Tickets>,
        capacity: usize,
        resumed: Counter,
    ) -> Self {
        let sessions = Self {
            inner: Mutex::new(Inner::default()),
            tickets,
            path,
            capacity,
            resumed,
        };
        sessions.remove_leftovers();
        match std::fs::read(&sessions.path) {
            Ok(sealed) => {
                let now = unix_now() / EPOCH;
                let read = sessions
                    .tickets
                    .open(&sealed, now)
                    .and_then(|plain| sessions.restore(&plain, now));
                match read {
                    Some(n) => {
                        tracing::info!(sessions = n, "read the QUIC sessions of the last run")
                    }
                    None => tracing::info!(
                        path = %sessions.path.display(),
                        "the QUIC sessions of the last run are not this proxy's under these host CAs, or too old; agents will run full handshakes"
                    ),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %sessions.path.display(), error = %e, "cannot read the QUIC sessions of the last run")
            }
        }
        sessions
    }

    /// How many sessions are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// The host CAs change: no session made before is resumed. Called before the ticket keys
    /// are bound to the new CAs, so that a save under way writes nothing under the new keys.
    pub fn forget(&self) {
        let mut inner = self.lock();
        inner.map.clear();
        inner.order.clear();
        inner.bytes = 0;
        inner.changed = true;
        inner.generation += 1;
    }

    /// Writes the sessions if they changed since the last write, sealed with the current keys,
    /// oldest first. Only pointers are copied under the lock handshakes take.
    pub fn save(&self) -> std::io::Result<()> {
        let now = unix_now() / EPOCH;
        let (generation, sessions) = {
            let mut inner = self.lock();
            if !inner.changed {
                return Ok(());
            }
            inner.changed = false;
            let stale: Vec<Id> = (inner.map.iter())
                .filter(|(_, s)| !fresh(s.epoch, now))
                .map(|(id, _)| *id)
                .collect();
            for id in &stale {
                inner.remove(id);
            }
            let sessions: Vec<(Id, u64, Arc<[u8]>)> = (inner.order.iter())
                .filter_map(|id| inner.map.get(id).map(|s| (*id, s.epoch, s.value.clone())))
                .collect();
            (inner.generation, sessions)
        };
        let Some(sealed) = self.tickets.seal(&encode(&sessions), now) else {
            self.lock().changed = true;
            return Err(std::io::Error::other("cannot seal the QUIC sessions"));
        };
        if self.lock().generation != generation {
            // Forgotten since (new host CAs): the next save writes what is left.
            return Ok(());
        }
        write_private_atomic(&self.path, &sealed).inspect_err(|_| self.lock().changed = true)
    }

    /// Temporary files of writes a crash cut short.
    fn remove_leftovers(&self) {
        let (Some(dir), Some(name)) = (self.path.parent(), self.path.file_name()) else {
            return;
        };
        let prefix = format!(".{}.tmp-", name.to_string_lossy());
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Takes the sessions of a sealed file's `plain` text; `None` if any record is malformed.
    fn restore(&self, plain: &[u8], now: u64) -> Option<usize> {
        let mut rest = plain.strip_prefix(MAGIC)?;
        let mut read = Vec::new();
        while !rest.is_empty() {
            let (epoch, r) = rest.split_first_chunk::<8>()?;
            let (id, r) = r.split_first_chunk::<ID_LEN>()?;
            let (len, r) = r.split_first_chunk::<4>()?;
            let len = u32::from_be_bytes(*len) as usize;
            if r.len() < len {
                return None;
            }
            let (value, r) = r.split_at(len);
            rest = r;
            let epoch = u64::from_be_bytes(*epoch);
            if fresh(epoch, now) {
                read.push((*id, epoch, value));
            }
        }
        let mut inner = self.lock();
        // The file lists the oldest first: the newest are kept.
        let skip = read.len().saturating_sub(self.capacity);
        for (id, epoch, value) in read.into_iter().skip(skip) {
            if value.len() > MAX_SESSION || inner.bytes + value.len() > BUDGET {
                continue;
            }
            let value = value.into();
            inner.insert(id, Session { epoch, value });
        }
        Some(inner.map.len())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StoresServerSessions for Sessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let Ok(id) = Id::try_from(key.as_slice()) else {
            return false;
        };
        if value.len() > MAX_SESSION {
            return false;
        }
        let epoch = unix_now() / EPOCH;
        let mut inner = self.lock();
        while inner.map.len() >= self.capacity || inner.bytes + value.len() > BUDGET {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            inner.remove(&oldest);
        }
        // Ids taken since they were put are left in `order`; drop them before it outgrows the map.
        if inner.order.len() > 2 * inner.map.len() + 1024 {
            let Inner { map, order, .. } = &mut *inner;
            order.retain(|id| map.contains_key(id));
        }
        let value = value.into();
        inner.insert(id, Session { epoch, value });
        inner.changed = true;
        true
    }

    /// Only TLS 1.2 reads a session without taking it; QUIC is TLS 1.3 only.
    fn get(&self, _key: &[u8]) -> Option<Vec<u8>> {
        None
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let id = Id::try_from(key).ok()?;
        let mut inner = self.lock();
        let session = inner.remove(&id)?;
        inner.changed = true;
        drop(inner);
        if !fresh(session.epoch, unix_now() / EPOCH) {
            return None;
        }
        self.resumed.inc();
        Some(session.value.to_vec())
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// A session made in `epoch` is resumed in that epoch and the next.
fn fresh(epoch: u64, now: u64) -> bool {
    epoch == now || now.checked_sub(1) == Some(epoch)
}

fn encode(sessions: &[(Id, u64, Arc<[u8]>)]) -> Vec<u8> {
    let size = (sessions.iter())
        .map(|(_, _, value)| 8 + ID_LEN + 4 + value.len())
        .sum::<usize>();
    let mut out = Vec::with_capacity(MAGIC.len() + size);
    out.extend_from_slice(MAGIC);
    for (id, epoch, value) in sessions {
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(id);
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value);
    }
    out
}

/// Writes the sessions every few seconds when they changed, and once more at shutdown.
pub async fn keep_saved(sessions: Arc<Sessions>, shutdown: CancellationToken) {
    let mut saves = Saves::default();
    loop {
        let stop = tokio::select! {
            _ = tokio::time::sleep(SAVE_EVERY) => false,
            _ = shutdown.cancelled() => true,
        };
        let s = sessions.clone();
        let result = match tokio::task::spawn_blocking(move || s.save()).await {
            Ok(result) => result,
            Err(e) => Err(std::io::Error::other(e)),
        };
        let path = sessions.path.display();
        match (saves.report(result.is_ok()), result) {
            (Report::Failing, Err(e)) => {
                tracing::warn!(%path, error = %e, retry_every_s = SAVE_EVERY.as_secs(), "cannot write the QUIC sessions; retrying, said again only once they are written")
            }
            (Report::StillFailing, Err(e)) => {
                tracing::debug!(%path, error = %e, "cannot write the QUIC sessions")
            }
            (Report::Recovered, _) => tracing::info!(%path, "the QUIC sessions are written again"),
            _ => {}
        }
        if stop {
            return;
        }
    }
}

/// What a save's outcome is worth saying: a store that cannot be written (a full disk, a
/// read-only data dir) is retried every [`SAVE_EVERY`], and warned of once, not every time.
#[derive(Debug, Default)]
struct Saves {
    failing: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Report {
    Quiet,
    Failing,
    StillFailing,
    Recovered,
}

impl Saves {
    fn report(&mut self, ok: bool) -> Report {
        let was = std::mem::replace(&mut self.failing, !ok);
        match (was, ok) {
            (false, true) => Report::Quiet,
            (false, false) => Report::Failing,
            (true, false) => Report::StillFailing,
            (true, true) => Report::Recovered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunnel_proto::pin::CaPin;

    fn pin(hex: &str) -> CaPin {
        format!("sha256:{}", hex.repeat(32)).parse().unwrap()
    }

    #[test]
    fn a_failing_save_is_warned_of_once_and_its_recovery_said() {
        let mut saves = Saves::default();
        assert_eq!(saves.report(true), Report::Quiet);
        assert_eq!(saves.report(false), Report::Failing);
        for _ in 0..100 {
            assert_eq!(saves.report(false), Report::StillFailing);
        }
        assert_eq!(saves.report(true), Report::Recovered);
        assert_eq!(saves.report(true), Report::Quiet);
        assert_eq!(
            saves.report(false),
            Report::Failing,
            "a new failure is news again"
        );
    }

    #[test]
    fn a_store_whose_file_cannot_be_written_keeps_its_sessions_for_the_next_save() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1, &[pin("ab")], 16);
        assert!(s.put(vec![1; ID_LEN], vec![7; 100]));
        // A directory where the file goes: the write fails whoever runs the test (root too).
        std::fs::create_dir(&s.path).unwrap();
        assert!(s.save().is_err());
        std::fs::remove_dir(&s.path).unwrap();
        s.save().unwrap();
        let again = store(dir.path(), 1, &[pin("ab")], 16);
        assert_eq!(again.take(&[1; ID_LEN]), Some(vec![7; 100]));
    }

    fn store(dir: &std::path::Path, secret: u8, pins: &[CaPin], capacity: usize) -> Sessions {
        let tickets = Arc::new(Tickets::new(&[secret; 64], pins));
        Sessions::with_capacity(
            dir.join("quic-sessions"),
            tickets,
            capacity,
            Counter::default(),
        )
    }

    #[test]
    fn a_session_is_taken_once_and_read_back_after_a_restart_by_the_same_proxy_only() {
        let dir = tempfile::tempdir().unwrap();
        let pins = [pin("ab")];
        let s = store(dir.path(), 7, &pins, 16);
        assert!(
            !s.put(vec![1; 31], b"short id".to_vec()),
            "ids are 32 bytes"
        );
        assert!(s.put(vec![1; 32], b"one".to_vec()));
        assert!(s.put(vec![2; 32], b"two".to_vec()));
        assert_eq!(s.take(&[1; 32]).as_deref(), Some(&b"one"[..]));
        assert_eq!(s.take(&[1; 32]), None, "single use");
        assert_eq!(s.resumed.get(), 1);
        assert_eq!(s.take(&[3; 32]), None);
        assert_eq!(s.take(&[2; 31]), None);
        s.save().unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("quic-sessions"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);

        // The same proxy started again: what was left, and nothing taken before.
        let again = store(dir.path(), 7, &pins, 16);
        assert_eq!(again.len(), 1);
        assert_eq!(again.take(&[2; 32]).as_deref(), Some(&b"two"[..]));
        assert!(again.put(vec![4; 32], b"four".to_vec()));
        again.save().unwrap();
        // Another proxy's secret, or other host CAs, read nothing from the file.
        assert_eq!(store(dir.path(), 8, &pins, 16).len(), 0);
        assert_eq!(store(dir.path(), 7, &[pin("cd")], 16).len(), 0);
        // A host CA change while running forgets every session, in memory and on disk.
        let running = store(dir.path(), 7, &pins, 16);
        assert_eq!(running.len(), 1);
        running.forget();
        assert_eq!(running.take(&[4; 32]), None);
        running.save().unwrap();
        assert_eq!(store(dir.path(), 7, &pins, 16).len(), 0);
    }

    #[test]
    fn the_store_keeps_its_newest_sessions_within_its_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 7, &[pin("ab")], 4);
        for i in 0..10u8 {
            assert!(s.put(vec![i; 32], vec![i]));
        }
        assert_eq!(s.len(), 4);
        for i in 0..6u8 {
            assert_eq!(s.take(&[i; 32]), None, "session {i} was evicted");
        }
        for i in 6..10u8 {
            assert_eq!(s.take(&[i; 32]), Some(vec![i]));
        }
        // Taken ids do not pile up: many resumptions keep the eviction queue near the map.
        for round in 0..5_000u32 {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&round.to_be_bytes());
            assert!(s.put(id.to_vec(), vec![1]));
            assert!(s.take(&id).is_some());
        }
        let queued = s.lock().order.len();
        assert!(queued <= 2 * s.len() + 1025, "{queued} ids queued");
    }

    #[test]
    fn a_session_too_large_is_not_kept_and_a_restart_keeps_the_newest_and_no_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let pins = [pin("ab")];
        let s = store(dir.path(), 7, &pins, 16);
        assert!(
            !s.put(vec![1; 32], vec![0; MAX_SESSION + 1]),
            "a chain the node padded"
        );
        assert_eq!(s.len(), 0);
        for i in 0..6u8 {
            assert!(s.put(vec![i; 32], vec![i]));
        }
        s.save().unwrap();
        let leftover = dir.path().join(".quic-sessions.tmp-0123");
        std::fs::write(&leftover, b"cut short").unwrap();
        // A smaller store after the restart keeps the newest of the file.
        let again = store(dir.path(), 7, &pins, 4);
        assert!(
            !leftover.exists(),
            "a crashed write's temporary file is removed"
        );
        assert_eq!(again.len(), 4);
        assert_eq!(again.take(&[1; 32]), None);
        assert_eq!(again.take(&[5; 32]), Some(vec![5]));
    }

    #[test]
    fn a_damaged_sessions_file_is_ignored_never_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let pins = [pin("ab")];
        let s = store(dir.path(), 7, &pins, 16);
        for i in 0..3u8 {
            s.put(vec![i; 32], vec![i; 100]);
        }
        s.save().unwrap();
        let path = dir.path().join("quic-sessions");
        let good = std::fs::read(&path).unwrap();
        for cut in [0, 1, good.len() / 2, good.len() - 1] {
            std::fs::write(&path, &good[..cut]).unwrap();
            assert_eq!(store(dir.path(), 7, &pins, 16).len(), 0);
        }
        let mut flipped = good.clone();
        flipped[good.len() / 2] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert_eq!(store(dir.path(), 7, &pins, 16).len(), 0);
        // A sealed plaintext whose records are cut short is refused as a whole.
        let tickets = Tickets::new(&[7; 64], &pins);
        let mut plain = MAGIC.to_vec();
        plain.extend_from_slice(&(unix_now() / EPOCH).to_be_bytes());
        plain.extend_from_slice(&[9; 32]);
        plain.extend_from_slice(&1000u32.to_be_bytes());
        plain.extend_from_slice(&[0; 10]);
        let sealed = tickets.seal(&plain, unix_now() / EPOCH).unwrap();
        std::fs::write(&path, sealed).unwrap();
        let s = store(dir.path(), 7, &pins, 16);
        assert_eq!(s.take(&[9; 32]), None);
    }
}
