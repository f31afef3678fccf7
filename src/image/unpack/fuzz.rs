//! Bounded, fixed-seed random-input test of tar entry handling: random and corrupted headers go
//! through the tar framing reader and through the whole unpack (flattened and overlay). Nothing
//! may panic, and nothing may appear outside the layer's root.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::image::tarstream::{Limits, TarReader};

use super::*;

use crate::image::fuzz_rng::Rng;

/// Random archives per run: a few seconds on a small machine.
const ROUNDS: usize = 300;

/// Names (and link targets) that try to climb out, go absolute, or collide.
const NAMES: &[&str] = &[
    "a",
    "a/b",
    "a/b/c",
    "lnk",
    "lnk/escape_marker",
    "lnk/x/escape_marker",
    "../escape_marker",
    "a/../../escape_marker",
    "/escape_marker",
    "./a/./b",
    "a/.wh.b",
    ".wh.a",
    "a/.wh..wh..opq",
    ".wh..wh..opq",
    "dev",
    "",
    ".",
    "..",
    "a//b",
];
const TARGETS: &[&str] = &[
    "/",
    "..",
    "../..",
    "../outside",
    "/proc/self/root",
    "a",
    "a/b",
    "lnk",
    "lnk/escape_marker",
    "../outside/sentinel",
    "/etc/passwd",
];

fn entry(rng: &mut Rng) -> Vec<u8> {
    let mut h = if rng.below(2) == 0 {
        tar::Header::new_ustar()
    } else {
        tar::Header::new_gnu()
    };
    let kind = *[
        b'0', b'0', b'5', b'5', b'2', b'1', b'3', b'4', b'6', b'x', b'L', b'S', b'g',
    ]
    .get(rng.below(13))
    .unwrap();
    h.set_entry_type(tar::EntryType::new(kind));
    let name = rng.pick(NAMES);
    // set_path refuses some of these names; write the raw bytes then
    if h.set_path(name).is_err() {
        let field = &mut h.as_old_mut().name;
        field.fill(0);
        field[..name.len()].copy_from_slice(name.as_bytes());
    }
    let target = rng.pick(TARGETS);
    let field = &mut h.as_old_mut().linkname;
    field.fill(0);
    field[..target.len()].copy_from_slice(target.as_bytes());
    h.set_mode([0o644, 0o755, 0o4755, 0o7777, 0][rng.below(5)]);
    h.set_uid([0, 1000, 65_535, 65_536, u32::MAX as u64][rng.below(5)]);
    h.set_gid(rng.below(70_000) as u64);
    h.set_mtime(rng.next() >> rng.below(64));
    let data: Vec<u8> = match kind {
        b'x' => {
            let rec = format!(
                " {}={}\n",
                rng.pick(&[
                    "path",
                    "linkpath",
                    "size",
                    "uid",
                    "SCHILY.xattr.user.a",
                    "mtime"
                ]),
                rng.pick(&[
                    "../escape_marker",
                    "a",
                    "-1",
                    "99999999999999999999",
                    "1.5",
                    ""
                ])
            );
            format!("{}{rec}", rec.len() + 2).into_bytes()
        }
        b'L' => rng.pick(NAMES).as_bytes().to_vec(),
        b'0' => (0..rng.below(700)).map(|_| rng.next() as u8).collect(),
        _ => Vec::new(),
    };
    h.set_size(data.len() as u64);
    h.set_cksum();
    let mut block = h.as_bytes().to_vec();
    // corrupt a few header bytes; fix the checksum most of the time so the reader looks further
    if rng.below(3) == 0 {
        for _ in 0..1 + rng.below(6) {
            let i = rng.below(512);
            block[i] = rng.next() as u8;
        }
        if rng.below(4) != 0 {
            let mut fixed = tar::Header::new_old();
            fixed.as_mut_bytes().copy_from_slice(&block[..512]);
            fixed.set_cksum();
            block = fixed.as_bytes().to_vec();
        }
    }
    let padded = data.len().div_ceil(512) * 512;
    block.extend_from_slice(&data);
    block.resize(512 + padded, 0);
    if rng.below(10) == 0 {
        block.truncate(rng.below(block.len()));
    }
    block
}

fn archive(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(6) {
        out.extend(entry(rng));
    }
    if rng.below(2) == 0 {
        out.extend_from_slice(&[0; 1024]);
    }
    out
}

/// Every path under `dir`, skipping the subtree `skip`.
fn listing(dir: &Path, skip: &Path, out: &mut BTreeSet<PathBuf>) {
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p == skip {
            continue;
        }
        out.insert(p.clone());
        if e.file_type().unwrap().is_dir() {
            listing(&p, skip, out);
        }
    }
}

#[test]
fn fuzz_tar_entries() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("sentinel"), b"untouched").unwrap();
    let lower = tmp.path().join("lower");
    fs::create_dir_all(lower.join("a/b")).unwrap();
    fs::write(lower.join("a/f"), b"lower").unwrap();
    let root = tmp.path().join("root");
    let mut before = BTreeSet::new();
    listing(tmp.path(), &root, &mut before);
    let (mut executions, mut framed, mut applied) = (0u64, 0u64, 0u64);
    for round in 0..ROUNDS {
        let bytes = archive(&mut rng);
        // the framing reader alone
        let mut r = TarReader::new(&bytes[..], Limits::default());
        while let Ok(Some(_)) = r.next_entry() {
            framed += 1;
            if r.drain().is_err() {
                break;
            }
        }
        // the whole unpack, flattened and as an overlay layer over `lower`
        for overlay in [false, true] {
            fs::create_dir(&root).unwrap();
            let res = if overlay {
                apply_layer_overlay(
                    &root,
                    &[lower.as_path()],
                    &bytes[..],
                    Compression::None,
                    &IdShift::ENVBOX,
                    None,
                )
            } else {
                apply_layer(&root, &bytes[..], Compression::None, &IdShift::ENVBOX, None)
            };
            applied += res.is_ok() as u64;
            executions += 1;
            let mut after = BTreeSet::new();
            listing(tmp.path(), &root, &mut after);
            assert_eq!(
                before, after,
                "round {round}: something written outside the root"
            );
            assert_eq!(fs::read(outside.join("sentinel")).unwrap(), b"untouched");
            assert_eq!(fs::read(lower.join("a/f")).unwrap(), b"lower");
            assert!(!Path::new("/escape_marker").exists(), "round {round}");
            assert!(!tmp.path().join("escape_marker").exists(), "round {round}");
            fs::remove_dir_all(&root).unwrap();
        }
    }
    println!(
        "fuzz_tar_entries: {executions} unpacks of {ROUNDS} random archives, {applied} succeeded, \
         {framed} entries framed, 0 panics, 0 writes outside the root"
    );
}
