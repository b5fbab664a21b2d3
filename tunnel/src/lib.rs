//! Tunnel transports behind one multiplexed [`Session`]: QUIC (quinn) and TLS 1.3 + yamux over
//! TCP. Both are mutual TLS with ALPN [`ALPN_TUNNEL`].
//!
//! A yamux connection is owned by one driver task that polls it; opens reach it over a channel
//! and inbound streams leave it over another, so a `Session` is a cheap, cloneable handle.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;

use tunnel_proto::wire::{self, Message, WireError};

pub use tunnel_proto::wire::ALPN_TUNNEL;

mod keepalive;

pub use self::keepalive::{Keepalive, KeepaliveError};

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
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("TLS handshake with {addr} failed: {reason}")]
    Handshake { addr: String, reason: String },
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
}

#[derive(Clone)]
enum Inner {
    Quic(quinn::Connection),
    Yamux(Arc<YamuxHandle>),
}

struct YamuxHandle {
    open: mpsc::Sender<oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>>,
    inbound: Mutex<mpsc::Receiver<yamux::Stream>>,
    closed: CancellationToken,
    keepalive: keepalive::Requested,
}

impl Session {
    pub fn transport(&self) -> Transport {
        match self.inner {
            Inner::Quic(_) => Transport::Quic,
            Inner::Yamux(_) => Transport::Tcp,
        }
    }

    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
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
            Inner::Yamux(h) => {
                let stream = h.inbound.lock().await.recv().await?;
                Some(Box::new(stream.compat()))
            }
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
        }
    }

    /// Runs yamux over an established TLS stream.
    fn from_tls<S>(
        tls: S,
        remote: SocketAddr,
        peer_certs: Vec<CertificateDer<'static>>,
        server: bool,
    ) -> Self
    where
        S: TcpBacked + AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mode = if server {
            yamux::Mode::Server
        } else {
            yamux::Mode::Client
        };
        let keepalive = keepalive::Requested::default();
        let io = Tuned {
            io: tls,
            keepalive: keepalive.clone(),
        };
        let conn = yamux::Connection::new(io.compat(), yamux_config(), mode);
        let (open_tx, open_rx) = mpsc::channel(64);
        let (inbound_tx, inbound_rx) = mpsc::channel(256);
        let closed = CancellationToken::new();
        tokio::spawn(drive_yamux(conn, open_rx, inbound_tx, closed.clone()));
        Self {
            remote,
            inner: Inner::Yamux(Arc::new(YamuxHandle {
                open: open_tx,
                inbound: Mutex::new(inbound_rx),
                closed,
                keepalive,
            })),
            peer_certs: Arc::new(peer_certs),
        }
    }
}

fn yamux_config() -> yamux::Config {
    let mut cfg = yamux::Config::default();
    // yamux insists on at least 256 KiB per stream: set the stream count first.
    cfg.set_max_num_streams(MAX_STREAMS as usize)
        .set_max_connection_receive_window(Some(CONNECTION_WINDOW as usize));
    cfg
}

type OpenRequest = oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>;

/// The one task that owns a yamux connection: it polls inbound streams, serves open requests,
/// and closes the connection when asked.
async fn drive_yamux<T>(
    mut conn: yamux::Connection<T>,
    mut opens: mpsc::Receiver<OpenRequest>,
    inbound: mpsc::Sender<yamux::Stream>,
    closed: CancellationToken,
) where
    T: futures_io::AsyncRead + futures_io::AsyncWrite + Unpin,
{
    use std::task::Poll;
    let mut pending_open: Option<OpenRequest> = None;
    let result = std::future::poll_fn(|cx| {
        if closed.is_cancelled() {
            return Poll::Ready(Ok(()));
        }
        // Serve open requests, one at a time.
        loop {
            if pending_open.is_none() {
                match opens.poll_recv(cx) {
                    Poll::Ready(Some(tx)) => pending_open = Some(tx),
                    Poll::Ready(None) | Poll::Pending => break,
                }
            }
            match conn.poll_new_outbound(cx) {
                Poll::Ready(r) => {
                    if let Some(tx) = pending_open.take() {
                        let _ = tx.send(r);
                    }
                }
                Poll::Pending => break,
            }
        }
        // Drive the connection and take inbound streams; this also moves all stream I/O.
        loop {
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => {
                    // A peer that opens streams faster than they are handled gets them dropped
                    // (reset) rather than queued without bound.
                    if inbound.try_send(stream).is_err() {
                        tracing::debug!("dropping an inbound stream: too many waiting");
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    });
    let result = tokio::select! {
        r = result => r,
        _ = closed.cancelled() => Ok(()),
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "yamux connection ended");
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        std::future::poll_fn(|cx| conn.poll_close(cx)),
    )
    .await;
    closed.cancel();
}

/// The certificate chain a TLS peer authenticated with (empty if it showed none).
pub fn peer_chain(tls: &rustls::CommonState) -> Vec<CertificateDer<'static>> {
    tls.peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default()
}

/// The server side of a TLS + yamux tunnel on an accepted, handshaken connection.
pub fn accept_tls(tls: tokio_rustls::server::TlsStream<TcpStream>, remote: SocketAddr) -> Session {
    let peer_certs = peer_chain(tls.get_ref().1);
    Session::from_tls(tls, remote, peer_certs, true)
}

/// Dials a TLS + yamux tunnel.
pub async fn connect_tcp(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    keepalive: Keepalive,
) -> Result<Session, TransportError> {
    let fail = |reason: String| TransportError::Connect {
        addr: addr.to_string(),
        reason,
    };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| fail("timed out".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    set_tcp_keepalive(&tcp, keepalive);
    let remote = tcp.peer_addr().map_err(|e| fail(e.to_string()))?;
    let name = server_name(addr);
    let stream = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
    )
    .await
    .map_err(|_| TransportError::Handshake {
        addr: addr.to_string(),
        reason: "timed out".into(),
    })?
    .map_err(|e| TransportError::Handshake {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    let peer_certs = peer_chain(stream.get_ref().1);
    Ok(Session::from_tls(stream, remote, peer_certs, false))
}

/// Dials a QUIC tunnel from `endpoint`.
pub async fn connect_quic(
    endpoint: &quinn::Endpoint,
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    keepalive: Keepalive,
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
    let mut transport = transport_config(MAX_STREAMS);
    transport
        .keep_alive_interval(Some(keepalive.interval()))
        .max_idle_timeout(Some(idle_timeout(keepalive.quic_idle_timeout())));
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

/// QUIC settings shared by both ends; `peer_streams`: how many bidirectional streams the peer
/// may have open at once. Neither end sends keep-alives here: the agent adds its own
/// ([`connect_quic`]), and the proxy never sends one ([`keepalive`]).
fn transport_config(peer_streams: u32) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(None)
        .stream_receive_window(STREAM_WINDOW.into())
        .receive_window(CONNECTION_WINDOW.into())
        .send_window(u64::from(CONNECTION_WINDOW))
        .max_concurrent_bidi_streams(peer_streams.into())
        .max_concurrent_uni_streams(0u32.into());
    t
}

/// A client endpoint on an ephemeral UDP port, for every QUIC tunnel of one agent: one
/// dual-stack socket, so that proxies on IPv4 and IPv6 addresses are both reached (and a path
/// that changes family still has a socket), or IPv4 only where the host has no IPv6.
pub fn quic_client_endpoint() -> std::io::Result<quinn::Endpoint> {
    let socket = match dual_stack_udp() {
        Ok(socket) => socket,
        Err(e) => {
            tracing::debug!(error = %e, "no IPv6 UDP socket; QUIC over IPv4 only");
            std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?
        }
    };
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
}

fn dual_stack_udp() -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_only_v6(false)?;
    socket.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)).into())?;
    Ok(socket.into())
}

/// How many bytes of secret [`quic_server_endpoint`] takes.
pub const QUIC_SECRET_LEN: usize = 64;

/// A server endpoint for QUIC tunnels on `addr`.
///
/// `secret` is kept by the proxy across restarts: it keys the endpoint's stateless resets and its
/// connection IDs, so that after a crash and restart the new process recognises the old
/// connections' IDs and answers an agent's next packet with a reset the agent can verify. The
/// agent then reconnects at once instead of after its idle timeout.
pub fn quic_server_endpoint(
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    secret: &[u8; QUIC_SECRET_LEN],
) -> std::io::Result<quinn::Endpoint> {
    use ring::hmac;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| std::io::Error::other(format!("QUIC needs TLS 1.3: {e}")))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // An agent opens one stream, its control stream: a second one is refused by QUIC flow
    // control itself, before a byte of it is buffered.
    // The proxy's idle timeout is the longest an agent may ask for: the agent's smaller one is
    // what both ends use.
    let mut transport = transport_config(1);
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
    let socket = std::net::UdpSocket::bind(addr)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    quinn::Endpoint::new(endpoint, Some(config), socket, runtime)
}

fn server_name(addr: &str) -> ServerName<'static> {
    burrow_net::web::split_host(addr)
        .and_then(|h| ServerName::try_from(h.to_string()).ok())
        .unwrap_or_else(|| {
            ServerName::try_from(burrow_net::tls::CLUSTER_SERVER_NAME).expect("valid")
        })
}

/// TCP keep-alives under the tunnel: the kernel notices a dead peer even when yamux is idle.
pub fn set_tcp_keepalive(tcp: &TcpStream, k: Keepalive) {
    k.apply_tcp(socket2::SockRef::from(tcp));
}

/// A TLS stream over TCP, whose socket options can still be set.
pub trait TcpBacked {
    fn tcp(&self) -> &TcpStream;
}

impl TcpBacked for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

impl TcpBacked for tokio_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// A tunnel's TLS stream inside its yamux driver, applying a keep-alive asked for through
/// [`Session::set_keepalive`] at its next read or write.
struct Tuned<S> {
    io: S,
    keepalive: keepalive::Requested,
}

impl<S: TcpBacked> Tuned<S> {
    fn tune(&self) {
        if let Some(k) = self.keepalive.take() {
            set_tcp_keepalive(self.io.tcp(), k);
        }
    }
}

impl<S: TcpBacked + AsyncRead + Unpin> AsyncRead for Tuned<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.tune();
        std::pin::Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<S: TcpBacked + AsyncWrite + Unpin> AsyncWrite for Tuned<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.tune();
        std::pin::Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.tune();
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

/// Reads and writes [`Message`] frames on a stream.
pub struct Framed<S> {
    stream: S,
    buf: BytesMut,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yamux_config_is_accepted() {
        // yamux asserts its invariants at configuration time; a bad constant panics here.
        let _ = yamux_config();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("stream I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            // Control messages are small; the buffer grows for a large one. Every tunnel holds
            // one at each end, so its idle size counts at 10,000 tunnels.
            buf: BytesMut::with_capacity(512),
        }
    }

    /// The next message; `None` when the peer closed the stream cleanly between frames.
    pub async fn read(&mut self) -> Result<Option<Message>, FrameError> {
        loop {
            if let Some((msg, used)) = wire::decode(&self.buf)? {
                self.buf.advance(used);
                return Ok(Some(msg));
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()))
                };
            }
        }
    }

    pub async fn write(&mut self, msg: &Message) -> Result<(), FrameError> {
        let mut out = Vec::new();
        wire::encode(msg, &mut out)?;
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// The stream, with any bytes read past the last frame.
    pub fn into_parts(self) -> (S, BytesMut) {
        (self.stream, self.buf)
    }
}
