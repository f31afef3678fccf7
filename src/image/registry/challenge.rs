//! The `WWW-Authenticate` challenge parser.

use std::collections::BTreeMap;

/// One authentication challenge, e.g. `Bearer realm="…",service="…"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lower-cased scheme (`bearer`, `basic`).
    pub scheme: String,
    /// Parameters with lower-cased names and unquoted values.
    pub params: BTreeMap<String, String>,
}

/// Parse a `WWW-Authenticate` header value (RFC 9110 §11.6.1): several challenges, quoted strings
/// with commas and `\` escapes, optional whitespace, empty list elements. Garbage is skipped.
pub fn parse_www_authenticate(header: &str) -> Vec<Challenge> {
    let s = header.as_bytes();
    let mut i = 0;
    let mut out: Vec<Challenge> = Vec::new();
    let is_tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && (s[*i] == b' ' || s[*i] == b'\t') {
            *i += 1;
        }
    };
    while i < s.len() {
        skip_ws(&mut i);
        if i < s.len() && s[i] == b',' {
            i += 1;
            continue;
        }
        let start = i;
        while i < s.len() && is_tchar(s[i]) {
            i += 1;
        }
        if start == i {
            i += 1; // skip an unexpected byte
            continue;
        }
        let token = &header[start..i];
        let save = i;
        skip_ws(&mut i);
        if i < s.len() && s[i] == b'=' && !out.is_empty() && !token68_tail(&s[i..]) {
            // auth-param of the current challenge
            i += 1;
            skip_ws(&mut i);
            let value = if i < s.len() && s[i] == b'"' {
                i += 1;
                let mut v = Vec::new();
                while i < s.len() && s[i] != b'"' {
                    if s[i] == b'\\' && i + 1 < s.len() {
                        i += 1;
                    }
                    v.push(s[i]);
                    i += 1;
                }
                i += 1; // closing quote (or end)
                String::from_utf8_lossy(&v).into_owned()
            } else {
                let vs = i;
                while i < s.len() && s[i] != b',' {
                    i += 1;
                }
                header[vs..i].trim().to_string()
            };
            if let Some(c) = out.last_mut() {
                c.params.entry(token.to_ascii_lowercase()).or_insert(value);
            }
        } else if i < s.len() && s[i] == b'=' {
            // token68 right after a scheme (`Basic abc==`) or a stray `x=`: skip to the next comma
            while i < s.len() && s[i] != b',' {
                i += 1;
            }
        } else {
            i = save;
            out.push(Challenge {
                scheme: token.to_ascii_lowercase(),
                params: BTreeMap::new(),
            });
        }
    }
    out
}

/// `=` followed only by more `=` and then the end or a comma: token68 padding, not a parameter.
fn token68_tail(rest: &[u8]) -> bool {
    let mut j = 0;
    while j < rest.len() && rest[j] == b'=' {
        j += 1;
    }
    j > 1 && (j == rest.len() || rest[j..].iter().find(|c| **c != b' ') == Some(&b','))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(scheme: &str, params: &[(&str, &str)]) -> Challenge {
        Challenge {
            scheme: scheme.into(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn www_authenticate_parser() {
        assert_eq!(
            parse_www_authenticate(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull""#
            ),
            vec![ch(
                "bearer",
                &[
                    ("realm", "https://auth.docker.io/token"),
                    ("service", "registry.docker.io"),
                    ("scope", "repository:library/ubuntu:pull")
                ]
            )]
        );
        // quoted commas, escapes, spaces, unquoted values, case-insensitive names
        assert_eq!(
            parse_www_authenticate(
                r#"Bearer  Realm = "https://x/token?a=1,b=2" , service="a \"quoted\", svc",scope=repository:a/b:pull,push"#
            ),
            vec![
                ch(
                    "bearer",
                    &[
                        ("realm", "https://x/token?a=1,b=2"),
                        ("service", "a \"quoted\", svc"),
                        ("scope", "repository:a/b:pull"),
                    ]
                ),
                ch("push", &[])
            ]
        );
        // several challenges in one header
        assert_eq!(
            parse_www_authenticate(
                r#"Basic realm="r1", Bearer realm="https://t", error="invalid_token""#
            ),
            vec![
                ch("basic", &[("realm", "r1")]),
                ch(
                    "bearer",
                    &[("realm", "https://t"), ("error", "invalid_token")]
                )
            ]
        );
        assert_eq!(parse_www_authenticate("Basic"), vec![ch("basic", &[])]);
        assert_eq!(
            parse_www_authenticate("Basic abc=="),
            vec![ch("basic", &[])]
        );
        assert_eq!(
            parse_www_authenticate(r#"Basic realm="ECR", charset="UTF-8""#),
            vec![ch("basic", &[("realm", "ECR"), ("charset", "UTF-8")])]
        );
        assert!(parse_www_authenticate("").is_empty());
        assert!(parse_www_authenticate(" , ,").is_empty());
        // unterminated quote does not panic
        assert_eq!(
            parse_www_authenticate(r#"Bearer realm="https://x"#),
            vec![ch("bearer", &[("realm", "https://x")])]
        );
    }
}
