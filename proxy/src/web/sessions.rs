//! `burrowctl sessions ls`, `sessions export` and `play`: the recordings index, and a
//! recording's text piece by piece from whichever proxy holds it.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use burrow_net::tls::{self, ALPN_CLUSTER_CERT, ALPN_HTTP1, ClientIdentity};
use burrow_net::web::WebClient;
use serde::Deserialize;
use tunnel_proto::api::{SessionCast, SessionList};

use super::failure::{ApiFailure, backend_failure, internal};
use super::{Admin, WebState};
use crate::recordings::RecordingError;

#[derive(Deserialize)]
pub struct ListQuery {
    node: Option<String>,
    user: Option<String>,
}

pub async fn list(
    State(state): State<Arc<WebState>>,
    _: Admin,
    Query(q): Query<ListQuery>,
) -> Result<Json<SessionList>, ApiFailure> {
    let sessions = state
        .recordings
        .list(q.node.as_deref(), q.user.as_deref())
        .await
        .map_err(backend_failure)?;
    Ok(Json(SessionList { sessions }))
}

#[derive(Deserialize)]
pub struct CastQuery {
    id: String,
    #[serde(default)]
    offset: u64,
}

pub async fn cast(
    State(state): State<Arc<WebState>>,
    _: Admin,
    Query(q): Query<CastQuery>,
) -> Result<Json<SessionCast>, ApiFailure> {
    // Another proxy holds it: asked with an admin identity this proxy issues for the purpose.
    let authorities = state.auth.authorities();
    let client = |addr: &str| -> Result<WebClient, String> {
        let pair = authorities
            .issue_admin_identity()
            .map_err(|e| e.to_string())?;
        let identity = ClientIdentity {
            chain: tls::parse_certs(&pair.cert_pem, "admin").map_err(|e| e.to_string())?,
            key: tls::parse_key(pair.key_pem.expose(), "admin key").map_err(|e| e.to_string())?,
        };
        let cas: Vec<_> = authorities
            .host_ca_ders()
            .into_iter()
            .map(Into::into)
            .collect();
        let config = tls::cluster_client_config(
            &cas,
            Some(identity),
            false,
            &[ALPN_HTTP1, ALPN_CLUSTER_CERT],
        )
        .map_err(|e| e.to_string())?;
        WebClient::new(addr, config).map_err(|e| e.to_string())
    };
    match state.recordings.piece(&q.id, q.offset, client).await {
        Ok(piece) => Ok(Json(piece)),
        Err(e @ RecordingError::NotFound(_)) => Err(ApiFailure::new(
            StatusCode::NOT_FOUND,
            "not_found",
            e.to_string(),
        )),
        Err(e @ (RecordingError::HolderGone(_) | RecordingError::HolderUnreachable { .. })) => {
            Err(ApiFailure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "holder_unavailable",
                e.to_string(),
            ))
        }
        Err(RecordingError::Backend(e)) => Err(backend_failure(e)),
        Err(e) => Err(internal(e)),
    }
}
