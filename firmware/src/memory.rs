//! The firmware's memory, measured: static data from the linker's symbols, peak stack by
//! stack painting.
//!
//! cortex-m-rt lays out SRAM as `.data`, `.bss`, `.uninit` from `_ram_start` up to
//! `_stack_end`, and the stack grows down from `_stack_start` (the end of SRAM) towards
//! `_stack_end`. [`paint_stack`] fills the free part below the current stack pointer with a
//! pattern at start-up; [`peak_stack_bytes`] later finds the lowest word that lost it.
//! Deterministic in the emulator, and only a lower bound if an interrupt handler that never
//! ran could go deeper.

use core::cell::UnsafeCell;
use core::ptr;
use core::sync::atomic::{AtomicBool, Ordering};

/// The paint: a word that the program is unlikely to leave on the stack.
const PAINT: u32 = 0xA5C3_5A3C;

extern "C" {
    /// Start of SRAM (cortex-m-rt's `link.x`).
    static _ram_start: u32;
    /// End of `.uninit`, the lowest address the stack may reach.
    static _stack_end: u32;
    /// Initial stack pointer, the end of SRAM.
    static _stack_start: u32;
}

fn ram_start() -> usize {
    ptr::addr_of!(_ram_start) as usize
}

fn stack_end() -> usize {
    ptr::addr_of!(_stack_end) as usize
}

fn stack_start() -> usize {
    ptr::addr_of!(_stack_start) as usize
}

/// Paints every word from `_stack_end` up to 64 bytes below the current stack pointer.
/// Call it first thing in `main`.
pub fn paint_stack() {
    let top = (cortex_m::register::msp::read() as usize & !3) - 64;
    let mut at = stack_end();
    while at < top {
        // SAFETY: [_stack_end, top) lies between the static data and the live stack: no Rust
        // object lives there, and the stack pointer stays above `top` in this loop (it makes
        // no call). The address is word-aligned because `_stack_end` is.
        unsafe { ptr::write_volatile(at as *mut u32, PAINT) };
        at += 4;
    }
}

/// Bytes from the end of SRAM down to the lowest word that no longer holds the paint.
pub fn peak_stack_bytes() -> usize {
    let mut at = stack_end();
    // SAFETY: reads word-aligned addresses between `_stack_end` and `_stack_start`, inside
    // SRAM; memory below the stack pointer is not used by any Rust object.
    while at < stack_start() && unsafe { ptr::read_volatile(at as *const u32) } == PAINT {
        at += 4;
    }
    stack_start() - at
}

/// `.data + .bss + .uninit`: the SRAM taken before the stack.
pub fn static_ram_bytes() -> usize {
    stack_end() - ram_start()
}

/// The SRAM left for the stack.
pub fn stack_limit_bytes() -> usize {
    stack_start() - stack_end()
}

/// A value at a 4-byte aligned address (plan files and arenas hold `i32`/`f32` read in place).
#[cfg(mcutrain_plan)]
#[repr(C, align(4))]
pub struct Aligned<T>(pub T);

/// A static that the program takes once, as an exclusive reference.
pub struct TakeOnce<T> {
    taken: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: `take` hands out at most one reference to the value, whatever the thread or
// interrupt that calls it (the flag is swapped atomically), so sharing the cell is sound.
unsafe impl<T> Sync for TakeOnce<T> {}

impl<T> TakeOnce<T> {
    /// A cell holding `value` (a constant: large zeroed values go to `.bss`).
    pub const fn new(value: T) -> Self {
        TakeOnce {
            taken: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// The value, the first time; `None` afterwards.
    #[allow(clippy::mut_from_ref)] // the flag makes this the only reference, as in static_cell
    pub fn take(&'static self) -> Option<&'static mut T> {
        if self.taken.swap(true, Ordering::AcqRel) {
            return None;
        }
        // SAFETY: the swap lets exactly one caller through, so this is the only reference to
        // the value for the rest of the program.
        Some(unsafe { &mut *self.value.get() })
    }
}
