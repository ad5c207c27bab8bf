//! Prometheus metrics for both daemons, through `prometheus-client`: a
//! [`Registry`] encoded as OpenMetrics text, served over HTTP at
//! `/metrics`, and helpers for collectors that read the daemon's state at
//! each scrape (values that live elsewhere: a view, BPF maps).

use std::{fmt, net::SocketAddr, sync::Arc, time::Duration};

pub use prometheus_client::{
    collector::Collector, encoding::DescriptorEncoder, registry::Registry,
};
use prometheus_client::{
    encoding::EncodeMetric,
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info, warn};

/// The Content-Type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Label names and values of one sample.
pub type Labels = Vec<(&'static str, String)>;

/// `registry` in the OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        warn!(error = %e, "encoding the metrics failed");
    }
    out
}

/// Writes a gauge family: `name` with `help`, one sample per label set.
pub fn gauge<N>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, N)>,
) -> fmt::Result
where
    ConstGauge<N>: EncodeMetric,
{
    family(enc, name, help, samples, ConstGauge::new)
}

/// Writes a counter family; the encoder appends `_total` to `name`.
pub fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, u64)>,
) -> fmt::Result {
    family(enc, name, help, samples, ConstCounter::new)
}

fn family<N, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, N)>,
    metric: impl Fn(N) -> M,
) -> fmt::Result {
    let samples: Vec<(Labels, M)> = samples.into_iter().map(|(l, v)| (l, metric(v))).collect();
    // The type comes from a sample: a family without any is left out.
    let Some(ty) = samples.first().map(|(_, m)| m.metric_type()) else {
        return Ok(());
    };
    let mut fam = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, m) in &samples {
        m.encode(fam.encode_family(labels)?)?;
    }
    Ok(())
}

/// The `<name>_build_info` metric: 1, labelled with the version.
pub fn build_info(registry: &mut Registry, name: &str, version: &str) {
    registry.register(
        format!("{name}_build"),
        "Build information: the version in a label; the value is always 1.",
        prometheus_client::metrics::info::Info::new(vec![("version", version.to_string())]),
    );
}

/// Serves `GET /metrics` on `addr` until the process ends: the registry
/// rendered at each request. A bind failure is logged and ends the task.
pub async fn serve(addr: SocketAddr, registry: Arc<Registry>) {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, error = %e, "metrics endpoint not started");
            return;
        }
    };
    info!(%addr, "Prometheus metrics at /metrics");
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            // A client that never sends its request holds nothing for long.
            if tokio::time::timeout(Duration::from_secs(10), answer(stream, &registry))
                .await
                .is_err()
            {
                debug!(%peer, "metrics request timed out");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, registry: &Registry) {
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await.unwrap_or(0);
    let request = String::from_utf8_lossy(&buf[..n]);
    let mut words = request.split_whitespace();
    let (status, content_type, body) = match (words.next(), words.next()) {
        (Some("GET"), Some("/metrics")) => ("200 OK", CONTENT_TYPE, render(registry)),
        (Some("GET"), _) => ("404 Not Found", "text/plain", "try /metrics\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed;

    impl Collector for Fixed {
        fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
            gauge(
                &mut enc,
                "t_up",
                "Up.",
                [(vec![("peer", "a \"b\"".to_string())], 1i64)],
            )?;
            counter(
                &mut enc,
                "t_dropped_packets",
                "Dropped.",
                [
                    (vec![("peer", "a".to_string()), ("mid", "7".into())], 5u64),
                    (vec![("peer", "b".to_string()), ("mid", "8".into())], 6u64),
                ],
            )?;
            gauge::<i64>(&mut enc, "t_empty", "Nothing.", [])
        }
    }

    #[test]
    fn renders_openmetrics_text() {
        let mut r = Registry::default();
        build_info(&mut r, "t", "1.2.3");
        r.register_collector(Box::new(Fixed));
        let text = render(&r);
        assert!(text.contains("t_build_info{version=\"1.2.3\"} 1"), "{text}");
        assert!(text.contains("# TYPE t_up gauge"), "{text}");
        assert!(text.contains("t_up{peer=\"a \\\"b\\\"\"} 1"), "{text}");
        assert!(text.contains("# TYPE t_dropped_packets counter"), "{text}");
        assert!(
            text.contains("t_dropped_packets_total{peer=\"b\",mid=\"8\"} 6"),
            "{text}"
        );
        assert!(!text.contains("t_empty"), "{text}");
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let mut r = Registry::default();
        build_info(&mut r, "t", "9");
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        tokio::spawn(serve(addr, Arc::new(r)));
        let get = |req: &'static str| async move {
            for _ in 0..50 {
                if let Ok(mut s) = TcpStream::connect(addr).await {
                    s.write_all(req.as_bytes()).await.unwrap();
                    let mut out = String::new();
                    s.read_to_string(&mut out).await.unwrap();
                    return out;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("no metrics endpoint")
        };
        let ok = get("GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.contains(CONTENT_TYPE), "{ok}");
        assert!(ok.contains("t_build_info{version=\"9\"} 1"), "{ok}");
        let nf = get("GET / HTTP/1.1\r\n\r\n").await;
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
        let na = get("POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(na.starts_with("HTTP/1.1 405"), "{na}");
    }
}
