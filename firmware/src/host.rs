//! Files on the host through Arm semihosting (SYS_OPEN, SYS_FLEN, SYS_READ, SYS_WRITE,
//! SYS_CLOSE; "Semihosting for AArch32 and AArch64", Arm IHI 0071): the firmware's data path
//! under QEMU. Paths are relative to the directory QEMU runs in.

use core::ffi::CStr;
use core::fmt;

use cortex_m_semihosting::{nr, syscall};
use mcutrain_core::selftest::SelfTestError;

/// Why the firmware stopped.
#[derive(Debug)]
pub enum FirmwareError {
    /// The host refused to open the file.
    Open(&'static CStr),
    /// Reading the file failed.
    Read(&'static CStr),
    /// The file is larger than its buffer.
    TooLarge {
        /// The file.
        file: &'static CStr,
        /// Its size.
        bytes: usize,
        /// The buffer's size.
        capacity: usize,
    },
    /// Writing a file failed.
    Write,
    /// The job could not be decoded or the results encoded.
    Job(SelfTestError),
    /// A broken invariant of the firmware itself.
    Internal(&'static str),
}

impl fmt::Display for FirmwareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FirmwareError::Open(file) => write!(f, "cannot open {file:?} on the host"),
            FirmwareError::Read(file) => write!(f, "cannot read {file:?} from the host"),
            FirmwareError::TooLarge {
                file,
                bytes,
                capacity,
            } => write!(f, "{file:?} has {bytes} bytes, the buffer {capacity}"),
            FirmwareError::Write => f.write_str("cannot write a file on the host"),
            FirmwareError::Job(e) => write!(f, "{e}"),
            FirmwareError::Internal(what) => write!(f, "internal error: {what}"),
        }
    }
}

impl From<fmt::Error> for FirmwareError {
    fn from(_: fmt::Error) -> Self {
        FirmwareError::Write
    }
}

/// An open host file, closed on drop.
pub struct HostFile {
    handle: usize,
}

impl HostFile {
    fn open(path: &'static CStr, mode: usize) -> Result<Self, FirmwareError> {
        // SAFETY: SYS_OPEN reads the nul-terminated path (pointer and length without the nul)
        // during the call only; `path` outlives it.
        let handle = unsafe { syscall!(OPEN, path.as_ptr(), mode, path.count_bytes()) };
        if handle as isize == -1 {
            return Err(FirmwareError::Open(path));
        }
        Ok(HostFile { handle })
    }

    /// Creates (or truncates) a binary file for writing.
    pub fn create(path: &'static CStr) -> Result<Self, FirmwareError> {
        Self::open(path, nr::open::W_TRUNC_BINARY)
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

/// Reads the whole binary file `path` into the front of `buffer` and returns that part.
pub fn read_file<'a>(path: &'static CStr, buffer: &'a mut [u8]) -> Result<&'a [u8], FirmwareError> {
    let file = HostFile::open(path, nr::open::R_BINARY)?;
    // SAFETY: SYS_FLEN takes the open handle and touches no memory of ours.
    let len = unsafe { syscall!(FLEN, file.handle) };
    if len as isize == -1 {
        return Err(FirmwareError::Read(path));
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
        return Err(FirmwareError::Read(path));
    }
    Ok(contents)
}
