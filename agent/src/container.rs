//! A container in the guest: its libcontainer state, its processes and their streams.
//!
//! State machine (the agent's view; libcontainer keeps its own on disk):
//! `Created` --start--> `Running` <--pause/resume--> `Paused`; any --init exits--> `Stopped`.
//! `Stopped` is derived from the init process's exit, never stored.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use libcontainer::container::Container as LcContainer;
use tokio::sync::Mutex as AsyncMutex;

use crate::error::AgentError;
use crate::helper::CONTAINER_ROOT;
use crate::reaper::{wait_exit, Exit, ExitWatch};
use crate::stdio::{HostStdio, Input, Output, Pty};

/// Largest chunk one ReadStdout/ReadStderr returns.
pub const MAX_READ: usize = 1 << 16;

/// Lifecycle state stored by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Init exists and waits for StartContainer.
    Created,
    /// Init was started.
    Running,
    /// The cgroup is frozen.
    Paused,
}

/// One process (init or exec) and the agent's ends of its streams.
pub struct Process {
    /// Guest pid.
    pub pid: i32,
    exit: ExitWatch,
    stdin: AsyncMutex<Option<Input>>,
    stdout: AsyncMutex<Option<Output>>,
    stderr: AsyncMutex<Option<Output>>,
    pty: Option<Arc<Pty>>,
}

impl Process {
    /// Wraps a spawned process.
    pub fn new(pid: i32, exit: ExitWatch, stdio: HostStdio, pty: Option<Arc<Pty>>) -> Process {
        Process {
            pid,
            exit,
            stdin: AsyncMutex::new(stdio.stdin),
            stdout: AsyncMutex::new(stdio.stdout),
            stderr: AsyncMutex::new(stdio.stderr),
            pty,
        }
    }

    /// The exit status, if the process has exited.
    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Waits for the exit status.
    pub async fn wait(&self) -> Exit {
        wait_exit(self.exit.clone()).await
    }

    /// Sends a signal; a process that already exited is not an error.
    pub fn signal(&self, signal: i32) -> Result<(), AgentError> {
        if self.exited().is_some() {
            return Ok(());
        }
        let sig = nix::sys::signal::Signal::try_from(signal).map_err(|_| AgentError::Invalid {
            field: "signal",
            reason: format!("{signal} is not a signal number"),
        })?;
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(AgentError::Io("kill", e.into())),
        }
    }

    /// Writes to stdin.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<usize, AgentError> {
        let mut stdin = self.stdin.lock().await;
        let input = stdin.as_mut().ok_or(AgentError::Invalid {
            field: "stdin",
            reason: "the process has no open stdin".into(),
        })?;
        match input.write(data).await {
            Ok(n) => Ok(n),
            // The reader is gone (process exited): report it, and stop accepting input.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                *stdin = None;
                Err(AgentError::Io("write stdin", e))
            }
            Err(e) => Err(AgentError::Io("write stdin", e)),
        }
    }

    /// Closes stdin (the process reads EOF).
    pub async fn close_stdin(&self) {
        self.stdin.lock().await.take();
    }

    /// Reads stdout (`stderr == false`) or stderr; an empty result with `true` means EOF.
    ///
    /// The stream ends when every writer closed it, or once the process has exited and what it
    /// wrote is read: a child it left behind holding the pipe does not keep the stream (and so
    /// the host's exit report) open. Output written by such a child after the exit is dropped.
    pub async fn read(&self, stderr: bool, len: usize) -> Result<(Vec<u8>, bool), AgentError> {
        let mut slot = if stderr {
            self.stderr.lock().await
        } else {
            self.stdout.lock().await
        };
        let Some(output) = slot.as_mut() else {
            return Ok((Vec::new(), true));
        };
        let mut buf = vec![0u8; len.clamp(1, MAX_READ)];
        let read = {
            let exit = wait_exit(self.exit.clone());
            tokio::select! {
                biased;
                r = output.read(&mut buf) => Some(r),
                _ = exit => None,
            }
        };
        let n = match read {
            Some(r) => r,
            // Exited: everything it wrote is in the pipe; take what is there, then end.
            None => output.read_now(&mut buf),
        }
        .map_err(|e| AgentError::Io("read output", e))?;
        if n == 0 {
            *slot = None;
            return Ok((Vec::new(), true));
        }
        buf.truncate(n);
        Ok((buf, false))
    }

    /// Sets the terminal size.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), AgentError> {
        let pty = self.pty.as_ref().ok_or(AgentError::Invalid {
            field: "exec_id",
            reason: "the process has no terminal".into(),
        })?;
        pty.resize(rows, cols)
            .map_err(|e| AgentError::Io("resize terminal", e))
    }
}

/// A container and its processes.
pub struct Container {
    /// Container id.
    pub id: String,
    /// Guest bundle directory (config.json, process files, console sockets).
    pub bundle: PathBuf,
    /// Absolute cgroupfs directory.
    pub cgroup_dir: PathBuf,
    /// The spec's cgroupsPath.
    pub cgroups_path: PathBuf,
    /// The init process.
    pub init: Arc<Process>,
    status: Mutex<Status>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single read or update: a poisoned lock's data is intact.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Container {
    /// A freshly created container.
    pub fn new(
        id: String,
        bundle: PathBuf,
        cgroups_path: PathBuf,
        cgroup_dir: PathBuf,
        init: Process,
    ) -> Container {
        Container {
            id,
            bundle,
            cgroup_dir,
            cgroups_path,
            init: Arc::new(init),
            status: Mutex::new(Status::Created),
            execs: Mutex::new(HashMap::new()),
        }
    }

    /// Name of the current state, for errors and logs.
    pub fn state_name(&self) -> &'static str {
        if self.init.exited().is_some() {
            return "stopped";
        }
        match *lock(&self.status) {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
        }
    }

    fn require(&self, wanted: Status, op: &'static str) -> Result<(), AgentError> {
        if self.init.exited().is_none() && *lock(&self.status) == wanted {
            Ok(())
        } else {
            Err(AgentError::State {
                id: self.id.clone(),
                state: self.state_name(),
                op,
            })
        }
    }

    /// True once init has exited.
    pub fn stopped(&self) -> bool {
        self.init.exited().is_some()
    }

    /// The process named by `exec_id` ("" = init).
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>, AgentError> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| AgentError::NoProcess {
                container_id: self.id.clone(),
                exec_id: exec_id.to_string(),
            })
    }

    /// Checks an exec id is free and the container can run another process.
    pub fn can_exec(&self, exec_id: &str) -> Result<(), AgentError> {
        self.require(Status::Running, "exec")?;
        if lock(&self.execs).contains_key(exec_id) {
            return Err(AgentError::Exists(exec_id.to_string()));
        }
        Ok(())
    }

    /// Records an exec'd process.
    pub fn add_exec(&self, exec_id: &str, process: Process) -> Result<(), AgentError> {
        let mut execs = lock(&self.execs);
        if execs.contains_key(exec_id) {
            return Err(AgentError::Exists(exec_id.to_string()));
        }
        execs.insert(exec_id.to_string(), Arc::new(process));
        Ok(())
    }

    /// Forgets an exited exec process.
    pub fn remove_exec(&self, exec_id: &str) -> Result<(), AgentError> {
        let mut execs = lock(&self.execs);
        match execs.get(exec_id) {
            None => Err(AgentError::NoProcess {
                container_id: self.id.clone(),
                exec_id: exec_id.to_string(),
            }),
            Some(p) if p.exited().is_none() => Err(AgentError::State {
                id: format!("{}/{exec_id}", self.id),
                state: "running",
                op: "remove process",
            }),
            Some(_) => {
                execs.remove(exec_id);
                Ok(())
            }
        }
    }

    fn load(&self) -> Result<LcContainer, AgentError> {
        Ok(LcContainer::load(
            PathBuf::from(CONTAINER_ROOT).join(&self.id),
        )?)
    }

    /// Lets init run its process.
    pub async fn start(self: &Arc<Self>) -> Result<i32, AgentError> {
        self.require(Status::Created, "start")?;
        let this = self.clone();
        blocking(move || this.load()?.start().map_err(AgentError::from)).await?;
        *lock(&self.status) = Status::Running;
        Ok(self.init.pid)
    }

    /// Freezes the cgroup.
    pub async fn pause(self: &Arc<Self>) -> Result<(), AgentError> {
        self.require(Status::Running, "pause")?;
        let this = self.clone();
        blocking(move || this.load()?.pause().map_err(AgentError::from)).await?;
        *lock(&self.status) = Status::Paused;
        Ok(())
    }

    /// Thaws the cgroup.
    pub async fn resume(self: &Arc<Self>) -> Result<(), AgentError> {
        self.require(Status::Paused, "resume")?;
        let this = self.clone();
        blocking(move || this.load()?.resume().map_err(AgentError::from)).await?;
        *lock(&self.status) = Status::Running;
        Ok(())
    }

    /// Sends `signal` to every process of the container.
    pub fn signal_all(&self, signal: i32) -> Result<(), AgentError> {
        if signal == libc::SIGKILL {
            // cgroup.kill kills every task, frozen ones included, without racing forks.
            if std::fs::write(self.cgroup_dir.join("cgroup.kill"), "1").is_ok() {
                return Ok(());
            }
        }
        let sig = nix::sys::signal::Signal::try_from(signal).map_err(|_| AgentError::Invalid {
            field: "signal",
            reason: format!("{signal} is not a signal number"),
        })?;
        for pid in crate::cgroup::pids(&self.cgroup_dir)? {
            let Ok(pid) = i32::try_from(pid) else {
                continue;
            };
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
        Ok(())
    }

    /// Kills what still runs and removes the libcontainer state and cgroup.
    pub async fn destroy(self: &Arc<Self>) -> Result<(), AgentError> {
        if !self.stopped() {
            if *lock(&self.status) == Status::Paused {
                // Thaw so the kill is delivered promptly; errors are moot, we kill anyway.
                let _ = self.resume().await;
            }
            self.signal_all(libc::SIGKILL)?;
            let _ = self.init.signal(libc::SIGKILL);
            let deadline = std::time::Duration::from_secs(10);
            if tokio::time::timeout(deadline, self.init.wait())
                .await
                .is_err()
            {
                return Err(AgentError::State {
                    id: self.id.clone(),
                    state: "unkillable",
                    op: "remove",
                });
            }
        }
        let this = self.clone();
        blocking(move || match this.load() {
            Ok(mut c) => c.delete(true).map_err(AgentError::from),
            // Nothing on disk: creation failed half-way, only the cgroup may remain.
            Err(_) => {
                let _ = std::fs::remove_dir(&this.cgroup_dir);
                Ok(())
            }
        })
        .await?;
        let _ = std::fs::remove_dir_all(&self.bundle);
        Ok(())
    }
}

/// Runs blocking libcontainer calls off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Io("blocking task", std::io::Error::other(e.to_string())))?
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::reaper::ExitStatus;

    /// `sh` writes one line, leaves a child holding its stdout, and exits.
    #[tokio::test]
    async fn output_ends_once_the_exited_process_output_is_read_even_if_a_child_holds_the_pipe() {
        let (child, host) = crate::stdio::pipes(false).expect("pipes");
        let mut sh = std::process::Command::new("/bin/sh")
            .args(["-c", "echo out; sleep 30 & echo $! >&2; exit 0"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::from(child.stdout))
            .stderr(std::process::Stdio::from(child.stderr))
            .spawn()
            .expect("spawn sh");
        let pid = i32::try_from(sh.id()).expect("pid");
        let (tx, exit) = tokio::sync::watch::channel(None);
        let process = Process::new(pid, exit, host, None);
        let status = tokio::task::spawn_blocking(move || sh.wait())
            .await
            .expect("join")
            .expect("wait sh");
        assert!(status.success());
        tx.send_replace(Some(Exit {
            status: ExitStatus::Exited(0),
            at_unix_ns: 1,
        }));
        let t = Instant::now();
        let (data, eof) = process.read(false, 1024).await.expect("read");
        assert_eq!((data.as_slice(), eof), (b"out\n".as_slice(), false));
        let (data, eof) = tokio::time::timeout(Duration::from_secs(5), process.read(false, 1024))
            .await
            .expect("the stream ends without waiting for the sleeping child")
            .expect("read");
        assert!(data.is_empty() && eof);
        assert!(t.elapsed() < Duration::from_secs(5));
        let (sleeper, _) = process.read(true, 1024).await.expect("stderr");
        let (_, eof) = process.read(true, 1024).await.expect("stderr");
        assert!(eof, "stderr ends too");
        // The left-behind child (it still holds both pipes) is the test's to end.
        let sleeper: i32 = String::from_utf8_lossy(&sleeper)
            .trim()
            .parse()
            .expect("child pid");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(sleeper),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}
