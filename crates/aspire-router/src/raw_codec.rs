//! A gRPC codec that moves messages as bytes, so the router forwards Predict calls without
//! decoding their tensors: it decodes every message to [`Bytes`] and encodes any [`Buf`]
//! (`Bytes` itself, or a [`crate::wire::Forwarded`] made of shared slices).

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Encodes `E`, decodes [`Bytes`]. Server side: `RawCodec<Bytes>` both ways; client side:
/// `RawCodec<Forwarded>` sends the forwarded request and receives the worker's bytes.
pub struct RawCodec<E = Bytes>(PhantomData<fn(E)>);

impl<E> RawCodec<E> {
    /// A codec.
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<E> Default for RawCodec<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E> Clone for RawCodec<E> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<E> std::fmt::Debug for RawCodec<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawCodec")
    }
}

impl<E: Buf + Send + 'static> Codec for RawCodec<E> {
    type Encode = E;
    type Decode = Bytes;
    type Encoder = RawEncoder<E>;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

/// Copies a [`Buf`] into tonic's send buffer: the one copy of the payload on its way out.
#[derive(Debug)]
pub struct RawEncoder<E>(PhantomData<fn(E)>);

impl<E: Buf> Encoder for RawEncoder<E> {
    type Item = E;
    type Error = Status;

    fn encode(&mut self, item: E, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // One reservation, so a large message does not grow the buffer in 8 KiB steps.
        dst.reserve(item.remaining());
        dst.put(item);
        Ok(())
    }
}

/// Takes the received message out of tonic's receive buffer without copying it.
#[derive(Debug)]
pub struct RawDecoder;

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
