//! Flash and static RAM of a firmware image, from the section headers of its ELF file
//! (32-bit little-endian ARM; "ELF for the Arm Architecture", Arm IHI 0044).

use super::DeviceError;

/// Sizes of an image's parts in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Executable sections (`.text`).
    pub code_bytes: u64,
    /// Read-only data (`.vector_table`, `.rodata`).
    pub const_bytes: u64,
    /// Initialised data (`.data`): in SRAM, with its initial values in flash.
    pub data_bytes: u64,
    /// Zeroed and uninitialised data (`.bss`, `.uninit`).
    pub bss_bytes: u64,
}

impl Footprint {
    /// Flash: code, constant data and `.data`'s initial values.
    pub fn flash_bytes(&self) -> u64 {
        self.code_bytes + self.const_bytes + self.data_bytes
    }

    /// SRAM taken before the stack: `.data + .bss + .uninit`.
    pub fn static_ram_bytes(&self) -> u64 {
        self.data_bytes + self.bss_bytes
    }

    /// Reads the footprint of an ELF image: allocated sections only, classified by their
    /// flags (`SHF_EXECINSTR`: code; `SHF_WRITE`: data, or bss when `SHT_NOBITS`; else
    /// constant data).
    pub fn of_elf(bytes: &[u8]) -> Result<Footprint, DeviceError> {
        const SHT_NOBITS: u32 = 8;
        const SHF_WRITE: u32 = 0x1;
        const SHF_ALLOC: u32 = 0x2;
        const SHF_EXECINSTR: u32 = 0x4;
        let bad = |what: &str| DeviceError::BadOutput(format!("firmware ELF: {what}"));
        if bytes.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 1, 1]) {
            return Err(bad("not a 32-bit little-endian ELF file"));
        }
        let u16_at = |at: usize| {
            bytes
                .get(at..at + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
        };
        let u32_at = |at: usize| {
            bytes
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let header = (|| Some((u32_at(0x20)?, u16_at(0x2E)?, u16_at(0x30)?)))();
        let (table, entry_size, count) = header.ok_or_else(|| bad("truncated header"))?;
        let mut footprint = Footprint::default();
        for i in 0..count as usize {
            let at = table as usize + i * entry_size as usize;
            let section = (|| Some((u32_at(at + 4)?, u32_at(at + 8)?, u32_at(at + 20)?)))();
            let (kind, flags, size) = section.ok_or_else(|| bad("truncated section table"))?;
            let size = size as u64;
            if flags & SHF_ALLOC == 0 {
                continue;
            }
            if flags & SHF_EXECINSTR != 0 {
                footprint.code_bytes += size;
            } else if flags & SHF_WRITE == 0 {
                footprint.const_bytes += size;
            } else if kind == SHT_NOBITS {
                footprint.bss_bytes += size;
            } else {
                footprint.data_bytes += size;
            }
        }
        Ok(footprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF32 image: header, then a section table of (type, flags, size) entries.
    fn elf(sections: &[(u32, u32, u32)]) -> Vec<u8> {
        let mut bytes = vec![0u8; 52];
        bytes[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 1, 1]);
        bytes[0x20..0x24].copy_from_slice(&52u32.to_le_bytes());
        bytes[0x2E..0x30].copy_from_slice(&40u16.to_le_bytes());
        bytes[0x30..0x32].copy_from_slice(&(sections.len() as u16).to_le_bytes());
        for &(kind, flags, size) in sections {
            let mut entry = [0u8; 40];
            entry[4..8].copy_from_slice(&kind.to_le_bytes());
            entry[8..12].copy_from_slice(&flags.to_le_bytes());
            entry[20..24].copy_from_slice(&size.to_le_bytes());
            bytes.extend_from_slice(&entry);
        }
        bytes
    }

    #[test]
    fn sections_are_classified_by_flags() {
        const PROGBITS: u32 = 1;
        const NOBITS: u32 = 8;
        let image = elf(&[
            (PROGBITS, 0x2, 1024),    // .vector_table: a
            (PROGBITS, 0x6, 70_000),  // .text: ax
            (PROGBITS, 0x2, 5000),    // .rodata: a
            (PROGBITS, 0x3, 300),     // .data: wa
            (NOBITS, 0x3, 60_000),    // .bss: wa
            (PROGBITS, 0x0, 999_999), // .debug_info: not allocated
        ]);
        let f = Footprint::of_elf(&image).unwrap();
        assert_eq!(
            f,
            Footprint {
                code_bytes: 70_000,
                const_bytes: 6024,
                data_bytes: 300,
                bss_bytes: 60_000,
            }
        );
        assert_eq!(f.flash_bytes(), 76_324);
        assert_eq!(f.static_ram_bytes(), 60_300);
    }

    #[test]
    fn truncated_or_foreign_files_are_errors() {
        let image = elf(&[(1, 0x6, 10)]);
        assert!(Footprint::of_elf(&image[..image.len() - 20]).is_err()); // inside the size field
        assert!(Footprint::of_elf(b"\x7fELF\x02\x01rest").is_err());
    }
}
