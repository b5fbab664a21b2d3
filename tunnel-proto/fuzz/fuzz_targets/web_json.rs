//! Feeds arbitrary bytes to the web API's JSON request bodies as the proxy parses them (serde
//! into the request types), then to the checks it runs on what parsed: none may panic, and
//! whatever parses must serialize back to a body that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tunnel_proto::api::{
    self, JoinRequest, NodeRemoveRequest, SignRequest, TokenAddRequest, TokenRemoveRequest,
};

/// Parses `data` as `T`; if it parses, checks it survives a round trip.
fn round_trip<T: DeserializeOwned + Serialize>(data: &[u8]) -> Option<T> {
    let value: T = serde_json::from_slice(data).ok()?;
    let again = serde_json::to_vec(&value).expect("a parsed body serializes");
    let back: T = serde_json::from_slice(&again).expect("a serialized body parses");
    assert_eq!(
        serde_json::to_value(&back).unwrap(),
        serde_json::to_value(&value).unwrap()
    );
    Some(value)
}

fuzz_target!(|data: &[u8]| {
    if let Some(join) = round_trip::<JoinRequest>(data) {
        let _ = api::validate_node_name(&join.node_name);
        let _ = api::looks_like_host_id(&join.node_name);
    }
    if let Some(add) = round_trip::<TokenAddRequest>(data) {
        let _ = api::Role::join_list(&add.roles);
    }
    if let Some(sign) = round_trip::<SignRequest>(data) {
        for login in &sign.logins {
            let _ = api::validate_node_name(login);
        }
    }
    let _ = round_trip::<TokenRemoveRequest>(data);
    let _ = round_trip::<NodeRemoveRequest>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = api::parse_labels(text);
        let _ = api::Role::parse_list(text);
    }
});
