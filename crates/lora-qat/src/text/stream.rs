//! Incremental detokenization: text of generated tokens as they arrive, never splitting a
//! UTF-8 character (byte-level and byte-fallback tokens can end mid-character), and held back
//! while it could still be the start of a stop string.

use super::tokenizer::ModelText;
use super::TextResult;

/// Turns a growing token sequence into text pieces.
///
/// Each step decodes the tokens from `prefix` (a few tokens of context, so decoders that
/// strip or merge at the start see the same neighbours) and emits what is new past the text
/// already emitted — unless it ends in U+FFFD, the mark of an incomplete character.
#[derive(Debug)]
pub struct TextStreamer<'a> {
    text: &'a ModelText,
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
    skip_special_tokens: bool,
    stop_strings: Vec<String>,
    /// Text decoded but not yet emitted because a stop string might start in it.
    pending: String,
    /// All text emitted or pending so far.
    full: String,
    stopped: bool,
}

impl<'a> TextStreamer<'a> {
    pub fn new(text: &'a ModelText, skip_special_tokens: bool, stop_strings: &[String]) -> Self {
        Self {
            text,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            skip_special_tokens,
            stop_strings: stop_strings
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect(),
            pending: String::new(),
            full: String::new(),
            stopped: false,
        }
    }

    /// Adds a token; returns the text that is now safe to show (maybe empty).
    pub fn push(&mut self, id: u32) -> TextResult<String> {
        if self.stopped {
            return Ok(String::new());
        }
        self.ids.push(id);
        let before = self
            .text
            .decode(&self.ids[self.prefix..self.read], self.skip_special_tokens)?;
        let after = self
            .text
            .decode(&self.ids[self.prefix..], self.skip_special_tokens)?;
        // As Hugging Face's streamers: the new text is what the longer decode adds past the
        // shorter one, once it no longer ends in an incomplete character.
        if after.ends_with('\u{FFFD}')
            || after.len() <= before.len()
            || !after.is_char_boundary(before.len())
        {
            return Ok(String::new());
        }
        let delta = after[before.len()..].to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        self.accept(delta)
    }

    fn accept(&mut self, delta: String) -> TextResult<String> {
        self.pending.push_str(&delta);
        self.full.push_str(&delta);
        if let Some(cut) = self.stop_position() {
            self.stopped = true;
            // Emit what precedes the stop string, drop the rest.
            let emitted_before = self.full.len() - self.pending.len();
            let keep = cut.saturating_sub(emitted_before);
            let out = self.pending[..keep].to_string();
            self.full.truncate(cut);
            self.pending.clear();
            return Ok(out);
        }
        // Hold back the longest tail that is a proper prefix of a stop string.
        let hold = self
            .stop_strings
            .iter()
            .map(|s| longest_suffix_prefix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let emit = self.pending.len() - hold;
        let out = self.pending[..emit].to_string();
        self.pending.drain(..emit);
        Ok(out)
    }

    /// The byte position in the full text where the first stop string starts.
    fn stop_position(&self) -> Option<usize> {
        self.stop_strings
            .iter()
            .filter_map(|s| self.full.find(s.as_str()))
            .min()
    }

    /// Whether a stop string has appeared (generation should end).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The rest at the end of generation: held-back text and a trailing incomplete character
    /// (shown as U+FFFD, as the decoder gives it).
    pub fn finish(&mut self) -> TextResult<String> {
        if self.stopped {
            return Ok(String::new());
        }
        let before = self
            .text
            .decode(&self.ids[self.prefix..self.read], self.skip_special_tokens)?;
        let after = self
            .text
            .decode(&self.ids[self.prefix..], self.skip_special_tokens)?;
        let mut out = std::mem::take(&mut self.pending);
        if after.len() > before.len() && after.is_char_boundary(before.len()) {
            let tail = &after[before.len()..];
            self.full.push_str(tail);
            out.push_str(tail);
        }
        self.read = self.ids.len();
        self.prefix = self.read;
        Ok(out)
    }

    /// All text so far (without a stop string and what followed it).
    pub fn text(&self) -> &str {
        &self.full
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop` (on char bounds).
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && stop.is_char_boundary(n)
                && stop.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_prefix() {
        assert_eq!(longest_suffix_prefix("abc<|e", "<|end|>"), 3);
        assert_eq!(longest_suffix_prefix("abc", "<|end|>"), 0);
        assert_eq!(longest_suffix_prefix("é", "éa"), 2);
    }
}
