//! Reading a layer's tar stream with bounded memory and a budget.
//!
//! The `tar` crate reads GNU long names and PAX extension headers whole into memory, however
//! large they claim to be, and writes GNU sparse entries with their holes filled; neither can be
//! limited from outside. So the framing is ours: 512-byte headers (fields decoded by
//! [`tar::Header`]), extension headers read only up to [`Limits::max_extension`], and a budget of
//! stream bytes and entries per layer. Sparse entries, in every format GNU tar writes (the old GNU
//! `S` type and PAX 0.0, 0.1 and 1.0), are refused with an error saying so: no image builder we
//! know writes them (Docker, BuildKit, buildah and kaniko write plain files), and writing their
//! holes filled turns a 2 KiB archive into a file as large as the entry claims.

use std::borrow::Cow;
use std::io::{self, Read};

/// One layer's allowances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest PAX extension header or GNU long name/link body, in bytes.
    pub max_extension: u64,
    /// Bytes of tar stream (headers, contents, padding, trailing data) one layer may have.
    pub max_bytes: u64,
    /// Entries one layer may have (each keeps a little memory until the layer is done).
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_extension: 1 << 20,
            // Far above any real layer (the largest public images have layers of tens of GiB),
            // low enough that a decompression bomb stops long before it fills a node's disk.
            max_bytes: 256 << 30,
            // 200,000-file layers exist; 4 million entries keep the per-layer path set of
            // `unpack` within a few hundred MiB.
            max_entries: 4_000_000,
        }
    }
}

/// Why the stream could not be read. The caller adds the layer.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("reading the layer stream: {0}")]
    Io(#[from] io::Error),
    #[error("the archive ends in the middle of {0}")]
    Truncated(&'static str),
    #[error("{what} header checksum mismatch (not a tar archive, or corrupt)")]
    Checksum { what: &'static str },
    #[error("{what} of {size} bytes exceeds the limit of {limit} bytes")]
    ExtensionTooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("the layer exceeds its budget of {limit} {what}")]
    Budget { what: &'static str, limit: u64 },
    #[error(
        "{name:?} is a sparse file ({format}); envbox does not unpack sparse files — rebuild the \
         image without `tar --sparse`"
    )]
    Sparse { name: String, format: &'static str },
    #[error("invalid {what}")]
    Invalid { what: &'static str },
}

/// PAX records as (key, value) pairs, in archive order.
pub type PaxRecords = Vec<(Vec<u8>, Vec<u8>)>;

/// An entry's header with the GNU and PAX extensions that precede it applied.
pub struct Entry {
    /// The entry's own header: type, mode, times, device numbers.
    pub header: tar::Header,
    pub path: Vec<u8>,
    pub link: Option<Vec<u8>>,
    pub uid: u64,
    pub gid: u64,
    /// Content bytes that follow (the PAX `size` when there is one).
    pub size: u64,
    /// The PAX records for this entry (`path`, `linkpath`, `size`, `uid`, `gid` already applied).
    pub pax: PaxRecords,
}

impl Entry {
    pub fn type_flag(&self) -> u8 {
        self.header.entry_type().as_byte()
    }
}

/// A tar stream read one entry at a time.
pub struct TarReader<R> {
    inner: R,
    limits: Limits,
    /// Stream bytes consumed so far.
    consumed: u64,
    entries: u64,
    /// Content bytes of the current entry not yet read.
    remaining: u64,
    /// Padding after the current entry's content.
    padding: u64,
}

const BLOCK: u64 = 512;

impl<R: Read> TarReader<R> {
    pub fn new(inner: R, limits: Limits) -> Self {
        TarReader {
            inner,
            limits,
            consumed: 0,
            entries: 0,
            remaining: 0,
            padding: 0,
        }
    }

    /// Counts `n` stream bytes against the budget.
    fn charge(&mut self, n: u64) -> Result<(), TarError> {
        self.consumed = self.consumed.saturating_add(n);
        if self.consumed > self.limits.max_bytes {
            return Err(TarError::Budget {
                what: "bytes",
                limit: self.limits.max_bytes,
            });
        }
        Ok(())
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<bool, TarError> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => return Err(TarError::Truncated(what)),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.charge(buf.len() as u64)?;
        Ok(true)
    }

    /// Reads and drops `n` bytes.
    fn skip(&mut self, mut n: u64, what: &'static str) -> Result<(), TarError> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let want = n.min(buf.len() as u64) as usize;
            match self.inner.read(&mut buf[..want]) {
                Ok(0) => return Err(TarError::Truncated(what)),
                Ok(k) => {
                    self.charge(k as u64)?;
                    n -= k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The body of an extension header, read only when it is within the limit.
    fn extension_body(&mut self, h: &tar::Header, what: &'static str) -> Result<Vec<u8>, TarError> {
        let size = h
            .entry_size()
            .map_err(|_| TarError::Invalid { what: "size field" })?;
        if size > self.limits.max_extension {
            return Err(TarError::ExtensionTooLarge {
                what,
                size,
                limit: self.limits.max_extension,
            });
        }
        let mut body = vec![0u8; size as usize];
        if !self.read_exact(&mut body, what)? && size > 0 {
            return Err(TarError::Truncated(what));
        }
        self.skip(pad(size), what)?;
        Ok(body)
    }

    /// The next entry, or `None` at the end of the archive. Content the caller did not read
    /// from the previous entry is skipped.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, TarError> {
        let rest = self.remaining + self.padding;
        self.remaining = 0;
        self.padding = 0;
        self.skip(rest, "an entry's content")?;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Option<PaxRecords> = None;
        loop {
            let mut header = tar::Header::new_old();
            if !self.read_exact(header.as_mut_bytes(), "a header")? {
                return self.end(long_name.is_some() || long_link.is_some() || pax.is_some());
            }
            if header.as_bytes().iter().all(|&b| b == 0) {
                return self.end(long_name.is_some() || long_link.is_some() || pax.is_some());
            }
            check_sum(&header)?;
            match header.entry_type().as_byte() {
                b'x' | b'X' => {
                    if pax.is_some() {
                        return Err(TarError::Invalid {
                            what: "archive: two PAX headers for one entry",
                        });
                    }
                    let body = self.extension_body(&header, "a PAX extension header")?;
                    pax = Some(parse_pax(&body)?);
                }
                b'g' => {
                    // Global PAX records say nothing that matters for unpacking.
                    self.extension_body(&header, "a PAX global header")?;
                }
                b'L' => {
                    if long_name.is_some() {
                        return Err(TarError::Invalid {
                            what: "archive: two GNU long names for one entry",
                        });
                    }
                    long_name = Some(trim_nul(self.extension_body(&header, "a GNU long name")?));
                }
                b'K' => {
                    if long_link.is_some() {
                        return Err(TarError::Invalid {
                            what: "archive: two GNU long link names for one entry",
                        });
                    }
                    long_link = Some(trim_nul(
                        self.extension_body(&header, "a GNU long link name")?,
                    ));
                }
                flag => {
                    return self.entry(header, flag, long_name, long_link, pax.unwrap_or_default())
                }
            }
        }
    }

    fn end<T>(&mut self, dangling: bool) -> Result<Option<T>, TarError> {
        if dangling {
            return Err(TarError::Truncated(
                "an entry (its extension headers have no entry)",
            ));
        }
        Ok(None)
    }

    fn entry(
        &mut self,
        header: tar::Header,
        flag: u8,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
        mut pax: PaxRecords,
    ) -> Result<Option<Entry>, TarError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(TarError::Budget {
                what: "entries",
                limit: self.limits.max_entries,
            });
        }
        let mut path = long_name.unwrap_or_else(|| header.path_bytes().into_owned());
        let mut link = long_link.or_else(|| header.link_name_bytes().map(Cow::into_owned));
        let mut size = header
            .entry_size()
            .map_err(|_| TarError::Invalid { what: "size field" })?;
        let mut uid = header
            .uid()
            .map_err(|_| TarError::Invalid { what: "uid field" })?;
        let mut gid = header
            .gid()
            .map_err(|_| TarError::Invalid { what: "gid field" })?;
        let number = |v: &[u8], what: &'static str| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(TarError::Invalid { what })
        };
        let mut sparse = None;
        pax.retain(|(k, v)| match k.as_slice() {
            b"path" => {
                path = v.clone();
                false
            }
            b"linkpath" => {
                link = Some(v.clone());
                false
            }
            _ => {
                // The most specific key decides: 1.0 has major/minor, 0.1 a map, 0.0 neither.
                let format = match k.as_slice() {
                    b"GNU.sparse.major" | b"GNU.sparse.minor" => Some((3, "PAX format 1.0")),
                    b"GNU.sparse.map" => Some((2, "PAX format 0.1")),
                    k if k.starts_with(b"GNU.sparse.") => Some((1, "PAX format 0.0")),
                    _ => None,
                };
                if format > sparse {
                    sparse = format;
                }
                true
            }
        });
        for (k, v) in &pax {
            match k.as_slice() {
                b"size" => size = number(v, "PAX size record")?,
                b"uid" => uid = number(v, "PAX uid record")?,
                b"gid" => gid = number(v, "PAX gid record")?,
                _ => {}
            }
        }
        pax.retain(|(k, _)| !matches!(k.as_slice(), b"size" | b"uid" | b"gid"));
        if flag == b'S' {
            sparse = Some((4, "GNU format"));
        }
        if let Some((_, format)) = sparse {
            return Err(TarError::Sparse {
                name: String::from_utf8_lossy(&path).into_owned(),
                format,
            });
        }
        self.remaining = size;
        self.padding = pad(size);
        Ok(Some(Entry {
            header,
            path,
            link,
            uid,
            gid,
            size,
            pax,
        }))
    }

    /// Reads the current entry's content (at most what is left of it).
    pub fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.remaining) as usize;
        let n = loop {
            match self.inner.read(&mut buf[..want]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => break r?,
            }
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends in the middle of an entry's content",
            ));
        }
        self.remaining -= n as u64;
        self.charge(n as u64).map_err(io::Error::other)?;
        Ok(n)
    }

    /// Reads the rest of the stream (the end-of-archive blocks, and whatever a compressor's
    /// trailer check needs read) within the budget.
    pub fn drain(&mut self) -> Result<(), TarError> {
        let mut buf = [0u8; 8192];
        loop {
            match self.inner.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => self.charge(n as u64)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The padding after `size` content bytes.
fn pad(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

fn check_sum(h: &tar::Header) -> Result<(), TarError> {
    let b = h.as_bytes();
    let sum: u32 = b[..148]
        .iter()
        .chain(&b[156..])
        .map(|&x| u32::from(x))
        .sum::<u32>()
        + 8 * u32::from(b' ');
    match h.cksum() {
        Ok(c) if c == sum => Ok(()),
        _ => Err(TarError::Checksum { what: "an entry's" }),
    }
}

/// Parses PAX records (`<len> <key>=<value>\n`).
fn parse_pax(mut body: &[u8]) -> Result<PaxRecords, TarError> {
    let mut out = Vec::new();
    while !body.is_empty() {
        if body.iter().all(|&b| b == 0) {
            break;
        }
        let sp = body
            .iter()
            .position(|&b| b == b' ')
            .ok_or(TarError::Invalid {
                what: "PAX record (no length)",
            })?;
        let len: usize = std::str::from_utf8(&body[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&l| l > sp + 1 && l <= body.len())
            .ok_or(TarError::Invalid {
                what: "PAX record length",
            })?;
        let rec = &body[sp + 1..len];
        let rec = rec.strip_suffix(b"\n").ok_or(TarError::Invalid {
            what: "PAX record (no newline)",
        })?;
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or(TarError::Invalid {
                what: "PAX record (no '=')",
            })?;
        out.push((rec[..eq].to_vec(), rec[eq + 1..].to_vec()));
        body = &body[len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u8, name: &str, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_path(name).unwrap();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(size);
        h.set_cksum();
        h
    }

    fn block(h: &tar::Header, data: &[u8]) -> Vec<u8> {
        let mut v = h.as_bytes().to_vec();
        v.extend_from_slice(data);
        v.resize(v.len() + pad(data.len() as u64) as usize, 0);
        v
    }

    fn pax_record(k: &str, v: &str) -> Vec<u8> {
        let body = format!(" {k}={v}\n");
        let mut n = body.len() + 1;
        if format!("{n}{body}").len() != n {
            n += 1;
        }
        format!("{n}{body}").into_bytes()
    }

    fn limits() -> Limits {
        Limits {
            max_extension: 4096,
            max_bytes: 1 << 20,
            max_entries: 10,
        }
    }

    fn all(bytes: &[u8], l: Limits) -> Result<PaxRecords, TarError> {
        let mut r = TarReader::new(bytes, l);
        let mut out = Vec::new();
        while let Some(e) = r.next_entry()? {
            let mut data = vec![0u8; e.size as usize];
            let mut got = 0;
            while got < data.len() {
                got += r.read_data(&mut data[got..])?;
            }
            out.push((e.path, data));
        }
        r.drain()?;
        Ok(out)
    }

    #[test]
    fn pax_and_gnu_names_and_sizes_apply() {
        let mut t = Vec::new();
        let rec = [pax_record("path", "long/pax/name"), pax_record("size", "3")].concat();
        t.extend(block(&header(b'x', "pax", rec.len() as u64), &rec));
        t.extend(block(&header(b'0', "short", 0), b"abc"));
        t.extend(block(&header(b'L', "././@LongLink", 9), b"gnu/long\0"));
        t.extend(block(&header(b'0', "short2", 2), b"xy"));
        t.extend([0u8; 1024]);
        let got = all(&t, limits()).unwrap();
        assert_eq!(got[0], (b"long/pax/name".to_vec(), b"abc".to_vec()));
        assert_eq!(got[1], (b"gnu/long".to_vec(), b"xy".to_vec()));
    }

    #[test]
    fn limits_are_enforced_with_clear_errors() {
        // An extension header over the cap is refused before its body is read.
        let t = block(&header(b'x', "pax", 1 << 30), b"");
        let e = all(&t, limits()).unwrap_err();
        assert!(
            matches!(
                e,
                TarError::ExtensionTooLarge {
                    size: 1073741824,
                    ..
                }
            ),
            "{e}"
        );
        let t = block(&header(b'L', "n", 5000), &[b'a'; 5000]);
        assert!(matches!(
            all(&t, limits()),
            Err(TarError::ExtensionTooLarge { .. })
        ));
        // Entry and byte budgets.
        let mut t = Vec::new();
        for i in 0..11 {
            t.extend(block(&header(b'0', &format!("f{i}"), 0), b""));
        }
        let e = all(&t, limits()).unwrap_err();
        assert!(e.to_string().contains("budget of 10 entries"), "{e}");
        let t = block(&header(b'0', "big", 2 << 20), &vec![0u8; 2 << 20]);
        let e = all(&t, limits()).unwrap_err();
        assert!(e.to_string().contains("budget of 1048576 bytes"), "{e}");
        // Garbage after the end counts too.
        let mut t = [0u8; 1024].to_vec();
        t.extend(vec![0u8; 2 << 20]);
        assert!(matches!(all(&t, limits()), Err(TarError::Budget { .. })));
    }

    #[test]
    fn sparse_formats_are_refused_by_name() {
        let t = block(&header(b'S', "gnu-sparse", 0), b"");
        let e = all(&t, limits()).unwrap_err();
        assert!(
            e.to_string()
                .contains("\"gnu-sparse\" is a sparse file (GNU format)"),
            "{e}"
        );
        for (keys, format) in [
            (
                vec![("GNU.sparse.offset", "0"), ("GNU.sparse.numbytes", "1")],
                "PAX format 0.0",
            ),
            (vec![("GNU.sparse.map", "0,1")], "PAX format 0.1"),
            (
                vec![("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0")],
                "PAX format 1.0",
            ),
        ] {
            let rec: Vec<u8> = keys.iter().flat_map(|(k, v)| pax_record(k, v)).collect();
            let mut t = block(&header(b'x', "pax", rec.len() as u64), &rec);
            t.extend(block(&header(b'0', "GNUSparseFile.1/f", 0), b""));
            let e = all(&t, limits()).unwrap_err();
            assert!(e.to_string().contains(format), "{format}: {e}");
        }
    }

    #[test]
    fn truncation_and_bad_checksums_are_errors() {
        let t = block(&header(b'0', "f", 100), &[1u8; 100]);
        let e = all(&t[..600], limits()).unwrap_err();
        assert!(e.to_string().contains("middle of an entry"), "{e}");
        let mut t = block(&header(b'0', "f", 0), b"");
        t[0] ^= 1;
        assert!(matches!(all(&t, limits()), Err(TarError::Checksum { .. })));
        let t = block(&header(b'x', "pax", 0), b"");
        assert!(matches!(all(&t, limits()), Err(TarError::Truncated(_))));
    }
}
