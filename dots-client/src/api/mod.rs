//! The HTTP API: JSON over HTTPS, the service's front door for detectors,
//! portals and orchestration. The routes and their answers are described
//! in `docs/openapi.yaml` (served at `/v1/openapi.yaml`).
//!
//! TLS is OpenSSL (the stack the signal channel uses), HTTP/1.1 is hyper,
//! routing is axum. Every call needs a credential ([`auth`]): a bearer
//! token or a client certificate; the audit trail names it.

pub mod auth;
pub mod body;

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    extract::{MatchedPath, Path, Query, Request, State},
    http::{header, HeaderValue, StatusCode},
    middleware::{self, Next},
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Response,
    },
    routing::get,
    Extension, Json, Router,
};
use hyper_util::rt::TokioIo;
use openssl::ssl::{Ssl, SslAcceptor, SslFiletype, SslMethod, SslVerifyMode};
use serde::Deserialize;
use serde_json::json;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_stream::{wrappers::BroadcastStream, StreamExt};
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::{
    audit::Principal,
    book::{MitigationId, State as MitigationState},
    service::{Service, ServiceError},
};
use auth::Tokens;
use body::{MitigationBody, PrefixesBody};

/// The OpenAPI description served at `/v1/openapi.yaml`.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.yaml");

/// Settings of the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiOptions {
    pub listen: SocketAddr,
    /// Server certificate (chain) and key, PEM.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Bearer tokens (`NAME TOKEN` per line).
    pub tokens: Option<PathBuf>,
    /// CA whose client certificates are accepted as credentials.
    pub client_ca: Option<PathBuf>,
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the API needs a credential source: set tokens-file, client-ca or both")]
    NoCredentials,
    #[error(transparent)]
    Tokens(#[from] auth::TokensError),
    #[error("TLS ({what} {}): {source}", path.display())]
    Tls {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: openssl::error::ErrorStack,
    },
    #[error("OpenSSL: {0}")]
    Ssl(#[from] openssl::error::ErrorStack),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The client certificate's identity on this connection, if any.
#[derive(Clone, Debug)]
struct PeerCert(Option<String>);

struct ApiState {
    service: Arc<Service>,
    tokens: RwLock<Tokens>,
}

/// A running API server (stopped on drop).
pub struct Api {
    addr: SocketAddr,
    state: Arc<ApiState>,
    tokens_path: Option<PathBuf>,
    task: JoinHandle<()>,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Api {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Re-reads the tokens file; on error the old tokens stay.
    pub fn reload_tokens(&self) -> Result<usize, auth::TokensError> {
        let Some(p) = &self.tokens_path else {
            return Ok(0);
        };
        let t = Tokens::load(p)?;
        let n = t.len();
        if let Ok(mut w) = self.state.tokens.write() {
            *w = t;
        }
        Ok(n)
    }
}

fn acceptor(opts: &ApiOptions) -> Result<SslAcceptor, ApiError> {
    let tls = |what, path: &PathBuf| {
        let path = path.clone();
        move |source| ApiError::Tls { what, path, source }
    };
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls())?;
    b.set_certificate_chain_file(&opts.cert)
        .map_err(tls("certificate", &opts.cert))?;
    b.set_private_key_file(&opts.key, SslFiletype::PEM)
        .map_err(tls("private key", &opts.key))?;
    b.check_private_key()
        .map_err(tls("private key", &opts.key))?;
    if let Some(ca) = &opts.client_ca {
        b.set_ca_file(ca).map_err(tls("client CA", ca))?;
        // A certificate is one of two credentials: asked for, not required.
        b.set_verify(SslVerifyMode::PEER);
    }
    Ok(b.build())
}

/// Binds the API and serves it in the background.
pub async fn serve(opts: ApiOptions, service: Arc<Service>) -> Result<Api, ApiError> {
    if opts.tokens.is_none() && opts.client_ca.is_none() {
        return Err(ApiError::NoCredentials);
    }
    let tokens = match &opts.tokens {
        Some(p) => Tokens::load(p)?,
        None => Tokens::default(),
    };
    let acceptor = Arc::new(acceptor(&opts)?);
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|source| ApiError::Bind {
            addr: opts.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ApiError::Bind {
        addr: opts.listen,
        source,
    })?;
    let state = Arc::new(ApiState {
        service,
        tokens: RwLock::new(tokens),
    });
    let app = router(state.clone());
    info!(%addr, tokens = state.tokens.read().map(|t| t.len()).unwrap_or(0), client_certificates = opts.client_ca.is_some(), "HTTP API listening (HTTPS)");
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(connection(tcp, peer, acceptor.clone(), app.clone()));
        }
    });
    Ok(Api {
        addr,
        state,
        tokens_path: opts.tokens,
        task,
    })
}

/// One HTTPS connection: TLS handshake, then HTTP/1.1 requests.
async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: Arc<SslAcceptor>,
    app: Router,
) {
    let Ok(ssl) = Ssl::new(acceptor.context()) else {
        return;
    };
    let Ok(mut stream) = tokio_openssl::SslStream::new(ssl, tcp) else {
        return;
    };
    match tokio::time::timeout(Duration::from_secs(10), Pin::new(&mut stream).accept()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "API TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(%peer, "API TLS handshake timed out");
            return;
        }
    }
    let cert = PeerCert(
        stream
            .ssl()
            .peer_certificate()
            .and_then(|c| dots_daemon::transport::cert_identity(&c)),
    );
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(cert.clone());
        app.clone().oneshot(req.map(axum::body::Body::new))
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .await
    {
        debug!(%peer, error = %e, "API connection ended");
    }
}

fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/agents", get(list_agents))
        .route("/v1/agents/{agent}", get(get_agent))
        .route(
            "/v1/agents/{agent}/prefixes",
            axum::routing::put(set_prefixes).delete(remove_prefixes),
        )
        .route(
            "/v1/mitigations",
            get(list_mitigations).post(create_mitigation),
        )
        .route(
            "/v1/mitigations/{id}",
            get(get_mitigation).delete(withdraw_mitigation),
        )
        .route("/v1/events", get(events))
        .route("/v1/openapi.yaml", get(openapi))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

/// An error answer: `{"error": ..., "field": ..., "id": ...}`.
fn error_response(e: &ServiceError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut body = json!({"error": e.to_string()});
    if let Some(f) = e.field() {
        body["field"] = json!(f);
    }
    if let Some(id) = e.id() {
        body["id"] = json!(id);
    }
    (status, Json(body)).into_response()
}

fn unauthorized(message: &str) -> Response {
    let mut r = (StatusCode::UNAUTHORIZED, Json(json!({"error": message}))).into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"dots-client\""),
    );
    r
}

/// Every request: a credential, then the handler; metrics on the way out.
async fn authenticate(
    State(state): State<Arc<ApiState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let principal = match bearer {
        Some(token) => {
            let holder = state
                .tokens
                .read()
                .ok()
                .and_then(|t| t.holder(&token).map(str::to_string));
            match holder {
                Some(name) => Principal::api(name),
                None => {
                    warn!(%method, %route, "API call with an unknown bearer token");
                    state
                        .service
                        .metrics()
                        .api_response(&method, &route, 401, None);
                    return unauthorized("unknown bearer token");
                }
            }
        }
        None => match req.extensions().get::<PeerCert>().and_then(|c| c.0.clone()) {
            Some(id) => Principal::api(format!("cert:{id}")),
            None => {
                state
                    .service
                    .metrics()
                    .api_response(&method, &route, 401, None);
                return unauthorized(
                    "a credential is required: Authorization: Bearer TOKEN, or a client certificate",
                );
            }
        },
    };
    let read = req.method() == axum::http::Method::GET;
    let what = req.uri().to_string();
    req.extensions_mut().insert(principal.clone());
    let streaming = route == "/v1/events";
    let response = next.run(req).await;
    // Changes are audited by the service with their details; reads here.
    if read {
        state
            .service
            .audit_read(&principal, &what, response.status().as_u16());
    }
    let seconds = (!streaming).then(|| started.elapsed().as_secs_f64());
    state
        .service
        .metrics()
        .api_response(&method, &route, response.status().as_u16(), seconds);
    response
}

async fn not_found() -> Response {
    error_response(&ServiceError::NotFound(
        "no such route (see /v1/openapi.yaml)".into(),
    ))
}

async fn list_agents(State(s): State<Arc<ApiState>>) -> Response {
    Json(s.service.agents()).into_response()
}

async fn get_agent(State(s): State<Arc<ApiState>>, Path(agent): Path<String>) -> Response {
    match s.service.agent(&agent) {
        Some(a) => Json(a).into_response(),
        None => error_response(&ServiceError::NotFound(format!(
            "no agent {agent:?} is connected or registered"
        ))),
    }
}

async fn set_prefixes(
    State(s): State<Arc<ApiState>>,
    Extension(by): Extension<Principal>,
    Path(agent): Path<String>,
    bytes: Bytes,
) -> Response {
    let prefixes = body::parse::<PrefixesBody>(&bytes).and_then(PrefixesBody::into_prefixes);
    let result = prefixes.and_then(|p| s.service.set_prefixes(&by, &agent, p));
    match result {
        Ok(a) => Json(a).into_response(),
        Err(e) => {
            if e.field().is_some() {
                s.service.refuse(&by, "set-prefixes", Some(&agent), &e);
            }
            error_response(&e)
        }
    }
}

async fn remove_prefixes(
    State(s): State<Arc<ApiState>>,
    Extension(by): Extension<Principal>,
    Path(agent): Path<String>,
) -> Response {
    match s.service.remove_prefixes(&by, &agent) {
        Ok(()) => Json(json!({"agent": agent, "prefixes-from": "config"})).into_response(),
        Err(e) => error_response(&e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    agent: Option<String>,
    state: Option<String>,
    label: Option<String>,
}

async fn list_mitigations(
    State(s): State<Arc<ApiState>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => {
            return error_response(&ServiceError::BadRequest {
                field: None,
                message: format!("query: {}", e.body_text()),
            })
        }
    };
    let state = match q.state.as_deref().map(str::parse::<MitigationState>) {
        Some(Err(e)) => {
            return error_response(&ServiceError::BadRequest {
                field: Some("state".into()),
                message: format!("state: {e}"),
            })
        }
        Some(Ok(st)) => Some(st),
        None => None,
    };
    Json(
        s.service
            .mitigations(q.agent.as_deref(), state, q.label.as_deref()),
    )
    .into_response()
}

async fn create_mitigation(
    State(s): State<Arc<ApiState>>,
    Extension(by): Extension<Principal>,
    bytes: Bytes,
) -> Response {
    let req = match body::parse::<MitigationBody>(&bytes).and_then(MitigationBody::into_request) {
        Ok(r) => r,
        Err(e) => {
            s.service.refuse(&by, "mitigate", None, &e);
            return error_response(&e);
        }
    };
    match s.service.mitigate(&by, req).await {
        Ok(o) => {
            let status = if o.queued {
                StatusCode::ACCEPTED
            } else {
                StatusCode::CREATED
            };
            let location = format!("/v1/mitigations/{}", o.mitigation.id);
            let mut r = (status, Json(o)).into_response();
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        Err(e) => error_response(&e),
    }
}

fn mitigation_id(id: &str) -> Result<MitigationId, ServiceError> {
    id.parse().map_err(|e: String| ServiceError::BadRequest {
        field: Some("id".into()),
        message: e,
    })
}

async fn get_mitigation(State(s): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let id = match mitigation_id(&id) {
        Ok(i) => i,
        Err(e) => return error_response(&e),
    };
    match s.service.mitigation(&id) {
        Some(m) => Json(m).into_response(),
        None => error_response(&ServiceError::NotFound(format!("no mitigation {id}"))),
    }
}

async fn withdraw_mitigation(
    State(s): State<Arc<ApiState>>,
    Extension(by): Extension<Principal>,
    Path(id): Path<String>,
) -> Response {
    let id = match mitigation_id(&id) {
        Ok(i) => i,
        Err(e) => {
            s.service.refuse(&by, "withdraw", None, &e);
            return error_response(&e);
        }
    };
    match s.service.withdraw(&by, &id).await {
        Ok(o) => {
            let status = if o.queued {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            };
            (status, Json(o)).into_response()
        }
        Err(e) => error_response(&e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    agent: Option<String>,
}

/// Server-sent events: `agent` (connected / offline) and `mitigation`
/// (state, status, counters), as JSON.
async fn events(
    State(s): State<Arc<ApiState>>,
    Query(q): Query<EventsQuery>,
) -> Sse<impl tokio_stream::Stream<Item = Result<Event, Infallible>>> {
    let rx = s.service.subscribe();
    let agent = q.agent;
    let stream = BroadcastStream::new(rx).filter_map(move |ev| {
        let ev = ev.ok()?;
        if let Some(a) = &agent {
            let of = match &ev {
                crate::service::ServiceEvent::Agent { agent } => &agent.id,
                crate::service::ServiceEvent::Mitigation { mitigation } => &mitigation.agent,
            };
            if of != a {
                return None;
            }
        }
        Event::default()
            .event(ev.name())
            .json_data(&ev)
            .ok()
            .map(Ok)
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI).into_response()
}

async fn metrics(State(s): State<Arc<ApiState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.service.metrics().render(),
    )
        .into_response()
}
