//! The server role: the Call Home agent answering the peer's CoAP requests.
//!
//! Asynchronous model (RFC 9132 §4.4.1/§4.4.2): a PUT that needs the data
//! plane is answered at once, 2.01 (or 2.04) with status 1
//! (attack-mitigation-in-progress); the entry moves to status 2 only when
//! the shell reports [`SignalServer::installed`], and observers are
//! notified then. Status and counters come only from the shell's results.
//!
//! Choices where the RFCs leave room, in one place:
//! * an install failure reported after the 2.01 ends the mitigation with a
//!   notification carrying status 6 (attack-mitigation-terminated): the
//!   answer is already sent, and 6 is the server-side end of a mitigation;
//! * consent rejected: notification with status 7 (withdrawn by the DOTS
//!   server) and conflict-cause 4 (RFC 9066 §5.3.1), and the entry ends;
//! * a new mid overlapping an older one of the same cuid supersedes it
//!   (the older is removed before the newer is installed); a lower mid
//!   overlapping a newer one is refused with 4.09;
//! * too many mitigations for one cuid is 4.22, like other size limits;
//! * expiry and withdrawal notify observers with status 6 and remove the
//!   drops at once ([`Action::Remove`] queued in the same call);
//! * DELETE of an enforced mitigation is answered once the data plane has
//!   removed it: [`Action::Remove`] is queued, the shell removes the drops,
//!   reads the final counters and calls [`SignalServer::removed`], which
//!   sends 2.02 with exactly those. If the shell does not call it within
//!   [`ServerConfig::counters_wait`] (default 1 s, below CoAP's 2 s
//!   ACK_TIMEOUT so the peer does not retransmit meanwhile), 2.02 goes out
//!   with the last counters reported (at most one `notify_period` old).
//!   A zero `counters_wait` answers at once (the earlier behaviour). A
//!   retransmitted DELETE arriving meanwhile is absorbed by the endpoint's
//!   deduplication; answers still waiting at [`SignalServer::reconnect`]
//!   are dropped with the old connection;
//! * periodic notifications of active mitigations wait for the counters
//!   queried at the same tick (up to `counters_wait`, at most half a
//!   period), so each period sends one notification with fresh counters
//!   rather than a stale one followed by a fresh one;
//! * consent (RFC 9066 §5.3.1): a request awaiting consent is listed by
//!   [`SignalServer::pending`]; with [`ServerConfig::consent_timeout`] set,
//!   a request pending that long is approved or rejected as
//!   [`ServerConfig::consent_timeout_approves`] says
//!   ([`Action::ConsentTimedOut`] tells the shell);
//! * every error answer to a peer request also queues [`Action::Rejected`]
//!   (code and diagnostic as sent) for the shell's log;
//! * persistence: [`SignalServer::snapshot`] / [`SignalServer::restore`],
//!   see [`SignalServer::restore`] for what a restored entry looks like;
//! * an efficacy update only records `attack-status`, it does not refresh
//!   the lifetime;
//! * `mitigation-start` is never sent: there is no wall clock in here.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use coap_lite::{Packet, RequestType, ResponseType};
use ipnet::IpNet;

use super::action::{Action, Counters, MitigationKey};
use super::error::SignalError;
use super::heartbeat::{self, Heartbeats};
use super::mitigation::{same_scope, with_counters, Mitigation, Mitigations, Phase};
use super::persist::MitigationRecord;
use super::session::{PutOutcome, SessionConfig, SessionParams, SessionPolicy};
use crate::coap::{msg, Delivery, DotsResource, Endpoint, ErrorResponse, Event, RequestId, Token};
use crate::model::{
    prefixes_within, validate_call_home_request, AttackStatus, ConflictCause, ConflictInformation,
    DotsMessage, Limits, MitigationScope, MitigationStatus, MitigationUri, RedirectedSignal, Scope,
    SignalConfig, ValidatedRequest, ValidationError,
};

/// Whether the operator must approve each mitigation (RFC 9066 §5.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentMode {
    Auto,
    Require,
}

/// Enforce requests, or only validate, answer and log them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnforcementMode {
    Enforce,
    /// Nothing is installed and the status stays 1.
    Monitor,
}

/// Settings of a [`SignalServer`].
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub limits: Limits,
    /// The agent's own prefixes and the networks it serves: every
    /// `source-prefix` must lie inside one of them. Empty refuses all.
    pub domain: Vec<IpNet>,
    pub consent: ConsentMode,
    pub mode: EnforcementMode,
    pub max_mitigations_per_cuid: usize,
    pub session: SessionPolicy,
    /// Counters are queried, and observers of unchanged mitigations are
    /// notified, this often.
    pub notify_period: Duration,
    pub notify_delivery: Delivery,
    /// Whether a redirect PUT is honoured (4.00 otherwise).
    pub allow_redirect: bool,
    /// How long a request may wait for consent before the timeout decides
    /// it; `None` waits for the operator (or the end of its lifetime).
    pub consent_timeout: Option<Duration>,
    /// What the consent timeout decides: approve (`true`) or reject.
    pub consent_timeout_approves: bool,
    /// How long data-plane results are waited for before answering with
    /// the last known ones: final counters of a DELETE, fresh counters
    /// for a periodic notification. Zero: never wait.
    pub counters_wait: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            domain: Vec::new(),
            consent: ConsentMode::Auto,
            mode: EnforcementMode::Enforce,
            max_mitigations_per_cuid: 64,
            session: SessionPolicy::default(),
            notify_period: Duration::from_secs(30),
            notify_delivery: Delivery::NonConfirmable,
            allow_redirect: true,
            consent_timeout: None,
            consent_timeout_approves: false,
            counters_wait: Duration::from_secs(1),
        }
    }
}

/// A request awaiting the operator's consent, as [`SignalServer::pending`]
/// lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingConsent {
    pub key: MitigationKey,
    pub request: ValidatedRequest,
    /// Time since the request started waiting.
    pub age: Duration,
    /// Time until the consent timeout decides it, if one is configured.
    pub decided_in: Option<Duration>,
}

/// A DELETE answer waiting for the final counters.
#[derive(Debug, Clone)]
struct PendingDelete {
    id: RequestId,
    key: MitigationKey,
    /// Used when the shell does not report final counters in time.
    last: Option<Counters>,
    deadline: Instant,
}

/// What handling one request produced besides the answer.
#[derive(Debug, Default)]
struct Reply {
    /// The answer registers this observer (GET + Observe 0).
    observe: Option<ObserveTarget>,
    /// The answer waits for [`SignalServer::removed`].
    defer: Option<(MitigationKey, Option<Counters>)>,
}

/// What an observer watches: one mitigation or all of a cuid.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ObserveTarget {
    cuid: String,
    mid: Option<u32>,
}

impl ObserveTarget {
    fn matches(&self, key: &MitigationKey) -> bool {
        self.cuid == key.cuid && self.mid.is_none_or(|m| m == key.mid)
    }
}

type Answer = Result<Packet, ErrorResponse>;

fn bad_request(e: impl ToString) -> ErrorResponse {
    ErrorResponse::new(ResponseType::BadRequest, e.to_string())
}

fn validation(e: ValidationError) -> ErrorResponse {
    let code = match e.coap_code() {
        (4, 22) => ResponseType::UnprocessableEntity,
        _ => ResponseType::BadRequest,
    };
    ErrorResponse::new(code, e.diagnostic())
}

fn method_not_allowed(resource: &str) -> ErrorResponse {
    ErrorResponse::new(
        ResponseType::MethodNotAllowed,
        format!("method not allowed on {resource}"),
    )
}

fn scopes_response(code: ResponseType, scopes: Vec<Scope>) -> Packet {
    msg::cbor_response(code, MitigationScope { scopes }.encode())
}

/// 2.02 to a DELETE, with the final counters when known.
fn deleted_response(mid: u32, counters: Option<Counters>) -> Packet {
    let last = Scope {
        mid: Some(mid),
        ..Scope::default()
    };
    scopes_response(ResponseType::Deleted, vec![with_counters(last, counters)])
}

/// The Call Home DOTS server state machine over one connection at a time.
pub struct SignalServer<E> {
    ep: E,
    config: ServerConfig,
    mitigations: Mitigations,
    session: SessionConfig,
    /// Parameters last applied to the endpoint and heartbeat timers.
    applied: SessionParams,
    observers: BTreeMap<Token, ObserveTarget>,
    hb: Heartbeats,
    next_tick: Instant,
    /// Session declared lost, or closing after a redirect: no heartbeats.
    down: bool,
    actions: VecDeque<Action>,
    /// DELETE answers waiting for final counters, oldest first.
    deletes: Vec<PendingDelete>,
    /// Periodic notifications waiting for counters go out by then anyway.
    counters_due_by: Option<Instant>,
}

impl<E: Endpoint> SignalServer<E> {
    /// Starts serving on `ep`, a connection just established.
    pub fn new(now: Instant, ep: E, config: ServerConfig) -> Result<Self, SignalError> {
        config.session.validate().map_err(SignalError::Config)?;
        if config.notify_period.is_zero() {
            return Err(SignalError::Config("notify_period must be positive".into()));
        }
        if config.consent_timeout.is_some_and(|t| t.is_zero()) {
            return Err(SignalError::Config(
                "consent_timeout must be positive".into(),
            ));
        }
        let session = SessionConfig::new(config.session);
        let applied = session.active(false);
        let mut server = Self {
            hb: Heartbeats::new(now, applied.heartbeat_interval()),
            next_tick: now + config.notify_period,
            ep,
            config,
            mitigations: Mitigations::default(),
            session,
            applied,
            observers: BTreeMap::new(),
            down: false,
            actions: VecDeque::new(),
            deletes: Vec::new(),
            counters_due_by: None,
        };
        server.ep.set_params(applied.transmission())?;
        Ok(server)
    }

    /// Continues on a new connection after [`Action::SessionLost`] or a
    /// redirect; mitigations survive, observers (bound to the old
    /// connection) do not, nor do DELETE answers still waiting for final
    /// counters. Returns the old endpoint.
    pub fn reconnect(&mut self, now: Instant, ep: E) -> Result<E, SignalError> {
        let old = std::mem::replace(&mut self.ep, ep);
        self.observers.clear();
        self.deletes.clear();
        self.down = false;
        self.hb = Heartbeats::new(now, self.applied.heartbeat_interval());
        self.ep.set_params(self.applied.transmission())?;
        Ok(old)
    }

    pub fn mitigations(&self) -> &Mitigations {
        &self.mitigations
    }

    pub fn session(&self) -> &SessionConfig {
        &self.session
    }

    /// The endpoint, e.g. to release a stream before closing it.
    pub fn endpoint_mut(&mut self) -> &mut E {
        &mut self.ep
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.ep.poll_transmit()
    }

    /// The next action; drain [`Self::poll_transmit`] first so that, e.g.,
    /// the answer to a redirect leaves before [`Action::Close`].
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = [
            self.ep.poll_timeout(),
            self.mitigations.next_expiry(),
            Some(self.next_tick),
            self.next_consent_deadline(),
            self.deletes.iter().map(|d| d.deadline).min(),
            self.counters_due_by,
        ];
        if !self.down {
            t[2] = t[2].min(Some(self.hb.next_send()));
            let silence = self.applied.silence_allowed();
            t[2] = t[2].min(Some(self.hb.loss_deadline(self.ep.last_rx(), silence)));
        }
        t.into_iter().flatten().min()
    }

    /// Bytes from the peer. An error means they were not CoAP; the state is
    /// unchanged and the session goes on.
    pub fn handle_input(&mut self, now: Instant, bytes: &[u8]) -> Result<(), SignalError> {
        let events = self.ep.handle_input(now, bytes)?;
        self.handle_events(now, events);
        Ok(())
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let events = self.ep.handle_timeout(now);
        self.handle_events(now, events);
        for key in self.mitigations.expired(now) {
            self.end(now, &key, MitigationStatus::Terminated, None);
        }
        self.consent_timeouts(now);
        self.late_deletes(now);
        if self.counters_due_by.is_some_and(|t| t <= now) {
            self.counters_due_by = None;
            for key in self.mitigations.keys_where(|m| m.counters_due) {
                self.notify(now, &key);
            }
        }
        if now >= self.next_tick {
            self.tick(now);
        }
        if !self.down {
            self.heartbeat(now);
        }
        self.apply_session(now);
    }

    // ---- data-plane results ----

    /// The data plane enforces `key`: status 2, observers notified.
    pub fn installed(&mut self, now: Instant, key: &MitigationKey) -> Result<(), SignalError> {
        let m = self.entry(key)?;
        if m.phase == Phase::Installing {
            m.set_phase(now, Phase::Active);
            self.notify(now, key);
        }
        Ok(())
    }

    /// The data plane could not enforce `key`: the mitigation ends with
    /// status 6 (see the module documentation).
    pub fn install_failed(&mut self, now: Instant, key: &MitigationKey) -> Result<(), SignalError> {
        self.entry(key)?;
        self.end(now, key, MitigationStatus::Terminated, None);
        self.apply_session(now);
        Ok(())
    }

    /// Fresh counters for `key`; observers are notified when they changed,
    /// or when a periodic notification was waiting for them.
    pub fn counters(
        &mut self,
        now: Instant,
        key: &MitigationKey,
        counters: Counters,
    ) -> Result<(), SignalError> {
        let m = self.entry(key)?;
        if m.counters != Some(counters) || m.counters_due {
            m.counters = Some(counters);
            self.notify(now, key);
        }
        Ok(())
    }

    /// The data plane performed [`Action::Remove`] for `key` and these are
    /// its final counters. When a DELETE of `key` waits for them, it is
    /// answered now, 2.02 with `final_counters`, and `true` is returned.
    /// Otherwise (expiry, supersession, late call after the fallback
    /// answer) nothing happens and the result is `false`: calling this
    /// after every `Remove` is always fine.
    pub fn removed(&mut self, now: Instant, key: &MitigationKey, final_counters: Counters) -> bool {
        let Some(pos) = self.deletes.iter().position(|d| d.key == *key) else {
            return false;
        };
        let d = self.deletes.remove(pos);
        self.answer_delete(now, d.id, key.mid, Some(final_counters));
        true
    }

    /// Requests awaiting the operator's consent, oldest first.
    pub fn pending(&self, now: Instant) -> Vec<PendingConsent> {
        let mut v: Vec<PendingConsent> = self
            .mitigations
            .iter()
            .filter(|(_, m)| m.phase == Phase::AwaitingConsent)
            .map(|(k, m)| PendingConsent {
                key: k.clone(),
                request: m.request.clone(),
                age: now.saturating_duration_since(m.since),
                decided_in: self
                    .config
                    .consent_timeout
                    .map(|t| (m.since + t).saturating_duration_since(now)),
            })
            .collect();
        v.sort_by(|a, b| b.age.cmp(&a.age).then_with(|| a.key.cmp(&b.key)));
        v
    }

    /// The operator's answer to [`Action::AskConsent`].
    pub fn consent(
        &mut self,
        now: Instant,
        key: &MitigationKey,
        approved: bool,
    ) -> Result<(), SignalError> {
        let m = self.entry(key)?;
        if m.phase != Phase::AwaitingConsent {
            return Ok(());
        }
        if approved {
            m.set_phase(now, Phase::Installing);
            let request = m.request.clone();
            self.actions.push_back(Action::Install {
                key: key.clone(),
                request,
            });
        } else {
            let conflict = ConflictInformation {
                conflict_cause: Some(ConflictCause::RejectedLegitimateTraffic),
                ..ConflictInformation::default()
            };
            self.end(now, key, MitigationStatus::Withdrawn, Some(conflict));
            self.apply_session(now);
        }
        Ok(())
    }

    // ---- persistence ----

    /// The mitigations as records to persist (see [`MitigationRecord`]),
    /// lifetimes counted at `now`. Entries whose lifetime is over are left
    /// out. [`Mitigations::revision`] tells when a new snapshot is worth
    /// writing.
    pub fn snapshot(&self, now: Instant) -> Vec<MitigationRecord> {
        self.mitigations
            .iter()
            .filter_map(|(k, m)| MitigationRecord::of(now, k, m))
            .collect()
    }

    /// Re-creates persisted mitigations, their remaining lifetime counted
    /// from `now`; returns the keys restored, in key order.
    ///
    /// * Every record is decoded first: one that cannot be read fails the
    ///   whole call ([`SignalError::Restore`]) and nothing changes.
    /// * Expired records are skipped, and so are keys already present (the
    ///   live state wins).
    /// * Each request is validated again against the current
    ///   configuration (limits, domain; a lifetime above today's
    ///   `max_lifetime` is shortened to it); one that no longer passes is
    ///   not restored and an [`Action::Rejected`] says why.
    /// * Phases: `active` and `installing` come back as
    ///   [`Phase::Installing`] with an [`Action::Install`] queued. The
    ///   data plane may still hold the drops (pinned maps), so the shell
    ///   must treat an identical re-install as a no-op (the agent's slot
    ///   table does) and confirm with [`Self::installed`] — status 2 then
    ///   again comes from the data plane alone. `awaiting-consent` stays
    ///   pending with its age (the consent timeout goes on counting) and an
    ///   [`Action::AskConsent`] is queued again for the operator;
    ///   `monitoring` stays as it is with no action. In monitor mode every
    ///   record comes back as [`Phase::Monitoring`] and nothing is
    ///   installed.
    /// * Last counters and `attack-status` are kept; observers are not
    ///   notified (a restored server has none yet).
    pub fn restore(
        &mut self,
        now: Instant,
        records: Vec<MitigationRecord>,
    ) -> Result<Vec<MitigationKey>, SignalError> {
        let decoded = records
            .into_iter()
            .map(|r| r.scope().map(|scope| (r, scope)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut keys = Vec::new();
        for (r, scope) in decoded {
            let key = r.key();
            if r.expired() || self.mitigations.contains(&key) {
                continue;
            }
            let body = MitigationScope {
                scopes: vec![Scope {
                    lifetime: Some(r.remaining),
                    ..scope
                }],
            };
            let uri = MitigationUri {
                cdid: r.cdid.clone(),
                cuid: Some(r.cuid.clone()),
                mid: Some(r.mid.to_string()),
            };
            let checked =
                validate_call_home_request(&body, &uri, &self.config.limits).and_then(|req| {
                    prefixes_within(&req.scope.source_prefix, &self.config.domain)?;
                    Ok(req)
                });
            let req = match checked {
                Ok(req) => req,
                Err(e) => {
                    let e = validation(e);
                    self.actions.push_back(Action::Rejected {
                        cuid: Some(r.cuid),
                        mid: Some(r.mid),
                        code: coap_lite::MessageClass::Response(e.code).to_string(),
                        diagnostic: format!("not restored: {}", e.diagnostic),
                    });
                    continue;
                }
            };
            let phase = match (self.config.mode, r.phase) {
                (EnforcementMode::Monitor, _) => Phase::Monitoring,
                (_, Phase::Active | Phase::Installing) => Phase::Installing,
                (_, phase) => phase,
            };
            let mut m = Mitigation::new(now, req.clone(), phase);
            if phase == r.phase {
                m.since = now
                    .checked_sub(Duration::from_secs(r.phase_age))
                    .unwrap_or(now);
            }
            m.counters = r.counters;
            m.attack_status = r.attack_status.and_then(AttackStatus::from_code);
            let request = req;
            match phase {
                Phase::Installing => self.actions.push_back(Action::Install {
                    key: key.clone(),
                    request,
                }),
                Phase::AwaitingConsent => self.actions.push_back(Action::AskConsent {
                    key: key.clone(),
                    request,
                }),
                Phase::Active | Phase::Monitoring => {}
            }
            self.mitigations.insert(key.clone(), m);
            keys.push(key);
        }
        self.apply_session(now);
        Ok(keys)
    }

    fn entry(&mut self, key: &MitigationKey) -> Result<&mut Mitigation, SignalError> {
        self.mitigations
            .get_mut(key)
            .ok_or_else(|| SignalError::UnknownMitigation {
                cuid: key.cuid.clone(),
                mid: key.mid,
            })
    }

    // ---- events and requests ----

    fn handle_events(&mut self, now: Instant, events: Vec<Event>) {
        for event in events {
            match event {
                Event::Request { id, request } => self.on_request(now, id, &request),
                Event::ObserverRemoved { token, .. } => {
                    self.observers.remove(&token);
                }
                Event::Closed(_) => self.lose_session(),
                // Answers to our heartbeats only matter as traffic, which
                // the endpoint already counted.
                _ => {}
            }
        }
        self.apply_session(now);
    }

    fn on_request(&mut self, now: Instant, id: RequestId, request: &Packet) {
        let mut reply = Reply::default();
        let resource = DotsResource::from_request(request);
        let (cuid, mid) = match &resource {
            Ok(
                DotsResource::Mitigate { cuid, mid, .. } | DotsResource::Redirect { cuid, mid, .. },
            ) => (Some(cuid.clone()), *mid),
            _ => (None, None),
        };
        let answer = resource.and_then(|resource| self.route(now, resource, request, &mut reply));
        let packet = match answer {
            Ok(packet) => packet,
            Err(e) => {
                self.actions.push_back(Action::Rejected {
                    cuid,
                    mid,
                    code: coap_lite::MessageClass::Response(e.code).to_string(),
                    diagnostic: e.diagnostic.clone(),
                });
                e.to_packet()
            }
        };
        if let Some((key, last)) = reply.defer {
            self.deletes.push(PendingDelete {
                id,
                key,
                last,
                deadline: now + self.config.counters_wait,
            });
            return;
        }
        match self.ep.respond(now, id, packet) {
            Ok(Some(token)) => {
                if let Some(target) = reply.observe {
                    self.observers.insert(token, target);
                }
            }
            Ok(None) => {}
            // Too large for the peer, or the stream is gone: nothing to
            // change in our state, the peer will retry.
            Err(_) => {}
        }
        self.flush_redirect();
    }

    fn route(
        &mut self,
        now: Instant,
        resource: DotsResource,
        request: &Packet,
        reply: &mut Reply,
    ) -> Answer {
        let method = msg::method(request);
        match (resource, method) {
            (DotsResource::Mitigate { cdid, cuid, mid }, Some(RequestType::Put)) => {
                self.put_mitigation(now, cdid, cuid, mid, request)
            }
            (DotsResource::Mitigate { cuid, mid, .. }, Some(RequestType::Get)) => {
                let answer = self.get_mitigations(now, &cuid, mid)?;
                reply.observe = Some(ObserveTarget { cuid, mid });
                Ok(answer)
            }
            (DotsResource::Mitigate { cuid, mid, .. }, Some(RequestType::Delete)) => {
                self.delete_mitigation(now, cuid, mid, reply)
            }
            (DotsResource::Mitigate { .. }, _) => Err(method_not_allowed("mitigate")),
            (DotsResource::Config { sid }, method) => self.config_request(sid, method, request),
            (DotsResource::Heartbeat, _) => {
                let (_, answer) = heartbeat::accept(request)?;
                self.hb.peer_heartbeat(now);
                Ok(answer)
            }
            (DotsResource::Redirect { .. }, Some(RequestType::Put)) => self.redirect(request),
            (DotsResource::Redirect { .. }, _) => Err(method_not_allowed("redirect")),
        }
    }

    fn put_mitigation(
        &mut self,
        now: Instant,
        cdid: Option<String>,
        cuid: String,
        mid: Option<u32>,
        request: &Packet,
    ) -> Answer {
        msg::require_dots_cbor(request)?;
        let body = MitigationScope::decode(&request.payload).map_err(bad_request)?;
        if msg::has_empty_if_match(request) {
            return self.efficacy_update(cuid, mid, &body);
        }
        let uri = MitigationUri {
            cdid,
            cuid: Some(cuid),
            mid: mid.map(|m| m.to_string()),
        };
        let req =
            validate_call_home_request(&body, &uri, &self.config.limits).map_err(validation)?;
        prefixes_within(&req.scope.source_prefix, &self.config.domain).map_err(validation)?;
        let key = MitigationKey::new(req.cuid.clone(), req.mid);

        let overlapping = self.mitigations.overlapping(&req);
        if let Some(newer) = overlapping.iter().find(|k| k.mid > req.mid) {
            return Err(ErrorResponse::new(
                ResponseType::Conflict,
                format!("overlaps mitigation mid={} which is newer", newer.mid),
            ));
        }
        let existing = self.mitigations.get(&key);
        let kept = self.mitigations.of_cuid(&key.cuid).count() - overlapping.len();
        if existing.is_none() && kept >= self.config.max_mitigations_per_cuid {
            return Err(ErrorResponse::new(
                ResponseType::UnprocessableEntity,
                format!(
                    "cuid {} already has {kept} mitigations, the limit is {}",
                    key.cuid, self.config.max_mitigations_per_cuid
                ),
            ));
        }
        // Accepted: from here on, state changes.
        let refresh = existing.is_some_and(|m| same_scope(&m.request.scope, &req.scope));
        let code = if existing.is_some() {
            ResponseType::Changed
        } else {
            ResponseType::Created
        };
        for old in &overlapping {
            self.end(now, old, MitigationStatus::Terminated, None);
        }
        let was_enforced = self.mitigations.get(&key).is_some_and(Mitigation::enforced);
        // A refresh only restarts the lifetime; anything else (re)starts the phase.
        let phase = (!refresh).then(|| self.start_phase(&key, &req, was_enforced));
        match (self.mitigations.get_mut(&key), phase) {
            (Some(m), phase) => {
                m.refresh(now, req);
                if let Some(phase) = phase {
                    // A new request: consent age and the rest start over.
                    m.phase = phase;
                    m.since = now;
                }
            }
            (None, Some(phase)) => {
                self.mitigations
                    .insert(key.clone(), Mitigation::new(now, req, phase));
            }
            // A refresh always has an entry.
            (None, None) => {}
        }
        let scope = self.view(now, &key);
        self.notify(now, &key);
        Ok(scopes_response(code, scope.into_iter().collect()))
    }

    /// The phase a new or updated request starts in, queuing its action.
    /// An updated entry that was enforced and now waits for consent is
    /// removed from the data plane meanwhile.
    fn start_phase(
        &mut self,
        key: &MitigationKey,
        req: &ValidatedRequest,
        was_enforced: bool,
    ) -> Phase {
        let (phase, action) = match (self.config.mode, self.config.consent) {
            (EnforcementMode::Monitor, _) => (
                Phase::Monitoring,
                Action::Monitored {
                    key: key.clone(),
                    request: req.clone(),
                },
            ),
            (EnforcementMode::Enforce, ConsentMode::Require) => (
                Phase::AwaitingConsent,
                Action::AskConsent {
                    key: key.clone(),
                    request: req.clone(),
                },
            ),
            (EnforcementMode::Enforce, ConsentMode::Auto) => (
                Phase::Installing,
                Action::Install {
                    key: key.clone(),
                    request: req.clone(),
                },
            ),
        };
        if was_enforced && phase != Phase::Installing {
            self.actions.push_back(Action::Remove { key: key.clone() });
        }
        self.actions.push_back(action);
        phase
    }

    /// Efficacy update (RFC 9132 §4.4.3): PUT with an empty If-Match.
    fn efficacy_update(
        &mut self,
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
        let m = self
            .mitigations
            .get_mut(&MitigationKey::new(cuid, mid))
            .ok_or_else(|| ErrorResponse::new(ResponseType::NotFound, "no such mitigation"))?;
        m.attack_status = Some(status);
        Ok(msg::response(ResponseType::Changed))
    }

    fn get_mitigations(&self, now: Instant, cuid: &str, mid: Option<u32>) -> Answer {
        let scopes: Vec<Scope> = self
            .mitigations
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

    /// Withdrawal. An enforced entry's answer waits for the final counters
    /// (see the module documentation); the placeholder answer returned
    /// then is not sent.
    fn delete_mitigation(
        &mut self,
        now: Instant,
        cuid: String,
        mid: Option<u32>,
        reply: &mut Reply,
    ) -> Answer {
        let mid = mid.ok_or_else(|| bad_request("DELETE needs a mid"))?;
        let key = MitigationKey::new(cuid, mid);
        let m = self
            .mitigations
            .get(&key)
            .ok_or_else(|| ErrorResponse::new(ResponseType::NotFound, "no such mitigation"))?;
        let (counters, enforced) = (m.counters, m.enforced());
        self.end(now, &key, MitigationStatus::Terminated, None);
        if enforced && !self.config.counters_wait.is_zero() {
            reply.defer = Some((key, counters));
        }
        Ok(deleted_response(mid, counters))
    }

    fn answer_delete(&mut self, now: Instant, id: RequestId, mid: u32, counters: Option<Counters>) {
        // A failure means the connection is gone: the peer will retry.
        let _ = self.ep.respond(now, id, deleted_response(mid, counters));
    }

    /// DELETE answers whose final counters did not come in time.
    fn late_deletes(&mut self, now: Instant) {
        let (late, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deletes)
            .into_iter()
            .partition(|d| d.deadline <= now);
        self.deletes = waiting;
        for d in late {
            self.answer_delete(now, d.id, d.key.mid, d.last);
        }
    }

    fn next_consent_deadline(&self) -> Option<Instant> {
        let timeout = self.config.consent_timeout?;
        self.mitigations
            .iter()
            .filter(|(_, m)| m.phase == Phase::AwaitingConsent)
            .map(|(_, m)| m.since + timeout)
            .min()
    }

    /// Decides the requests that waited [`ServerConfig::consent_timeout`].
    fn consent_timeouts(&mut self, now: Instant) {
        let Some(timeout) = self.config.consent_timeout else {
            return;
        };
        let approved = self.config.consent_timeout_approves;
        let due = self
            .mitigations
            .keys_where(|m| m.phase == Phase::AwaitingConsent && m.since + timeout <= now);
        for key in due {
            self.actions.push_back(Action::ConsentTimedOut {
                key: key.clone(),
                approved,
            });
            // The key was just listed: it exists.
            let _ = self.consent(now, &key, approved);
        }
    }

    fn config_request(
        &mut self,
        sid: Option<u32>,
        method: Option<RequestType>,
        request: &Packet,
    ) -> Answer {
        match method {
            Some(RequestType::Get) => Ok(msg::cbor_response(
                ResponseType::Content,
                self.session.to_message().encode(),
            )),
            Some(RequestType::Put) => {
                let sid = sid.ok_or_else(|| bad_request("PUT config needs a sid"))?;
                msg::require_dots_cbor(request)?;
                let body = SignalConfig::decode(&request.payload).map_err(bad_request)?;
                Ok(msg::response(match self.session.put(sid, &body)? {
                    PutOutcome::Created => ResponseType::Created,
                    PutOutcome::Changed => ResponseType::Changed,
                }))
            }
            Some(RequestType::Delete) => {
                self.session.reset();
                Ok(msg::response(ResponseType::Deleted))
            }
            _ => Err(method_not_allowed("config")),
        }
    }

    /// RFC 9066 §5.2.2: 2.01, then dial the new client; 4.00 when we cannot.
    fn redirect(&mut self, request: &Packet) -> Answer {
        if !self.config.allow_redirect {
            return Err(bad_request("redirect is disabled on this agent"));
        }
        msg::require_dots_cbor(request)?;
        let target = RedirectedSignal::decode(&request.payload).map_err(bad_request)?;
        if target.alt_ch_client.is_empty() {
            return Err(bad_request("alt-ch-client is empty"));
        }
        self.down = true;
        self.actions.push_back(Action::Redirect { target });
        Ok(msg::response(ResponseType::Created))
    }

    /// After answering a redirect, the connection closes.
    fn flush_redirect(&mut self) {
        if matches!(self.actions.back(), Some(Action::Redirect { .. })) {
            self.actions.push_back(Action::Close);
        }
    }

    // ---- lifecycle helpers ----

    /// Ends a mitigation: data plane told, observers get `status`.
    fn end(
        &mut self,
        now: Instant,
        key: &MitigationKey,
        status: MitigationStatus,
        conflict: Option<ConflictInformation>,
    ) {
        let Some(m) = self.mitigations.remove(key) else {
            return;
        };
        if m.enforced() {
            self.actions.push_back(Action::Remove { key: key.clone() });
        }
        let scope = Scope {
            status: Some(status),
            lifetime: Some(0),
            conflict_information: conflict,
            ..m.to_scope(now)
        };
        self.send_notification(now, key, scope);
    }

    fn view(&self, now: Instant, key: &MitigationKey) -> Option<Scope> {
        self.mitigations.get(key).map(|m| m.to_scope(now))
    }

    /// Notifies the observers of `key` of its current state.
    fn notify(&mut self, now: Instant, key: &MitigationKey) {
        if let Some(m) = self.mitigations.get_mut(key) {
            // A periodic notification that waited for counters counts from
            // its tick, so the period does not drift.
            if !m.counters_due {
                m.last_notified = now;
            }
            m.counters_due = false;
        }
        if let Some(scope) = self.view(now, key) {
            self.send_notification(now, key, scope);
        }
    }

    fn send_notification(&mut self, now: Instant, key: &MitigationKey, scope: Scope) {
        let watchers: Vec<Token> = self
            .observers
            .iter()
            .filter(|(_, t)| t.matches(key))
            .map(|(token, _)| *token)
            .collect();
        for token in watchers {
            let packet = scopes_response(ResponseType::Content, vec![scope.clone()]);
            let sent = self
                .ep
                .notify(now, &token, packet, self.config.notify_delivery);
            if sent == Err(crate::coap::CoapError::UnknownObserver) {
                self.observers.remove(&token);
            }
        }
    }

    /// Periodic work: counters of enforced mitigations, and notifications
    /// for entries nobody heard about for a period. Those of active
    /// entries wait for the counters just queried (see the module docs).
    fn tick(&mut self, now: Instant) {
        let period = self.config.notify_period;
        self.next_tick = now + period;
        let enforced = self.mitigations.keys_where(|m| m.phase == Phase::Active);
        if !enforced.is_empty() {
            self.actions
                .push_back(Action::QueryCounters { keys: enforced });
        }
        let wait = self.config.counters_wait.min(period / 2);
        for key in self
            .mitigations
            .keys_where(|m| m.last_notified + period <= now)
        {
            let active = self
                .mitigations
                .get(&key)
                .is_some_and(|m| m.phase == Phase::Active);
            match self.mitigations.get_mut(&key) {
                Some(m) if active && !wait.is_zero() => {
                    m.last_notified = now;
                    m.counters_due = true;
                    self.counters_due_by = Some(now + wait);
                }
                _ => self.notify(now, &key),
            }
        }
    }

    fn heartbeat(&mut self, now: Instant) {
        let silence = self.applied.silence_allowed();
        if now >= self.hb.loss_deadline(self.ep.last_rx(), silence) {
            return self.lose_session();
        }
        if now >= self.hb.next_send() {
            let interval = self.applied.heartbeat_interval();
            let request = heartbeat::request(self.hb.peer_hb_status(now, interval));
            // A failure (stream closed) surfaces as silence, then loss.
            let _ = self.ep.send_request(now, request, Delivery::NonConfirmable);
            self.hb.schedule(now, interval);
        }
    }

    fn lose_session(&mut self) {
        if !self.down {
            self.down = true;
            self.observers.clear();
            self.actions.push_back(Action::SessionLost);
        }
    }

    /// Switches between idle and mitigating parameters as needed.
    fn apply_session(&mut self, now: Instant) {
        let params = self.session.active(!self.mitigations.is_empty());
        if params == self.applied {
            return;
        }
        if params.heartbeat_interval != self.applied.heartbeat_interval {
            self.hb.schedule(now, params.heartbeat_interval());
        }
        self.applied = params;
        // The policy only admits values the endpoint accepts.
        let _ = self.ep.set_params(params.transmission());
    }
}
