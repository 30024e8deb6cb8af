//! mcutrain firmware for Cortex-M4F/M7F (thumbv7em-none-eabihf).
//!
//! For now it runs the kernel self-test of [`mcutrain_core::selftest`]: it reads `job.bin`
//! from the host through semihosting file I/O (the stand-in for a sensor), runs every kernel
//! call of the job while counting its instructions (or cycles on a real board), writes
//! `results.bin` (the encoded results, byte-comparable with the host twin's) and
//! `metrics.txt` (the measurements), and exits through semihosting with success or failure.
//!
//! `metrics.txt` has one `key value...` record per line:
//! - `counter NAME`: the unit of the counts (`qemu-timer0-ticks`: CMSDK APB Timer0 ticks of
//!   40 ns of QEMU's virtual time; `dwt-cycles`: DWT cycle counter);
//! - `overhead N`: the count of an empty measured region (two counter reads);
//! - `kernel NAME N`: the count of one kernel call, overhead included;
//! - `static_ram_bytes N`, `stack_limit_bytes N`, `peak_stack_bytes N`: `.data + .bss +
//!   .uninit`, the SRAM left for the stack, and the deepest stack use (stack painting).
#![no_std]
#![no_main]

#[cfg(all(feature = "qemu", feature = "board-nucleo-f746zg"))]
compile_error!("the features `qemu` and `board-nucleo-f746zg` exclude each other: choose one");
#[cfg(not(any(feature = "qemu", feature = "board-nucleo-f746zg")))]
compile_error!("choose a board feature: `qemu` (the default) or `board-nucleo-f746zg`");

mod counter;
mod host;
mod memory;

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, Ordering};

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln};
use mcutrain_core::selftest::{self, Kernel, Probe, Store};
use panic_semihosting as _;

use counter::Counter;
use host::{FirmwareError, HostFile};

const JOB_BYTES: usize = selftest::MAX_JOB_BYTES;
const RESULTS_BYTES: usize = selftest::MAX_RESULTS_BYTES;

/// The firmware's working memory, all in `.bss`.
struct Buffers {
    job: [u8; JOB_BYTES],
    results: [u8; RESULTS_BYTES],
    store: Store,
}

static mut BUFFERS: Buffers = Buffers {
    job: [0; JOB_BYTES],
    results: [0; RESULTS_BYTES],
    store: Store::new(),
};
static BUFFERS_TAKEN: AtomicBool = AtomicBool::new(false);

/// The one mutable reference to [`BUFFERS`]; `None` after the first call.
fn take_buffers() -> Option<&'static mut Buffers> {
    if BUFFERS_TAKEN.swap(true, Ordering::AcqRel) {
        return None;
    }
    // SAFETY: the swap above lets exactly one caller through, and nothing else names BUFFERS,
    // so this is the only reference to it for the rest of the program.
    Some(unsafe { &mut *core::ptr::addr_of_mut!(BUFFERS) })
}

#[entry]
fn main() -> ! {
    memory::paint_stack();
    let status = match run_selftest() {
        Ok(()) => debug::EXIT_SUCCESS,
        Err(e) => {
            hprintln!("mcutrain firmware: {}", e);
            debug::EXIT_FAILURE
        }
    };
    debug::exit(status);
    loop {
        cortex_m::asm::wfi();
    }
}

/// Counts each kernel call of a self-test.
struct Recorder<'a> {
    counter: &'a Counter,
    counts: [u32; Kernel::ALL.len()],
}

impl Probe for Recorder<'_> {
    fn measure<R>(&mut self, kernel: Kernel, call: impl FnOnce() -> R) -> R {
        let start = self.counter.now();
        let result = call();
        let end = self.counter.now();
        self.counts[kernel as usize] = end.wrapping_sub(start);
        result
    }
}

/// Reads `job.bin`, runs it, writes `results.bin` and `metrics.txt`.
fn run_selftest() -> Result<(), FirmwareError> {
    let buffers = take_buffers().ok_or(FirmwareError::Internal("buffers taken twice"))?;
    let counter = Counter::start();
    let overhead = {
        let start = counter.now();
        counter.now().wrapping_sub(start)
    };

    let job = host::read_file(c"job.bin", &mut buffers.job)?;
    let (job, mut results) = buffers.store.load(job).map_err(FirmwareError::Job)?;
    let mut recorder = Recorder {
        counter: &counter,
        counts: [0; Kernel::ALL.len()],
    };
    selftest::run(&job, &mut results, &mut recorder);
    let len = results
        .encode(&mut buffers.results)
        .map_err(FirmwareError::Job)?;
    HostFile::create(c"results.bin")?.write_all(&buffers.results[..len])?;

    let mut metrics = HostFile::create(c"metrics.txt")?;
    writeln!(metrics, "counter {}", Counter::UNIT)?;
    writeln!(metrics, "overhead {overhead}")?;
    for (kernel, count) in Kernel::ALL.iter().zip(recorder.counts) {
        writeln!(metrics, "kernel {} {count}", kernel.name())?;
    }
    writeln!(metrics, "static_ram_bytes {}", memory::static_ram_bytes())?;
    writeln!(metrics, "stack_limit_bytes {}", memory::stack_limit_bytes())?;
    writeln!(metrics, "peak_stack_bytes {}", memory::peak_stack_bytes())?;
    Ok(())
}
