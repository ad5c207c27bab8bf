//! The signal session over the current connection: the parameters the
//! peer negotiated and the set in force (idle or mitigating), our
//! heartbeats, the peer's silence, and whether the session is still up.

use std::time::Instant;

use coap_lite::Packet;

use crate::coap::TransmissionParams;
use crate::signal::heartbeat::{self, Heartbeats};
use crate::signal::session::{SessionConfig, SessionParams, SessionPolicy};

pub(super) struct Session {
    config: SessionConfig,
    /// Parameters last applied to the endpoint and heartbeat timers.
    applied: SessionParams,
    hb: Heartbeats,
    /// Declared lost, or closing after a redirect: no heartbeats.
    down: bool,
}

impl Session {
    /// A session on a connection just established, with the idle set.
    pub(super) fn new(now: Instant, policy: SessionPolicy) -> Self {
        let config = SessionConfig::new(policy);
        let applied = config.active(false);
        Self {
            hb: Heartbeats::new(now, applied.heartbeat_interval()),
            config,
            applied,
            down: false,
        }
    }

    pub(super) fn config(&self) -> &SessionConfig {
        &self.config
    }

    pub(super) fn config_mut(&mut self) -> &mut SessionConfig {
        &mut self.config
    }

    pub(super) fn transmission(&self) -> TransmissionParams {
        self.applied.transmission()
    }

    /// Carries on over a new connection: up again, heartbeats and silence
    /// counted from `now`; the parameters in force stay.
    pub(super) fn restart(&mut self, now: Instant) {
        self.down = false;
        self.hb = Heartbeats::new(now, self.applied.heartbeat_interval());
    }

    /// Marks the session down; whether it was up until now.
    pub(super) fn go_down(&mut self) -> bool {
        !std::mem::replace(&mut self.down, true)
    }

    pub(super) fn peer_heartbeat(&mut self, now: Instant) {
        self.hb.peer_heartbeat(now);
    }

    /// When the session counts as lost unless traffic arrives before
    /// (`last_rx` is the endpoint's last receive); none while it is down.
    pub(super) fn loss_deadline(&self, last_rx: Option<Instant>) -> Option<Instant> {
        let silence = self.applied.silence_allowed();
        (!self.down).then(|| self.hb.loss_deadline(last_rx, silence))
    }

    /// How long the peer may stay silent before the session counts as lost.
    pub(super) fn silence_allowed(&self) -> std::time::Duration {
        self.applied.silence_allowed()
    }

    /// When our next heartbeat is due; none while the session is down.
    pub(super) fn heartbeat_due(&self) -> Option<Instant> {
        (!self.down).then(|| self.hb.next_send())
    }

    /// Our heartbeat to send now; the next one is scheduled.
    pub(super) fn heartbeat(&mut self, now: Instant) -> Packet {
        let interval = self.applied.heartbeat_interval();
        let request = heartbeat::request(self.hb.peer_hb_status(now, interval));
        self.hb.schedule(now, interval);
        request
    }

    /// Switches between the idle and the mitigating set; the transmission
    /// parameters to apply when that changed them.
    pub(super) fn apply(&mut self, now: Instant, mitigating: bool) -> Option<TransmissionParams> {
        let params = self.config.active(mitigating);
        if params == self.applied {
            return None;
        }
        if params.heartbeat_interval != self.applied.heartbeat_interval {
            self.hb.schedule(now, params.heartbeat_interval());
        }
        self.applied = params;
        Some(params.transmission())
    }
}
