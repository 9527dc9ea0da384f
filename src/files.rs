//! Files that must survive a crash whole: keys and certificates written by `tsa init` and
//! `tsa hsm`, tokens saved by `tsa request` and `tsa archive get`, the archive's state file
//! ([`replace`]); and the many files of `tsa archive export`, made durable at once
//! ([`sync_file_system`]).

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Permission bits for a private key: the owner alone reads it.
pub const SECRET: u32 = 0o600;
/// Permission bits for everything else (the umask applies).
pub const PUBLIC: u32 = 0o644;

/// Replaces `path` with `contents`, atomically and durably: written to a temporary file
/// beside it with permission bits `mode`, synced, renamed over `path`, and the directory
/// synced. A reader, or the file system after a crash, finds the old file or the new one,
/// never a part of either. A symbolic link at `path` is replaced, not followed.
pub fn replace(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    write_whole(path, contents, mode, |temporary, path| {
        std::fs::rename(temporary, path)
    })
}

/// [`replace`] where `replace` holds, else [`create`].
pub fn write(path: &Path, contents: &[u8], mode: u32, replace: bool) -> io::Result<()> {
    match replace {
        true => self::replace(path, contents, mode),
        false => create(path, contents, mode),
    }
}

/// [`replace`], but only where nothing is at `path` (not a file, not a link): an error of
/// kind `AlreadyExists` otherwise, and nothing there is touched. For files a user did not ask
/// to replace, made by another process (or written under another name that is the same file
/// on a case-insensitive file system) between a check and the write.
pub fn create(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    write_whole(path, contents, mode, |temporary, path| {
        rename_no_replace(temporary, path)
    })
}

/// Renames `from` to `to` unless something is at `to` (`renameat2`'s `RENAME_NOREPLACE`; a
/// hard link, then the removal of `from`, on a file system without it).
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))
    };
    let (from_c, to_c) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths, relative to the working directory.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if !matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EPERM | libc::EOPNOTSUPP)
    ) {
        return Err(e);
    }
    match std::fs::hard_link(from, to) {
        Ok(()) => std::fs::remove_file(from),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(e),
        // Neither (some FUSE and shared-folder file systems): the file is made at `to`
        // itself, never over one there; a crash may leave it part-written, as any file
        // written in place.
        Err(_) => {
            let contents = std::fs::read(from)?;
            let mode = std::fs::metadata(from)?.permissions();
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(to)?;
            file.set_permissions(mode)?;
            file.write_all(&contents)?;
            file.sync_all()?;
            std::fs::remove_file(from)
        }
    }
}

/// Writes `contents` to a temporary file beside `path` (mode `mode`), syncs it, puts it at
/// `path` with `place`, and syncs the directory.
fn write_whole(
    path: &Path,
    contents: &[u8],
    mode: u32,
    place: impl FnOnce(&Path, &Path) -> io::Result<()>,
) -> io::Result<()> {
    let dir = directory_of(path);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?;
    // Hidden, and of this process: two writers of the same file never share one.
    let mut temporary = OsString::from(".");
    temporary.push(name);
    temporary.push(format!(".{}.tmp", std::process::id()));
    let temporary = dir.join(temporary);
    // A leftover of this name (a crash of an earlier process of this id) is removed, and the
    // file is made anew, never opened through a link: so `mode` is the new file's, whoever
    // made the old one.
    match std::fs::remove_file(&temporary) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temporary)
            .map_err(|e| {
                // The directory must be writable, not only the file: say so.
                io::Error::new(
                    e.kind(),
                    format!("cannot create {} beside it: {e}", temporary.display()),
                )
            })?;
        file.write_all(contents)?;
        file.sync_all()?;
        place(&temporary, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written?;
    sync_directory(dir)
}

/// Refuses a secret (a key, a PIN file) opened as `file` that users other than its owner may
/// change, or users outside its group may read: the group may read it (mode 0640), for a
/// service that runs in that group. The mode is the open file's, so the file read is the file
/// checked.
pub fn ensure_private(file: &File, what: &dyn std::fmt::Display) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    let mode = file
        .metadata()
        .with_context(|| format!("cannot read the mode of {what}"))?
        .permissions()
        .mode();
    if mode & 0o037 != 0 {
        anyhow::bail!(
            "{what} is open to other users (mode {:04o}): chmod 600 it, or 640 with the \
             service's group",
            mode & 0o7777
        );
    }
    Ok(())
}

/// Makes the names in directory `dir` durable (files created, renamed or removed in it).
pub fn sync_directory(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The directory `path` is in: its parent, or `.` for a bare file name.
pub fn directory_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Octets an unprivileged writer may still allocate on the filesystem holding `dir`; `None`
/// when `statvfs` fails.
pub fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let dir = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `dir` is a NUL-terminated path and `stat` a zeroed statvfs that statvfs fills.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(dir.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

/// Makes everything written to the file system that holds `path` durable (`syncfs`): one
/// call for the many files of an export, where a sync of each would cost a disk flush apiece.
pub fn sync_file_system(path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let handle = File::open(path)?;
    // SAFETY: syncfs takes a file descriptor, here one that `handle` owns and keeps open.
    if unsafe { libc::syncfs(handle.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_the_file_whole_and_leaves_nothing_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tsa-cert.pem");
        std::fs::write(&path, "old").unwrap();
        replace(&path, b"new contents", PUBLIC).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new contents");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["tsa-cert.pem"], "no temporary file is left");
    }

    /// `create` writes where nothing is, and leaves a file or a link that is there as it was
    /// (and nothing beside it).
    #[test]
    fn create_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tsr");
        create(&path, b"first", PUBLIC).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        let again = create(&path, b"second", PUBLIC).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        let link = dir.path().join("b.tsr");
        std::os::unix::fs::symlink("nowhere", &link).unwrap();
        assert_eq!(
            create(&link, b"x", PUBLIC).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("nowhere"));
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["a.tsr", "b.tsr"], "no temporary file is left");
    }

    #[test]
    fn a_secret_is_readable_by_its_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tsa-key.pem");
        replace(&path, b"key", SECRET).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_leftover_temporary_file_or_link_does_not_decide_the_mode_or_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tsa-key.pem");
        let temporary = dir
            .path()
            .join(format!(".tsa-key.pem.{}.tmp", std::process::id()));
        std::fs::write(&temporary, "stale").unwrap();
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o644)).unwrap();
        replace(&path, b"key", SECRET).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, "untouched").unwrap();
        std::os::unix::fs::symlink(&elsewhere, &temporary).unwrap();
        replace(&path, b"key 2", SECRET).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"key 2");
        assert_eq!(std::fs::read(&elsewhere).unwrap(), b"untouched");
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
    }

    #[test]
    fn a_file_system_is_synced_through_any_path_on_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.tsr"), b"token").unwrap();
        sync_file_system(dir.path()).unwrap();
        sync_file_system(&dir.path().join("a.tsr")).unwrap();
        assert!(sync_file_system(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_directory_that_takes_no_new_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("tsa-cert.pem");
        let error = replace(&path, b"new", PUBLIC).unwrap_err();
        assert!(
            error.to_string().contains(".tsa-cert.pem."),
            "the temporary file is named: {error}"
        );
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should go: the rename fails.
        let path = dir.path().join("taken");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), "kept").unwrap();
        assert!(replace(&path, b"new", PUBLIC).is_err());
        assert_eq!(std::fs::read(path.join("inside")).unwrap(), b"kept");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
