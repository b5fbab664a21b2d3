//! What the proxy's and the node's SSH servers share: their russh configuration, the checks
//! every user certificate must pass before either looks at logins, and the login grace time.

use std::time::Duration;

use russh::keys::ssh_key::certificate::CertType;
use russh::keys::ssh_key::{Certificate, PrivateKey, PublicKey};
use russh::{MethodKind, MethodSet};

/// A server that presents `cert` for `key` and takes public keys (certificates) only.
pub fn server_config(key: PrivateKey, cert: Certificate) -> russh::server::Config {
    let mut methods = MethodSet::empty();
    methods.push(MethodKind::PublicKey);
    russh::server::Config {
        keys: vec![key],
        certificates: vec![cert],
        methods,
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: None,
        // No SSH keep-alives: russh sends its first one 15 s after the client last spoke, logged
        // in or not, and OpenSSH's client drops a connection that gets a global request before
        // it has logged in ("bad message during authentication: type 80"): a passphrase typed
        // slowly, a hardware key waiting for a touch or a slow link lost the login. A dead client
        // is noticed by TCP keep-alives instead ([`keep_alive`]), and a session through a tunnel
        // ends with its stream, which the tunnel's own keep-alives watch.
        keepalive_interval: None,
        nodelay: true,
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(CIPHERS),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The ciphers an SSH server offers: russh's own list and AES-128-GCM, which it supports but does
/// not offer by default, and which OpenSSH clients rank before AES-256-GCM (`burrowctl
/// ssh-config` asks for it for the hop to the proxy; a client configured for it alone would
/// otherwise find no cipher in common). The client's order decides which is used.
const CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_256_GCM,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_192_CTR,
    russh::cipher::AES_128_CTR,
];

/// Kernel keep-alive probes on a user's TCP connection to an SSH server: a client that vanished
/// (a laptop closed, a path gone) is let go within a minute, without a byte
/// the client could take for a protocol message.
pub fn keep_alive(tcp: &tokio::net::TcpStream) {
    burrow_tunnel::set_tcp_keepalive(
        tcp,
        burrow_tunnel::Keepalive::default_for(burrow_tunnel::Transport::Tcp),
    );
}

/// How long a connection may take to log in (OpenSSH's LoginGraceTime default).
pub const LOGIN_GRACE: Duration = Duration::from_secs(60);

/// Serves one SSH connection with `handler`, closing it if `authenticated` has not fired within
/// `grace` (sshd's LoginGraceTime). The handler fires it when a user logs in.
pub async fn serve_with_grace<S, H>(
    config: std::sync::Arc<russh::server::Config>,
    stream: S,
    handler: H,
    grace: Duration,
    authenticated: tokio::sync::oneshot::Receiver<()>,
    peer: &str,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: russh::server::Handler<Error = russh::Error> + Send + 'static,
{
    let connection = async {
        match russh::server::run_stream(config, stream, handler).await {
            Ok(running) => {
                if let Err(e) = running.await {
                    tracing::debug!(%peer, error = %e, "SSH connection ended");
                }
            }
            Err(e) => tracing::debug!(%peer, error = %e, "SSH handshake failed"),
        }
    };
    tokio::pin!(connection);
    tokio::select! {
        _ = &mut connection => return,
        login = tokio::time::timeout(grace, authenticated) => {
            if login.is_err() {
                // Dropping the connection closes it.
                tracing::info!(%peer, "SSH connection closed: no login within the grace time");
                return;
            }
        }
    }
    connection.await;
}

/// A user certificate: of type user, signed by one of `user_cas`, valid at `now`.
pub fn check_user_certificate(
    cert: &Certificate,
    user_cas: &[PublicKey],
    now: u64,
) -> Result<(), String> {
    if cert.cert_type() != CertType::User {
        return Err("not a user certificate".into());
    }
    if !user_cas
        .iter()
        .any(|ca| ca.key_data() == cert.signature_key())
    {
        return Err("not signed by this cluster's user CA".into());
    }
    if now < cert.valid_after() || now >= cert.valid_before() {
        return Err("the certificate has expired or is not yet valid".into());
    }
    Ok(())
}
