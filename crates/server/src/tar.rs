//! A folder's files as a tar archive, streamed: a merged checkpoint can be many gigabytes, so
//! it is never held in memory (the adapter's zip is; an adapter is small). Plain POSIX ustar
//! headers, with GNU's base-256 size field for a file of 8 GiB or more, which GNU tar, bsdtar
//! and Python's tarfile all read; the archive's length is known before it is sent.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Bytes of a header, and the unit every member is padded to.
const BLOCK: u64 = 512;

/// A regular file of the archive: its name inside it and its length.
pub struct Member {
    pub name: String,
    pub path: PathBuf,
    pub len: u64,
}

/// The regular files of `dir` (not its subfolders), by name, each under `folder/` in the
/// archive; names must fit a ustar header (100 bytes).
pub fn members(dir: &Path, folder: &str) -> std::io::Result<Vec<Member>> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        let Some(file) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let name = format!("{folder}/{file}");
        if meta.is_file() && name.len() < 100 {
            members.push(Member {
                name,
                path: entry.path(),
                len: meta.len(),
            });
        }
    }
    members.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(members)
}

/// The bytes the archive of `members` takes: a header and the padded data of each, then two
/// zero blocks.
pub fn archive_len(members: &[Member]) -> u64 {
    members
        .iter()
        .map(|m| BLOCK + m.len.div_ceil(BLOCK) * BLOCK)
        .sum::<u64>()
        + 2 * BLOCK
}

/// A ustar header for a regular file `name` of `len` bytes (mode 0644, owner 0, time 0).
pub fn header(name: &str, len: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(&size_field(len));
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    // The checksum is the sum of the header's bytes with its own field read as spaces.
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// Eleven octal digits and a NUL below 8 GiB; above, GNU's base-256: a leading 0x80 and the
/// length big-endian in the other eleven bytes.
fn size_field(len: u64) -> [u8; 12] {
    let mut field = [0u8; 12];
    if len < 1 << 33 {
        field.copy_from_slice(format!("{len:011o}\0").as_bytes());
    } else {
        field[0] = 0x80;
        field[4..].copy_from_slice(&len.to_be_bytes());
    }
    field
}

/// Writes the archive through `send`, a chunk at a time (reading each file in 1 MiB pieces);
/// stops early, with `Ok(false)`, when `send` says the reader is gone.
pub fn stream(members: &[Member], mut send: impl FnMut(Vec<u8>) -> bool) -> std::io::Result<bool> {
    const CHUNK: usize = 1 << 20;
    for member in members {
        if !send(header(&member.name, member.len).to_vec()) {
            return Ok(false);
        }
        let mut file = std::fs::File::open(&member.path)?.take(member.len);
        let mut written = 0u64;
        loop {
            let mut chunk = vec![0u8; CHUNK];
            let n = file.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            chunk.truncate(n);
            written += n as u64;
            if !send(chunk) {
                return Ok(false);
            }
        }
        if written != member.len {
            return Err(std::io::Error::other(format!(
                "{} changed while it was sent ({written} of {} bytes)",
                member.path.display(),
                member.len
            )));
        }
        let pad = (member.len.div_ceil(BLOCK) * BLOCK - member.len) as usize;
        if pad > 0 && !send(vec![0u8; pad]) {
            return Ok(false);
        }
    }
    Ok(send(vec![0u8; 2 * BLOCK as usize]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian's GNU tar lists and extracts what `stream` writes, byte for byte, and the
    /// archive is as long as `archive_len` says.
    #[test]
    fn gnu_tar_reads_the_archive_back() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("merged-bf16");
        std::fs::create_dir(&folder).unwrap();
        let contents: [(&str, Vec<u8>); 3] = [
            ("config.json", b"{\"a\": 1}".to_vec()),
            ("empty.txt", Vec::new()),
            (
                "model.safetensors",
                (0..1_300_000u32).map(|i| i as u8).collect(),
            ),
        ];
        for (name, bytes) in &contents {
            std::fs::write(folder.join(name), bytes).unwrap();
        }
        std::fs::create_dir(folder.join("sub")).unwrap();
        let members = members(&folder, "job-3-merged-bf16").unwrap();
        assert_eq!(members.len(), 3, "files only, not folders");
        let mut archive = Vec::new();
        assert!(
            stream(&members, |chunk| {
                archive.extend(chunk);
                true
            })
            .unwrap()
        );
        assert_eq!(archive.len() as u64, archive_len(&members));
        let tar_file = dir.path().join("out.tar");
        std::fs::write(&tar_file, &archive).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let status = std::process::Command::new("tar")
            .arg("-xf")
            .arg(&tar_file)
            .arg("-C")
            .arg(&out)
            .status()
            .expect("tar (Debian's, in every image)");
        assert!(status.success());
        for (name, bytes) in &contents {
            let read = std::fs::read(out.join("job-3-merged-bf16").join(name)).unwrap();
            assert_eq!(&read, bytes, "{name}");
        }
    }

    #[test]
    fn sizes_of_8_gib_and_more_are_base_256() {
        assert_eq!(&size_field(8)[..], b"00000000010\0");
        let big = size_field(9 << 30);
        assert_eq!(big[0], 0x80);
        assert_eq!(u64::from_be_bytes(big[4..].try_into().unwrap()), 9 << 30);
    }

    #[test]
    fn a_reader_that_goes_away_stops_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 3 << 20]).unwrap();
        let members = members(dir.path(), "x").unwrap();
        let mut sent = 0;
        let finished = stream(&members, |_| {
            sent += 1;
            sent < 2
        })
        .unwrap();
        assert!(!finished);
        assert_eq!(sent, 2, "nothing more after the refusal");
    }
}
