//! Running on a Cortex-M: build the firmware (`firmware/` at the repository root), run it in
//! QEMU, stream a job through semihosting files, collect the results and the measurements.
//!
//! - [`adapt`]: fine-tuning and evaluation on a device (`mcutrain train|eval --on`);
//! - [`board`]: a session on a real board (Nucleo-F746ZG, `probe-rs`, serial line; untested);
//! - [`firmware`]: the cached firmware build with its memory budgets enforced at link time;
//! - [`elf`]: flash and static RAM of an image, from its section headers;
//! - [`qemu`]: one emulator run with a timeout, and the instruction count of the timer ticks;
//! - [`selftest`]: the kernel self-test (random jobs, the host twin, the device run, the
//!   byte-for-byte comparison, the measurements);
//! - [`session`]: training sessions (the samples streamed in, the trained state and the
//!   measurements back);
//! - [`report`]: the measurements of a session as a table and JSON;
//! - [`serial`]: the host end of a session over a board's serial line.
//!
//! The tools come from `scripts/setup.sh`; a missing one is a [`DeviceError::MissingTool`]
//! that says so.

pub mod adapt;
pub mod board;
pub mod elf;
pub mod firmware;
pub mod qemu;
pub mod report;
pub mod selftest;
pub mod serial;
pub mod session;

use std::fmt;
use std::str::FromStr;

pub use crate::compile::plan_file::PlanSizes;
pub use elf::Footprint;
pub use firmware::{Board, Firmware, Image, Program};
pub use qemu::Qemu;

/// An emulated board that runs the firmware.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Machine {
    /// Cortex-M4F on QEMU's MPS2-AN386.
    QemuM4,
    /// Cortex-M7 on QEMU's MPS2-AN500.
    QemuM7,
}

impl Machine {
    /// Every machine.
    pub const ALL: [Machine; 2] = [Machine::QemuM4, Machine::QemuM7];

    /// The name used on the command line: `qemu-m4` or `qemu-m7`.
    pub fn name(self) -> &'static str {
        match self {
            Machine::QemuM4 => "qemu-m4",
            Machine::QemuM7 => "qemu-m7",
        }
    }

    /// QEMU's `-machine` value.
    pub fn qemu_machine(self) -> &'static str {
        match self {
            Machine::QemuM4 => "mps2-an386",
            Machine::QemuM7 => "mps2-an500",
        }
    }

    /// QEMU's `-cpu` value.
    pub fn qemu_cpu(self) -> &'static str {
        match self {
            Machine::QemuM4 => "cortex-m4",
            Machine::QemuM7 => "cortex-m7",
        }
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Machine {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Machine::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                DeviceError::Usage(format!("unknown machine `{s}`: use qemu-m4 or qemu-m7"))
            })
    }
}

/// Where a training session runs.
#[derive(Clone, Debug)]
pub enum Device {
    /// The firmware in QEMU, the session through semihosting files.
    Qemu {
        /// The emulated board.
        machine: Machine,
        /// How QEMU runs (its timeout).
        qemu: Qemu,
    },
    /// The firmware on a Nucleo-F746ZG, the session over its serial line (untested).
    NucleoF746zg(board::Nucleo),
}

impl Device {
    /// The name used on the command line and in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Device::Qemu { machine, .. } => machine.name(),
            Device::NucleoF746zg(_) => "nucleo-f746zg",
        }
    }

    /// The board the firmware is built for.
    pub fn board(&self) -> Board {
        match self {
            Device::Qemu { .. } => Board::Qemu,
            Device::NucleoF746zg(_) => Board::NucleoF746zg,
        }
    }
}

/// Memory budgets of a firmware image, enforced when it links.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Budget {
    /// SRAM: static data plus the stack (`--sram`, default 256K).
    pub sram_bytes: u64,
    /// Flash: code plus constant data plus `.data`'s initial values (`--flash`, default 1M).
    pub flash_bytes: u64,
    /// Stack that static data must leave free in SRAM (default 16K).
    pub min_stack_bytes: u64,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            sram_bytes: 256 << 10,
            flash_bytes: 1 << 20,
            min_stack_bytes: 16 << 10,
        }
    }
}

/// A size like `262144`, `256K`, `256KB` or `1M` (binary units, any case) in bytes.
pub fn parse_size(text: &str) -> Result<u64, DeviceError> {
    let text = text.trim();
    let upper = text.to_ascii_uppercase();
    let number = match upper.strip_suffix('B') {
        Some(rest) if rest.ends_with(['K', 'M']) => rest,
        _ => &upper,
    };
    let (digits, unit) = match number.chars().last() {
        Some('K') => (&number[..number.len() - 1], 1u64 << 10),
        Some('M') => (&number[..number.len() - 1], 1u64 << 20),
        _ => (number, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| {
            DeviceError::Usage(format!("`{text}` is not a size (like 262144, 256K or 1M)"))
        })
}

/// Why building or running on a device failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A tool (QEMU, the Rust target, a linker) is not installed.
    #[error("{what} is missing ({detail}); run scripts/setup.sh")]
    MissingTool {
        /// The tool.
        what: String,
        /// What was tried.
        detail: String,
    },
    /// The image does not fit its memory budget: refused before building (the plan alone) or
    /// at link time, nothing ran.
    #[error("the firmware does not fit the memory budget, nothing ran:\n{linker}\n{breakdown}")]
    OverBudget {
        /// Where it was refused, and the linker's messages.
        linker: String,
        /// Sizes of the image's parts against the budget.
        breakdown: String,
    },
    /// No training plan can be made for the model and settings.
    #[error("cannot make the training plan: {0}")]
    Plan(String),
    /// A plan file could not be written or read.
    #[error(transparent)]
    PlanFile(#[from] crate::compile::plan_file::PlanFileError),
    /// A plan file does not validate.
    #[error("the plan file is not valid: {0}")]
    InvalidPlan(#[from] mcutrain_core::plan::PlanError),
    /// A self-test job or its results do not encode or decode.
    #[error("self-test job: {0}")]
    SelfTest(#[from] mcutrain_core::selftest::SelfTestError),
    /// Building the firmware failed for another reason.
    #[error("building the firmware failed:\n{0}")]
    Build(String),
    /// The firmware reported an error, or QEMU failed.
    #[error("the firmware failed on {machine} ({status}):\n{output}")]
    Run {
        /// The machine.
        machine: Machine,
        /// QEMU's exit status.
        status: String,
        /// What the firmware and QEMU printed.
        output: String,
    },
    /// The board run failed (`probe-rs` reported an error or did not finish).
    #[error("the run on the Nucleo-F746ZG failed ({status}):\n{output}")]
    Board {
        /// `probe-rs`'s exit status.
        status: String,
        /// What `probe-rs` and the firmware printed.
        output: String,
    },
    /// QEMU did not finish in time.
    #[error("the firmware did not finish within {seconds} s on {machine}")]
    Timeout {
        /// The machine.
        machine: Machine,
        /// The time limit.
        seconds: u64,
    },
    /// A file the firmware wrote, or an image, is malformed.
    #[error("malformed device output: {0}")]
    BadOutput(String),
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
    /// A host file operation failed.
    #[error("{action}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl DeviceError {
    fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> DeviceError {
        let action = action.into();
        move |source| DeviceError::Io { action, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("256K").unwrap(), 262_144);
        assert_eq!(parse_size("1M").unwrap(), 1_048_576);
        assert_eq!(parse_size(" 8k ").unwrap(), 8192);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("320kb").unwrap(), 327_680);
        assert!(parse_size("12B").is_err());
        assert!(parse_size("K").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999999999M").is_err());
    }

    #[test]
    fn machines_parse_by_name() {
        for m in Machine::ALL {
            assert_eq!(m.name().parse::<Machine>().unwrap(), m);
        }
        let e = "qemu-m33".parse::<Machine>().unwrap_err().to_string();
        assert!(e.contains("qemu-m4 or qemu-m7"), "{e}");
    }
}
