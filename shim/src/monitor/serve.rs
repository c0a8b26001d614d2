//! The HTTP endpoint: `GET /metrics` scrapes and renders; anything else is 404.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::{collect, exposition};

/// Scrapes served at once; more wait for a slot (each reads /proc of every sandbox).
const MAX_CONNECTIONS: usize = 16;

async fn answer(
    state_dir: Arc<PathBuf>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET || req.uri().path() != "/metrics" {
        let mut not_found = Response::new(Full::new(Bytes::from_static(b"only GET /metrics\n")));
        *not_found.status_mut() = StatusCode::NOT_FOUND;
        return Ok(not_found);
    }
    let sandboxes = collect::scrape(&state_dir).await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let text = exposition::render(&sandboxes, now);
    let mut ok = Response::new(Full::new(Bytes::from(text)));
    if let Ok(v) = hyper::header::HeaderValue::from_str(exposition::CONTENT_TYPE) {
        ok.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    Ok(ok)
}

/// Serves the metrics of the sandboxes under `state_dir` on `listener` until the task ends.
pub async fn serve(listener: TcpListener, state_dir: PathBuf) -> std::io::Result<()> {
    let state_dir = Arc::new(state_dir);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return Ok(());
        };
        let (stream, peer): (_, SocketAddr) = listener.accept().await?;
        let state_dir = Arc::clone(&state_dir);
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req| answer(Arc::clone(&state_dir), req));
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, %err, "metrics connection ended");
            }
            drop(slot);
        });
    }
}
