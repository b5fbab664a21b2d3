//! The diagnostics listener both daemons offer with `--diag-listen ADDR` (off by default):
//! `GET /metrics` (Prometheus' text format, rendered by the daemon), `GET /healthz` (200 while the
//! process runs) and `GET /readyz` (200 or 503 with a small JSON body, as the daemon decides).
//!
//! It is plain HTTP/1.1 and meant for loopback or a monitoring network: one request per
//! connection, a request head of at most 4 KiB read within 5 s, at most 16 connections at once.
//! Nothing it serves is secret (no token, no key, no per-user label), and it takes no input but a
//! path. A small hand-written server keeps an HTTP server library out of the agent's binary.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The longest request head read.
const MAX_HEAD: usize = 4096;
/// How long a client has to send its request head and read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 16;

/// The content type of Prometheus' text format (version 0.0.4), which `prometheus-client`'s
/// text encoder writes (with OpenMetrics' `# EOF` at the end, which Prometheus accepts).
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether the daemon is ready, and a JSON body saying what it holds or lacks.
pub struct Readiness {
    pub ready: bool,
    pub body: String,
}

/// What a daemon serves on its diagnostics listener.
pub trait Diagnostics: Send + Sync + 'static {
    /// The metrics in Prometheus' text format.
    fn metrics(&self) -> String;
    /// Whether the daemon is ready (it may ask its backend, hence async).
    fn readiness(&self) -> Pin<Box<dyn Future<Output = Readiness> + Send + '_>>;
}

/// A registry in Prometheus' text format; an encoding failure is logged and what was written
/// stays.
pub fn render(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "cannot encode the metrics");
    }
    out
}

/// A gauge counted up while this lives (an open connection, a session).
pub struct OpenGauge(prometheus_client::metrics::gauge::Gauge);

impl OpenGauge {
    pub fn enter(gauge: &prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The `diag_listen` setting: an `IP:PORT`, or `off` (the default).
pub fn parse_listen(text: Option<String>) -> Result<Option<SocketAddr>, crate::ConfigError> {
    match text.as_deref().map(str::trim) {
        None | Some("off") => Ok(None),
        Some(text) => text.parse().map(Some).map_err(|_| {
            crate::ConfigError::new(format!(
                "diag_listen {text:?} is not an IP:PORT address or off"
            ))
        }),
    }
}

/// Binds `addr` for [`serve`]; the error names the address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for diagnostics on {addr}: {e}"),
        )
    })
}

/// Serves `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    diagnostics: Arc<dyn Diagnostics>,
    shutdown: CancellationToken,
) {
    if let Ok(at) = listener.local_addr() {
        tracing::info!("diagnostics (/metrics, /healthz, /readyz) on http://{at}");
    }
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let place = tokio::select! {
            _ = shutdown.cancelled() => return,
            place = places.clone().acquire_owned() => match place {
                Ok(place) => place,
                Err(_) => return,
            },
        };
        let Some((stream, _)) = crate::accept(&listener, &shutdown).await else {
            return;
        };
        let diagnostics = diagnostics.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(IO_TIMEOUT, answer(stream, diagnostics.as_ref())).await;
            drop(place);
        });
    }
}

/// Reads one request and answers it.
async fn answer(mut stream: TcpStream, diagnostics: &dyn Diagnostics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return respond(
                &mut stream,
                false,
                431,
                "text/plain",
                "request head too large\n",
            )
            .await;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(&mut stream, false, 405, "text/plain", "only GET\n").await;
    }
    // A query string changes nothing here.
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/metrics" => {
            let body = diagnostics.metrics();
            respond(&mut stream, head_only, 200, METRICS_CONTENT_TYPE, &body).await
        }
        "/healthz" => respond(&mut stream, head_only, 200, "text/plain", "ok\n").await,
        "/readyz" => {
            let r = diagnostics.readiness().await;
            let status = if r.ready { 200 } else { 503 };
            respond(&mut stream, head_only, status, "application/json", &r.body).await
        }
        _ => {
            let body = "not found: try /metrics, /healthz or /readyz\n";
            respond(&mut stream, head_only, 404, "text/plain", body).await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    head_only: bool,
    status: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(bool);

    impl Diagnostics for Fixed {
        fn metrics(&self) -> String {
            "# TYPE up gauge\nup 1\n# EOF\n".into()
        }
        fn readiness(&self) -> Pin<Box<dyn Future<Output = Readiness> + Send + '_>> {
            let ready = self.0;
            Box::pin(async move {
                Readiness {
                    ready,
                    body: format!("{{\"ready\":{ready}}}"),
                }
            })
        }
    }

    async fn get(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    async fn server(ready: bool) -> (SocketAddr, CancellationToken) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, Arc::new(Fixed(ready)), stop.clone()));
        (addr, stop)
    }

    #[tokio::test]
    async fn serves_the_three_paths_and_refuses_the_rest() {
        let (addr, stop) = server(false).await;
        let metrics = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
        assert!(metrics.contains(METRICS_CONTENT_TYPE), "{metrics}");
        assert!(metrics.ends_with("up 1\n# EOF\n"), "{metrics}");
        let health = get(addr, b"GET /healthz HTTP/1.0\r\n\r\n").await;
        assert!(health.starts_with("HTTP/1.1 200 OK") && health.ends_with("\r\n\r\nok\n"));
        let ready = get(addr, b"GET /readyz?verbose HTTP/1.1\r\n\r\n").await;
        assert!(ready.starts_with("HTTP/1.1 503 "), "{ready}");
        assert!(ready.ends_with("{\"ready\":false}"), "{ready}");
        let head = get(addr, b"HEAD /healthz HTTP/1.1\r\n\r\n").await;
        assert!(
            head.ends_with(
                "content-length: 3\r\ncache-control: no-store\r\nconnection: close\r\n\r\n"
            ),
            "{head}"
        );
        assert!(
            get(addr, b"GET /admin HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 404 ")
        );
        assert!(
            get(addr, b"POST /metrics HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 405 ")
        );
        let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(8000));
        assert!(
            get(addr, huge.as_bytes())
                .await
                .starts_with("HTTP/1.1 431 ")
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn a_ready_daemon_answers_200() {
        let (addr, stop) = server(true).await;
        let ready = get(addr, b"GET /readyz HTTP/1.1\r\n\r\n").await;
        assert!(ready.starts_with("HTTP/1.1 200 OK"), "{ready}");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_client_that_sends_nothing_is_let_go() {
        let (addr, stop) = server(true).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut out = Vec::new();
        // The server's 5 s timeout closes the connection without an answer.
        let n = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
            .await
            .expect("the server never let the silent client go");
        assert_eq!(n.unwrap(), 0);
        stop.cancel();
    }
}
