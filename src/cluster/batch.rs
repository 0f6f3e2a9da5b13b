//! One batch of a shard's log, as stored in the object store: the enrollments (raw
//! templates, as the caller sent them; each replica normalises them the same way) or
//! deletions committed together.
//!
//! ```text
//! "BGBATCH1" | u32 ops | ops... | crc32 of everything before
//! op: u8 kind (1 enroll, 2 delete) | u16 id length | id | enroll: u32 values | f32 LE...
//! ```

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"BGBATCH1";
const ENROLL: u8 = 1;
const DELETE: u8 = 2;

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Enroll { subject: String, templates: Vec<f32> },
    Delete { subject: String },
}

impl Op {
    pub fn subject(&self) -> &str {
        match self {
            Op::Enroll { subject, .. } | Op::Delete { subject } => subject,
        }
    }
}

pub fn encode(ops: &[Op]) -> Vec<u8> {
    let values: usize = ops
        .iter()
        .map(|o| match o {
            Op::Enroll { templates, .. } => templates.len(),
            Op::Delete { .. } => 0,
        })
        .sum();
    let mut out = Vec::with_capacity(16 + ops.len() * 64 + values * 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(ops.len() as u32).to_le_bytes());
    for op in ops {
        let (kind, subject) = match op {
            Op::Enroll { subject, .. } => (ENROLL, subject),
            Op::Delete { subject } => (DELETE, subject),
        };
        out.push(kind);
        out.extend_from_slice(&(subject.len() as u16).to_le_bytes());
        out.extend_from_slice(subject.as_bytes());
        if let Op::Enroll { templates, .. } = op {
            out.extend_from_slice(&(templates.len() as u32).to_le_bytes());
            out.extend_from_slice(bytemuck::cast_slice(templates));
        }
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

pub fn decode(bytes: &[u8], what: &str) -> Result<Vec<Op>> {
    let bad = |why: &str| Error::Corrupt(format!("batch {what}: {why}"));
    if bytes.len() < MAGIC.len() + 8 || &bytes[..8] != MAGIC {
        return Err(bad("not a biogate batch"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err(bad("checksum mismatch"));
    }
    let mut at = 8;
    let mut take = |n: usize| -> Result<&[u8]> {
        let s = body.get(at..at + n).ok_or_else(|| bad("truncated"))?;
        at += n;
        Ok(s)
    };
    let count = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
    let mut ops = Vec::with_capacity(count.min(1 << 20) as usize);
    for _ in 0..count {
        let kind = take(1)?[0];
        let len = u16::from_le_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
        let subject = std::str::from_utf8(take(len)?)
            .map_err(|_| bad("subject id is not UTF-8"))?
            .to_owned();
        ops.push(match kind {
            ENROLL => {
                let n = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
                let raw = take(n.checked_mul(4).ok_or_else(|| bad("length overflows"))?)?;
                let templates = raw
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                Op::Enroll { subject, templates }
            }
            DELETE => Op::Delete { subject },
            k => return Err(bad(&format!("unknown operation kind {k}"))),
        });
    }
    if at != body.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let ops = vec![
            Op::Enroll {
                subject: "a".into(),
                templates: vec![1.0, -2.5, 3.0, 0.25],
            },
            Op::Delete { subject: "b".into() },
        ];
        let bytes = encode(&ops);
        assert_eq!(decode(&bytes, "t").unwrap(), ops);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(decode(&bad, "t").is_err(), "flip at {i} accepted");
        }
        assert!(decode(&bytes[..bytes.len() - 1], "t").is_err());
    }
}
