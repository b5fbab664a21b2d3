//! Tunnel transports behind one multiplexed [`Session`]: QUIC (quinn), TLS 1.3 + yamux over
//! TCP, and the same TLS + yamux inside an HTTP/1.1 Upgrade on the web port (for balancers that
//! terminate TLS). All are mutual TLS with ALPN [`ALPN_TUNNEL`].
//!
//! | module | what |
//! | --- | --- |
//! | this one | [`Session`], the handle both transports hide behind |
//! | `quic` | QUIC endpoints (the agent's client, the proxy's server) and dials |
//! | `tcp` | TLS + yamux: the driver task, dials and accepts, TCP keep-alive probes |
//! | `upgrade` | TLS + yamux inside an HTTP/1.1 Upgrade: the request, the answer, the inner TLS |
//! | `keepalive` | the keep-alive interval and what follows from it (idle timeouts, probes) |
//! | `udp` | the agent's UDP socket: quinn's, without receive offload |
//! | `window` | the agent's flow-control window on a QUIC tunnel |
//! | `framed` | control [`Message`](tunnel_proto::wire::Message) frames on a stream |

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;

pub use tunnel_proto::wire::ALPN_TUNNEL;

/// `AsyncWrite` for a stream wrapper that writes straight to its `io` field, calling the
/// wrapper's method `$hook` (if named) before each write.
macro_rules! write_through {
    ($ty:ident where [$($bound:tt)+] $(, $hook:ident)?) => {
        impl<S> tokio::io::AsyncWrite for $ty<S>
        where
            S: $($bound)+,
        {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                let this = self.get_mut();
                $(this.$hook();)?
                std::pin::Pin::new(&mut this.io).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                let this = self.get_mut();
                $(this.$hook();)?
                std::pin::Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.io.is_write_vectored()
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
            }
        }
    };
}

mod framed;
mod keepalive;
pub mod nudge;
mod quic;
mod tcp;
mod udp;
mod upgrade;
mod window;

pub use self::framed::{FrameError, Framed};
pub use self::keepalive::{Keepalive, KeepaliveError};
pub use self::quic::{QUIC_SECRET_LEN, connect_quic, quic_client_endpoint, quic_server_endpoint};
pub use self::tcp::{TcpBacked, accept_tls, connect_tcp, set_tcp_keepalive};
pub use self::upgrade::{Prefixed, TunnelTls, accept_upgraded, connect_upgrade};
pub use self::window::{Window, WindowError};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Flow-control windows large enough for bulk copies over long fat links.
const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;
const _: () = assert!(CONNECTION_WINDOW as u64 >= 256 * 1024 * MAX_STREAMS as u64);
const MAX_STREAMS: u32 = 256;

/// A byte stream inside a tunnel.
pub trait IoStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> IoStream for T {}
pub type TunnelStream = Box<dyn IoStream>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Quic,
    Tcp,
    /// TLS + yamux inside an HTTP/1.1 Upgrade on the web port.
    Upgrade,
}

impl Transport {
    /// "quic", "tcp" or "upgrade", as logs, presence records and metric labels name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
            Transport::Upgrade => "upgrade",
        }
    }

    /// Whether the tunnel's ends must say something every keep-alive interval to keep it open
    /// and notice a dead peer: nothing below the tunnel does it end to end through a balancer
    /// that terminates TLS (its TCP keep-alives stop at the balancer, and it closes connections
    /// idle for a minute or so).
    pub fn pings(self) -> bool {
        self == Transport::Upgrade
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("TLS handshake with {addr} failed: {reason}")]
    Handshake { addr: String, reason: String },
    #[error("cannot open a tunnel through the web address {addr}: {reason}")]
    Upgrade { addr: String, reason: String },
    #[error("the tunnel is closed")]
    Closed,
    #[error("stream error: {0}")]
    Stream(String),
}

/// Why a TLS + yamux tunnel closed, as far as it can tell.
const YAMUX_CLOSED: &str = "the TCP connection ended";

/// An authenticated, multiplexed tunnel.
#[derive(Clone)]
pub struct Session {
    inner: Inner,
    remote: SocketAddr,
    peer_certs: Arc<Vec<CertificateDer<'static>>>,
    /// The TLS session was resumed from a ticket (never known for QUIC).
    resumed: bool,
}

#[derive(Clone)]
enum Inner {
    Quic(quinn::Connection),
    Yamux(Arc<YamuxHandle>),
}

struct YamuxHandle {
    open: mpsc::Sender<oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>>,
    /// Streams the peer opened, boxed already: a channel holds its items in blocks of 32 slots,
    /// and a slot for a fat pointer is a fifth of one for a `yamux::Stream` (idle tunnels × 32).
    inbound: Mutex<mpsc::Receiver<TunnelStream>>,
    closed: CancellationToken,
    keepalive: keepalive::Requested,
    /// TCP or Upgrade.
    transport: Transport,
    heard: tcp::Heard,
}

impl Session {
    pub fn transport(&self) -> Transport {
        match &self.inner {
            Inner::Quic(_) => Transport::Quic,
            Inner::Yamux(h) => h.transport,
        }
    }

    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    /// Whether the TLS session was resumed from a session ticket (TCP and upgrade; QUIC's are
    /// reported as not resumed, quinn does not say).
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// How long since the peer last sent anything on this tunnel, any stream (TLS + yamux
    /// tunnels; `None` for QUIC, whose idle timeout keeps this itself).
    pub fn idle_for(&self) -> Option<Duration> {
        match &self.inner {
            Inner::Quic(_) => None,
            Inner::Yamux(h) => Some(h.heard.idle()),
        }
    }

    /// The certificate chain the peer authenticated with.
    pub fn peer_certificates(&self) -> &[CertificateDer<'static>] {
        &self.peer_certs
    }

    /// Opens a stream. The peer sees it when the first bytes arrive.
    pub async fn open(&self) -> Result<TunnelStream, TransportError> {
        match &self.inner {
            Inner::Quic(c) => {
                let (send, recv) = c.open_bi().await.map_err(|_| TransportError::Closed)?;
                Ok(Box::new(tokio::io::join(recv, send)))
            }
            Inner::Yamux(h) => {
                let (tx, rx) = oneshot::channel();
                h.open.send(tx).await.map_err(|_| TransportError::Closed)?;
                let stream = rx
                    .await
                    .map_err(|_| TransportError::Closed)?
                    .map_err(|e| TransportError::Stream(e.to_string()))?;
                Ok(Box::new(stream.compat()))
            }
        }
    }

    /// The next stream the peer opened; `None` once the tunnel is closed.
    pub async fn accept(&self) -> Option<TunnelStream> {
        match &self.inner {
            Inner::Quic(c) => {
                let (send, recv) = c.accept_bi().await.ok()?;
                Some(Box::new(tokio::io::join(recv, send)))
            }
            Inner::Yamux(h) => h.inbound.lock().await.recv().await,
        }
    }

    /// Uses the agent's keep-alive on this end too (the proxy, once the hello says it): TCP
    /// probes at the agent's interval. QUIC settled its idle timeout in the handshake already.
    pub fn set_keepalive(&self, k: Keepalive) {
        if let Inner::Yamux(h) = &self.inner {
            h.keepalive.set(k);
        }
    }

    /// Closes the tunnel; the peer sees its streams end.
    pub fn close(&self, reason: &str) {
        match &self.inner {
            Inner::Quic(c) => c.close(0u32.into(), reason.as_bytes()),
            Inner::Yamux(h) => h.closed.cancel(),
        }
    }

    /// Resolves when the tunnel is closed, by either side or by a dead path, with why (QUIC
    /// says: "reset by peer" after the peer restarted, "timed out" for a dead path, ...).
    pub async fn closed(&self) -> String {
        match &self.inner {
            Inner::Quic(c) => c.closed().await.to_string(),
            Inner::Yamux(h) => {
                h.closed.cancelled().await;
                YAMUX_CLOSED.to_string()
            }
        }
    }

    /// Why the tunnel closed, once it has (what [`Self::closed`] resolves to).
    pub fn close_reason(&self) -> Option<String> {
        match &self.inner {
            Inner::Quic(c) => c.close_reason().map(|e| e.to_string()),
            Inner::Yamux(h) => h.closed.is_cancelled().then(|| YAMUX_CLOSED.to_string()),
        }
    }

    pub fn from_quic(conn: quinn::Connection) -> Self {
        let peer_certs = conn
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
            .map(|b| *b)
            .unwrap_or_default();
        Self {
            remote: conn.remote_address(),
            inner: Inner::Quic(conn),
            peer_certs: Arc::new(peer_certs),
            resumed: false,
        }
    }
}

/// What a finished TLS handshake says about the peer.
pub(crate) struct Peer {
    remote: SocketAddr,
    certs: Vec<CertificateDer<'static>>,
    resumed: bool,
}

impl Peer {
    pub(crate) fn of(tls: &rustls::CommonState, remote: SocketAddr) -> Self {
        Self {
            remote,
            certs: peer_chain(tls),
            resumed: tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        }
    }
}

/// The certificate chain a TLS peer authenticated with (empty if it showed none).
pub fn peer_chain(tls: &rustls::CommonState) -> Vec<CertificateDer<'static>> {
    tls.peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default()
}

fn server_name(addr: &str) -> ServerName<'static> {
    burrow_net::web::split_host(addr)
        .and_then(|h| ServerName::try_from(h.to_string()).ok())
        .unwrap_or_else(|| {
            ServerName::try_from(burrow_net::tls::CLUSTER_SERVER_NAME).expect("valid")
        })
}
