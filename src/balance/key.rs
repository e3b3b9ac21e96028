//! The `hash_key` template: nginx-style variables rendered into the bytes `hash` hashes.

use std::io::Write as _;
use std::net::IpAddr;

use http::header::{COOKIE, HOST, HeaderName};
use http::{HeaderMap, Uri};

/// One piece of a template.
#[derive(Debug, Clone, PartialEq)]
enum Part {
    /// Text copied as is.
    Literal(Box<[u8]>),
    /// `$remote_addr`.
    RemoteAddr,
    /// `$request_uri`: path and query.
    RequestUri,
    /// `$uri`: path.
    Uri,
    /// `$args` / `$query_string`: query without `?`.
    Args,
    /// `$host`: Host without port, lower-case.
    Host,
    /// `$http_<name>`: a request header.
    Header(HeaderName),
    /// `$cookie_<name>`: one cookie's value.
    Cookie(Box<[u8]>),
    /// `$arg_<name>`: one query argument's raw value.
    Arg(Box<[u8]>),
}

/// A parsed `hash_key` such as `"$http_x_user_id:$cookie_session"`.
///
/// Variables (names case-insensitive, `$name` or `${name}`): `$remote_addr`,
/// `$request_uri` (path + query), `$uri` (path, not decoded), `$args` (query),
/// `$host` (Host header or URI authority, without port, lower-case),
/// `$http_<name>` (header; `_` stands for `-`; repeated headers joined by `", "`,
/// cookies by `"; "`), `$cookie_<name>`, `$arg_<name>` (raw, first match,
/// names case-insensitive as in nginx). A missing value renders as nothing.
/// Anything else is literal text.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyTemplate {
    source: String,
    parts: Box<[Part]>,
}

/// Bytes allowed in a variable name after `$`.
fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

impl KeyTemplate {
    /// Parse a template; unknown variables and malformed `$` are errors.
    pub fn parse(source: &str) -> Result<KeyTemplate, String> {
        if source.is_empty() {
            return Err("empty hash key".to_string());
        }
        let b = source.as_bytes();
        let mut parts = Vec::new();
        let mut literal = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] != b'$' {
                literal.push(b[i]);
                i += 1;
                continue;
            }
            let (name, next) = if b.get(i + 1) == Some(&b'{') {
                let Some(len) = b[i + 2..].iter().position(|&c| c == b'}') else {
                    return Err(format!("unclosed \"${{\" at byte {i} in \"{source}\""));
                };
                (&source[i + 2..i + 2 + len], i + 3 + len)
            } else {
                let len = b[i + 1..].iter().take_while(|&&c| is_name_byte(c)).count();
                (&source[i + 1..i + 1 + len], i + 1 + len)
            };
            if name.is_empty() || !name.bytes().all(is_name_byte) {
                return Err(format!("invalid variable name at byte {i} in \"{source}\""));
            }
            if !literal.is_empty() {
                parts.push(Part::Literal(
                    std::mem::take(&mut literal).into_boxed_slice(),
                ));
            }
            parts.push(Self::variable(name)?);
            i = next;
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal.into_boxed_slice()));
        }
        Ok(KeyTemplate {
            source: source.to_string(),
            parts: parts.into_boxed_slice(),
        })
    }

    /// The part for one variable name (without `$`).
    fn variable(name: &str) -> Result<Part, String> {
        let lower = name.to_ascii_lowercase();
        let suffix = |prefix: &str| -> Result<Box<[u8]>, String> {
            let rest = &lower[prefix.len()..];
            if rest.is_empty() {
                return Err(format!("\"${name}\" needs a name after \"{prefix}\""));
            }
            Ok(rest.as_bytes().into())
        };
        Ok(match lower.as_str() {
            "remote_addr" => Part::RemoteAddr,
            "request_uri" => Part::RequestUri,
            "uri" | "document_uri" => Part::Uri,
            "args" | "query_string" => Part::Args,
            "host" => Part::Host,
            n if n.starts_with("http_") => {
                let header: Vec<u8> = suffix("http_")?
                    .iter()
                    .map(|&c| if c == b'_' { b'-' } else { c })
                    .collect();
                let header = HeaderName::from_bytes(&header)
                    .map_err(|_| format!("\"${name}\": invalid header name"))?;
                Part::Header(header)
            }
            n if n.starts_with("cookie_") => Part::Cookie(suffix("cookie_")?),
            n if n.starts_with("arg_") => Part::Arg(suffix("arg_")?),
            _ => return Err(format!("unknown variable \"${name}\" in hash key")),
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Render the key for one request into `out` (cleared first; reuse it to
    /// avoid allocating per request).
    pub fn render(&self, uri: &Uri, headers: &HeaderMap, client_ip: IpAddr, out: &mut Vec<u8>) {
        out.clear();
        for part in self.parts.iter() {
            match part {
                Part::Literal(text) => out.extend_from_slice(text),
                Part::RemoteAddr => {
                    // Writing to a Vec cannot fail.
                    let _ = write!(out, "{}", client_ip.to_canonical());
                }
                Part::RequestUri => {
                    let pq = uri.path_and_query().map_or("", |pq| pq.as_str());
                    out.extend_from_slice(pq.as_bytes());
                }
                Part::Uri => out.extend_from_slice(uri.path().as_bytes()),
                Part::Args => out.extend_from_slice(uri.query().unwrap_or("").as_bytes()),
                Part::Host => render_host(uri, headers, out),
                Part::Header(name) => {
                    let sep: &[u8] = if name == COOKIE { b"; " } else { b", " };
                    for (n, v) in headers.get_all(name).iter().enumerate() {
                        if n > 0 {
                            out.extend_from_slice(sep);
                        }
                        out.extend_from_slice(v.as_bytes());
                    }
                }
                Part::Cookie(name) => {
                    if let Some(v) = find_cookie(headers, name) {
                        out.extend_from_slice(v);
                    }
                }
                Part::Arg(name) => {
                    if let Some(v) = find_arg(uri.query().unwrap_or("").as_bytes(), name) {
                        out.extend_from_slice(v);
                    }
                }
            }
        }
    }
}

impl std::fmt::Display for KeyTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

/// `$host`: the URI's authority host, else the Host header; port removed, lower-case.
fn render_host(uri: &Uri, headers: &HeaderMap, out: &mut Vec<u8>) {
    let raw: &[u8] = match uri.host() {
        Some(h) => h.as_bytes(),
        None => match headers.get(HOST) {
            Some(v) => v.as_bytes(),
            None => return,
        },
    };
    let host = if raw.first() == Some(&b'[') {
        match raw.iter().position(|&c| c == b']') {
            Some(end) => &raw[..=end],
            None => raw,
        }
    } else {
        match raw.iter().position(|&c| c == b':') {
            Some(colon) => &raw[..colon],
            None => raw,
        }
    };
    out.extend(host.iter().map(u8::to_ascii_lowercase));
}

/// Strip spaces and tabs at both ends.
fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// The value of the first cookie named `name` (case-insensitive) in any Cookie header.
fn find_cookie<'h>(headers: &'h HeaderMap, name: &[u8]) -> Option<&'h [u8]> {
    headers.get_all(COOKIE).iter().find_map(|v| {
        v.as_bytes().split(|&c| c == b';').find_map(|pair| {
            let pair = trim(pair);
            let eq = pair.iter().position(|&c| c == b'=')?;
            trim(&pair[..eq])
                .eq_ignore_ascii_case(name)
                .then(|| trim(&pair[eq + 1..]))
        })
    })
}

/// The raw value of the first query argument named `name` (case-insensitive);
/// an argument without `=` has an empty value.
fn find_arg<'q>(query: &'q [u8], name: &[u8]) -> Option<&'q [u8]> {
    query.split(|&c| c == b'&').find_map(|pair| {
        let (n, v) = match pair.iter().position(|&c| c == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        n.eq_ignore_ascii_case(name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(t: &str, uri: &str, headers: &[(&str, &str)], ip: &str) -> String {
        let t = KeyTemplate::parse(t).unwrap();
        let uri: Uri = uri.parse().unwrap();
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let mut out = b"stale".to_vec();
        t.render(&uri, &h, ip.parse().unwrap(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn renders_each_variable() {
        let uri = "/a/b?x=1&User=Bob&flag";
        let hs = [
            ("host", "Example.COM:8080"),
            ("x-user-id", "u-17"),
            ("cookie", "theme=dark; session = abc123 "),
            ("cookie", "other=1"),
        ];
        let ip = "198.51.100.7";
        assert_eq!(render("$remote_addr", uri, &hs, ip), "198.51.100.7");
        assert_eq!(
            render("$request_uri", uri, &hs, ip),
            "/a/b?x=1&User=Bob&flag"
        );
        assert_eq!(render("$uri", uri, &hs, ip), "/a/b");
        assert_eq!(render("$args", uri, &hs, ip), "x=1&User=Bob&flag");
        assert_eq!(render("$host", uri, &hs, ip), "example.com");
        assert_eq!(render("$http_x_user_id", uri, &hs, ip), "u-17");
        assert_eq!(render("$HTTP_X_USER_ID", uri, &hs, ip), "u-17");
        assert_eq!(render("$cookie_session", uri, &hs, ip), "abc123");
        assert_eq!(render("$cookie_other", uri, &hs, ip), "1");
        assert_eq!(
            render("$http_cookie", uri, &hs, ip),
            "theme=dark; session = abc123 ; other=1"
        );
        assert_eq!(render("$arg_user", uri, &hs, ip), "Bob");
        assert_eq!(render("$arg_flag", uri, &hs, ip), "");
        assert_eq!(render("$arg_x", uri, &hs, ip), "1");
    }

    #[test]
    fn literals_braces_and_missing_values() {
        let hs = [("host", "h")];
        assert_eq!(
            render("k:${uri}-$args!$arg_none.$cookie_none", "/p?q", &hs, "::1"),
            "k:/p-q!."
        );
        assert_eq!(render("${remote_addr}x", "/", &hs, "::1"), "::1x");
        assert_eq!(
            render("$remote_addr", "/", &hs, "::ffff:10.1.2.3"),
            "10.1.2.3"
        );
        assert_eq!(render("plain text", "/", &hs, "::1"), "plain text");
        assert_eq!(render("$http_x_missing", "/", &hs, "::1"), "");
        assert_eq!(render("$host", "/", &[], "::1"), "");
    }

    #[test]
    fn host_forms() {
        assert_eq!(
            render("$host", "/", &[("host", "[::1]:8080")], "::1"),
            "[::1]"
        );
        assert_eq!(render("$host", "/", &[("host", "a.b")], "::1"), "a.b");
        assert_eq!(
            render("$host", "http://Abs.Example:81/x", &[("host", "h")], "::1"),
            "abs.example"
        );
        let mut h = HeaderMap::new();
        h.insert(HOST, "x:1".parse().unwrap());
        let t = KeyTemplate::parse("$host$request_uri").unwrap();
        let mut out = Vec::new();
        t.render(
            &"/y?z".parse().unwrap(),
            &h,
            "::1".parse().unwrap(),
            &mut out,
        );
        assert_eq!(out, b"x/y?z");
    }

    #[test]
    fn parse_errors() {
        for bad in [
            "", "$", "${", "${uri", "${}", "$nope", "$http_", "$cookie_", "$arg_", "a $ b",
            "${a b}",
        ] {
            assert!(KeyTemplate::parse(bad).is_err(), "{bad:?} should fail");
        }
        let t = KeyTemplate::parse("$request_uri").unwrap();
        assert_eq!(t.as_str(), "$request_uri");
        assert_eq!(t.to_string(), "$request_uri");
    }

    #[test]
    fn variable_name_stops_at_non_name_bytes() {
        assert_eq!(render("$uri.html", "/p", &[], "::1"), "/p.html");
        assert_eq!(render("$uri-$args", "/p?a", &[], "::1"), "/p-a");
    }
}
