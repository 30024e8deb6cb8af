//! Flash and static RAM of a firmware image, from the section headers of its ELF file
//! (32-bit little-endian ARM; "ELF for the Arm Architecture", Arm IHI 0044), read with the
//! `object` crate.

use object::elf::{FileHeader32, SHF_ALLOC, SHF_EXECINSTR, SHF_WRITE, SHT_NOBITS};
use object::read::elf::{FileHeader, SectionHeader};
use object::LittleEndian;

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
        let bad = |what: &'static str| {
            move |e: object::read::Error| {
                DeviceError::BadOutput(format!("firmware ELF: {what} ({e})"))
            }
        };
        let (header, endian) = FileHeader32::<LittleEndian>::parse(bytes)
            .and_then(|header| Ok((header, header.endian()?)))
            .map_err(bad("not a 32-bit little-endian ELF file"))?;
        let sections = header
            .section_headers(endian, bytes)
            .map_err(bad("bad section table"))?;
        let mut footprint = Footprint::default();
        for section in sections {
            let flags = section.sh_flags(endian);
            let size = u64::from(section.sh_size(endian));
            if !flags.contains(SHF_ALLOC) {
                continue;
            }
            if flags.contains(SHF_EXECINSTR) {
                footprint.code_bytes += size;
            } else if !flags.contains(SHF_WRITE) {
                footprint.const_bytes += size;
            } else if section.sh_type(endian) == SHT_NOBITS {
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
        bytes[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 1, 1, 1]);
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
        for len in 0..image.len() {
            assert!(Footprint::of_elf(&image[..len]).is_err(), "{len} bytes");
        }
    }

    #[test]
    fn garbage_and_foreign_headers_are_errors() {
        let image = elf(&[(1, 0x6, 10)]);
        let with = |at: usize, bytes: &[u8]| {
            let mut image = image.clone();
            image[at..at + bytes.len()].copy_from_slice(bytes);
            Footprint::of_elf(&image)
        };
        assert!(with(0, &[0; 4]).is_err()); // no magic
        assert!(with(4, &[2]).is_err()); // 64-bit
        assert!(with(5, &[2]).is_err()); // big-endian
        assert!(with(0x20, &u32::MAX.to_le_bytes()).is_err()); // table past the end
        assert!(with(0x2E, &64u16.to_le_bytes()).is_err()); // entry size of ELF64
        assert!(with(0x30, &u16::MAX.to_le_bytes()).is_err()); // more entries than bytes
        let e = with(4, &[2]).unwrap_err().to_string();
        assert!(e.contains("not a 32-bit little-endian ELF file"), "{e}");
    }

    #[test]
    fn noise_after_the_identification_never_panics() {
        let mut image = elf(&[(1, 0x6, 10), (8, 0x3, 20)]);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            for byte in &mut image[16..] {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte = state as u8;
            }
            let _ = Footprint::of_elf(&image);
        }
    }
}
