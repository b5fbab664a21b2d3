//! A small HTTPS/1.1 JSON client for the proxy's web API.
//!
//! One connection per request: the agent talks to the web API a couple of times in its life and
//! `burrowctl` once per command, so pooling would only add state.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_rustls::TlsConnector;

use tunnel_proto::api::{ApiError, ApiErrorBody};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("cannot reach the proxy at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("TLS handshake with the proxy at {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
    /// The proxy answered with an error; `code` is stable and machine-readable.
    #[error("{}", .error.message)]
    Api { status: u16, error: ApiError },
    #[error("the proxy at {addr} sent an invalid answer: {reason}")]
    BadResponse { addr: String, reason: String },
    #[error("{0:?} is not a valid proxy address: expected host:port")]
    BadAddress(String),
}

/// The longest HTTP answer head [`read_head`] reads.
pub const MAX_HEAD: usize = 8 * 1024;

/// Why an HTTP answer's head could not be read.
#[derive(Debug)]
pub enum HeadError {
    /// Longer than [`MAX_HEAD`].
    TooLong,
    /// The peer closed the connection first, after sending `partial`.
    Closed {
        partial: String,
    },
    Io(std::io::Error),
}

/// Reads an HTTP answer's head up to its blank line, byte by byte, so that nothing of the
/// stream behind it (a tunnel, after `CONNECT` or an Upgrade) is consumed; at most [`MAX_HEAD`]
/// bytes.
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(io: &mut S) -> Result<String, HeadError> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(HeadError::TooLong);
        }
        match io.read_u8().await {
            Ok(b) => head.push(b),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(HeadError::Closed {
                    partial: String::from_utf8_lossy(&head).into_owned(),
                });
            }
            Err(e) => return Err(HeadError::Io(e)),
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// HTTPS client for one proxy address.
#[derive(Clone)]
pub struct WebClient {
    addr: String,
    server_name: ServerName<'static>,
    connector: TlsConnector,
}

impl WebClient {
    pub fn new(addr: &str, tls: ClientConfig) -> Result<Self, WebError> {
        let host = split_host(addr).ok_or_else(|| WebError::BadAddress(addr.to_string()))?;
        let server_name = ServerName::try_from(host.to_string())
            .map_err(|_| WebError::BadAddress(addr.to_string()))?;
        Ok(Self {
            addr: addr.to_string(),
            server_name,
            connector: TlsConnector::from(Arc::new(tls)),
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, WebError> {
        self.request(Method::GET, path, None).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, WebError> {
        let body = serde_json::to_vec(body).map_err(|e| self.bad(e))?;
        self.request(Method::POST, path, Some(body)).await
    }

    async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, WebError> {
        let (status, bytes) =
            tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(method, path, body))
                .await
                .map_err(|_| WebError::Unreachable {
                    addr: self.addr.clone(),
                    reason: format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()),
                })??;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| self.bad(e));
        }
        match serde_json::from_slice::<ApiErrorBody>(&bytes) {
            Ok(body) => Err(WebError::Api {
                status: status.as_u16(),
                error: body.error,
            }),
            Err(_) => Err(self.bad(format!("HTTP status {status} without an error body"))),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), WebError> {
        let unreachable = |reason: String| WebError::Unreachable {
            addr: self.addr.clone(),
            reason,
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, crate::egress::connect(&self.addr))
            .await
            .map_err(|_| {
                unreachable(format!(
                    "no connection within {}s",
                    CONNECT_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| WebError::Tls {
                addr: self.addr.clone(),
                reason: e.to_string(),
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| self.bad(e))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.addr)
            .header(header::ACCEPT, "application/json");
        if body.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| self.bad(e))?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| self.bad(e))?;
            let status = response.status();
            let bytes = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| self.bad(e))?
                .to_bytes();
            Ok((status, bytes))
        }
        .await;
        driver.abort();
        result
    }

    fn bad(&self, reason: impl std::fmt::Display) -> WebError {
        WebError::BadResponse {
            addr: self.addr.clone(),
            reason: reason.to_string(),
        }
    }
}

/// The host part of `host:port` or `[v6]:port`.
pub fn split_host(addr: &str) -> Option<&str> {
    let (host, port) = addr.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_hosts() {
        assert_eq!(split_host("example.com:3080"), Some("example.com"));
        assert_eq!(split_host("127.0.0.1:0"), Some("127.0.0.1"));
        assert_eq!(split_host("[::1]:3080"), Some("::1"));
        assert_eq!(split_host("example.com"), None);
        assert_eq!(split_host(":3080"), None);
        assert_eq!(split_host("host:99999"), None);
    }
}
