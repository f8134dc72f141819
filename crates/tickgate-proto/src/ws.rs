//! RFC 6455 framing of what the server sends: a final, unmasked frame's header (§5.2). The
//! server writes its data frames itself (header, then the payload where it lies), and the
//! load tools write the same frames, so both build the header here.

/// Opcode of a text frame.
pub const TEXT: u8 = 0x1;
/// Opcode of a binary frame.
pub const BINARY: u8 = 0x2;

/// The header of a final, unmasked frame with `opcode` and a payload of `len` bytes, in
/// the shortest length encoding (§5.2 requires it): the bytes and how many of them count
/// (2, 4 or 10).
#[inline]
pub fn server_header(opcode: u8, len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = 0x80 | (opcode & 0x0f);
    let n = if len < 126 {
        h[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (h, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_use_the_shortest_encoding() {
        assert_eq!(server_header(BINARY, 3), ([0x82, 3, 0, 0, 0, 0, 0, 0, 0, 0], 2));
        assert_eq!(server_header(TEXT, 125).1, 2);
        let (h, n) = server_header(TEXT, 126);
        assert_eq!((&h[..n], n), (&[0x81, 126, 0, 126][..], 4));
        assert_eq!(server_header(BINARY, 65_535).1, 4);
        let (h, n) = server_header(BINARY, 65_536);
        assert_eq!((h[1], n), (127, 10));
        assert_eq!(&h[2..10], &65_536u64.to_be_bytes());
    }
}
