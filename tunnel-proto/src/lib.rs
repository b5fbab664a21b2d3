//! Burrow's protocol: the messages agents, proxies and `burrowctl` exchange, and nothing that
//! does I/O, reads a clock or needs a runtime (as quinn-proto and hickory-proto keep their core).
//! The fuzz targets build on this crate alone.
//!
//! What lives here:
//! - [`api`]: the JSON messages of the proxy's web API (find, join, admin), and the error envelope
//!   every endpoint answers with.
//! - [`wire`]: tunnel messages and their length-capped codec.
//! - [`pin`]: the CA pin (`sha256:<hex>` of a CA certificate's DER SubjectPublicKeyInfo), parsed
//!   into a validated type and compared in constant time.
//! - [`secret`]: a string type whose `Debug` never shows the secret.
//!
//! Where the rest went: TLS configurations and the web API's HTTPS client are in `burrow-net`, the
//! tunnel transports in `burrow-tunnel`, the daemons' edges in `burrow-daemon`, and what both SSH
//! servers share in `burrow-sshd`.

pub mod api;
pub mod pin;
pub mod secret;
pub mod wire;

/// The version every Burrow binary reports; agents and proxies exchange it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}
