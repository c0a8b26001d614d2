//! Streaming: Exec and PortForward return a URL of containerd's streaming server, and the
//! session there (WebSocket, `v4.channel.k8s.io`) carries the process's streams and status, or
//! the bytes of a TCP connection to a port of the pod's `localhost`.
//!
//! On runc containerd dials `localhost:<port>` inside the pod's network namespace. Pangolin's
//! pod processes are in the VM, so its shim listens there and carries each connection to the
//! guest's loopback (README, "CRI conformance").

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use k8s_cri::v1::{AttachRequest, ExecRequest, PortForwardRequest};
use pangolin_e2e::streaming::{self, Channels, STATUS, STDERR, STDIN, STDOUT};

use crate::support::Case;

/// How long one streaming session may take.
const SESSION: Duration = Duration::from_secs(30);

/// The PortForward URL for `port` of `pod`.
async fn port_forward_url(c: &mut Case, pod: &str, port: u16) -> Result<String> {
    Ok(c.cri
        .runtime
        .port_forward(PortForwardRequest {
            pod_sandbox_id: pod.into(),
            port: vec![port.into()],
        })
        .await
        .context("PortForward")?
        .into_inner()
        .url)
}

/// A pod with a busybox httpd serving `text` on `listen` (`[IP:]PORT`); the pod's id.
async fn web_pod(c: &mut Case, name: &str, text: &str, listen: &str) -> Result<String> {
    let (pod, pod_config) = c.pod(name).await?;
    let script = format!(
        "mkdir -p /tmp/www && echo {text} > /tmp/www/index.html && exec httpd -f -p {listen} -h /tmp/www"
    );
    let config = c.container_config("web", &["sh", "-c", &script]);
    c.run(&pod, &pod_config, config).await?;
    Ok(pod)
}

/// `GET /` through port-forward to `port` of `pod`, retried while the server starts; the
/// answer.
async fn get_forwarded(c: &mut Case, pod: &str, port: u16) -> Result<String> {
    let mut last = None;
    for _ in 0..40 {
        let url = port_forward_url(c, pod, port).await?;
        let got = streaming::port_forward(&url, port, b"GET / HTTP/1.0\r\n\r\n", SESSION).await?;
        if !got.data.is_empty() {
            return Ok(String::from_utf8_lossy(&got.data).into_owned());
        }
        last = Some(got);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    anyhow::bail!("port-forward to {port} never answered: last {last:?}")
}

/// PortForward reaches a server that listens on the pod's loopback only (`127.0.0.1`).
pub async fn port_forward_reaches_a_server_on_the_pods_loopback(c: &mut Case) -> Result<()> {
    let pod = web_pod(c, "pf-lo", "from-loopback", "127.0.0.1:8080").await?;
    let answer = get_forwarded(c, &pod, 8080).await?;
    ensure!(
        answer.starts_with("HTTP/1.") && answer.contains("from-loopback"),
        "answer: {answer:?}"
    );
    Ok(())
}

/// PortForward reaches a server that listens on every address of the pod.
pub async fn port_forward_reaches_a_server_on_every_address(c: &mut Case) -> Result<()> {
    let pod = web_pod(c, "pf-any", "from-wildcard", "8081").await?;
    let answer = get_forwarded(c, &pod, 8081).await?;
    ensure!(answer.contains("from-wildcard"), "answer: {answer:?}");
    Ok(())
}

/// PortForward to a port nothing listens on ends the session with an error on the port's
/// error channel and no data.
pub async fn port_forward_to_a_closed_port_reports_an_error(c: &mut Case) -> Result<()> {
    let pod = web_pod(c, "pf-closed", "unused", "127.0.0.1:8082").await?;
    // The pod serves (so its network works) but not on 8083.
    get_forwarded(c, &pod, 8082).await?;
    let url = port_forward_url(c, &pod, 8083).await?;
    let got = streaming::port_forward(&url, 8083, b"GET / HTTP/1.0\r\n\r\n", SESSION).await?;
    ensure!(got.data.is_empty(), "data from a closed port: {got:?}");
    ensure!(
        got.error.contains("8083"),
        "no error naming the port: {got:?}"
    );
    Ok(())
}

/// The Exec URL of `cmd` in `id`.
async fn exec_url(c: &mut Case, id: &str, cmd: &[&str], tty: bool, stdin: bool) -> Result<String> {
    Ok(c.cri
        .runtime
        .exec(ExecRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| (*s).to_string()).collect(),
            tty,
            stdin,
            stdout: true,
            // A terminal has one output stream.
            stderr: !tty,
        })
        .await
        .context("Exec")?
        .into_inner()
        .url)
}

/// The Attach URL for container `id`'s stdin and output (one stream with a terminal).
async fn attach_url(c: &mut Case, id: String, tty: bool) -> Result<String> {
    Ok(c.cri
        .runtime
        .attach(AttachRequest {
            container_id: id,
            stdin: true,
            tty,
            stdout: true,
            stderr: !tty,
        })
        .await
        .context("Attach")?
        .into_inner()
        .url)
}

/// A pod with one `sleep` container; the container's id.
async fn sleeper(c: &mut Case, name: &str) -> Result<String> {
    let (pod, pod_config) = c.pod(name).await?;
    let config = c.container_config("sleeper", &["sleep", "3600"]);
    c.run(&pod, &pod_config, config).await
}

/// Exec without a terminal or stdin streams stdout and stderr apart and ends with a status
/// that carries a non-zero exit code.
pub async fn exec_streams_stdout_stderr_and_the_exit_code(c: &mut Case) -> Result<()> {
    let id = sleeper(c, "exec").await?;
    let script = "echo to-stdout; echo to-stderr >&2; exit 3";
    let url = exec_url(c, &id, &["sh", "-c", script], false, false).await?;
    let out = Channels::open(&url).await?.collect(SESSION).await?;
    let text = |ch: u8| String::from_utf8_lossy(out.get(&ch).map_or(&[][..], |v| v)).into_owned();
    ensure!(text(STDOUT) == "to-stdout\n", "stdout {:?}", text(STDOUT));
    ensure!(text(STDERR) == "to-stderr\n", "stderr {:?}", text(STDERR));
    let status = text(STATUS);
    ensure!(
        status.contains("NonZeroExitCode") && status.contains(r#""message":"3""#),
        "status {status:?}"
    );
    Ok(())
}

/// Exec with a terminal and stdin runs an interactive shell: what is typed is run, its output
/// comes back on the terminal, and `exit` ends the session with that code.
pub async fn exec_with_a_tty_and_stdin_runs_an_interactive_shell(c: &mut Case) -> Result<()> {
    let id = sleeper(c, "exec-tty").await?;
    let url = exec_url(c, &id, &["sh"], true, true).await?;
    let mut session = Channels::open(&url).await?;
    session
        .send(STDIN, b"echo pgn-$((6*7)) tty=$(tty)\n")
        .await?;
    let seen = session.read_until(STDOUT, "pgn-42", SESSION).await?;
    session.send(STDIN, b"exit 5\n").await?;
    let rest = session.collect(SESSION).await?;
    let all = format!(
        "{seen}{}",
        String::from_utf8_lossy(rest.get(&STDOUT).map_or(&[][..], |v| v))
    );
    ensure!(all.contains("tty=/dev/pts/"), "not on a terminal: {all:?}");
    let status = String::from_utf8_lossy(rest.get(&STATUS).map_or(&[][..], |v| v)).into_owned();
    ensure!(status.contains(r#""message":"5""#), "status {status:?}");
    Ok(())
}

/// Exec with stdin but no terminal: the lines sent reach the process's stdin, its stdout and
/// stderr come back apart, and its exit code ends the session.
pub async fn exec_with_stdin_and_no_tty_reads_what_is_sent(c: &mut Case) -> Result<()> {
    let id = sleeper(c, "exec-stdin").await?;
    let script = "read a; read b; echo \"$b $a\"; echo done >&2; exit 4";
    let url = exec_url(c, &id, &["sh", "-c", script], false, true).await?;
    let mut session = Channels::open(&url).await?;
    session.send(STDIN, b"first\nsecond\n").await?;
    let out = session.collect(SESSION).await?;
    let text = |ch: u8| String::from_utf8_lossy(out.get(&ch).map_or(&[][..], |v| v)).into_owned();
    ensure!(
        text(STDOUT) == "second first\n",
        "stdout {:?}",
        text(STDOUT)
    );
    ensure!(text(STDERR) == "done\n", "stderr {:?}", text(STDERR));
    let status = text(STATUS);
    ensure!(status.contains(r#""message":"4""#), "status {status:?}");
    Ok(())
}

/// Attach to a container whose init runs on a terminal (tty and stdin in its config): what is
/// typed reaches its shell, the answer comes back on the terminal.
pub async fn attach_with_a_tty_reaches_the_containers_shell(c: &mut Case) -> Result<()> {
    let (pod, pod_config) = c.pod("attach-tty").await?;
    let mut config = c.container_config("shell", &["sh"]);
    config.stdin = true;
    config.tty = true;
    let id = c.run(&pod, &pod_config, config).await?;
    let url = attach_url(c, id, true).await?;
    let mut session = Channels::open(&url).await?;
    session
        .send(STDIN, b"echo pgn-$((6*7)) tty=$(tty)\n")
        .await?;
    // The answer, not the terminal's echo of the line typed.
    session
        .read_until(STDOUT, "pgn-42 tty=/dev/pts/", SESSION)
        .await?;
    Ok(())
}

/// Attach reaches the stdin and stdout of a running container's init (no terminal): a line
/// sent is read by the container, its answer comes back.
pub async fn attach_reaches_the_containers_stdin_and_stdout(c: &mut Case) -> Result<()> {
    let (pod, pod_config) = c.pod("attach").await?;
    let script = "while read line; do echo \"got $line\"; done";
    let mut config = c.container_config("reader", &["sh", "-c", script]);
    config.stdin = true;
    let id = c.run(&pod, &pod_config, config).await?;
    let url = attach_url(c, id, false).await?;
    let mut session = Channels::open(&url).await?;
    session.send(STDIN, b"pangolin-attached\n").await?;
    let seen = session
        .read_until(STDOUT, "got pangolin-attached", SESSION)
        .await?;
    ensure!(
        seen.lines().any(|l| l == "got pangolin-attached"),
        "stdout {seen:?}"
    );
    Ok(())
}
