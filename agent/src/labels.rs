//! Node labels: static ones, and command labels whose value is the trimmed output of a command
//! re-run every period (`arch=[1h:uname -m]`, or `commands:` in the config).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tunnel_proto::api::Labels;

/// The longest a label command may run before it is killed.
const MAX_COMMAND_TIME: Duration = Duration::from_secs(30);
/// Label values are capped, so a chatty command cannot bloat every heartbeat.
const MAX_VALUE: usize = 256;
const MIN_PERIOD: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandLabel {
    pub name: String,
    /// Program and arguments; no shell is involved.
    pub command: Vec<String>,
    #[serde(with = "humantime_serde_compat")]
    pub period: Duration,
}

mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// Parses `k=v,k2=[1m:uname -r]` into static labels and command labels.
pub fn parse(spec: &str) -> Result<(Labels, Vec<CommandLabel>), String> {
    let mut statics = Labels::new();
    let mut commands = Vec::new();
    for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("label {pair:?} is not key=value"))?;
        let k = k.trim().to_string();
        tunnel_proto::api::parse_labels(&format!("{k}=x"))?;
        let v = v.trim();
        if let Some(inner) = v.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
            let (period, command) = inner.split_once(':').ok_or_else(|| {
                format!("command label {k}: expected [PERIOD:COMMAND ARGS], e.g. [1m:uname -r]")
            })?;
            let period = humantime::parse_duration(period.trim())
                .map_err(|e| format!("command label {k}: bad period {period:?}: {e}"))?;
            let command: Vec<String> = command.split_whitespace().map(str::to_string).collect();
            commands.push(validate(CommandLabel {
                name: k,
                command,
                period,
            })?);
        } else {
            statics.insert(k, v.to_string());
        }
    }
    Ok((statics, commands))
}

pub fn validate(c: CommandLabel) -> Result<CommandLabel, String> {
    if c.command.is_empty() {
        return Err(format!("command label {}: the command is empty", c.name));
    }
    if c.period < MIN_PERIOD {
        return Err(format!(
            "command label {}: the period must be at least 1s",
            c.name
        ));
    }
    tunnel_proto::api::parse_labels(&format!("{}=x", c.name))?;
    Ok(c)
}

/// Runs the command labels and publishes `base` merged with their latest values.
pub fn spawn(
    base: Labels,
    commands: Vec<CommandLabel>,
    shutdown: CancellationToken,
) -> watch::Receiver<Labels> {
    let mut initial = base.clone();
    for c in &commands {
        initial.insert(c.name.clone(), String::new());
    }
    let (tx, rx) = watch::channel(initial);
    // The sender lives until shutdown even without commands: tunnels treat a closed channel
    // as the agent stopping.
    let keeper = tx.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        stop.cancelled().await;
        drop(keeper);
    });
    for c in commands {
        let tx = tx.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let value = run_once(&c).await;
                tx.send_if_modified(|labels| {
                    let changed = labels.get(&c.name) != Some(&value);
                    labels.insert(c.name.clone(), value.clone());
                    changed
                });
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(c.period) => {}
                }
            }
        });
    }
    rx
}

async fn run_once(c: &CommandLabel) -> String {
    let timeout = c.period.min(MAX_COMMAND_TIME);
    let mut cmd = tokio::process::Command::new(&c.command[0]);
    cmd.args(&c.command[1..])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(timeout, cmd.output()).await {
        Ok(Ok(out)) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let mut value = text.trim().to_string();
            if value.len() > MAX_VALUE {
                let mut cut = MAX_VALUE;
                while !value.is_char_boundary(cut) {
                    cut -= 1;
                }
                value.truncate(cut);
            }
            value
        }
        Ok(Ok(out)) => {
            tracing::warn!(label = %c.name, status = %out.status, "label command failed");
            String::new()
        }
        Ok(Err(e)) => {
            tracing::warn!(label = %c.name, error = %e, "cannot run label command");
            String::new()
        }
        Err(_) => {
            tracing::warn!(label = %c.name, "label command timed out");
            String::new()
        }
    }
}

/// Merges label sources; later ones win.
pub fn merge(sources: &[&Labels]) -> Labels {
    let mut out = BTreeMap::new();
    for s in sources {
        out.extend(s.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_static_and_command_labels() {
        let (s, c) = parse("env=prod, kernel=[1m:uname -r] ,arch=[1h:uname -m]").unwrap();
        assert_eq!(s, Labels::from([("env".into(), "prod".into())]));
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].name, "kernel");
        assert_eq!(c[0].command, vec!["uname", "-r"]);
        assert_eq!(c[0].period, Duration::from_secs(60));
        assert!(parse("k=[1m]").is_err());
        assert!(parse("k=[soon:ls]").is_err());
        assert!(parse("k=[1m: ]").is_err());
        assert!(parse("k=[10ms:ls]").is_err());
        assert!(parse("bad key=v").is_err());
    }

    #[tokio::test]
    async fn command_labels_publish_trimmed_output_and_failures_as_empty() {
        let shutdown = CancellationToken::new();
        let (_, commands) = parse("greeting=[1h:echo  hello ],broken=[1h:false]").unwrap();
        let mut rx = spawn(
            Labels::from([("env".into(), "lab".into())]),
            commands,
            shutdown.clone(),
        );
        let labels = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if rx.borrow().get("greeting").is_some_and(|v| !v.is_empty()) {
                    return rx.borrow().clone();
                }
                rx.changed().await.unwrap();
            }
        })
        .await
        .unwrap();
        assert_eq!(labels["greeting"], "hello");
        assert_eq!(labels["broken"], "");
        assert_eq!(labels["env"], "lab");
        shutdown.cancel();
    }
}
