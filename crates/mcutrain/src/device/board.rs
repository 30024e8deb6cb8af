//! A session on a real board: the STM32 Nucleo-F746ZG, flashed and started with
//! `probe-rs run --chip STM32F746ZGTx`, the session over USART3 on the ST-LINK's virtual COM
//! port ([`super::serial::serve`]; the firmware's side is `firmware/src/usart.rs`).
//!
//! **Untested on hardware**: no board is attached to the machines this was written on. The
//! image builds and links for the board, and the serial protocol is tested against the
//! device's session loop in memory; flashing, the UART's timing and the port's settings are
//! not. Counts on the board are DWT cycles (the firmware reports the unit).

use std::fs::{File, OpenOptions};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{serial, DeviceError};

/// How to reach a Nucleo-F746ZG.
#[derive(Clone, Debug)]
pub struct Nucleo {
    /// The ST-LINK's virtual COM port, e.g. `/dev/ttyACM0`.
    pub port: PathBuf,
    /// The `probe-rs` binary (found on `PATH` by default).
    pub probe_rs: PathBuf,
    /// Longest run before `probe-rs` is stopped.
    pub timeout: Duration,
}

/// The chip name `probe-rs` knows the board's MCU by.
pub const CHIP: &str = "STM32F746ZGTx";

impl Nucleo {
    /// A board on `port`, `probe-rs` from `PATH`.
    pub fn on_port(port: &Path, timeout: Duration) -> Nucleo {
        Nucleo {
            port: port.to_path_buf(),
            probe_rs: PathBuf::from("probe-rs"),
            timeout,
        }
    }

    /// Flashes `elf`, starts it, serves `session_file` over the port and returns the results
    /// and what `probe-rs` printed.
    pub fn run(&self, elf: &Path, session_file: &Path) -> Result<(Vec<u8>, String), DeviceError> {
        let port_name = self.port.display().to_string();
        // Raw 8N1 at the firmware's speed, no echo or flow control (Linux `stty`).
        let stty = Command::new("stty")
            .args([
                "-F", &port_name, "115200", "raw", "-echo", "-ixon", "-ixoff", "-crtscts",
            ])
            .status()
            .map_err(|e| DeviceError::MissingTool {
                what: "stty".into(),
                detail: e.to_string(),
            })?;
        if !stty.success() {
            return Err(DeviceError::Usage(format!(
                "cannot configure the serial port {port_name} ({stty})"
            )));
        }
        let mut port = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.port)
            .map_err(DeviceError::io(format!("open {port_name}")))?;
        let mut probe = Command::new(&self.probe_rs)
            .args(["run", "--chip", CHIP])
            .arg(elf)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| DeviceError::MissingTool {
                what: format!("probe-rs (`{}`)", self.probe_rs.display()),
                detail: format!("{e}; install it with `cargo install probe-rs-tools`"),
            })?;
        let console = super::qemu::drain_output(&mut probe);
        let session = File::open(session_file).map_err(DeviceError::io("open session.bin"))?;
        let served = serial::serve(&mut port, &mut BufReader::new(session));
        let status = super::qemu::wait_with_timeout(&mut probe, self.timeout, || {})?;
        let console = console.join();
        let results = served?;
        match status {
            Some(status) if status.success() => Ok((results, console)),
            Some(status) => Err(DeviceError::Board {
                status: status.to_string(),
                output: console,
            }),
            None => Err(DeviceError::Board {
                status: format!("still running after {} s", self.timeout.as_secs()),
                output: console,
            }),
        }
    }
}
