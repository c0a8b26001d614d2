//! The state file: header (magic, version, payload length, CRC64) then the JSON payload of a
//! [`SnapshotFile`]. The layout and the order of the checks are in the [module primer](super).

use std::fmt;
use std::io::{Read, Write};

use crc::{Crc, CRC_64_ECMA_182};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};

use super::SnapshotError;
use crate::config::Fingerprint;

/// The first eight bytes of every state file.
pub const MAGIC: [u8; 8] = *b"PANGSNAP";
/// The format this VMM writes, and the newest it reads.
pub const VERSION: FormatVersion = FormatVersion { major: 1, minor: 0 };
/// Longest payload written or read: 64 MiB, far above a VM's register and device state, so that
/// a corrupt length cannot make the reader allocate without bound.
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// Bytes before the payload: magic, major, minor, length, CRC64.
const HEADER_LEN: usize = 8 + 2 + 2 + 8 + 8;

const CRC64: Crc<u64> = Crc::<u64>::new(&CRC_64_ECMA_182);

/// A state file's format version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FormatVersion {
    /// Changes that an older reader cannot read.
    pub major: u16,
    /// Additions that an older reader could not know (fields with serde defaults).
    pub minor: u16,
}

impl fmt::Display for FormatVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl FormatVersion {
    /// Whether a reader of version `self` reads a file of version `found`: the same major and
    /// a minor no newer than its own.
    pub fn reads(self, found: FormatVersion) -> bool {
        found.major == self.major && found.minor <= self.minor
    }
}

/// The payload: what the snapshot was taken from and the VM state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotFile<T> {
    /// What the snapshot was taken from.
    pub fingerprint: Fingerprint,
    /// The VM's state (vCPUs, VM, devices), as the code that saves it defines it.
    pub state: T,
}

/// [`SnapshotFile`] by reference, so that writing copies nothing.
#[derive(Serialize)]
struct SnapshotFileRef<'a, T> {
    fingerprint: &'a Fingerprint,
    state: &'a T,
}

/// Writes a state file: header, then the JSON of `fingerprint` and `state`.
///
/// # Errors
/// [`SnapshotError::Encode`] when `state` cannot be serialised, [`SnapshotError::Oversized`]
/// when its JSON is longer than [`MAX_PAYLOAD`], [`SnapshotError::Write`] when writing fails.
pub fn write_state<T: Serialize>(
    w: &mut impl Write,
    fingerprint: &Fingerprint,
    state: &T,
) -> Result<(), SnapshotError> {
    let payload = serde_json::to_vec(&SnapshotFileRef { fingerprint, state })
        .map_err(SnapshotError::Encode)?;
    let len = payload.len() as u64;
    if len > MAX_PAYLOAD {
        return Err(SnapshotError::Oversized {
            len,
            max: MAX_PAYLOAD,
        });
    }
    w.write_all(&header(VERSION, len, CRC64.checksum(&payload)))
        .and_then(|()| w.write_all(&payload))
        .and_then(|()| w.flush())
        .map_err(SnapshotError::Write)
}

/// Reads a state file taken from a VM whose fingerprint is `expected`, and returns its state.
///
/// # Errors
/// In the order checked: [`SnapshotError::BadMagic`], [`SnapshotError::Version`],
/// [`SnapshotError::Oversized`], [`SnapshotError::TruncatedHeader`] or
/// [`SnapshotError::TruncatedPayload`], [`SnapshotError::Checksum`], [`SnapshotError::Decode`]
/// (of the payload's outline), [`SnapshotError::Fingerprint`] naming the first field that differs,
/// then [`SnapshotError::Decode`] of the state. [`SnapshotError::Read`] when reading fails.
pub fn read_state<T: DeserializeOwned>(
    r: &mut impl Read,
    expected: &Fingerprint,
) -> Result<T, SnapshotError> {
    read_state_as(r, expected, VERSION)
}

/// Reads a state file without comparing its fingerprint to anything: for listing templates, or
/// for a caller that checks the fingerprint itself.
///
/// # Errors
/// As [`read_state`], without [`SnapshotError::Fingerprint`].
pub fn read_state_unchecked<T: DeserializeOwned>(
    r: &mut impl Read,
) -> Result<SnapshotFile<T>, SnapshotError> {
    decode(&read_payload(r, VERSION)?)
}

/// Reads only the fingerprint of a state file (the state is checksummed but not decoded).
///
/// # Errors
/// As [`read_state_unchecked`].
pub fn peek_fingerprint(r: &mut impl Read) -> Result<Fingerprint, SnapshotError> {
    read_state_unchecked::<IgnoredAny>(r).map(|file| file.fingerprint)
}

/// [`read_state`] for a reader of format `supported`.
fn read_state_as<T: DeserializeOwned>(
    r: &mut impl Read,
    expected: &Fingerprint,
    supported: FormatVersion,
) -> Result<T, SnapshotError> {
    let payload = read_payload(r, supported)?;
    // The state is decoded only once the fingerprint matches: a snapshot from another VMM build
    // is refused for that, not for a state field that build defined differently.
    let outline: SnapshotFile<IgnoredAny> = decode(&payload)?;
    if let Some(field) = outline.fingerprint.mismatch(expected) {
        return Err(SnapshotError::Fingerprint { field });
    }
    decode::<T>(&payload).map(|file| file.state)
}

fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<SnapshotFile<T>, SnapshotError> {
    serde_json::from_slice(payload).map_err(SnapshotError::Decode)
}

fn header(version: FormatVersion, len: u64, crc: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&version.major.to_le_bytes());
    h[10..12].copy_from_slice(&version.minor.to_le_bytes());
    h[12..20].copy_from_slice(&len.to_le_bytes());
    h[20..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The `N` header bytes at `at`.
fn field<const N: usize>(h: &[u8; HEADER_LEN], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&h[at..at + N]);
    out
}

/// Reads and checks the header, then reads the payload and checks its CRC.
fn read_payload(r: &mut impl Read, supported: FormatVersion) -> Result<Vec<u8>, SnapshotError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => SnapshotError::TruncatedHeader,
        _ => SnapshotError::Read(e),
    })?;
    let magic: [u8; 8] = field(&h, 0);
    if magic != MAGIC {
        return Err(SnapshotError::BadMagic { found: magic });
    }
    let found = FormatVersion {
        major: u16::from_le_bytes(field(&h, 8)),
        minor: u16::from_le_bytes(field(&h, 10)),
    };
    if !supported.reads(found) {
        return Err(SnapshotError::Version { found, supported });
    }
    let len = u64::from_le_bytes(field(&h, 12));
    let expected_crc = u64::from_le_bytes(field(&h, 20));
    let capacity = match usize::try_from(len) {
        Ok(n) if len <= MAX_PAYLOAD => n,
        _ => {
            return Err(SnapshotError::Oversized {
                len,
                max: MAX_PAYLOAD,
            })
        }
    };
    let mut payload = Vec::with_capacity(capacity);
    r.take(len)
        .read_to_end(&mut payload)
        .map_err(SnapshotError::Read)?;
    if payload.len() != capacity {
        return Err(SnapshotError::TruncatedPayload {
            expected: len,
            found: payload.len() as u64,
        });
    }
    let found_crc = CRC64.checksum(&payload);
    if found_crc != expected_crc {
        return Err(SnapshotError::Checksum {
            expected: expected_crc,
            found: found_crc,
        });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for the VM state the vCPU and device code define.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct State {
        regs: Vec<u64>,
        name: String,
        paused: bool,
    }

    fn state() -> State {
        State {
            regs: vec![0, 1, u64::MAX, 0xdead_beef],
            name: "vcpu0".into(),
            paused: true,
        }
    }

    fn fingerprint() -> Fingerprint {
        Fingerprint {
            kernel_sha256: "11".repeat(32),
            initramfs_sha256: None,
            vmm_sha256: "22".repeat(32),
            vcpus: 1,
            memory_mib: 128,
            cmdline: "console=ttyS0 reboot=k".into(),
            host_cpu: "Test CPU".into(),
            host_kernel: "6.1.0".into(),
        }
    }

    fn file() -> Vec<u8> {
        let mut out = Vec::new();
        write_state(&mut out, &fingerprint(), &state()).expect("write");
        out
    }

    fn read(bytes: &[u8]) -> Result<State, SnapshotError> {
        read_state(&mut &bytes[..], &fingerprint())
    }

    /// Rewrites the header's CRC after a payload edit, so that a later check is reached.
    fn reseal(bytes: &mut [u8]) {
        let crc = CRC64.checksum(&bytes[HEADER_LEN..]);
        bytes[20..28].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn state_round_trips() {
        let bytes = file();
        assert_eq!(&bytes[..8], b"PANGSNAP");
        assert_eq!(
            u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes")),
            u64::try_from(bytes.len() - HEADER_LEN).expect("len")
        );
        assert_eq!(read(&bytes).expect("read"), state());
        let whole: SnapshotFile<State> = read_state_unchecked(&mut &bytes[..]).expect("unchecked");
        assert_eq!(whole.fingerprint, fingerprint());
        assert_eq!(whole.state, state());
        assert_eq!(
            peek_fingerprint(&mut &bytes[..]).expect("peek"),
            fingerprint()
        );
    }

    #[test]
    fn bad_magic_is_refused() {
        let mut bytes = file();
        bytes[0] = b'X';
        assert!(matches!(
            read(&bytes),
            Err(SnapshotError::BadMagic { found }) if &found == b"XANGSNAP"
        ));
        assert!(matches!(
            peek_fingerprint(&mut &b"not a snapshot at all, longer than a header"[..]),
            Err(SnapshotError::BadMagic { .. })
        ));
    }

    #[test]
    fn another_major_is_refused() {
        let mut bytes = file();
        bytes[8..10].copy_from_slice(&2u16.to_le_bytes());
        let err = read(&bytes).expect_err("major 2");
        assert!(matches!(
            err,
            SnapshotError::Version {
                found: FormatVersion { major: 2, minor: 0 },
                supported: VERSION,
            }
        ));
        assert_eq!(
            err.to_string(),
            "snapshot format 2.0 is not readable by this VMM (format 1.0)"
        );
        bytes[8..10].copy_from_slice(&0u16.to_le_bytes());
        assert!(matches!(read(&bytes), Err(SnapshotError::Version { .. })));
    }

    #[test]
    fn newer_minor_is_refused() {
        let mut bytes = file();
        bytes[10..12].copy_from_slice(&1u16.to_le_bytes());
        assert!(matches!(
            read(&bytes),
            Err(SnapshotError::Version {
                found: FormatVersion { major: 1, minor: 1 },
                ..
            })
        ));
    }

    #[test]
    fn older_minor_is_read() {
        // Written as 1.0, read by a 1.2 reader.
        let reader = FormatVersion { major: 1, minor: 2 };
        let got: State =
            read_state_as(&mut &file()[..], &fingerprint(), reader).expect("older minor");
        assert_eq!(got, state());
        let mut bytes = file();
        bytes[10..12].copy_from_slice(&1u16.to_le_bytes());
        let got: State = read_state_as(&mut &bytes[..], &fingerprint(), reader).expect("1.1");
        assert_eq!(got, state());
        assert!(reader.reads(VERSION));
        assert!(!VERSION.reads(reader));
    }

    #[test]
    fn flipped_payload_byte_fails_the_checksum() {
        let bytes = file();
        for at in [HEADER_LEN, HEADER_LEN + 10, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x01;
            assert!(
                matches!(read(&bad), Err(SnapshotError::Checksum { .. })),
                "byte {at}"
            );
        }
        let mut bad = bytes;
        bad[20] ^= 0x80;
        assert!(matches!(read(&bad), Err(SnapshotError::Checksum { .. })));
    }

    #[test]
    fn truncated_file_is_refused() {
        let bytes = file();
        assert!(matches!(
            read(&bytes[..HEADER_LEN - 1]),
            Err(SnapshotError::TruncatedHeader)
        ));
        assert!(matches!(read(&[]), Err(SnapshotError::TruncatedHeader)));
        let payload = u64::try_from(bytes.len() - HEADER_LEN).expect("len");
        assert!(matches!(
            read(&bytes[..bytes.len() - 5]),
            Err(SnapshotError::TruncatedPayload { expected, found })
                if expected == payload && found == payload - 5
        ));
        assert!(matches!(
            read(&bytes[..HEADER_LEN]),
            Err(SnapshotError::TruncatedPayload { found: 0, .. })
        ));
    }

    #[test]
    fn oversized_length_is_refused_before_reading() {
        let mut bytes = file();
        for len in [MAX_PAYLOAD + 1, u64::MAX] {
            bytes[12..20].copy_from_slice(&len.to_le_bytes());
            assert!(matches!(
                read(&bytes),
                Err(SnapshotError::Oversized { len: l, max: MAX_PAYLOAD }) if l == len
            ));
        }
    }

    #[test]
    fn oversized_state_is_not_written() {
        let big = "a".repeat(usize::try_from(MAX_PAYLOAD).expect("fits"));
        let mut out = Vec::new();
        assert!(matches!(
            write_state(&mut out, &fingerprint(), &big),
            Err(SnapshotError::Oversized { .. })
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn mismatched_fingerprint_names_the_field() {
        let bytes = file();
        let mut other = fingerprint();
        other.host_kernel = "6.6.0".into();
        let err = read_state::<State>(&mut &bytes[..], &other).expect_err("mismatch");
        assert!(matches!(
            err,
            SnapshotError::Fingerprint {
                field: "host_kernel"
            }
        ));
        assert_eq!(err.to_string(), "snapshot taken with another host_kernel");
        other = fingerprint();
        other.memory_mib = 256;
        assert!(matches!(
            read_state::<State>(&mut &bytes[..], &other),
            Err(SnapshotError::Fingerprint {
                field: "memory_mib"
            })
        ));
    }

    #[test]
    fn fingerprint_is_checked_before_the_state_is_decoded() {
        #[derive(Debug, Deserialize)]
        struct OtherBuildState {
            #[allow(dead_code)]
            registers: Vec<u64>,
        }
        let bytes = file();
        let mut other = fingerprint();
        other.vmm_sha256 = "33".repeat(32);
        assert!(matches!(
            read_state::<OtherBuildState>(&mut &bytes[..], &other),
            Err(SnapshotError::Fingerprint {
                field: "vmm_sha256"
            })
        ));
        // Same fingerprint, state of another shape: a decode error.
        assert!(matches!(
            read_state::<OtherBuildState>(&mut &bytes[..], &fingerprint()),
            Err(SnapshotError::Decode(_))
        ));
    }

    #[test]
    fn payload_that_is_not_a_snapshot_fails_to_decode() {
        let mut bytes = file();
        bytes.truncate(HEADER_LEN);
        bytes.extend_from_slice(br#"{"state":1}"#);
        let len = u64::try_from(bytes.len() - HEADER_LEN).expect("len");
        bytes[12..20].copy_from_slice(&len.to_le_bytes());
        reseal(&mut bytes);
        assert!(matches!(read(&bytes), Err(SnapshotError::Decode(_))));
        assert!(matches!(
            peek_fingerprint(&mut &bytes[..]),
            Err(SnapshotError::Decode(_))
        ));
    }
}
