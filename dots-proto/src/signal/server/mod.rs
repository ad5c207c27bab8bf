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
//!   overlapping a newer one is refused with 4.09 and a CBOR
//!   `conflict-information` (conflict-status 1, conflict-cause 1, the
//!   overlapping targets and the newer mid in conflict-scope);
//! * too many mitigations for one cuid, for this peer, or for the agent
//!   ([`ServerConfig::budget`], at most the data plane's slots) is 4.22,
//!   like other size limits, the diagnostic naming the limit;
//! * a request past a bound of the local policy ([`crate::model::Policy`])
//!   is 4.22 or waits for the operator's consent, as the policy says;
//! * a request whose traffic is all exempt (never-block, the peers' own
//!   addresses: [`ServerConfig::exempt`]) is 4.09 with conflict-cause 4
//!   (RFC 9066 §5.3.1); a partly exempt one is enforced for the rest and
//!   says which part is exempt in every answer and status
//!   (conflict-status 2, conflict-cause 4, conflict-scope), and
//!   [`Action::PartlyExempt`] tells the shell's log;
//! * conditional requests on `mitigate` (RFC 7252 §5.10.8): If-Match with
//!   an empty value needs the mitigation to exist, If-Match with an ETag
//!   never matches (none is issued), If-None-Match needs it absent; 4.12
//!   otherwise. So an efficacy update of an unknown mid is 4.12. An Accept
//!   other than 271 is 4.06 (RFC 7252 §5.10.4);
//! * DELETE of an unknown mid is 2.02 without a body: RFC 9132 §4.4.4
//!   answers 2.02 even when the mid does not exist (its text is not at
//!   hand here; this is how RFC 8782 and go-dots read);
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
//!   the lifetime; one that changes the scope is 4.00 (RFC 9132 §4.4.3:
//!   it repeats the request's parameters);
//! * `mitigation-start` is the time the data plane first confirmed the
//!   mitigation (status 2), in seconds since the Unix epoch; there is no
//!   clock in here, so the shell gives the wall time with
//!   [`SignalServer::set_wall_clock`], and without it the attribute is
//!   left out.

mod answer;
mod config;
mod consent;
mod observe;
mod persist;
mod requests;
mod session;
mod timer;
mod withdraw;

use std::collections::VecDeque;
use std::time::Instant;

use coap_lite::{Packet, RequestType, ResponseType};

use self::answer::{bad_request, method_not_allowed, rejected, scopes_response, Answer};
use self::consent::ConsentQueue;
use self::observe::{ObserveTarget, Observers};
use self::requests::Admitted;
use self::session::Session;
use self::timer::{Timer, TimerTable};
use self::withdraw::{deleted_response, Withdrawals};
use super::action::{Action, Counters, MitigationKey, SessionEnd};
use super::error::SignalError;
use super::heartbeat;
use super::mitigation::{same_scope, Mitigation, Mitigations, Phase};
use super::session::SessionConfig;
use super::shared::BudgetAccount;
use crate::coap::{msg, CloseReason, Delivery, DotsResource, Endpoint, Event, RequestId};
use crate::model::{
    ConflictInformation, DotsMessage, MitigationScope, MitigationStatus, MitigationUri, Scope,
    ValidatedRequest,
};

pub use self::config::{ConsentMode, EnforcementMode, ServerConfig};
pub use self::consent::PendingConsent;
pub use self::persist::MitigationRecord;

/// What handling one request produced besides the answer.
#[derive(Debug, Default)]
struct Reply {
    /// The answer registers this observer (GET + Observe 0).
    observe: Option<ObserveTarget>,
    /// The answer waits for [`SignalServer::removed`].
    defer: Option<(MitigationKey, Option<Counters>)>,
}

/// The Call Home DOTS server state machine over one connection at a time.
pub struct SignalServer<E> {
    ep: E,
    config: ServerConfig,
    mitigations: Mitigations,
    session: Session,
    observers: Observers,
    actions: VecDeque<Action>,
    withdrawals: Withdrawals,
    /// Every deadline of ours (the endpoint keeps its own), kept current
    /// by each public method so that [`Self::poll_timeout`] only reads it.
    timers: TimerTable,
    /// This server's place in the agent-wide [`ServerConfig::budget`].
    account: BudgetAccount,
    /// A wall-clock reading: (then, seconds since the Unix epoch then).
    wall_clock: Option<(Instant, u64)>,
}

impl<E: Endpoint> SignalServer<E> {
    /// Starts serving on `ep`, a connection just established.
    pub fn new(now: Instant, ep: E, config: ServerConfig) -> Result<Self, SignalError> {
        config.validate()?;
        let mut timers = TimerTable::default();
        timers.set(Timer::NotifyPeriod, now + config.notify_period);
        let mut server = Self {
            session: Session::new(now, config.session),
            account: config.budget.account(),
            wall_clock: None,
            ep,
            config,
            mitigations: Mitigations::default(),
            observers: Observers::default(),
            actions: VecDeque::new(),
            withdrawals: Withdrawals::default(),
            timers,
        };
        server.ep.set_params(server.session.transmission())?;
        server.ep.start(now);
        server.settle();
        Ok(server)
    }

    /// Continues on a new connection after [`Action::SessionLost`] or a
    /// redirect; mitigations survive, observers (bound to the old
    /// connection) do not, nor do DELETE answers still waiting for final
    /// counters. Returns the old endpoint.
    pub fn reconnect(&mut self, now: Instant, ep: E) -> Result<E, SignalError> {
        let old = std::mem::replace(&mut self.ep, ep);
        self.observers.clear();
        self.withdrawals.clear();
        self.session.restart(now);
        self.ep.start(now);
        self.settle();
        self.ep.set_params(self.session.transmission())?;
        Ok(old)
    }

    /// Replaces the settings while running (a reload, a new address in the
    /// local domain): requests from now on are checked against the new
    /// domain, limits and consent mode; mitigations already accepted stay
    /// as they are. A new notify period starts now; the session policy
    /// applies from the next connection. Invalid settings change nothing.
    pub fn set_config(&mut self, now: Instant, config: ServerConfig) -> Result<(), SignalError> {
        config.validate()?;
        if config.notify_period != self.config.notify_period {
            self.timers
                .set(Timer::NotifyPeriod, now + config.notify_period);
        }
        self.config = config;
        self.rearm_all();
        Ok(())
    }

    /// The settings in force.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Tells the server the wall time: `unix_secs` seconds since the Unix
    /// epoch at `now`. It is read for `mitigation-start`; call it again
    /// now and then to follow clock steps.
    pub fn set_wall_clock(&mut self, now: Instant, unix_secs: u64) {
        self.wall_clock = Some((now, unix_secs));
    }

    fn unix_time(&self, now: Instant) -> Option<u64> {
        let (then, secs) = self.wall_clock?;
        Some(match now.checked_duration_since(then) {
            Some(d) => secs.saturating_add(d.as_secs()),
            None => secs.saturating_sub(then.duration_since(now).as_secs()),
        })
    }

    pub fn mitigations(&self) -> &Mitigations {
        &self.mitigations
    }

    pub fn session(&self) -> &SessionConfig {
        self.session.config()
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
        let ours = self.timers.next_timeout();
        self.ep.poll_timeout().into_iter().chain(ours).min()
    }

    /// Bytes from the peer. An error means they were not CoAP; the state is
    /// unchanged and the session goes on.
    pub fn handle_input(&mut self, now: Instant, bytes: &[u8]) -> Result<(), SignalError> {
        let handled = self
            .ep
            .handle_input(now, bytes)
            .map(|events| self.handle_events(now, events));
        // Even bytes that are not CoAP count as traffic: re-arm either way.
        self.settle();
        Ok(handled?)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let events = self.ep.handle_timeout(now);
        self.handle_events(now, events);
        for timer in Timer::VALUES {
            // Read again first: an earlier timer of this loop may have
            // moved this one (a consent rejection ending the last
            // mitigation switches to the idle session parameters, and so
            // to another heartbeat interval and allowed silence).
            self.rearm(timer);
            if self.timers.is_expired(timer, now) {
                self.on_timeout(now, timer);
            }
        }
        self.apply_session(now);
        self.settle();
    }

    // ---- data-plane results ----

    /// The data plane enforces `key`: status 2, observers notified.
    pub fn installed(&mut self, now: Instant, key: &MitigationKey) -> Result<(), SignalError> {
        let started = self.unix_time(now);
        let m = self.entry(key)?;
        if m.phase == Phase::Installing {
            m.set_phase(now, Phase::Active);
            if m.started.is_none() {
                m.started = started;
            }
            self.notify(now, key);
        }
        self.settle();
        Ok(())
    }

    /// The data plane could not enforce `key`: the mitigation ends with
    /// status 6 (see the module documentation).
    pub fn install_failed(&mut self, now: Instant, key: &MitigationKey) -> Result<(), SignalError> {
        self.entry(key)?;
        self.end(now, key, MitigationStatus::Terminated, None);
        self.apply_session(now);
        self.settle();
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
        self.settle();
        Ok(())
    }

    /// The data plane performed [`Action::Remove`] for `key` and these are
    /// its final counters. When a DELETE of `key` waits for them, it is
    /// answered now, 2.02 with `final_counters`, and `true` is returned.
    /// Otherwise (expiry, supersession, late call after the fallback
    /// answer) nothing happens and the result is `false`: calling this
    /// after every `Remove` is always fine.
    pub fn removed(&mut self, now: Instant, key: &MitigationKey, final_counters: Counters) -> bool {
        let Some(d) = self.withdrawals.take(key) else {
            return false;
        };
        self.answer_delete(now, d.id, key.mid, Some(final_counters));
        self.settle();
        true
    }

    // ---- consent ----

    /// Requests awaiting the operator's consent, oldest first.
    pub fn pending(&self, now: Instant) -> Vec<PendingConsent> {
        self.consent_queue().pending(now)
    }

    /// The operator's answer to [`Action::AskConsent`].
    pub fn consent(
        &mut self,
        now: Instant,
        key: &MitigationKey,
        approved: bool,
    ) -> Result<(), SignalError> {
        self.decide(now, key, approved)?;
        self.settle();
        Ok(())
    }

    fn consent_queue(&self) -> ConsentQueue<'_> {
        ConsentQueue::new(&self.mitigations, self.config.consent_timeout)
    }

    /// Approves or rejects `key` if it still awaits consent.
    fn decide(
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
            let conflict = consent::rejection();
            self.end(now, key, MitigationStatus::Withdrawn, Some(conflict));
            self.apply_session(now);
        }
        Ok(())
    }

    /// Decides the requests that waited [`ServerConfig::consent_timeout`].
    fn consent_timeouts(&mut self, now: Instant) {
        let approved = self.config.consent_timeout_approves;
        for key in self.consent_queue().timed_out(now) {
            self.actions.push_back(Action::ConsentTimedOut {
                key: key.clone(),
                approved,
            });
            // The key was just listed: it exists.
            let _ = self.decide(now, &key, approved);
        }
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

    /// The record of one mitigation (see [`Self::snapshot`]): what a shell
    /// that persists mitigations one by one writes when only `key` changed,
    /// at a cost that does not grow with the number of mitigations.
    pub fn record(&self, now: Instant, key: &MitigationKey) -> Option<MitigationRecord> {
        self.mitigations
            .get(key)
            .and_then(|m| MitigationRecord::of(now, key, m))
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
            let m = match r.revive(
                now,
                scope,
                &self.config,
                &self.account,
                self.mitigations.len(),
            ) {
                Ok(m) => m,
                Err(e) => {
                    let diagnostic = format!("not restored: {}", e.diagnostic);
                    let action = rejected(Some(r.cuid), Some(r.mid), &e, diagnostic);
                    self.actions.push_back(action);
                    continue;
                }
            };
            let request = m.request.clone();
            match m.phase {
                Phase::Installing => self.actions.push_back(Action::Install {
                    key: key.clone(),
                    request,
                }),
                Phase::AwaitingConsent => self.actions.push_back(Action::AskConsent {
                    key: key.clone(),
                    request,
                    reason: m.over_limit.as_ref().map(ToString::to_string),
                }),
                Phase::Active | Phase::Monitoring => {}
            }
            self.mitigations.insert(key.clone(), m);
            keys.push(key);
        }
        self.apply_session(now);
        self.settle();
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

    // ---- timers ----

    /// Reads `timer`'s deadline again from the state it stands for.
    /// [`Timer::NotifyPeriod`] and [`Timer::CountersDue`] stand for nothing
    /// else: they are set where they are scheduled and left alone here.
    fn rearm(&mut self, timer: Timer) {
        let at = match timer {
            Timer::LifetimeEnd => self.mitigations.next_expiry(),
            Timer::ConsentTimeout => self.consent_queue().next_deadline(),
            Timer::DeleteAnswer => self.withdrawals.next_deadline(),
            Timer::CountersDue | Timer::NotifyPeriod => return,
            Timer::PeerSilence => self.session.loss_deadline(self.ep.last_rx()),
            Timer::Heartbeat => self.session.heartbeat_due(),
        };
        match at {
            Some(t) => self.timers.set(timer, t),
            None => self.timers.stop(timer),
        }
    }

    fn rearm_all(&mut self) {
        for timer in Timer::VALUES {
            self.rearm(timer);
        }
    }

    /// The end of every public method: the budget holds this server's
    /// count (a restored server may hold more than the limit) and every
    /// timer is current.
    fn settle(&mut self) {
        self.account.set(self.mitigations.len());
        self.rearm_all();
    }

    fn on_timeout(&mut self, now: Instant, timer: Timer) {
        match timer {
            Timer::LifetimeEnd => {
                for key in self.mitigations.expired(now) {
                    self.end(now, &key, MitigationStatus::Terminated, None);
                }
            }
            Timer::ConsentTimeout => self.consent_timeouts(now),
            Timer::DeleteAnswer => {
                for d in self.withdrawals.take_late(now) {
                    self.answer_delete(now, d.id, d.key.mid, d.last);
                }
            }
            Timer::CountersDue => {
                self.timers.stop(Timer::CountersDue);
                for key in self.mitigations.keys_where(|m| m.counters_due) {
                    self.notify(now, &key);
                }
            }
            Timer::NotifyPeriod => self.tick(now),
            Timer::PeerSilence => {
                let after = self.session.silence_allowed();
                self.lose_session(SessionEnd::Silence { after });
            }
            Timer::Heartbeat => self.send_heartbeat(now),
        }
    }

    // ---- events and requests ----

    fn handle_events(&mut self, now: Instant, events: Vec<Event>) {
        for event in events {
            match event {
                Event::Request { id, request } => self.on_request(now, id, &request),
                Event::ObserverRemoved { token, .. } => {
                    self.observers.remove(&token);
                }
                Event::Closed(why) => self.lose_session(match why {
                    CloseReason::Released { diagnostic, .. } => SessionEnd::Released { diagnostic },
                    CloseReason::Aborted { diagnostic } => SessionEnd::PeerAborted { diagnostic },
                    CloseReason::ProtocolError(diagnostic) => SessionEnd::Aborted { diagnostic },
                }),
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
                let diagnostic = e.diagnostic.clone();
                self.actions.push_back(rejected(cuid, mid, &e, diagnostic));
                e.to_packet()
            }
        };
        if let Some((key, last)) = reply.defer {
            let deadline = now + self.config.counters_wait;
            self.withdrawals.wait(id, key, last, deadline);
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
        msg::check_accept(request)?;
        let method = msg::method(request);
        if let DotsResource::Mitigate { cuid, mid, .. } = &resource {
            let exists = match mid {
                Some(mid) => self
                    .mitigations
                    .contains(&MitigationKey::new(cuid.clone(), *mid)),
                None => self.mitigations.of_cuid(cuid).next().is_some(),
            };
            msg::check_preconditions(request, exists)?;
        }
        match (resource, method) {
            (DotsResource::Mitigate { cdid, cuid, mid }, Some(RequestType::Put)) => {
                self.put_mitigation(now, cdid, cuid, mid, request)
            }
            (DotsResource::Mitigate { cuid, mid, .. }, Some(RequestType::Get)) => {
                let answer = requests::get_mitigations(&self.mitigations, now, &cuid, mid)?;
                reply.observe = Some(ObserveTarget { cuid, mid });
                Ok(answer)
            }
            (DotsResource::Mitigate { cuid, mid, .. }, Some(RequestType::Delete)) => {
                self.delete_mitigation(now, cuid, mid, reply)
            }
            (DotsResource::Mitigate { .. }, _) => Err(method_not_allowed("mitigate")),
            (DotsResource::Config { sid }, method) => {
                requests::config_request(self.session.config_mut(), sid, method, request)
            }
            (DotsResource::Heartbeat, _) => {
                let (_, answer) = heartbeat::accept(request)?;
                self.session.peer_heartbeat(now);
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
            let mid = mid.ok_or_else(|| bad_request("an efficacy update needs a mid"))?;
            let key = MitigationKey::new(cuid, mid);
            return requests::efficacy_update(&mut self.mitigations, &key, &body);
        }
        let uri = MitigationUri {
            cdid,
            cuid: Some(cuid),
            mid: mid.map(|m| m.to_string()),
        };
        let Admitted {
            request: req,
            key,
            overlapping,
            exempt,
            needs_consent,
        } = requests::admit(&self.mitigations, &self.config, &self.account, &uri, &body)?;
        // Accepted: from here on, state changes.
        let existing = self.mitigations.get(&key);
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
        let reason = needs_consent.as_ref().map(ToString::to_string);
        let phase = (!refresh).then(|| self.start_phase(&key, &req, was_enforced, reason));
        if let Some(e) = exempt.as_ref().filter(|_| !refresh) {
            self.actions.push_back(Action::PartlyExempt {
                key: key.clone(),
                exempt: e.clone(),
            });
        }
        match (self.mitigations.get_mut(&key), phase) {
            (Some(m), phase) => {
                m.refresh(now, req);
                m.exempt = exempt;
                if let Some(phase) = phase {
                    // A new request: consent age and the rest start over.
                    m.phase = phase;
                    m.since = now;
                    m.over_limit = needs_consent;
                    m.started = None;
                }
            }
            (None, Some(phase)) => {
                let mut m = Mitigation::new(now, req, phase);
                m.exempt = exempt;
                m.over_limit = needs_consent;
                self.mitigations.insert(key.clone(), m);
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
    /// removed from the data plane meanwhile. A request past a policy bound
    /// (`over_limit`, with `over-limit = consent`) waits for consent
    /// whatever the consent mode.
    fn start_phase(
        &mut self,
        key: &MitigationKey,
        req: &ValidatedRequest,
        was_enforced: bool,
        over_limit: Option<String>,
    ) -> Phase {
        let consent = match over_limit {
            Some(_) => ConsentMode::Require,
            None => self.config.consent,
        };
        let (phase, action) = match (self.config.mode, consent) {
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
                    reason: over_limit,
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
        let Some(m) = self.mitigations.get(&key) else {
            // Nothing to withdraw: already gone is withdrawn (see the module docs).
            return Ok(msg::response(ResponseType::Deleted));
        };
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

    /// RFC 9066 §5.2.2: 2.01, then dial the new client; 4.00 when we cannot.
    fn redirect(&mut self, request: &Packet) -> Answer {
        let target = requests::redirect_target(self.config.allow_redirect, request)?;
        self.session.go_down();
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
        let delivery = self.config.notify_delivery;
        self.observers
            .notify(&mut self.ep, now, key, &scope, delivery);
    }

    /// Periodic work: counters of enforced mitigations, and notifications
    /// for entries nobody heard about for a period. Those of active
    /// entries wait for the counters just queried (see the module docs).
    fn tick(&mut self, now: Instant) {
        let period = self.config.notify_period;
        self.timers.set(Timer::NotifyPeriod, now + period);
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
                    self.timers.set(Timer::CountersDue, now + wait);
                }
                _ => self.notify(now, &key),
            }
        }
    }

    fn send_heartbeat(&mut self, now: Instant) {
        let request = self.session.heartbeat(now);
        // A failure (stream closed) surfaces as silence, then loss.
        let _ = self.ep.send_request(now, request, Delivery::NonConfirmable);
    }

    fn lose_session(&mut self, reason: SessionEnd) {
        if self.session.go_down() {
            self.observers.clear();
            self.actions.push_back(Action::SessionLost { reason });
        }
    }

    /// Switches between idle and mitigating parameters as needed.
    fn apply_session(&mut self, now: Instant) {
        let mitigating = !self.mitigations.is_empty();
        if let Some(params) = self.session.apply(now, mitigating) {
            // The policy only admits values the endpoint accepts.
            let _ = self.ep.set_params(params);
        }
    }
}
