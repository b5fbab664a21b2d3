//! The audit log: JSON lines, one file a day (UTC), in the proxy's data dir, as the seeds keep
//! theirs. Nodes send their events (session start and end, exec, failed logins) on their
//! tunnels' control streams; the proxy that receives one appends it.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, UNIX_EPOCH};

use tunnel_proto::wire::AuditEvent;

pub struct AuditLog {
    dir: PathBuf,
    open: Mutex<Option<(String, std::fs::File)>>,
}

impl AuditLog {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            open: Mutex::new(None),
        }
    }

    /// Appends one event, received on a tunnel of `host_id` (which the event cannot override).
    pub fn append(&self, event: &AuditEvent, host_id: &str) {
        let time = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(event.time))
            .to_string();
        let day = time.get(..10).unwrap_or("unknown").to_string();
        let mut line = serde_json::Map::new();
        for (k, v) in &event.fields {
            line.insert(k.clone(), v.clone().into());
        }
        line.insert("event".into(), event.event.clone().into());
        line.insert("time".into(), time.into());
        line.insert("host_id".into(), host_id.to_string().into());
        let mut text = serde_json::Value::Object(line).to_string();
        text.push('\n');
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.as_ref().is_none_or(|(d, _)| *d != day) {
            let path = self.dir.join(format!("{day}.log"));
            let file = std::fs::create_dir_all(&self.dir).and_then(|_| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
            });
            match file {
                Ok(f) => *open = Some((day, f)),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot open the audit log");
                    return;
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
