//! Output files written atomically: a reader sees the old file or the whole new one, never a
//! partial one.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A failed [`write_atomically`]: the file, the step that failed and the system error (its
/// source, so not repeated in the message).
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} `{}`", .path.display())]
pub struct WriteError {
    /// The file to be written.
    pub path: PathBuf,
    /// The step: "create a temporary file for", "write", "flush to disk" or "replace".
    pub action: &'static str,
    /// The system error.
    #[source]
    pub source: io::Error,
}

/// Writes `bytes` to `path` atomically: into a new temporary file in `path`'s directory (the
/// same file system, so the rename is atomic), flushed to disk, then persisted (renamed) over
/// `path`. On error the temporary file is removed and `path` is untouched. The file gets the
/// permissions `File::create` would give it.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let error = |action| {
        move |source| WriteError {
            path: path.to_path_buf(),
            action,
            source,
        }
    };
    let name = path.file_name().ok_or_else(|| {
        error("write")(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path does not name a file",
        ))
    })?;
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    // `.<name>.XXXXXX`: hidden, and a crash's leftover says what it was for.
    let mut prefix = OsString::from(".");
    prefix.push(name);
    prefix.push(".");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix);
    // A temporary file is private (0600); an output file is as the umask allows.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut temp = builder
        .tempfile_in(dir)
        .map_err(error("create a temporary file for"))?;
    temp.write_all(bytes).map_err(error("write"))?;
    temp.as_file().sync_all().map_err(error("flush to disk"))?;
    temp.persist(path).map_err(|e| error("replace")(e.error))?;
    // Make the rename itself durable. Best effort: some platforms and file systems cannot open
    // or sync a directory, and the file at `path` is complete either way.
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn names(dir: &Path) -> Vec<OsString> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_file_is_written_or_replaced_without_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plan.bin");
        write_atomically(&path, b"first").unwrap();
        write_atomically(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(names(dir.path()), ["plan.bin"]);
    }

    #[test]
    fn a_failed_write_names_the_file_and_leaves_the_directory_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let taken = dir.path().join("taken");
        fs::create_dir(&taken).unwrap();
        fs::write(taken.join("inside"), b"kept").unwrap();
        let e = write_atomically(&taken, b"bytes").unwrap_err();
        assert_eq!(e.action, "replace");
        assert!(e.to_string().contains("taken"), "{e}");
        assert_eq!(names(dir.path()), ["taken"]);
        assert_eq!(fs::read(taken.join("inside")).unwrap(), b"kept");
        let missing = dir.path().join("missing/plan.bin");
        let e = write_atomically(&missing, b"bytes").unwrap_err();
        assert_eq!(e.action, "create a temporary file for");
        assert!(e.to_string().contains("missing/plan.bin"), "{e}");
        assert!(write_atomically(Path::new("/"), b"bytes").is_err());
    }

    #[cfg(unix)]
    #[test]
    fn the_file_gets_the_permissions_of_a_created_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode();
        let created = dir.path().join("created");
        File::create(&created).unwrap();
        let written = dir.path().join("written");
        write_atomically(&written, b"bytes").unwrap();
        assert_eq!(mode(&written), mode(&created));
    }
}
