//! `burrow-agent status`: the node's identity from its data dir, and the running agent's state
//! from the status file it keeps there ([`crate::telemetry`]).

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use crate::identity::Identity;
use crate::telemetry::{self, Status};

/// What `status` reports.
#[derive(Debug, Serialize)]
pub struct Report {
    pub joined: bool,
    pub node_name: Option<String>,
    pub host_id: Option<String>,
    pub cluster: Option<String>,
    /// "running", "stopped" or "not running" (no status file, or its process is gone).
    pub agent: &'static str,
    #[serde(flatten)]
    pub status: Option<Status>,
}

/// Builds the report for `data_dir`; an error is one sentence (exit code 1).
pub fn report(data_dir: &Path) -> Result<Report, String> {
    let identity = Identity::load(data_dir).map_err(|e| e.to_string())?;
    let status = telemetry::read_status(data_dir)?;
    let agent = match &status {
        None => "not running",
        Some(s) if s.stopped.is_some() => "stopped",
        Some(s) if !process_alive(s.pid) => "not running",
        Some(_) => "running",
    };
    Ok(Report {
        joined: identity.is_some(),
        node_name: identity.as_ref().map(|i| i.node_name.clone()),
        host_id: identity.as_ref().map(|i| i.host_id.clone()),
        cluster: identity.as_ref().map(|i| i.cluster_name.clone()),
        agent,
        status,
    })
}

/// Whether the process that wrote the status file still runs (a crash leaves the file behind).
fn process_alive(pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    // A pid reused by another program is not the agent.
    cmdline
        .split(|b| *b == 0)
        .next()
        .is_some_and(|argv0| argv0.ends_with(b"burrow-agent"))
}

/// The report for people.
pub fn render(report: &Report, data_dir: &Path) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<12}{v}\n"));
    if !report.joined {
        line(
            "node:",
            format!("not joined yet (no identity in {})", data_dir.display()),
        );
    } else {
        line(
            "node:",
            format!(
                "{} (host id {})",
                report.node_name.as_deref().unwrap_or("?"),
                report.host_id.as_deref().unwrap_or("?")
            ),
        );
        line("cluster:", report.cluster.clone().unwrap_or_default());
    }
    let Some(s) = &report.status else {
        line(
            "agent:",
            "not running (it has written no status yet)".into(),
        );
        return out;
    };
    match report.agent {
        "running" => line(
            "agent:",
            format!("running (pid {}, since {})", s.pid, time(s.started)),
        ),
        "stopped" => line(
            "agent:",
            format!("stopped at {}", time(s.stopped.unwrap_or(s.updated))),
        ),
        _ => line(
            "agent:",
            format!(
                "not running (pid {} is gone; last state from {})",
                s.pid,
                time(s.updated)
            ),
        ),
    }
    line("proxy:", s.proxy_addr.clone());
    if report.agent == "running" {
        line("tunnels:", s.tunnels.len().to_string());
        for t in &s.tunnels {
            out.push_str(&format!(
                "  {}  {}  since {}\n",
                t.proxy,
                t.transport,
                time(t.since)
            ));
        }
    }
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<12}{v}\n"));
    if let Some(e) = &s.last_error {
        line("last error:", format!("{} at {}", e.message, time(e.at)));
    }
    if let Some(addr) = &s.diag_addr {
        line("metrics:", format!("http://{addr}/metrics"));
    }
    out
}

fn time(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}
