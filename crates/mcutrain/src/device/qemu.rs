//! One firmware run in QEMU (`qemu-system-arm`, 7.2 or later) with semihosting and exact
//! instruction counting.
//!
//! QEMU runs in a working directory that holds the job; the firmware reads and writes files
//! there through semihosting. `-icount shift=7,sleep=off` makes every instruction advance
//! virtual time by 2^7 ns = 128 ns, and the firmware reads the MPS2 boards' CMSDK APB Timer0,
//! which ticks every 40 ns of virtual time: `instructions = round(ticks * 40 / 128)`. Repeated
//! runs give identical counts. They are instructions, a lower bound on Cortex-M cycles.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::{DeviceError, Machine};

/// QEMU's `-icount` shift: one instruction per 2^7 ns of virtual time.
pub const ICOUNT_SHIFT: u32 = 7;
/// Period of the MPS2 boards' APB timers in ns of virtual time (25 MHz).
pub const TIMER_TICK_NS: u64 = 40;

/// `round(ticks * 40 / 2^7)`: instructions executed during `ticks` Timer0 ticks.
pub fn ticks_to_instructions(ticks: u64) -> u64 {
    let per_instruction = 1u64 << ICOUNT_SHIFT;
    (ticks * TIMER_TICK_NS + per_instruction / 2) / per_instruction
}

/// How to start QEMU.
#[derive(Clone, Debug)]
pub struct Qemu {
    /// The emulator binary (`qemu-system-arm`, found on `PATH`).
    pub binary: PathBuf,
    /// Longest run before QEMU is killed.
    pub timeout: Duration,
}

impl Default for Qemu {
    fn default() -> Self {
        Qemu {
            binary: PathBuf::from("qemu-system-arm"),
            timeout: Duration::from_secs(120),
        }
    }
}

impl Qemu {
    /// Runs `elf` on `machine` in `workdir` until the firmware exits; returns what it printed.
    /// A failing exit status is a [`DeviceError::Run`], a run longer than the timeout a
    /// [`DeviceError::Timeout`].
    pub fn run(&self, machine: Machine, elf: &Path, workdir: &Path) -> Result<String, DeviceError> {
        self.run_watching(machine, elf, workdir, || {})
    }

    /// [`Qemu::run`], calling `watch` about four times a second while the firmware runs (to
    /// follow its progress in the files it writes).
    pub fn run_watching(
        &self,
        machine: Machine,
        elf: &Path,
        workdir: &Path,
        watch: impl FnMut(),
    ) -> Result<String, DeviceError> {
        let elf = elf
            .canonicalize()
            .map_err(DeviceError::io(format!("find {}", elf.display())))?;
        let mut command = Command::new(&self.binary);
        command
            .args([
                "-machine",
                machine.qemu_machine(),
                "-cpu",
                machine.qemu_cpu(),
            ])
            .args(["-nographic", "-monitor", "none", "-serial", "none"])
            .args(["-semihosting-config", "enable=on,target=native"])
            .args(["-icount", &format!("shift={ICOUNT_SHIFT},sleep=off")])
            .arg("-kernel")
            .arg(&elf)
            .current_dir(workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| DeviceError::MissingTool {
            what: format!("QEMU (`{}`)", self.binary.display()),
            detail: e.to_string(),
        })?;
        let output = drain_output(&mut child);
        let status = wait_with_timeout(&mut child, self.timeout, watch);
        let output = output.join();
        match status? {
            Some(status) if status.success() => Ok(output),
            Some(status) => Err(DeviceError::Run {
                machine,
                status: status.to_string(),
                output,
            }),
            None => Err(DeviceError::Timeout {
                machine,
                seconds: self.timeout.as_secs(),
            }),
        }
    }
}

/// A fresh directory under the system's temporary directory for one run, removed on drop.
pub(crate) struct WorkDir(PathBuf);

impl WorkDir {
    pub(crate) fn new() -> Result<WorkDir, DeviceError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "mcutrain-device-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(DeviceError::io("create a working directory"))?;
        Ok(WorkDir(path))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a child prints on stdout and stderr, read on threads until it exits.
pub(crate) struct ChildOutput {
    stdout: thread::JoinHandle<String>,
    stderr: thread::JoinHandle<String>,
}

impl ChildOutput {
    /// Everything printed: stdout, then stderr.
    pub(crate) fn join(self) -> String {
        format!(
            "{}{}",
            self.stdout.join().unwrap_or_default(),
            self.stderr.join().unwrap_or_default()
        )
    }
}

/// Starts reading the piped stdout and stderr of `child`.
pub(crate) fn drain_output(child: &mut Child) -> ChildOutput {
    ChildOutput {
        stdout: drain(child.stdout.take()),
        stderr: drain(child.stderr.take()),
    }
}

/// Reads a pipe to its end on a thread, so that a chatty child cannot block on it.
fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    })
}

/// The child's exit status, or `None` after killing it at the timeout; `watch` runs every
/// 25th poll.
pub(crate) fn wait_with_timeout(
    child: &mut Child,
    timeout: Duration,
    mut watch: impl FnMut(),
) -> Result<Option<std::process::ExitStatus>, DeviceError> {
    let deadline = Instant::now() + timeout;
    let mut poll = 0u64;
    loop {
        poll += 1;
        if let Some(status) = child.try_wait().map_err(DeviceError::io("wait for QEMU"))? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        if poll.is_multiple_of(25) {
            watch();
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_ticks_convert_to_rounded_instructions() {
        // One instruction = 128 ns = 3.2 ticks of 40 ns.
        assert_eq!(ticks_to_instructions(0), 0);
        assert_eq!(ticks_to_instructions(16), 5);
        assert_eq!(ticks_to_instructions(3), 1); // 0.94
        assert_eq!(ticks_to_instructions(1), 0); // 0.31
        assert_eq!(ticks_to_instructions(32_000_000), 10_000_000);
    }
}
