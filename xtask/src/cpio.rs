//! A minimal writer for the "newc" cpio format the kernel unpacks as an initramfs.

use std::io::{self, Write};

/// One archive entry.
pub enum Entry<'a> {
    /// A directory.
    Dir { path: &'a str, mode: u32 },
    /// A regular file with its contents.
    File {
        path: &'a str,
        mode: u32,
        data: &'a [u8],
    },
    /// A character device node.
    CharDev {
        path: &'a str,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

fn pad4(w: &mut impl Write, len: usize) -> io::Result<()> {
    let pad = (4 - len % 4) % 4;
    w.write_all(&[0u8; 3][..pad])
}

fn header(
    w: &mut impl Write,
    ino: u32,
    mode: u32,
    size: usize,
    rdev: (u32, u32),
    name: &str,
) -> io::Result<()> {
    let namesize = name.len() + 1;
    let size = u32::try_from(size).map_err(|_| io::Error::other("file too large for cpio"))?;
    let namesize32 = u32::try_from(namesize).map_err(|_| io::Error::other("name too long"))?;
    let nlink = if mode & 0o040000 != 0 { 2 } else { 1 };
    let fields = [
        ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize32, 0,
    ];
    let mut text = String::from("070701");
    for f in fields {
        text.push_str(&format!("{f:08X}"));
    }
    w.write_all(text.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad4(w, 110 + namesize)
}

/// Writes `entries` and the trailer.
pub fn write(w: &mut impl Write, entries: &[Entry<'_>]) -> io::Result<()> {
    let mut ino = 1u32;
    for e in entries {
        ino += 1;
        match e {
            Entry::Dir { path, mode } => header(w, ino, 0o040000 | mode, 0, (0, 0), path)?,
            Entry::File { path, mode, data } => {
                header(w, ino, 0o100000 | mode, data.len(), (0, 0), path)?;
                w.write_all(data)?;
                pad4(w, data.len())?;
            }
            Entry::CharDev {
                path,
                mode,
                major,
                minor,
            } => header(w, ino, 0o020000 | mode, 0, (*major, *minor), path)?,
        }
    }
    header(w, 0, 0, 0, (0, 0), "TRAILER!!!")
}

/// The nodes every initramfs of ours starts with: /dev (with the console the kernel opens for
/// init's stdio), /proc and /sys.
pub fn base_entries() -> Vec<Entry<'static>> {
    vec![
        Entry::Dir {
            path: "dev",
            mode: 0o755,
        },
        Entry::CharDev {
            path: "dev/console",
            mode: 0o600,
            major: 5,
            minor: 1,
        },
        Entry::Dir {
            path: "proc",
            mode: 0o555,
        },
        Entry::Dir {
            path: "sys",
            mode: 0o555,
        },
    ]
}

/// Writes an uncompressed archive to `out`, replacing it atomically.
pub fn write_file(out: &std::path::Path, entries: &[Entry<'_>]) -> io::Result<()> {
    let tmp = out.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = io::BufWriter::new(std::fs::File::create(&tmp)?);
    write(&mut file, entries)?;
    file.flush()?;
    std::fs::rename(&tmp, out)
}

/// Writes a gzip-compressed archive to `out`, replacing it atomically.
pub fn write_gz(out: &std::path::Path, entries: &[Entry<'_>]) -> io::Result<()> {
    let tmp = out.with_extension(format!("tmp.{}", std::process::id()));
    let file = std::fs::File::create(&tmp)?;
    let mut gz =
        flate2::write::GzEncoder::new(io::BufWriter::new(file), flate2::Compression::fast());
    write(&mut gz, entries)?;
    gz.finish()?.flush()?;
    std::fs::rename(&tmp, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_terminated() {
        let mut out = Vec::new();
        write(
            &mut out,
            &[
                Entry::Dir {
                    path: "dev",
                    mode: 0o755,
                },
                Entry::File {
                    path: "init",
                    mode: 0o755,
                    data: b"abcde",
                },
            ],
        )
        .expect("write");
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("init\0") && text.contains("abcde") && text.contains("TRAILER!!!\0"));
    }

    #[test]
    fn a_file_archive_is_the_plain_archive_and_replaces_the_old_one() {
        let dir = std::env::temp_dir().join(format!("pangolin-cpio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let out = dir.join("initramfs.cpio");
        std::fs::write(&out, b"old").expect("old");
        let entries = [Entry::File {
            path: "init",
            mode: 0o755,
            data: b"abcde",
        }];
        write_file(&out, &entries).expect("write_file");
        let mut plain = Vec::new();
        write(&mut plain, &entries).expect("write");
        assert_eq!(std::fs::read(&out).expect("read"), plain);
        let left: Vec<_> = std::fs::read_dir(&dir).expect("ls").collect();
        assert_eq!(left.len(), 1, "no temporary file left: {left:?}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
