//! `cargo xtask testhost [--timeout SECS] [--idle-timeout SECS] [--memory MIB] -- CMD...`: runs
//! CMD as root inside a
//! nested test host, a Linux VM under QEMU TCG with an emulated AMD CPU that has SVM and nested
//! paging, so its `/dev/kvm` is hardware-virtualisation KVM even where this machine's is not.
//!
//! The test host's root is this machine's `/` over 9p, read-only, with tmpfs on the directories
//! that take writes; the checkout is shared read-write at the same path, so CMD sees the same
//! binaries and artifacts and its results come back. CMD's output streams to ours; its exit
//! status is ours. A test host that runs past the timeout, or whose console stays silent for the
//! idle timeout, is killed with a message (exit 124). Silence is how the known QEMU TCG
//! nested-SVM freeze shows (the whole test host stops); the test suites it runs print at least
//! every 60 s (libtest reports a test running longer), so a freeze is caught in minutes instead
//! of at the end of the overall timeout.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cpio::{self, Entry};
use crate::guest;

/// Default limit for one test host run.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// Default limit for console silence before the test host is taken for frozen.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Exit status when the test host was killed for running too long (as timeout(1)).
pub const EXIT_TIMEOUT: i32 = 124;

struct Options {
    timeout: Duration,
    idle_timeout: Duration,
    memory_mib: u32,
    command: Vec<String>,
}

fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut opts = Options {
        timeout: DEFAULT_TIMEOUT,
        idle_timeout: DEFAULT_IDLE_TIMEOUT,
        memory_mib: 4096,
        command: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--timeout" => {
                let secs: u64 = it.next().context("--timeout SECS")?.parse().context("--timeout SECS")?;
                opts.timeout = Duration::from_secs(secs);
            }
            "--idle-timeout" => {
                let secs: u64 = it.next().context("--idle-timeout SECS")?.parse().context("--idle-timeout SECS")?;
                opts.idle_timeout = Duration::from_secs(secs);
            }
            "--memory" => opts.memory_mib = it.next().context("--memory MIB")?.parse().context("--memory MIB")?,
            "--" => {
                opts.command = it.cloned().collect();
                break;
            }
            other => bail!("testhost: unknown option {other} (usage: cargo xtask testhost [--timeout SECS] [--idle-timeout SECS] [--memory MIB] -- CMD...)"),
        }
    }
    if opts.command.is_empty() {
        bail!("testhost: no command (cargo xtask testhost -- CMD...)");
    }
    Ok(opts)
}

/// Builds the test host kernel and initramfs; returns their paths.
pub fn build() -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = guest::root().join("target/guest");
    fs::create_dir_all(&dir)?;
    let kernel = dir.join("testhost-vmlinux");
    guest::kernel("testhost", &kernel)?;
    let initramfs = dir.join("testhost-initramfs.cpio.gz");
    let here = guest::root().join("xtask/testhost");
    let busybox = fs::read("/bin/busybox").context("read /bin/busybox (Debian busybox-static)")?;
    let init = fs::read(here.join("init"))?;
    let stage2 = fs::read(here.join("stage2"))?;
    let mut entries = cpio::base_entries();
    entries.extend([
        Entry::Dir {
            path: "bin",
            mode: 0o755,
        },
        Entry::File {
            path: "bin/busybox",
            mode: 0o755,
            data: &busybox,
        },
        Entry::File {
            path: "init",
            mode: 0o755,
            data: &init,
        },
        Entry::File {
            path: "stage2",
            mode: 0o644,
            data: &stage2,
        },
    ]);
    cpio::write_gz(&initramfs, &entries)?;
    Ok((kernel, initramfs))
}

/// Quotes a word for sh.
fn sh_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// The script the test host runs: our working directory, a few variables, then CMD.
fn command_script(cwd: &Path, command: &[String]) -> String {
    let mut script = String::from("set -u\n");
    for (key, value) in std::env::vars() {
        let passed =
            key.starts_with("RUST_") || key.starts_with("PANGOLIN_") || key == "CARGO_TERM_COLOR";
        if passed {
            script.push_str(&format!("export {key}={}\n", sh_quote(&value)));
        }
    }
    script.push_str(&format!(
        "cd {} || exit 125\n",
        sh_quote(&cwd.to_string_lossy())
    ));
    let words: Vec<String> = command.iter().map(|w| sh_quote(w)).collect();
    script.push_str(&words.join(" "));
    script.push('\n');
    script
}

/// This machine's TSC rate in kHz, measured against the monotonic clock over 100 ms.
fn host_tsc_khz() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        let t0 = Instant::now();
        // SAFETY: RDTSC reads a counter; it has no memory effects or preconditions.
        let c0 = unsafe { std::arch::x86_64::_rdtsc() };
        std::thread::sleep(Duration::from_millis(100));
        // SAFETY: as above.
        let c1 = unsafe { std::arch::x86_64::_rdtsc() };
        let ns = t0.elapsed().as_nanos();
        let khz = u128::from(c1.checked_sub(c0)?) * 1_000_000 / ns.max(1);
        u64::try_from(khz).ok().filter(|&k| k > 0)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Runs the command in a test host; returns its exit status.
pub fn run(args: &[String]) -> anyhow::Result<i32> {
    let opts = parse(args)?;
    let (kernel, initramfs) = build()?;
    let checkout = guest::root();
    let rundir = checkout
        .join("target/testhost")
        .join(format!("run-{}", std::process::id()));
    let _ = fs::remove_dir_all(&rundir);
    fs::create_dir_all(&rundir)?;
    let cwd = std::env::current_dir()?;
    fs::write(
        rundir.join("command.sh"),
        command_script(&cwd, &opts.command),
    )?;

    let mut cmdline = format!(
        "console=ttyS0 reboot=t panic=-1 quiet pangolin.checkout={} pangolin.rundir={}",
        checkout.display(),
        rundir.display()
    );
    // Under TCG the test host's TSC is this machine's (QEMU's RDTSC reads the host TSC), but
    // its kernel often fails to calibrate it (PIT polling is too jittery under emulation, and
    // microvm,acpi=off has no HPET/PM timer): it then runs with tsc_khz = 0, and its KVM never
    // enters a guest (kvm_guest_time_update() re-requests KVM_REQ_CLOCK_UPDATE forever, the
    // vCPU spins in KVM_RUN and the guest prints nothing). Tell it the rate instead.
    if let Some(khz) = host_tsc_khz() {
        cmdline.push_str(&format!(" tsc_early_khz={khz}"));
    }
    let mem = format!("{}M", opts.memory_mib);
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-M",
        "microvm,acpi=off,x-option-roms=off",
        "-accel",
        "tcg,thread=multi",
    ])
    .args(["-cpu", "EPYC-v3,+svm,+npt", "-smp", "1", "-m", &mem])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
    ])
    .arg("-kernel")
    .arg(&kernel)
    .arg("-initrd")
    .arg(&initramfs)
    .args(["-append", &cmdline])
    .args([
        "-fsdev",
        "local,id=hostroot,path=/,security_model=passthrough,readonly=on,multidevs=remap",
    ])
    .args([
        "-device",
        "virtio-9p-device,fsdev=hostroot,mount_tag=hostroot",
    ])
    .arg("-fsdev")
    .arg(format!(
        "local,id=checkout,path={},security_model=passthrough",
        checkout.display()
    ))
    .args([
        "-device",
        "virtio-9p-device,fsdev=checkout,mount_tag=checkout",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let started = Instant::now();
    let mut child = qemu
        .spawn()
        .context("starting qemu-system-x86_64 for the test host")?;
    let stdout = child.stdout.take().context("test host console")?;
    let (tx, rx) = mpsc::channel();
    let pump = std::thread::spawn(move || {
        let mut out = std::io::stdout();
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let line: Vec<u8> = line.into_iter().filter(|b| *b != b'\r').collect();
            let _ = out.write_all(&line);
            let _ = out.write_all(b"\n");
            let _ = out.flush();
            let _ = tx.send(Console::Line);
        }
        let _ = tx.send(Console::Closed);
    });
    let ended = watch_console(&rx, started, opts.timeout, opts.idle_timeout);
    if let Err(why) = &ended {
        let _ = child.kill();
        eprintln!("testhost: killed: {why}; the command did not finish");
    }
    let timed_out = ended.is_err();
    let _ = child.wait();
    let _ = pump.join();
    let status_file = rundir.join("status");
    let status = fs::read_to_string(&status_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    let _ = fs::remove_dir_all(&rundir);
    if timed_out {
        return Ok(EXIT_TIMEOUT);
    }
    match status {
        Some(code) => {
            eprintln!(
                "testhost: command exited {code} after {:.1} s",
                started.elapsed().as_secs_f64()
            );
            Ok(code)
        }
        None => bail!(
            "the test host stopped without reporting the command's status (see its console above)"
        ),
    }
}

/// What the console pump reports.
enum Console {
    /// A line went by.
    Line,
    /// The console closed: the test host is gone.
    Closed,
}

/// Waits for the console to close; `Err` saying why when the test host ran past `timeout`
/// (since `started`) or printed nothing for `idle`.
fn watch_console(
    rx: &mpsc::Receiver<Console>,
    started: Instant,
    timeout: Duration,
    idle: Duration,
) -> Result<(), String> {
    let mut last_line = Instant::now();
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        let quiet_left = idle.saturating_sub(last_line.elapsed());
        match rx.recv_timeout(left.min(quiet_left)) {
            Ok(Console::Line) => last_line = Instant::now(),
            Ok(Console::Closed) | Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            Err(mpsc::RecvTimeoutError::Timeout) if started.elapsed() >= timeout => {
                return Err(format!("ran past its {timeout:?} timeout"));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(format!(
                    "no console output for {idle:?} (the test host froze; --idle-timeout)"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_console_ends_the_wait_before_the_overall_timeout() {
        let (tx, rx) = mpsc::channel();
        let talker = std::thread::spawn(move || {
            for _ in 0..5 {
                std::thread::sleep(Duration::from_millis(20));
                let _ = tx.send(Console::Line);
            }
            // Then silence, with the console still open.
            std::thread::sleep(Duration::from_millis(500));
            drop(tx);
        });
        let t = Instant::now();
        let why = watch_console(&rx, t, Duration::from_secs(30), Duration::from_millis(150))
            .expect_err("idle");
        assert!(why.contains("no console output"), "{why}");
        assert!(t.elapsed() < Duration::from_secs(2));
        talker.join().expect("talker");
        let (tx, rx) = mpsc::channel();
        tx.send(Console::Closed).expect("send");
        assert_eq!(
            watch_console(
                &rx,
                Instant::now(),
                Duration::from_secs(5),
                Duration::from_secs(5)
            ),
            Ok(())
        );
        let (_tx, rx) = mpsc::channel::<Console>();
        let why = watch_console(
            &rx,
            Instant::now(),
            Duration::from_millis(50),
            Duration::from_secs(5),
        )
        .expect_err("timeout");
        assert!(why.contains("timeout"), "{why}");
    }

    #[test]
    fn options_and_command_are_parsed() {
        let args: Vec<String> = ["--timeout", "5", "--", "sh", "-c", "echo 'a b'"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let opts = parse(&args).expect("parse");
        assert_eq!(opts.timeout, Duration::from_secs(5));
        assert_eq!(opts.command, ["sh", "-c", "echo 'a b'"]);
        assert!(parse(&[]).is_err());
        assert!(parse(&["--bogus".to_string()]).is_err());
    }

    #[test]
    fn the_script_quotes_every_word() {
        let script = command_script(
            Path::new("/work/x y"),
            &["printf".into(), "%s\n".into(), "it's".into()],
        );
        assert!(script.contains("cd '/work/x y' || exit 125\n"), "{script}");
        assert!(script.ends_with("'printf' '%s\n' 'it'\\''s'\n"), "{script}");
    }
}
