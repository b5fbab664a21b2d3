//! The audit log: JSON lines, one file a day (UTC), in the proxy's data dir, as the seeds keep
//! theirs. Nodes send their events (session start and end, exec, failed logins) on their
//! tunnels' control streams; the proxy that receives one appends it.
//!
//! Every line is stamped with the proxy's own clock (`time`); the node's claim is kept as a plain
//! number (`node_time`, Unix milliseconds) and never used for anything that can fail, such as
//! naming the file. Files are written by one thread of their own, fed through a bounded queue, so
//! a slow disk never stalls a tunnel's control loop; when the queue is full, events are dropped
//! and counted in the log.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};

use tunnel_proto::wire::AuditEvent;

/// Lines waiting for the writer thread.
const QUEUE: usize = 8192;

pub struct AuditLog {
    queue: SyncSender<Line>,
    dropped: AtomicU64,
}

/// One line and the UTC day it belongs to.
struct Line {
    day: String,
    text: String,
}

impl AuditLog {
    /// Starts the writer thread for `dir`; it ends when the log is dropped.
    pub fn new(dir: PathBuf) -> Self {
        let (queue, lines) = std::sync::mpsc::sync_channel::<Line>(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("burrow-audit".into())
            .spawn(move || write_lines(&dir, lines));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the audit log writer");
        }
        Self {
            queue,
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues one event, received on a tunnel of `host_id` (which the event cannot override).
    pub fn append(&self, event: &AuditEvent, host_id: &str) {
        let now = std::time::SystemTime::now();
        let time = humantime::format_rfc3339_millis(now).to_string();
        let day = time.get(..10).unwrap_or("unknown").to_string();
        let mut line = serde_json::Map::new();
        for (k, v) in &event.fields {
            line.insert(k.clone(), v.clone().into());
        }
        line.insert("event".into(), event.event.clone().into());
        line.insert("time".into(), time.into());
        line.insert("node_time".into(), event.time.into());
        line.insert("host_id".into(), host_id.to_string().into());
        let mut text = serde_json::Value::Object(line).to_string();
        text.push('\n');
        match self.queue.try_send(Line { day, text }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::error!(dropped = n, "the audit log cannot keep up; events dropped");
                }
            }
        }
    }
}

fn write_lines(dir: &std::path::Path, lines: std::sync::mpsc::Receiver<Line>) {
    let mut open: Option<(String, std::fs::File)> = None;
    for Line { day, text } in lines {
        if open.as_ref().is_none_or(|(d, _)| *d != day) {
            let path = dir.join(format!("{day}.log"));
            let file = std::fs::create_dir_all(dir).and_then(|_| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
            });
            match file {
                Ok(f) => open = Some((day, f)),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot open the audit log");
                    continue;
                }
            }
        }
        if let Some((_, f)) = open.as_mut()
            && let Err(e) = f.write_all(text.as_bytes())
        {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_the_proxys_time_whatever_the_node_claims() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path().to_path_buf());
        let mut fields = tunnel_proto::api::Labels::new();
        fields.insert("host_id".into(), "forged".into());
        fields.insert("time".into(), "forged".into());
        log.append(
            &AuditEvent {
                event: "exec".into(),
                time: u64::MAX,
                fields,
            },
            "real-host",
        );
        drop(log);
        let today = humantime::format_rfc3339(std::time::SystemTime::now()).to_string();
        let path = dir.path().join(format!("{}.log", &today[..10]));
        let text = (0..100)
            .find_map(|_| {
                std::thread::sleep(std::time::Duration::from_millis(20));
                std::fs::read_to_string(&path)
                    .ok()
                    .filter(|t| !t.is_empty())
            })
            .expect("the line is written");
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["host_id"], "real-host");
        assert_eq!(line["node_time"], u64::MAX);
        assert!(line["time"].as_str().unwrap().starts_with(&today[..10]));
    }
}
