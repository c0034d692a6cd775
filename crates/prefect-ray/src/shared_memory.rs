//! Large values between processes of one machine (an executor and its trampoline, the
//! bridge and the program): written to a file in `/dev/shm` and mapped by the other side,
//! instead of copied through a pipe (see PROTOCOL.md).

use std::fs::File;
use std::io::Write;

use crate::protocol::{FILE_LIMIT, IN_FILE};

/// A blob from the worker: in the frame, or, when large, mapped from a shared-memory file.
pub(crate) enum Blob {
    Inline(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl std::ops::Deref for Blob {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Blob::Inline(bytes) => bytes,
            Blob::Mapped(map) => map,
        }
    }
}

impl Blob {
    /// The blob of a frame's part: the part, or the file it names (which goes at once).
    pub(crate) fn open(part: Vec<u8>) -> std::io::Result<Blob> {
        let Some(path) = part.strip_prefix(&[IN_FILE]) else { return Ok(Blob::Inline(part)) };
        let path = std::path::PathBuf::from(String::from_utf8_lossy(path).into_owned());
        let file = File::open(&path)?;
        let _ = std::fs::remove_file(&path);
        // SAFETY: the file is ours alone: its writer handed it over and it is unlinked.
        Ok(Blob::Mapped(unsafe { memmap2::Mmap::map(&file)? }))
    }
}

/// Where shared-memory files go: `/dev/shm`, or the temporary directory without it.
fn shared_dir() -> std::path::PathBuf {
    let dir = std::path::Path::new("/dev/shm");
    if dir.is_dir() { dir.to_path_buf() } else { std::env::temp_dir() }
}

/// The name prefix of this process's files: every writer names its files
/// `prefect-ray-<pid>-...`, so whoever sees it die can remove what it left.
fn own_prefix() -> String {
    format!("prefect-ray-{}-", std::process::id())
}

/// Removes every shared-memory file this process wrote that is still there: for an
/// executor whose worker is gone, nobody will read them.
pub(crate) fn remove_own_files() {
    let prefix = own_prefix();
    let Ok(entries) = std::fs::read_dir(shared_dir()) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Writes a blob made of `slices` to a new shared-memory file; returns the part that names it.
pub(crate) fn write_shared(slices: &[&[u8]]) -> std::io::Result<Vec<u8>> {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let count = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = shared_dir().join(format!("{}{count}", own_prefix()));
    let mut file = std::io::BufWriter::with_capacity(1 << 20, File::create(&path)?);
    for slice in slices {
        file.write_all(slice)?;
    }
    file.flush()?;
    let mut reference = vec![IN_FILE];
    reference.extend_from_slice(path.to_string_lossy().as_bytes());
    Ok(reference)
}

/// The path a part made by [`write_shared`] names.
pub(crate) fn path_of(part: &[u8]) -> std::path::PathBuf {
    std::path::PathBuf::from(String::from_utf8_lossy(part.strip_prefix(&[IN_FILE]).unwrap_or(part)).into_owned())
}

/// A large value goes through a shared-memory file: returns the part that names it.
pub(crate) fn in_shared_file(tag: u8, body: &[u8]) -> Option<Vec<u8>> {
    if body.len() <= FILE_LIMIT {
        return None;
    }
    write_shared(&[&[tag], body])
        .inspect_err(|error| {
            eprintln!("prefect-ray executor: could not use shared memory ({error}); sending the value through the pipe")
        })
        .ok()
}
