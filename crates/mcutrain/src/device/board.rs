//! A session on a real board: the STM32 Nucleo-F746ZG, flashed and started with
//! `probe-rs run --chip STM32F746ZGTx`, the session over USART3 on the ST-LINK's virtual COM
//! port ([`super::serial::serve`]; the firmware's side is `firmware/src/usart.rs`).
//!
//! **Untested on hardware**: no board is attached to the machines this was written on. The
//! image builds and links for the board, and the serial protocol is tested against the
//! device's session loop in memory; flashing, the UART's timing and the port's settings are
//! not. Counts on the board are DWT cycles (the firmware reports the unit).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serialport::{DataBits, FlowControl, Parity, StopBits};

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

/// The speed of the firmware's USART3 (`firmware/src/usart.rs`).
const BAUD_RATE: u32 = 115_200;

/// How long one read or write of the serial port waits before it ends with `TimedOut`. A read
/// that times out is not the end of the session ([`serial::serve`] reads on while the device
/// computes); a write that cannot go on for this long is an error (the device reads what it
/// asked for at line speed).
const PORT_TIMEOUT: Duration = Duration::from_secs(1);

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
        // Raw (no echo or line editing: `serialport` sets it) 8N1 at the firmware's speed, no
        // flow control.
        let mut port = serialport::new(port_name.as_str(), BAUD_RATE)
            .data_bits(DataBits::Eight)
            .parity(Parity::None)
            .stop_bits(StopBits::One)
            .flow_control(FlowControl::None)
            .timeout(PORT_TIMEOUT)
            .open()
            .map_err(|e| {
                DeviceError::Usage(format!(
                    "cannot open the serial port {port_name} at {BAUD_RATE} baud 8N1: {e}; \
                     check that the board is connected and that `--port` names its ST-LINK's \
                     virtual COM port (e.g. /dev/ttyACM0), which this user may open (group \
                     dialout)"
                ))
            })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_port_is_an_error_that_names_it() {
        let board = Nucleo::on_port(Path::new("/nonexistent/ttyACM9"), Duration::from_secs(1));
        let e = board
            .run(Path::new("firmware.elf"), Path::new("session.bin"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/ttyACM9") && e.contains("--port"),
            "{e}"
        );
    }
}
