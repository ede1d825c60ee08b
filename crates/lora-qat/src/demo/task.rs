//! The embedded task: three-digit addition and subtraction worked column by column with a
//! written chain of thought, a character-level tokenizer, seeded disjoint splits and the
//! per-token masks the training losses read.
//!
//! One example, `347+285`:
//!
//! ```text
//! <s>347+285=7+5+0=12;4+8+1=13;3+2+1=06;#632</s>
//! ```
//!
//! The prompt is `347+285=` (operands zero-padded to three digits, so every column sits at a
//! fixed offset). Each step `a±b±c=kd;` takes the column's digits from right to left with the
//! incoming carry (or borrow) `c` and writes the outgoing carry `k` and the digit `d`; after
//! `#` comes the answer without leading zeros, then `</s>`. Subtraction writes the borrow:
//! `3-5-0=18;` is `3 − 5 − 0 = 8 − 10·1`. The ';' closing each step is a step position of the
//! reasoning loss, the answer digits are its answer positions, and the prompt carries no
//! labels.
//!
//! ```
//! use lora_qat::demo::task::{Op, Problem, Tokenizer};
//! let p = Problem { a: 347, b: 285, op: Op::Add };
//! assert_eq!(p.text(), "347+285=7+5+0=12;4+8+1=13;3+2+1=06;#632");
//! let ex = p.example(&Tokenizer::new());
//! assert_eq!(ex.input_ids.len(), 1 + 39 + 1);
//! assert_eq!(ex.step_mask.unwrap().iter().filter(|&&s| s).count(), 3);
//! ```

use std::collections::HashSet;

use qat_train::data::Example;
use qat_train::loss::IGNORE_INDEX;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::error::{DemoError, Result};

/// Padding id (never a target).
pub const PAD_ID: u32 = 0;
/// Beginning of sequence, the first token of every example.
pub const BOS_ID: u32 = 1;
/// End of sequence, after the answer.
pub const EOS_ID: u32 = 2;
/// The characters after the three special tokens, in id order (`'0'` is id 3).
pub const ALPHABET: &str = "0123456789+-=;#";
/// Separates the chain of thought from the answer.
pub const ANSWER_MARK: char = '#';
/// Closes each reasoning step.
pub const STEP_END: char = ';';
/// Number of digits of each operand as written (zero-padded).
pub const DIGITS: usize = 3;
/// Characters of a prompt: two operands, the operator and `=`.
pub const PROMPT_CHARS: usize = 2 * DIGITS + 2;
/// Longest example in tokens: `<s>`, prompt, three 9-character steps, `#`, up to 4 answer
/// digits, `</s>`.
pub const MAX_TOKENS: usize = 1 + PROMPT_CHARS + 9 * DIGITS + 1 + (DIGITS + 1) + 1;

/// A character-level tokenizer: `<pad>`, `<s>`, `</s>`, then one id per character of
/// [`ALPHABET`].
///
/// ```
/// use lora_qat::demo::task::Tokenizer;
/// let t = Tokenizer::new();
/// assert_eq!(t.vocab_size(), 18);
/// let ids = t.encode("12+3=").unwrap();
/// assert_eq!(t.decode(&ids).unwrap(), "12+3=");
/// assert!(t.encode("1*2").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenizer {
    chars: Vec<char>,
}

impl Default for Tokenizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Tokenizer {
    /// The task's tokenizer.
    pub fn new() -> Self {
        Self {
            chars: ALPHABET.chars().collect(),
        }
    }

    /// Special tokens plus characters.
    pub fn vocab_size(&self) -> usize {
        3 + self.chars.len()
    }

    /// The id of one character.
    pub fn id(&self, c: char) -> Option<u32> {
        self.chars
            .iter()
            .position(|&x| x == c)
            .map(|i| i as u32 + 3)
    }

    /// The ids of `text` (no special tokens added); errors on a character outside the
    /// alphabet, naming it and its position.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.chars()
            .enumerate()
            .map(|(i, c)| {
                self.id(c).ok_or_else(|| DemoError::Tokenize {
                    text: text.to_string(),
                    reason: format!("character {c:?} at {i} is not in {ALPHABET:?}"),
                })
            })
            .collect()
    }

    /// The text of `ids`: special tokens are dropped, except that decoding stops at `</s>`.
    /// Errors on an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut out = String::new();
        for (i, &id) in ids.iter().enumerate() {
            match id {
                EOS_ID => break,
                PAD_ID | BOS_ID => {}
                _ => {
                    let c = self
                        .chars
                        .get(id as usize - 3)
                        .ok_or_else(|| DemoError::Tokenize {
                            text: format!("{ids:?}"),
                            reason: format!(
                                "id {id} at {i} is outside the vocabulary 0..{}",
                                self.vocab_size()
                            ),
                        })?;
                    out.push(*c);
                }
            }
        }
        Ok(out)
    }
}

/// The operation of a problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    Add,
    Sub,
}

impl Op {
    pub fn symbol(self) -> char {
        match self {
            Op::Add => '+',
            Op::Sub => '-',
        }
    }
}

/// One problem `a ± b` with `10 ≤ b ≤ a ≤ 999` for subtraction (the result is never
/// negative) and `10 ≤ a, b ≤ 999` for addition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Problem {
    pub a: u32,
    pub b: u32,
    pub op: Op,
}

/// One column of the worked solution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub a_digit: u32,
    pub b_digit: u32,
    /// Incoming carry (addition) or borrow (subtraction).
    pub carry_in: u32,
    /// Outgoing carry or borrow.
    pub carry_out: u32,
    pub digit: u32,
}

impl Problem {
    /// Checks the operand ranges.
    pub fn validate(&self) -> Result<()> {
        let range = 10..=999;
        if !range.contains(&self.a) || !range.contains(&self.b) {
            return Err(DemoError::invalid(
                "problem operands",
                format!("{} {} {}", self.a, self.op.symbol(), self.b),
                "operands are 2- or 3-digit numbers (10..=999)",
            ));
        }
        if self.op == Op::Sub && self.b > self.a {
            return Err(DemoError::invalid(
                "problem operands",
                format!("{} - {}", self.a, self.b),
                "subtraction needs a ≥ b",
            ));
        }
        Ok(())
    }

    /// The exact result.
    pub fn result(&self) -> u32 {
        match self.op {
            Op::Add => self.a + self.b,
            Op::Sub => self.a - self.b,
        }
    }

    /// The columns from the least significant digit up.
    pub fn steps(&self) -> [Step; DIGITS] {
        let mut carry = 0;
        std::array::from_fn(|i| {
            let p = 10u32.pow(i as u32);
            let (a_digit, b_digit) = (self.a / p % 10, self.b / p % 10);
            let (digit, carry_out) = match self.op {
                Op::Add => {
                    let t = a_digit + b_digit + carry;
                    (t % 10, t / 10)
                }
                Op::Sub => {
                    let t = a_digit as i32 - b_digit as i32 - carry as i32;
                    if t < 0 {
                        ((t + 10) as u32, 1)
                    } else {
                        (t as u32, 0)
                    }
                }
            };
            let step = Step {
                a_digit,
                b_digit,
                carry_in: carry,
                carry_out,
                digit,
            };
            carry = carry_out;
            step
        })
    }

    /// The prompt, `347+285=`.
    pub fn prompt(&self) -> String {
        format!(
            "{:0w$}{}{:0w$}=",
            self.a,
            self.op.symbol(),
            self.b,
            w = DIGITS
        )
    }

    /// The answer as the model must write it after `#`.
    pub fn answer(&self) -> String {
        self.result().to_string()
    }

    /// The whole text: prompt, steps, `#`, answer.
    pub fn text(&self) -> String {
        let mut text = self.prompt();
        let op = self.op.symbol();
        for s in self.steps() {
            text.push_str(&format!(
                "{}{op}{}{op}{}={}{}{STEP_END}",
                s.a_digit, s.b_digit, s.carry_in, s.carry_out, s.digit
            ));
        }
        text.push(ANSWER_MARK);
        text.push_str(&self.answer());
        text
    }

    /// The prompt's ids with `<s>` in front: what generation starts from.
    pub fn prompt_ids(&self, tokenizer: &Tokenizer) -> Vec<u32> {
        let mut ids = vec![BOS_ID];
        ids.extend(
            tokenizer
                .encode(&self.prompt())
                .expect("the prompt uses only the task alphabet"),
        );
        ids
    }

    /// The training example: `<s> text </s>`, labels `-100` on `<s>` and the prompt, the
    /// step mask on every `;`, the answer mask on the answer digits.
    pub fn example(&self, tokenizer: &Tokenizer) -> Example {
        let text = self.text();
        let mut ids = vec![BOS_ID];
        ids.extend(
            tokenizer
                .encode(&text)
                .expect("the task text uses only the task alphabet"),
        );
        ids.push(EOS_ID);
        let prompt_len = 1 + PROMPT_CHARS;
        let labels = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                if i < prompt_len {
                    IGNORE_INDEX
                } else {
                    i64::from(id)
                }
            })
            .collect();
        let step_id = tokenizer.id(STEP_END);
        let step_mask = ids.iter().map(|&id| Some(id) == step_id).collect();
        let answer_start = 1 + text.rfind(ANSWER_MARK).expect("every text has '#'") + 1;
        let answer_end = ids.len() - 1;
        let answer_mask = (0..ids.len())
            .map(|i| (answer_start..answer_end).contains(&i))
            .collect();
        Example {
            input_ids: ids,
            labels: Some(labels),
            step_mask: Some(step_mask),
            answer_mask: Some(answer_mask),
            segment_ids: None,
        }
    }

    /// One JSONL line: the [`Example`] fields (what `qat_train::data::Dataset` reads) plus
    /// `prompt`, `answer` and `text` (what `lora-qat eval` grades by exact match).
    ///
    /// ```
    /// use lora_qat::demo::task::{Op, Problem, Tokenizer};
    /// let line = Problem { a: 12, b: 30, op: Op::Add }.jsonl_line(&Tokenizer::new());
    /// let ds = qat_train::data::Dataset::from_jsonl_str(&line, "line").unwrap();
    /// assert_eq!(ds.len(), 1);
    /// assert!(line.contains(r#""prompt":"012+030=""#));
    /// ```
    pub fn jsonl_line(&self, tokenizer: &Tokenizer) -> String {
        let example = self.example(tokenizer);
        serde_json::json!({
            "input_ids": example.input_ids,
            "labels": example.labels,
            "step_mask": example.step_mask,
            "answer_mask": example.answer_mask,
            "prompt": self.prompt(),
            "answer": self.answer(),
            "text": self.text(),
        })
        .to_string()
    }

    /// Reads a problem back from its prompt (`347+285=`, with or without the `=`).
    pub fn parse_prompt(prompt: &str) -> Result<Self> {
        let bad = |reason: &str| DemoError::Tokenize {
            text: prompt.to_string(),
            reason: reason.to_string(),
        };
        let body = prompt.strip_suffix('=').unwrap_or(prompt);
        let (op, pos) = body
            .char_indices()
            .find_map(|(i, c)| match c {
                '+' => Some((Op::Add, i)),
                '-' => Some((Op::Sub, i)),
                _ => None,
            })
            .ok_or_else(|| bad("no '+' or '-'"))?;
        let parse = |s: &str| s.parse::<u32>().map_err(|_| bad("operands must be digits"));
        let problem = Problem {
            a: parse(&body[..pos])?,
            b: parse(&body[pos + 1..])?,
            op,
        };
        problem.validate()?;
        Ok(problem)
    }
}

/// The answer a generated continuation gives: the digits after the last `#`, up to `</s>` or
/// the end. `None` when there is no `#`.
///
/// ```
/// use lora_qat::demo::task::answer_of;
/// assert_eq!(answer_of("7+5+0=12;#632").as_deref(), Some("632"));
/// assert_eq!(answer_of("7+5+0=12;"), None);
/// ```
pub fn answer_of(generated: &str) -> Option<String> {
    generated
        .rfind(ANSWER_MARK)
        .map(|i| generated[i + ANSWER_MARK.len_utf8()..].to_string())
}

/// Sizes of the three splits, and the seed they are drawn with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitSizes {
    pub train: usize,
    pub validation: usize,
    pub test: usize,
    pub seed: u64,
}

/// Problems never shared between splits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Splits {
    pub train: Vec<Problem>,
    pub validation: Vec<Problem>,
    pub test: Vec<Problem>,
}

/// Number of distinct problems the task has (both operations).
pub fn problem_space() -> usize {
    let n = 990usize; // 10..=999
    n * n + n * (n + 1) / 2
}

/// Draws distinct problems with `ChaCha8Rng(seed)`: the test split first, then validation,
/// then training, so that a split's problems depend only on the seed and the sizes of the
/// splits drawn before it (a shorter training run sees the same test problems). Half the
/// draws are additions, half subtractions.
///
/// ```
/// use lora_qat::demo::task::{draw_splits, SplitSizes};
/// let s = draw_splits(SplitSizes { train: 200, validation: 20, test: 30, seed: 3 }).unwrap();
/// assert!(s.test.iter().all(|p| !s.train.contains(p) && !s.validation.contains(p)));
/// let fewer = draw_splits(SplitSizes { train: 50, validation: 20, test: 30, seed: 3 }).unwrap();
/// assert_eq!(fewer.test, s.test);
/// ```
pub fn draw_splits(sizes: SplitSizes) -> Result<Splits> {
    let total = sizes.train + sizes.validation + sizes.test;
    if total > problem_space() / 2 {
        return Err(DemoError::invalid(
            "split sizes",
            total,
            format!(
                "at most half of the {} distinct problems can be drawn",
                problem_space()
            ),
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(sizes.seed);
    let mut seen = HashSet::with_capacity(total);
    let mut draw = |n: usize| -> Vec<Problem> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let op = if rng.random::<bool>() {
                Op::Add
            } else {
                Op::Sub
            };
            let x = rng.random_range(10..=999u32);
            let y = rng.random_range(10..=999u32);
            let (a, b) = match op {
                Op::Add => (x, y),
                Op::Sub => (x.max(y), x.min(y)),
            };
            let p = Problem { a, b, op };
            if seen.insert(p) {
                out.push(p);
            }
        }
        out
    };
    let test = draw(sizes.test);
    let validation = draw(sizes.validation);
    let train = draw(sizes.train);
    Ok(Splits {
        train,
        validation,
        test,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_rebuild_the_result_for_every_kind_of_column() {
        for (a, b, op) in [
            (999, 999, Op::Add),
            (10, 10, Op::Add),
            (500, 499, Op::Sub),
            (100, 99, Op::Sub),
            (347, 347, Op::Sub),
        ] {
            let p = Problem { a, b, op };
            p.validate().unwrap();
            let steps = p.steps();
            let mut value = 0;
            for (i, s) in steps.iter().enumerate() {
                value += s.digit * 10u32.pow(i as u32);
                if i > 0 {
                    assert_eq!(s.carry_in, steps[i - 1].carry_out);
                }
            }
            if op == Op::Add {
                value += steps[DIGITS - 1].carry_out * 1000;
            } else {
                assert_eq!(steps[DIGITS - 1].carry_out, 0, "a ≥ b never borrows out");
            }
            assert_eq!(value, p.result(), "{}", p.text());
        }
    }

    #[test]
    fn subtraction_text_writes_the_borrow() {
        let p = Problem {
            a: 503,
            b: 47,
            op: Op::Sub,
        };
        assert_eq!(p.text(), "503-047=3-7-0=16;0-4-1=15;5-0-1=04;#456");
    }

    #[test]
    fn example_masks_and_labels_line_up_with_the_text() {
        let t = Tokenizer::new();
        let p = Problem {
            a: 999,
            b: 999,
            op: Op::Add,
        };
        let ex = p.example(&t);
        assert_eq!(ex.input_ids.len(), MAX_TOKENS);
        let labels = ex.labels.unwrap();
        assert!(labels[..1 + PROMPT_CHARS]
            .iter()
            .all(|&l| l == IGNORE_INDEX));
        assert!(labels[1 + PROMPT_CHARS..].iter().all(|&l| l >= 0));
        let answer: Vec<u32> = ex
            .input_ids
            .iter()
            .zip(ex.answer_mask.unwrap())
            .filter(|(_, m)| *m)
            .map(|(&id, _)| id)
            .collect();
        assert_eq!(t.decode(&answer).unwrap(), "1998");
        let steps: Vec<usize> = ex
            .step_mask
            .unwrap()
            .iter()
            .enumerate()
            .filter(|(_, &m)| m)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(steps, vec![1 + 8 + 8, 1 + 8 + 17, 1 + 8 + 26]);
        assert_eq!(*ex.input_ids.last().unwrap(), EOS_ID);
    }

    #[test]
    fn prompts_parse_back() {
        let p = Problem {
            a: 47,
            b: 12,
            op: Op::Sub,
        };
        assert_eq!(Problem::parse_prompt(&p.prompt()).unwrap(), p);
        assert!(Problem::parse_prompt("12-47=").is_err());
        assert!(Problem::parse_prompt("12*47=").is_err());
    }

    #[test]
    fn splits_are_disjoint_and_seeded() {
        let sizes = SplitSizes {
            train: 2000,
            validation: 100,
            test: 100,
            seed: 11,
        };
        let s = draw_splits(sizes).unwrap();
        let mut all: HashSet<Problem> = HashSet::new();
        for p in s.train.iter().chain(&s.validation).chain(&s.test) {
            p.validate().unwrap();
            assert!(all.insert(*p), "{p:?} drawn twice");
        }
        assert_eq!(draw_splits(sizes).unwrap(), s);
        let adds = s.train.iter().filter(|p| p.op == Op::Add).count();
        assert!((800..1200).contains(&adds), "{adds} additions of 2000");
        let other = draw_splits(SplitSizes { seed: 12, ..sizes }).unwrap();
        assert_ne!(other.test, s.test);
    }

    #[test]
    fn decode_rejects_ids_outside_the_vocabulary() {
        assert!(Tokenizer::new().decode(&[3, 99]).is_err());
    }
}
