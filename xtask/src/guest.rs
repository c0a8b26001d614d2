//! `cargo xtask guest`: the guest kernel, the static agent packed as an uncompressed initramfs, and a busybox
//! root filesystem for tests and the demo. Everything lands in `target/guest` and
//! `target/rootfs`; the kernel is cached outside the checkout by build-kernel.sh.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};

use crate::cpio::{self, Entry};

/// The only target this machine has; naming it keeps host build scripts free of +crt-static.
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Paths of the built artifacts the other tasks use (kernel and initramfs are found by
/// `pangolin` itself in `target/guest`).
pub struct Guest {
    /// target/rootfs/busybox
    pub rootfs: PathBuf,
}

/// The checkout's root directory.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Runs a command, failing with its name on a non-zero exit.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{:?} failed ({status})", cmd.get_program());
    }
    Ok(())
}

/// Builds a kernel variant (`guest` or `testhost`) into `out`.
pub fn kernel(variant: &str, out: &Path) -> anyhow::Result<()> {
    run(
        Command::new(root().join("guest-kernel-config/build-kernel.sh"))
            .arg(variant)
            .arg(out),
    )
}

/// Builds everything the guest needs.
pub fn build() -> anyhow::Result<Guest> {
    let root = root();
    let dir = root.join("target/guest");
    fs::create_dir_all(&dir)?;
    let t = Instant::now();
    let kernel_path = dir.join("vmlinux");
    kernel("guest", &kernel_path)?;
    let agent = build_agent(&root)?;
    let initramfs = dir.join("initramfs.cpio");
    pack_initramfs(&agent, &initramfs)?;
    let rootfs = busybox_rootfs(&root.join("target/rootfs/busybox"))?;
    eprintln!(
        "xtask: guest ready in {:.1} s: {}, {}",
        t.elapsed().as_secs_f64(),
        kernel_path.display(),
        initramfs.display()
    );
    Ok(Guest { rootfs })
}

fn build_agent(root: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--quiet",
            "--profile",
            "guest-agent",
            "-p",
            "pangolin-agent",
            "--target",
            TARGET,
        ])
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        .env("LIBSECCOMP_LINK_TYPE", "static")
        .env("LIBSECCOMP_LIB_PATH", "/usr/lib/x86_64-linux-gnu"))?;
    let bin = root
        .join("target")
        .join(TARGET)
        .join("guest-agent/pangolin-agent");
    if has_interpreter(&fs::read(&bin)?) {
        bail!(
            "{} is dynamically linked; the guest has no libc",
            bin.display()
        );
    }
    Ok(bin)
}

/// True if the ELF image has a PT_INTERP segment (needs a dynamic loader).
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return true;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return true;
    };
    (0..usize::from(phnum)).any(|i| {
        let off = phoff + i * usize::from(phentsize);
        elf.get(off..off + 4).is_some_and(|t| t == [3, 0, 0, 0])
    })
}

fn newer(a: &Path, than: &Path) -> bool {
    let m = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    matches!((m(a), m(than)), (Some(a), Some(b)) if a >= b)
}

fn pack_initramfs(agent: &Path, out: &Path) -> anyhow::Result<()> {
    if newer(out, agent) {
        return Ok(());
    }
    let data = fs::read(agent)?;
    let mut entries = cpio::base_entries();
    entries.extend([
        Entry::Dir {
            path: "run",
            mode: 0o755,
        },
        Entry::Dir {
            path: "tmp",
            mode: 0o1777,
        },
        Entry::File {
            path: "init",
            mode: 0o755,
            data: &data,
        },
    ]);
    // Uncompressed: a QEMU/TCG guest spent 120-170 ms inflating the gzip archive (the kernel
    // then copies the files out of either form).
    cpio::write_file(out, &entries)?;
    Ok(())
}

/// A root filesystem of Debian's static busybox with its applets linked.
pub fn busybox_rootfs(dir: &Path) -> anyhow::Result<PathBuf> {
    if dir.join("bin/sh").exists() {
        return Ok(dir.to_path_buf());
    }
    let tmp = dir.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    for sub in ["bin", "dev", "proc", "sys", "tmp", "etc", "root", "var/www"] {
        fs::create_dir_all(tmp.join(sub))?;
    }
    fs::copy("/bin/busybox", tmp.join("bin/busybox"))
        .context("copy /bin/busybox (Debian busybox-static)")?;
    let list = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .context("busybox --list")?;
    for applet in String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        std::os::unix::fs::symlink("busybox", tmp.join("bin").join(applet))?;
    }
    fs::write(
        tmp.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    fs::write(tmp.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir.parent().unwrap_or(Path::new("/")))?;
    fs::rename(&tmp, dir)?;
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_dynamic_binaries_are_told_apart() {
        let this = fs::read(std::env::current_exe().expect("exe")).expect("read");
        assert!(
            has_interpreter(&this),
            "test binaries are dynamically linked"
        );
        assert!(
            has_interpreter(b"garbage"),
            "unparsable counts as not static"
        );
    }
}
