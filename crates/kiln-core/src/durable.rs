//! Publishing files so that a crash, even a power loss, never leaves a half-written one under its real name.
//!
//! A file or a directory of files is written under a temporary name, then renamed to its real one. The rename
//! alone makes it appear whole to other processes, but not after a power loss or a kernel crash: the filesystem
//! may persist the rename before the data, leaving an empty or partial file under the real name. So [`publish`]
//! first flushes everything written to disk (each file, then the temporary directory itself, which records the
//! files' names), then renames, then flushes the directory that holds the real name, which records the rename.

use crate::{Error, Result};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Flushes `written` (a file, or a directory and everything in it) to disk, renames it to `to`, and flushes `to`'s
/// directory, so that once this returns `to` holds what was written, whole, whatever happens next. A file replaces
/// one already at `to`; a directory cannot replace a non-empty one, so its caller removes that first.
pub fn publish(written: &Path, to: &Path) -> Result<()> {
    sync_tree(written)?;
    std::fs::rename(written, to).map_err(|e| Error::io(to, e))?;
    let parent = to.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    sync_directory(parent)
}

/// Creates the directory `dir` and any above it that are missing. A file where a directory must be is a usage
/// error naming `what` the user called it (`train.out_dir`, `--out`), since it can only be a wrong path.
pub fn create_dir(dir: &Path, what: &str) -> Result<()> {
    if let Some(file) = dir.ancestors().find(|a| a.is_file()) {
        let message = format!("{what} = {}: {} is a file, not a directory", dir.display(), file.display());
        return Err(Error::Usage(message));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// Writes `bytes` to a temporary file beside `path` and [`publish`]es it as `path`: readers see the old file or
/// the new one, never part of one.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary_name(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    publish(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// `path` with `.tmp-PID-N` appended: unique to this process and this write, so that neither two processes nor two
/// threads writing the same file (kernels compiled into a shared cache, say) write into one temporary file.
fn temporary_name(path: &Path) -> PathBuf {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".tmp-{}-{}", std::process::id(), WRITES.fetch_add(1, Ordering::Relaxed)));
    PathBuf::from(name)
}

fn sync_tree(path: &Path) -> Result<()> {
    let io = |e| Error::io(path, e);
    if !std::fs::symlink_metadata(path).map_err(io)?.is_dir() {
        return File::open(path).and_then(|f| f.sync_all()).map_err(io);
    }
    for entry in std::fs::read_dir(path).map_err(io)? {
        sync_tree(&entry.map_err(io)?.path())?;
    }
    sync_directory(path)
}

fn sync_directory(dir: &Path) -> Result<()> {
    match File::open(dir).and_then(|d| d.sync_all()) {
        // Some filesystems cannot flush a directory (EINVAL); there the rename is as durable as they make it.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
        result => result.map_err(|e| Error::io(dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-durable-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn a_written_file_replaces_the_old_one_and_leaves_no_temporary() {
        let dir = scratch("file");
        let path = dir.join("config.toml");
        write(&path, b"old").unwrap();
        write(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(names(&dir), ["config.toml"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_directory_is_published_whole() {
        let dir = scratch("dir");
        let tmp = dir.join(".tmp-step");
        std::fs::create_dir_all(tmp.join("inner")).unwrap();
        std::fs::write(tmp.join("a.json"), "{}").unwrap();
        std::fs::write(tmp.join("inner/b.bin"), [1, 2, 3]).unwrap();
        publish(&tmp, &dir.join("step")).unwrap();
        assert_eq!(names(&dir), ["step"]);
        assert_eq!(names(&dir.join("step")), ["a.json", "inner"]);
        assert_eq!(std::fs::read(dir.join("step/inner/b.bin")).unwrap(), [1, 2, 3]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_directory_where_a_file_is_is_a_usage_error_naming_the_setting() {
        let dir = scratch("in-the-way");
        std::fs::write(dir.join("file"), "mine").unwrap();
        for wanted in [dir.join("file"), dir.join("file/run")] {
            match create_dir(&wanted, "train.out_dir") {
                Err(Error::Usage(message)) => {
                    assert!(message.starts_with("train.out_dir = ") && message.contains("is a file"), "{message}")
                }
                other => panic!("expected a usage error, got {other:?}"),
            }
        }
        create_dir(&dir.join("a/b"), "train.out_dir").unwrap();
        assert!(dir.join("a/b").is_dir());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_write_names_the_file_and_leaves_nothing() {
        let dir = scratch("fail");
        // A directory cannot be replaced by a file: the rename fails after the temporary file is written.
        std::fs::create_dir_all(dir.join("taken/x")).unwrap();
        let err = write(&dir.join("taken"), b"bytes").unwrap_err();
        assert!(matches!(&err, Error::Io { path, .. } if path.ends_with("taken")), "{err}");
        assert_eq!(names(&dir), ["taken"]);
        let err = publish(&dir.join("missing"), &dir.join("elsewhere")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
