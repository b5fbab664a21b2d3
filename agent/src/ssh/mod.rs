//! The node's SSH server, served over every dial stream of every tunnel.
//!
//! It presents the node's host certificate (principals: host id and node name), accepts only user
//! certificates from the cluster's user CA, of type user, valid now, with the requested login
//! among their principals, and honours the `force-command` and `source-address` critical
//! options. Sessions run as the requested OS login: a shell on a real PTY, exec with exit status,
//! env, window changes, signals, the SFTP subsystem (the system's sftp-server), and
//! `direct-tcpip` forwarding. Every session start and end, exec and failed login becomes an
//! audit event.
//!
//! - [`policy`]: the certificate checks and where forwarding may connect.
//! - [`process`]: starting programs as the login (privilege drop, PTYs, no leaked descriptors)
//!   and signalling them safely.

mod policy;
mod process;

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::ssh_key::{Certificate, PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Handle, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure, Sig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tunnel_proto::api::Labels;
use tunnel_proto::transport::TunnelStream;
use tunnel_proto::wire::AuditEvent;

pub use self::policy::{Grant, PermitOpen, check_certificate};
use self::process::{Io, Login, ProcessGroup, Program, PtySpec};
use crate::identity::Identity;

/// What every SSH connection on this node shares.
pub struct SshContext {
    pub config: Arc<russh::server::Config>,
    pub user_cas: Vec<PublicKey>,
    pub node_name: String,
    pub host_id: String,
    /// Where `direct-tcpip` may connect.
    pub permit_open: PermitOpen,
}

impl SshContext {
    pub fn new(identity: &Identity, permit_open: PermitOpen) -> anyhow::Result<Self> {
        let key = PrivateKey::from_openssh(identity.ssh_key.expose())?;
        let cert = Certificate::from_openssh(&identity.ssh_cert)?;
        let user_cas = identity
            .user_ca_ssh
            .iter()
            .map(|k| PublicKey::from_openssh(k.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        let config = tunnel_proto::sshcert::server_config(key, cert);
        Ok(Self {
            config: Arc::new(config),
            user_cas,
            node_name: identity.node_name.clone(),
            host_id: identity.host_id.clone(),
            permit_open,
        })
    }
}

/// Serves one SSH connection on a dial stream. `client` is the user's address as the proxy saw it.
pub async fn serve(
    ctx: Arc<SshContext>,
    stream: TunnelStream,
    client: String,
    audit: mpsc::Sender<AuditEvent>,
) {
    let handler = NodeHandler {
        ctx: ctx.clone(),
        client_ip: client
            .rsplit_once(':')
            .and_then(|(ip, _)| ip.trim_matches(['[', ']']).parse().ok()),
        client,
        audit,
        login: None,
        user: None,
        force_command: None,
        permit_pty: false,
        permit_port_forwarding: false,
        channels: HashMap::new(),
    };
    match russh::server::run_stream(ctx.config.clone(), stream, handler).await {
        Ok(running) => {
            let _ = running.await;
        }
        Err(e) => tracing::debug!(error = %e, "SSH handshake failed"),
    }
}

/// Serves SSH on a local listener (`--ssh-listen`). Its audit events go to the agent's log: they
/// have no tunnel to travel on.
pub async fn serve_listener(
    listener: tokio::net::TcpListener,
    ctx: Arc<SshContext>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let (audit, mut events) = mpsc::channel::<AuditEvent>(256);
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            tracing::info!(event = %e.event, fields = ?e.fields, "audit");
        }
    });
    while let Some((tcp, peer)) = tunnel_proto::daemon::accept(&listener, &shutdown).await {
        let _ = tcp.set_nodelay(true);
        tokio::spawn(serve(
            ctx.clone(),
            Box::new(tcp),
            peer.to_string(),
            audit.clone(),
        ));
    }
}

#[derive(Default)]
struct ChanState {
    pty: Option<PtySpec>,
    env: Vec<(String, String)>,
    stdin: Option<mpsc::Sender<Vec<u8>>>,
    master: Option<Arc<OwnedFd>>,
    group: Option<Arc<ProcessGroup>>,
}

struct NodeHandler {
    ctx: Arc<SshContext>,
    client: String,
    client_ip: Option<IpAddr>,
    audit: mpsc::Sender<AuditEvent>,
    login: Option<Login>,
    user: Option<String>,
    force_command: Option<String>,
    permit_pty: bool,
    permit_port_forwarding: bool,
    channels: HashMap<ChannelId, ChanState>,
}

impl NodeHandler {
    fn event(&self, event: &str, extra: &[(&str, String)]) {
        let mut fields = Labels::new();
        fields.insert("node".into(), self.ctx.node_name.clone());
        fields.insert("host_id".into(), self.ctx.host_id.clone());
        fields.insert("client".into(), self.client.clone());
        if let Some(u) = &self.user {
            fields.insert("user".into(), u.clone());
        }
        if let Some(l) = &self.login {
            fields.insert("login".into(), l.name.clone());
        }
        for (k, v) in extra {
            fields.insert((*k).to_string(), v.clone());
        }
        let _ = self.audit.try_send(AuditEvent {
            event: event.into(),
            time: tunnel_proto::unix_now_ms(),
            fields,
        });
    }

    async fn start(
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
        let session_id = format!("{:016x}", rand::random::<u64>());
        let kind = match &what {
            Start::Shell => "shell",
            Start::Exec(_) => "exec",
            Start::Sftp => "sftp",
        };
        state.group = Some(spawned.group.clone());
        let handle = session.handle();
        let (tx, rx) = mpsc::channel::<Vec<u8>>(64);
        state.stdin = Some(tx);
        let output = match spawned.io {
            Io::Pty(master) => {
                let master = Arc::new(master);
                state.master = Some(master.clone());
                tokio::spawn(pump_pty(master, rx, handle.clone(), id))
            }
            Io::Pipes => {
                let child = &mut spawned.child;
                let (stdin, stdout, stderr) =
                    (child.stdin.take(), child.stdout.take(), child.stderr.take());
                tokio::spawn(pump_pipes(stdin, stdout, stderr, rx, handle.clone(), id))
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
            ],
        );
        let (mut child, group) = (spawned.child, spawned.group);
        tokio::spawn(async move {
            let status = process::wait(&mut child, &group).await;
            let _ = output.await;
            let (code, signal) = match &status {
                Ok(s) => (s.code(), s.signal()),
                Err(_) => (Some(255), None),
            };
            match (code, signal) {
                (_, Some(sig)) => {
                    let _ = handle
                        .exit_signal_request(
                            id,
                            signal_name(sig),
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
                    time: tunnel_proto::unix_now_ms(),
                    fields: f,
                });
            }
            fields.insert("exit_code".into(), exit);
            let _ = audit.try_send(AuditEvent {
                event: "session.end".into(),
                time: tunnel_proto::unix_now_ms(),
                fields,
            });
        });
        Ok(())
    }
}

enum Start {
    Shell,
    Exec(String),
    Sftp,
}

fn signal_name(sig: i32) -> Sig {
    use nix::sys::signal::Signal;
    match Signal::try_from(sig) {
        Ok(Signal::SIGABRT) => Sig::ABRT,
        Ok(Signal::SIGALRM) => Sig::ALRM,
        Ok(Signal::SIGFPE) => Sig::FPE,
        Ok(Signal::SIGHUP) => Sig::HUP,
        Ok(Signal::SIGILL) => Sig::ILL,
        Ok(Signal::SIGINT) => Sig::INT,
        Ok(Signal::SIGKILL) => Sig::KILL,
        Ok(Signal::SIGPIPE) => Sig::PIPE,
        Ok(Signal::SIGQUIT) => Sig::QUIT,
        Ok(Signal::SIGSEGV) => Sig::SEGV,
        Ok(Signal::SIGTERM) => Sig::TERM,
        Ok(Signal::SIGUSR1) => Sig::USR1,
        Ok(other) => Sig::Custom(other.as_str().trim_start_matches("SIG").to_string()),
        Err(_) => Sig::Custom(sig.to_string()),
    }
}

fn to_signal(sig: &Sig) -> Option<nix::sys::signal::Signal> {
    use nix::sys::signal::Signal;
    Some(match sig {
        Sig::ABRT => Signal::SIGABRT,
        Sig::ALRM => Signal::SIGALRM,
        Sig::FPE => Signal::SIGFPE,
        Sig::HUP => Signal::SIGHUP,
        Sig::ILL => Signal::SIGILL,
        Sig::INT => Signal::SIGINT,
        Sig::KILL => Signal::SIGKILL,
        Sig::PIPE => Signal::SIGPIPE,
        Sig::QUIT => Signal::SIGQUIT,
        Sig::SEGV => Signal::SIGSEGV,
        Sig::TERM => Signal::SIGTERM,
        Sig::USR1 => Signal::SIGUSR1,
        Sig::Custom(name) => format!("SIG{name}").parse().ok()?,
    })
}

/// Output on its way to the client: (extended stream, bytes).
type Chunk = (Option<u32>, Vec<u8>);

/// Most output bytes a session holds in memory when the client reads slower than the program
/// writes.
const OUTPUT_BUDGET: usize = 8 * 1024 * 1024;

/// Forwards output to the client in order. Readers hand chunks over without waiting for the SSH
/// session (whose loop may be busy pushing input the program has not read yet: waiting there
/// could deadlock), within a byte budget.
fn output_forwarder(handle: Handle, id: ChannelId) -> (OutputSender, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Chunk, tokio::sync::OwnedSemaphorePermit)>();
    let budget = Arc::new(tokio::sync::Semaphore::new(OUTPUT_BUDGET));
    let task = tokio::spawn(async move {
        while let Some(((ext, bytes), _permit)) = rx.recv().await {
            let sent = match ext {
                None => handle.data(id, bytes).await,
                Some(e) => handle.extended_data(id, e, bytes).await,
            };
            if sent.is_err() {
                return;
            }
        }
    });
    (OutputSender { tx, budget }, task)
}

#[derive(Clone)]
struct OutputSender {
    tx: mpsc::UnboundedSender<(Chunk, tokio::sync::OwnedSemaphorePermit)>,
    budget: Arc<tokio::sync::Semaphore>,
}

impl OutputSender {
    async fn send(&self, ext: Option<u32>, bytes: Vec<u8>) -> bool {
        let n = u32::try_from(bytes.len().min(OUTPUT_BUDGET)).unwrap_or(u32::MAX);
        let Ok(permit) = self.budget.clone().acquire_many_owned(n).await else {
            return false;
        };
        self.tx.send(((ext, bytes), permit)).is_ok()
    }
}

async fn pump_pty(
    master: Arc<OwnedFd>,
    mut input: mpsc::Receiver<Vec<u8>>,
    handle: Handle,
    id: ChannelId,
) {
    let (Ok(r), Ok(w)) = (master.try_clone(), master.try_clone()) else {
        return;
    };
    let mut reader = tokio::fs::File::from_std(std::fs::File::from(r));
    let mut writer = tokio::fs::File::from_std(std::fs::File::from(w));
    let writing = tokio::spawn(async move {
        while let Some(bytes) = input.recv().await {
            if writer.write_all(&bytes).await.is_err() {
                break;
            }
            let _ = writer.flush().await;
        }
    });
    let (out, forwarding) = output_forwarder(handle, id);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break, // EIO once the last process on the terminal is gone
            Ok(n) => {
                if !out.send(None, buf[..n].to_vec()).await {
                    break;
                }
            }
        }
    }
    writing.abort();
    drop(out);
    let _ = forwarding.await;
}

async fn pump_pipes(
    stdin: Option<tokio::process::ChildStdin>,
    stdout: Option<tokio::process::ChildStdout>,
    stderr: Option<tokio::process::ChildStderr>,
    mut input: mpsc::Receiver<Vec<u8>>,
    handle: Handle,
    id: ChannelId,
) {
    let writing = tokio::spawn(async move {
        let Some(mut stdin) = stdin else { return };
        while let Some(bytes) = input.recv().await {
            if stdin.write_all(&bytes).await.is_err() {
                return;
            }
        }
        // The client sent EOF: the program sees its stdin end.
        let _ = stdin.shutdown().await;
    });
    let (sender, forwarding) = output_forwarder(handle, id);
    let out = {
        let sender = sender.clone();
        async move {
            let Some(mut stdout) = stdout else { return };
            let mut buf = vec![0u8; 32 * 1024];
            while let Ok(n) = stdout.read(&mut buf).await {
                if n == 0 || !sender.send(None, buf[..n].to_vec()).await {
                    break;
                }
            }
        }
    };
    let err = {
        let sender = sender.clone();
        async move {
            let Some(mut stderr) = stderr else { return };
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 || !sender.send(Some(1), buf[..n].to_vec()).await {
                    break;
                }
            }
        }
    };
    tokio::join!(out, err);
    drop(sender);
    let _ = forwarding.await;
    drop(writing);
}

impl russh::server::Handler for NodeHandler {
    type Error = russh::Error;

    async fn auth_openssh_certificate(
        &mut self,
        login: &str,
        cert: &Certificate,
    ) -> Result<Auth, Self::Error> {
        let now = tunnel_proto::unix_now();
        let checked = check_certificate(cert, login, &self.ctx.user_cas, self.client_ip, now)
            .and_then(|g| match Login::resolve(login) {
                Ok(Some(l)) => Ok((g, l)),
                _ => Err(format!("login {login:?} does not exist on this node")),
            });
        match checked {
            Ok((grant, resolved)) => {
                self.login = Some(resolved);
                self.user = Some(cert.key_id().to_string());
                self.force_command = grant.force_command;
                self.permit_pty = grant.permit_pty;
                self.permit_port_forwarding = grant.permit_port_forwarding;
                tracing::info!(user = cert.key_id(), login, client = %self.client, "SSH login");
                Ok(Auth::Accept)
            }
            Err(why) => {
                tracing::warn!(user = cert.key_id(), login, client = %self.client, %why, "SSH login refused");
                self.event(
                    "auth.failure",
                    &[
                        ("attempted_login", login.to_string()),
                        ("cert_user", cert.key_id().to_string()),
                        ("reason", why),
                    ],
                );
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Client data arrives through `Handler::data`; the channel object itself is dropped, so
        // its buffer can never fill and stall the session.
        self.channels.insert(channel.id(), ChanState::default());
        reply.accept().await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        id: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        _pw: u32,
        _ph: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if !self.permit_pty {
            session.channel_failure(id)?;
            return Ok(());
        }
        self.channels.entry(id).or_default().pty = Some(PtySpec {
            term: term.to_string(),
            cols: clamp(cols),
            rows: clamp(rows),
        });
        session.channel_success(id)?;
        Ok(())
    }

    async fn env_request(
        &mut self,
        id: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Like sshd's default AcceptEnv: the locale only.
        if name == "LANG" || name.starts_with("LC_") {
            self.channels
                .entry(id)
                .or_default()
                .env
                .push((name.to_string(), value.to_string()));
            session.channel_success(id)?;
        } else {
            session.channel_failure(id)?;
        }
        Ok(())
    }

    async fn shell_request(
        &mut self,
        id: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(id, Start::Shell, session).await
    }

    async fn exec_request(
        &mut self,
        id: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        self.start(id, Start::Exec(command), session).await
    }

    async fn subsystem_request(
        &mut self,
        id: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" {
            self.start(id, Start::Sftp, session).await
        } else {
            session.channel_failure(id)?;
            Ok(())
        }
    }

    async fn data(
        &mut self,
        id: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(tx) = self.channels.get(&id).and_then(|c| c.stdin.clone()) {
            let _ = tx.send(data.to_vec()).await;
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        id: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(state) = self.channels.get_mut(&id)
            && state.master.is_none()
        {
            state.stdin = None;
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        id: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(state) = self.channels.remove(&id)
            && let Some(group) = state.group
        {
            group.signal(nix::sys::signal::Signal::SIGHUP);
        }
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        id: ChannelId,
        cols: u32,
        rows: u32,
        _pw: u32,
        _ph: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(master) = self.channels.get(&id).and_then(|c| c.master.clone()) {
            process::set_window_size(&master, clamp(cols), clamp(rows));
        }
        Ok(())
    }

    async fn signal(
        &mut self,
        id: ChannelId,
        sig: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let (Some(group), Some(signal)) = (
            self.channels.get(&id).and_then(|c| c.group.clone()),
            to_signal(&sig),
        ) {
            group.signal(signal);
        }
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let host = host.trim_matches(['[', ']']);
        let port = u16::try_from(port).unwrap_or(0);
        let target = format!("{host}:{port}");
        let refusal = if !self.permit_port_forwarding || self.force_command.is_some() {
            Some("the certificate does not permit port forwarding")
        } else if !self.ctx.permit_open.allows(host, port) {
            Some("this node's permit_open does not allow the target")
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.event(
                "port_forward.refused",
                &[("target", target), ("reason", reason.into())],
            );
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        match tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect((host, port)),
        )
        .await
        {
            Ok(Ok(mut tcp)) => {
                self.event("port_forward", &[("target", target)]);
                reply.accept().await;
                tokio::spawn(async move {
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
                });
            }
            _ => reply.reject(ChannelOpenFailure::ConnectFailed).await,
        }
        Ok(())
    }
}

/// A window dimension from the client, clamped to what a terminal can hold.
fn clamp(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}
