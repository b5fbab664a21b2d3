//! Session recordings: what a session's terminal showed, in the asciicast v2 format, written to
//! the node's data dir as the session runs and sent to a proxy over a tunnel ([`upload`]).
//!
//! A recording is `DATA_DIR/recordings/<session id>.cast`: a header line (`{"version": 2,
//! "width", "height", "timestamp", "env", "title"}`), then one event per line, `[seconds, "o",
//! text]` for output and `[seconds, "r", "WxH"]` for a resize. The session's input is not
//! recorded (passwords typed at a prompt are not echoed, so they are not in the output either).
//! Output is decoded as UTF-8 across reads (a character split between two reads is kept whole;
//! invalid bytes become U+FFFD, as asciinema does) and cut into events of at most
//! [`EVENT_BYTES`] bytes, so that every line fits a tunnel message. `<session id>.end` appears
//! when the session ended; the recording is then complete. Bounded: at most [`MAX_RECORDING`]
//! bytes a recording (output beyond is left out, and the recording says so in a last event), and
//! no new recording while the spool holds [`MAX_SPOOL`] bytes.

pub mod upload;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tunnel_proto::wire::RecordingEnd;

pub use self::upload::Uploader;

/// Output bytes one event holds at most (its line is at most about six times that, escaped).
pub const EVENT_BYTES: usize = 2048;
/// The largest recording a session makes.
pub const MAX_RECORDING: u64 = 32 * 1024 * 1024;
/// No new recording starts while the recordings waiting on this node take this much.
pub const MAX_SPOOL: u64 = 256 * 1024 * 1024;
pub const DIR: &str = "recordings";

/// A session being recorded.
pub struct Recorder {
    session_id: String,
    dir: PathBuf,
    started: Instant,
    started_ms: u64,
    state: Mutex<State>,
    uploader: Arc<Uploader>,
}

struct State {
    file: Option<File>,
    written: u64,
    /// The start of a UTF-8 character whose end is in the next read.
    pending: Vec<u8>,
    truncated: bool,
}

/// The header line of an asciicast v2 file.
#[derive(Serialize, Deserialize)]
struct Header {
    version: u32,
    width: u32,
    height: u32,
    timestamp: u64,
    env: std::collections::BTreeMap<String, String>,
    title: String,
}

impl Recorder {
    /// Starts recording session `session_id` in the uploader's spool, or `None` (and a warning)
    /// when the spool is full or the file cannot be made.
    pub fn start(
        uploader: &Arc<Uploader>,
        session_id: &str,
        (width, height): (u32, u32),
        term: &str,
        title: String,
        via: Option<&str>,
    ) -> Option<Arc<Self>> {
        let dir = uploader.dir().to_path_buf();
        let spooled = spool_size(&dir);
        if spooled >= MAX_SPOOL {
            tracing::warn!(
                session_id,
                spooled,
                "not recording: the node's recordings waiting for a proxy fill the spool"
            );
            return None;
        }
        // Where it goes first is known before the uploader can see the recording.
        if let Some(via) = via {
            let _ = burrow_daemon::fsutil::ensure_private_dir(&dir).and_then(|()| {
                burrow_daemon::fsutil::write_private_atomic(
                    &dir.join(format!("{session_id}.via")),
                    via.as_bytes(),
                )
            });
        }
        let made = burrow_daemon::fsutil::ensure_private_dir(&dir).and_then(|()| {
            std::fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode_private()
                .open(dir.join(format!("{session_id}.cast")))
        });
        let mut file = match made {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(session_id, error = %e, "cannot record the session");
                return None;
            }
        };
        let header = Header {
            version: 2,
            width: width.clamp(1, 10_000),
            height: height.clamp(1, 10_000),
            timestamp: burrow_daemon::unix_now(),
            env: [("TERM".to_string(), term.to_string())].into(),
            title,
        };
        let mut line = serde_json::to_vec(&header).expect("headers serialize");
        line.push(b'\n');
        let written = file.write_all(&line).map(|()| line.len() as u64).ok()?;
        uploader.wake();
        Some(Arc::new(Self {
            session_id: session_id.to_string(),
            dir,
            started: Instant::now(),
            started_ms: burrow_daemon::unix_now_ms(),
            state: Mutex::new(State {
                file: Some(file),
                written,
                pending: Vec::new(),
                truncated: false,
            }),
            uploader: uploader.clone(),
        }))
    }

    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `bytes` the terminal showed. A recording that reached its size limit (or lost its
    /// file) costs nothing more: the output is not decoded at all.
    pub fn output(&self, bytes: &[u8]) {
        let t = self.started.elapsed().as_secs_f64();
        let mut s = self.lock();
        if s.truncated || s.file.is_none() {
            return;
        }
        let joined;
        let input = if s.pending.is_empty() {
            bytes
        } else {
            let mut all = std::mem::take(&mut s.pending);
            all.extend_from_slice(bytes);
            joined = all;
            &joined[..]
        };
        let (text, rest) = decode_utf8(input);
        let rest = rest.to_vec();
        // One write for every event of this read.
        let mut batch = Vec::with_capacity(text.len() + text.len() / 4 + 64);
        for piece in split_at_chars(&text, EVENT_BYTES) {
            if !push_event(&mut s, &mut batch, t, "o", piece) {
                break;
            }
        }
        s.pending = rest;
        write_batch(&mut s, &batch);
        drop(s);
        self.uploader.wake();
    }

    /// Records a window change.
    pub fn resize(&self, width: u32, height: u32) {
        let t = self.started.elapsed().as_secs_f64();
        write_event(&mut self.lock(), t, "r", &format!("{width}x{height}"));
        self.uploader.wake();
    }

    /// Ends the recording: what is left of a character, then the `.end` file that makes it
    /// complete.
    pub fn finish(&self, user: &str, login: &str, kind: &str) {
        let t = self.started.elapsed().as_secs_f64();
        let mut s = self.lock();
        if !s.pending.is_empty() {
            let rest = String::from_utf8_lossy(&std::mem::take(&mut s.pending)).into_owned();
            write_event(&mut s, t, "o", &rest);
        }
        if let Some(file) = s.file.take() {
            let _ = file.sync_data();
        }
        drop(s);
        let end = RecordingEnd {
            user: user.to_string(),
            login: login.to_string(),
            kind: kind.to_string(),
            started: self.started_ms,
            ended: burrow_daemon::unix_now_ms(),
        };
        let path = self.dir.join(format!("{}.end", self.session_id));
        let json = serde_json::to_vec(&end).expect("ends serialize");
        if let Err(e) = burrow_daemon::fsutil::write_private_atomic(&path, &json) {
            tracing::warn!(session_id = %self.session_id, error = %e, "cannot finish the session's recording");
        }
        self.uploader.wake();
    }
}

/// Appends one event line, `[t, kind, data]`, to `out`.
fn event_into(out: &mut Vec<u8>, t: f64, kind: &str, data: &str) {
    serde_json::to_writer(&mut *out, &(Seconds(t), kind, data)).expect("events serialize");
    out.push(b'\n');
}

/// Seconds with microseconds, as asciinema writes them.
struct Seconds(f64);

impl Serialize for Seconds {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64((self.0 * 1e6).round() / 1e6)
    }
}

/// Appends an event to `batch` (what one call writes), or, where it would take the recording
/// past [`MAX_RECORDING`], the note that the recording stops there. False once it has stopped.
fn push_event(s: &mut State, batch: &mut Vec<u8>, t: f64, kind: &str, data: &str) -> bool {
    if s.truncated {
        return false;
    }
    let before = batch.len();
    event_into(batch, t, kind, data);
    if s.written + batch.len() as u64 > MAX_RECORDING {
        batch.truncate(before);
        s.truncated = true;
        let note = "\r\n[burrow: the recording stops here: it reached its size limit]\r\n";
        event_into(batch, t, "o", note);
        return false;
    }
    true
}

/// Writes one event on its own.
fn write_event(s: &mut State, t: f64, kind: &str, data: &str) {
    let mut line = Vec::new();
    push_event(s, &mut line, t, kind, data);
    write_batch(s, &line);
}

fn write_batch(s: &mut State, batch: &[u8]) {
    let Some(file) = s.file.as_mut() else { return };
    if !batch.is_empty() && file.write_all(batch).is_ok() {
        s.written += batch.len() as u64;
    }
}

/// The longest valid UTF-8 text at the start of `bytes` (invalid sequences replaced; borrowed
/// when there are none), and the incomplete character at its end, if any.
fn decode_utf8(bytes: &[u8]) -> (std::borrow::Cow<'_, str>, &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        return (text.into(), &[]);
    }
    let mut text = String::new();
    let mut rest = bytes;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                text.push_str(s);
                return (text.into(), &[]);
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                text.push_str(std::str::from_utf8(good).expect("checked"));
                match e.error_len() {
                    // Incomplete at the end: kept for the next read.
                    None => return (text.into(), bad),
                    Some(n) => {
                        text.push('\u{FFFD}');
                        rest = &bad[n..];
                    }
                }
            }
        }
    }
}

/// `text` in pieces of at most `max` bytes, cut between characters.
fn split_at_chars(text: &str, max: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = rest.len().min(max);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (piece, tail) = rest.split_at(cut);
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

fn spool_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Files the agent writes only for itself.
trait PrivateMode {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateMode for std::fs::OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_between_reads_is_kept_whole_and_invalid_bytes_are_replaced() {
        let snow = "☃".as_bytes();
        let split = [b"ab", &snow[..2]].concat();
        let (text, rest) = decode_utf8(&split);
        assert_eq!((&*text, rest), ("ab", &snow[..2]));
        let whole = [&snow[..2], &snow[2..], b"c"].concat();
        let (text, rest) = decode_utf8(&whole);
        assert_eq!((&*text, rest.len()), ("☃c", 0));
        let (text, _) = decode_utf8(b"a\xffb");
        assert_eq!(text, "a\u{FFFD}b");
    }

    #[test]
    fn a_recording_is_a_header_then_output_and_resizes_in_order_then_its_end() {
        let tmp = tempfile::tempdir().unwrap();
        let up = Arc::new(Uploader::new(tmp.path()));
        let id = "0123456789abcdef0123456789abcdef";
        let rec = Recorder::start(&up, id, (100, 30), "xterm", "me@pi".into(), Some("p1")).unwrap();
        rec.output("hé".as_bytes());
        rec.output(&"☃".as_bytes()[..1]);
        rec.resize(120, 40);
        rec.output(&"☃".as_bytes()[1..]);
        rec.finish("alice", "pi", "shell");
        let cast = std::fs::read_to_string(up.dir().join(format!("{id}.cast"))).unwrap();
        let mut lines = cast.lines();
        let header: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert_eq!(
            (header["version"].as_u64(), header["width"].as_u64()),
            (Some(2), Some(100))
        );
        assert_eq!(header["env"]["TERM"], "xterm");
        let events: Vec<(f64, String, String)> =
            lines.map(|l| serde_json::from_str(l).unwrap()).collect();
        let kinds: Vec<(&str, &str)> = events
            .iter()
            .map(|(_, k, d)| (k.as_str(), d.as_str()))
            .collect();
        assert_eq!(kinds, [("o", "hé"), ("r", "120x40"), ("o", "☃")]);
        assert!(events.windows(2).all(|w| w[0].0 <= w[1].0));
        let end: RecordingEnd =
            serde_json::from_slice(&std::fs::read(up.dir().join(format!("{id}.end"))).unwrap())
                .unwrap();
        assert_eq!((end.user.as_str(), end.kind.as_str()), ("alice", "shell"));
        assert_eq!(
            std::fs::read_to_string(up.dir().join(format!("{id}.via"))).unwrap(),
            "p1"
        );
        // A session id is used once.
        assert!(Recorder::start(&up, id, (1, 1), "x", String::new(), None).is_none());
    }

    #[test]
    fn a_recording_stops_at_its_size_limit_and_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let up = Arc::new(Uploader::new(tmp.path()));
        let id = "00000000000000000000000000000001";
        let rec = Recorder::start(&up, id, (80, 24), "xterm", String::new(), None).unwrap();
        let cast = up.dir().join(format!("{id}.cast"));
        // NUL bytes take six bytes each escaped: 6 MiB of them pass the limit.
        let zeros = vec![0u8; 32 * 1024];
        for _ in 0..192 {
            rec.output(&zeros);
        }
        let stopped = std::fs::metadata(&cast).unwrap().len();
        assert!(stopped <= MAX_RECORDING + 200, "{stopped} bytes");
        assert!(
            stopped > MAX_RECORDING - 2 * 6 * EVENT_BYTES as u64,
            "{stopped} bytes"
        );
        rec.output(b"more");
        rec.resize(100, 30);
        rec.finish("alice", "pi", "exec");
        assert_eq!(std::fs::metadata(&cast).unwrap().len(), stopped);
        let text = std::fs::read_to_string(&cast).unwrap();
        let last: (f64, String, String) =
            serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert!(last.2.contains("reached its size limit"), "{last:?}");
        assert!(
            text.lines()
                .skip(1)
                .all(|l| serde_json::from_str::<(f64, String, String)>(l).is_ok())
        );
    }

    #[test]
    fn events_are_cut_between_characters_within_the_limit() {
        let text = "é".repeat(3000);
        let pieces = split_at_chars(&text, EVENT_BYTES);
        assert!(pieces.iter().all(|p| p.len() <= EVENT_BYTES));
        assert_eq!(pieces.concat(), text);
        let mut line = Vec::new();
        event_into(&mut line, 1.5, "o", "\u{1b}[0m\"x\"\n");
        assert_eq!(line, b"[1.5,\"o\",\"\\u001b[0m\\\"x\\\"\\n\"]\n");
    }
}
