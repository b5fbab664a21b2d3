//! Burrow's client-side networking that every binary shares, `burrowctl` included: the rustls
//! configurations and verifiers ([`tls`]) and the HTTPS client for the proxy's web API ([`web`]).
//! The tunnel transports, which only the daemons need, live in `burrow-tunnel`.

pub mod tls;
pub mod web;
