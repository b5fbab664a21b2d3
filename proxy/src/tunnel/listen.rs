//! Where tunnels come in: QUIC on the web port's number (and the dedicated port), and TLS +
//! yamux on the dedicated TCP listener; TLS tunnels on the web port itself are told apart from
//! HTTPS by ALPN in `web`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use burrow_tunnel::Session;
use tokio_util::sync::CancellationToken;

use super::{HELLO_TIMEOUT, TunnelServer};
use crate::ratelimit::ConnectionGate;

/// Whether a TLS peer on the web port asked for a tunnel.
pub fn is_tunnel_alpn(alpn: Option<&[u8]>) -> bool {
    alpn == Some(tunnel_proto::wire::ALPN_TUNNEL)
}

/// Accepts QUIC tunnels on `endpoint` until shutdown. Handshakes in progress count against
/// `handshakes`, as TLS ones do: over its limits a new one is refused at once (the agent backs off
/// and tries again) instead of queueing until it times out, which also keeps a fleet that returns
/// all at once, or a flood of QUIC Initials, from holding unbounded handshake state.
pub async fn serve_quic(
    endpoint: quinn::Endpoint,
    handshakes: Arc<ConnectionGate>,
    server: Arc<TunnelServer>,
    shutdown: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let remote: SocketAddr = incoming.remote_address();
        let Some(place) = handshakes.enter(remote.ip()) else {
            tracing::debug!(peer = %remote, "QUIC handshake refused: too many in progress");
            server.metrics.rate_limited("handshakes");
            incoming.refuse();
            continue;
        };
        let server = server.clone();
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HELLO_TIMEOUT, incoming).await;
            drop(place);
            match handshake {
                Ok(Ok(conn)) => server.accept(Session::from_quic(conn)),
                Ok(Err(e)) => tracing::debug!(peer = %remote, error = %e, "QUIC handshake failed"),
                Err(_) => tracing::debug!(peer = %remote, "QUIC handshake timed out"),
            }
        });
    }
    // Let the tunnels deliver their reconnect advisories before the endpoint goes away.
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    endpoint.close(0u32.into(), b"proxy shutting down");
}

/// Accepts TLS + yamux tunnels on a dedicated TCP listener until shutdown.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handshakes: Arc<ConnectionGate>,
    server: Arc<TunnelServer>,
    shutdown: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    while let Some((tcp, remote)) = burrow_daemon::accept(&listener, &shutdown).await {
        let Some(place) = handshakes.enter(remote.ip()) else {
            tracing::debug!(peer = %remote, "tunnel connection dropped: too many handshakes from this source");
            server.metrics.rate_limited("handshakes");
            continue;
        };
        let acceptor = acceptor.clone();
        let server = server.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            burrow_tunnel::set_tcp_keepalive(
                &tcp,
                burrow_tunnel::Keepalive::default_for(burrow_tunnel::Transport::Tcp),
            );
            let handshake = tokio::time::timeout(HELLO_TIMEOUT, acceptor.accept(tcp)).await;
            drop(place);
            match handshake {
                Ok(Ok(tls)) => server.accept(burrow_tunnel::accept_tls(tls, remote)),
                Ok(Err(e)) => {
                    tracing::debug!(peer = %remote, error = %e, "tunnel TLS handshake failed")
                }
                Err(_) => tracing::debug!(peer = %remote, "tunnel TLS handshake timed out"),
            }
        });
    }
}
