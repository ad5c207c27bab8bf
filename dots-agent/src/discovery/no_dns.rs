//! The `dns` module of a build without the `discovery` feature: the same
//! interface, but no resolver can be made, so S-NAPTR, DNS-SD and lookups of
//! discovered names fail with [`WITHOUT_DISCOVERY`]. Explicit peers and DHCP
//! discovery do not need it.

use std::{convert::Infallible, net::SocketAddr};

use anyhow::{bail, Result};

use super::Candidate;
use crate::config::WITHOUT_DISCOVERY;

pub use super::retry::LookupFailure;

/// Never made: [`DnsDiscovery::new`] always fails in this build.
pub struct DnsDiscovery {
    never: Infallible,
}

impl DnsDiscovery {
    pub fn new(_server: Option<SocketAddr>) -> Result<Self> {
        bail!("{WITHOUT_DISCOVERY}")
    }

    pub fn with_seed(self, _seed: u64) -> Self {
        self
    }

    pub async fn snaptr(&mut self, _domain: &str) -> Result<Vec<Candidate>, LookupFailure> {
        match self.never {}
    }

    pub async fn dnssd(&mut self, _domain: &str) -> Result<Vec<Candidate>, LookupFailure> {
        match self.never {}
    }

    pub async fn resolve_names(&self, _cands: Vec<Candidate>) -> Vec<Candidate> {
        match self.never {}
    }
}
