//! A model's own chat template (`chat_template` of tokenizer_config.json, or
//! `tokenizer.chat_template` of a GGUF), rendered with MiniJinja the way transformers'
//! `apply_chat_template` renders it with Jinja2: the same context (`messages`, `tools`,
//! `add_generation_prompt`, `bos_token`, `eos_token`, keys in the caller's order), the
//! environment transformers sets up (`trim_blocks` and `lstrip_blocks` on, a final newline
//! dropped, loop controls), the functions HF templates call (`raise_exception`,
//! `strftime_now`), a `tojson` like transformers' (`json.dumps` with `ensure_ascii=False`: no
//! escaping of `<` or non-ASCII), and Python's string and dict methods (`.strip()`, `.items()`,
//! ...; minijinja-contrib's pycompat).

use crate::error::{Error, Result};
use minijinja::{Environment, ErrorKind, Value};

/// Renders `template` with `context` (a JSON object: its keys become the template's variables).
pub fn render(template: &str, context: &serde_json::Value) -> Result<String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |format: String| -> String { strftime_now(&format) });
    let bad = |e: minijinja::Error| Error::InvalidArgument(format!("chat template: {e:#}"));
    env.add_template("chat", template).map_err(bad)?;
    let t = env.get_template("chat").map_err(bad)?;
    t.render(Value::from_serialize(context)).map_err(bad)
}

/// transformers' `tojson`: `json.dumps(value, ensure_ascii=False, indent=indent)`.
fn tojson(value: Value, indent: Option<usize>) -> std::result::Result<Value, minijinja::Error> {
    let bad = |e: serde_json::Error| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string());
    let text = match indent {
        None => {
            // Python's separators: ", " and ": ".
            let mut out = Vec::new();
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
            serde::Serialize::serialize(&value, &mut ser).map_err(bad)?;
            String::from_utf8(out).expect("JSON is UTF-8")
        }
        Some(n) => {
            let indent = " ".repeat(n);
            let mut out = Vec::new();
            let fmt = serde_json::ser::PrettyFormatter::with_indent(indent.as_bytes());
            let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
            serde::Serialize::serialize(&value, &mut ser).map_err(bad)?;
            String::from_utf8(out).expect("JSON is UTF-8")
        }
    };
    Ok(Value::from_safe_string(text))
}

/// `json.dumps`'s default separators, `", "` between items and `": "` after keys.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// The current UTC date and time formatted with the C `strftime` directives HF templates use
/// (`%Y %m %d %H %M %S %B %b %A %a %j %%`; others are kept as written).
fn strftime_now(format: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
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
    const DAYS: [&str; 7] = ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"];
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out += &year.to_string(),
            Some('m') => out += &format!("{month:02}"),
            Some('d') => out += &format!("{day:02}"),
            Some('H') => out += &format!("{:02}", rem / 3600),
            Some('M') => out += &format!("{:02}", rem / 60 % 60),
            Some('S') => out += &format!("{:02}", rem % 60),
            Some('B') => out += MONTHS[(month - 1) as usize],
            Some('b') => out += &MONTHS[(month - 1) as usize][..3],
            Some('A') => out += weekday,
            Some('a') => out += &weekday[..3],
            Some('j') => out += &format!("{yday:03}"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_like_transformers() {
        let t = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}\n{% endfor %}\
                 {% if add_generation_prompt %}<model>\n{% endif %}";
        let ctx = json!({"bos_token": "<bos>", "add_generation_prompt": true,
                         "messages": [{"role": "user", "content": " hi "}]});
        assert_eq!(render(t, &ctx).unwrap(), "<bos><user>hi\n<model>\n");
        // trim_blocks and lstrip_blocks on, the final newline dropped (Jinja2 3.1 gives this).
        let t = "{% for m in messages %}\n  <{{ m.role }}>{{ m.content }}\n{% endfor %}\n";
        let ctx = json!({"messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(render(t, &ctx).unwrap(), "  <user>hi\n");
        // Python's methods, and json.dumps's text (key order kept, no escaping).
        let t = "{{ m.content.strip() }}|{% for k, v in m.items() %}{{ k }}{% endfor %}|{{ m | tojson }}";
        let ctx = json!({"m": {"role": "<b>", "content": " x é "}});
        assert_eq!(render(t, &ctx).unwrap(), r#"x é|rolecontent|{"role": "<b>", "content": " x é "}"#);
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_errors() {
        let e = render("{{ raise_exception('no system role') }}", &json!({})).unwrap_err();
        assert!(e.to_string().contains("no system role"), "{e}");
        assert!(render("{% if %}", &json!({})).is_err());
    }

    #[test]
    fn strftime_now_formats_today() {
        let s = render("{{ strftime_now('%Y-%m-%d %d %b %Y') }}", &json!({})).unwrap();
        let year: i64 = s[..4].parse().unwrap();
        assert!((2024..3000).contains(&year), "{s}");
        assert_eq!(s.len(), "2026-11-28 28 Nov 2026".len(), "{s}");
    }
}
