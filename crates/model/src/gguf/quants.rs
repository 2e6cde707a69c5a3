//! ggml's tensor types and the block decoders for the ones safeprobe imports.
//!
//! A quantised tensor is a sequence of blocks, each holding a fixed number of values (32 for
//! the legacy types, 256 for the K-quants) as small integers with f16 scales. The layouts
//! follow ggml's `ggml-common.h`; each decoder is checked against gguf-py's numpy decoder.

use half::{bf16, f16};

/// A ggml type by its id in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType(u32);

/// (id, name, values per block, bytes per block) of every type ggml defines, so a tensor of a
/// type we cannot decode still gets its size checked and its type named in the refusal.
const TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

/// The types `dequantize` decodes.
pub const SUPPORTED: [&str; 10] = [
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K",
];

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        TYPES.iter().any(|t| t.0 == id).then_some(Self(id))
    }
    fn entry(self) -> &'static (u32, &'static str, u64, u64) {
        TYPES
            .iter()
            .find(|t| t.0 == self.0)
            .expect("checked in from_id")
    }
    pub fn name(self) -> &'static str {
        self.entry().1
    }
    /// The bytes `elements` values take, refusing rows that do not fill whole blocks.
    pub fn byte_len(self, elements: u64, row_len: u64) -> Result<u64, String> {
        let &(_, name, block_len, block_bytes) = self.entry();
        if row_len % block_len != 0 {
            return Err(format!(
                "rows of {row_len} values do not divide into {name} blocks of {block_len}"
            ));
        }
        Ok(elements / block_len * block_bytes)
    }
}

/// Decodes `count` values of type `ty` from `bytes` (whose length the caller has checked).
pub fn dequantize(ty: GgmlType, bytes: &[u8], count: usize) -> Result<Vec<f32>, String> {
    let mut out = Vec::with_capacity(count);
    match ty.name() {
        "F32" => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap())),
        ),
        "F16" => out.extend(bytes.chunks_exact(2).map(|b| half_at(b, 0))),
        "BF16" => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        "Q8_0" => blocks(bytes, 34, &mut out, q8_0),
        "Q4_0" => blocks(bytes, 18, &mut out, q4_0),
        "Q4_1" => blocks(bytes, 20, &mut out, q4_1),
        "Q5_0" => blocks(bytes, 22, &mut out, q5_0),
        "Q5_1" => blocks(bytes, 24, &mut out, q5_1),
        "Q4_K" => blocks(bytes, 144, &mut out, q4_k),
        "Q6_K" => blocks(bytes, 210, &mut out, q6_k),
        other => {
            return Err(format!(
                "type {other} is not supported (supported: {})",
                SUPPORTED.join(", ")
            ));
        }
    }
    debug_assert_eq!(out.len(), count);
    Ok(out)
}

fn blocks(bytes: &[u8], block_bytes: usize, out: &mut Vec<f32>, decode: fn(&[u8], &mut Vec<f32>)) {
    for block in bytes.chunks_exact(block_bytes) {
        decode(block, out);
    }
}

fn half_at(block: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// 32 values: f16 scale, 32 signed bytes.
fn q8_0(block: &[u8], out: &mut Vec<f32>) {
    let d = half_at(block, 0);
    out.extend(block[2..34].iter().map(|&q| d * f32::from(q as i8)));
}

/// 32 values: f16 scale, 16 bytes of 4-bit values (low nibbles first), offset by 8.
fn q4_0(block: &[u8], out: &mut Vec<f32>) {
    let d = half_at(block, 0);
    let qs = &block[2..18];
    out.extend(qs.iter().map(|&q| d * (f32::from(q & 0xF) - 8.0)));
    out.extend(qs.iter().map(|&q| d * (f32::from(q >> 4) - 8.0)));
}

/// 32 values: f16 scale and minimum, 16 bytes of unsigned 4-bit values.
fn q4_1(block: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (half_at(block, 0), half_at(block, 2));
    let qs = &block[4..20];
    out.extend(qs.iter().map(|&q| d * f32::from(q & 0xF) + m));
    out.extend(qs.iter().map(|&q| d * f32::from(q >> 4) + m));
}

/// The fifth bits of a Q5 block's 32 values, as 0 or 16 for value `j`.
fn fifth_bit(qh: u32, j: usize) -> u8 {
    (((qh >> j) & 1) << 4) as u8
}

/// 32 values: f16 scale, 32 fifth bits, 16 bytes of low nibbles; offset by 16.
fn q5_0(block: &[u8], out: &mut Vec<f32>) {
    let d = half_at(block, 0);
    let qh = u32::from_le_bytes(block[2..6].try_into().unwrap());
    let qs = &block[6..22];
    for half in 0..2 {
        out.extend(qs.iter().enumerate().map(|(j, &q)| {
            let low = if half == 0 { q & 0xF } else { q >> 4 };
            d * (f32::from(low | fifth_bit(qh, j + 16 * half)) - 16.0)
        }));
    }
}

/// 32 values: f16 scale and minimum, 32 fifth bits, 16 bytes of low nibbles.
fn q5_1(block: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (half_at(block, 0), half_at(block, 2));
    let qh = u32::from_le_bytes(block[4..8].try_into().unwrap());
    let qs = &block[8..24];
    for half in 0..2 {
        out.extend(qs.iter().enumerate().map(|(j, &q)| {
            let low = if half == 0 { q & 0xF } else { q >> 4 };
            d * f32::from(low | fifth_bit(qh, j + 16 * half)) + m
        }));
    }
}

/// The 6-bit scale and minimum of sub-block `j` (of 8), packed into 12 bytes.
fn k4_scale_min(scales: &[u8], j: usize) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    };
    (f32::from(sc), f32::from(m))
}

/// 256 values in 8 sub-blocks of 32, each with a 6-bit scale and minimum under the block's
/// f16 `d` and `dmin`; 4-bit values, two sub-blocks sharing each 32 bytes.
fn q4_k(block: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (half_at(block, 0), half_at(block, 2));
    let scales = &block[4..16];
    let qs = &block[16..144];
    for pair in 0..4 {
        let q = &qs[32 * pair..32 * pair + 32];
        for (sub, shift) in [(2 * pair, 0), (2 * pair + 1, 4)] {
            let (sc, m) = k4_scale_min(scales, sub);
            let (scale, min) = (d * sc, dmin * m);
            out.extend(
                q.iter()
                    .map(|&b| scale * f32::from((b >> shift) & 0xF) - min),
            );
        }
    }
}

/// 256 values in 16 sub-blocks of 16 with signed 8-bit scales under the block's f16 `d`;
/// 6-bit values split into low nibbles (`ql`) and high bit pairs (`qh`), offset by 32.
fn q6_k(block: &[u8], out: &mut Vec<f32>) {
    let (ql, qh, scales) = (&block[0..128], &block[128..192], &block[192..208]);
    let d = half_at(block, 208);
    for half in 0..2 {
        let (ql, qh, sc) = (
            &ql[64 * half..64 * half + 64],
            &qh[32 * half..32 * half + 32],
            &scales[8 * half..8 * half + 8],
        );
        // Four runs of 32 values: (low-nibble source, nibble shift, high-bit shift).
        for (run, (ql_at, nibble_shift, high_shift)) in
            [(0, 0, 0), (32, 0, 2), (0, 4, 4), (32, 4, 6)]
                .into_iter()
                .enumerate()
        {
            out.extend((0..32).map(|l| {
                let low = (ql[ql_at + l] >> nibble_shift) & 0xF;
                let high = (qh[l] >> high_shift) & 3;
                let q = i32::from(low | (high << 4)) - 32;
                let scale = f32::from(sc[l / 16 + 2 * run] as i8);
                d * scale * q as f32
            }));
        }
    }
}
