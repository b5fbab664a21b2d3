//! Session recordings: received from nodes over their tunnels, stored under the data dir,
//! indexed in the backend, and served to `burrowctl` by any proxy.
//!
//! A node sends a recording in chunks of whole asciicast lines, each at the offset where it goes
//! ([`RecordingChunk`]); the proxy appends it to `DATA_DIR/log/sessions/<id>.cast.part` and
//! answers with the size it holds, so the node goes on from there (or starts again: a proxy that
//! does not hold a recording's beginning answers 0). With the last chunk the file becomes
//! `<id>.cast` (0600) and `/sessions/<id>` in the backend names this proxy as its holder; the
//! index is written once and never replaced. Recordings are input from nodes: ids are 128-bit
//! hex, a recording holds at most [`MAX_RECORDING`] bytes and a node at most [`NODE_QUOTA`] in
//! all (`/recording-usage/<host id>`); what the node says about the session (user, login,
//! times) is bounded and shown as the node's account. Any proxy lists the index; a proxy asked for
//! a recording another holds fetches it from that one (with an admin identity it issues itself).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use burrow_net::web::WebClient;
use tunnel_proto::api::{SessionCast, SessionRecord};
use tunnel_proto::wire::{Message, RecordingChunk, RecordingMode};

use crate::backend::{Backend, BackendError};
use crate::state;

/// The largest recording a proxy stores (a node stops recording a session at 32 MiB).
pub const MAX_RECORDING: u64 = 33 * 1024 * 1024;
/// The most one node may have stored in all.
pub const NODE_QUOTA: u64 = 1024 * 1024 * 1024;
/// Bytes of a recording one `SessionCast` answer carries at most.
const PIECE: usize = 1024 * 1024;
/// Longest user, login or kind a node may report.
const MAX_FIELD: usize = 256;
/// Recordings one node may be sending to one proxy at once (an agent sends one at a time).
const MAX_UPLOADS_PER_NODE: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("no recording has id {0:?}")]
    NotFound(String),
    #[error(
        "the recording is held by proxy {0}, which is not running; start it to play the recording"
    )]
    HolderGone(String),
    #[error("the recording is held by proxy {proxy}, which cannot be reached: {reason}")]
    HolderUnreachable { proxy: String, reason: String },
    #[error("cannot read the recording: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

pub struct Recordings {
    dir: PathBuf,
    backend: Arc<dyn Backend>,
    proxy_id: String,
    mode: RecordingMode,
    /// Recordings being received here: session id -> the host id sending it.
    uploads: Mutex<HashMap<String, String>>,
}

impl Recordings {
    pub fn new(
        data_dir: &std::path::Path,
        backend: Arc<dyn Backend>,
        proxy_id: String,
        mode: RecordingMode,
    ) -> Self {
        Self {
            dir: data_dir.join("log").join("sessions"),
            backend,
            proxy_id,
            mode,
            uploads: Mutex::new(HashMap::new()),
        }
    }

    /// What nodes are told to record.
    pub fn mode(&self) -> RecordingMode {
        self.mode
    }

    fn uploads(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.uploads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a chunk from node `host_id` (named `node` by its certificate); the answer says how
    /// much of the recording this proxy holds. None when it cannot be stored now: unanswered,
    /// the node sends it again later.
    pub async fn receive(
        &self,
        host_id: &str,
        node: &str,
        chunk: RecordingChunk,
    ) -> Option<Message> {
        let id = chunk.session_id.clone();
        let answer = |size: u64, stored: bool, error: Option<String>| {
            Some(Message::RecordingAck {
                session_id: id.clone(),
                size,
                stored,
                error,
            })
        };
        match self.take(host_id, node, chunk).await {
            Ok((size, stored)) => answer(size, stored, None),
            Err(Refusal::Permanent(why)) => {
                tracing::warn!(%host_id, session_id = %short(&id), %why, "session recording refused");
                answer(0, false, Some(why))
            }
            Err(Refusal::Later(why)) => {
                tracing::warn!(%host_id, session_id = %short(&id), %why, "cannot store a session recording now");
                None
            }
        }
    }

    async fn take(
        &self,
        host_id: &str,
        node: &str,
        chunk: RecordingChunk,
    ) -> Result<(u64, bool), Refusal> {
        let id = &chunk.session_id;
        if id.len() != 32
            || !id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Err(Refusal::Permanent(
                "a session id is 32 lowercase hex digits".into(),
            ));
        }
        // Stored already (the node missed the answer)?
        if let Some(raw) = self.backend.get(&state::session(id)).await.map_err(later)? {
            let record: SessionRecord = serde_json::from_slice(&raw)
                .map_err(|e| Refusal::Later(format!("the index of {id} is damaged: {e}")))?;
            if record.host_id != host_id {
                return Err(Refusal::Permanent("this session id is taken".into()));
            }
            return Ok((record.size, true));
        }
        let part = self.dir.join(format!("{id}.cast.part"));
        let holder = self.uploads().get(id).cloned();
        if holder.as_deref().is_some_and(|h| h != host_id) {
            return Err(Refusal::Permanent("this session id is taken".into()));
        }
        if chunk.offset == 0 {
            let busy = self.uploads().values().filter(|h| *h == host_id).count();
            if holder.is_none() && busy >= MAX_UPLOADS_PER_NODE {
                return Err(Refusal::Permanent(format!(
                    "the node is sending {busy} recordings here already"
                )));
            }
            let used = self.usage(host_id).await.map_err(later)?;
            if used >= NODE_QUOTA {
                return Err(Refusal::Permanent(format!(
                    "the node's stored recordings reached its quota of {NODE_QUOTA} bytes"
                )));
            }
            burrow_daemon::fsutil::ensure_private_dir(&self.dir).map_err(io_later)?;
            private_file(&part, true).map_err(io_later)?;
            self.uploads().insert(id.clone(), host_id.to_string());
        } else if holder.is_none() {
            // This proxy does not hold the beginning: the node starts again from 0.
            return Ok((0, false));
        }
        let size = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if chunk.offset != size {
            return Ok((size, false));
        }
        let grown = size + chunk.data.len() as u64;
        if grown > MAX_RECORDING {
            self.uploads().remove(id);
            let _ = std::fs::remove_file(&part);
            return Err(Refusal::Permanent(format!(
                "the recording is larger than {MAX_RECORDING} bytes"
            )));
        }
        let mut file = private_file(&part, false).map_err(io_later)?;
        file.write_all(chunk.data.as_bytes()).map_err(io_later)?;
        let Some(end) = chunk.end else {
            return Ok((grown, false));
        };
        file.sync_all().map_err(io_later)?;
        let cast = self.dir.join(format!("{id}.cast"));
        std::fs::rename(&part, &cast).map_err(io_later)?;
        let record = SessionRecord {
            session_id: id.clone(),
            host_id: host_id.to_string(),
            node: node.to_string(),
            user: bounded(&end.user),
            login: bounded(&end.login),
            kind: bounded(&end.kind),
            started: end.started,
            ended: end.ended.max(end.started),
            size: grown,
            proxy_id: self.proxy_id.clone(),
        };
        let json = serde_json::to_vec(&record).expect("session records serialize");
        self.backend
            .compare_and_swap(&state::session(id), None, json, None)
            .await
            .map_err(later)?;
        self.add_usage(host_id, grown).await.map_err(later)?;
        self.uploads().remove(id);
        tracing::info!(session_id = %id, %host_id, %node, size = grown, "session recording stored");
        Ok((grown, true))
    }

    async fn usage(&self, host_id: &str) -> Result<u64, BackendError> {
        Ok(self
            .backend
            .get(&state::recording_usage(host_id))
            .await?
            .and_then(|raw| String::from_utf8(raw).ok()?.trim().parse().ok())
            .unwrap_or(0))
    }

    async fn add_usage(&self, host_id: &str, bytes: u64) -> Result<(), BackendError> {
        let key = state::recording_usage(host_id);
        for _ in 0..8 {
            let current = self.backend.get(&key).await?;
            let used: u64 = current
                .as_deref()
                .and_then(|raw| std::str::from_utf8(raw).ok()?.trim().parse().ok())
                .unwrap_or(0);
            let next = used.saturating_add(bytes).to_string().into_bytes();
            if self
                .backend
                .compare_and_swap(&key, current.as_deref(), next, None)
                .await?
            {
                return Ok(());
            }
        }
        Err(BackendError::Storage(
            "the node's recording usage keeps changing; not counted".into(),
        ))
    }

    /// Every stored recording, oldest first, of node `node` (a name or host id) and user `user`.
    pub async fn list(
        &self,
        node: Option<&str>,
        user: Option<&str>,
    ) -> Result<Vec<SessionRecord>, BackendError> {
        let mut sessions: Vec<SessionRecord> = self
            .backend
            .list(state::SESSIONS)
            .await?
            .into_iter()
            .filter_map(|(_, raw)| serde_json::from_slice(&raw).ok())
            .filter(|s: &SessionRecord| node.is_none_or(|n| s.node == n || s.host_id == n))
            .filter(|s| user.is_none_or(|u| s.user == u))
            .collect();
        sessions.sort_by(|a, b| (a.started, &a.session_id).cmp(&(b.started, &b.session_id)));
        Ok(sessions)
    }

    /// Whole lines of recording `id` from `offset`, from this proxy's file or the one of the
    /// proxy that holds it (`client` reaches a proxy's web address).
    pub async fn piece(
        &self,
        id: &str,
        offset: u64,
        client: impl FnOnce(&str) -> Result<WebClient, String>,
    ) -> Result<SessionCast, RecordingError> {
        let raw = self
            .backend
            .get(&state::session(id))
            .await?
            .ok_or_else(|| RecordingError::NotFound(id.to_string()))?;
        let session: SessionRecord =
            serde_json::from_slice(&raw).map_err(|_| RecordingError::NotFound(id.to_string()))?;
        if session.proxy_id != self.proxy_id {
            return self.fetch(&session, offset, client).await;
        }
        let mut file = std::fs::File::open(self.dir.join(format!("{}.cast", session.session_id)))?;
        let size = file.metadata()?.len();
        file.seek(SeekFrom::Start(offset.min(size)))?;
        let mut buf = vec![0u8; PIECE.min(size.saturating_sub(offset) as usize)];
        file.read_exact(&mut buf)?;
        if offset + (buf.len() as u64) < size
            && let Some(last) = buf.iter().rposition(|&b| b == b'\n')
        {
            buf.truncate(last + 1);
        }
        Ok(SessionCast {
            session,
            offset,
            data: String::from_utf8_lossy(&buf).into_owned(),
        })
    }

    async fn fetch(
        &self,
        session: &SessionRecord,
        offset: u64,
        client: impl FnOnce(&str) -> Result<WebClient, String>,
    ) -> Result<SessionCast, RecordingError> {
        let holder = &session.proxy_id;
        let info = crate::registry::list(self.backend.as_ref())
            .await?
            .into_iter()
            .find(|p| &p.id == holder)
            .ok_or_else(|| RecordingError::HolderGone(holder.clone()))?;
        let unreachable = |reason: String| RecordingError::HolderUnreachable {
            proxy: holder.clone(),
            reason,
        };
        let client = client(&info.web_addr).map_err(unreachable)?;
        let path = format!(
            "{}?id={}&offset={offset}",
            tunnel_proto::api::SESSION_CAST_PATH,
            session.session_id
        );
        client
            .get(&path)
            .await
            .map_err(|e| unreachable(e.to_string()))
    }
}

/// Why a chunk was not taken: for good (the node drops the recording) or for now.
enum Refusal {
    Permanent(String),
    Later(String),
}

fn later(e: BackendError) -> Refusal {
    Refusal::Later(e.to_string())
}

fn io_later(e: std::io::Error) -> Refusal {
    Refusal::Later(e.to_string())
}

fn bounded(text: &str) -> String {
    let mut end = text.len().min(MAX_FIELD);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

fn short(id: &str) -> &str {
    &id[..id.len().min(40)]
}

/// Opens `path` for appending (0600), emptied first with `truncate`.
fn private_file(path: &std::path::Path, truncate: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.create(true).mode(0o600);
    if truncate {
        options.write(true).truncate(true);
    } else {
        options.append(true);
    }
    options.open(path)
}
