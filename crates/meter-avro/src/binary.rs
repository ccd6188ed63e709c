//! Avro binary encoding primitives (zig-zag varints, length-prefixed bytes,
//! blocked maps, big-endian two's-complement decimals). Public so that
//! other compact encodings (the processor's state changelog) reuse them.

use std::collections::BTreeMap;

use crate::DecodeError;

pub struct Writer<'a>(pub &'a mut Vec<u8>);

impl Writer<'_> {
    pub fn long(&mut self, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        while z >= 0x80 {
            self.0.push((z as u8) | 0x80);
            z >>= 7;
        }
        self.0.push(z as u8);
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.long(b.len() as i64);
        self.0.extend_from_slice(b);
    }

    pub fn string(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    pub fn boolean(&mut self, b: bool) {
        self.0.push(u8::from(b));
    }

    /// A decimal with scale 0 as the shortest big-endian two's-complement
    /// byte string, as the Avro specification and Java's BigInteger do.
    pub fn decimal(&mut self, v: i128) {
        let be = v.to_be_bytes();
        let mut start = 0;
        while start < 15 {
            let (b, next) = (be[start], be[start + 1]);
            let redundant = (b == 0x00 && next & 0x80 == 0) || (b == 0xFF && next & 0x80 != 0);
            if !redundant {
                break;
            }
            start += 1;
        }
        self.bytes(&be[start..]);
    }

    pub fn string_map(&mut self, m: &BTreeMap<String, String>) {
        if !m.is_empty() {
            self.long(m.len() as i64);
            for (k, v) in m {
                self.string(k);
                self.string(v);
            }
        }
        self.long(0);
    }
}

pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

fn malformed(msg: &str) -> DecodeError {
    DecodeError::Malformed(msg.to_owned())
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn long(&mut self) -> Result<i64, DecodeError> {
        let mut z: u64 = 0;
        let mut shift = 0;
        loop {
            let b = *self.buf.get(self.pos).ok_or_else(|| malformed("truncated: varint runs past the end"))?;
            self.pos += 1;
            if shift == 63 && b > 1 {
                return Err(malformed("varint overflows 64 bits"));
            }
            z |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 63 {
                return Err(malformed("varint longer than 10 bytes"));
            }
        }
        Ok(((z >> 1) as i64) ^ -((z & 1) as i64))
    }

    pub fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.long()?;
        let len = usize::try_from(len).map_err(|_| malformed("negative length"))?;
        let end =
            self.pos.checked_add(len).filter(|&e| e <= self.buf.len()).ok_or_else(|| malformed("truncated: length runs past the end"))?;
        let b = &self.buf[self.pos..end];
        self.pos = end;
        Ok(b)
    }

    pub fn string(&mut self) -> Result<String, DecodeError> {
        self.str().map(str::to_owned)
    }

    /// A string borrowed from the input: no allocation.
    pub fn str(&mut self) -> Result<&'a str, DecodeError> {
        let b = self.bytes()?;
        std::str::from_utf8(b).map_err(|_| malformed("string is not valid UTF-8"))
    }

    pub fn boolean(&mut self) -> Result<bool, DecodeError> {
        let b = *self.buf.get(self.pos).ok_or_else(|| malformed("truncated: boolean past the end"))?;
        self.pos += 1;
        match b {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(malformed("boolean byte is neither 0 nor 1")),
        }
    }

    pub fn decimal(&mut self) -> Result<i128, DecodeError> {
        let b = self.bytes()?;
        if b.is_empty() || b.len() > 16 {
            return Err(malformed("decimal must have 1 to 16 bytes"));
        }
        let fill = if b[0] & 0x80 != 0 { 0xFF } else { 0x00 };
        let mut be = [fill; 16];
        be[16 - b.len()..].copy_from_slice(b);
        Ok(i128::from_be_bytes(be))
    }

    pub fn string_map(&mut self) -> Result<BTreeMap<String, String>, DecodeError> {
        let mut m = BTreeMap::new();
        self.each_string_pair(|k, v| {
            m.insert(k.to_owned(), v.to_owned());
        })?;
        Ok(m)
    }

    /// Walks a map of strings without building it (same checks as
    /// [`Reader::string_map`]), calling `f` for every entry in encoding order.
    pub fn each_string_pair(&mut self, mut f: impl FnMut(&'a str, &'a str)) -> Result<(), DecodeError> {
        loop {
            let mut count = self.long()?;
            if count == 0 {
                return Ok(());
            }
            if count < 0 {
                // A negative count is followed by the block's size in bytes.
                count = count.checked_neg().ok_or_else(|| malformed("map block count overflows"))?;
                self.long()?;
            }
            // Every entry takes at least two bytes, so a count larger than
            // what is left is malformed; this also bounds the loop.
            if count as u64 > (self.buf.len() - self.pos) as u64 {
                return Err(malformed("truncated: map block count runs past the end"));
            }
            for _ in 0..count {
                let k = self.str()?;
                let v = self.str()?;
                f(k, v);
            }
        }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The input from `start` up to the current position.
    pub fn since(&self, start: usize) -> &'a [u8] {
        &self.buf[start.min(self.pos)..self.pos]
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(malformed("trailing bytes after the record"))
        }
    }
}
