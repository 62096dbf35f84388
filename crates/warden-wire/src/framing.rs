//! Framing: where one message ends and the next begins.
//!
//! Both dialects use the same two framings, told apart by the first byte a client sends
//! (`PROTOCOLS.md`, "Framing"): a JSON object starts with `{`, so a connection whose first byte
//! is `{` carries newline-delimited JSON; anything else is the big-endian `u32` length of a
//! length-prefixed frame. The framing is sniffed once per connection and then fixed, because a
//! stream that switched framing mid-way could not be told apart from a corrupt one.
//!
//! [`FrameDecoder`] never holds bytes itself: the caller owns the read buffer (usually one per
//! connection, filled by its socket reads) and the decoder takes complete frames out of its
//! front. That keeps the decoder free of I/O and lets the caller decide how to read.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// How a connection delimits its messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// One JSON object per line, terminated by `\n` (a `\r` before it is tolerated).
    Lines,
    /// A 4-byte big-endian length, then that many bytes of JSON.
    LengthPrefixed,
}

impl Framing {
    /// Picks the framing from the first byte of a connection: `{` (the start of a JSON
    /// object) means [`Framing::Lines`]; anything else is the first byte of a length prefix.
    pub fn sniff(first_byte: u8) -> Framing {
        if first_byte == b'{' {
            Framing::Lines
        } else {
            Framing::LengthPrefixed
        }
    }
}

/// Why a byte stream could not be split into frames. Each of these leaves the stream at an
/// unknown position, so the connection cannot continue after one: answer if the framing allows
/// it, then close.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// A frame is, or is already known to become, larger than the maximum message size.
    #[error(
        "message too large: at least {len} bytes, the limit is {max} bytes \
         (send smaller requests, or raise the daemon's maximum message size)"
    )]
    TooLarge {
        /// The frame's length as far as it is known (exact for length-prefixed frames, a lower
        /// bound for a line whose end has not arrived yet).
        len: usize,
        /// The maximum message size in force.
        max: usize,
    },
    /// A length-prefixed frame announced a length of 0; no message is empty.
    #[error("empty frame: a length prefix of 0 is not allowed (every message is a JSON object)")]
    EmptyFrame,
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a message (truncated frame)")]
    Truncated,
}

/// Splits a connection's incoming bytes into frames.
///
/// Feed it the connection's read buffer after every read; it takes complete frames out of the
/// front of the buffer. Between calls the caller may only *append* to the buffer (which is what
/// reading from a socket does): the decoder remembers how far it has already searched a partial
/// line for its newline, so that a long line arriving in many small reads costs O(n) in total
/// rather than O(n²).
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_message: usize,
    framing: Option<Framing>,
    /// Lines: how many bytes at the front of the buffer are known to hold no `\n`.
    scanned: usize,
}

impl FrameDecoder {
    /// A decoder for a new connection whose framing will be sniffed from its first byte.
    /// Frames longer than `max_message` bytes are refused with [`FrameError::TooLarge`].
    pub fn new(max_message: usize) -> Self {
        FrameDecoder {
            max_message,
            framing: None,
            scanned: 0,
        }
    }

    /// A decoder whose framing is known in advance (a client reading replies to the framing it
    /// chose itself); no sniffing happens.
    pub fn with_framing(max_message: usize, framing: Framing) -> Self {
        FrameDecoder {
            framing: Some(framing),
            ..FrameDecoder::new(max_message)
        }
    }

    /// The connection's framing: `None` until the first byte has been seen.
    pub fn framing(&self) -> Option<Framing> {
        self.framing
    }

    /// The maximum frame size this decoder accepts.
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// Takes one complete frame out of `buf` (advancing it). `Ok(None)`: need more bytes.
    ///
    /// - Lines: a frame is the bytes before `\n`, with one trailing `\r` stripped; blank lines
    ///   are skipped.
    /// - LengthPrefixed: a 4-byte big-endian `u32` length, then that many bytes; a length of 0
    ///   is [`FrameError::EmptyFrame`].
    ///
    /// [`FrameError::TooLarge`] comes as soon as it is known that a frame exceeds the maximum:
    /// for a line, when the buffer holds more than the maximum without a newline; for a
    /// length-prefixed frame, from its header alone. So an oversized message is never buffered
    /// whole. After an error the stream is out of step; close the connection.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        let framing = match self.framing {
            Some(framing) => framing,
            None => match buf.first() {
                None => return Ok(None),
                Some(&first) => {
                    let framing = Framing::sniff(first);
                    self.framing = Some(framing);
                    framing
                }
            },
        };
        match framing {
            Framing::Lines => self.decode_line(buf),
            Framing::LengthPrefixed => self.decode_length_prefixed(buf),
        }
    }

    fn decode_line(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        loop {
            // `min`: robust against a caller that shrank the buffer against the rules; it can
            // then only cost a rescan, never a missed newline.
            let start = self.scanned.min(buf.len());
            let Some(offset) = memchr::memchr(b'\n', &buf[start..]) else {
                self.scanned = buf.len();
                // A `\r` at the very end may be the first half of a CRLF that ends a line of
                // exactly `max_message` bytes, so it does not count yet.
                let pending = buf.len() - usize::from(buf.last() == Some(&b'\r'));
                if pending > self.max_message {
                    return Err(FrameError::TooLarge {
                        len: pending,
                        max: self.max_message,
                    });
                }
                return Ok(None);
            };
            let newline = start + offset;
            let mut line = buf.split_to(newline + 1);
            self.scanned = 0;
            line.truncate(newline);
            if line.last() == Some(&b'\r') {
                line.truncate(newline - 1);
            }
            if line.is_empty() {
                continue;
            }
            if line.len() > self.max_message {
                return Err(FrameError::TooLarge {
                    len: line.len(),
                    max: self.max_message,
                });
            }
            return Ok(Some(line.freeze()));
        }
    }

    fn decode_length_prefixed(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        let Some(header) = buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        // On a 16-bit target the length might not fit in usize; it is then certainly too large.
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len == 0 {
            return Err(FrameError::EmptyFrame);
        }
        if len > self.max_message {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_message,
            });
        }
        if buf.len() - 4 < len {
            return Ok(None);
        }
        buf.advance(4);
        Ok(Some(buf.split_to(len).freeze()))
    }

    /// Call at end of stream with what is left of the buffer: `Err(Truncated)` if it holds part
    /// of a frame, `Ok(())` if it is empty.
    pub fn finish(&self, buf: &BytesMut) -> Result<(), FrameError> {
        if buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated)
        }
    }
}

/// Appends `payload` to `out` as one frame.
///
/// Lines: `payload` then `\n`; the payload must not contain a raw newline, which compact JSON
/// (all this crate writes) never does. LengthPrefixed: the big-endian `u32` length, then
/// `payload`.
///
/// # Panics
///
/// If a length-prefixed payload is 4 GiB or larger, which no reply under a maximum message size
/// can be.
pub fn encode_frame(framing: Framing, payload: &[u8], out: &mut BytesMut) {
    encode_frame_parts(framing, &[payload], out)
}

/// Appends the concatenation of `parts` to `out` as one frame, as [`encode_frame`] does for
/// one payload, without joining the parts first.
///
/// # Panics
///
/// As [`encode_frame`].
pub fn encode_frame_parts<P: AsRef<[u8]>>(framing: Framing, parts: &[P], out: &mut BytesMut) {
    let len: usize = parts.iter().map(|p| p.as_ref().len()).sum();
    match framing {
        Framing::Lines => {
            debug_assert!(
                parts
                    .iter()
                    .all(|p| memchr::memchr(b'\n', p.as_ref()).is_none()),
                "a line-framed payload must not contain a newline"
            );
            out.reserve(len + 1);
            for p in parts {
                out.extend_from_slice(p.as_ref());
            }
            out.put_u8(b'\n');
        }
        Framing::LengthPrefixed => {
            let len32 = u32::try_from(len);
            assert!(len32.is_ok(), "a frame payload must be smaller than 4 GiB");
            out.reserve(len + 4);
            out.put_u32(len32.unwrap_or(u32::MAX));
            for p in parts {
                out.extend_from_slice(p.as_ref());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_of_parts_encodes_as_its_concatenation_does() {
        for framing in [Framing::Lines, Framing::LengthPrefixed] {
            let (mut whole, mut parts) = (BytesMut::new(), BytesMut::new());
            encode_frame(framing, b"{\"a\":1}", &mut whole);
            encode_frame_parts(framing, &[&b"{\"a\""[..], b"", b":1}"], &mut parts);
            assert_eq!(whole, parts, "{framing:?}");
        }
    }

    /// Feeds `chunks` one after another, decoding after each, until an error.
    fn feed<'a>(
        dec: &mut FrameDecoder,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> (Vec<Bytes>, Option<FrameError>, BytesMut) {
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            loop {
                match dec.decode(&mut buf) {
                    Ok(Some(frame)) => frames.push(frame),
                    Ok(None) => break,
                    Err(e) => return (frames, Some(e), buf),
                }
            }
        }
        (frames, None, buf)
    }

    fn lp(payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode_frame(Framing::LengthPrefixed, payload, &mut out);
        out.to_vec()
    }

    #[test]
    fn sniff_picks_lines_only_for_an_opening_brace() {
        assert_eq!(Framing::sniff(b'{'), Framing::Lines);
        for b in [0u8, 1, b'[', b' ', b'\n', 0x7b + 1, 0xff] {
            assert_eq!(Framing::sniff(b), Framing::LengthPrefixed, "byte {b}");
        }
    }

    #[test]
    fn framing_is_unknown_until_the_first_byte() {
        let mut dec = FrameDecoder::new(64);
        let mut buf = BytesMut::new();
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert_eq!(dec.framing(), None);
        buf.extend_from_slice(b"{");
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert_eq!(dec.framing(), Some(Framing::Lines));

        let mut dec = FrameDecoder::new(64);
        let mut buf = BytesMut::from(&[0u8][..]);
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert_eq!(dec.framing(), Some(Framing::LengthPrefixed));
    }

    const LINES: &[u8] = b"{\"a\":1}\n{\"b\":2}\r\n\n\r\n{\"c\":\"x\\ny\"}\n";
    const LINES_FRAMES: [&[u8]; 3] = [b"{\"a\":1}", b"{\"b\":2}", b"{\"c\":\"x\\ny\"}"];

    #[test]
    fn lines_split_at_every_boundary_give_the_same_frames() {
        for split in 0..=LINES.len() {
            let mut dec = FrameDecoder::new(64);
            let (frames, err, rest) = feed(&mut dec, [&LINES[..split], &LINES[split..]]);
            assert_eq!(err, None, "split at {split}");
            assert_eq!(frames, LINES_FRAMES, "split at {split}");
            assert_eq!(dec.finish(&rest), Ok(()));
        }
    }

    #[test]
    fn lines_fed_byte_by_byte_give_the_same_frames() {
        let mut dec = FrameDecoder::new(64);
        let (frames, err, rest) = feed(&mut dec, LINES.chunks(1));
        assert_eq!(err, None);
        assert_eq!(frames, LINES_FRAMES);
        assert!(rest.is_empty());
    }

    #[test]
    fn pipelined_lines_in_one_buffer_come_out_in_order() {
        let mut dec = FrameDecoder::new(64);
        let mut buf = BytesMut::from(LINES);
        for expected in LINES_FRAMES {
            assert_eq!(dec.decode(&mut buf).unwrap().as_deref(), Some(expected));
        }
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert!(buf.is_empty());
    }

    #[test]
    fn crlf_is_stripped_but_a_lone_cr_inside_a_line_is_kept() {
        let mut dec = FrameDecoder::new(64);
        let mut buf = BytesMut::from(&b"{\"a\":\r1}\r\n"[..]);
        assert_eq!(
            dec.decode(&mut buf).unwrap().as_deref(),
            Some(&b"{\"a\":\r1}"[..])
        );
    }

    #[test]
    fn length_prefixed_split_at_every_boundary_give_the_same_frames() {
        let payloads: [&[u8]; 3] = [b"{\"a\":1}", b"x", b"{\"long\":\"\n\n\"}"];
        let stream: Vec<u8> = payloads.iter().flat_map(|p| lp(p)).collect();
        for split in 0..=stream.len() {
            let mut dec = FrameDecoder::new(64);
            let (frames, err, rest) = feed(&mut dec, [&stream[..split], &stream[split..]]);
            assert_eq!(err, None, "split at {split}");
            assert_eq!(frames, payloads, "split at {split}");
            assert_eq!(dec.finish(&rest), Ok(()));
        }
        let mut dec = FrameDecoder::new(64);
        let (frames, err, _) = feed(&mut dec, stream.chunks(1));
        assert_eq!(err, None);
        assert_eq!(frames, payloads);
    }

    #[test]
    fn line_of_exactly_the_maximum_is_accepted_with_lf_or_crlf() {
        let body = [b'{'; 16];
        for ending in [&b"\n"[..], b"\r\n"] {
            let mut dec = FrameDecoder::new(16);
            let input = [&body[..], ending].concat();
            let (frames, err, _) = feed(&mut dec, input.chunks(1));
            assert_eq!(err, None);
            assert_eq!(frames, [&body[..]]);
        }
    }

    #[test]
    fn oversized_line_is_refused_as_soon_as_the_buffer_passes_the_maximum() {
        let mut dec = FrameDecoder::new(16);
        let mut buf = BytesMut::new();
        for i in 0..16 {
            buf.put_u8(if i == 0 { b'{' } else { b'a' });
            assert_eq!(dec.decode(&mut buf), Ok(None), "after {} bytes", i + 1);
        }
        buf.put_u8(b'a');
        assert_eq!(
            dec.decode(&mut buf),
            Err(FrameError::TooLarge { len: 17, max: 16 })
        );
    }

    #[test]
    fn trailing_cr_does_not_count_until_the_next_byte_shows_it_is_not_crlf() {
        let mut dec = FrameDecoder::new(4);
        let mut buf = BytesMut::from(&b"{aaa\r"[..]);
        assert_eq!(dec.decode(&mut buf), Ok(None));
        buf.put_u8(b'x');
        assert_eq!(
            dec.decode(&mut buf),
            Err(FrameError::TooLarge { len: 6, max: 4 })
        );
    }

    #[test]
    fn oversized_line_arriving_whole_is_refused() {
        let mut dec = FrameDecoder::new(4);
        let mut buf = BytesMut::from(&b"{\"a\":1}\n"[..]);
        assert_eq!(
            dec.decode(&mut buf),
            Err(FrameError::TooLarge { len: 7, max: 4 })
        );
    }

    #[test]
    fn oversized_length_prefix_is_refused_from_the_header_alone() {
        let mut dec = FrameDecoder::new(1024);
        let mut buf = BytesMut::from(&[0u8, 0, 4, 1][..]);
        assert_eq!(
            dec.decode(&mut buf),
            Err(FrameError::TooLarge {
                len: 1025,
                max: 1024
            })
        );
        let mut dec = FrameDecoder::new(1024);
        let mut buf = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            dec.decode(&mut buf),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                max: 1024
            })
        );
    }

    #[test]
    fn zero_length_prefix_is_an_empty_frame_error() {
        let mut dec = FrameDecoder::new(64);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0, b'{'][..]);
        assert_eq!(dec.decode(&mut buf), Err(FrameError::EmptyFrame));
    }

    #[test]
    fn eof_inside_a_frame_is_truncated_and_eof_between_frames_is_clean() {
        let mut dec = FrameDecoder::new(64);
        let (frames, _, rest) = feed(&mut dec, [&b"{\"a\":1}\n{\"b\""[..]]);
        assert_eq!(frames.len(), 1);
        assert_eq!(dec.finish(&rest), Err(FrameError::Truncated));

        for partial in [&[0u8, 0][..], &[0, 0, 0, 5, b'{'][..]] {
            let mut dec = FrameDecoder::new(64);
            let (frames, err, rest) = feed(&mut dec, [partial]);
            assert!(frames.is_empty() && err.is_none());
            assert_eq!(dec.finish(&rest), Err(FrameError::Truncated));
        }

        let dec = FrameDecoder::new(64);
        assert_eq!(dec.finish(&BytesMut::new()), Ok(()));
    }

    #[test]
    fn partial_line_is_searched_for_a_newline_only_once() {
        let mut dec = FrameDecoder::new(64);
        let mut buf = BytesMut::from(&b"{\"abc\""[..]);
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert_eq!(dec.scanned, 6);
        buf.extend_from_slice(b":1");
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert_eq!(dec.scanned, 8);
        buf.extend_from_slice(b"}\n{");
        assert_eq!(
            dec.decode(&mut buf).unwrap().as_deref(),
            Some(&b"{\"abc\":1}"[..])
        );
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert_eq!(dec.scanned, 1);
    }

    #[test]
    fn encode_frame_writes_both_framings() {
        let mut out = BytesMut::new();
        encode_frame(Framing::Lines, b"{}", &mut out);
        encode_frame(Framing::LengthPrefixed, b"{}", &mut out);
        assert_eq!(&out[..], b"{}\n\0\0\0\x02{}");
    }

    #[test]
    fn errors_say_what_happened() {
        assert_eq!(
            FrameError::TooLarge { len: 5, max: 4 }.to_string(),
            "message too large: at least 5 bytes, the limit is 4 bytes \
             (send smaller requests, or raise the daemon's maximum message size)"
        );
        assert!(FrameError::EmptyFrame
            .to_string()
            .contains("length prefix of 0"));
        assert!(FrameError::Truncated.to_string().contains("truncated"));
    }
}
