//! The peer protocol's messages and their wire format (docs/FORMATS.md, "Peer protocol").
//!
//! A message travels as one frame: a 4-byte little-endian length `N`, then `N`
//! bytes of body. The body starts with the protocol version (one byte) and
//! continues with the postcard encoding of a [`Request`] or [`Response`].
//! Frames longer than [`MAX_FRAME_LEN`] are refused from their length alone,
//! before anything is allocated. Decoding never panics: whatever the bytes,
//! the result is a message or a [`DecodeError`].

use std::fmt;

use bytes::Bytes;
use fincrypt_blockstore::block::MAX_PLAINTEXT;
use fincrypt_blockstore::{Proof, Score};
use serde::{Deserialize, Serialize};

/// The protocol version this program speaks; the first byte of every body.
pub const VERSION: u8 = 1;

/// The largest block a peer sends or accepts: a full plaintext plus room for
/// the block format's header and tags (a test seals the largest block to
/// check it fits), and never more than a score may name.
pub const MAX_BLOCK_LEN: usize = MAX_PLAINTEXT + (64 << 10);
const _: () = assert!(MAX_BLOCK_LEN <= fincrypt_blockstore::score::MAX_BLOCK_LEN);

/// The largest frame body: one maximal block plus room for the message around it.
pub const MAX_FRAME_LEN: usize = MAX_BLOCK_LEN + 4096;

/// Bytes of the length prefix in front of every body.
pub const LEN_PREFIX: usize = 4;

/// The most scores one `Has` or `Release` may name.
pub const MAX_SCORES: usize = 65_536;

/// Bytes of a score on the wire.
const SCORE_LEN: usize = 32;

/// Bytes of a challenge nonce.
pub const NONCE_LEN: usize = 32;

/// The longest detail text an error response carries; longer text is cut.
pub const MAX_DETAIL_LEN: usize = 512;

/// What one peer asks of another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Hold this block for me; the holder checks it against `score`.
    Put { score: Score, data: Bytes },
    /// Send me this block.
    Get { score: Score },
    /// Which of these blocks do you hold?
    Has { scores: Vec<Score> },
    /// Prove you hold this block: answer with the segment the nonce selects.
    Challenge {
        score: Score,
        nonce: [u8; NONCE_LEN],
    },
    /// I no longer need you to hold these blocks (only the peer that placed a block may).
    Release { scores: Vec<Score> },
    /// How much room do you offer, and how much of it is used?
    Space,
    /// Open a bulk connection for me, keyed with `key` (see [`crate::bulk`]);
    /// sent only over the libp2p connection, which authenticates and hides it.
    Bulk { key: BulkKey },
    // New variants go last: postcard names a variant by its index.
    /// Keep this owner's root record (a [`crate::root::SignedRoot`]) if it is
    /// valid and newer than the one kept; see docs/FORMATS.md, "Root slots".
    PutRoot { record: Bytes },
    /// Send me the root record you keep for the owner with this public key.
    GetRoot { owner: [u8; 32] },
    /// I am a device of this owner (its signature of my PeerId): my
    /// releases also count for what its other devices placed.
    Bind { owner: [u8; 32], signature: Vec<u8> },
    /// What do you charge, and how much room do you have? (A signed offer,
    /// see `fincrypt-market`.)
    Offer,
    /// Hold my blocks on these terms: an owner-signed contract proposal.
    Propose { proposal: Bytes },
    /// I paid you for these periods of our contract in this transaction
    /// (a notice of `fincrypt-market`; the holder checks its wallet).
    Paid { notice: Bytes },
    /// A client's request to its mediator (a `fincrypt-market` message,
    /// opaque here).
    Mediate { message: Bytes },
    /// Hold this block for `owner` (PeerId bytes): sent by the node that
    /// pays for the owner (its mediator) under a contract of the owner's
    /// with this holder, to copy a block from another holder while the
    /// owner is away. The placement is the owner's, as if it had put it.
    PutFor {
        owner: Vec<u8>,
        score: Score,
        data: Bytes,
    },
}

/// The largest offer, proposal or contract sent between nodes.
pub const MAX_MARKET_MESSAGE_LEN: usize = 1024;
/// The largest message between a client and its mediator, either way.
pub const MAX_MEDIATE_LEN: usize = 256 << 10;

/// The AES-256-GCM key of one bulk connection, chosen at random by the peer
/// that opens it. Never printed, and wiped from memory when dropped.
#[derive(
    Clone, PartialEq, Eq, Serialize, Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop,
)]
pub struct BulkKey(pub [u8; 32]);

impl fmt::Debug for BulkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BulkKey(..)")
    }
}

/// A holder's answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The block of a `Put` is durably stored (or already was).
    Stored,
    /// The block of a `Get`.
    Block { data: Bytes },
    /// For a `Has`: bit `i` is set when the holder holds `scores[i]`.
    Have { held: Bitmap },
    /// For a `Challenge`: the proof of the segment the nonce selects.
    Proof { proof: Proof },
    /// For a `Release`: bit `i` is set when the requester's placement of
    /// `scores[i]` was recorded and is now removed.
    Released { released: Bitmap },
    /// For `Space`: bytes offered to peers in all, and bytes of it in use.
    Space { capacity: u64, used: u64 },
    /// The request was refused or failed.
    Error(ErrorCode),
    // New variants go last: postcard names a variant by its index.
    /// For `Bulk`: connect over TCP to `port` at the address this libp2p
    /// connection reaches, and send `session` first.
    Bulk { port: u16, session: [u8; 16] },
    /// For `GetRoot`: the record kept for that owner, if any.
    Root { record: Option<Bytes> },
    /// For `Offer`: the holder's signed offer.
    Offer { offer: Bytes },
    /// For `Propose`: the contract, signed by both.
    Contract { contract: Bytes },
    /// For `Paid`: the notice is kept.
    Noted,
    /// For `Mediate`: the mediator's answer (a `fincrypt-market` message).
    Mediated { message: Bytes },
}

/// Why a holder refused or could not serve a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ErrorCode {
    /// Storing the block would exceed the room the holder offers.
    #[error("the holder is full ({free} bytes free)")]
    Full { free: u64 },
    /// The holder does not hold this block (never had it, released it, or lost it).
    #[error("the holder does not hold this block")]
    UnknownBlock,
    /// The request was malformed or exceeded a limit.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The data of a `Put` does not match its score.
    #[error("the data does not match the score")]
    ScoreMismatch,
    /// The request's protocol version is not one the holder speaks.
    #[error("unsupported protocol version (the holder speaks {supported})")]
    UnsupportedVersion { supported: u8 },
    /// The holder failed on its side (for example a disk error); it may succeed later.
    #[error("the holder could not serve the request now")]
    Unavailable,
    /// For `PutRoot`: the holder keeps a record of this owner whose sequence
    /// is `sequence`, not lower than the one offered.
    #[error("the holder keeps a newer root record (sequence {sequence})")]
    Stale { sequence: u64 },
    /// The holder stores for pay, at `price` satoshis per GiB per period,
    /// and has no contract with the requester.
    #[error("the holder stores only under contract ({price} sats per GiB per period)")]
    NoContract { price: u64 },
    /// The holder takes no contracts, or not on these terms.
    #[error("the holder refused the contract: {0}")]
    Refused(String),
    /// The holder takes no new blocks from the requester, whose contract
    /// has gone `periods` periods unpaid.
    #[error("the holder takes no new blocks: {periods} periods of the contract are unpaid")]
    Unpaid { periods: u64 },
}

impl ErrorCode {
    /// A `BadRequest` whose text is cut to [`MAX_DETAIL_LEN`] bytes.
    pub fn bad_request(detail: impl fmt::Display) -> ErrorCode {
        ErrorCode::BadRequest(cut(detail))
    }

    /// A `Refused` whose text is cut to [`MAX_DETAIL_LEN`] bytes.
    pub fn refused(detail: impl fmt::Display) -> ErrorCode {
        ErrorCode::Refused(cut(detail))
    }
}

/// `detail` as text of at most [`MAX_DETAIL_LEN`] bytes.
fn cut(detail: impl fmt::Display) -> String {
    let mut s = detail.to_string();
    if s.len() > MAX_DETAIL_LEN {
        let mut end = MAX_DETAIL_LEN;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// A packed list of booleans: bit `i` is bit `i % 8` (least significant first) of byte `i / 8`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bitmap {
    len: u32,
    bits: Vec<u8>,
}

impl Bitmap {
    /// Packs `values`.
    pub fn from_bools(values: impl IntoIterator<Item = bool>) -> Bitmap {
        let mut bits = Vec::new();
        let mut len = 0u32;
        for v in values {
            let i = len as usize;
            if i.is_multiple_of(8) {
                bits.push(0);
            }
            if v {
                bits[i / 8] |= 1 << (i % 8);
            }
            len += 1;
        }
        Bitmap { len, bits }
    }

    /// Number of booleans.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// True when there are no booleans.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bit `i`; false past the end.
    pub fn get(&self, i: usize) -> bool {
        i < self.len()
            && self
                .bits
                .get(i / 8)
                .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// The booleans, unpacked.
    pub fn to_bools(&self) -> Vec<bool> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }

    /// True when the byte count matches the length (a decoded bitmap may not).
    pub fn is_well_formed(&self) -> bool {
        self.bits.len() == self.len().div_ceil(8)
    }
}

impl fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Bitmap({} of {})",
            self.to_bools().iter().filter(|b| **b).count(),
            self.len
        )
    }
}

/// Why bytes are not a valid message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame (or its announced length) exceeds [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: usize },
    /// The frame ends before its announced length.
    #[error("frame truncated: {0}")]
    Truncated(&'static str),
    /// The body announces a protocol version this program does not speak.
    #[error("unsupported protocol version {0} (this program speaks {VERSION})")]
    UnsupportedVersion(u8),
    /// The body is not a valid message of this version.
    #[error("malformed message: {0}")]
    Malformed(String),
}

impl DecodeError {
    /// The error code a holder answers this decoding failure with.
    pub fn to_code(&self) -> ErrorCode {
        match self {
            DecodeError::UnsupportedVersion(_) => {
                ErrorCode::UnsupportedVersion { supported: VERSION }
            }
            other => ErrorCode::bad_request(other),
        }
    }
}

/// Why a message cannot be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The message would exceed a protocol limit.
    #[error("message exceeds a protocol limit: {0}")]
    TooLarge(String),
    /// postcard refused the message (not expected for these types).
    #[error("cannot encode message: {0}")]
    Postcard(String),
}

impl Request {
    /// Checks the limits a receiver enforces, so a sender fails early and clearly.
    pub fn check_limits(&self) -> Result<(), String> {
        match self {
            Request::Put { data, .. } | Request::PutFor { data, .. }
                if data.len() > MAX_BLOCK_LEN =>
            {
                Err(format!(
                    "a block of {} bytes exceeds the limit of {MAX_BLOCK_LEN} bytes",
                    data.len()
                ))
            }
            Request::PutFor { owner, .. } if owner.len() > 64 => {
                Err("an owner's PeerId of more than 64 bytes".into())
            }
            Request::Has { scores } | Request::Release { scores } if scores.len() > MAX_SCORES => {
                Err(format!(
                    "{} scores exceed the limit of {MAX_SCORES} per request",
                    scores.len()
                ))
            }
            Request::Bind { signature, .. } if signature.len() > 64 => {
                Err("a binding signature is 64 bytes".into())
            }
            Request::Propose { proposal: m } | Request::Paid { notice: m }
                if m.len() > MAX_MARKET_MESSAGE_LEN =>
            {
                Err(format!("a market message of {} bytes", m.len()))
            }
            Request::Mediate { message } if message.len() > MAX_MEDIATE_LEN => {
                Err(format!("a mediator message of {} bytes", message.len()))
            }
            Request::PutRoot { record } if record.len() > crate::root::MAX_ROOT_RECORD_LEN => {
                Err(format!(
                    "a root record of {} bytes exceeds the limit of {} bytes",
                    record.len(),
                    crate::root::MAX_ROOT_RECORD_LEN
                ))
            }
            _ => Ok(()),
        }
    }
}

impl Response {
    /// Checks the limits a receiver enforces on a response.
    pub fn check_limits(&self) -> Result<(), String> {
        match self {
            Response::Block { data } if data.len() > MAX_BLOCK_LEN => Err(format!(
                "a block of {} bytes exceeds the limit of {MAX_BLOCK_LEN} bytes",
                data.len()
            )),
            Response::Have { held: map } | Response::Released { released: map }
                if map.len() > MAX_SCORES || !map.is_well_formed() =>
            {
                Err("bitmap is malformed or longer than the score limit".into())
            }
            Response::Proof { proof } if proof.segment.len() > MAX_BLOCK_LEN => {
                Err("proof segment exceeds the block limit".into())
            }
            Response::Offer { offer: m } | Response::Contract { contract: m }
                if m.len() > MAX_MARKET_MESSAGE_LEN =>
            {
                Err(format!("a market message of {} bytes", m.len()))
            }
            Response::Mediated { message } if message.len() > MAX_MEDIATE_LEN => {
                Err(format!("a mediator message of {} bytes", message.len()))
            }
            Response::Error(ErrorCode::Refused(why)) if why.len() > MAX_DETAIL_LEN => {
                Err("an error detail over the limit".into())
            }
            Response::Root { record: Some(r) } if r.len() > crate::root::MAX_ROOT_RECORD_LEN => {
                Err("root record exceeds its limit".into())
            }
            _ => Ok(()),
        }
    }
}

/// Encodes a request as a whole frame (length prefix included).
pub fn encode_request(request: &Request) -> Result<Vec<u8>, EncodeError> {
    request.check_limits().map_err(EncodeError::TooLarge)?;
    encode_frame(request)
}

/// Encodes a response as a whole frame (length prefix included).
pub fn encode_response(response: &Response) -> Result<Vec<u8>, EncodeError> {
    response.check_limits().map_err(EncodeError::TooLarge)?;
    encode_frame(response)
}

fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&[0; LEN_PREFIX]);
    out.push(VERSION);
    let mut out =
        postcard::to_extend(message, out).map_err(|e| EncodeError::Postcard(e.to_string()))?;
    let body = out.len() - LEN_PREFIX;
    if body > MAX_FRAME_LEN {
        return Err(EncodeError::TooLarge(format!(
            "frame of {body} bytes exceeds the limit of {MAX_FRAME_LEN} bytes"
        )));
    }
    // body <= MAX_FRAME_LEN, which fits in u32.
    out[..LEN_PREFIX].copy_from_slice(&(body as u32).to_le_bytes());
    Ok(out)
}

/// Encodes a request as a frame in two parts, `head` then `tail`, whose
/// concatenation is [`encode_request`]'s frame: a `Put`'s block is the tail,
/// so a sender writes it to the stream without copying it into the frame.
pub fn encode_request_parts(request: &Request) -> Result<(Vec<u8>, Bytes), EncodeError> {
    request.check_limits().map_err(EncodeError::TooLarge)?;
    match request {
        Request::Put { score, data } => {
            let empty = Request::Put {
                score: *score,
                data: Bytes::new(),
            };
            Ok((encode_head(&empty, data.len())?, data.clone()))
        }
        other => Ok((encode_frame(other)?, Bytes::new())),
    }
}

/// As [`encode_request_parts`], for responses: a `Block`'s data is the tail.
pub fn encode_response_parts(response: &Response) -> Result<(Vec<u8>, Bytes), EncodeError> {
    response.check_limits().map_err(EncodeError::TooLarge)?;
    match response {
        Response::Block { data } => {
            let empty = Response::Block { data: Bytes::new() };
            Ok((encode_head(&empty, data.len())?, data.clone()))
        }
        other => Ok((encode_frame(other)?, Bytes::new())),
    }
}

/// The frame of `empty` (a message whose last field is empty bytes) with
/// that field's length set to `tail` bytes, which the caller sends after it.
fn encode_head<T: Serialize>(empty: &T, tail: usize) -> Result<Vec<u8>, EncodeError> {
    let mut head = encode_frame(empty)?;
    // postcard ends the message with the bytes' length, a varint: 0 is one zero byte.
    if head.pop() != Some(0) {
        return Err(EncodeError::Postcard("unexpected message layout".into()));
    }
    let mut head = postcard::to_extend(&(tail as u64), head)
        .map_err(|e| EncodeError::Postcard(e.to_string()))?;
    let body = head.len() - LEN_PREFIX + tail;
    if body > MAX_FRAME_LEN {
        return Err(EncodeError::TooLarge(format!(
            "frame of {body} bytes exceeds the limit of {MAX_FRAME_LEN} bytes"
        )));
    }
    head[..LEN_PREFIX].copy_from_slice(&(body as u32).to_le_bytes());
    Ok(head)
}

/// Decodes a request body as [`decode_request`] does; a `Put`'s block is a
/// slice of `body` rather than a copy.
pub fn decode_request_bytes(body: Bytes) -> Result<Request, DecodeError> {
    // Variant 0 is `Put`: the score, then the block.
    if let Some((head, data)) = split_tail(&body, 0, SCORE_LEN) {
        let score = Score(
            head.try_into()
                .map_err(|_| DecodeError::Truncated("score"))?,
        );
        let request = Request::Put { score, data };
        request.check_limits().map_err(DecodeError::Malformed)?;
        return Ok(request);
    }
    decode_request(&body)
}

/// Decodes a response body as [`decode_response`] does; a `Block`'s data is
/// a slice of `body` rather than a copy.
pub fn decode_response_bytes(body: Bytes) -> Result<Response, DecodeError> {
    // Variant 1 is `Block`: only the data.
    if let Some((_, data)) = split_tail(&body, 1, 0) {
        let response = Response::Block { data };
        response.check_limits().map_err(DecodeError::Malformed)?;
        return Ok(response);
    }
    decode_response(&body)
}

/// For a body of this version holding variant `variant` (a one-byte varint),
/// `fixed` bytes of fields, then bytes that run exactly to the end: those
/// fields and the bytes. `None` for anything else, which the general
/// decoder then judges.
fn split_tail(body: &Bytes, variant: u8, fixed: usize) -> Option<(&[u8], Bytes)> {
    if body.len() > MAX_FRAME_LEN {
        return None;
    }
    let rest = match body.get(..2)? {
        [VERSION, v] if *v == variant => body.get(2..)?,
        _ => return None,
    };
    let fields = rest.get(..fixed)?;
    let (len, data) = postcard::take_from_bytes::<u64>(rest.get(fixed..)?).ok()?;
    if data.len() as u64 != len {
        return None;
    }
    Some((fields, body.slice(body.len() - data.len()..)))
}

/// Reads a length prefix and checks it against the limit; the caller then reads that many bytes.
pub fn frame_len(prefix: [u8; LEN_PREFIX]) -> Result<usize, DecodeError> {
    let len = u32::from_le_bytes(prefix);
    if len as u64 > MAX_FRAME_LEN as u64 {
        return Err(DecodeError::TooLarge {
            len: len as u64,
            max: MAX_FRAME_LEN,
        });
    }
    Ok(len as usize)
}

/// Decodes a request body (the bytes after the length prefix).
pub fn decode_request(body: &[u8]) -> Result<Request, DecodeError> {
    let request: Request = decode_body(body)?;
    request.check_limits().map_err(DecodeError::Malformed)?;
    Ok(request)
}

/// Decodes a response body (the bytes after the length prefix).
pub fn decode_response(body: &[u8]) -> Result<Response, DecodeError> {
    let response: Response = decode_body(body)?;
    response.check_limits().map_err(DecodeError::Malformed)?;
    Ok(response)
}

/// Decodes a whole request frame, length prefix included, with nothing after it.
pub fn decode_request_frame(frame: &[u8]) -> Result<Request, DecodeError> {
    decode_request(split_frame(frame)?)
}

/// Decodes a whole response frame, length prefix included, with nothing after it.
pub fn decode_response_frame(frame: &[u8]) -> Result<Response, DecodeError> {
    decode_response(split_frame(frame)?)
}

fn split_frame(frame: &[u8]) -> Result<&[u8], DecodeError> {
    let (prefix, body) = frame
        .split_first_chunk::<LEN_PREFIX>()
        .ok_or(DecodeError::Truncated("no length prefix"))?;
    let len = frame_len(*prefix)?;
    match body.len().cmp(&len) {
        std::cmp::Ordering::Less => Err(DecodeError::Truncated("body shorter than its length")),
        std::cmp::Ordering::Greater => Err(DecodeError::Malformed(
            "bytes after the end of the frame".into(),
        )),
        std::cmp::Ordering::Equal => Ok(body),
    }
}

fn decode_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, DecodeError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(DecodeError::TooLarge {
            len: body.len() as u64,
            max: MAX_FRAME_LEN,
        });
    }
    let (&version, rest) = body
        .split_first()
        .ok_or(DecodeError::Truncated("empty body"))?;
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let (message, trailing) =
        postcard::take_from_bytes(rest).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !trailing.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "{} bytes after the message",
            trailing.len()
        )));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn score(n: u8) -> Score {
        Score([n; 32])
    }

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Put {
                score: score(1),
                data: Bytes::from_static(b"ciphertext"),
            },
            Request::Get { score: score(2) },
            Request::Has {
                scores: vec![score(3), score(4)],
            },
            Request::Challenge {
                score: score(5),
                nonce: [9; NONCE_LEN],
            },
            Request::Release {
                scores: vec![score(6)],
            },
            Request::Space,
            Request::Bulk {
                key: BulkKey([3; 32]),
            },
        ]
    }

    fn all_responses() -> Vec<Response> {
        let block = vec![7u8; 10_000];
        vec![
            Response::Stored,
            Response::Block {
                data: Bytes::from_static(b"block"),
            },
            Response::Have {
                held: Bitmap::from_bools([true, false, true]),
            },
            Response::Proof {
                proof: fincrypt_blockstore::score::prove(&block, 1).unwrap(),
            },
            Response::Released {
                released: Bitmap::from_bools([false]),
            },
            Response::Space {
                capacity: 1 << 30,
                used: 12345,
            },
            Response::Error(ErrorCode::Full { free: 17 }),
            Response::Error(ErrorCode::UnknownBlock),
            Response::Error(ErrorCode::BadRequest("why".into())),
            Response::Error(ErrorCode::ScoreMismatch),
            Response::Error(ErrorCode::UnsupportedVersion { supported: 1 }),
            Response::Error(ErrorCode::Unavailable),
            Response::Bulk {
                port: 40_123,
                session: [8; 16],
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for r in all_requests() {
            let frame = encode_request(&r).unwrap();
            assert_eq!(decode_request_frame(&frame).unwrap(), r);
        }
        for r in all_responses() {
            let frame = encode_response(&r).unwrap();
            assert_eq!(decode_response_frame(&frame).unwrap(), r);
        }
    }

    #[test]
    fn put_frame_layout_is_as_documented() {
        let frame = encode_request(&Request::Put {
            score: score(0xab),
            data: Bytes::from_static(b"xyz"),
        })
        .unwrap();
        // len, version, variant 0, 32-byte score, varint 3, data.
        let mut expected = vec![];
        expected.extend_from_slice(&(1u32 + 1 + 32 + 1 + 3).to_le_bytes());
        expected.push(VERSION);
        expected.push(0);
        expected.extend_from_slice(&[0xab; 32]);
        expected.push(3);
        expected.extend_from_slice(b"xyz");
        assert_eq!(frame, expected);
    }

    #[test]
    fn limits_are_enforced_both_ways() {
        let big = Request::Put {
            score: score(1),
            data: Bytes::from(vec![0u8; MAX_BLOCK_LEN + 1]),
        };
        assert!(matches!(
            encode_request(&big),
            Err(EncodeError::TooLarge(_))
        ));
        let fits = Request::Put {
            score: score(1),
            data: Bytes::from(vec![0u8; MAX_BLOCK_LEN]),
        };
        let frame = encode_request(&fits).unwrap();
        assert_eq!(decode_request_frame(&frame).unwrap(), fits);

        let too_long = ((MAX_FRAME_LEN + 1) as u32).to_le_bytes();
        assert!(matches!(
            frame_len(too_long),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(matches!(
            decode_request_frame(&u32::MAX.to_le_bytes()),
            Err(DecodeError::TooLarge { .. })
        ));

        let many = Request::Has {
            scores: vec![score(0); MAX_SCORES + 1],
        };
        assert!(encode_request(&many).is_err());
    }

    #[test]
    fn the_largest_sealed_block_fits() {
        use fincrypt_blockstore::block::{BlockKind, seal};
        // Incompressible plaintext of the largest size gives the largest block.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let plain: Vec<u8> = (0..MAX_PLAINTEXT)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let sealed = seal(&[1; 32], BlockKind::Data, &plain).unwrap();
        assert!(sealed.data.len() <= MAX_BLOCK_LEN, "{}", sealed.data.len());
    }

    #[test]
    fn other_versions_and_trailing_bytes_are_refused() {
        let mut frame = encode_request(&Request::Get { score: score(1) }).unwrap();
        frame[LEN_PREFIX] = 2;
        assert_eq!(
            decode_request_frame(&frame),
            Err(DecodeError::UnsupportedVersion(2))
        );
        assert_eq!(
            DecodeError::UnsupportedVersion(2).to_code(),
            ErrorCode::UnsupportedVersion { supported: VERSION }
        );

        let mut frame = encode_request(&Request::Space).unwrap();
        frame.push(0);
        frame[..4].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(
            decode_request_frame(&frame),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_request_frame(&[1, 0, 0, 0]),
            Err(DecodeError::Truncated(_))
        ));
    }

    #[test]
    fn malformed_bitmaps_are_refused() {
        let bad = Response::Have {
            held: Bitmap {
                len: 100,
                bits: vec![0xff],
            },
        };
        let body = {
            let mut b = vec![VERSION];
            b.extend(postcard::to_allocvec(&bad).unwrap());
            b
        };
        assert!(matches!(
            decode_response(&body),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn bitmap_round_trips() {
        for n in [0usize, 1, 7, 8, 9, 100] {
            let values: Vec<bool> = (0..n).map(|i| i % 3 == 0).collect();
            let map = Bitmap::from_bools(values.clone());
            assert!(map.is_well_formed());
            assert_eq!(map.to_bools(), values);
            assert!(!map.get(n));
        }
    }

    #[test]
    fn bad_request_detail_is_cut_on_a_char_boundary() {
        let ErrorCode::BadRequest(s) = ErrorCode::bad_request("é".repeat(1000)) else {
            panic!("not a bad request");
        };
        assert!(s.len() <= MAX_DETAIL_LEN);
    }

    /// Writes one frame per message kind into `$FINCRYPT_FUZZ_SEEDS`, as a
    /// starting corpus for the fuzz target (scripts/fuzz-net.sh runs this).
    #[test]
    #[ignore = "writes files; run by scripts/fuzz-net.sh"]
    fn write_fuzz_seeds() {
        let Some(dir) = std::env::var_os("FINCRYPT_FUZZ_SEEDS") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, r) in all_requests().iter().enumerate() {
            std::fs::write(dir.join(format!("request-{i}")), encode_request(r).unwrap()).unwrap();
        }
        for (i, r) in all_responses().iter().enumerate() {
            std::fs::write(
                dir.join(format!("response-{i}")),
                encode_response(r).unwrap(),
            )
            .unwrap();
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn decoders_never_panic_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request_frame(&bytes);
            let _ = decode_response_frame(&bytes);
            let _ = decode_request(&bytes);
            let _ = decode_response(&bytes);
        }

        #[test]
        fn decoders_never_panic_on_mutated_frames(
            which in 0usize..18,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let mut frame = if which < 6 {
                encode_request(&all_requests()[which]).unwrap()
            } else {
                encode_response(&all_responses()[which - 6]).unwrap()
            };
            for (at, byte) in flips {
                let i = at % frame.len();
                frame[i] ^= byte;
            }
            frame.truncate(cut % (frame.len() + 1));
            let _ = decode_request_frame(&frame);
            let _ = decode_response_frame(&frame);
            if frame.len() > LEN_PREFIX {
                let _ = decode_request(&frame[LEN_PREFIX..]);
                let _ = decode_response(&frame[LEN_PREFIX..]);
            }
        }

        #[test]
        fn random_puts_round_trip(data in proptest::collection::vec(any::<u8>(), 0..5000), s in any::<[u8; 32]>()) {
            let r = Request::Put { score: Score(s), data: Bytes::from(data) };
            prop_assert_eq!(decode_request_frame(&encode_request(&r).unwrap()).unwrap(), r);
        }

        #[test]
        fn the_slicing_decoders_agree_with_the_general_ones(
            which in 0usize..18,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            cut in any::<usize>(),
        ) {
            let frame = if which < 6 {
                encode_request(&all_requests()[which]).unwrap()
            } else {
                encode_response(&all_responses()[which - 6]).unwrap()
            };
            let mut body = frame[LEN_PREFIX..].to_vec();
            for (at, byte) in flips {
                let i = at % body.len();
                body[i] ^= byte;
            }
            body.truncate(cut % (body.len() + 1));
            prop_assert_eq!(decode_request_bytes(Bytes::from(body.clone())), decode_request(&body));
            prop_assert_eq!(decode_response_bytes(Bytes::from(body.clone())), decode_response(&body));
        }

        #[test]
        fn put_bodies_with_any_length_field_decode_alike(
            len in proptest::collection::vec(any::<u8>(), 0..12),
            data in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut body = vec![VERSION, 0];
            body.extend_from_slice(&[5; 32]);
            body.extend_from_slice(&len);
            body.extend_from_slice(&data);
            prop_assert_eq!(decode_request_bytes(Bytes::from(body.clone())), decode_request(&body));
            let mut body = vec![VERSION, 1];
            body.extend_from_slice(&len);
            body.extend_from_slice(&data);
            prop_assert_eq!(decode_response_bytes(Bytes::from(body.clone())), decode_response(&body));
        }
    }

    #[test]
    fn a_frame_in_two_parts_is_the_whole_frame() {
        for len in [0usize, 1, 127, 128, 16_383, 16_384, 1 << 20, MAX_BLOCK_LEN] {
            let data = Bytes::from(vec![3u8; len]);
            let put = Request::Put {
                score: score(8),
                data: data.clone(),
            };
            let (head, tail) = encode_request_parts(&put).unwrap();
            assert_eq!(
                [head, tail.to_vec()].concat(),
                encode_request(&put).unwrap(),
                "{len}"
            );
            let block = Response::Block { data };
            let (head, tail) = encode_response_parts(&block).unwrap();
            assert_eq!(
                [head, tail.to_vec()].concat(),
                encode_response(&block).unwrap(),
                "{len}"
            );
        }
        for r in all_requests() {
            let (head, tail) = encode_request_parts(&r).unwrap();
            assert_eq!([head, tail.to_vec()].concat(), encode_request(&r).unwrap());
            let body = Bytes::from(encode_request(&r).unwrap()).slice(LEN_PREFIX..);
            assert_eq!(decode_request_bytes(body).unwrap(), r);
        }
        for r in all_responses() {
            let (head, tail) = encode_response_parts(&r).unwrap();
            assert_eq!([head, tail.to_vec()].concat(), encode_response(&r).unwrap());
            let body = Bytes::from(encode_response(&r).unwrap()).slice(LEN_PREFIX..);
            assert_eq!(decode_response_bytes(body).unwrap(), r);
        }
        let too_big = Request::Put {
            score: score(1),
            data: Bytes::from(vec![0; MAX_BLOCK_LEN + 1]),
        };
        assert!(encode_request_parts(&too_big).is_err());
    }
}
