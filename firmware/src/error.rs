//! Why the firmware stops: the error it prints before exiting with failure.

#[cfg(mcutrain_host_files)]
use core::ffi::CStr;
use core::fmt;

#[cfg(not(mcutrain_plan))]
use mcutrain_core::selftest::SelfTestError;
#[cfg(mcutrain_plan)]
use mcutrain_core::session::SessionError;

/// Why the firmware stopped.
#[derive(Debug)]
pub enum FirmwareError {
    /// The host refused to open the file.
    #[cfg(mcutrain_host_files)]
    Open(&'static CStr),
    /// Reading the file failed.
    #[cfg(mcutrain_host_files)]
    Read(&'static CStr),
    /// The file is larger than its buffer.
    #[cfg(not(mcutrain_plan))]
    TooLarge {
        /// The file.
        file: &'static CStr,
        /// Its size.
        bytes: usize,
        /// The buffer's size.
        capacity: usize,
    },
    /// Writing a file failed.
    #[cfg(mcutrain_host_files)]
    Write,
    /// The job could not be decoded or the results encoded.
    #[cfg(not(mcutrain_plan))]
    Job(SelfTestError),
    /// The training session failed.
    #[cfg(mcutrain_plan)]
    Session(SessionError),
    /// A broken invariant of the firmware itself.
    Internal(&'static str),
}

impl fmt::Display for FirmwareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            #[cfg(mcutrain_host_files)]
            FirmwareError::Open(file) => write!(f, "cannot open {file:?} on the host"),
            #[cfg(mcutrain_host_files)]
            FirmwareError::Read(file) => write!(f, "cannot read {file:?} from the host"),
            #[cfg(not(mcutrain_plan))]
            FirmwareError::TooLarge {
                file,
                bytes,
                capacity,
            } => write!(f, "{file:?} has {bytes} bytes, the buffer {capacity}"),
            #[cfg(mcutrain_host_files)]
            FirmwareError::Write => f.write_str("cannot write a file on the host"),
            #[cfg(not(mcutrain_plan))]
            FirmwareError::Job(e) => write!(f, "{e}"),
            #[cfg(mcutrain_plan)]
            FirmwareError::Session(e) => write!(f, "{e}"),
            FirmwareError::Internal(what) => write!(f, "internal error: {what}"),
        }
    }
}

#[cfg(not(mcutrain_plan))]
impl From<fmt::Error> for FirmwareError {
    fn from(_: fmt::Error) -> Self {
        FirmwareError::Write
    }
}
