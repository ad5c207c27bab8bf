//! Settings of the server role.

use std::time::Duration;

use ipnet::IpNet;

use crate::coap::Delivery;
use crate::model::{Limits, Policy};
use crate::signal::error::SignalError;
use crate::signal::session::SessionPolicy;
use crate::signal::shared::{ExemptSet, MitigationBudget};

/// Whether the operator must approve each mitigation (RFC 9066 §5.3.1).
/// Written `auto` / `require` in the agent's configuration and flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum ConsentMode {
    /// Enforce valid requests at once.
    #[default]
    Auto,
    /// Hold each request until the operator approves it.
    Require,
}

/// Enforce requests, or only validate, answer and log them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnforcementMode {
    Enforce,
    /// Nothing is installed and the status stays 1.
    Monitor,
}

/// Settings of a [`super::SignalServer`].
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub limits: Limits,
    /// What one request may block, and what happens past that.
    pub policy: Policy,
    /// The agent's own prefixes and the networks it serves: every
    /// `source-prefix` must lie inside their union. Empty refuses all.
    pub domain: Vec<IpNet>,
    /// Prefixes never dropped (shared by all servers of the agent): a
    /// request entirely inside them gets 4.09 (RFC 9066 §5.3.1).
    pub exempt: ExemptSet,
    pub consent: ConsentMode,
    pub mode: EnforcementMode,
    pub max_mitigations_per_cuid: usize,
    /// Mitigations one peer (this server) may hold, all its cuids
    /// together: a peer can mint cuids at will.
    pub max_mitigations_per_peer: usize,
    /// The agent-wide count, shared by all servers of the agent.
    pub budget: MitigationBudget,
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
            policy: Policy::default(),
            domain: Vec::new(),
            exempt: ExemptSet::default(),
            consent: ConsentMode::Auto,
            mode: EnforcementMode::Enforce,
            max_mitigations_per_cuid: 64,
            max_mitigations_per_peer: 128,
            budget: MitigationBudget::default(),
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

impl ServerConfig {
    /// The checks [`super::SignalServer::new`] applies: a consistent
    /// session policy, a positive period and consent timeout.
    pub(super) fn validate(&self) -> Result<(), SignalError> {
        self.session.validate().map_err(SignalError::Config)?;
        if self.notify_period.is_zero() {
            return Err(SignalError::Config("notify_period must be positive".into()));
        }
        if self.consent_timeout.is_some_and(|t| t.is_zero()) {
            return Err(SignalError::Config(
                "consent_timeout must be positive".into(),
            ));
        }
        Ok(())
    }
}
