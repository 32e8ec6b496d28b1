//! Where a chunked body ends (RFC 9112 §7.1), found in bytes passed through unchanged.

/// Finds the end of a chunked body (RFC 9112 §7.1) in bytes passed through unchanged:
/// chunk sizes, extensions, data, and the trailer section.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChunkScanner {
    state: ChunkState,
    size: u64,
    digits: u8,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    LastLf,
    Done,
}

impl ChunkScanner {
    /// Whether the whole body (last chunk and trailers) has been seen.
    #[must_use]
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Scans `bytes`; returns how many belong to the body (fewer than all only when the
    /// body ended).
    ///
    /// # Errors
    /// When the encoding is malformed: the body's end cannot be known.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<usize, MalformedChunk> {
        self.feed_with(bytes, |_| {})
    }

    /// Like [`ChunkScanner::feed`], and gives each piece of chunk data to `data`.
    ///
    /// # Errors
    /// When the encoding is malformed.
    pub fn feed_with(
        &mut self,
        bytes: &[u8],
        mut data: impl FnMut(&[u8]),
    ) -> Result<usize, MalformedChunk> {
        use ChunkState as S;
        let mut i = 0;
        while i < bytes.len() {
            if self.state == S::Done {
                return Ok(i);
            }
            if self.state == S::Data {
                let take = usize::try_from(self.size)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len() - i);
                self.size -= take as u64;
                data(&bytes[i..i + take]);
                i += take;
                if self.size == 0 {
                    self.state = S::DataCr;
                }
                continue;
            }
            let b = bytes[i];
            i += 1;
            self.state = match (self.state, b) {
                (S::Size, b) if b.is_ascii_hexdigit() => {
                    if self.digits == 15 {
                        return Err(MalformedChunk);
                    }
                    self.digits += 1;
                    let d = (b as char).to_digit(16).unwrap_or(0);
                    self.size = self.size * 16 + u64::from(d);
                    S::Size
                }
                (S::Size, b';' | b' ' | b'\t') if self.digits > 0 => S::Extension,
                (S::Size, b'\r') if self.digits > 0 => S::SizeLf,
                (S::Extension, b'\r') => S::SizeLf,
                (S::Extension, b) if b != b'\n' => S::Extension,
                (S::SizeLf, b'\n') => {
                    self.digits = 0;
                    if self.size == 0 {
                        S::TrailerStart
                    } else {
                        S::Data
                    }
                }
                (S::DataCr, b'\r') => S::DataLf,
                (S::DataLf, b'\n') => S::Size,
                (S::TrailerStart, b'\r') => S::LastLf,
                (S::TrailerStart | S::TrailerLine, b) if b != b'\n' && b != b'\r' => S::TrailerLine,
                (S::TrailerLine, b'\r') => S::TrailerLf,
                (S::TrailerLf, b'\n') => S::TrailerStart,
                (S::LastLf, b'\n') => S::Done,
                _ => return Err(MalformedChunk),
            };
        }
        Ok(i)
    }
}

/// A chunked body that does not follow the grammar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked encoding")]
pub struct MalformedChunk;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fast::upstream::parse_response;

    fn scan_all(input: &[u8]) -> Result<(usize, bool), MalformedChunk> {
        let mut s = ChunkScanner::default();
        let n = s.feed(input)?;
        Ok((n, s.is_done()))
    }

    #[test]
    fn a_chunked_body_ends_after_the_last_chunk_and_trailers() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n";
        assert_eq!(scan_all(body), Ok((body.len(), true)));
        let trailers = b"3\r\nabc\r\n0\r\nx-sum: 1\r\ny: 2\r\n\r\n";
        assert_eq!(scan_all(trailers), Ok((trailers.len(), true)));
        // Bytes after the end are not the body's.
        let mut more = body.to_vec();
        more.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        assert_eq!(scan_all(&more), Ok((body.len(), true)));
    }

    #[test]
    fn a_chunked_body_is_found_whatever_the_read_boundaries() {
        let body = b"a\r\n0123456789\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nt: v\r\n\r\n";
        for split in 0..body.len() {
            for step in 1..4 {
                let mut s = ChunkScanner::default();
                let mut seen = s.feed(&body[..split]).unwrap();
                for piece in body[split..].chunks(step) {
                    seen += s.feed(piece).unwrap();
                }
                assert_eq!(seen, body.len(), "split {split} step {step}");
                assert!(s.is_done());
            }
        }
    }

    #[test]
    fn a_malformed_chunked_body_is_an_error() {
        for bad in [
            &b"x\r\n"[..],
            b"5\nhello",
            b"5\r\nhelloX\r\n",
            b"\r\n",
            b"0000000000000001\r\n",
            b"0\r\n\n",
        ] {
            assert_eq!(
                scan_all(bad),
                Err(MalformedChunk),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Incomplete is not an error.
        assert_eq!(scan_all(b"5\r\nhel"), Ok((6, false)));
    }

    /// A chunked body of these chunk sizes (with an extension on odd ones) and
    /// trailers, followed by bytes that are not the body's.
    fn chunked_body(sizes: &[usize], trailers: usize) -> Vec<u8> {
        let mut body = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            body.extend_from_slice(format!("{n:X}").as_bytes());
            if i % 2 == 1 {
                body.extend_from_slice(b";name=\"v\"");
            }
            body.extend_from_slice(b"\r\n");
            body.extend(std::iter::repeat_n(b'0' + (i % 10) as u8, n));
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n");
        for t in 0..trailers {
            body.extend_from_slice(format!("x-t{t}: {t}\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        body
    }

    proptest::proptest! {
        #[test]
        fn the_end_of_any_chunked_body_is_found_across_any_reads(
            sizes in proptest::collection::vec(1usize..3000, 0..8),
            trailers in 0usize..3,
            cuts in proptest::collection::vec(0usize..20_000, 0..6),
        ) {
            let body = chunked_body(&sizes, trailers);
            let mut stream = body.clone();
            stream.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % stream.len()).collect();
            cuts.push(stream.len());
            cuts.sort_unstable();
            let mut s = ChunkScanner::default();
            let (mut from, mut seen) = (0, 0);
            let mut data = Vec::new();
            for cut in cuts {
                let used = s
                    .feed_with(&stream[from..cut], |d| data.extend_from_slice(d))
                    .unwrap();
                seen += used;
                if s.is_done() {
                    break;
                }
                proptest::prop_assert_eq!(used, cut - from);
                from = cut;
            }
            proptest::prop_assert!(s.is_done());
            proptest::prop_assert_eq!(seen, body.len());
            // The data given out is the chunks' data, in order (what HTTP/2 clients get).
            let expected: Vec<u8> = sizes
                .iter()
                .enumerate()
                .flat_map(|(i, &n)| std::iter::repeat_n(b'0' + (i % 10) as u8, n))
                .collect();
            proptest::prop_assert_eq!(data, expected);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_reads_do_not_change_the_outcome(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            cut in 0usize..200,
        ) {
            let cut = cut.min(bytes.len());
            let mut whole = ChunkScanner::default();
            let at_once = whole.feed(&bytes);
            let mut split = ChunkScanner::default();
            let in_two = split
                .feed(&bytes[..cut])
                .and_then(|a| if split.is_done() { Ok(a) } else { split.feed(&bytes[cut..]).map(|b| a + b) });
            proptest::prop_assert_eq!(at_once.is_ok(), in_two.is_ok());
            if let (Ok(a), Ok(b)) = (at_once, in_two) {
                proptest::prop_assert_eq!(a, b);
                proptest::prop_assert_eq!(whole.is_done(), split.is_done());
            }
            let _ = parse_response(&bytes, false);
        }
    }
}
