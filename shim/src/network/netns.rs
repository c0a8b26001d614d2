//! Running code inside a pod's network namespace. A netlink socket and a TUN device belong to
//! the namespace of the thread that opens them, and `setns(2)` moves only the calling thread;
//! so each operation gets a fresh OS thread that enters the namespace, does its work and exits.
//! No tokio worker ever changes namespace (other tasks would follow it there), and neither
//! does a `spawn_blocking` thread (the pool reuses them).

use std::fs::File;
use std::path::Path;

use super::NetworkError;

/// Runs `work` on a new thread inside network namespace `netns`; its result.
pub(crate) async fn run<T, F>(netns: &Path, work: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, NetworkError> + Send + 'static,
{
    let enter = |source| NetworkError::Enter {
        netns: netns.to_path_buf(),
        source,
    };
    // Opened here so a missing namespace fails before a thread starts.
    let ns = File::open(netns).map_err(enter)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let path = netns.to_path_buf();
    std::thread::Builder::new()
        .name("pgn-netns".into())
        .spawn(move || {
            let result = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|errno| NetworkError::Enter {
                    netns: path,
                    source: errno.into(),
                })
                .and_then(|()| work());
            // The caller may have given up (its task cancelled); nothing to tell then.
            let _ = tx.send(result);
        })
        .map_err(enter)?;
    rx.await.map_err(|_| NetworkError::Worker {
        netns: netns.to_path_buf(),
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_namespace_fails_before_any_thread_starts() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&ran);
        let netns = Path::new("/var/run/netns/pangolin-no-such-namespace");
        let err = runtime
            .block_on(run(netns, move || {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }))
            .expect_err("no such namespace");
        assert!(matches!(err, NetworkError::Enter { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("entering network namespace {}", netns.display())
        );
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }
}
