//! The HTTPS server: `POST /inject` (AdmissionReview v1) around [`review_resolving`], plus
//! `GET /healthz`, `/readyz` and `/metrics`.
//!
//! Every request gets an answer: an unreadable AdmissionReview is denied inside a 200 answer
//! (as `review` does), a body over the limit gets `413`, a body that does not arrive in time
//! `408`, both with an AdmissionReview-shaped body; nothing here answers `500`.

use crate::admission::{AdmissionResponse, AdmissionReview, Status};
use crate::metrics::{result_of, Metrics};
use crate::namespaces::NamespaceLabels;
use crate::review::review_resolving;
use crate::tls::CertStore;
use crate::Error;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use podwire_core::inject::InjectorConfig;
use podwire_core::MeshProfile;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
pub struct Limits {
    /// Bodies over this get `413`.
    pub max_body_bytes: usize,
    /// Time for a request's headers and body to arrive (and for a TLS handshake).
    pub request_timeout: Duration,
    /// On shutdown, time given to open connections to finish their requests.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 << 20,
            request_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(15),
        }
    }
}

/// What a request handler needs.
#[derive(Debug)]
pub struct State {
    pub config: InjectorConfig,
    pub profile: MeshProfile,
    /// The namespace watch, when there is one.
    pub namespaces: Option<Arc<NamespaceLabels>>,
    pub metrics: Arc<Metrics>,
    pub certs: Arc<CertStore>,
    pub limits: Limits,
}

impl State {
    /// `None` when ready, else why not.
    pub fn not_ready(&self) -> Option<String> {
        if !self.certs.valid_now() {
            return Some(match self.certs.not_after() {
                None => "no serving certificate loaded yet".into(),
                Some(_) => "the serving certificate has expired and no new one was loaded".into(),
            });
        }
        match &self.namespaces {
            Some(ns) if !ns.synced.load(Ordering::SeqCst) => {
                Some("the namespace watch has not completed its first list yet".into())
            }
            _ => None,
        }
    }
}

type Body = Full<Bytes>;

fn plain(code: StatusCode, text: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(text.into()));
    *r.status_mut() = code;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(code: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// A denial in an AdmissionReview, for requests whose body could not be read at all.
fn error_review(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    let review = AdmissionReview::answer(AdmissionResponse {
        uid: String::new(),
        allowed: false,
        status: Some(Status::failure(
            code.as_u16(),
            reason,
            format!("podwire-injector: {message}"),
        )),
        ..Default::default()
    });
    let body = serde_json::to_vec(&review).unwrap_or_else(|_| b"{}".to_vec());
    json(code, body)
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    Ok(match (req.method(), path) {
        (&Method::POST, "/inject") => inject(&state, req).await,
        (_, "/inject") => {
            let mut r = plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "POST an admission.k8s.io/v1 AdmissionReview to /inject\n",
            );
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("POST"));
            r
        }
        (&Method::GET, "/healthz") => plain(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => match state.not_ready() {
            None => plain(StatusCode::OK, "ok\n"),
            Some(why) => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        (&Method::GET, "/metrics") => {
            let mut r = plain(StatusCode::OK, state.metrics.render());
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        _ => plain(
            StatusCode::NOT_FOUND,
            "not found: the injector serves POST /inject, GET /healthz, /readyz, /metrics\n",
        ),
    })
}

async fn inject(state: &State, req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let max = state.limits.max_body_bytes;
    let too_large = |what: String| {
        state.metrics.request("error", None, false, start.elapsed());
        tracing::warn!("refused an AdmissionReview: {what}");
        error_review(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            format!("{what}: the limit is {max} bytes (--max-body-bytes)"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Too large to be worth reading even to drain it: answer now (the client may see a reset).
    if let Some(len) = declared.filter(|l| *l > drain_limit(max) as u64) {
        return too_large(format!("the request body is {len} bytes"));
    }
    let read = read_body(req.into_body(), max);
    let body = match tokio::time::timeout(state.limits.request_timeout, read).await {
        Ok(Ok(Ok(body))) => body,
        Ok(Ok(Err(seen))) => {
            let len = declared.map_or(format!("at least {seen}"), |l| l.to_string());
            return too_large(format!("the request body is {len} bytes"));
        }
        Ok(Err(e)) => {
            state.metrics.request("error", None, false, start.elapsed());
            return error_review(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("reading the request body failed: {e}"),
            );
        }
        Err(_) => {
            state.metrics.request("error", None, false, start.elapsed());
            return error_review(
                StatusCode::REQUEST_TIMEOUT,
                "Timeout",
                format!(
                    "the request body did not arrive within {:?}",
                    state.limits.request_timeout
                ),
            );
        }
    };
    let labels_of = |ns: &str| {
        state
            .namespaces
            .as_ref()
            .and_then(|n| n.get(ns))
            .map(|l| (*l).clone())
    };
    let reviewed = review_resolving(&body, &state.config, &labels_of, &state.profile);
    let answer = serde_json::to_vec(&reviewed.review);
    state.metrics.request(
        result_of(reviewed.outcome),
        reviewed.step,
        reviewed.dry_run,
        start.elapsed(),
    );
    tracing::info!(
        outcome = reviewed.outcome.as_str(),
        dry_run = reviewed.dry_run,
        "{}",
        reviewed.summary
    );
    match answer {
        Ok(body) => json(StatusCode::OK, body),
        // Cannot happen for these plain structs; still an answer, not a 500.
        Err(e) => error_review(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("encoding the answer failed: {e}"),
        ),
    }
}

/// Bytes of an oversized body read (and dropped) before answering 413.
fn drain_limit(max: usize) -> usize {
    max.saturating_mul(4).max(1 << 20)
}

/// The body, or `Err(bytes seen)` when it is over `max`. An oversized body is still read and
/// dropped (up to [`drain_limit`]) so that the client, still sending, gets to read the 413
/// instead of a connection reset.
async fn read_body(mut body: Incoming, max: usize) -> Result<Result<Bytes, usize>, hyper::Error> {
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen <= max {
            // The usual case, one frame: no copy.
            if buf.is_empty() && body.is_end_stream() {
                return Ok(Ok(data));
            }
            buf.extend_from_slice(&data);
        } else if seen > drain_limit(max) {
            break;
        }
    }
    if seen > max {
        Ok(Err(seen))
    } else {
        Ok(Ok(Bytes::from(buf)))
    }
}

/// Serve HTTPS on `listener` until `shutdown` completes, then let open connections finish
/// (up to `limits.drain_timeout`).
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let acceptor = tokio_rustls::TlsAcceptor::from(state.certs.server_config()?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let open = Arc::new(AtomicUsize::new(0));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            acc = listener.accept() => match acc {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, state, open) = (acceptor.clone(), state.clone(), open.clone());
        let mut stop = stop_rx.clone();
        open.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let timeout = state.limits.request_timeout;
            match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let st = state.clone();
                    let svc = service_fn(move |req| handle(st.clone(), req));
                    let mut builder = http1::Builder::new();
                    builder
                        .timer(TokioTimer::new())
                        .header_read_timeout(timeout)
                        .keep_alive(true);
                    let conn = builder.serve_connection(TokioIo::new(tls), svc);
                    tokio::pin!(conn);
                    let result = tokio::select! {
                        r = conn.as_mut() => r,
                        _ = stop.changed() => {
                            conn.as_mut().graceful_shutdown();
                            conn.await
                        }
                    };
                    if let Err(e) = result {
                        tracing::debug!(%peer, "connection ended: {e}");
                    }
                }
                Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let deadline = Instant::now() + state.limits.drain_timeout;
    while open.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
