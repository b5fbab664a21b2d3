//! Recordings sent to a proxy, from the spool, over whichever tunnel is fit.
//!
//! One recording at a time, one chunk in flight (whole lines, at most [`CHUNK`] bytes), each
//! answered with how much of it the proxy holds: the agent goes on from there, so a chunk lost
//! with a tunnel is sent again. A recording goes to the proxy the session came through while the
//! agent holds a tunnel to it, else to any; when the tunnel it was going over is lost, it starts
//! again from the beginning at the next proxy (a proxy holds only whole recordings it was sent
//! in full). The session's own bytes wait in the spool meanwhile, as much as it holds, so a
//! recording survives a tunnel that moves, a proxy that restarts and an agent that restarts.
//! Once a proxy says it stored the recording, the node deletes its copy; a recording the proxy
//! refuses (too large, over the node's quota) is deleted with a warning.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tunnel_proto::wire::{Message, RecordingChunk, RecordingEnd, RecordingMode};

/// File bytes one chunk carries at most (a chunk's message must stay under the frame limit with
/// the text escaped once more).
pub const CHUNK: usize = 24 * 1024;
/// How long a chunk may stay unanswered before it is sent again.
const ANSWER_TIMEOUT: u64 = 30;

/// The recordings of one node, and which of them is on its way where.
pub struct Uploader {
    dir: PathBuf,
    /// What the proxies last said to record ([`RecordingMode`] as a number).
    mode: AtomicU8,
    state: Mutex<State>,
    wake: Notify,
}

#[derive(Default)]
struct State {
    /// The recording being sent, to which proxy, and how much of it that proxy holds.
    current: Option<Current>,
    /// Proxies the agent holds tunnels to, and how many (a tunnel being replaced, or one that
    /// turns out a duplicate, comes and goes beside the one that stays).
    up: HashMap<String, usize>,
}

struct Current {
    session_id: String,
    proxy_id: String,
    acked: u64,
    /// When the chunk waiting for its answer was sent.
    asked: Option<u64>,
}

impl Uploader {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join(super::DIR),
            mode: AtomicU8::new(mode_code(RecordingMode::All)),
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What sessions to record, as the proxies last said.
    pub fn mode(&self) -> RecordingMode {
        match self.mode.load(Ordering::Relaxed) {
            0 => RecordingMode::All,
            1 => RecordingMode::Pty,
            _ => RecordingMode::Off,
        }
    }

    /// A tunnel to `proxy_id` is up; its welcome said to record `mode` (none: it takes no
    /// recordings, and gets none).
    pub fn tunnel_up(&self, proxy_id: &str, mode: Option<RecordingMode>) {
        if let Some(mode) = mode {
            self.mode.store(mode_code(mode), Ordering::Relaxed);
            *self.lock().up.entry(proxy_id.to_string()).or_default() += 1;
            self.wake();
        }
    }

    /// The tunnel to `proxy_id` is gone: a recording on its way there starts again elsewhere.
    pub fn tunnel_down(&self, proxy_id: &str) {
        let mut s = self.lock();
        let Some(count) = s.up.get_mut(proxy_id) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        s.up.remove(proxy_id);
        if s.current.as_ref().is_some_and(|c| c.proxy_id == proxy_id) {
            s.current = None;
        }
        drop(s);
        self.wake();
    }

    /// Something changed: a recording grew or ended, a tunnel came up.
    pub fn wake(&self) {
        self.wake.notify_waiters();
    }

    /// Waits until there may be a chunk to send (a change, or a second for an answer that may
    /// not come).
    pub async fn ready(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
    }

    /// The next chunk for the tunnel to `proxy_id`, if it has one to carry now.
    pub fn next_chunk(&self, proxy_id: &str, now: u64) -> Option<Message> {
        let mut s = self.lock();
        if !s.up.contains_key(proxy_id) {
            return None;
        }
        if s.current.is_none() {
            let session_id = self.oldest()?;
            // The proxy the session came through, while there is a tunnel to it.
            let via = std::fs::read_to_string(self.dir.join(format!("{session_id}.via")))
                .ok()
                .filter(|via| s.up.contains_key(via.trim()));
            if via.is_some_and(|via| via.trim() != proxy_id) {
                return None;
            }
            s.current = Some(Current {
                session_id,
                proxy_id: proxy_id.to_string(),
                acked: 0,
                asked: None,
            });
        }
        let c = s.current.as_mut()?;
        if c.proxy_id != proxy_id || c.asked.is_some_and(|at| now < at + ANSWER_TIMEOUT) {
            return None;
        }
        let (data, end) = self.read_chunk(&c.session_id, c.acked)?;
        c.asked = Some(now);
        Some(Message::Recording(RecordingChunk {
            session_id: c.session_id.clone(),
            offset: c.acked,
            data,
            end,
        }))
    }

    /// The proxy's answer about `session_id`.
    pub fn answer(
        &self,
        proxy_id: &str,
        session_id: &str,
        size: u64,
        stored: bool,
        error: Option<String>,
    ) {
        let mut s = self.lock();
        let Some(c) = s
            .current
            .as_mut()
            .filter(|c| c.proxy_id == proxy_id && c.session_id == session_id)
        else {
            return;
        };
        c.asked = None;
        c.acked = size;
        if stored || error.is_some() {
            if let Some(why) = error {
                tracing::warn!(session_id, %proxy_id, %why, "the proxy refused the session's recording; dropping it");
            } else {
                tracing::info!(session_id, %proxy_id, "session recording stored at the proxy");
            }
            for ext in ["cast", "end", "via"] {
                let _ = std::fs::remove_file(self.dir.join(format!("{session_id}.{ext}")));
            }
            s.current = None;
        }
        drop(s);
        self.wake();
    }

    /// The recording that waits longest (by name order among the oldest files).
    fn oldest(&self) -> Option<String> {
        let mut casts: Vec<(std::time::SystemTime, String)> = std::fs::read_dir(&self.dir)
            .ok()?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.strip_suffix(".cast")?.to_string();
                Some((e.metadata().ok()?.modified().ok()?, name))
            })
            .collect();
        casts.sort();
        casts.into_iter().next().map(|(_, name)| name)
    }

    /// Whole lines of `session_id`'s recording from `offset`, at most [`CHUNK`] bytes, and its
    /// end when they reach it; `None` when there is nothing to send yet.
    fn read_chunk(&self, session_id: &str, offset: u64) -> Option<(String, Option<RecordingEnd>)> {
        let end: Option<RecordingEnd> = std::fs::read(self.dir.join(format!("{session_id}.end")))
            .ok()
            .and_then(|raw| serde_json::from_slice(&raw).ok());
        let mut file = std::fs::File::open(self.dir.join(format!("{session_id}.cast"))).ok()?;
        let size = file.metadata().ok()?.len();
        file.seek(SeekFrom::Start(offset)).ok()?;
        let mut buf = vec![0u8; CHUNK.min(size.saturating_sub(offset) as usize)];
        file.read_exact(&mut buf).ok()?;
        let cut = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        buf.truncate(cut);
        let reaches_end = offset + cut as u64 == size;
        let end = end.filter(|_| reaches_end);
        if buf.is_empty() && end.is_none() {
            return None;
        }
        Some((String::from_utf8_lossy(&buf).into_owned(), end))
    }
}

fn mode_code(mode: RecordingMode) -> u8 {
    match mode {
        RecordingMode::All => 0,
        RecordingMode::Pty => 1,
        RecordingMode::Off => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(m: Option<Message>) -> RecordingChunk {
        match m {
            Some(Message::Recording(c)) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_recording_goes_to_its_sessions_proxy_and_starts_again_elsewhere_when_that_one_goes() {
        let tmp = tempfile::tempdir().unwrap();
        let up = Uploader::new(tmp.path());
        std::fs::create_dir_all(up.dir()).unwrap();
        std::fs::write(up.dir().join("s1.cast"), "header\nline1\npartial").unwrap();
        std::fs::write(up.dir().join("s1.via"), "pA").unwrap();
        up.tunnel_up("pA", Some(RecordingMode::All));
        up.tunnel_up("pB", Some(RecordingMode::All));
        // Bound to the session's proxy; the other tunnel carries nothing.
        assert!(up.next_chunk("pB", 0).is_none());
        let c = chunk(up.next_chunk("pA", 0));
        assert_eq!(
            (c.offset, c.data.as_str(), c.end.is_none()),
            (0, "header\nline1\n", true)
        );
        // One chunk in flight until answered (or timed out).
        assert!(up.next_chunk("pA", 1).is_none());
        up.answer("pA", "s1", 13, false, None);
        assert!(up.next_chunk("pA", 2).is_none(), "no whole line yet");
        // The session ends: the last line and the end go together.
        std::fs::write(up.dir().join("s1.cast"), "header\nline1\npartial\n").unwrap();
        let end = RecordingEnd {
            user: "u".into(),
            login: "l".into(),
            kind: "shell".into(),
            started: 1,
            ended: 2,
        };
        std::fs::write(up.dir().join("s1.end"), serde_json::to_vec(&end).unwrap()).unwrap();
        let c = chunk(up.next_chunk("pA", 3));
        assert_eq!((c.offset, c.data.as_str()), (13, "partial\n"));
        assert_eq!(c.end, Some(end));
        // A second tunnel to pA that comes and goes changes nothing; when pA goes away
        // unanswered, pB takes the recording from its start.
        up.tunnel_up("pA", Some(RecordingMode::All));
        up.tunnel_down("pA");
        assert!(up.next_chunk("pB", 4).is_none());
        up.tunnel_down("pA");
        let c = chunk(up.next_chunk("pB", 4));
        assert_eq!(c.offset, 0);
        up.answer("pB", "s1", 21, true, None);
        assert!(!up.dir().join("s1.cast").exists() && !up.dir().join("s1.end").exists());
        assert!(up.next_chunk("pB", 5).is_none());
    }

    #[test]
    fn an_unanswered_chunk_is_sent_again_and_a_refused_recording_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let up = Uploader::new(tmp.path());
        std::fs::create_dir_all(up.dir()).unwrap();
        std::fs::write(up.dir().join("s2.cast"), "h\n").unwrap();
        up.tunnel_up("pA", Some(RecordingMode::Pty));
        assert_eq!(up.mode(), RecordingMode::Pty);
        assert!(up.next_chunk("pA", 100).is_some());
        assert!(up.next_chunk("pA", 100 + ANSWER_TIMEOUT - 1).is_none());
        assert_eq!(chunk(up.next_chunk("pA", 100 + ANSWER_TIMEOUT)).offset, 0);
        up.answer("pA", "s2", 0, false, Some("over the node's quota".into()));
        assert!(!up.dir().join("s2.cast").exists());
        // A proxy that takes no recordings is given none.
        up.tunnel_up("pC", None);
        assert!(up.next_chunk("pC", 200).is_none());
    }
}
