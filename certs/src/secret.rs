//! Secret files: written atomically with mode 0600 inside a 0700 directory, and refused
//! on read when other users can access them (with a message naming the file and the fix).

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Why a secret file could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretFileError {
    /// Filesystem error.
    #[error("{path}: {source}")]
    Io {
        /// File or directory concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file can be read or written by every user on the machine.
    #[error(
        "{path} is accessible to other users (mode {mode:04o}); run `chmod 600 {path}` (or 640 with a dedicated group)"
    )]
    WorldAccessible {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SecretFileError + '_ {
    move |source| SecretFileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates `dir` (and parents) with mode 0700 if it does not exist. An existing
/// directory is left as it is: the operator may have chosen its mode.
///
/// # Errors
/// [`SecretFileError::Io`].
pub fn ensure_private_dir(dir: &Path) -> Result<(), SecretFileError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

/// Writes a secret atomically (temporary file, fsync, rename) with mode 0600, creating
/// the parent directory with mode 0700 if needed. An existing file is replaced.
///
/// # Errors
/// [`SecretFileError::Io`].
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), SecretFileError> {
    ensure_private_dir(path.parent().unwrap_or_else(|| Path::new(".")))?;
    write_atomic(path, contents, 0o600, Finish::Replace)
}

/// Like [`write_secret_file`], but never replaces a file: when `path` exists (another
/// writer got there first, even at the same instant), the error's source has kind
/// [`std::io::ErrorKind::AlreadyExists`] and the existing file is untouched.
///
/// # Errors
/// [`SecretFileError::Io`].
pub fn create_secret_file(path: &Path, contents: &[u8]) -> Result<(), SecretFileError> {
    ensure_private_dir(path.parent().unwrap_or_else(|| Path::new(".")))?;
    write_atomic(path, contents, 0o600, Finish::NoReplace)
}

/// Whether a secret-file error means the file already existed.
#[must_use]
pub fn already_exists(e: &SecretFileError) -> bool {
    matches!(e, SecretFileError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists)
}

/// Writes a non-secret file (a certificate) atomically with mode 0644, so a crash never
/// leaves a half-written certificate next to its key. The parent directory must exist.
pub(crate) fn write_public_file(path: &Path, contents: &[u8]) -> Result<(), SecretFileError> {
    write_atomic(path, contents, 0o644, Finish::Replace)
}

/// How the temporary file becomes `path`.
#[derive(Clone, Copy)]
enum Finish {
    /// `rename`: an existing file is replaced.
    Replace,
    /// `link` then unlink: fails when `path` exists.
    NoReplace,
}

/// Temporary file, fsync, then rename (or link) into place, then fsync of the directory.
/// The temporary name is unique per call (process id and a counter): writers in one
/// process never share, or remove, each other's temporary file.
fn write_atomic(
    path: &Path,
    contents: &[u8],
    mode: u32,
    finish: Finish,
) -> Result<(), SecretFileError> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}.{seq}", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    let result = (|| {
        f.write_all(contents)?;
        f.sync_all()?;
        match finish {
            Finish::Replace => fs::rename(&tmp, path)?,
            Finish::NoReplace => {
                let linked = fs::hard_link(&tmp, path);
                let _ = fs::remove_file(&tmp);
                linked?;
            }
        }
        // Make the rename (or link) itself durable.
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io(path))
}

/// Reads a secret file, refusing it when other users can access it.
///
/// # Errors
/// [`SecretFileError::WorldAccessible`] or [`SecretFileError::Io`].
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, SecretFileError> {
    check_not_world_accessible(path)?;
    fs::read(path).map_err(io(path))
}

/// Refuses a file whose "other" permission bits are set.
///
/// # Errors
/// [`SecretFileError::WorldAccessible`] or [`SecretFileError::Io`].
pub fn check_not_world_accessible(path: &Path) -> Result<(), SecretFileError> {
    let mode = fs::metadata(path).map_err(io(path))?.permissions().mode() & 0o7777;
    if mode & 0o007 != 0 {
        return Err(SecretFileError::WorldAccessible {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_secrets_are_private_and_readable_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/owner.key");
        write_secret_file(&path, b"s3cret").unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        assert_eq!(read_secret_file(&path).unwrap(), b"s3cret");
        // Replacing keeps it private.
        write_secret_file(&path, b"new").unwrap();
        assert_eq!(read_secret_file(&path).unwrap(), b"new");
    }

    /// Writers racing in one process (two threads adopting the same replica) never
    /// remove each other's temporary file; with `create_secret_file` exactly one wins
    /// and the others see `AlreadyExists`, the winner's key untouched.
    #[test]
    fn concurrent_writers_do_not_collide() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/race.key");
        let results: Vec<Result<(), SecretFileError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8u8)
                .map(|i| {
                    let path = &path;
                    s.spawn(move || create_secret_file(path, &[b'a' + i]))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let won: Vec<usize> = (0..8).filter(|i| results[*i].is_ok()).collect();
        assert_eq!(won.len(), 1, "{results:?}");
        assert!(
            results
                .iter()
                .filter(|r| r.is_err())
                .all(|r| already_exists(r.as_ref().unwrap_err())),
            "{results:?}"
        );
        let winner = u8::try_from(won[0]).unwrap();
        assert_eq!(read_secret_file(&path).unwrap(), [b'a' + winner]);
        // Replacing writers racing each other all succeed; one of them is what remains.
        std::thread::scope(|s| {
            for i in 0..8u8 {
                let path = &path;
                s.spawn(move || write_secret_file(path, &[b'A' + i]).unwrap());
            }
        });
        assert!(read_secret_file(&path).unwrap()[0].is_ascii_uppercase());
        // No temporary file is left behind.
        let left: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }

    #[test]
    fn world_readable_secrets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        fs::write(&path, b"x").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret_file(&path).unwrap_err();
        assert!(matches!(
            err,
            SecretFileError::WorldAccessible { mode: 0o644, .. }
        ));
        assert!(err.to_string().contains("chmod 600"));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(read_secret_file(&path).is_ok());
    }
}
