//! Burrow's shared protocol crate.
//!
//! What lives here:
//! - [`api`]: the JSON messages of the proxy's web API (find, join, admin), shared by the proxy, the
//!   agent and `burrowctl`, and the error envelope every endpoint answers with.
//! - [`daemon`]: the daemons' edges: YAML config files, logging, signals.
//! - [`pin`]: the CA pin (`sha256:<hex>` of a CA certificate's DER SubjectPublicKeyInfo), parsed into
//!   a validated type and compared in constant time.
//! - [`tls`]: rustls configurations (ring provider only) and the verifier that trusts the cluster's
//!   host CA for proxies.
//! - [`web`]: a small HTTPS/1.1 client over tokio-rustls for the web API.
//! - [`fsutil`]: atomic writes of private files (0600) into private dirs (0700).
//! - [`notify`]: systemd's notify protocol (readiness, watchdog).
//! - [`sshcert`]: the SSH servers' shared configuration and user-certificate checks.
//! - [`secret`]: a string type whose `Debug` never shows the secret.
//!
//! - [`wire`]: tunnel messages and their length-capped codec (no I/O, no clock).
//! - [`transport`]: the two tunnel transports, QUIC and TLS + yamux over TCP, behind one
//!   multiplexed [`transport::Session`], and framed message I/O on its streams.
//!
//! `api`, `pin`, `secret` and `wire` do no I/O.

pub mod api;
pub mod daemon;
pub mod fsutil;
pub mod notify;
pub mod pin;
pub mod secret;
pub mod sshcert;
pub mod tls;
pub mod transport;
pub mod web;
pub mod wire;

/// The version every Burrow binary reports; agents and proxies exchange it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Wall-clock time since the Unix epoch (0 if the clock is before it).
fn since_epoch() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// This host's name, if it has a readable, non-empty one.
pub fn hostname() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
}

/// Unix seconds, as certificates, tokens and records count them.
pub fn unix_now() -> u64 {
    since_epoch().as_secs()
}

/// Unix milliseconds.
pub fn unix_now_ms() -> u64 {
    u64::try_from(since_epoch().as_millis()).unwrap_or(u64::MAX)
}
