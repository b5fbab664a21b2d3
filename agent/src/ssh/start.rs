//! Starting a session's program: a shell, an exec or the SFTP subsystem (a forced command
//! replaces any of them), run as the login with its environment, wired to the channel through
//! the pump, with the audit events of its start and end.

use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;

use russh::ChannelId;
use russh::server::Session;
use tokio::sync::mpsc;
use tunnel_proto::api::Labels;
use tunnel_proto::wire::{AuditEvent, RecordingMode};

use super::NodeHandler;
use super::process::{self, Io, Program};
use super::pump;

/// Whether a session is recorded under `mode`: shells and commands with a terminal, and
/// commands without one unless they are file transfers (`scp`, audited as such instead).
fn records(mode: RecordingMode, with_pty: bool, command: Option<&str>) -> bool {
    let transfer = command.is_some_and(|c| c.trim_start().starts_with("scp "));
    match mode {
        RecordingMode::All => with_pty || !transfer,
        RecordingMode::Pty => with_pty,
        RecordingMode::Off => false,
    }
}

/// What a session channel asked to run.
pub(super) enum Start {
    Shell,
    Exec(String),
    Sftp,
}

impl NodeHandler {
    pub(super) async fn start(
        &mut self,
        id: ChannelId,
        what: Start,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let Some(login) = self.login.clone() else {
            session.channel_failure(id)?;
            return Ok(());
        };
        let state = self.channels.entry(id).or_default();
        if state.group.is_some() {
            // One program per channel, as in OpenSSH.
            session.channel_failure(id)?;
            return Ok(());
        }
        // A forced command replaces whatever was asked for, subsystems included (as sshd's
        // ForceCommand does); the program sees the request in SSH_ORIGINAL_COMMAND.
        let requested = match &what {
            Start::Shell => None,
            Start::Exec(c) => Some(c.clone()),
            Start::Sftp => Some("sftp".to_string()),
        };
        let mut env = state.env.clone();
        let (program, command) = match (&what, &self.force_command) {
            (_, Some(forced)) => {
                if let Some(original) = &requested {
                    env.push(("SSH_ORIGINAL_COMMAND".into(), original.clone()));
                }
                (Program::Command(forced), Some(forced.clone()))
            }
            (Start::Sftp, None) => (Program::Sftp, None),
            (Start::Exec(c), None) => (Program::Command(c), Some(c.clone())),
            (Start::Shell, None) => (Program::Shell, None),
        };
        let is_sftp = matches!(program, Program::Sftp);
        let pty = match program {
            Program::Sftp => None,
            _ => state.pty.as_ref(),
        };
        let spawned = process::spawn(&login, program, pty, &env);
        let mut spawned = match spawned {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(login = %login.name, error = %e, "cannot start the session");
                session.channel_failure(id)?;
                return Ok(());
            }
        };
        session.channel_success(id)?;
        // 128 random bits: a recording is stored under it, and a node must not be able to guess
        // another's.
        let session_id = tunnel_proto::hex(&rand::random::<[u8; 16]>());
        let kind = match &what {
            Start::Shell => "shell",
            Start::Exec(_) => "exec",
            Start::Sftp => "sftp",
        };
        let with_pty = !matches!(what, Start::Sftp) && state.pty.is_some();
        let recorder = match (&self.ctx.recordings, &what) {
            (Some(up), Start::Shell | Start::Exec(_))
                if records(up.mode(), with_pty, command.as_deref()) =>
            {
                let (size, term) = state.pty.as_ref().map_or(((80, 24), "dumb"), |p| {
                    ((u32::from(p.cols), u32::from(p.rows)), p.term.as_str())
                });
                let title = format!("{}@{}", login.name, self.ctx.node_name);
                crate::record::Recorder::start(
                    up,
                    &session_id,
                    size,
                    term,
                    title,
                    self.via.as_deref(),
                )
            }
            _ => None,
        };
        state.session_id = Some(session_id.clone());
        state.recorder = recorder.clone();
        if is_sftp {
            state.sftp = Some(super::transfer::SftpWatch::default());
        }
        let transfer = command.as_deref().and_then(super::transfer::scp);
        state.group = Some(spawned.group.clone());
        let handle = session.handle();
        let (tx, rx) = mpsc::channel::<Vec<u8>>(64);
        state.stdin = Some(tx);
        let output = match spawned.io {
            Io::Pty(master) => {
                let master = Arc::new(master);
                state.master = Some(master.clone());
                tokio::spawn(pump::pump_pty(
                    master,
                    rx,
                    handle.clone(),
                    id,
                    recorder.clone(),
                ))
            }
            Io::Pipes => {
                let child = &mut spawned.child;
                let (stdin, stdout, stderr) =
                    (child.stdin.take(), child.stdout.take(), child.stderr.take());
                tokio::spawn(pump::pump_pipes(
                    stdin,
                    stdout,
                    stderr,
                    rx,
                    (handle.clone(), id),
                    recorder.clone(),
                ))
            }
        };
        let audit = self.audit.clone();
        let mut fields = Labels::new();
        for (k, v) in [
            ("node", self.ctx.node_name.clone()),
            ("host_id", self.ctx.host_id.clone()),
            ("client", self.client.clone()),
            ("user", self.user.clone().unwrap_or_default()),
            ("login", login.name.clone()),
            ("session_id", session_id),
        ] {
            fields.insert(k.into(), v);
        }
        self.event(
            "session.start",
            &[
                ("session_id", fields["session_id"].clone()),
                ("kind", kind.into()),
                ("recorded", recorder.is_some().to_string()),
            ],
        );
        if let Some((direction, path)) = transfer {
            self.event(
                "scp",
                &[
                    ("session_id", fields["session_id"].clone()),
                    ("direction", direction.to_string()),
                    ("path", path),
                ],
            );
        }
        let who = (
            self.user.clone().unwrap_or_default(),
            login.name.clone(),
            kind,
        );
        let (mut child, group) = (spawned.child, spawned.group);
        tokio::spawn(async move {
            let status = process::wait(&mut child, &group).await;
            let _ = output.await;
            if let Some(recorder) = &recorder {
                recorder.finish(&who.0, &who.1, who.2);
            }
            let (code, signal) = match &status {
                Ok(s) => (s.code(), s.signal()),
                Err(_) => (Some(255), None),
            };
            match (code, signal) {
                (_, Some(sig)) => {
                    let _ = handle
                        .exit_signal_request(
                            id,
                            process::signal_name(sig),
                            false,
                            String::new(),
                            String::new(),
                        )
                        .await;
                }
                (Some(c), None) => {
                    let _ = handle.exit_status_request(id, c as u32).await;
                }
                (None, None) => {}
            }
            let _ = handle.eof(id).await;
            let _ = handle.close(id).await;
            let exit = code.map_or_else(
                || format!("signal {}", signal.unwrap_or(0)),
                |c| c.to_string(),
            );
            if let Some(cmd) = command {
                let mut f = fields.clone();
                f.insert("command".into(), cmd);
                f.insert("exit_code".into(), exit.clone());
                let _ = audit.try_send(AuditEvent {
                    event: "exec".into(),
                    time: burrow_daemon::unix_now_ms(),
                    fields: f,
                });
            }
            fields.insert("exit_code".into(), exit);
            let _ = audit.try_send(AuditEvent {
                event: "session.end".into(),
                time: burrow_daemon::unix_now_ms(),
                fields,
            });
        });
        Ok(())
    }
}
