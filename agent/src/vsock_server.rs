//! The accept loop of the agent's vsock services beside ttrpc (port-forward, debug console):
//! each connection on a task of its own, a bounded number at once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_vsock::{VsockListener, VsockStream};

/// Serves every connection `listener` accepts with `serve`, at most `max` at once (more wait
/// for one to end); `what` names the service in the log.
pub fn spawn<F, Fut>(listener: VsockListener, max: usize, what: &'static str, serve: F)
where
    F: Fn(VsockStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::io::Result<()>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            match listener.accept().await {
                Ok((stream, _)) => {
                    let session = serve(stream);
                    tokio::spawn(async move {
                        if let Err(err) = session.await {
                            tracing::debug!(%err, what, "connection ended");
                        }
                        drop(slot);
                    });
                }
                Err(err) => {
                    tracing::warn!(%err, what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
}
