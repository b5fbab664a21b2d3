//! Join tokens: dynamic ones in the backend, stored by hash; static ones from the config.
//!
//! A token's value is shown once, when it is created. The backend key is the SHA-256 of the value,
//! so neither a backend dump nor the timing of a lookup reveals a token. Static tokens are held in
//! memory as hashes too and compared in constant time.

use std::sync::Arc;
use std::time::Duration;

use burrow_daemon::unix_now;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tunnel_proto::api::{Labels, Role, TokenAdded, TokenInfo, TokenKind};
use tunnel_proto::hex;
use tunnel_proto::secret::Secret;

use crate::backend::{Backend, BackendError};

use crate::state::TOKENS as PREFIX;
/// How long an expired or revoked token is remembered, so that a join with it is told
/// "expired" or "revoked" rather than "unknown".
const TOMBSTONE_GRACE: Duration = Duration::from_secs(24 * 3600);
/// Longest TTL of a dynamic token: longer-lived ones are static tokens, in the config.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Length of a token id: the first hex digits of the token's SHA-256.
const ID_LEN: usize = 16;
const MIN_VALUE_LEN: usize = 8;
const MAX_VALUE_LEN: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the join token is not known to this cluster")]
    NotFound,
    #[error("the join token expired at {0}")]
    Expired(String),
    #[error("the join token was revoked")]
    Revoked,
    #[error("the join token allows role {allowed}, not {requested}")]
    RoleNotAllowed { requested: String, allowed: String },
    #[error("{0}")]
    Invalid(String),
    #[error("a token with this value already exists")]
    Exists,
    #[error("token {0} is static: it comes from the proxy's configuration and is removed there")]
    Static(String),
    #[error("{0:?} matches several tokens; give more of the id")]
    Ambiguous(String),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// A token from the configuration (`--static-token`, `static_tokens:`).
#[derive(Debug, Clone)]
pub struct StaticToken {
    pub roles: Vec<Role>,
    pub value: Secret,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenRecord {
    roles: Vec<Role>,
    labels: Labels,
    created: u64,
    expires: u64,
    #[serde(default)]
    revoked: bool,
}

/// What a valid token grants.
#[derive(Debug, Clone)]
pub struct Grant {
    pub token_id: String,
    pub labels: Labels,
}

pub struct TokenStore {
    backend: Arc<dyn Backend>,
    statics: Vec<(StaticToken, [u8; 32])>,
}

pub fn hash(value: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, value.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn id_of(hash: &[u8; 32]) -> String {
    hex(hash)[..ID_LEN].to_string()
}

/// A fresh token: 128 bits from the system's CSPRNG, as 32 hex digits.
pub fn generate_value() -> Secret {
    let bytes: [u8; 16] = rand::random();
    Secret::new(hex(&bytes))
}

pub fn validate_value(value: &str) -> Result<(), TokenError> {
    let len = value.chars().count();
    if !(MIN_VALUE_LEN..=MAX_VALUE_LEN).contains(&len) {
        return Err(TokenError::Invalid(format!(
            "a token must have {MIN_VALUE_LEN} to {MAX_VALUE_LEN} characters"
        )));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(TokenError::Invalid(
            "a token must not contain spaces or control characters".into(),
        ));
    }
    Ok(())
}

impl TokenStore {
    pub fn new(backend: Arc<dyn Backend>, statics: Vec<StaticToken>) -> Self {
        let statics = statics
            .into_iter()
            .map(|t| {
                let h = hash(t.value.expose());
                (t, h)
            })
            .collect();
        Self { backend, statics }
    }

    pub async fn add(
        &self,
        roles: Vec<Role>,
        ttl: Duration,
        value: Option<Secret>,
        labels: Labels,
    ) -> Result<TokenAdded, TokenError> {
        if roles.is_empty() {
            return Err(TokenError::Invalid(
                "a token needs at least one role".into(),
            ));
        }
        if ttl.is_zero() {
            return Err(TokenError::Invalid("a token's TTL must be positive".into()));
        }
        if ttl > MAX_TTL {
            return Err(TokenError::Invalid(
                "a token's TTL must be at most 365 days (longer-lived tokens are static tokens)"
                    .into(),
            ));
        }
        let value = match value {
            Some(v) => {
                validate_value(v.expose())?;
                v
            }
            None => generate_value(),
        };
        let h = hash(value.expose());
        if self.static_match(&h).is_some() {
            return Err(TokenError::Exists);
        }
        let now = unix_now();
        let record = TokenRecord {
            roles: roles.clone(),
            labels: labels.clone(),
            created: now,
            expires: now.saturating_add(ttl.as_secs().max(1)),
            revoked: false,
        };
        let written = self
            .backend
            .compare_and_swap(&key(&h), None, encode(&record), Some(ttl + TOMBSTONE_GRACE))
            .await?;
        if !written {
            return Err(TokenError::Exists);
        }
        Ok(TokenAdded {
            token: value,
            id: id_of(&h),
            roles,
            labels,
            expires: record.expires,
        })
    }

    /// Live tokens: dynamic ones that have neither expired nor been revoked, and static ones.
    pub async fn list(&self, with_secrets: bool) -> Result<Vec<TokenInfo>, TokenError> {
        let now = unix_now();
        let mut out: Vec<TokenInfo> = self
            .statics
            .iter()
            .map(|(t, h)| TokenInfo {
                id: id_of(h),
                kind: TokenKind::Static,
                roles: t.roles.clone(),
                labels: Labels::new(),
                expires: None,
                value: with_secrets.then(|| t.value.clone()),
            })
            .collect();
        for (k, v) in self.backend.list(PREFIX).await? {
            let Some(record) = decode(&v) else { continue };
            if record.revoked || record.expires <= now {
                continue;
            }
            out.push(TokenInfo {
                id: k[PREFIX.len()..].chars().take(ID_LEN).collect(),
                kind: TokenKind::Dynamic,
                roles: record.roles,
                labels: record.labels,
                expires: Some(record.expires),
                value: None,
            });
        }
        Ok(out)
    }

    /// Revokes a dynamic token given its value or its id; returns the id.
    pub async fn remove(&self, value_or_id: &Secret) -> Result<String, TokenError> {
        let input = value_or_id.expose().trim();
        let h = hash(input);
        if self.static_match(&h).is_some() {
            return Err(TokenError::Static(id_of(&h)));
        }
        if let Some(raw) = self.backend.get(&key(&h)).await?
            && let Some(record) = decode(&raw)
            && !record.revoked
        {
            self.revoke(&key(&h), &raw, record).await?;
            return Ok(id_of(&h));
        }
        // Not a live token value: perhaps an id (a prefix of the hash).
        let is_id =
            input.len() >= 8 && input.len() <= 64 && input.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_id {
            return Err(TokenError::NotFound);
        }
        let wanted = format!("{PREFIX}{}", input.to_ascii_lowercase());
        if let Some((_, h)) = self
            .statics
            .iter()
            .find(|(_, h)| key(h).starts_with(&wanted))
        {
            return Err(TokenError::Static(id_of(h)));
        }
        let now = unix_now();
        let matches: Vec<(String, Vec<u8>, TokenRecord)> = self
            .backend
            .list(&wanted)
            .await?
            .into_iter()
            .filter_map(|(k, v)| decode(&v).map(|r| (k, v, r)))
            .filter(|(_, _, r)| !r.revoked && r.expires > now)
            .collect();
        match matches.as_slice() {
            [] => Err(TokenError::NotFound),
            [(k, raw, record)] => {
                self.revoke(k, raw, record.clone()).await?;
                Ok(k[PREFIX.len()..].chars().take(ID_LEN).collect())
            }
            _ => Err(TokenError::Ambiguous(input.to_string())),
        }
    }

    async fn revoke(
        &self,
        key: &str,
        raw: &[u8],
        mut record: TokenRecord,
    ) -> Result<(), TokenError> {
        record.revoked = true;
        let remaining = record.expires.saturating_sub(unix_now());
        let ttl = Duration::from_secs(remaining) + TOMBSTONE_GRACE;
        // CAS so that a concurrent revoke or re-add is not silently overwritten.
        if !self
            .backend
            .compare_and_swap(key, Some(raw), encode(&record), Some(ttl))
            .await?
        {
            return Err(TokenError::NotFound);
        }
        Ok(())
    }

    /// Checks a token presented in a join for `role`.
    pub async fn check(&self, value: &Secret, role: Role) -> Result<Grant, TokenError> {
        let h = hash(value.expose().trim());
        if let Some(t) = self.static_match(&h) {
            check_role(&t.roles, role)?;
            return Ok(Grant {
                token_id: id_of(&h),
                labels: Labels::new(),
            });
        }
        let raw = self
            .backend
            .get(&key(&h))
            .await?
            .ok_or(TokenError::NotFound)?;
        let record = decode(&raw).ok_or(TokenError::NotFound)?;
        if record.revoked {
            return Err(TokenError::Revoked);
        }
        if record.expires <= unix_now() {
            return Err(TokenError::Expired(rfc3339(record.expires)));
        }
        check_role(&record.roles, role)?;
        Ok(Grant {
            token_id: id_of(&h),
            labels: record.labels,
        })
    }

    /// The static token with this hash, compared in constant time against every one.
    fn static_match(&self, h: &[u8; 32]) -> Option<&StaticToken> {
        let mut found = None;
        for (t, th) in &self.statics {
            if bool::from(th.ct_eq(h)) {
                found = Some(t);
            }
        }
        found
    }
}

fn check_role(allowed: &[Role], requested: Role) -> Result<(), TokenError> {
    if allowed.contains(&requested) {
        Ok(())
    } else {
        Err(TokenError::RoleNotAllowed {
            requested: requested.as_str().into(),
            allowed: Role::join_list(allowed),
        })
    }
}

fn key(h: &[u8; 32]) -> String {
    crate::state::token(&hex(h))
}

fn encode(record: &TokenRecord) -> Vec<u8> {
    serde_json::to_vec(record).expect("token records serialize")
}

fn decode(raw: &[u8]) -> Option<TokenRecord> {
    serde_json::from_slice(raw).ok()
}

pub fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::RedbBackend;

    fn store(statics: Vec<StaticToken>) -> (tempfile::TempDir, TokenStore) {
        let dir = tempfile::tempdir().unwrap();
        let b = RedbBackend::open(&dir.path().join("s.redb")).unwrap();
        (dir, TokenStore::new(Arc::new(b), statics))
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn generated_tokens_are_128_bit_hex_and_stored_by_hash() {
        let (_d, s) = store(vec![]);
        let added = s
            .add(vec![Role::Node], HOUR, None, Labels::new())
            .await
            .unwrap();
        let value = added.token.expose().to_string();
        assert_eq!(value.len(), 32);
        assert!(value.bytes().all(|b| b.is_ascii_hexdigit()));
        let keys = s.backend.list("/").await.unwrap();
        assert_eq!(keys.len(), 1);
        assert!(!keys[0].0.contains(&value));
        assert!(!String::from_utf8_lossy(&keys[0].1).contains(&value));
        assert_eq!(keys[0].0, key(&hash(&value)));
        let other = s
            .add(vec![Role::Node], HOUR, None, Labels::new())
            .await
            .unwrap();
        assert_ne!(other.token, added.token);
    }

    #[tokio::test]
    async fn check_tells_every_failure_apart() {
        let (_d, s) = store(vec![]);
        let labels = Labels::from([("env".to_string(), "lab".to_string())]);
        let node = s
            .add(vec![Role::Node], HOUR, None, labels.clone())
            .await
            .unwrap();
        let grant = s.check(&node.token, Role::Node).await.unwrap();
        assert_eq!(grant.labels, labels);
        assert!(matches!(
            s.check(&Secret::new("nope-nope-nope"), Role::Node).await,
            Err(TokenError::NotFound)
        ));
        let proxy = s
            .add(vec![Role::Proxy], HOUR, None, Labels::new())
            .await
            .unwrap();
        let err = s.check(&proxy.token, Role::Node).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "the join token allows role proxy, not node"
        );
        s.remove(&node.token).await.unwrap();
        assert!(matches!(
            s.check(&node.token, Role::Node).await,
            Err(TokenError::Revoked)
        ));
        assert!(matches!(
            s.remove(&node.token).await,
            Err(TokenError::NotFound)
        ));
    }

    #[tokio::test]
    async fn expired_tokens_are_told_apart_and_not_listed() {
        let (_d, s) = store(vec![]);
        let record = TokenRecord {
            roles: vec![Role::Node],
            labels: Labels::new(),
            created: 1,
            expires: unix_now() - 10,
            revoked: false,
        };
        let value = Secret::new("expired-token-value");
        s.backend
            .put(&key(&hash(value.expose())), encode(&record), Some(HOUR))
            .await
            .unwrap();
        let err = s.check(&value, Role::Node).await.unwrap_err();
        assert!(
            err.to_string().starts_with("the join token expired at "),
            "{err}"
        );
        assert!(s.list(false).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn remove_by_id_and_static_tokens_are_protected() {
        let statics = vec![StaticToken {
            roles: vec![Role::Node],
            value: Secret::new("static-secret-1"),
        }];
        let (_d, s) = store(statics);
        let added = s
            .add(vec![Role::Node], HOUR, None, Labels::new())
            .await
            .unwrap();
        let listed = s.list(true).await.unwrap();
        assert_eq!(listed.len(), 2);
        let st = listed.iter().find(|t| t.kind == TokenKind::Static).unwrap();
        assert_eq!(st.value.as_ref().unwrap().expose(), "static-secret-1");
        assert!(
            listed
                .iter()
                .all(|t| t.kind == TokenKind::Static || t.value.is_none())
        );
        assert!(
            s.list(false)
                .await
                .unwrap()
                .iter()
                .all(|t| t.value.is_none())
        );
        assert!(matches!(
            s.remove(&Secret::new("static-secret-1")).await,
            Err(TokenError::Static(_))
        ));
        assert_eq!(
            s.remove(&Secret::new(&added.id[..10])).await.unwrap(),
            added.id
        );
        assert_eq!(s.list(false).await.unwrap().len(), 1);
        s.check(&Secret::new("static-secret-1"), Role::Node)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn chosen_values_are_validated_and_unique() {
        let (_d, s) = store(vec![]);
        for bad in ["short", "has space inside", &"x".repeat(300)] {
            let r = s
                .add(
                    vec![Role::Node],
                    HOUR,
                    Some(Secret::new(bad)),
                    Labels::new(),
                )
                .await;
            assert!(matches!(r, Err(TokenError::Invalid(_))), "{bad}");
        }
        let v = Some(Secret::new("my-chosen-token"));
        s.add(vec![Role::Node], HOUR, v.clone(), Labels::new())
            .await
            .unwrap();
        assert!(matches!(
            s.add(vec![Role::Node], HOUR, v, Labels::new()).await,
            Err(TokenError::Exists)
        ));
    }
}
