//! Recorded sessions: `sessions ls`, `sessions export` and `play`.

use std::io::Write;
use std::time::Duration;

use serde_json::json;
use tunnel_proto::api::{self, SessionCast, SessionList, SessionRecord};

use crate::cli::Format;
use crate::output::{print_json, print_table};
use crate::{Admin, Failure, usage};

/// The most pieces one recording is fetched in (1 MiB each; recordings are at most 33 MiB).
const MAX_PIECES: usize = 64;

pub async fn ls(
    admin: &Admin,
    format: Format,
    node: Option<&str>,
    user: Option<&str>,
) -> Result<(), Failure> {
    let mut query = Vec::new();
    for (k, v) in [("node", node), ("user", user)] {
        if let Some(v) = v {
            query.push(format!("{k}={}", encode(v)));
        }
    }
    let path = match query.is_empty() {
        true => api::SESSIONS_PATH.to_string(),
        false => format!("{}?{}", api::SESSIONS_PATH, query.join("&")),
    };
    let list: SessionList = admin.client.get(&path).await?;
    match format {
        Format::Json => print_json(&json!({ "sessions": list.sessions })),
        Format::Text | Format::Ansible => {
            let rows: Vec<[String; 8]> = list
                .sessions
                .iter()
                .map(|s| {
                    [
                        s.session_id.clone(),
                        s.user.clone(),
                        s.login.clone(),
                        s.node.clone(),
                        time_ms(s.started),
                        time_ms(s.ended),
                        humantime::format_duration(Duration::from_secs(
                            s.ended.saturating_sub(s.started) / 1000,
                        ))
                        .to_string(),
                        s.size.to_string(),
                    ]
                })
                .collect();
            print_table(
                &[
                    "ID", "USER", "LOGIN", "NODE", "START", "END", "DURATION", "BYTES",
                ],
                &rows,
            );
        }
    }
    Ok(())
}

/// The whole recording of `session_id`, fetched piece by piece.
async fn fetch(admin: &Admin, session_id: &str) -> Result<(SessionRecord, String), Failure> {
    let mut text = String::new();
    let mut record = None;
    for _ in 0..MAX_PIECES {
        let path = format!(
            "{}?id={}&offset={}",
            api::SESSION_CAST_PATH,
            encode(session_id),
            text.len()
        );
        let piece: SessionCast = admin.client.get(&path).await?;
        let done =
            piece.data.is_empty() || piece.offset + piece.data.len() as u64 >= piece.session.size;
        text.push_str(&piece.data);
        record = Some(piece.session);
        if done {
            break;
        }
    }
    let record = record.expect("at least one piece");
    Ok((record, text))
}

pub async fn export(admin: &Admin, session_id: &str) -> Result<(), Failure> {
    let (_, text) = fetch(admin, session_id).await?;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Failure {
            code: 1,
            message: format!("cannot write the recording: {e}"),
        })
}

/// Replays `session_id`: each output when it came, `speed` times as fast, pauses at most
/// `idle_limit` (window changes are not replayed: the terminal keeps its own size).
pub async fn play(
    admin: &Admin,
    session_id: &str,
    speed: f64,
    idle_limit: &str,
) -> Result<(), Failure> {
    let idle_limit = humantime::parse_duration(idle_limit).map_err(|e| {
        usage(format!(
            "--idle-limit {idle_limit:?} is not a duration like 2s: {e}"
        ))
    })?;
    if !(speed.is_finite() && speed > 0.0) {
        return Err(usage("--speed must be a positive number"));
    }
    let (_, text) = fetch(admin, session_id).await?;
    let mut lines = text.lines();
    let bad = |why: String| Failure {
        code: 1,
        message: format!("recording {session_id} is not asciicast v2: {why}"),
    };
    let header: serde_json::Value = serde_json::from_str(lines.next().unwrap_or(""))
        .map_err(|e| bad(format!("its header: {e}")))?;
    if header["version"] != 2 {
        return Err(bad(format!("version {}", header["version"])));
    }
    let mut out = std::io::stdout().lock();
    let mut last = 0.0f64;
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let (t, kind, data): (f64, String, String) =
            serde_json::from_str(line).map_err(|e| bad(format!("an event: {e}")))?;
        let pause = ((t - last).max(0.0) / speed).min(idle_limit.as_secs_f64());
        last = t;
        if pause > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(pause)).await;
        }
        if kind == "o" {
            let written = out.write_all(data.as_bytes()).and_then(|()| out.flush());
            if written.is_err() {
                // The reader went away (a pager, `head`): done.
                return Ok(());
            }
        }
    }
    Ok(())
}

fn time_ms(ms: u64) -> String {
    crate::output::rfc3339(ms / 1000)
}

/// A query-string value: letters, digits and `-_.` as they are, the rest percent-encoded.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
