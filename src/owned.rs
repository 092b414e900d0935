//! Local files are ours: the directories and files cascade trusts (the runtime directory with
//! the directory origins' Unix sockets, the precompiled plugin cache) must be owned by the
//! user cascade runs as and writable by nobody else, or another local user could swap a
//! socket or plant machine code that cascade would run.
//!
//! - [`check`] tells what is wrong with an existing path (not ours, writable by group or
//!   others, a symbolic link, not the kind expected);
//! - [`ensure_dir`] creates a missing directory 0700 or checks an existing one;
//! - [`fresh_dir`] makes a new private directory (mkdtemp-like, 0700) that
//!   [`remove_at_exit`] removes when the process exits.

use std::fs::Metadata;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The user cascade runs as.
pub fn uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Why `meta` (of `path`) cannot be trusted, or `None` when it is a directory (`dir`) or a
/// regular file owned by us and not writable by group or others. A symbolic link is refused
/// (take `meta` with `symlink_metadata`): it could be pointed elsewhere later.
pub fn untrusted(meta: &Metadata, dir: bool) -> Option<String> {
    let kind = meta.file_type();
    if kind.is_symlink() {
        return Some("is a symbolic link".into());
    }
    if dir && !kind.is_dir() {
        return Some("is not a directory".into());
    }
    if !dir && !kind.is_file() {
        return Some("is not a regular file".into());
    }
    if meta.uid() != uid() {
        return Some(format!(
            "is owned by uid {}, not by cascade's uid {}",
            meta.uid(),
            uid()
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Some(format!(
            "is writable by its group or by others (mode {mode:04o})"
        ));
    }
    None
}

/// [`untrusted`] of the directory (`dir`) or file at `path`, as an error naming it.
pub fn check(path: &Path, dir: bool) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    match untrusted(&meta, dir) {
        None => Ok(()),
        Some(why) => Err(format!("{} {why}", path.display())),
    }
}

/// Creates directory `path` (and missing parents) with mode 0700, or checks an existing one
/// with [`check`].
pub fn ensure_dir(path: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => check(path, true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            // Whatever the umask did, and whoever won a race to create it.
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
            check(path, true)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// A new private directory `<parent>/<prefix>-<pid>-<random>`, mode 0700 (created, never
/// reused: an existing name is skipped).
pub fn fresh_dir(parent: &Path, prefix: &str) -> Result<PathBuf, String> {
    let mut last = None;
    for _ in 0..16 {
        let mut r = [0u8; 6];
        getrandom::getrandom(&mut r)
            .map_err(|e| format!("no randomness for a directory name: {e}"))?;
        let suffix: String = r.iter().map(|b| format!("{b:02x}")).collect();
        let path = parent.join(format!("{prefix}-{}-{suffix}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {
                check(&path, true)?;
                return Ok(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
        }
    }
    Err(format!(
        "cannot create a fresh directory in {}: {}",
        parent.display(),
        last.map_or_else(String::new, |e| e.to_string())
    ))
}

static AT_EXIT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

extern "C" fn remove_registered() {
    let dirs = AT_EXIT
        .lock()
        .map(|mut d| std::mem::take(&mut *d))
        .unwrap_or_default();
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Removes directory `path` (and what is in it) when the process exits normally, including
/// through `std::process::exit` (Pingora's way out): an atexit hook.
pub fn remove_at_exit(path: PathBuf) {
    let Ok(mut dirs) = AT_EXIT.lock() else { return };
    if dirs.is_empty() {
        // SAFETY: registers a plain `extern "C" fn()`; it only touches a static and the
        // file system.
        unsafe { libc::atexit(remove_registered) };
    }
    dirs.push(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn missing_directories_are_created_private_and_existing_ones_checked() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b/run");
        ensure_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        ensure_dir(&d).expect("an existing private directory is fine");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_dir(&d).expect("readable by others is fine, writable is not");
        for m in [0o777, 0o770, 0o702] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(m)).unwrap();
            let e = ensure_dir(&d).unwrap_err();
            assert!(
                e.contains(&d.display().to_string())
                    && e.contains("writable by its group or by others"),
                "{e}"
            );
        }
        // A symbolic link, even to a good directory, and a file.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        assert!(ensure_dir(&link).unwrap_err().contains("symbolic link"));
        let f = t.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        assert!(ensure_dir(&f).unwrap_err().contains("not a directory"));
        assert!(check(&f, false).is_ok());
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("theirs");
        std::fs::DirBuilder::new().mode(0o700).create(&d).unwrap();
        if std::os::unix::fs::chown(&d, Some(65534), None).is_err() {
            eprintln!("skipped: not allowed to chown (not root)");
            return;
        }
        let e = ensure_dir(&d).unwrap_err();
        assert!(e.contains("owned by uid 65534"), "{e}");
    }

    #[test]
    fn fresh_directories_are_new_private_and_removed_at_exit_hook() {
        let t = tempfile::tempdir().unwrap();
        let a = fresh_dir(t.path(), "cascade").unwrap();
        let b = fresh_dir(t.path(), "cascade").unwrap();
        assert_ne!(a, b);
        assert_eq!(mode(&a), 0o700);
        std::fs::write(a.join("sock"), b"").unwrap();
        AT_EXIT.lock().unwrap().push(a.clone());
        remove_registered();
        assert!(!a.exists() && b.exists());
    }
}
