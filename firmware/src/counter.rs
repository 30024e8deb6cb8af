//! Counting what a region of code costs.
//!
//! QEMU (feature `qemu`) has no cycle model and its DWT cycle counter reads 0. Run under
//! `-icount shift=7,sleep=off`, every instruction advances virtual time by 2^7 ns = 128 ns,
//! and the CMSDK APB Timer0 of the MPS2 boards (at 0x4000_0000, 25 MHz, one tick per 40 ns)
//! then counts instructions exactly: `instructions = round(ticks * 40 / 128)`, which the host
//! computes. Instructions are a lower bound on Cortex-M cycles (loads, branches and the FPU's
//! divisions take more than one). On a real board (feature `board-nucleo-f746zg`) the DWT
//! cycle counter gives cycles.

use core::sync::atomic::{compiler_fence, Ordering};

use mcutrain_core::session::CounterUnit;

/// A free-running up counter.
pub struct Counter {
    #[cfg(feature = "board-nucleo-f746zg")]
    dwt: cortex_m::peripheral::DWT,
}

#[cfg(feature = "qemu")]
mod timer0 {
    //! CMSDK APB Timer0 registers (Arm CMSDK technical reference, "APB timer"; MPS2 AN386
    //! and AN500 memory maps): a 32-bit down counter reloaded from RELOAD at zero.
    pub const CTRL: *mut u32 = 0x4000_0000 as *mut u32;
    pub const VALUE: *mut u32 = 0x4000_0004 as *mut u32;
    pub const RELOAD: *mut u32 = 0x4000_0008 as *mut u32;
    /// CTRL bit 0: enable.
    pub const ENABLE: u32 = 1;
}

impl Counter {
    /// Unit of the counts.
    #[cfg(feature = "qemu")]
    pub const UNIT: CounterUnit = CounterUnit::QemuTimer0Ticks;
    /// Unit of the counts.
    #[cfg(feature = "board-nucleo-f746zg")]
    pub const UNIT: CounterUnit = CounterUnit::DwtCycles;

    /// Starts Timer0 from its largest value.
    #[cfg(feature = "qemu")]
    pub fn start() -> Self {
        // SAFETY: Timer0's registers exist at these addresses on the MPS2 boards and nothing
        // else in the firmware uses the timer; volatile accesses of aligned words.
        unsafe {
            core::ptr::write_volatile(timer0::CTRL, 0);
            core::ptr::write_volatile(timer0::RELOAD, u32::MAX);
            core::ptr::write_volatile(timer0::VALUE, u32::MAX);
            core::ptr::write_volatile(timer0::CTRL, timer0::ENABLE);
        }
        Counter {}
    }

    /// Enables and starts the DWT cycle counter.
    #[cfg(feature = "board-nucleo-f746zg")]
    pub fn start() -> Self {
        let mut core = cortex_m::Peripherals::take().expect("core peripherals taken once");
        core.DCB.enable_trace();
        core.DWT.enable_cycle_counter();
        Counter { dwt: core.DWT }
    }

    /// The current count, increasing (wraps around `u32`). Compiler fences keep the memory
    /// accesses of the measured code on their side of the read.
    #[inline(always)]
    pub fn now(&self) -> u32 {
        compiler_fence(Ordering::SeqCst);
        let count = self.read();
        compiler_fence(Ordering::SeqCst);
        count
    }

    #[cfg(feature = "qemu")]
    #[inline(always)]
    fn read(&self) -> u32 {
        // SAFETY: Timer0's VALUE register (see `start`); a volatile read has no side effect.
        u32::MAX - unsafe { core::ptr::read_volatile(timer0::VALUE) }
    }

    #[cfg(feature = "board-nucleo-f746zg")]
    #[inline(always)]
    fn read(&self) -> u32 {
        let _ = &self.dwt;
        cortex_m::peripheral::DWT::cycle_count()
    }
}

#[cfg(mcutrain_plan)]
impl mcutrain_core::session::Clock for Counter {
    #[inline(always)]
    fn now(&self) -> u32 {
        Counter::now(self)
    }
}
