//! The status server: `/healthz`, `/readyz` (the same readiness as the Node condition) and
//! `/metrics`, over hyper (a request split over several TCP segments is read whole).

use super::{heartbeat::readiness, State};
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// Probes and scrapes over HTTP/1.1 (hyper: a request split over several TCP segments is
/// read whole). GET only; any other method gets 405.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<State>) {
    loop {
        let conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                warn!("status server: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(status_response(&req, &state)) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            // A client that never finishes its headers does not hold a task forever; one
            // request per connection (`Connection: close`), as probes and scrapes need no more.
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .keep_alive(false);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(conn), service);
            if let Err(e) = conn.await {
                tracing::debug!("status server connection: {e}");
            }
        });
    }
}

fn status_response<B>(
    req: &hyper::Request<B>,
    state: &State,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use hyper::{Method, StatusCode};
    let (code, ctype, body) = if req.method() != Method::GET {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            format!("method {} not allowed: use GET\n", req.method()),
        )
    } else {
        match req.uri().path() {
            "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
            "/readyz" => {
                let (ready, message) = readiness(state);
                let code = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (code, "text/plain", format!("{message}\n"))
            }
            "/metrics" => (
                StatusCode::OK,
                crate::metrics::CONTENT_TYPE,
                state.metrics.render(),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /healthz, /readyz, /metrics\n".to_string(),
            ),
        }
    };
    let mut response = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *response.status_mut() = code;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    if code == StatusCode::METHOD_NOT_ALLOWED {
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET"),
        );
    }
    response
}
