//! USART3 of the STM32F746ZG on the Nucleo-F746ZG: PD8 (TX) and PD9 (RX), wired to the
//! ST-LINK's virtual COM port, at 115200 baud, 8N1, polled (RM0385, "Universal synchronous
//! receiver transmitter"; register addresses from its memory map). The clocks stay at their
//! reset values: HSI 16 MHz, APB1 undivided, USART3 clocked from PCLK1.
//!
//! Untested on hardware (see README.md): it builds for the board and is the data path of
//! [`mcutrain_core::session::RequestLink`] there.

use core::ptr::{read_volatile, write_volatile};

use mcutrain_core::session::{LinkError, SerialPort};

const RCC: usize = 0x4002_3800;
const RCC_AHB1ENR: *mut u32 = (RCC + 0x30) as *mut u32;
const RCC_APB1ENR: *mut u32 = (RCC + 0x40) as *mut u32;
const GPIODEN: u32 = 1 << 3;
const USART3EN: u32 = 1 << 18;

const GPIOD: usize = 0x4002_0C00;
const GPIOD_MODER: *mut u32 = GPIOD as *mut u32;
const GPIOD_AFRH: *mut u32 = (GPIOD + 0x24) as *mut u32;

const USART3: usize = 0x4000_4800;
const CR1: *mut u32 = USART3 as *mut u32;
const BRR: *mut u32 = (USART3 + 0x0C) as *mut u32;
const ISR: *const u32 = (USART3 + 0x1C) as *const u32;
const ICR: *mut u32 = (USART3 + 0x20) as *mut u32;
const RDR: *const u32 = (USART3 + 0x24) as *const u32;
const TDR: *mut u32 = (USART3 + 0x28) as *mut u32;
/// CR1: USART enable, receiver enable, transmitter enable.
const CR1_UE_RE_TE: u32 = 1 | 1 << 2 | 1 << 3;
/// ISR: overrun error, receive register not empty, transmit register empty.
const ISR_ORE: u32 = 1 << 3;
const ISR_RXNE: u32 = 1 << 5;
const ISR_TXE: u32 = 1 << 7;

/// PCLK1 at reset (HSI).
const PCLK1_HZ: u32 = 16_000_000;
/// The line's speed.
pub const BAUD: u32 = 115_200;

/// The started USART3.
pub struct Usart3 {
    _private: (),
}

impl Usart3 {
    /// Clocks GPIOD and USART3, puts PD8/PD9 on alternate function 7, and enables the USART
    /// at [`BAUD`] (oversampling by 16: `BRR = PCLK1 / BAUD`, rounded).
    pub fn start() -> Self {
        // SAFETY: RCC, GPIOD and USART3 registers of the STM32F746 at their documented
        // addresses, accessed as aligned volatile words; nothing else in the firmware uses
        // these peripherals, and the read-modify-writes keep the other bits.
        unsafe {
            write_volatile(RCC_AHB1ENR, read_volatile(RCC_AHB1ENR) | GPIODEN);
            write_volatile(RCC_APB1ENR, read_volatile(RCC_APB1ENR) | USART3EN);
            let moder = read_volatile(GPIOD_MODER) & !(0b1111 << 16);
            write_volatile(GPIOD_MODER, moder | 0b1010 << 16);
            let afrh = read_volatile(GPIOD_AFRH) & !0xFF;
            write_volatile(GPIOD_AFRH, afrh | 0x77);
            write_volatile(BRR, (PCLK1_HZ + BAUD / 2) / BAUD);
            write_volatile(CR1, CR1_UE_RE_TE);
        }
        Usart3 { _private: () }
    }
}

impl SerialPort for Usart3 {
    fn read_byte(&mut self) -> Result<u8, LinkError> {
        loop {
            // SAFETY: USART3's status register (see `start`); reading it has no side effect.
            let status = unsafe { read_volatile(ISR) };
            if status & ISR_ORE != 0 {
                // SAFETY: writing ORECF to ICR clears the overrun flag only.
                unsafe { write_volatile(ICR, ISR_ORE) };
                return Err(LinkError::Read);
            }
            if status & ISR_RXNE != 0 {
                // SAFETY: reading RDR takes the received byte and clears RXNE.
                return Ok(unsafe { read_volatile(RDR) } as u8);
            }
        }
    }

    fn write_byte(&mut self, byte: u8) -> Result<(), LinkError> {
        // SAFETY: USART3's status register; reading it has no side effect.
        while unsafe { read_volatile(ISR) } & ISR_TXE == 0 {}
        // SAFETY: writing TDR sends one byte once TXE is set.
        unsafe { write_volatile(TDR, byte as u32) };
        Ok(())
    }
}
