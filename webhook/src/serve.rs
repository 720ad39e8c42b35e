//! The HTTPS server: `POST /inject` (AdmissionReview v1) around [`review_resolving`], plus
//! `GET /healthz`, `/readyz` and `/metrics`.
//!
//! Every request gets an answer: an unreadable AdmissionReview is denied inside a 200 answer
//! (as `review` does), a body over the limit gets `413`, a body that does not arrive in time
//! `408`, both with an AdmissionReview-shaped body; nothing here answers `500`.

use crate::admission::{AdmissionResponse, AdmissionReview, Status};
use crate::metrics::{result_of, Metrics, Protocol, RequestResult};
use crate::namespaces::NamespaceLabels;
use crate::review::{review_resolving, Outcome};
use crate::tls::CertStore;
use crate::Error;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use podwire_core::inject::Step;
use podwire_core::MeshProfile;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Clone)]
pub struct Limits {
    /// Bodies over this get `413`.
    pub max_body_bytes: usize,
    /// Time for a request's headers and body to arrive (and for a TLS handshake).
    pub request_timeout: Duration,
    /// On shutdown, time given to open connections to finish their requests.
    pub drain_timeout: Duration,
    /// Connections served at once (each holds TLS buffers and, over HTTP/2, flow-control
    /// windows the memory budget does not see); more wait in the accept queue.
    pub max_connections: usize,
    /// Memory that requests in flight may use, so that the process stays under its
    /// container limit whatever arrives: see [`MemoryBudget`].
    pub memory: MemoryBudget,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 << 20,
            request_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(15),
            max_connections: 128,
            memory: MemoryBudget::new(16 << 20, 32 << 20),
        }
    }
}

/// Two pools of memory, in KiB permits, shared by all requests: one for bodies being
/// received (taken before reading, for the declared length or the maximum), one for
/// parsing and answering (taken after reading, for [`parse_cost`]). A request takes the
/// body pool, then the parse pool, and never the other way round, so they cannot deadlock;
/// one that cannot get its share within the request timeout is shed with `429`, one whose
/// cost alone exceeds the parse pool gets `413`. With the defaults (16 + 48 MiB) and an idle
/// footprint of ~20 MiB, the injector stays well under the manifest's 128Mi limit.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    bodies: Arc<Semaphore>,
    parsing: Arc<Semaphore>,
    body_kib: u32,
    parse_kib: u32,
}

impl MemoryBudget {
    pub fn new(body_bytes: usize, parse_bytes: usize) -> Self {
        let (body_kib, parse_kib) = (kib(body_bytes), kib(parse_bytes));
        MemoryBudget {
            bodies: Arc::new(Semaphore::new(body_kib as usize)),
            parsing: Arc::new(Semaphore::new(parse_kib as usize)),
            body_kib,
            parse_kib,
        }
    }
}

impl MemoryBudget {
    /// The parse pool, in bytes: no single request may cost more.
    pub fn parse_bytes(&self) -> usize {
        self.parse_kib as usize * 1024
    }
}

fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
}

/// What parsing `body` into `serde_json::Value`s and building the answer may cost, in bytes,
/// from one pass over it: the body itself twice (text and parsed strings), ~64 bytes per JSON
/// value, and a B-tree node (~640 bytes) per non-empty object. Cheap to send, dear to parse
/// (`[[],[],...]`, `[{"a":0},...]`) is thus priced before anything is parsed.
pub fn parse_cost(body: &[u8]) -> usize {
    let (mut values, mut objects) = (1usize, 0usize);
    let mut prev = 0u8;
    let mut i = 0;
    while let Some(&b) = body.get(i) {
        i += 1;
        match b {
            // A string's content is priced by length only: jump to its end with memchr, the
            // byte-at-a-time walk through a pod's (mostly string) JSON was ~5 us a request.
            b'"' => loop {
                let rest = body.get(i..).unwrap_or_default();
                let Some(k) = memchr::memchr2(b'"', b'\\', rest) else {
                    i = body.len(); // unterminated: the rest is string
                    break;
                };
                let quote = rest[k] == b'"';
                i += k + if quote { 1 } else { 2 };
                if quote {
                    break;
                }
            },
            b',' | b'[' | b'{' => values += 1,
            b'}' if prev != b'{' => objects += 1,
            _ => {}
        }
        if !b.is_ascii_whitespace() {
            prev = b;
        }
    }
    body.len()
        .saturating_mul(2)
        .saturating_add(values.saturating_mul(64))
        .saturating_add(objects.saturating_mul(640))
}

/// What a request handler needs.
#[derive(Debug)]
pub struct State {
    /// The config now: the file's, over Istio's settings (replaced when they change).
    pub config: Arc<crate::istio_settings::LiveConfig>,
    pub profile: MeshProfile,
    /// The namespace watch, when there is one.
    pub namespaces: Option<Arc<NamespaceLabels>>,
    /// The node watch, when there is one (it decides `ENABLE_NATIVE_SIDECARS=auto`).
    pub nodes: Option<Arc<crate::nodes::NodeWatch>>,
    pub metrics: Arc<Metrics>,
    pub certs: Arc<CertStore>,
    pub limits: Limits,
    /// Answers for replicas of pods seen before.
    pub memo: crate::memo::Memo,
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
                return Some("the namespace watch has not completed its first list yet".into())
            }
            _ => {}
        }
        // Only `auto` waits for the nodes (before their verdict the settings still say auto).
        match &self.nodes {
            Some(n) if self.config.get().native_is_auto() => n.not_synced(),
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
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
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
    let _in_flight = state.metrics.in_flight();
    let max = state.limits.max_body_bytes;
    let too_large = |what: String| {
        state
            .metrics
            .request(RequestResult::Error, None, false, start.elapsed());
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
    let deadline = tokio::time::Instant::now() + state.limits.request_timeout;
    let budget = &state.limits.memory;
    let body_share = kib(declared.map_or(max, |l| l as usize)).min(budget.body_kib);
    let Some(_body_permit) = take(&budget.bodies, body_share, deadline).await else {
        return overloaded(state, start, "receiving other requests");
    };
    let read = read_body(req.into_body(), max, declared);
    let body = match tokio::time::timeout_at(deadline, read).await {
        Ok(Ok(Ok(body))) => body,
        Ok(Ok(Err(seen))) => {
            let len = declared.map_or(format!("at least {seen}"), |l| l.to_string());
            return too_large(format!("the request body is {len} bytes"));
        }
        Ok(Err(e)) => {
            state
                .metrics
                .request(RequestResult::Error, None, false, start.elapsed());
            return error_review(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("reading the request body failed: {e}"),
            );
        }
        Err(_) => {
            state
                .metrics
                .request(RequestResult::Error, None, false, start.elapsed());
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
    let cost = kib(parse_cost(&body));
    if cost > budget.parse_kib {
        state
            .metrics
            .request(RequestResult::Error, None, false, start.elapsed());
        tracing::warn!(
            "refused an AdmissionReview of {} bytes: parsing it would need ~{} MiB",
            body.len(),
            cost >> 10
        );
        return error_review(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            format!(
                "the AdmissionReview ({} bytes) is too complex: parsing it would need ~{} MiB, over the injector's budget of {} MiB",
                body.len(),
                cost >> 10,
                budget.parse_kib >> 10
            ),
        );
    }
    let Some(_parse_permit) = take(&budget.parsing, cost, deadline).await else {
        return overloaded(state, start, "parsing other requests");
    };
    let labels_of = |ns: &str| {
        state
            .namespaces
            .as_ref()
            .and_then(|n| n.get(ns))
            .map(|l| (*l).clone())
    };
    let config = state.config.get();
    // A replica of a pod answered before: the same answer, this request's uid. A memo-able
    // request is reviewed with the very labels its answer is kept under (the namespace watch
    // may change them meanwhile).
    let memo = crate::memo::Request::read(&body).map(|r| {
        let labels = labels_of(&r.namespace);
        (r, labels)
    });
    if let Some((r, labels)) = &memo {
        if let Some(hit) = state.memo.get(r, &config, labels.as_ref()) {
            state.metrics.memo_hit();
            answered(
                state,
                start,
                hit.outcome,
                hit.step,
                r.dry_run,
                format_args!("{} (as its replica before)", hit.summary),
            );
            return json(StatusCode::OK, hit.body(&r.uid));
        }
    }
    let reviewed = match &memo {
        Some((_, labels)) => review_resolving(&body, &config, &|_| labels.clone(), &state.profile),
        None => review_resolving(&body, &config, &labels_of, &state.profile),
    };
    let answer = reviewed.review.to_json();
    answered(
        state,
        start,
        reviewed.outcome,
        reviewed.step,
        reviewed.dry_run,
        format_args!("{}", reviewed.summary),
    );
    match answer {
        Ok(body) => {
            // Kept only under the config still in use: an answer reviewed under one replaced
            // meanwhile would empty the memo of the new config's answers.
            if let Some((r, labels)) = memo {
                if Arc::ptr_eq(&config, &state.config.get()) {
                    state.memo.put(&r, &config, labels, &reviewed, &body);
                }
            }
            json(StatusCode::OK, body)
        }
        // Cannot happen for these plain structs; still an answer, not a 500.
        Err(e) => error_review(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("encoding the answer failed: {e}"),
        ),
    }
}

/// One answered review: its metrics and its log line.
fn answered(
    state: &State,
    start: Instant,
    outcome: Outcome,
    step: Option<Step>,
    dry_run: bool,
    summary: std::fmt::Arguments<'_>,
) {
    state
        .metrics
        .request(result_of(outcome), step, dry_run, start.elapsed());
    tracing::info!(outcome = outcome.as_str(), dry_run, "{summary}");
}

/// `n` KiB of `pool`, waiting until `deadline` at most.
async fn take(
    pool: &Arc<Semaphore>,
    n: u32,
    deadline: tokio::time::Instant,
) -> Option<OwnedSemaphorePermit> {
    tokio::time::timeout_at(deadline, pool.clone().acquire_many_owned(n))
        .await
        .ok()?
        .ok()
}

/// Load shedding: a proper AdmissionReview with 429, so the API server reports a retryable
/// error instead of the injector being OOM-killed.
fn overloaded(state: &State, start: Instant, busy: &str) -> Response<Body> {
    state
        .metrics
        .request(RequestResult::Error, None, false, start.elapsed());
    tracing::warn!("shed an AdmissionReview: the memory budget is taken by {busy}");
    error_review(
        StatusCode::TOO_MANY_REQUESTS,
        "TooManyRequests",
        format!("overloaded: the memory budget for requests in flight is taken by {busy} for longer than the request timeout; retry"),
    )
}

/// Bytes of an oversized body read (and dropped) before answering 413.
fn drain_limit(max: usize) -> usize {
    max.saturating_mul(4).max(1 << 20)
}

/// The body, or `Err(bytes seen)` when it is over `max`. An oversized body is still read and
/// dropped (up to [`drain_limit`]) so that the client, still sending, gets to read the 413
/// instead of a connection reset.
async fn read_body(
    mut body: Incoming,
    max: usize,
    declared: Option<u64>,
) -> Result<Result<Bytes, usize>, hyper::Error> {
    // Sized once when the length is known: growing by doubling would take twice the body
    // in freed buffers along the way.
    let mut buf = Vec::with_capacity(declared.map_or(0, |l| (l as usize).min(max)));
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

/// Whether a connection is serving requests, and since when it has not been.
#[derive(Debug)]
struct Activity {
    busy: AtomicUsize,
    last: std::sync::Mutex<tokio::time::Instant>,
}

/// One request being served on a connection, until dropped.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Activity {
    fn new() -> Self {
        Activity {
            busy: AtomicUsize::new(0),
            last: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    fn last(&self) -> tokio::time::Instant {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Idle (no request) for at least `idle`.
    fn idle_for(&self, idle: Duration) -> bool {
        self.busy.load(Ordering::SeqCst) == 0 && self.last().elapsed() >= idle
    }

    /// Until it is time to look again whether the connection has been idle for `idle`;
    /// never, for a connection whose activity is not followed.
    async fn next_check(activity: Option<&Self>, idle: Duration) {
        let Some(a) = activity else {
            return std::future::pending().await;
        };
        let at = if a.busy.load(Ordering::SeqCst) > 0 {
            tokio::time::Instant::now() + idle
        } else {
            a.last() + idle
        };
        tokio::time::sleep_until(at).await;
    }
}

/// Streams one HTTP/2 connection may have open at once: kube-apiserver opens another
/// connection past it; the memory budget, not this, bounds the work in flight.
pub const MAX_H2_STREAMS: u32 = 32;
/// HTTP/2 flow-control windows: what a peer may send before its data is read. With
/// [`Limits::max_connections`] they bound what HTTP/2 buffers outside the memory budget
/// (128 connections x 128 KiB = 16 MiB); an AdmissionReview is a few KiB.
const H2_STREAM_WINDOW: u32 = 64 << 10;
const H2_CONNECTION_WINDOW: u32 = 128 << 10;

/// The HTTP server for one TLS connection: HTTP/2 when ALPN chose it, HTTP/1.1 otherwise.
fn connection_builder(h2: bool, timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_H2_STREAMS)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        // A peer that went away without closing is found by pings, not kept forever.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(timeout);
    if h2 {
        builder.http2_only()
    } else {
        builder.http1_only()
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
    let slots = Arc::new(Semaphore::new(state.limits.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        // A free slot before accepting: past the cap, connections wait in the accept queue.
        let slot = tokio::select! {
            _ = &mut shutdown => break,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break, // never closed
            },
        };
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
            let _slot = slot;
            let timeout = state.limits.request_timeout;
            match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let st = state.clone();
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    // Only HTTP/2 needs to know when the connection went idle: HTTP/1.1's
                    // header read timeout closes an idle one by itself.
                    let activity = h2.then(|| Arc::new(Activity::new()));
                    let act = activity.clone();
                    let svc = service_fn(move |req| {
                        let (st, busy) = (st.clone(), act.as_ref().map(Activity::begin));
                        async move {
                            let r = handle(st, req).await;
                            drop(busy);
                            r
                        }
                    });
                    let _open = state.metrics.connection(if h2 {
                        Protocol::Http2
                    } else {
                        Protocol::Http1
                    });
                    let builder = connection_builder(h2, timeout);
                    let conn = builder.serve_connection(TokioIo::new(tls), svc);
                    tokio::pin!(conn);
                    let result = loop {
                        tokio::select! {
                            r = conn.as_mut() => break r,
                            _ = stop.changed() => {
                                conn.as_mut().graceful_shutdown();
                                break conn.as_mut().await;
                            }
                            // An idle HTTP/2 connection is closed here (GOAWAY) after as long
                            // without a stream as HTTP/1.1 waits for a request's headers.
                            _ = Activity::next_check(activity.as_deref(), timeout) => {
                                if activity.as_ref().is_some_and(|a| a.idle_for(timeout)) {
                                    tracing::debug!(%peer, "closing an idle HTTP/2 connection");
                                    conn.as_mut().graceful_shutdown();
                                    break conn.as_mut().await;
                                }
                            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_cost_prices_structure_not_string_content() {
        let plain = parse_cost(br#"{"a":"[[[[{{{{,,,,"}"#);
        let structured = parse_cost(br#"{"a":[[[[{"b":1}]]]]}"#);
        assert!(structured > plain, "{structured} vs {plain}");
        // Empty arrays cost far more than their bytes; one-member objects more still.
        let arrays = parse_cost(format!("[{}[]]", "[],".repeat(1000)).as_bytes());
        let objects = parse_cost(format!("[{}{{}}]", "{\"a\":0},".repeat(1000)).as_bytes());
        assert!(arrays > 40 * 3000, "{arrays}");
        assert!(objects > 600 * 1000, "{objects}");
        // An escaped quote does not end the string.
        assert_eq!(parse_cost(br#"["\"[[[["]"#), parse_cost(br#"["xxxxxx"]"#));
    }

    /// The byte-at-a-time walk `parse_cost` replaced: the jumping one must price every body,
    /// malformed ones included (a lone backslash at the end, an unterminated string), the same.
    fn walk_cost(body: &[u8]) -> usize {
        let (mut values, mut objects) = (1usize, 0usize);
        let (mut in_string, mut escaped, mut prev) = (false, false, 0u8);
        for &b in body {
            if in_string {
                match (escaped, b) {
                    (true, _) => escaped = false,
                    (false, b'\\') => escaped = true,
                    (false, b'"') => in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b',' | b'[' | b'{' => values += 1,
                b'}' if prev != b'{' => objects += 1,
                _ => {}
            }
            if !b.is_ascii_whitespace() {
                prev = b;
            }
        }
        body.len() * 2 + values * 64 + objects * 640
    }

    proptest::proptest! {
        #[test]
        fn parse_cost_matches_the_byte_walk(body in proptest::collection::vec(
            proptest::sample::select(b"\"\\{}[],: ax".to_vec()), 0..64)) {
            proptest::prop_assert_eq!(parse_cost(&body), walk_cost(&body));
        }
    }

    #[test]
    fn parse_cost_matches_the_byte_walk_on_the_fixtures() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("fixtures") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "json") {
                let body = std::fs::read(&path).expect("fixture");
                assert_eq!(parse_cost(&body), walk_cost(&body), "{}", path.display());
                seen += 1;
            }
        }
        assert!(seen > 3, "only {seen} JSON fixtures in {}", dir.display());
    }
}
