//! Files on the host through Arm semihosting (SYS_OPEN, SYS_FLEN, SYS_READ, SYS_WRITE,
//! SYS_CLOSE; "Semihosting for AArch32 and AArch64", Arm IHI 0071): the firmware's data path
//! under QEMU. Paths are relative to the directory QEMU runs in.

use core::ffi::CStr;
use core::fmt;

use cortex_m_semihosting::{nr, syscall};
#[cfg(mcutrain_plan)]
use mcutrain_core::session::{Link, LinkError};

use crate::error::FirmwareError;

/// An open host file, closed on drop.
pub struct HostFile {
    handle: usize,
    path: &'static CStr,
}

impl HostFile {
    fn open(path: &'static CStr, mode: usize) -> Result<Self, FirmwareError> {
        // SAFETY: SYS_OPEN reads the nul-terminated path (pointer and length without the nul)
        // during the call only; `path` outlives it.
        let handle = unsafe { syscall!(OPEN, path.as_ptr(), mode, path.count_bytes()) };
        if handle as isize == -1 {
            return Err(FirmwareError::Open(path));
        }
        Ok(HostFile { handle, path })
    }

    /// Creates (or truncates) a binary file for writing.
    pub fn create(path: &'static CStr) -> Result<Self, FirmwareError> {
        Self::open(path, nr::open::W_TRUNC_BINARY)
    }

    /// Opens a binary file for reading from its start.
    #[cfg(mcutrain_plan)]
    pub fn open_read(path: &'static CStr) -> Result<Self, FirmwareError> {
        Self::open(path, nr::open::R_BINARY)
    }

    /// Fills `buffer` with the next bytes of the file (`false` when it ended first).
    #[cfg(mcutrain_plan)]
    pub fn read_exact(&mut self, buffer: &mut [u8]) -> Result<bool, FirmwareError> {
        let mut done = 0;
        while done < buffer.len() {
            let rest = &mut buffer[done..];
            // SAFETY: SYS_READ writes at most `rest.len()` bytes into `rest` during the call
            // and returns how many it did not write.
            let not_read = unsafe { syscall!(READ, self.handle, rest.as_mut_ptr(), rest.len()) };
            if not_read > rest.len() {
                return Err(FirmwareError::Read(self.path));
            }
            if not_read == rest.len() {
                return Ok(false);
            }
            done += rest.len() - not_read;
        }
        Ok(true)
    }

    /// Writes all of `bytes`.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<(), FirmwareError> {
        // SAFETY: SYS_WRITE reads `bytes` (pointer and length) during the call only.
        let not_written = unsafe { syscall!(WRITE, self.handle, bytes.as_ptr(), bytes.len()) };
        if not_written != 0 {
            return Err(FirmwareError::Write);
        }
        Ok(())
    }
}

impl fmt::Write for HostFile {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_all(s.as_bytes()).map_err(|_| fmt::Error)
    }
}

impl Drop for HostFile {
    fn drop(&mut self) {
        // SAFETY: the handle came from SYS_OPEN and is closed only here.
        unsafe { syscall!(CLOSE, self.handle) };
    }
}

/// The session through two host files: `session.bin` in, `results.bin` out (QEMU's
/// working directory).
#[cfg(mcutrain_plan)]
pub struct FileLink {
    session: HostFile,
    results: HostFile,
}

#[cfg(mcutrain_plan)]
impl FileLink {
    /// Opens `session.bin` and creates `results.bin`.
    pub fn open() -> Result<Self, FirmwareError> {
        Ok(FileLink {
            session: HostFile::open_read(c"session.bin")?,
            results: HostFile::create(c"results.bin")?,
        })
    }
}

#[cfg(mcutrain_plan)]
impl Link for FileLink {
    fn read_exact(&mut self, buffer: &mut [u8]) -> Result<(), LinkError> {
        match self.session.read_exact(buffer) {
            Ok(true) => Ok(()),
            Ok(false) => Err(LinkError::EndOfInput),
            Err(_) => Err(LinkError::Read),
        }
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        self.results.write_all(bytes).map_err(|_| LinkError::Write)
    }
}

/// Reads the whole binary file `path` into the front of `buffer` and returns that part.
#[cfg(not(mcutrain_plan))]
pub fn read_file<'a>(path: &'static CStr, buffer: &'a mut [u8]) -> Result<&'a [u8], FirmwareError> {
    let file = HostFile::open(path, nr::open::R_BINARY)?;
    // SAFETY: SYS_FLEN takes the open handle and touches no memory of ours.
    let len = unsafe { syscall!(FLEN, file.handle) };
    if len as isize == -1 {
        return Err(FirmwareError::Read(file.path));
    }
    let capacity = buffer.len();
    let contents = buffer.get_mut(..len).ok_or(FirmwareError::TooLarge {
        file: path,
        bytes: len,
        capacity,
    })?;
    // SAFETY: SYS_READ writes at most `contents.len()` bytes into `contents` during the call.
    let not_read = unsafe { syscall!(READ, file.handle, contents.as_mut_ptr(), contents.len()) };
    if not_read != 0 {
        return Err(FirmwareError::Read(file.path));
    }
    Ok(contents)
}
