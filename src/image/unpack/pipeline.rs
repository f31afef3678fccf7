//! The layer pipeline: decompression on its own thread, diff_id hashing, entries from the tar
//! framing reader to the applier.

use std::io::{self, Read};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::mpsc;

use rustix::fs::{self as rfs, Mode, OFlags};
use sha2::{Digest as _, Sha256};

use crate::image::tarstream::Limits;

use super::apply::*;
use super::*;

/// Parses `sha256:<64 hex>`.
fn parse_diff_id(d: &str) -> Result<[u8; 32], UnpackError> {
    let bad = || UnpackError::BadDiffId(d.to_string());
    let hex_part = d.strip_prefix("sha256:").ok_or_else(bad)?;
    let mut out = [0u8; 32];
    if hex_part.len() != 64 {
        return Err(bad());
    }
    hex::decode_to_slice(hex_part, &mut out).map_err(|_| bad())?;
    Ok(out)
}

/// The decompressed stream, hashed as it is read when a diff_id is to be checked.
pub(super) struct Hashing<R> {
    pub(super) inner: R,
    hasher: Option<Sha256>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.update(&buf[..n]);
        Ok(n)
    }
}

impl<R> Hashing<R> {
    fn update(&mut self, bytes: &[u8]) {
        if let Some(h) = &mut self.hasher {
            h.update(bytes);
        }
    }

    pub(super) fn new(inner: R, verify: bool) -> Self {
        Hashing {
            inner,
            hasher: verify.then(Sha256::new),
        }
    }

    /// Compares what was read with the expected digest.
    fn check(self, expected: Option<[u8; 32]>) -> Result<(), UnpackError> {
        let (Some(expected), Some(h)) = (expected, self.hasher) else {
            return Ok(());
        };
        let actual: [u8; 32] = h.finalize().into();
        if actual == expected {
            return Ok(());
        }
        Err(UnpackError::DiffIdMismatch {
            expected: format!("sha256:{}", hex::encode(expected)),
            actual: format!("sha256:{}", hex::encode(actual)),
        })
    }
}

pub(super) fn apply(
    root: &Path,
    lowers: &[&Path],
    layer: impl Read,
    compression: Compression,
    shift: &IdShift,
    expected_diff_id: Option<&str>,
    (target, limits): (Target, Limits),
) -> Result<LayerStats, UnpackError> {
    let expected = expected_diff_id.map(parse_diff_id).transpose()?;
    let open_dir = |p: &Path| {
        rfs::open(
            p,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| UnpackError::OpenRoot {
            root: p.to_path_buf(),
            source: e.into(),
        })
    };
    let root_fd = open_dir(root)?;
    let lower_fds = lowers
        .iter()
        .map(|p| open_dir(p))
        .collect::<Result<Vec<_>, _>>()?;
    let mut applier = Applier::new(root_fd.as_fd(), &lower_fds, *shift, target, limits);
    let verify = expected.is_some();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        fn run_one<R: Read>(
            applier: &mut Applier<'_>,
            r: R,
            verify: bool,
            expected: Option<[u8; 32]>,
        ) -> Result<LayerStats, UnpackError> {
            let mut h = Hashing::new(r, verify);
            let stats = applier.run(&mut h)?;
            h.check(expected)?;
            Ok(stats)
        }
        return match compression {
            Compression::Gzip => run_one(
                &mut applier,
                flate2::read::MultiGzDecoder::new(layer),
                verify,
                expected,
            ),
            Compression::Zstd => match zstd::stream::read::Decoder::new(layer) {
                Ok(decoder) => run_one(&mut applier, decoder, verify, expected),
                Err(source) => Err(UnpackError::Read {
                    at: "first entry".into(),
                    source,
                }),
            },
            Compression::None => run_one(
                &mut applier,
                io::BufReader::with_capacity(CHUNK_SIZE, layer),
                verify,
                expected,
            ),
        };
    }
    // Decompression runs on the calling thread (so `layer` need not be `Send`) while
    // a second thread parses the archive and writes the files: with more than one
    // CPU the two overlap, as `tar -xz` overlaps with its `gzip` child.
    let (chunks_tx, chunks_rx) = mpsc::sync_channel::<io::Result<Chunk>>(CHUNKS_IN_FLIGHT);
    let (spare_tx, spare_rx) = mpsc::sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT + 2);
    std::thread::scope(|scope| {
        // The diff_id is hashed on whichever thread has time to spare: gzip decompression
        // is slower than parsing and writing, so the parser hashes the chunks it receives;
        // zstd and plain tar come faster than they can be written, so the decompressing
        // thread hashes them.
        let on_parser = verify && compression == Compression::Gzip;
        let writer = scope.spawn(move || {
            let mut reader = ChunkReader {
                chunks: chunks_rx,
                spare: spare_tx,
                current: Vec::new(),
                len: 0,
                pos: 0,
                hasher: Hashing::new((), on_parser),
            };
            let stats = applier.run(&mut reader)?;
            // The parser read the stream to its end, so the whole of it was hashed.
            reader.hasher.check(expected)?;
            Ok(stats)
        });
        let on_producer = verify && !on_parser;
        fn produce_hashed<R: Read>(
            r: R,
            verify: bool,
            out: &mpsc::SyncSender<io::Result<Chunk>>,
            spare: &mpsc::Receiver<Vec<u8>>,
        ) -> io::Result<Hashing<R>> {
            let mut h = Hashing::new(r, verify);
            produce(&mut h, out, spare)?;
            Ok(h)
        }
        let produced = match compression {
            Compression::Gzip => produce_hashed(
                flate2::read::MultiGzDecoder::new(layer),
                on_producer,
                &chunks_tx,
                &spare_rx,
            )
            .map(|h| h.check(expected)),
            Compression::Zstd => match zstd::stream::read::Decoder::new(layer) {
                Ok(decoder) => produce_hashed(decoder, on_producer, &chunks_tx, &spare_rx)
                    .map(|h| h.check(expected)),
                Err(e) => Err(e),
            },
            Compression::None => {
                produce_hashed(layer, on_producer, &chunks_tx, &spare_rx).map(|h| h.check(expected))
            }
        };
        let checked = match produced {
            Ok(checked) => checked,
            Err(e) => {
                // Hand the error to the parser, which names the entry it was reading.
                let _ = chunks_tx.send(Err(e));
                Ok(())
            }
        };
        drop(chunks_tx);
        let stats = match writer.join() {
            Ok(result) => result?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        // The parser read the stream to its end, so the producer hashed all of it.
        checked?;
        Ok(stats)
    })
}

/// Decompressed bytes on their way to the parsing thread: a buffer and how much of
/// it is filled.
pub(super) type Chunk = (Vec<u8>, usize);

/// Bytes per chunk handed from the decompressing to the writing thread.
const CHUNK_SIZE: usize = 256 * 1024;
const CHUNKS_IN_FLIGHT: usize = 4;

/// Reads `src` to its end in chunks, reusing the buffers the reader hands back. Stops
/// quietly when the reader is gone (it failed and reports its own error).
fn produce<R: Read>(
    src: &mut R,
    out: &mpsc::SyncSender<io::Result<Chunk>>,
    spare: &mpsc::Receiver<Vec<u8>>,
) -> io::Result<()> {
    loop {
        let mut buf = spare.try_recv().unwrap_or_else(|_| vec![0; CHUNK_SIZE]);
        let mut filled = 0;
        while filled < buf.len() {
            match src.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            return Ok(());
        }
        if out.send(Ok((buf, filled))).is_err() {
            return Ok(());
        }
    }
}

/// The parsing thread's view of the decompressed stream.
pub(super) struct ChunkReader {
    chunks: mpsc::Receiver<io::Result<Chunk>>,
    spare: mpsc::SyncSender<Vec<u8>>,
    current: Vec<u8>,
    pub(super) len: usize,
    pos: usize,
    hasher: Hashing<()>,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.len {
            match self.chunks.recv() {
                Ok(Ok((buf, len))) => {
                    self.hasher.update(&buf[..len]);
                    let old = std::mem::replace(&mut self.current, buf);
                    if !old.is_empty() {
                        let _ = self.spare.try_send(old);
                    }
                    self.len = len;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(mpsc::RecvError) => return Ok(0),
            }
        }
        let n = out.len().min(self.len - self.pos);
        out[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
