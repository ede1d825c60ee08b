//! Chat templates rendered as transformers' `apply_chat_template` renders them.
//!
//! transformers compiles a template with Jinja2 `trim_blocks` and `lstrip_blocks`, the
//! loop-controls extension, the globals `raise_exception` and `strftime_now`, and a `tojson`
//! filter that is Python's `json.dumps` (`ensure_ascii=False`, `", "`/`": "` separators). It
//! renders with `messages`, `tools`, `documents`, `add_generation_prompt` and the special
//! tokens (`bos_token`, `eos_token`, ...). minijinja does the same here; Python's string and
//! dict methods (`strip`, `split`, `items`, ...) come from minijinja-contrib's pycompat.
//!
//! `{% generation %}…{% endgeneration %}` (transformers' assistant-mask blocks) is rewritten to
//! a filter block that brackets its output with two private-use marker characters, so the
//! rendered text keeps Jinja's whitespace rules exactly and the spans can be read back.

use std::ops::Range;
use std::sync::OnceLock;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use super::{TextError, TextResult};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Marks the start and end of a `{% generation %}` block's output (Unicode private use).
const GENERATION_START: char = '\u{F0000}';
const GENERATION_END: char = '\u{F0001}';
const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template with the special-token strings it is rendered with.
///
/// ```
/// use lora_qat::text::{ChatMessage, ChatTemplate};
/// let template = ChatTemplate::new(
///     "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}\
///      {% if add_generation_prompt %}<|assistant|>{% endif %}",
/// )
/// .unwrap();
/// let text = template.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
/// assert_eq!(text, "<|user|>Hi\n<|assistant|>");
/// ```
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    has_generation_blocks: bool,
    special_tokens: Vec<(String, String)>,
}

impl ChatTemplate {
    /// Compiles `source`; errors (with minijinja's line) when it does not parse.
    pub fn new(source: &str) -> TextResult<Self> {
        let (rewritten, has_generation_blocks) = rewrite_generation_blocks(source);
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_filter("generation_span", |s: String| {
            format!("{GENERATION_START}{s}{GENERATION_END}")
        });
        env.add_template_owned(TEMPLATE_NAME, rewritten)
            .map_err(|e| TextError::Template(describe(&e)))?;
        Ok(Self {
            env,
            source: source.to_string(),
            has_generation_blocks,
            special_tokens: Vec::new(),
        })
    }

    /// Sets a special-token variable (`bos_token`, `eos_token`, `unk_token`, `pad_token`)
    /// the template sees.
    pub fn with_special_token(mut self, name: &str, content: &str) -> Self {
        self.special_tokens.retain(|(n, _)| n != name);
        self.special_tokens
            .push((name.to_string(), content.to_string()));
        self
    }

    /// The template's source as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template marks assistant output with `{% generation %}` blocks.
    pub fn has_generation_blocks(&self) -> bool {
        self.has_generation_blocks
    }

    /// Renders `messages` (`add_generation_prompt` appends the assistant header).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> TextResult<String> {
        let messages =
            serde_json::to_value(messages).map_err(|e| TextError::Template(e.to_string()))?;
        self.render_json(&messages, add_generation_prompt, &serde_json::Map::new())
            .map(|(text, _)| text)
    }

    /// Renders messages given as JSON (any extra fields — `tool_calls`, ... — reach the
    /// template) with extra variables; returns the text and the byte ranges of its
    /// `{% generation %}` blocks.
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> TextResult<(String, Vec<Range<usize>>)> {
        let mut ctx = serde_json::Map::new();
        for (name, content) in &self.special_tokens {
            ctx.insert(name.clone(), serde_json::Value::String(content.clone()));
        }
        ctx.insert("messages".into(), messages.clone());
        ctx.insert("tools".into(), serde_json::Value::Null);
        ctx.insert("documents".into(), serde_json::Value::Null);
        ctx.insert(
            "add_generation_prompt".into(),
            serde_json::Value::Bool(add_generation_prompt),
        );
        for (k, v) in extra {
            ctx.insert(k.clone(), v.clone());
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TextError::Template(describe(&e)))?;
        let rendered = template
            .render(Value::from_serialize(&ctx))
            .map_err(|e| TextError::Template(describe(&e)))?;
        strip_generation_markers(&rendered)
    }
}

/// `{%- generation -%}` → `{%- filter generation_span -%}`, keeping the whitespace controls.
fn rewrite_generation_blocks(source: &str) -> (String, bool) {
    static OPEN: OnceLock<regex::Regex> = OnceLock::new();
    static CLOSE: OnceLock<regex::Regex> = OnceLock::new();
    let open = OPEN.get_or_init(|| {
        regex::Regex::new(r"\{%([-+]?)\s*generation\s*([-+]?)%\}").expect("valid regex")
    });
    let close = CLOSE.get_or_init(|| {
        regex::Regex::new(r"\{%([-+]?)\s*endgeneration\s*([-+]?)%\}").expect("valid regex")
    });
    let found = open.is_match(source);
    let s = open.replace_all(source, "{%${1} filter generation_span ${2}%}");
    let s = close.replace_all(&s, "{%${1} endfilter ${2}%}");
    (s.into_owned(), found)
}

fn strip_generation_markers(rendered: &str) -> TextResult<(String, Vec<Range<usize>>)> {
    let mut text = String::with_capacity(rendered.len());
    let mut spans = Vec::new();
    let mut open: Option<usize> = None;
    for c in rendered.chars() {
        match c {
            GENERATION_START => {
                if open.is_some() {
                    return Err(TextError::Template("nested {% generation %} blocks".into()));
                }
                open = Some(text.len());
            }
            GENERATION_END => match open.take() {
                Some(start) => spans.push(start..text.len()),
                None => {
                    return Err(TextError::Template(
                        "the rendered text holds the generation marker U+F0001 itself".into(),
                    ))
                }
            },
            c => text.push(c),
        }
    }
    if open.is_some() {
        return Err(TextError::Template(
            "the rendered text holds the generation marker U+F0000 itself".into(),
        ));
    }
    Ok((text, spans))
}

/// minijinja's message with the template line it points at.
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    if let Some(line) = e.line() {
        s.push_str(&format!(" (template line {line})"));
    }
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    s
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("the template raised: {message}"),
    ))
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    python_json(
        &json,
        indent,
        ensure_ascii.unwrap_or(false),
        sort_keys.unwrap_or(false),
        0,
        &mut out,
    );
    Ok(Value::from_safe_string(out))
}

/// Python's `json.dumps` layout: `", "` and `": "` without indent, `","` and newlines with it.
fn python_json(
    v: &serde_json::Value,
    indent: Option<usize>,
    ensure_ascii: bool,
    sort_keys: bool,
    level: usize,
    out: &mut String,
) {
    use serde_json::Value as J;
    let newline = |out: &mut String, level: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', width * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (_, Some(u), _) => out.push_str(&u.to_string()),
            (_, _, Some(f)) => out.push_str(&python_float(f)),
            _ => out.push_str(&n.to_string()),
        },
        J::String(s) => python_string(s, ensure_ascii, out),
        J::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                python_json(item, indent, ensure_ascii, sort_keys, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        J::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
            if sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                python_string(k, ensure_ascii, out);
                out.push_str(": ");
                python_json(item, indent, ensure_ascii, sort_keys, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
    }
}

/// Python's `repr(float)` for the values JSON carries (shortest round trip, `.0` kept).
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let s = format!("{f:?}");
    // Rust's Debug gives "1e20" where Python gives "1e+20".
    match s.split_once('e') {
        Some((m, e)) if !e.starts_with('-') => format!("{m}e+{e}"),
        _ => s,
    }
}

fn python_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// transformers' `strftime_now(format)`: the current time (UTC here) formatted with the
/// C `strftime` directives templates use.
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(secs, &format).map(Value::from)
}

/// Formats Unix time `secs` (UTC).
fn strftime(secs: i64, format: &str) -> Result<String, Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(d) = chars.next() else {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "strftime_now: format ends with a lone %",
            ));
        };
        match d {
            'd' => out.push_str(&format!("{day:02}")),
            'm' => out.push_str(&format!("{month:02}")),
            'Y' => out.push_str(&year.to_string()),
            'y' => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            'B' => out.push_str(MONTHS[month as usize - 1]),
            'b' => out.push_str(&MONTHS[month as usize - 1][..3]),
            'A' => out.push_str(DAYS[weekday]),
            'a' => out.push_str(&DAYS[weekday][..3]),
            'H' => out.push_str(&format!("{:02}", rem / 3600)),
            'M' => out.push_str(&format!("{:02}", rem / 60 % 60)),
            'S' => out.push_str(&format!("{:02}", rem % 60)),
            'j' => out.push_str(&format!("{day_of_year:03}")),
            '%' => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: directive %{other} is not supported"),
                ))
            }
        }
    }
    Ok(out)
}

/// Proleptic Gregorian date of a day count from 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_format_as_strftime_does() {
        // 2024-07-23 12:34:56 UTC was a Tuesday.
        let t = 1_721_738_096;
        assert_eq!(strftime(t, "%d %b %Y").unwrap(), "23 Jul 2024");
        assert_eq!(
            strftime(t, "%A %B %d, %H:%M:%S %j %%").unwrap(),
            "Tuesday July 23, 12:34:56 205 %"
        );
        assert_eq!(strftime(0, "%Y-%m-%d %a").unwrap(), "1970-01-01 Thu");
        assert!(strftime(0, "%Q").is_err());
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let t = ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=2) }}").unwrap();
        let x = serde_json::json!({"a": [1, 2.5, "é\n"], "b": {}, "c": null});
        let mut extra = serde_json::Map::new();
        extra.insert("x".into(), x);
        let (text, _) = t
            .render_json(&serde_json::json!([]), false, &extra)
            .unwrap();
        assert_eq!(
            text,
            "{\"a\": [1, 2.5, \"é\\n\"], \"b\": {}, \"c\": null}|{\n  \"a\": [\n    1,\n    2.5,\n    \"é\\n\"\n  ],\n  \"b\": {},\n  \"c\": null\n}"
        );
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_errors() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}").unwrap();
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
        let err = ChatTemplate::new("{% for %}").unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn generation_blocks_give_spans_and_keep_whitespace_rules() {
        let t = ChatTemplate::new(
            "{% for m in messages %}[{{ m.role }}]\n{% if m.role == 'assistant' %}{% generation %}\n{{ m.content }}!{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}",
        )
        .unwrap();
        assert!(t.has_generation_blocks());
        let msgs = serde_json::json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]);
        let (text, spans) = t.render_json(&msgs, false, &Default::default()).unwrap();
        // As transformers renders it (trim_blocks eats the newline after a block tag):
        // `render_jinja_template(..., return_assistant_tokens_mask=True)` gives this text and
        // the generation span (20, 22).
        assert_eq!(text, "[user]\nq[assistant]\na!");
        assert_eq!(spans, vec![20..22]);
        assert_eq!(&text[spans[0].clone()], "a!");
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new(
            "{{ messages[0].content.strip().split(' ') | length }}{{ ' x '.rstrip() }}",
        )
        .unwrap();
        let text = t
            .render(&[ChatMessage::new("user", "  a b c ")], false)
            .unwrap();
        assert_eq!(text, "3 x");
    }
}
