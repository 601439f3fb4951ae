//! Just enough of protobuf's wire format to route a `PredictRequest` without decoding its
//! tensors: walk the top-level fields, decode only field 1 (`model_spec`), and build the
//! forwarded message from a new `model_spec` plus every other field's bytes as they came.
//!
//! Every length is checked before it is used, so malformed input is an error (INVALID_ARGUMENT
//! for the client), never a panic or an out-of-bounds read.

use aspire_proto::serving::ModelSpec;
use bytes::{Buf, Bytes, BytesMut};
use prost::Message;

use crate::error::RouterError;

/// `PredictRequest.model_spec`.
const MODEL_SPEC_FIELD: u64 = 1;
/// Groups may nest; prost stops at the same depth.
const MAX_GROUP_DEPTH: u32 = 100;

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// A `PredictRequest` cut around its `model_spec`.
#[derive(Debug, Clone)]
pub struct SplitRequest {
    /// The decoded `model_spec` (several occurrences merged, as protobuf does).
    pub model_spec: ModelSpec,
    /// Every other field, as it came.
    pub other_fields: OtherFields,
}

/// The bytes of every field but `model_spec`, in their order: the slices before and
/// after it, shared with the received buffer (no copy).
#[derive(Debug, Clone, Default)]
pub struct OtherFields([Bytes; 2]);

impl OtherFields {
    /// Their total length in bytes.
    pub fn len(&self) -> usize {
        self.0.iter().map(Bytes::len).sum()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The message forwarded to a worker: the new `model_spec` field, then the other fields.
/// It is a [`Buf`] over shared slices, so the raw codec copies each byte once, straight
/// into the send buffer, and a retry re-sends it without copying.
#[derive(Debug, Clone)]
pub struct Forwarded {
    parts: [Bytes; 3],
}

impl Forwarded {
    /// `spec` as field 1, followed by `other`.
    pub fn new(spec: &ModelSpec, other: OtherFields) -> Self {
        let mut head = Vec::with_capacity(spec.encoded_len() + 11);
        prost::encoding::message::encode(MODEL_SPEC_FIELD as u32, spec, &mut head);
        let [before, after] = other.0;
        Self {
            parts: [Bytes::from(head), before, after],
        }
    }
}

impl Buf for Forwarded {
    fn remaining(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }

    fn chunk(&self) -> &[u8] {
        self.parts
            .iter()
            .find(|p| !p.is_empty())
            .map_or(&[], |p| p.as_ref())
    }

    fn advance(&mut self, mut cnt: usize) {
        for part in &mut self.parts {
            let n = cnt.min(part.len());
            part.advance(n);
            cnt -= n;
        }
        assert_eq!(cnt, 0, "advanced past the end of a forwarded message");
    }
}

/// Splits a serialized `PredictRequest` into its decoded `model_spec` and the other
/// fields' bytes. Errors are sentences for the client.
pub fn split_predict_request(body: &Bytes) -> Result<SplitRequest, RouterError> {
    split(body).map_err(|e| {
        RouterError::InvalidArgument(format!("the request is not a valid PredictRequest: {e}"))
    })
}

fn split(body: &Bytes) -> Result<SplitRequest, String> {
    let mut first: Option<FieldSpan> = None;
    let mut several = false;
    for field in Fields::new(body) {
        let field = field?;
        if field.number != MODEL_SPEC_FIELD {
            continue;
        }
        if field.wire_type != LEN {
            return Err(format!(
                "model_spec (field 1) at byte {} has wire type {}; a message has wire type 2",
                field.start, field.wire_type
            ));
        }
        several |= first.is_some();
        first.get_or_insert(field);
    }
    let Some(first) = first else {
        return Err("model_spec is missing".into());
    };
    let bad_spec = |e: prost::DecodeError| format!("model_spec is not a valid ModelSpec: {e}");
    if !several {
        let model_spec =
            ModelSpec::decode(&body[first.value_start..first.end]).map_err(bad_spec)?;
        let other = OtherFields([body.slice(..first.start), body.slice(first.end..)]);
        return Ok(SplitRequest {
            model_spec,
            other_fields: other,
        });
    }
    // Rare: several model_spec fields (a client that concatenated messages). Protobuf merges
    // them; the other fields are gathered into one new buffer.
    let mut model_spec = ModelSpec::default();
    let mut rest = BytesMut::with_capacity(body.len());
    for field in Fields::new(body) {
        let field = field?;
        if field.number == MODEL_SPEC_FIELD {
            model_spec
                .merge(&body[field.value_start..field.end])
                .map_err(bad_spec)?;
        } else {
            rest.extend_from_slice(&body[field.start..field.end]);
        }
    }
    Ok(SplitRequest {
        model_spec,
        other_fields: OtherFields([rest.freeze(), Bytes::new()]),
    })
}

/// Where one top-level field lies in the message.
#[derive(Debug, Clone, Copy)]
struct FieldSpan {
    number: u64,
    wire_type: u8,
    /// Where its tag starts.
    start: usize,
    /// Where its value starts (after a length prefix, for wire type 2).
    value_start: usize,
    /// One past its last byte.
    end: usize,
}

/// The top-level fields of a message, each checked; stops at the first error.
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self {
            buf,
            pos: 0,
            failed: false,
        }
    }

    fn next_field(&mut self) -> Result<FieldSpan, String> {
        let start = self.pos;
        let (number, wire_type) = read_tag(self.buf, &mut self.pos)?;
        let value_start = if wire_type == LEN {
            let len = read_len(self.buf, &mut self.pos, number)?;
            let value_start = self.pos;
            self.pos += len;
            value_start
        } else {
            let value_start = self.pos;
            skip_value(self.buf, &mut self.pos, number, wire_type, 0)?;
            value_start
        };
        Ok(FieldSpan {
            number,
            wire_type,
            start,
            value_start,
            end: self.pos,
        })
    }
}

impl Iterator for Fields<'_> {
    type Item = Result<FieldSpan, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.buf.len() {
            return None;
        }
        let field = self.next_field();
        self.failed = field.is_err();
        Some(field)
    }
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let start = *pos;
    let mut value = 0u64;
    for i in 0..10 {
        let Some(&byte) = buf.get(*pos) else {
            return Err(format!("the varint at byte {start} is cut off"));
        };
        *pos += 1;
        // The tenth byte holds bit 63 only.
        if i == 9 && byte > 1 {
            break;
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Ok(value);
        }
    }
    Err(format!("the varint at byte {start} overflows 64 bits"))
}

fn read_tag(buf: &[u8], pos: &mut usize) -> Result<(u64, u8), String> {
    let start = *pos;
    let key = read_varint(buf, pos)?;
    let number = key >> 3;
    if key > u64::from(u32::MAX) || number == 0 {
        return Err(format!("invalid field tag {key} at byte {start}"));
    }
    // Three bits, so the cast cannot truncate.
    Ok((number, (key & 7) as u8))
}

/// Reads a length prefix and checks that many bytes follow.
fn read_len(buf: &[u8], pos: &mut usize, number: u64) -> Result<usize, String> {
    let start = *pos;
    let len = read_varint(buf, pos)?;
    let left = buf.len() - *pos;
    usize::try_from(len)
        .ok()
        .filter(|len| *len <= left)
        .ok_or_else(|| {
            format!("field {number} at byte {start} claims {len} bytes but only {left} follow")
        })
}

fn skip_value(
    buf: &[u8],
    pos: &mut usize,
    number: u64,
    wire_type: u8,
    depth: u32,
) -> Result<(), String> {
    let skip_fixed = |pos: &mut usize, n: usize| {
        if buf.len() - *pos < n {
            return Err(format!("field {number} at byte {pos} is cut off"));
        }
        *pos += n;
        Ok(())
    };
    match wire_type {
        VARINT => read_varint(buf, pos).map(drop),
        FIXED64 => skip_fixed(pos, 8),
        FIXED32 => skip_fixed(pos, 4),
        LEN => {
            let len = read_len(buf, pos, number)?;
            *pos += len;
            Ok(())
        }
        START_GROUP => {
            if depth >= MAX_GROUP_DEPTH {
                return Err(format!("groups nest deeper than {MAX_GROUP_DEPTH}"));
            }
            loop {
                if *pos >= buf.len() {
                    return Err(format!("group field {number} is not closed"));
                }
                let (inner, inner_type) = read_tag(buf, pos)?;
                if inner_type == END_GROUP {
                    if inner == number {
                        return Ok(());
                    }
                    return Err(format!("group field {number} is closed as field {inner}"));
                }
                skip_value(buf, pos, inner, inner_type, depth + 1)?;
            }
        }
        END_GROUP => Err(format!("field {number} ends a group that was not started")),
        other => Err(format!(
            "field {number} has wire type {other}, which protobuf does not define"
        )),
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
