//! Image references (`ubuntu`, `ghcr.io/org/img:tag`, `host:5000/x@sha256:…`), normalised the way
//! Docker normalises them (distribution/reference `ParseNormalizedNamed` + `TagNameOnly`).
//!
//! Grammar (from the distribution reference spec):
//! - name components `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`, separated by `/`;
//! - an optional leading domain: the first component is a domain when it contains `.` or `:`, is
//!   `localhost`, or contains upper-case letters (which then makes it a *domain*, not a name);
//! - tag `[\w][\w.-]{0,127}`; digest `sha256:<64 lower-case hex>` (the only algorithm we fetch);
//! - the full name (domain + path) is at most 255 characters.

use std::fmt;

/// Docker Hub's canonical registry name.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that actually serves Docker Hub's registry API.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";
const DEFAULT_TAG: &str = "latest";
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// A parsed, normalised image reference.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// `docker.io`, `ghcr.io`, `127.0.0.1:5000`, `[::1]:5000`, `localhost` …
    pub registry: String,
    /// Path inside the registry, e.g. `library/ubuntu`.
    pub repository: String,
    /// Tag; `latest` is filled in when neither tag nor digest is given.
    pub tag: Option<String>,
    /// `sha256:<hex>`; when present it wins over the tag for fetching.
    pub digest: Option<String>,
}

/// Why a string is not a valid image reference. The message quotes the input (references are not secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefError {
    #[error("invalid image reference {input:?}: {reason}")]
    Invalid { input: String, reason: String },
}

fn invalid(input: &str, reason: impl Into<String>) -> RefError {
    RefError::Invalid {
        input: input.to_string(),
        reason: reason.into(),
    }
}

impl ImageRef {
    /// Parse and normalise `s` (Docker semantics, see the module docs).
    pub fn parse(s: &str) -> Result<ImageRef, RefError> {
        if s.is_empty() {
            return Err(invalid(s, "empty reference"));
        }
        if s.trim() != s {
            return Err(invalid(s, "leading or trailing whitespace"));
        }
        // name[:tag][@digest]
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                validate_digest(d).map_err(|e| invalid(s, e))?;
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        // The tag separator is the last ':' after the last '/'.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let i = last_slash + i;
                let tag = &rest[i + 1..];
                validate_tag(tag).map_err(|e| invalid(s, e))?;
                (&rest[..i], Some(tag.to_string()))
            }
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(invalid(s, "missing repository name"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(invalid(
                s,
                format!("repository name must not be longer than {MAX_NAME_LEN} characters"),
            ));
        }
        let (domain, path) = split_domain(name);
        if let Some(d) = domain {
            validate_domain(d).map_err(|e| invalid(s, e))?;
        }
        if path.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(invalid(s, "repository name must be lowercase"));
        }
        validate_path(path).map_err(|e| invalid(s, e))?;

        let mut registry = domain.unwrap_or(DOCKER_HUB).to_string();
        if registry == "index.docker.io" {
            registry = DOCKER_HUB.to_string();
        }
        let mut repository = path.to_string();
        if registry == DOCKER_HUB && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        let tag = match (tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (t, _) => t,
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// Host (and port) to talk to: `registry-1.docker.io` for Docker Hub, the registry otherwise.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What to put after `/manifests/`: the digest when there is one, else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or(DEFAULT_TAG)
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageRef({self})")
    }
}

impl std::str::FromStr for ImageRef {
    type Err = RefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageRef::parse(s)
    }
}

/// Check `sha256:<64 lower-case hex>` and return the hex part. Everything that turns a digest into a
/// file name goes through here, so a hostile manifest cannot smuggle `../` into a path.
pub fn validate_digest(d: &str) -> Result<&str, String> {
    let (alg, hex) = d
        .split_once(':')
        .ok_or_else(|| format!("invalid digest {d:?}: expected <algorithm>:<hex>"))?;
    if alg != "sha256" {
        return Err(format!(
            "unsupported digest algorithm {alg:?} (only sha256 is supported)"
        ));
    }
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!(
            "invalid sha256 digest {d:?}: expected 64 lower-case hex characters"
        ));
    }
    Ok(hex)
}

fn validate_tag(tag: &str) -> Result<(), String> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut chars = tag.chars();
    match chars.next() {
        None => return Err("empty tag".into()),
        Some(c) if !word(c) => return Err(format!("invalid tag {tag:?}")),
        _ => {}
    }
    if tag.len() > MAX_TAG_LEN {
        return Err(format!("tag longer than {MAX_TAG_LEN} characters"));
    }
    if !chars.all(|c| word(c) || c == '.' || c == '-') {
        return Err(format!("invalid tag {tag:?}"));
    }
    Ok(())
}

/// Docker's `splitDockerDomain`: the first component is a domain if it has `.` or `:`, is
/// `localhost`, or has upper-case letters.
fn split_domain(name: &str) -> (Option<&str>, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (Some(first), rest)
        }
        _ => (None, name),
    }
}

fn validate_domain(d: &str) -> Result<(), String> {
    let bad = || format!("invalid registry host {d:?}");
    let (host, port) = if let Some(rest) = d.strip_prefix('[') {
        // [ipv6]:port
        let (addr, after) = rest.split_once(']').ok_or_else(bad)?;
        if addr.is_empty()
            || !addr
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        {
            return Err(bad());
        }
        match after {
            "" => return Ok(()),
            p => (None, Some(p.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else {
        match d.rsplit_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(d), None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("invalid port in registry host {d:?}"));
        }
    }
    if let Some(h) = host {
        if h.is_empty() {
            return Err(bad());
        }
        for label in h.split('.') {
            let ok = !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return Err(bad());
            }
        }
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), String> {
    for comp in path.split('/') {
        if !valid_component(comp) {
            return Err(if comp.is_empty() {
                "empty path component in repository name".to_string()
            } else {
                format!("invalid repository path component {comp:?}")
            });
        }
    }
    Ok(())
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // a separator run
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";

    fn ok(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn parts(s: &str) -> (String, String, Option<String>, Option<String>) {
        let r = ok(s);
        (r.registry, r.repository, r.tag, r.digest)
    }

    #[test]
    fn docker_hub_normalisation() {
        let cases = [
            ("ubuntu", "docker.io/library/ubuntu:latest"),
            ("ubuntu:22.04", "docker.io/library/ubuntu:22.04"),
            ("user/img", "docker.io/user/img:latest"),
            ("docker.io/ubuntu", "docker.io/library/ubuntu:latest"),
            (
                "docker.io/library/ubuntu",
                "docker.io/library/ubuntu:latest",
            ),
            ("index.docker.io/ubuntu", "docker.io/library/ubuntu:latest"),
            ("index.docker.io/foo/bar:t", "docker.io/foo/bar:t"),
            ("test_com", "docker.io/library/test_com:latest"),
            ("test.com:tag", "docker.io/library/test.com:tag"),
            ("test.com:5000", "docker.io/library/test.com:5000"),
            (
                "lowercase:Uppercase",
                "docker.io/library/lowercase:Uppercase",
            ),
            ("foo_bar.com:8080", "docker.io/library/foo_bar.com:8080"),
            ("foo/foo_bar.com:8080", "docker.io/foo/foo_bar.com:8080"),
            (
                "codercom/enterprise-base:ubuntu",
                "docker.io/codercom/enterprise-base:ubuntu",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(ok(input).to_string(), want, "input {input}");
        }
    }

    #[test]
    fn other_registries() {
        assert_eq!(
            parts("test.com/repo:tag"),
            ("test.com".into(), "repo".into(), Some("tag".into()), None)
        );
        assert_eq!(
            parts("test:5000/repo"),
            (
                "test:5000".into(),
                "repo".into(),
                Some("latest".into()),
                None
            )
        );
        assert_eq!(
            parts(&format!("test:5000/repo@{D}")),
            ("test:5000".into(), "repo".into(), None, Some(D.into()))
        );
        assert_eq!(
            parts(&format!("test:5000/repo:tag@{D}")),
            (
                "test:5000".into(),
                "repo".into(),
                Some("tag".into()),
                Some(D.into())
            )
        );
        assert_eq!(
            parts("sub-dom1.foo.com/bar/baz/quux:some-long-tag"),
            (
                "sub-dom1.foo.com".into(),
                "bar/baz/quux".into(),
                Some("some-long-tag".into()),
                None
            )
        );
        assert_eq!(
            parts("b.gcr.io/test.example.com/my-app:test.example.com"),
            (
                "b.gcr.io".into(),
                "test.example.com/my-app".into(),
                Some("test.example.com".into()),
                None
            )
        );
        assert_eq!(parts("xn--n3h.com/myimage:xn--n3h.com").0, "xn--n3h.com");
        assert_eq!(parts("localhost/x").0, "localhost");
        assert_eq!(parts("localhost/x").1, "x");
        assert_eq!(parts("localhost:5000/foo/bar").0, "localhost:5000");
        assert_eq!(parts("127.0.0.1:5000/test/busybox:1").0, "127.0.0.1:5000");
        assert_eq!(parts("[2001:db8::1]:5000/repo").0, "[2001:db8::1]:5000");
        assert_eq!(parts("[2001:db8::1]/repo").0, "[2001:db8::1]");
        assert_eq!(parts("Foo.Com/bar").0, "Foo.Com");
        // Upper-case first component is a domain per Docker's split rule.
        assert_eq!(parts("Uppercase/lowercase").0, "Uppercase");
        assert_eq!(parts("ghcr.io/org/img").2.as_deref(), Some("latest"));
        assert_eq!(parts("a/b__c/d--e/f.g/h_i").1, "a/b__c/d--e/f.g/h_i");
    }

    #[test]
    fn digest_wins_and_display() {
        let r = ok(&format!("ubuntu:22.04@{D}"));
        assert_eq!(r.manifest_reference(), D);
        assert_eq!(r.to_string(), format!("docker.io/library/ubuntu:22.04@{D}"));
        let r = ok(&format!("ubuntu@{D}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.to_string(), format!("docker.io/library/ubuntu@{D}"));
        assert_eq!(ok("ubuntu").manifest_reference(), "latest");
    }

    #[test]
    fn api_host() {
        assert_eq!(ok("ubuntu").api_host(), "registry-1.docker.io");
        assert_eq!(ok("ghcr.io/a/b").api_host(), "ghcr.io");
        assert_eq!(ok("127.0.0.1:5001/a").api_host(), "127.0.0.1:5001");
    }

    #[test]
    fn invalid_references() {
        let long_name = format!("{}/b", "a".repeat(254));
        let long_tag = format!("repo:{}", "t".repeat(129));
        let cases: Vec<String> = vec![
            "".into(),
            ":justtag".into(),
            format!("@{D}"),
            "repo@sha256:ffffffffffffffffffffffffffffffffff".into(),
            format!("validname@invaliddigest:{}", "f".repeat(64)),
            format!("repo@sha512:{}", "f".repeat(64)),
            format!("repo@sha256:{}", "F".repeat(64)),
            "Uppercase:tag".into(),
            "test:5000/Uppercase/lowercase:tag".into(),
            "aa/asdf$$^/aa".into(),
            "foo/-bar".into(),
            "foo/bar-".into(),
            "foo//bar".into(),
            "foo/bar/".into(),
            "/foo".into(),
            "foo___bar".into(),
            "foo-_bar".into(),
            "foo..bar".into(),
            "foo._bar".into(),
            "repo:".into(),
            "repo:-tag".into(),
            "repo:.tag".into(),
            "repo:ta g".into(),
            long_tag,
            long_name,
            "-foo.com/bar".into(),
            "foo.com:/bar".into(),
            "foo.com:abc/bar".into(),
            "[::1/bar".into(),
            " ubuntu".into(),
            "a:b:c".into(),
        ];
        for c in &cases {
            assert!(ImageRef::parse(c).is_err(), "{c:?} should be rejected");
        }
        let e = ImageRef::parse("Uppercase:tag").unwrap_err().to_string();
        assert!(e.contains("must be lowercase"), "{e}");
    }

    #[test]
    fn valid_tag_edges() {
        assert!(ImageRef::parse(&format!("repo:{}", "t".repeat(128))).is_ok());
        assert!(ImageRef::parse("repo:_x").is_ok());
        assert!(ImageRef::parse("repo:1.0-rc_1").is_ok());
    }

    #[test]
    fn digest_validation() {
        assert_eq!(validate_digest(D).unwrap(), &D[7..]);
        assert!(validate_digest("sha256:../../etc/passwd").is_err());
        assert!(validate_digest("sha256").is_err());
    }
}
