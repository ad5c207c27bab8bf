//! What the server role's mitigations look like on disk, so a restarted
//! agent can carry on with them ([`super::SignalServer::snapshot`] and
//! [`super::SignalServer::restore`]). Writing the file (atomically) is the
//! shell's business; this is the serde form and the way back from it.
//!
//! The request is kept as the RFC 9132 JSON body of the granted request
//! (`{"ietf-dots-signal-channel:mitigation-scope": {"scope": [..]}}`,
//! made with [`DotsMessage::to_json`]): it is readable in the state file,
//! needs no serde support in the model types, and is read back through the
//! same decoder and validation as a request from the wire. Times are
//! relative (seconds left, seconds in the phase): an `Instant` means
//! nothing after a restart. The downtime between snapshot and restore is
//! the shell's to apply ([`MitigationRecord::elapse`]).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::config::{EnforcementMode, ServerConfig};
use super::requests::{check_request, Checked};
use crate::coap::{ErrorResponse, ResponseType};
use crate::model::{AttackStatus, DotsMessage, MitigationScope, MitigationUri, OverLimit, Scope};
use crate::signal::action::{Counters, MitigationKey};
use crate::signal::error::SignalError;
use crate::signal::mitigation::{Mitigation, Phase};
use crate::signal::shared::BudgetAccount;

/// One mitigation as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MitigationRecord {
    pub cuid: String,
    pub mid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdid: Option<String>,
    /// The granted request, RFC 9132 JSON form (see the module docs).
    pub request: serde_json::Value,
    /// Seconds of lifetime left at snapshot time, -1 for indefinite.
    pub remaining: i64,
    pub phase: Phase,
    /// Seconds spent in `phase` at snapshot time (the age of a request
    /// awaiting consent, which the consent timeout counts from).
    #[serde(default)]
    pub phase_age: u64,
    /// Last counters the data plane reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<Counters>,
    /// `attack-status` code of the last efficacy update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attack_status: Option<u64>,
    /// `mitigation-start`: seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mitigation_start: Option<u64>,
}

impl MitigationRecord {
    /// The record of `m`, `None` when its lifetime is over (or the body
    /// cannot be put in JSON form, which our own encoding never causes).
    pub(super) fn of(now: Instant, key: &MitigationKey, m: &Mitigation) -> Option<Self> {
        if m.expires.is_some_and(|t| t <= now) {
            return None;
        }
        let body = MitigationScope {
            scopes: vec![m.request.scope.clone()],
        };
        let request = body.to_json().ok()?;
        Some(Self {
            cuid: key.cuid.clone(),
            mid: key.mid,
            cdid: m.request.cdid.clone(),
            request,
            remaining: m.remaining(now),
            phase: m.phase,
            phase_age: now.saturating_duration_since(m.since).as_secs(),
            counters: m.counters,
            attack_status: m.attack_status.map(|s| s.code()),
            mitigation_start: m.started,
        })
    }

    /// Ages the record by `downtime`, the time between the snapshot and
    /// the restore. There is no clock in here, so the shell measures it
    /// (wall clock stored next to the records) and applies it before
    /// [`super::SignalServer::restore`]; a lifetime it uses up makes the
    /// record [`Self::expired`]. A clock that went backwards should be
    /// treated as zero downtime.
    pub fn elapse(&mut self, downtime: Duration) {
        let secs = i64::try_from(downtime.as_secs()).unwrap_or(i64::MAX);
        if self.remaining > 0 {
            self.remaining = self.remaining.saturating_sub(secs).max(0);
        }
        self.phase_age = self.phase_age.saturating_add(downtime.as_secs());
    }

    pub fn key(&self) -> MitigationKey {
        MitigationKey::new(self.cuid.clone(), self.mid)
    }

    /// Whether no lifetime is left (such records are not restored).
    pub fn expired(&self) -> bool {
        self.remaining == 0 || self.remaining < -1
    }

    /// The stored scope.
    pub(super) fn scope(&self) -> Result<Scope, SignalError> {
        let fail = |reason: String| SignalError::Restore {
            cuid: self.cuid.clone(),
            mid: self.mid,
            reason,
        };
        let body = MitigationScope::from_json(&self.request).map_err(|e| fail(e.to_string()))?;
        match <[Scope; 1]>::try_from(body.scopes) {
            Ok([scope]) => Ok(scope),
            Err(v) => Err(fail(format!("{} scopes instead of one", v.len()))),
        }
    }

    /// The mitigation `self` stands for, its stored `scope` checked again
    /// against today's `config` (rules, domain, exemption, policy) and the
    /// agent-wide budget (`held` by this server so far), its lifetime
    /// counted from `now`; the error answer when it no longer passes. The
    /// phase rules are those of [`super::SignalServer::restore`]; past a
    /// policy bound it comes back only with `over-limit = consent`, in the
    /// phase it had (one the operator approved stays approved).
    pub(super) fn revive(
        &self,
        now: Instant,
        scope: Scope,
        config: &ServerConfig,
        account: &BudgetAccount,
        held: usize,
    ) -> Result<Mitigation, ErrorResponse> {
        let body = MitigationScope {
            scopes: vec![Scope {
                lifetime: Some(self.remaining),
                ..scope
            }],
        };
        let uri = MitigationUri {
            cdid: self.cdid.clone(),
            cuid: Some(self.cuid.clone()),
            mid: Some(self.mid.to_string()),
        };
        let Checked {
            request: req,
            exempt,
            bound,
        } = check_request(config, &uri, &body)?;
        let refused = |d: String| ErrorResponse::new(ResponseType::UnprocessableEntity, d);
        if let (Some(b), OverLimit::Refuse) = (&bound, config.policy.over_limit) {
            return Err(refused(b.to_string()));
        }
        account.reserve(held + 1).map_err(|o| {
            refused(format!(
                "the agent holds {} mitigations, the limit is {} (max-mitigations)",
                o.held, o.limit
            ))
        })?;
        let phase = match (config.mode, self.phase) {
            (EnforcementMode::Monitor, _) => Phase::Monitoring,
            (_, Phase::Active | Phase::Installing) => Phase::Installing,
            (_, phase) => phase,
        };
        let mut m = Mitigation::new(now, req, phase);
        // Only a phase that carries on keeps its age.
        if phase == self.phase {
            m.since = now
                .checked_sub(Duration::from_secs(self.phase_age))
                .unwrap_or(now);
        }
        m.counters = self.counters;
        m.attack_status = self.attack_status.and_then(AttackStatus::from_code);
        m.exempt = exempt;
        m.over_limit = bound;
        m.started = self.mitigation_start;
        Ok(m)
    }
}
