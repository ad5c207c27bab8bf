//! Prometheus metrics of the ISP side (`GET /metrics` on the API), in the
//! OpenMetrics text format of `prometheus-client`.

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    via: String,
    action: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

fn latency() -> Histogram {
    // 0.5 ms .. 16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The service's metrics.
pub struct Metrics {
    registry: Registry,
    agents_connected: Gauge,
    sessions: Counter,
    mitigations: Family<StateLabels, Gauge>,
    requests: Family<RequestLabels, Counter>,
    agent_answer: Family<KindLabels, Histogram, fn() -> Histogram>,
    api: Family<RouteLabels, Counter>,
    api_latency: Histogram,
    pkts_dropped: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("dots_client");
        let agents_connected = Gauge::default();
        registry.register(
            "agents_connected",
            "Agents with a signal session now",
            agents_connected.clone(),
        );
        let sessions = Counter::default();
        registry.register(
            "agent_sessions",
            "Agent sessions started (each (D)TLS connection)",
            sessions.clone(),
        );
        let mitigations = Family::<StateLabels, Gauge>::default();
        registry.register(
            "mitigations",
            "Mitigations in the book, by state",
            mitigations.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests to the service (API, CLI), by origin, action and HTTP-style outcome",
            requests.clone(),
        );
        let agent_answer =
            Family::<KindLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency);
        registry.register(
            "agent_answer_seconds",
            "Time from sending a request to an agent to its CoAP answer",
            agent_answer.clone(),
        );
        let api = Family::<RouteLabels, Counter>::default();
        registry.register(
            "api_responses",
            "HTTP API responses by method, route and status",
            api.clone(),
        );
        let api_latency = latency();
        registry.register(
            "api_request_seconds",
            "HTTP API request handling time (server-sent event streams excluded)",
            api_latency.clone(),
        );
        let pkts_dropped = Gauge::default();
        registry.register(
            "active_pkts_dropped",
            "Packets dropped so far by the active mitigations, as their agents report",
            pkts_dropped.clone(),
        );
        Metrics {
            registry,
            agents_connected,
            sessions,
            mitigations,
            requests,
            agent_answer,
            api,
            api_latency,
            pkts_dropped,
        }
    }
}

impl Metrics {
    pub fn session_started(&self) {
        self.sessions.inc();
    }

    pub fn set_agents_connected(&self, n: usize) {
        self.agents_connected.set(n as i64);
    }

    /// The book's counts per state and the active mitigations' drops.
    pub fn set_book(&self, per_state: &[(&str, usize)], pkts_dropped: u64) {
        for (state, n) in per_state {
            self.mitigations
                .get_or_create(&StateLabels {
                    state: state.to_string(),
                })
                .set(*n as i64);
        }
        self.pkts_dropped
            .set(i64::try_from(pkts_dropped).unwrap_or(i64::MAX));
    }

    pub fn request(&self, via: &str, action: &str, code: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                via: via.into(),
                action: action.into(),
                code: code.to_string(),
            })
            .inc();
    }

    pub fn agent_answer(&self, kind: &str, seconds: f64) {
        self.agent_answer
            .get_or_create(&KindLabels { kind: kind.into() })
            .observe(seconds);
    }

    pub fn api_response(&self, method: &str, route: &str, status: u16, seconds: Option<f64>) {
        self.api
            .get_or_create(&RouteLabels {
                method: method.into(),
                route: route.into(),
                status: status.to_string(),
            })
            .inc();
        if let Some(s) = seconds {
            self.api_latency.observe(s);
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_counted() {
        let m = Metrics::default();
        m.set_agents_connected(3);
        m.request("api", "mitigate", 201);
        m.set_book(&[("active", 2)], 77);
        m.api_response("POST", "/v1/mitigations", 201, Some(0.004));
        let text = m.render();
        assert!(text.contains("dots_client_agents_connected 3"), "{text}");
        assert!(
            text.contains(
                r#"dots_client_requests_total{via="api",action="mitigate",code="201"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"dots_client_mitigations{state="active"} 2"#),
            "{text}"
        );
        assert!(
            text.contains("dots_client_active_pkts_dropped 77"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
