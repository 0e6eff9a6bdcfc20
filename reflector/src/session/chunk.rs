//! Splitting long server frames into `_CHUNK` frames.
//!
//! Browsers and proxies limit the size of one WebSocket message; a SYNC carrying thousands
//! of retained messages can pass that. Clients reassemble `_CHUNK<first><last><piece>`
//! frames (`first` and `last` are `1` or `0`) into the original frame.

/// Server frames longer than this are split into `_CHUNK` frames.
pub const CHUNK_SIZE: usize = 1_000_000;

/// `text` as the frames to send: itself when it fits in `size` bytes, otherwise `_CHUNK`
/// frames of at most `size` bytes of it each, cut on character boundaries.
pub(crate) fn pieces(text: &str, size: usize) -> Vec<String> {
    if text.len() <= size {
        return vec![text.to_string()];
    }
    let mut pieces = Vec::with_capacity(text.len().div_ceil(size));
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + size).min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let first = if start == 0 { '1' } else { '0' };
        let last = if end == text.len() { '1' } else { '0' };
        pieces.push(format!("_CHUNK{first}{last}{}", &text[start..end]));
        start = end;
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a client does with the frames.
    fn reassemble(pieces: &[String]) -> String {
        pieces
            .iter()
            .map(|p| p.strip_prefix("_CHUNK").map_or(p.as_str(), |p| &p[2..]))
            .collect()
    }

    #[test]
    fn a_frame_that_fits_is_sent_as_it_is() {
        assert_eq!(pieces("abc", 3), ["abc"]);
    }

    #[test]
    fn long_frames_are_cut_with_first_and_last_flags() {
        let p = pieces("abcdefg", 3);
        assert_eq!(p, ["_CHUNK10abc", "_CHUNK00def", "_CHUNK01g"]);
        assert_eq!(reassemble(&p), "abcdefg");
        assert_eq!(pieces("abcdef", 3), ["_CHUNK10abc", "_CHUNK01def"]);
    }

    #[test]
    fn cuts_fall_on_character_boundaries() {
        let text = "aé€b".repeat(5);
        let p = pieces(&text, 4);
        assert!(p.iter().all(|p| p.len() <= 4 + "_CHUNK00".len()));
        assert_eq!(reassemble(&p), text);
    }
}
