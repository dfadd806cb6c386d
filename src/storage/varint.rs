//! LEB128 varints, the one codec for every varint on disk: record fields (`record`) and group
//! events (`broker::groups::events`). Signed values use zigzag encoding.

/// Appends `v` as an unsigned varint.
#[inline]
pub fn put_u(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// Appends `v` as a zigzag varint.
#[inline]
pub fn put_i(buf: &mut Vec<u8>, v: i64) {
    put_u(buf, zigzag(v));
}

/// Bytes [`put_u`] writes for `v`.
#[inline]
pub fn len_u(v: u64) -> usize {
    // One byte per started group of 7 bits; zero takes one byte.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Bytes [`put_i`] writes for `v`.
#[inline]
pub fn len_i(v: i64) -> usize {
    len_u(zigzag(v))
}

#[inline]
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// Why a varint does not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// The bytes end inside it.
    CutShort,
    TooLong,
}

impl Malformed {
    /// A message for the caller's context; `cut_short` says what a cut varint means there.
    pub fn describe(self, cut_short: &'static str) -> &'static str {
        match self {
            Malformed::CutShort => cut_short,
            Malformed::TooLong => "varint longer than 10 bytes",
        }
    }
}

/// Reads an unsigned varint from `buf[*pos..end]`, moving `pos` past it.
#[inline]
pub fn get_u(buf: &[u8], pos: &mut usize, end: usize) -> Result<u64, Malformed> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        if *pos >= end.min(buf.len()) {
            return Err(Malformed::CutShort);
        }
        let b = buf[*pos];
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(Malformed::TooLong)
}

/// Reads a zigzag varint (see [`get_u`]).
#[inline]
pub fn get_i(buf: &[u8], pos: &mut usize, end: usize) -> Result<i64, Malformed> {
    let u = get_u(buf, pos, end)?;
    Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_lengths_match_what_is_written() {
        let unsigned = [
            0u64,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ];
        for v in unsigned {
            let mut buf = Vec::new();
            put_u(&mut buf, v);
            assert_eq!(buf.len(), len_u(v), "{v}");
            let mut pos = 0;
            assert_eq!(get_u(&buf, &mut pos, buf.len()), Ok(v));
            assert_eq!(pos, buf.len());
            // Cut anywhere: an error, never a wrong value.
            for cut in 0..buf.len() {
                assert!(get_u(&buf[..cut], &mut 0, cut).is_err(), "{v} cut at {cut}");
            }
        }
        for v in [0i64, -1, 1, -64, 64, i64::MIN, i64::MAX] {
            let mut buf = Vec::new();
            put_i(&mut buf, v);
            assert_eq!(buf.len(), len_i(v), "{v}");
            assert_eq!(get_i(&buf, &mut 0, buf.len()), Ok(v));
        }
        assert_eq!(get_u(&[0x80; 11], &mut 0, 11), Err(Malformed::TooLong));
    }
}
