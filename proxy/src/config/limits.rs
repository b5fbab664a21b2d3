//! The `limits:` section of the proxy's config: what anonymous clients can make the proxy hold
//! (SSH login grace and startups, web request time and connections).

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// What anonymous clients can make the proxy hold, as written in the YAML `limits:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default, with = "humantime_serde_opt")]
    pub ssh_login_grace_time: Option<Duration>,
    pub ssh_max_startups: Option<usize>,
    pub ssh_max_startups_per_source: Option<usize>,
    #[serde(default, with = "humantime_serde_opt")]
    pub web_request_timeout: Option<Duration>,
    pub web_max_connections: Option<usize>,
    pub web_max_connections_per_source: Option<usize>,
}

/// The validated limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// An SSH connection that has not authenticated within this time is closed (sshd's
    /// LoginGraceTime).
    pub ssh_login_grace_time: Duration,
    /// Unauthenticated SSH connections at once, in all and per source (sshd's MaxStartups).
    pub ssh_max_startups: usize,
    pub ssh_max_startups_per_source: usize,
    /// A whole request (headers and body) must arrive and be answered within this time.
    pub web_request_timeout: Duration,
    /// Web-port connections that are not (yet) tunnels, in all and per source.
    pub web_max_connections: usize,
    pub web_max_connections_per_source: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            ssh_login_grace_time: Duration::from_secs(60),
            ssh_max_startups: 100,
            ssh_max_startups_per_source: 10,
            web_request_timeout: Duration::from_secs(30),
            web_max_connections: 4096,
            web_max_connections_per_source: 256,
        }
    }
}

impl Limits {
    pub(super) fn merge(file: LimitsConfig) -> Result<Self, ConfigError> {
        let d = Limits::default();
        let limits = Limits {
            ssh_login_grace_time: file.ssh_login_grace_time.unwrap_or(d.ssh_login_grace_time),
            ssh_max_startups: file.ssh_max_startups.unwrap_or(d.ssh_max_startups),
            ssh_max_startups_per_source: file
                .ssh_max_startups_per_source
                .unwrap_or(d.ssh_max_startups_per_source),
            web_request_timeout: file.web_request_timeout.unwrap_or(d.web_request_timeout),
            web_max_connections: file.web_max_connections.unwrap_or(d.web_max_connections),
            web_max_connections_per_source: file
                .web_max_connections_per_source
                .unwrap_or(d.web_max_connections_per_source),
        };
        let positive = [
            limits.ssh_max_startups,
            limits.ssh_max_startups_per_source,
            limits.web_max_connections,
            limits.web_max_connections_per_source,
        ];
        if positive.contains(&0)
            || limits.ssh_login_grace_time.is_zero()
            || limits.web_request_timeout.is_zero()
        {
            return Err(ConfigError("limits: every limit must be positive".into()));
        }
        Ok(limits)
    }
}

/// `Option<Duration>` as a humantime string ("60s", "2m") in YAML.
mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| humantime::parse_duration(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}
