//! QUIC tunnels (quinn): the agent's client endpoint and dials, the proxy's server endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::keepalive::Keepalive;
use crate::nudge::Nudges;
use crate::window::Window;
use crate::{
    CONNECT_TIMEOUT, CONNECTION_WINDOW, MAX_STREAMS, STREAM_WINDOW, Session, TransportError,
};

/// Dials a QUIC tunnel from `endpoint`.
pub async fn connect_quic(
    endpoint: &quinn::Endpoint,
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    keepalive: Keepalive,
    window: Window,
) -> Result<Session, TransportError> {
    let fail = |reason: String| TransportError::Connect {
        addr: addr.to_string(),
        reason,
    };
    let target = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| fail(e.to_string()))?
        .next()
        .ok_or_else(|| fail("no address".into()))?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| fail(format!("QUIC needs TLS 1.3: {e}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = transport_config(MAX_STREAMS, window.stream(), window.tunnel());
    transport
        .keep_alive_interval(Some(keepalive.interval()))
        .max_idle_timeout(Some(idle_timeout(keepalive.quic_idle_timeout())));
    // The proxy acknowledges each keep-alive at once (in the same wake-up that received it)
    // rather than arming a 25 ms timer for it and waking again to send the ACK. The price: during
    // a download from the node the proxy acknowledges every packet rather than every other one
    // (fewer on loopback, where ACKs go out once per batch received). quinn sends the request
    // once, in the first flight after the handshake; if that packet is lost, the tunnel keeps
    // quinn's usual ACKs, which is harmless.
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(0u32.into());
    transport.ack_frequency_config(Some(acks));
    config.transport_config(Arc::new(transport));
    let host = burrow_net::web::split_host(addr).unwrap_or("burrow");
    let connecting = endpoint
        .connect_with(config, target, host)
        .map_err(|e| fail(e.to_string()))?;
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| fail("no QUIC answer (is UDP blocked?)".into()))?
        .map_err(|e| TransportError::Handshake {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
    Ok(Session::from_quic(conn))
}

fn idle_timeout(d: Duration) -> quinn::IdleTimeout {
    d.try_into()
        .expect("a keep-alive's bounds fit QUIC's idle timeout")
}

/// QUIC settings both ends share. `peer_streams`: how many bidirectional streams the peer may
/// have open at once; `stream_window`: what one stream may have in flight towards this end;
/// `tunnel_window`: the same for the whole connection, and the most this end keeps
/// unacknowledged (the proxy's are a server's, the agent's a device's: [`Window`]). Neither end
/// sends keep-alives here: the agent adds its own ([`connect_quic`]), the proxy sends none.
fn transport_config(
    peer_streams: u32,
    stream_window: u32,
    tunnel_window: u32,
) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(None)
        .stream_receive_window(stream_window.into())
        .receive_window(tunnel_window.into())
        .send_window(tunnel_window.into())
        .max_concurrent_bidi_streams(peer_streams.into())
        .max_concurrent_uni_streams(0u32.into());
    t
}

/// A client endpoint on an ephemeral UDP port, for every QUIC tunnel of one agent: one
/// dual-stack socket, so that proxies on IPv4 and IPv6 addresses are both reached (and a path
/// that changes family still has a socket), or IPv4 only where the host has no IPv6.
///
/// Restart nudges for its tunnels ([`crate::nudge`]) go to `nudges`.
pub fn quic_client_endpoint(nudges: Arc<Nudges>) -> std::io::Result<quinn::Endpoint> {
    let socket = match dual_stack_udp() {
        Ok(socket) => socket,
        Err(e) => {
            tracing::debug!(error = %e, "no IPv6 UDP socket; QUIC over IPv4 only");
            std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?
        }
    };
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    let socket = crate::udp::agent_socket(socket, runtime.as_ref(), nudges)?;
    quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        socket,
        runtime,
    )
}

fn dual_stack_udp() -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_only_v6(false)?;
    socket.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)).into())?;
    Ok(socket.into())
}

/// The receive buffer a proxy's QUIC socket asks the kernel for. A fleet returning to a
/// restarted proxy sends thousands of 1,200-byte Initials within its return window; with the
/// kernel's default (208 KiB) the excess is dropped and each dropped agent waits out QUIC's
/// retransmission timer (1 s, then 2 s, 4 s...) before it tries again.
pub const SERVER_UDP_BUFFER: usize = 8 << 20;

/// The proxy's UDP socket on `addr`, with buffers as large as the kernel allows up to
/// [`SERVER_UDP_BUFFER`] (`net.core.rmem_max` and `wmem_max` cap what an unprivileged process
/// gets).
fn server_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(SERVER_UDP_BUFFER);
    let _ = socket.set_send_buffer_size(SERVER_UDP_BUFFER);
    // Linux reports twice what it grants (its bookkeeping overhead).
    let granted = socket.recv_buffer_size().unwrap_or(0) / 2;
    if granted < SERVER_UDP_BUFFER / 4 {
        tracing::warn!(
            granted_kib = granted / 1024,
            wanted_kib = SERVER_UDP_BUFFER / 1024,
            "the kernel caps the QUIC socket's receive buffer: a large fleet returning at once may lose handshakes and wait seconds to retry; raise it with `sysctl -w net.core.rmem_max={}`",
            SERVER_UDP_BUFFER
        );
    } else {
        tracing::debug!(granted_kib = granted / 1024, "QUIC socket receive buffer");
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// How many bytes of secret [`quic_server_endpoint`] takes.
pub const QUIC_SECRET_LEN: usize = 64;

/// A server endpoint for QUIC tunnels on `addr`, and a second handle to its socket for the
/// datagrams that are not QUIC (restart nudges, [`crate::nudge`]).
///
/// `secret` is kept by the proxy across restarts: it keys the endpoint's stateless resets and its
/// connection IDs, so that after a crash and restart the new process recognises the old
/// connections' IDs and answers an agent's next packet with a reset the agent can verify. The
/// agent then reconnects at once instead of after its idle timeout.
pub fn quic_server_endpoint(
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    secret: &[u8; QUIC_SECRET_LEN],
) -> std::io::Result<(quinn::Endpoint, std::net::UdpSocket)> {
    use ring::hmac;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| std::io::Error::other(format!("QUIC needs TLS 1.3: {e}")))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // An agent opens one stream, its control stream: a second one is refused by QUIC flow
    // control itself, before a byte of it is buffered.
    // The proxy's idle timeout is the longest an agent may ask for: the agent's smaller one is
    // what both ends use.
    let mut transport = transport_config(1, STREAM_WINDOW, CONNECTION_WINDOW);
    transport.max_idle_timeout(Some(idle_timeout(
        Keepalive::clamped(Keepalive::MAX).quic_idle_timeout(),
    )));
    config.transport_config(Arc::new(transport));

    let root = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let derive = |label: &[u8]| hmac::sign(&root, label);
    let reset_key = hmac::Key::new(
        hmac::HMAC_SHA256,
        derive(b"burrow quic stateless reset").as_ref(),
    );
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&derive(b"burrow quic connection id").as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut endpoint = quinn::EndpointConfig::new(Arc::new(reset_key));
    endpoint.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    // A fleet whose proxy restarted sends one packet per agent within a keep-alive: answer them
    // all within seconds (quinn's default, one reset per 20 ms, takes minutes for 10,000). A reset
    // is always smaller than the packet that incited it, so this amplifies nothing.
    endpoint.min_reset_interval(Duration::from_micros(100));
    let socket = server_udp(addr)?;
    let twin = socket.try_clone()?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    Ok((
        quinn::Endpoint::new(endpoint, Some(config), socket, runtime)?,
        twin,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_pair() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let der = cert.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let provider = burrow_net::tls::provider();
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// An idle QUIC tunnel costs the proxy a wake-up per keep-alive, not two: the agent asks it
    /// (ACK frequency, `ack_eliciting_threshold` 0) to acknowledge at once rather than from a
    /// 25 ms timer.
    #[tokio::test]
    async fn an_agent_asks_the_proxy_to_acknowledge_its_keep_alives_at_once() {
        let (server_tls, client_tls) = tls_pair();
        let (server, _socket) = quic_server_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            server_tls,
            &[7; QUIC_SECRET_LEN],
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let accepting = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            (server, conn)
        });
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let _session = connect_quic(
            &client,
            &addr.to_string(),
            client_tls,
            Keepalive::default_for(crate::Transport::Quic),
            Window::DEFAULT,
        )
        .await
        .unwrap();
        let (_server, conn) = accepting.await.unwrap();
        let mut asked = 0;
        for _ in 0..50 {
            asked = conn.stats().frame_rx.ack_frequency;
            if asked > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(asked >= 1, "the proxy received no ACK_FREQUENCY frame");
    }
}
