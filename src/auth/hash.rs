//! The one SHA-256 of the crate (client secrets, ticket digests, key thumbprints) and the
//! crypto provider's constant-time comparison, so no module hand-writes either.

/// SHA-256 of `data`.
pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Whether `a` and `b` are equal, in time that depends only on their length (aws-lc's
/// constant-time comparison): for secrets, where an early exit would leak how much of a
/// guess was right.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_abc_and_comparison() {
        // FIPS 180-2 test vector.
        let abc = sha256(b"abc");
        assert_eq!(abc[..4], [0xba, 0x78, 0x16, 0xbf]);
        assert_eq!(abc[28..], [0xf2, 0x00, 0x15, 0xad]);
        assert!(constant_time_eq(&abc, &sha256(b"abc")));
        assert!(!constant_time_eq(&abc, &sha256(b"abd")));
        assert!(!constant_time_eq(b"ab", b"abc"));
    }
}
