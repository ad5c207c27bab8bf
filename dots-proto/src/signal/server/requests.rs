//! Requests, or the part of one, that read or change a single piece of
//! state: admission of a mitigation PUT, efficacy updates, GET of
//! mitigations, the session configuration, redirect targets. What else a
//! request causes (ended mitigations, actions, notifications) is the
//! server's.

use std::time::Instant;

use coap_lite::{Packet, RequestType, ResponseType};

use super::answer::{bad_request, method_not_allowed, scopes_response, validation, Answer};
use super::config::ServerConfig;
use crate::coap::{msg, ErrorResponse};
use crate::model::{
    prefixes_within, validate_call_home_request, DotsMessage, MitigationScope, MitigationUri,
    RedirectedSignal, Scope, SignalConfig, ValidatedRequest,
};
use crate::signal::action::MitigationKey;
use crate::signal::mitigation::Mitigations;
use crate::signal::session::{PutOutcome, SessionConfig};

/// A mitigation request the server accepts, and the older mitigations it
/// supersedes.
pub(super) struct Admitted {
    pub(super) request: ValidatedRequest,
    pub(super) key: MitigationKey,
    pub(super) overlapping: Vec<MitigationKey>,
}

/// Checks a mitigation PUT (not an efficacy update) against the limits,
/// the domain and the mitigations already held; nothing changes yet.
pub(super) fn admit(
    mitigations: &Mitigations,
    config: &ServerConfig,
    uri: &MitigationUri,
    body: &MitigationScope,
) -> Result<Admitted, ErrorResponse> {
    let req = validate_call_home_request(body, uri, &config.limits).map_err(validation)?;
    prefixes_within(&req.scope.source_prefix, &config.domain).map_err(validation)?;
    let key = MitigationKey::new(req.cuid.clone(), req.mid);

    let overlapping = mitigations.overlapping(&req);
    if let Some(newer) = overlapping.iter().find(|k| k.mid > req.mid) {
        return Err(ErrorResponse::new(
            ResponseType::Conflict,
            format!("overlaps mitigation mid={} which is newer", newer.mid),
        ));
    }
    let kept = mitigations.of_cuid(&key.cuid).count() - overlapping.len();
    if mitigations.get(&key).is_none() && kept >= config.max_mitigations_per_cuid {
        return Err(ErrorResponse::new(
            ResponseType::UnprocessableEntity,
            format!(
                "cuid {} already has {kept} mitigations, the limit is {}",
                key.cuid, config.max_mitigations_per_cuid
            ),
        ));
    }
    Ok(Admitted {
        request: req,
        key,
        overlapping,
    })
}

/// Efficacy update (RFC 9132 §4.4.3): PUT with an empty If-Match.
pub(super) fn efficacy_update(
    mitigations: &mut Mitigations,
    cuid: String,
    mid: Option<u32>,
    body: &MitigationScope,
) -> Answer {
    let mid = mid.ok_or_else(|| bad_request("an efficacy update needs a mid"))?;
    let [scope] = body.scopes.as_slice() else {
        return Err(bad_request("an efficacy update carries exactly one scope"));
    };
    let status = scope
        .attack_status
        .ok_or_else(|| bad_request("an efficacy update needs attack-status"))?;
    let m = mitigations
        .get_mut(&MitigationKey::new(cuid, mid))
        .ok_or_else(|| ErrorResponse::new(ResponseType::NotFound, "no such mitigation"))?;
    m.attack_status = Some(status);
    Ok(msg::response(ResponseType::Changed))
}

pub(super) fn get_mitigations(
    mitigations: &Mitigations,
    now: Instant,
    cuid: &str,
    mid: Option<u32>,
) -> Answer {
    let scopes: Vec<Scope> = mitigations
        .of_cuid(cuid)
        .filter(|(k, _)| mid.is_none_or(|m| m == k.mid))
        .map(|(_, m)| m.to_scope(now))
        .collect();
    if scopes.is_empty() {
        return Err(ErrorResponse::new(
            ResponseType::NotFound,
            "no such mitigation",
        ));
    }
    Ok(scopes_response(ResponseType::Content, scopes))
}

/// GET, PUT and DELETE of the session configuration (RFC 9132 §4.5).
pub(super) fn config_request(
    session: &mut SessionConfig,
    sid: Option<u32>,
    method: Option<RequestType>,
    request: &Packet,
) -> Answer {
    match method {
        Some(RequestType::Get) => Ok(msg::cbor_response(
            ResponseType::Content,
            session.to_message().encode(),
        )),
        Some(RequestType::Put) => {
            let sid = sid.ok_or_else(|| bad_request("PUT config needs a sid"))?;
            msg::require_dots_cbor(request)?;
            let body = SignalConfig::decode(&request.payload).map_err(bad_request)?;
            Ok(msg::response(match session.put(sid, &body)? {
                PutOutcome::Created => ResponseType::Created,
                PutOutcome::Changed => ResponseType::Changed,
            }))
        }
        Some(RequestType::Delete) => {
            session.reset();
            Ok(msg::response(ResponseType::Deleted))
        }
        _ => Err(method_not_allowed("config")),
    }
}

/// Where a redirect PUT (RFC 9066 §5.2.2) sends us; 4.00 when we cannot go.
pub(super) fn redirect_target(
    allowed: bool,
    request: &Packet,
) -> Result<RedirectedSignal, ErrorResponse> {
    if !allowed {
        return Err(bad_request("redirect is disabled on this agent"));
    }
    msg::require_dots_cbor(request)?;
    let target = RedirectedSignal::decode(&request.payload).map_err(bad_request)?;
    if target.alt_ch_client.is_empty() {
        return Err(bad_request("alt-ch-client is empty"));
    }
    Ok(target)
}
