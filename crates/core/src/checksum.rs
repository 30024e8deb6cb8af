//! CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), bitwise: no table in flash.

/// CRC-32 of `data`, continuing from `crc` (start with 0).
pub fn crc32_update(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &byte in data {
        c ^= byte as u32;
        for _ in 0..8 {
            let mask = (c & 1).wrapping_neg();
            c = (c >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !c
}

/// CRC-32 of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    crc32_update(0, data)
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_value() {
        assert_eq!(super::crc32(b"123456789"), 0xCBF4_3926);
        let split = super::crc32_update(super::crc32(b"1234"), b"56789");
        assert_eq!(split, 0xCBF4_3926);
    }
}
