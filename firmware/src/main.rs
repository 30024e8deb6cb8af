//! mcutrain firmware for Cortex-M4F/M7F (thumbv7em-none-eabihf).
//!
//! Built with a plan (`MCUTRAIN_PLAN`, see `build.rs`) it is a training program (`train.rs`):
//! the plan is read in place from flash, samples arrive one at a time from the host (the
//! stand-in for a sensor: semihosting files under QEMU, the UART on a board), and the device
//! trains, evaluates and sends back the trained state and its measurements. Built without one
//! it runs the kernel self-test ([`selftest`]). Either way it exits through semihosting with
//! success or failure, after printing its error.
#![no_std]
#![no_main]

#[cfg(all(feature = "qemu", feature = "board-nucleo-f746zg"))]
compile_error!("the features `qemu` and `board-nucleo-f746zg` exclude each other: choose one");
#[cfg(not(any(feature = "qemu", feature = "board-nucleo-f746zg")))]
compile_error!("choose a board feature: `qemu` (the default) or `board-nucleo-f746zg`");

mod counter;
mod error;
#[cfg(mcutrain_host_files)]
mod host;
mod memory;
#[cfg(not(mcutrain_plan))]
mod selftest;
#[cfg(mcutrain_plan)]
mod train;
#[cfg(all(mcutrain_plan, feature = "board-nucleo-f746zg"))]
mod usart;

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln};
use panic_semihosting as _;

#[entry]
fn main() -> ! {
    memory::paint_stack();
    #[cfg(mcutrain_plan)]
    let result = train::run();
    #[cfg(not(mcutrain_plan))]
    let result = selftest::run();
    let status = match result {
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
