//! A private OCI registry for tests that pull: Debian's `docker-registry` (the CNCF
//! distribution registry) serving plain HTTP on a free loopback port, storage in a directory of
//! the test's. containerd's CRI plugin pulls from a `localhost` registry over plain HTTP without
//! configuration, so images are named `localhost:<port>/<repo>:<tag>`.
//!
//! Images reach it by `ctr images push --plain-http` from a private containerd.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::containerd::PrivateContainerd;

/// Where Debian installs the registry (package `docker-registry`).
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// How long the registry may take to answer `GET /v2/` after its start.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running registry; stopped (killed and reaped) on drop.
pub struct Registry {
    /// `localhost:<port>`: the host part of the image names it serves.
    pub host: String,
    /// Its directory (configuration, storage, log).
    pub dir: PathBuf,
    child: Child,
}

impl Registry {
    /// Starts a registry keeping its files in `dir` and waits until it answers.
    pub fn start(dir: &Path) -> Result<Registry> {
        if !Path::new(REGISTRY_BIN).exists() {
            bail!("{REGISTRY_BIN} not found: install Debian's docker-registry (cargo xtask test installs it)");
        }
        fs::create_dir_all(dir.join("storage"))?;
        let port = free_port()?;
        let config = dir.join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("storage").display()
            ),
        )?;
        let log = fs::File::create(dir.join("registry.log"))?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {REGISTRY_BIN}"))?;
        let mut registry = Registry {
            host: format!("localhost:{port}"),
            dir: dir.to_path_buf(),
            child,
        };
        registry.wait_ready(port)?;
        Ok(registry)
    }

    fn wait_ready(&mut self, port: u16) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the registry exited ({status}) before it answered: {}",
                    self.log_tail()
                );
            }
            if answers_v2(port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the registry did not answer on port {port} within {READY_TIMEOUT:?}: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The end of its log.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// Pushes image `local` of `ctrd`'s `namespace` to the registry as `remote` (a name on this
    /// registry), then drops the local name `remote` again, so that a pull of `remote` fetches
    /// its manifest and config from the registry.
    pub fn push(
        &self,
        ctrd: &PrivateContainerd,
        namespace: &str,
        local: &str,
        remote: &str,
    ) -> Result<()> {
        if !remote.starts_with(&format!("{}/", self.host)) {
            bail!("{remote} is not a name on {}", self.host);
        }
        ctrd.ctr_in_output(namespace, ["images", "tag", "--force", local, remote])?;
        ctrd.ctr_in_output(namespace, ["images", "push", "--plain-http", remote])?;
        ctrd.ctr_in_output(namespace, ["images", "rm", remote])?;
        Ok(())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listens on now.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Whether `GET /v2/` on the port answers 200 (the registry API's version check).
fn answers_v2(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /v2/ HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}
