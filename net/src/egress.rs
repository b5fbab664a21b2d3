//! Out through an HTTP proxy: the `CONNECT` method, for places whose only way out is a corporate
//! proxy. The agent installs one [`Egress`] for the process ([`install`]), from its
//! `egress_proxy` setting or the `HTTPS_PROXY` / `NO_PROXY` convention; [`connect`] then opens
//! every TCP connection to a proxy of the cluster through it (joins, `find`, TCP tunnels), except
//! to hosts `NO_PROXY` names. Credentials (`http://user:password@host:port`) go in a
//! `Proxy-Authorization: Basic` header and nowhere else: an [`Egress`] shows itself without them.

use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::web::HeadError;

const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// An HTTP proxy to go out through.
#[derive(Clone, PartialEq, Eq)]
pub struct Egress {
    /// HOST:PORT of the proxy.
    addr: String,
    /// `user:password`, as sent (base64) in `Proxy-Authorization`.
    credentials: Option<String>,
    /// Hosts reached directly (`NO_PROXY`): `*`, a name (and its subdomains), or an address.
    no_proxy: Vec<String>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_string())
    }
}

/// `http://HOST:PORT`, never the credentials.
impl std::fmt::Display for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}", self.addr)
    }
}

impl Egress {
    /// Parses a proxy URL: `http://[user:password@]host[:port][/]` (port 80 if none; user and
    /// password percent-decoded). `no_proxy`: a `NO_PROXY` list, comma-separated.
    pub fn parse(url: &str, no_proxy: &str) -> Result<Self, String> {
        let rest = url.trim().strip_prefix("http://").ok_or_else(|| {
            format!(
                "egress proxy {:?}: expected http://[user:password@]host:port",
                redact(url)
            )
        })?;
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.contains('?') {
            return Err(format!(
                "egress proxy {:?}: expected http://[user:password@]host:port, without a path",
                redact(url)
            ));
        }
        let (credentials, hostport) = match rest.rsplit_once('@') {
            Some((userinfo, hostport)) => {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                (
                    Some(format!(
                        "{}:{}",
                        percent_decode(user)?,
                        percent_decode(password)?
                    )),
                    hostport,
                )
            }
            None => (None, rest),
        };
        if hostport.is_empty() {
            return Err(format!("egress proxy {:?}: no host", redact(url)));
        }
        let has_port = match hostport.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && !port.contains(']') => {
                port.parse::<u16>().map_err(|_| {
                    format!("egress proxy {:?}: {port:?} is not a port", redact(url))
                })?;
                true
            }
            _ => false,
        };
        let addr = if has_port {
            hostport.to_string()
        } else {
            format!("{hostport}:80")
        };
        let no_proxy = no_proxy
            .split(',')
            .map(|h| h.trim().trim_start_matches('.').to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        Ok(Self {
            addr,
            credentials,
            no_proxy,
        })
    }

    /// Whether a connection to `target` (HOST:PORT) goes through this proxy.
    pub fn applies_to(&self, target: &str) -> bool {
        let host = crate::web::split_host(target)
            .unwrap_or(target)
            .trim_matches(['[', ']'])
            .to_ascii_lowercase();
        !self
            .no_proxy
            .iter()
            .any(|n| n == "*" || host == *n || host.ends_with(&format!(".{n}")))
    }

    /// A TCP connection to `target` through the proxy: `CONNECT`, then the stream is the
    /// target's.
    pub async fn connect(&self, target: &str) -> std::io::Result<TcpStream> {
        let mut tcp = TcpStream::connect(&self.addr).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot reach the egress proxy {self}: {e}"),
            )
        })?;
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(c) = &self.credentials {
            request.push_str(&format!(
                "Proxy-Authorization: Basic {}\r\n",
                base64(c.as_bytes())
            ));
        }
        request.push_str("\r\n");
        tcp.write_all(request.as_bytes()).await?;
        let head = tokio::time::timeout(ANSWER_TIMEOUT, read_head(&mut tcp))
            .await
            .map_err(|_| self.refused(target, "no answer to CONNECT within 15 s"))??;
        let status_line = head.lines().next().unwrap_or_default();
        let code = status_line.split_whitespace().nth(1).unwrap_or_default();
        match code {
            "200" => Ok(tcp),
            "407" if self.credentials.is_some() => Err(self.refused(
                target,
                &format!("{status_line}: the credentials in egress_proxy were not accepted"),
            )),
            "407" => Err(self.refused(
                target,
                &format!("{status_line}: give credentials as egress_proxy: http://user:password@host:port"),
            )),
            _ => Err(self.refused(target, status_line)),
        }
    }

    fn refused(&self, target: &str, why: &str) -> std::io::Error {
        std::io::Error::other(format!(
            "the egress proxy {self} refused CONNECT to {target}: {}",
            why.trim()
        ))
    }
}

/// The answer to `CONNECT`: its head, up to the blank line (the tunnel follows).
async fn read_head(tcp: &mut TcpStream) -> std::io::Result<String> {
    crate::web::read_head(tcp).await.map_err(|e| match e {
        HeadError::TooLong => {
            std::io::Error::other("the egress proxy's answer to CONNECT is too long")
        }
        HeadError::Closed { .. } => {
            std::io::Error::other("the egress proxy closed the connection in answer to CONNECT")
        }
        HeadError::Io(e) => e,
    })
}

static EGRESS: OnceLock<Egress> = OnceLock::new();

/// Sends this process's connections to the cluster through `egress` from now on.
pub fn install(egress: Egress) {
    let _ = EGRESS.set(egress);
}

/// The egress proxy connections to `target` go through, if any.
pub fn for_target(target: &str) -> Option<&'static Egress> {
    EGRESS.get().filter(|e| e.applies_to(target))
}

/// A TCP connection to `target` (HOST:PORT): through the installed egress proxy when it applies,
/// else directly.
pub async fn connect(target: &str) -> std::io::Result<TcpStream> {
    match for_target(target) {
        Some(egress) => egress.connect(target).await,
        None => TcpStream::connect(target).await,
    }
}

/// `url` with any password replaced, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("egress proxy: a bad %-escape in the user or password")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "egress proxy: the user or password is not UTF-8".into())
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_parse_and_never_show_their_credentials() {
        let e = Egress::parse("http://al%40ce:p%3Ass@proxy.corp:3128/", "").unwrap();
        assert_eq!(e.addr, "proxy.corp:3128");
        assert_eq!(e.credentials.as_deref(), Some("al@ce:p:ss"));
        assert_eq!(
            format!("{e} {e:?}"),
            "http://proxy.corp:3128 http://proxy.corp:3128"
        );
        assert_eq!(Egress::parse("http://[::1]", "").unwrap().addr, "[::1]:80");
        assert_eq!(
            Egress::parse("http://[::1]:8080", "").unwrap().addr,
            "[::1]:8080"
        );
        let bad = Egress::parse("https://u:secret@p:1", "").unwrap_err();
        assert!(
            bad.contains("https://***@p:1") && !bad.contains("secret"),
            "{bad}"
        );
        assert!(Egress::parse("http://p:notaport", "").is_err());
        assert!(Egress::parse("http://p:1/path", "").is_err());
    }

    #[test]
    fn no_proxy_names_hosts_their_subdomains_and_addresses() {
        let e = Egress::parse("http://p:1", "localhost, .corp.example,10.0.0.1").unwrap();
        assert!(!e.applies_to("localhost:3080"));
        assert!(!e.applies_to("burrow.corp.example:443"));
        assert!(!e.applies_to("corp.example:443"));
        assert!(!e.applies_to("10.0.0.1:3080"));
        assert!(e.applies_to("burrow.example.com:443"));
        assert!(e.applies_to("notcorp.example:443"));
        assert!(!Egress::parse("http://p:1", "*").unwrap().applies_to("x:1"));
    }

    #[test]
    fn basic_credentials_are_base64() {
        assert_eq!(base64(b"alice:s3cret"), "YWxpY2U6czNjcmV0");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
    }
}
