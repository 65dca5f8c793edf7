//! What one text may cost to tokenise.
//!
//! The tokenizers library tokenises a whole text before it truncates: a 10 MB string
//! takes seconds and gigabytes to become a few hundred ids. mlmf tokenises texts up to
//! `max_input_bytes` (UTF-8 bytes, default 64 KiB) exactly as the library does. A
//! longer text is, when the processor truncates on the right and the tokenizer's
//! pre-tokenizer splits at spaces, cut at a space after enough words to fill
//! `max_length` tokens, and only that prefix is tokenised: pieces never cross a space
//! such a pre-tokenizer splits at, so the prefix's tokens are the whole text's first
//! tokens. Otherwise (no truncation, left truncation, sentence pairs, a pre-tokenizer
//! that keeps spaces inside pieces) a longer text is an `InputError`.

use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer};

/// The default `max_input_bytes`.
pub const DEFAULT_MAX_INPUT_BYTES: usize = 64 * 1024;

/// How far past the wanted length a space to cut at is looked for.
const SCAN_BYTES: usize = 64 * 1024;

/// Texts whose spaces (after a word) every pre-tokenizer that splits at spaces must
/// keep as piece boundaries.
const PROBES: &[&str] = &[
    "ab cd",
    "The cat, sat. 12 34 x",
    "naïve  café\tok x y",
    "a-b c_d e'f g's h",
    "中文 字 ok",
];

/// Whether `tok`'s pre-tokenizer puts a piece boundary at every space that follows a
/// non-space character (checked on probe texts with the pre-tokenizer itself).
pub(crate) fn splits_at_spaces(tok: &Tokenizer) -> bool {
    let Some(pre) = tok.get_pre_tokenizer() else {
        return false;
    };
    PROBES.iter().all(|probe| {
        let mut s = PreTokenizedString::from(*probe);
        if pre.pre_tokenize(&mut s).is_err() {
            return false;
        }
        let mut bounds = std::collections::HashSet::new();
        for (_, (a, b), _) in s.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            bounds.insert(a);
            bounds.insert(b);
        }
        spaces_after_words(probe).all(|i| bounds.contains(&i))
    })
}

/// Whether byte `i` of `text` is an ASCII space that follows a non-whitespace
/// character. (An ASCII byte is never inside a multi-byte character: `i` is a char
/// boundary.)
fn is_cut(text: &str, i: usize) -> bool {
    text.as_bytes()[i] == b' '
        && !text[..i]
            .chars()
            .next_back()
            .is_some_and(char::is_whitespace)
}

/// Byte offsets of the ASCII spaces of `text` that follow a non-whitespace character.
fn spaces_after_words(text: &str) -> impl Iterator<Item = usize> + '_ {
    (1..text.len()).filter(move |&i| is_cut(text, i))
}

/// The first space at or after byte `from` that follows a word, within `SCAN_BYTES`.
pub(crate) fn cut_point(text: &str, from: usize) -> Option<usize> {
    let from = from.max(1);
    if from >= text.len() {
        return None;
    }
    let end = text.len().min(from.saturating_add(SCAN_BYTES));
    (from..end).find(|&i| is_cut(text, i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_at_a_space_after_a_word() {
        let t = "ab  cd ef";
        assert_eq!(cut_point(t, 0), Some(2));
        assert_eq!(cut_point(t, 3), Some(6));
        assert_eq!(cut_point(t, 7), None);
        assert_eq!(cut_point("é é", 1), Some(2));
        assert_eq!(spaces_after_words("a  b c").collect::<Vec<_>>(), vec![1, 4]);
    }
}
