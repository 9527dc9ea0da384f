//! HTTP routing and limits; the answers themselves come from [`Tsa`].
//!
//! Public listener:
//!
//! | request                                             | answer |
//! |-----------------------------------------------------|--------|
//! | `POST {path}`, `application/timestamp-query`        | 200, `application/timestamp-reply`: a granted or rejected `TimeStampResp` (RFC 3161 sets no HTTP codes; clients read the PKIStatus) |
//! | `POST {path}` with another media type               | 415 + DER rejection `badDataFormat` |
//! | `POST {path}` with a body over the limit            | 413 + DER rejection `badDataFormat` |
//! | `POST {path}` whose body does not arrive in time    | 408 + DER rejection `badDataFormat` |
//! | any other method on `{path}`                        | 405, `Allow: POST` + DER rejection `badRequest` |
//! | `GET /certs`                                        | 200, the certificate chain as PEM |
//! | anything else                                       | 404 |
//!
//! Admin listener (loopback by default): `GET /health/live`, `GET /health/ready` (503 with the
//! reason while the clock is not trusted or the signer failed), `GET /clock` (the clock's
//! state and sources in words, as `tsa clock` prints them), `GET /metrics` (Prometheus),
//! `GET /status` (the operator's HTML status page, [`super::status`]). With the archive:
//! `GET /archive/serial/<hex>` and `GET /archive/imprint/<hex>` answer the archived token as
//! its granted `TimeStampResp` (for an imprint, the latest of `X-Archive-Matches` tokens), 404
//! when unknown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use super::{metrics, Client, Outcome, Tsa};
use crate::config::ServerConfig;
use crate::protocol::{FailInfo, Rejection};

pub const QUERY_TYPE: &str = "application/timestamp-query";
pub const REPLY_TYPE: &str = "application/timestamp-reply";

struct Limits {
    path: String,
    max_body: usize,
    read_timeout: Duration,
}

type Reply = Response<Full<Bytes>>;

pub(super) async fn run(
    tsa: Arc<Tsa>,
    config: &ServerConfig,
    public: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let limits = Arc::new(Limits {
        path: config.path.clone(),
        max_body: config.max_request_bytes,
        read_timeout: config.read_timeout(),
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.read_timeout())
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            accepted = public.accept() => {
                let Some(stream) = accepted_stream(accepted).await else { continue };
                let (tsa, limits) = (tsa.clone(), limits.clone());
                let service = service_fn(move |req| {
                    let (tsa, limits) = (tsa.clone(), limits.clone());
                    async move { Ok::<_, Infallible>(public_route(req, &tsa, &limits).await) }
                });
                spawn(graceful.watch(builder.serve_connection(TokioIo::new(stream), service)));
            }
            accepted = admin.accept() => {
                let Some(stream) = accepted_stream(accepted).await else { continue };
                let tsa = tsa.clone();
                let service = service_fn(move |req| {
                    let tsa = tsa.clone();
                    async move { Ok::<_, Infallible>(admin_route(req, &tsa)) }
                });
                spawn(graceful.watch(builder.serve_connection(TokioIo::new(stream), service)));
            }
            () = &mut shutdown => break,
        }
    }

    tracing::info!("shutting down: no new connections, finishing requests in flight");
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(10)) => {
            tracing::warn!("requests still in flight after 10 s; closing anyway");
        }
    }
    Ok(())
}

async fn accepted_stream(
    accepted: std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)>,
) -> Option<tokio::net::TcpStream> {
    match accepted {
        Ok((stream, _)) => {
            let _ = stream.set_nodelay(true);
            Some(stream)
        }
        Err(e) => {
            // Out of file descriptors and the like: back off instead of spinning.
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

fn spawn(conn: impl Future<Output = hyper::Result<()>> + Send + 'static) {
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    });
}

async fn public_route(req: Request<Incoming>, tsa: &Arc<Tsa>, limits: &Limits) -> Reply {
    if req.uri().path() == limits.path {
        let start = Instant::now();
        let (reply, outcome) = match *req.method() {
            Method::POST => timestamp(req, tsa, limits).await,
            _ => {
                let (mut reply, outcome) = rejection(
                    StatusCode::METHOD_NOT_ALLOWED,
                    FailInfo::BadRequest,
                    "time-stamp requests are POSTed",
                );
                reply
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST"));
                (reply, outcome)
            }
        };
        tsa.metrics.request(outcome, start.elapsed());
        return reply;
    }
    if req.uri().path() == "/certs" && req.method() == Method::GET {
        return response(
            StatusCode::OK,
            "application/pem-certificate-chain",
            tsa.certificate().chain_pem().into(),
        );
    }
    response(StatusCode::NOT_FOUND, "text/plain", "not found\n".into())
}

async fn timestamp(req: Request<Incoming>, tsa: &Arc<Tsa>, limits: &Limits) -> (Reply, Outcome) {
    if !has_media_type(&req, QUERY_TYPE) {
        return rejection(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            FailInfo::BadDataFormat,
            "the request media type must be application/timestamp-query",
        );
    }
    let too_large = || {
        rejection(
            StatusCode::PAYLOAD_TOO_LARGE,
            FailInfo::BadDataFormat,
            "the request is larger than this TSA accepts",
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limits.max_body as u64) {
        return too_large();
    }
    let body = Limited::new(req.into_body(), limits.max_body).collect();
    let body = match tokio::time::timeout(limits.read_timeout, body).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return too_large(),
        Ok(Err(_)) => {
            return rejection(
                StatusCode::BAD_REQUEST,
                FailInfo::BadDataFormat,
                "the request body could not be read",
            )
        }
        Err(_) => {
            return rejection(
                StatusCode::REQUEST_TIMEOUT,
                FailInfo::BadDataFormat,
                "the request body did not arrive in time",
            )
        }
    };
    let (der, outcome) = tsa.respond(body, &Client::ANONYMOUS).await;
    (response(StatusCode::OK, REPLY_TYPE, der.into()), outcome)
}

fn admin_route(req: Request<Incoming>, tsa: &Arc<Tsa>) -> Reply {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/health/live") => response(StatusCode::OK, "text/plain", "live\n".into()),
        (&Method::GET, "/metrics") => response(
            StatusCode::OK,
            metrics::CONTENT_TYPE,
            metrics::encode(tsa).into(),
        ),
        (&Method::GET, "/status") => response(
            StatusCode::OK,
            "text/html; charset=utf-8",
            super::status::render(&super::status::gather(tsa)).into(),
        ),
        (&Method::GET, "/clock") => response(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            tsa.clock().report().into(),
        ),
        (&Method::GET, "/health/ready") => match tsa.readiness() {
            Ok(()) => response(StatusCode::OK, "text/plain", "ready\n".into()),
            Err(reason) => response(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {reason}\n").into(),
            ),
        },
        (&Method::GET, path) if path.starts_with("/archive/") => {
            archive_lookup(tsa, &path["/archive/".len()..])
        }
        _ => response(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn archive_lookup(tsa: &Tsa, path: &str) -> Reply {
    use crate::archive::Lookup;
    let text = |status, body: String| response(status, "text/plain", body.into());
    let Some(archive) = tsa.archive() else {
        return text(StatusCode::NOT_FOUND, "the archive is not enabled\n".into());
    };
    match archive.lookup_path(path) {
        Lookup::Found(der, matches) => {
            let mut reply = response(StatusCode::OK, REPLY_TYPE, der.into());
            reply
                .headers_mut()
                .insert("x-archive-matches", HeaderValue::from(matches));
            reply
        }
        Lookup::NotFound => text(StatusCode::NOT_FOUND, "not found\n".into()),
        Lookup::BadRequest(why) => text(StatusCode::BAD_REQUEST, format!("{why}\n")),
        Lookup::Failed(why) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{why}\n")),
    }
}

/// Compares the media type, ignoring parameters and case (RFC 9110 8.3.1).
fn has_media_type(req: &Request<Incoming>, expected: &str) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(expected))
}

/// A refusal at the HTTP level, still answered with a DER `TimeStampResp`.
fn rejection(status: StatusCode, fail_info: FailInfo, reason: &'static str) -> (Reply, Outcome) {
    let der = Rejection::new(fail_info, reason).to_der();
    (
        response(status, REPLY_TYPE, der.into()),
        Outcome::Rejected(fail_info),
    )
}

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Reply {
    let mut reply = Response::new(Full::new(body));
    *reply.status_mut() = status;
    reply
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    reply
}
