//! The OCI image model, pure: manifest/index/config parsing and platform selection. No I/O.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::image::reference::validate_digest;

use crate::image::registry::RegistryError;

pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MT_DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
const MT_DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub(crate) const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub(crate) const MT_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The parts of the image configuration envbox uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ImageConfig {
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    #[serde(rename = "User", default)]
    pub user: Option<String>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "StopSignal", default)]
    pub stop_signal: Option<String>,
    #[serde(rename = "Labels", default)]
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDesc {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
}

/// A fully resolved, platform-specific image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// Digest of the platform-specific image manifest.
    pub manifest_digest: String,
    /// Digest of the index it was chosen from, when the reference named an index.
    pub index_digest: Option<String>,
    pub config: ImageConfig,
    pub config_digest: String,
    /// `os/architecture[/variant]` from the config.
    pub platform: String,
    /// Uncompressed layer digests (`rootfs.diff_ids`), for verification after decompression.
    pub diff_ids: Vec<String>,
    pub layers: Vec<LayerDesc>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RawDescriptor {
    #[serde(rename = "mediaType", default)]
    pub(crate) media_type: String,
    #[serde(default)]
    pub(crate) digest: String,
    #[serde(default)]
    pub(crate) size: Option<i64>,
    #[serde(default)]
    pub(crate) platform: Option<RawPlatform>,
    #[serde(default)]
    urls: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RawPlatform {
    #[serde(default)]
    pub(crate) architecture: String,
    #[serde(default)]
    pub(crate) os: String,
    #[serde(default)]
    pub(crate) variant: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawManifest {
    #[serde(rename = "schemaVersion", default)]
    schema_version: Option<i64>,
    #[serde(rename = "mediaType", default)]
    pub(crate) media_type: Option<String>,
    #[serde(default)]
    pub(crate) manifests: Option<Vec<RawDescriptor>>,
    #[serde(default)]
    pub(crate) config: Option<RawDescriptor>,
    #[serde(default)]
    pub(crate) layers: Option<Vec<RawDescriptor>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawConfigBlob {
    #[serde(default)]
    pub(crate) architecture: String,
    #[serde(default)]
    pub(crate) os: String,
    #[serde(default)]
    pub(crate) variant: Option<String>,
    #[serde(default)]
    pub(crate) config: Option<ImageConfig>,
    #[serde(default)]
    pub(crate) rootfs: Option<RawRootfs>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawRootfs {
    #[serde(default)]
    pub(crate) diff_ids: Vec<String>,
}

/// The platform to select from an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// linux + the running architecture in Go's naming.
    pub fn current() -> Platform {
        let (arch, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "x86" => ("386", None),
            "arm" => ("arm", Some("v7")),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "powerpc64" => ("ppc64", None),
            "riscv64" => ("riscv64", None),
            "s390x" => ("s390x", None),
            "loongarch64" => ("loong64", None),
            other => (other, None),
        };
        Platform {
            os: "linux".into(),
            architecture: arch.into(),
            variant: variant.map(String::from),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// The default variant of an architecture, which an index may omit.
fn default_variant(arch: &str) -> Option<&'static str> {
    match arch {
        "arm64" => Some("v8"),
        "arm" => Some("v7"),
        "amd64" => Some("v1"),
        _ => None,
    }
}

/// Pick the manifest for `want` from index entries: os and arch must match; the variant must match
/// when both sides name one (a missing variant means the architecture's default). Attestation
/// entries (`unknown/unknown`, or `vnd.docker.reference.type` annotations) are skipped. On failure
/// returns the list of platforms present.
pub(crate) fn select_platform<'a>(
    entries: &'a [RawDescriptor],
    want: &Platform,
) -> Result<&'a RawDescriptor, String> {
    let mut available = Vec::new();
    let norm = |arch: &str, v: Option<&str>| -> Option<String> {
        v.filter(|v| !v.is_empty())
            .map(String::from)
            .or_else(|| default_variant(arch).map(String::from))
    };
    let want_variant = norm(&want.architecture, want.variant.as_deref());
    let mut best: Option<(&RawDescriptor, u8)> = None;
    for e in entries {
        let attestation = e
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("vnd.docker.reference.type"));
        let Some(p) = &e.platform else { continue };
        if attestation || (p.os == "unknown" && p.architecture == "unknown") {
            continue;
        }
        let mut name = format!("{}/{}", p.os, p.architecture);
        if let Some(v) = p.variant.as_deref().filter(|v| !v.is_empty()) {
            name.push('/');
            name.push_str(v);
        }
        if !available.contains(&name) {
            available.push(name);
        }
        if p.os != want.os || p.architecture != want.architecture {
            continue;
        }
        let have_variant = norm(&p.architecture, p.variant.as_deref());
        let score = match (&have_variant, &want_variant) {
            (Some(h), Some(w)) if h == w => 3,
            (None, _) | (_, None) => 2,
            // amd64 micro-architecture levels (v2, v3): usable only if nothing better exists
            (Some(_), Some(_)) if want.architecture == "amd64" => 1,
            _ => continue,
        };
        if best.map_or(true, |(_, s)| score > s) {
            best = Some((e, score));
        }
    }
    best.map(|(e, _)| e).ok_or_else(|| {
        if available.is_empty() {
            "no platforms (only attestations or entries without platform)".to_string()
        } else {
            available.join(", ")
        }
    })
}

pub(crate) enum ParsedManifest {
    Index(Vec<RawDescriptor>),
    Image {
        config: RawDescriptor,
        layers: Vec<RawDescriptor>,
    },
}

pub(crate) fn parse_manifest(
    bytes: &[u8],
    content_type: Option<&str>,
    reference: &str,
) -> Result<ParsedManifest, RegistryError> {
    let invalid = |reason: String| RegistryError::InvalidManifest {
        reference: reference.to_string(),
        reason,
    };
    let raw: RawManifest = serde_json::from_slice(bytes)
        .map_err(|e| invalid(format!("manifest is not valid JSON: {e}")))?;
    let header_mt = content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_string());
    let mt = raw
        .media_type
        .clone()
        .filter(|m| !m.is_empty())
        .or(header_mt.filter(|m| !m.is_empty() && m != "application/json" && m != "text/plain"));
    if raw.schema_version == Some(1)
        || matches!(
            mt.as_deref(),
            Some(MT_DOCKER_SCHEMA1 | MT_DOCKER_SCHEMA1_SIGNED)
        )
    {
        return Err(RegistryError::Unsupported {
            reference: reference.to_string(),
            what: "Docker schema 1 manifests are not supported; push the image again with a current Docker, buildah or skopeo".into(),
        });
    }
    match mt.as_deref() {
        Some(MT_OCI_INDEX | MT_DOCKER_LIST) => {
            Ok(ParsedManifest::Index(raw.manifests.unwrap_or_default()))
        }
        Some(MT_OCI_MANIFEST | MT_DOCKER_MANIFEST) => image_parts(raw, reference),
        Some(other) => Err(RegistryError::Unsupported {
            reference: reference.to_string(),
            what: format!("unsupported manifest media type {other:?}"),
        }),
        None if raw.manifests.is_some() => {
            Ok(ParsedManifest::Index(raw.manifests.unwrap_or_default()))
        }
        None if raw.config.is_some() => image_parts(raw, reference),
        None => Err(invalid("neither an index nor an image manifest".into())),
    }
}

fn image_parts(raw: RawManifest, reference: &str) -> Result<ParsedManifest, RegistryError> {
    let config = raw.config.ok_or_else(|| RegistryError::InvalidManifest {
        reference: reference.to_string(),
        reason: "image manifest has no config".into(),
    })?;
    Ok(ParsedManifest::Image {
        config,
        layers: raw.layers.unwrap_or_default(),
    })
}

pub(crate) fn check_descriptor(
    d: &RawDescriptor,
    what: &str,
    reference: &str,
) -> Result<u64, RegistryError> {
    validate_digest(&d.digest).map_err(|e| RegistryError::InvalidManifest {
        reference: reference.to_string(),
        reason: format!("{what}: {e}"),
    })?;
    match d.size {
        Some(s) if s >= 0 => Ok(s as u64),
        _ => Err(RegistryError::InvalidManifest {
            reference: reference.to_string(),
            reason: format!("{what} {} has no valid size", d.digest),
        }),
    }
}

pub(crate) fn layer_desc(d: &RawDescriptor, reference: &str) -> Result<LayerDesc, RegistryError> {
    let size = check_descriptor(d, "layer", reference)?;
    let mt = d.media_type.as_str();
    let foreign = mt.contains(".foreign.") || mt.contains(".nondistributable.");
    if foreign || d.urls.as_ref().is_some_and(|u| !u.is_empty()) {
        return Err(RegistryError::NonDistributable {
            reference: reference.to_string(),
            digest: d.digest.clone(),
            media_type: mt.to_string(),
        });
    }
    const OK: &[&str] = &[
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.zstd",
    ];
    if !OK.contains(&mt) {
        return Err(RegistryError::Unsupported {
            reference: reference.to_string(),
            what: format!("layer {} has unsupported media type {mt:?}", d.digest),
        });
    }
    Ok(LayerDesc {
        digest: d.digest.clone(),
        size,
        media_type: mt.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(os: &str, arch: &str, variant: Option<&str>, d: char) -> RawDescriptor {
        RawDescriptor {
            media_type: MT_OCI_MANIFEST.into(),
            digest: format!("sha256:{}", d.to_string().repeat(64)),
            size: Some(1),
            platform: Some(RawPlatform {
                architecture: arch.into(),
                os: os.into(),
                variant: variant.map(String::from),
            }),
            urls: None,
            annotations: None,
        }
    }

    fn plat(arch: &str, variant: Option<&str>) -> Platform {
        Platform {
            os: "linux".into(),
            architecture: arch.into(),
            variant: variant.map(String::from),
        }
    }

    #[test]
    fn platform_selection() {
        let idx = vec![
            entry("unknown", "unknown", None, '0'),
            entry("linux", "arm", Some("v7"), '1'),
            entry("linux", "arm64", Some("v8"), '2'),
            entry("linux", "amd64", None, '3'),
            entry("windows", "amd64", None, '4'),
        ];
        assert!(select_platform(&idx, &plat("amd64", None))
            .unwrap()
            .digest
            .ends_with('3'));
        assert!(select_platform(&idx, &plat("arm64", Some("v8")))
            .unwrap()
            .digest
            .ends_with('2'));
        assert!(select_platform(&idx, &plat("arm", Some("v7")))
            .unwrap()
            .digest
            .ends_with('1'));
        let err = select_platform(&idx, &plat("riscv64", None)).unwrap_err();
        assert_eq!(
            err,
            "linux/arm/v7, linux/arm64/v8, linux/amd64, windows/amd64"
        );
        // arm64 without variant is fine for v8; a v9-only index is not
        let idx = vec![entry("linux", "arm64", None, '5')];
        assert!(select_platform(&idx, &plat("arm64", Some("v8"))).is_ok());
        let idx = vec![entry("linux", "arm64", Some("v9"), '6')];
        assert!(select_platform(&idx, &plat("arm64", Some("v8"))).is_err());
        // amd64 micro-arch variant is a last resort; plain wins
        let idx = vec![
            entry("linux", "amd64", Some("v3"), '7'),
            entry("linux", "amd64", None, '8'),
        ];
        assert!(select_platform(&idx, &plat("amd64", None))
            .unwrap()
            .digest
            .ends_with('8'));
        // only attestations
        let idx = vec![entry("unknown", "unknown", None, '0')];
        assert!(select_platform(&idx, &plat("amd64", None))
            .unwrap_err()
            .contains("attestations"));
        assert_eq!(Platform::current().os, "linux");
    }

    #[test]
    fn manifest_parsing() {
        let r = "x";
        assert!(matches!(
            parse_manifest(br#"{"schemaVersion":1,"fsLayers":[]}"#, None, r),
            Err(RegistryError::Unsupported { .. })
        ));
        assert!(matches!(
            parse_manifest(br#"{"schemaVersion":2,"manifests":[]}"#, None, r),
            Ok(ParsedManifest::Index(_))
        ));
        assert!(matches!(
            parse_manifest(
                br#"{"schemaVersion":2,"config":{"digest":"x"},"layers":[]}"#,
                Some("application/vnd.docker.distribution.manifest.v2+json; charset=utf-8"),
                r
            ),
            Ok(ParsedManifest::Image { .. })
        ));
        assert!(matches!(
            parse_manifest(
                br#"{"mediaType":"application/vnd.cncf.helm.chart"}"#,
                None,
                r
            ),
            Err(RegistryError::Unsupported { .. })
        ));
        assert!(parse_manifest(b"nope", None, r).is_err());
        let d = format!("sha256:{}", "a".repeat(64));
        let layer = |mt: &str, urls: Option<Vec<String>>| RawDescriptor {
            media_type: mt.into(),
            digest: d.clone(),
            size: Some(10),
            platform: None,
            urls,
            annotations: None,
        };
        assert!(layer_desc(
            &layer("application/vnd.docker.image.rootfs.diff.tar.gzip", None),
            r
        )
        .is_ok());
        assert!(layer_desc(
            &layer("application/vnd.oci.image.layer.v1.tar+zstd", None),
            r
        )
        .is_ok());
        let e = layer_desc(
            &layer(
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                None,
            ),
            r,
        )
        .unwrap_err();
        assert!(e.to_string().contains("non-distributable"), "{e}");
        assert!(matches!(
            layer_desc(
                &layer(
                    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                    None
                ),
                r
            ),
            Err(RegistryError::NonDistributable { .. })
        ));
        assert!(matches!(
            layer_desc(
                &layer(
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                    Some(vec!["https://x".into()])
                ),
                r
            ),
            Err(RegistryError::NonDistributable { .. })
        ));
        assert!(matches!(
            layer_desc(&layer("application/wasm", None), r),
            Err(RegistryError::Unsupported { .. })
        ));
        let mut bad = layer("application/vnd.oci.image.layer.v1.tar", None);
        bad.digest = "sha256:../../etc".into();
        assert!(layer_desc(&bad, r).is_err());
        bad.digest = d.clone();
        bad.size = None;
        assert!(layer_desc(&bad, r).is_err());
    }

    use crate::image::fuzz_rng::Rng;

    const MEDIA_TYPES: &[&str] = &[
        MT_OCI_INDEX,
        MT_OCI_MANIFEST,
        MT_DOCKER_LIST,
        MT_DOCKER_MANIFEST,
        MT_DOCKER_SCHEMA1,
        "application/json",
        "text/plain",
        "",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    ];

    /// Every parser entry point on one document: must return, never panic.
    fn exercise(bytes: &[u8], ct: Option<&str>, want: &Platform) -> bool {
        match parse_manifest(bytes, ct, "fuzz") {
            Ok(ParsedManifest::Index(entries)) => {
                if let Ok(e) = select_platform(&entries, want) {
                    let _ = check_descriptor(e, "manifest", "fuzz");
                }
                true
            }
            Ok(ParsedManifest::Image { config, layers }) => {
                let _ = check_descriptor(&config, "config", "fuzz");
                for l in &layers {
                    let _ = layer_desc(l, "fuzz");
                }
                true
            }
            Err(_) => {
                let _ = serde_json::from_slice::<RawConfigBlob>(bytes);
                false
            }
        }
    }

    /// Bounded random-input test of the manifest/index parser: arbitrary and mutated JSON never
    /// panics, and generated valid documents parse back to what was written. Fixed seed, fixed
    /// count; the numbers are printed (`cargo test oci -- --nocapture`).
    #[test]
    fn fuzz_manifest_parsing() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let want = Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        };
        let (mut executions, mut parsed, mut round_trips) = (0u64, 0u64, 0u64);
        for round in 0..3000 {
            // a valid document
            let index = rng.below(2) == 0;
            let mut layers = Vec::new();
            let doc = if index {
                let n = rng.below(6);
                let entries: Vec<_> = (0..n)
                    .map(|_| {
                        let mut e = serde_json::json!({
                            "mediaType": MT_OCI_MANIFEST,
                            "digest": rng.digest(),
                            "size": rng.below(100_000),
                            "platform": {
                                "os": rng.pick(&["linux", "windows", "unknown"]),
                                "architecture": rng.pick(&["amd64", "arm64", "arm", "unknown"]),
                            },
                        });
                        if rng.below(3) == 0 {
                            e["platform"]["variant"] = rng.pick(&["v7", "v8", "v2", ""]).into();
                        }
                        e
                    })
                    .collect();
                layers = entries.clone();
                serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": rng.pick(&[MT_OCI_INDEX, MT_DOCKER_LIST]),
                    "manifests": entries,
                })
            } else {
                for _ in 0..rng.below(5) {
                    layers.push(serde_json::json!({
                        "mediaType": rng.pick(&[
                            "application/vnd.oci.image.layer.v1.tar+gzip",
                            "application/vnd.docker.image.rootfs.diff.tar.gzip",
                            "application/vnd.oci.image.layer.v1.tar+zstd",
                        ]),
                        "digest": rng.digest(),
                        "size": rng.below(1 << 30),
                    }));
                }
                serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": rng.pick(&[MT_OCI_MANIFEST, MT_DOCKER_MANIFEST]),
                    "config": {"mediaType": MT_OCI_CONFIG, "digest": rng.digest(), "size": 7},
                    "layers": layers,
                })
            };
            let bytes = serde_json::to_vec(&doc).unwrap();
            // round trip
            match parse_manifest(&bytes, None, "fuzz") {
                Ok(ParsedManifest::Index(entries)) => {
                    assert!(index, "round {round}: an image manifest parsed as an index");
                    assert_eq!(entries.len(), layers.len());
                    for (e, j) in entries.iter().zip(&layers) {
                        assert_eq!(e.digest, j["digest"].as_str().unwrap());
                        assert!(check_descriptor(e, "manifest", "fuzz").is_ok());
                        let p = e.platform.as_ref().unwrap();
                        assert_eq!(p.os, j["platform"]["os"].as_str().unwrap());
                    }
                }
                Ok(ParsedManifest::Image { config, layers: ls }) => {
                    assert!(
                        !index,
                        "round {round}: an index parsed as an image manifest"
                    );
                    assert_eq!(config.digest, doc["config"]["digest"].as_str().unwrap());
                    assert_eq!(ls.len(), layers.len());
                    for (l, j) in ls.iter().zip(&layers) {
                        let d = layer_desc(l, "fuzz").unwrap();
                        assert_eq!(d.digest, j["digest"].as_str().unwrap());
                        assert_eq!(d.size, j["size"].as_u64().unwrap());
                        assert_eq!(d.media_type, j["mediaType"].as_str().unwrap());
                    }
                }
                Err(e) => panic!("round {round}: valid document refused: {e}"),
            }
            round_trips += 1;
            executions += 1;
            // mutations of it: flipped bytes, truncation, splices of JSON punctuation
            for _ in 0..4 {
                let mut m = bytes.clone();
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(m.len());
                    match rng.below(4) {
                        0 => m[i] = rng.next() as u8,
                        1 => m.truncate(i),
                        2 => m.insert(i, b"{}[]\":,0-e\\"[rng.below(11)]),
                        _ => {
                            m.remove(i);
                        }
                    }
                    if m.is_empty() {
                        break;
                    }
                }
                let ct = Some(rng.pick(MEDIA_TYPES));
                parsed += exercise(&m, ct, &want) as u64;
                executions += 1;
            }
            // arbitrary bytes
            let junk: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
            parsed += exercise(&junk, None, &want) as u64;
            executions += 1;
        }
        println!(
            "fuzz_manifest_parsing: {executions} executions, {round_trips} round trips, \
             {parsed} mutated/arbitrary inputs accepted, 0 panics"
        );
    }
}
