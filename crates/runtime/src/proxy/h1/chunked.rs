//! The chunked transfer coding (RFC 9112 §7.1), decoded strictly and re-encoded.
//!
//! The proxy never forwards a peer's chunk framing as it came: it decodes the payload
//! and writes framing of its own. A lenient or different reading of chunk sizes,
//! extensions or line endings between the proxy and a worker is how requests get
//! smuggled, so the decoder accepts only what RFC 9112 allows: hex sizes, optional
//! whitespace and extensions after them, CRLF line ends (a bare LF is an error), and a
//! trailer section that ends with CRLF. Trailer fields are read and dropped.

/// Longest chunk size in hex digits (a `u64`).
const MAX_SIZE_DIGITS: u8 = 16;
/// Bound on one chunk's extensions, which carry nothing the proxy uses.
const MAX_EXTENSION_BYTES: usize = 4096;
/// Bound on the trailer section.
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Why a chunked body is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body: {0}")]
pub(crate) struct ChunkError(pub(crate) &'static str);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    /// Reading the hex size of the next chunk.
    #[default]
    Size,
    /// Whitespace after the size.
    SizeSpace,
    /// A chunk extension, up to CR.
    Extension,
    /// The LF ending the size line.
    SizeLf,
    /// Payload bytes of the current chunk.
    Data,
    /// The CRLF after a chunk's payload.
    DataCr,
    DataLf,
    /// At the start of a trailer line, or of the final CRLF.
    TrailerStart,
    /// Inside a trailer field line.
    TrailerLine,
    TrailerLf,
    /// The LF of the final CRLF.
    EndLf,
    /// The body has ended.
    Done,
}

/// An incremental decoder of one chunked body: feed it bytes as they arrive.
#[derive(Debug, Default)]
pub(crate) struct Decoder {
    state: State,
    /// Payload left in the current chunk, or the size being read.
    size: u64,
    digits: u8,
    extension: usize,
    trailer: usize,
}

impl Decoder {
    /// Decodes from `input`, handing each run of payload bytes to `data`. Returns how
    /// many bytes of `input` belong to the body: all of them, unless it ended inside
    /// `input` (what follows is the peer's next message).
    pub(crate) fn feed(
        &mut self,
        input: &[u8],
        mut data: impl FnMut(&[u8]),
    ) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Done => return Ok(i),
                State::Data => {
                    let left = usize::try_from(self.size).unwrap_or(usize::MAX);
                    let take = left.min(input.len() - i);
                    data(&input[i..i + take]);
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::Size => {
                    if let Some(d) = hex(b) {
                        if self.digits == MAX_SIZE_DIGITS {
                            return Err(ChunkError("chunk size too large"));
                        }
                        self.size = (self.size << 4) | u64::from(d);
                        self.digits += 1;
                    } else if self.digits == 0 {
                        return Err(ChunkError("missing chunk size"));
                    } else {
                        self.state = match b {
                            b' ' | b'\t' => State::SizeSpace,
                            b';' => State::Extension,
                            b'\r' => State::SizeLf,
                            _ => return Err(ChunkError("invalid byte in chunk size")),
                        };
                    }
                }
                State::SizeSpace => {
                    self.state = match b {
                        b' ' | b'\t' => State::SizeSpace,
                        b';' => State::Extension,
                        b'\r' => State::SizeLf,
                        _ => return Err(ChunkError("invalid byte after chunk size")),
                    };
                }
                State::Extension => {
                    if b == b'\r' {
                        self.state = State::SizeLf;
                    } else if b == b'\n' || (b < 0x20 && b != b'\t') || b == 0x7f {
                        return Err(ChunkError("invalid byte in chunk extension"));
                    } else {
                        self.extension += 1;
                        if self.extension > MAX_EXTENSION_BYTES {
                            return Err(ChunkError("chunk extension too long"));
                        }
                    }
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError("chunk size line without CRLF"));
                    }
                    self.digits = 0;
                    self.extension = 0;
                    self.state = if self.size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError("chunk data not followed by CRLF"));
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError("chunk data not followed by CRLF"));
                    }
                    self.state = State::Size;
                }
                State::TrailerStart => {
                    self.state = match b {
                        b'\r' => State::EndLf,
                        b'\n' => return Err(ChunkError("bare LF in trailer section")),
                        _ => {
                            self.count_trailer()?;
                            State::TrailerLine
                        }
                    };
                }
                State::TrailerLine => {
                    self.count_trailer()?;
                    match b {
                        b'\r' => self.state = State::TrailerLf,
                        b'\n' => return Err(ChunkError("bare LF in trailer section")),
                        _ => {}
                    }
                }
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkError("trailer line without CRLF"));
                    }
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkError("chunked body not ended by CRLF"));
                    }
                    self.state = State::Done;
                    return Ok(i + 1);
                }
            }
            i += 1;
        }
        Ok(i)
    }

    fn count_trailer(&mut self) -> Result<(), ChunkError> {
        self.trailer += 1;
        if self.trailer > MAX_TRAILER_BYTES {
            return Err(ChunkError("trailer section too large"));
        }
        Ok(())
    }

    /// Whether the whole body, trailers included, has been read.
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Appends `data` as one chunk (nothing for empty data: an empty chunk would end the body).
pub(crate) fn encode(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let mut size = [0u8; 16];
    let mut n = data.len();
    let mut at = size.len();
    while n > 0 || at == size.len() {
        at -= 1;
        size[at] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
    }
    out.extend_from_slice(&size[at..]);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk and an empty trailer section.
pub(crate) const END: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes: the payload, and how many bytes
    /// belonged to the body.
    fn decode(input: &[u8], step: usize) -> Result<(Vec<u8>, usize, bool), ChunkError> {
        let mut d = Decoder::default();
        let mut out = Vec::new();
        let mut used = 0;
        for piece in input.chunks(step) {
            let n = d.feed(piece, |b| out.extend_from_slice(b))?;
            used += n;
            if d.is_done() {
                break;
            }
        }
        Ok((out, used, d.is_done()))
    }

    #[test]
    fn decodes_in_any_split() {
        let body = b"4\r\nWiki\r\n5;ext=1;q=\"x\"\r\npedia\r\nE \r\n in\r\n\r\nchunks.\r\n0\r\nX-Sum: 1\r\n\r\nGET /next";
        for step in 1..=body.len() {
            let (out, used, done) = decode(body, step).unwrap();
            assert_eq!(out, b"Wikipedia in\r\n\r\nchunks.", "step {step}");
            assert!(done);
            assert_eq!(&body[used..], b"GET /next", "step {step}");
        }
    }

    #[test]
    fn refuses_what_parsers_disagree_on() {
        for bad in [
            &b"\r\n"[..],
            b"x\r\n",
            b"0x4\r\nWiki\r\n0\r\n\r\n",
            b"4\nWiki\r\n0\r\n\r\n",
            b"4\r\nWiki\n0\r\n\r\n",
            b"4\r\nWikiX\r\n",
            b"0\r\n\n",
            b"0\r\nX: 1\n\r\n",
            b"-1\r\n",
            b"+4\r\nWiki\r\n",
            b"11111111111111111\r\n",
            b"4;a\nb\r\nWiki\r\n",
        ] {
            assert!(
                decode(bad, 64).is_err(),
                "{:?} should be refused",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn incomplete_body_is_not_done() {
        let (out, used, done) = decode(b"4\r\nWi", 64).unwrap();
        assert_eq!(out, b"Wi");
        assert_eq!(used, 5);
        assert!(!done);
        let (_, _, done) = decode(b"0\r\n", 64).unwrap();
        assert!(!done, "the final CRLF is missing");
    }

    #[test]
    fn encode_roundtrips() {
        let mut out = Vec::new();
        for piece in [&b"a"[..], &[7u8; 300], b"", b"end"] {
            encode(&mut out, piece);
        }
        out.extend_from_slice(END);
        let (decoded, used, done) = decode(&out, 7).unwrap();
        assert!(done);
        assert_eq!(used, out.len());
        let mut want = b"a".to_vec();
        want.extend_from_slice(&[7u8; 300]);
        want.extend_from_slice(b"end");
        assert_eq!(decoded, want);
        assert!(out.starts_with(b"1\r\na\r\n12c\r\n"));
    }

    #[test]
    fn extensions_and_trailers_are_bounded() {
        let mut long = b"1;".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_EXTENSION_BYTES + 1));
        assert!(decode(&long, 512).is_err());
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..2000 {
            trailers.extend_from_slice(b"X-A: 123456\r\n");
        }
        assert!(decode(&trailers, 512).is_err());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever is encoded decodes to the same payload, however the bytes are split.
            #[test]
            fn encode_then_decode_is_identity(
                pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
                step in 1usize..64,
                tail in proptest::collection::vec(any::<u8>(), 0..16),
            ) {
                let mut wire = Vec::new();
                for p in &pieces {
                    encode(&mut wire, p);
                }
                wire.extend_from_slice(END);
                let body_len = wire.len();
                wire.extend_from_slice(&tail);
                let (out, used, done) = decode(&wire, step).unwrap();
                prop_assert!(done);
                prop_assert_eq!(used, body_len);
                prop_assert_eq!(out, pieces.concat());
            }

            /// Arbitrary bytes never panic the decoder, and it never claims more than it got.
            #[test]
            fn arbitrary_input_is_refused_or_consumed(
                input in proptest::collection::vec(any::<u8>(), 0..512),
                step in 1usize..64,
            ) {
                if let Ok((out, used, _)) = decode(&input, step) {
                    prop_assert!(used <= input.len());
                    prop_assert!(out.len() <= used);
                }
            }
        }
    }
}
