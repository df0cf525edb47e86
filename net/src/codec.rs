//! The request-response codec: frames of [`crate::proto`] on a libp2p stream.
//!
//! A request that is framed correctly but does not decode is handed to the
//! holder as an `Err`, so the holder can answer `BadRequest` or
//! `UnsupportedVersion` instead of dropping the stream. A frame whose length
//! exceeds the limit is an I/O error: its body is never read.

use std::io;

use futures::prelude::*;
use libp2p::StreamProtocol;
use libp2p::request_response;

use crate::proto::{self, DecodeError, LEN_PREFIX, Request, Response};

/// The libp2p protocol name of block exchange; its last part follows [`proto::VERSION`].
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/fincrypt/blocks/1");

/// An inbound request, or why its body did not decode.
pub type InboundRequest = Result<Request, DecodeError>;

/// Frames requests and responses with a length prefix and a version byte.
#[derive(Clone, Copy, Debug, Default)]
pub struct Codec;

async fn read_body<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Vec<u8>> {
    let mut prefix = [0u8; LEN_PREFIX];
    io.read_exact(&mut prefix).await?;
    let len =
        proto::frame_len(prefix).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    read_announced(io, len).await
}

/// Reads the `len` bytes a peer announced.
///
/// The whole length is reserved at once, which costs address space only:
/// memory is written (zeroed, then filled) a step at a time as bytes arrive,
/// so a peer that announces much and sends little makes us commit little,
/// and the buffer is never moved to grow.
async fn read_announced<T: AsyncRead + Unpin>(io: &mut T, len: usize) -> io::Result<Vec<u8>> {
    const STEP: usize = 256 << 10;
    let mut body = Vec::with_capacity(len);
    while body.len() < len {
        let start = body.len();
        let end = (start + STEP).min(len);
        body.resize(end, 0);
        if let Err(e) = io.read_exact(&mut body[start..end]).await {
            return Err(match e.kind() {
                io::ErrorKind::UnexpectedEof => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    DecodeError::Truncated("stream ended inside a frame"),
                ),
                _ => e,
            });
        }
    }
    Ok(body)
}

/// Writes a frame given as head and tail (a block's bytes go out as they are, uncopied).
async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    (head, tail): (Vec<u8>, bytes::Bytes),
) -> io::Result<()> {
    io.write_all(&head).await?;
    if !tail.is_empty() {
        io.write_all(&tail).await?;
    }
    io.flush().await?;
    io.close().await
}

fn invalid_input(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}

impl request_response::Codec for Codec {
    type Protocol = StreamProtocol;
    type Request = InboundRequest;
    type Response = Response;

    async fn read_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<InboundRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        let body = read_body(io).await?;
        Ok(proto::decode_request_bytes(body.into()))
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        let body = read_body(io).await?;
        proto::decode_response_bytes(body.into())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: InboundRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        // Only the node's own Client sends requests, and always Ok ones.
        let request = request.map_err(invalid_input)?;
        let parts = proto::encode_request_parts(&request).map_err(invalid_input)?;
        write_frame(io, parts).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let parts = proto::encode_response_parts(&response).map_err(invalid_input)?;
        write_frame(io, parts).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use fincrypt_blockstore::Score;
    use futures::io::Cursor;
    use libp2p::request_response::Codec as _;

    fn run<F: Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    #[test]
    fn requests_and_responses_cross_a_stream() {
        let request = Request::Put {
            score: Score([3; 32]),
            data: Bytes::from(vec![5u8; 100_000]),
        };
        let mut wire = Cursor::new(Vec::new());
        run(Codec.write_request(&PROTOCOL, &mut wire, Ok(request.clone()))).unwrap();
        wire.set_position(0);
        let got = run(Codec.read_request(&PROTOCOL, &mut wire)).unwrap();
        assert_eq!(got, Ok(request));

        let response = Response::Stored;
        let mut wire = Cursor::new(Vec::new());
        run(Codec.write_response(&PROTOCOL, &mut wire, response.clone())).unwrap();
        wire.set_position(0);
        assert_eq!(
            run(Codec.read_response(&PROTOCOL, &mut wire)).unwrap(),
            response
        );
    }

    #[test]
    fn an_oversized_frame_is_refused_from_its_prefix() {
        let mut bytes = u32::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let err = run(Codec.read_request(&PROTOCOL, &mut Cursor::new(bytes))).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_short_frame_is_an_error_and_garbage_is_a_bad_request() {
        let mut bytes = 100u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[1; 10]);
        let err = run(Codec.read_request(&PROTOCOL, &mut Cursor::new(bytes))).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);

        let mut bytes = 3u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[proto::VERSION, 250, 250]);
        let got = run(Codec.read_request(&PROTOCOL, &mut Cursor::new(bytes))).unwrap();
        assert!(matches!(got, Err(DecodeError::Malformed(_))));
    }
}
