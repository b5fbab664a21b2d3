//! Burrow's client-side networking that every binary shares, `burrowctl` included: the rustls
//! configurations and verifiers ([`tls`]), the HTTPS client for the proxy's web API ([`web`]),
//! and the way out through an HTTP proxy ([`egress`]).
//! The tunnel transports, which only the daemons need, live in `burrow-tunnel`.

pub mod egress;
pub mod tls;
pub mod web;
