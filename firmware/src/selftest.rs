//! The kernel self-test program (an image built without a plan): reads `job.bin` through
//! semihosting, runs every kernel call of [`mcutrain_core::selftest`] while counting it,
//! writes `results.bin` (the encoded results, byte-comparable with the host twin's) and
//! `metrics.txt`.
//!
//! `metrics.txt` has one `key value...` record per line:
//! - `counter NAME`: the unit of the counts (`qemu-timer0-ticks`: CMSDK APB Timer0 ticks of
//!   40 ns of QEMU's virtual time; `dwt-cycles`: DWT cycle counter);
//! - `overhead N`: the count of an empty measured region (two counter reads);
//! - `kernel NAME N`: the count of one kernel call, overhead included;
//! - `static_ram_bytes N`, `stack_limit_bytes N`, `peak_stack_bytes N`: `.data + .bss +
//!   .uninit`, the SRAM left for the stack, and the deepest stack use (stack painting).

use core::fmt::Write;

use mcutrain_core::selftest::{self, Kernel, Probe, Store};

use crate::counter::Counter;
use crate::error::FirmwareError;
use crate::host::{self, HostFile};
use crate::memory::{self, TakeOnce};

const JOB_BYTES: usize = selftest::MAX_JOB_BYTES;
const RESULTS_BYTES: usize = selftest::MAX_RESULTS_BYTES;

/// The self-test's working memory, all in `.bss`.
struct Buffers {
    job: [u8; JOB_BYTES],
    results: [u8; RESULTS_BYTES],
    store: Store,
}

static BUFFERS: TakeOnce<Buffers> = TakeOnce::new(Buffers {
    job: [0; JOB_BYTES],
    results: [0; RESULTS_BYTES],
    store: Store::new(),
});

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
pub fn run() -> Result<(), FirmwareError> {
    let buffers = BUFFERS
        .take()
        .ok_or(FirmwareError::Internal("buffers taken twice"))?;
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
    writeln!(metrics, "counter {}", Counter::UNIT.name())?;
    writeln!(metrics, "overhead {overhead}")?;
    for (kernel, count) in Kernel::ALL.iter().zip(recorder.counts) {
        writeln!(metrics, "kernel {} {count}", kernel.name())?;
    }
    writeln!(metrics, "static_ram_bytes {}", memory::static_ram_bytes())?;
    writeln!(metrics, "stack_limit_bytes {}", memory::stack_limit_bytes())?;
    writeln!(metrics, "peak_stack_bytes {}", memory::peak_stack_bytes())?;
    Ok(())
}
