//! Requests, or the part of one, that read or change a single piece of
//! state: admission of a mitigation PUT, efficacy updates, GET of
//! mitigations, the session configuration, redirect targets. What else a
//! request causes (ended mitigations, actions, notifications) is the
//! server's.

use std::time::Instant;

use coap_lite::{Packet, RequestType, ResponseType};
use ipnet::IpNet;

use super::answer::{bad_request, method_not_allowed, scopes_response, validation, Answer};
use super::config::ServerConfig;
use crate::coap::{msg, ErrorResponse};
use crate::model::{
    prefixes_within, validate_call_home_request, Bound, ConflictCause, ConflictInformation,
    ConflictScope, ConflictStatus, DotsMessage, Exemption, MitigationScope, MitigationUri,
    OverLimit, RedirectedSignal, Scope, SignalConfig, ValidatedRequest,
};
use crate::signal::action::MitigationKey;
use crate::signal::mitigation::{same_request, Mitigations};
use crate::signal::session::{PutOutcome, SessionConfig};
use crate::signal::shared::BudgetAccount;

/// A request that passed validation, the domain check and the exemption
/// check, with what the local policy says about it.
pub(super) struct Checked {
    pub(super) request: ValidatedRequest,
    /// The part left alone because it is exempt; never all of it.
    pub(super) exempt: Option<Exemption>,
    /// The policy bound the request goes past, if any.
    pub(super) bound: Option<Bound>,
}

/// The checks every mitigation request goes through, at admission and
/// again at restore: RFC rules, the domain, the exempt prefixes (a scope
/// entirely exempt is 4.09 with conflict-cause 4, RFC 9066 §5.3.1), and
/// the policy bounds (reported, not acted on). `requested_lifetime` is the
/// body's, before any shortening.
pub(super) fn check_request(
    config: &ServerConfig,
    uri: &MitigationUri,
    body: &MitigationScope,
) -> Result<Checked, ErrorResponse> {
    let mut req = validate_call_home_request(body, uri, &config.limits).map_err(validation)?;
    prefixes_within(&req.scope.source_prefix, &config.domain).map_err(validation)?;
    let exempt = Exemption::of(&req.scope, &config.exempt.prefixes());
    if let Some(e) = exempt.as_ref().filter(|e| e.complete) {
        return Err(legitimate_traffic(req.mid, e));
    }
    let requested = body
        .scopes
        .first()
        .and_then(|s| s.lifetime)
        .unwrap_or(req.lifetime);
    let bound = config
        .policy
        .exceeded(&req, requested, config.limits.max_lifetime);
    // A lifetime bound the operator may consent to is granted in full.
    if bound.as_ref().is_some_and(|b| b.key == "max-lifetime")
        && config.policy.over_limit == OverLimit::Consent
    {
        req.lifetime = requested;
        req.scope.lifetime = Some(requested);
    }
    Ok(Checked {
        request: req,
        exempt,
        bound,
    })
}

/// 4.09 for a scope whose traffic is all exempt: conflict-cause 4
/// (request-rejected-legitimate-traffic, RFC 9066 §5.3.1), the exempt
/// parts in conflict-scope.
fn legitimate_traffic(mid: u32, e: &Exemption) -> ErrorResponse {
    let conflict = ConflictInformation {
        conflict_status: None,
        ..e.conflict_information()
    };
    let diagnostic = format!(
        "all traffic of the scope is exempt from enforcement (never-block or a peer's address): sources {:?}, targets {:?}",
        e.sources, e.targets
    );
    conflict_response(mid, diagnostic, conflict)
}

/// An error answer whose body is the request's scope with its
/// conflict-information (RFC 9132 §4.4.1).
fn conflict_response(mid: u32, diagnostic: String, conflict: ConflictInformation) -> ErrorResponse {
    let body = MitigationScope {
        scopes: vec![Scope {
            mid: Some(mid),
            conflict_information: Some(conflict),
            ..Scope::default()
        }],
    };
    ErrorResponse::with_body(ResponseType::Conflict, diagnostic, body.encode())
}

/// A mitigation request the server accepts, and the older mitigations it
/// supersedes.
pub(super) struct Admitted {
    pub(super) request: ValidatedRequest,
    pub(super) key: MitigationKey,
    pub(super) overlapping: Vec<MitigationKey>,
    pub(super) exempt: Option<Exemption>,
    /// Past this bound, with `over-limit = consent`: the operator decides.
    pub(super) needs_consent: Option<Bound>,
}

/// Checks a mitigation PUT (not an efficacy update) against the rules,
/// the policy, the mitigations already held and the agent-wide budget;
/// nothing changes yet except this server's reservation in the budget.
pub(super) fn admit(
    mitigations: &Mitigations,
    config: &ServerConfig,
    account: &BudgetAccount,
    uri: &MitigationUri,
    body: &MitigationScope,
) -> Result<Admitted, ErrorResponse> {
    let Checked {
        request: req,
        exempt,
        bound,
    } = check_request(config, uri, body)?;
    let key = MitigationKey::new(req.cuid.clone(), req.mid);

    let overlapping = mitigations.overlapping(&req);
    if let Some(newer) = overlapping.iter().find(|k| k.mid > req.mid) {
        return Err(newer_overlaps(mitigations, &req, newer));
    }
    let is_new = mitigations.get(&key).is_none();
    let kept = mitigations.of_cuid(&key.cuid).count() - overlapping.len();
    if is_new && kept >= config.max_mitigations_per_cuid {
        return Err(too_many(format!(
            "cuid {} already has {kept} mitigations, the limit is {} (max-mitigations-per-cuid)",
            key.cuid, config.max_mitigations_per_cuid
        )));
    }
    let after = mitigations.len() - overlapping.len() + usize::from(is_new);
    if after > config.max_mitigations_per_peer {
        return Err(too_many(format!(
            "this peer already holds {} mitigations, the limit is {} (max-mitigations-per-peer)",
            mitigations.len(),
            config.max_mitigations_per_peer
        )));
    }
    let needs_consent = match (bound, config.policy.over_limit) {
        (Some(b), OverLimit::Refuse) => return Err(too_many(b.to_string())),
        (bound, _) => bound,
    };
    // Last, as it takes a place that other peers' servers then see.
    account.reserve(after).map_err(|o| {
        too_many(format!(
            "the agent holds {} mitigations for all its peers, the limit is {} (max-mitigations; the data plane has one slot per mitigation)",
            o.held, o.limit
        ))
    })?;
    Ok(Admitted {
        request: req,
        key,
        overlapping,
        exempt,
        needs_consent,
    })
}

fn too_many(diagnostic: String) -> ErrorResponse {
    ErrorResponse::new(ResponseType::UnprocessableEntity, diagnostic)
}

/// 4.09 for a request overlapping a newer mitigation of the same client
/// (RFC 9132 §4.4.1): conflict-status 1 (this one inactive, the other
/// active), conflict-cause 1 (overlapping-targets), and in conflict-scope
/// the targets that overlap and the newer mid.
fn newer_overlaps(
    mitigations: &Mitigations,
    req: &ValidatedRequest,
    newer: &MitigationKey,
) -> ErrorResponse {
    let theirs = mitigations
        .get(newer)
        .map(|m| m.request.scope.target_prefix.clone())
        .unwrap_or_default();
    let overlap: Vec<IpNet> = req
        .scope
        .target_prefix
        .iter()
        .filter(|t| theirs.iter().any(|o| o.contains(*t) || t.contains(o)))
        .copied()
        .collect();
    let conflict = ConflictInformation {
        conflict_status: Some(ConflictStatus::InactiveOtherActive),
        conflict_cause: Some(ConflictCause::OverlappingTargets),
        conflict_scope: Some(ConflictScope {
            target_prefix: overlap,
            mid: Some(newer.mid),
            ..ConflictScope::default()
        }),
        retry_timer: None,
    };
    conflict_response(
        req.mid,
        format!("overlaps mitigation mid={} which is newer", newer.mid),
        conflict,
    )
}

/// Efficacy update (RFC 9132 §4.4.3): PUT with an empty If-Match (the
/// caller checked that the mitigation exists). It carries the request's
/// parameters unchanged apart from `lifetime`, plus `attack-status`; one
/// that changes the scope is refused with 4.00 rather than answered 2.04
/// for a change that is not made.
pub(super) fn efficacy_update(
    mitigations: &mut Mitigations,
    key: &MitigationKey,
    body: &MitigationScope,
) -> Answer {
    let [scope] = body.scopes.as_slice() else {
        return Err(bad_request("an efficacy update carries exactly one scope"));
    };
    let status = scope
        .attack_status
        .ok_or_else(|| bad_request("an efficacy update needs attack-status"))?;
    let m = mitigations
        .get_mut(key)
        .ok_or_else(|| ErrorResponse::new(ResponseType::NotFound, "no such mitigation"))?;
    if !same_request(&m.request.scope, scope) {
        return Err(bad_request(
            "an efficacy update must repeat the mitigation's parameters unchanged (only lifetime and attack-status may differ); send a PUT without If-Match to change the scope",
        ));
    }
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

/// Where a redirect PUT (RFC 9066 §5.2.2) sends us; 4.00 when we cannot
/// go, the syntax checked before anything is answered.
pub(super) fn redirect_target(
    allowed: bool,
    request: &Packet,
) -> Result<RedirectedSignal, ErrorResponse> {
    if !allowed {
        return Err(bad_request("redirect is disabled on this agent"));
    }
    msg::require_dots_cbor(request)?;
    let target = RedirectedSignal::decode(&request.payload).map_err(bad_request)?;
    target.check().map_err(bad_request)?;
    Ok(target)
}
