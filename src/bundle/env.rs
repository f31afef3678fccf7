//! The workspace's environment: the image's `Env`, then the agent token and subsystem, then the pod
//! variables selected by `CODER_INNER_ENVS`. Later entries replace earlier ones with the same name, so
//! there are no duplicates (the Go envbox produced some for overlapping filters).

use crate::config::EnvFilter;

/// envbox's own inputs that are secret or internal: passed only when named exactly, never through a
/// wildcard (`CODER_INNER_ENVS=*` leaked them in the Go envbox).
pub const NEVER_BY_WILDCARD: &[&str] = &[
    "CODER_IMAGE_PULL_SECRET",
    "CODER_BOOTSTRAP_SCRIPT",
    "CODER_DOCKER_CONFIG",
    "CODER_AGENT_TOKEN",
];

/// `SYSBOX_*` names sysbox-runc accepts in a process environment; it rejects any other, and any value
/// containing `=`.
pub const SYSBOX_KNOWN: &[&str] = &[
    "SYSBOX_IGNORE_SYSFS_CHOWN",
    "SYSBOX_ALLOW_TRUSTED_XATTR",
    "SYSBOX_HONOR_CAPS",
    "SYSBOX_SYSCONT_MODE",
    "SYSBOX_SKIP_UID_SHIFT",
];

/// Pod variables selected by the filters, in filter order then environment order, each at most once.
pub fn select_pod_env(
    filters: &[EnvFilter],
    pod_env: &[(String, String)],
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for f in filters {
        for (k, v) in pod_env {
            let hit = match f {
                EnvFilter::Exact(name) => k == name,
                EnvFilter::Prefix(p) => {
                    k.starts_with(p.as_str()) && !NEVER_BY_WILDCARD.contains(&k.as_str())
                }
            };
            if hit && !out.iter().any(|(ok, _)| ok == k) {
                out.push((k.clone(), v.clone()));
            }
        }
    }
    out
}

/// The first `SYSBOX_*` entry sysbox-runc would refuse, as (name, reason).
pub fn sysbox_rejects(vars: &[(String, String)]) -> Option<(String, &'static str)> {
    vars.iter().find_map(|(k, v)| {
        if !k.starts_with("SYSBOX_") {
            None
        } else if !SYSBOX_KNOWN.contains(&k.as_str()) {
            Some((k.clone(), "sysbox-runc rejects unknown SYSBOX_* variables"))
        } else if v.contains('=') {
            Some((
                k.clone(),
                "sysbox-runc rejects SYSBOX_* values containing '='",
            ))
        } else {
            None
        }
    })
}

/// `CODER_AGENT_SUBSYSTEM` merged with `envbox`: split on commas, trimmed, de-duplicated, sorted.
pub fn agent_subsystem(existing: Option<&str>) -> String {
    let mut parts: Vec<String> = existing
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    parts.push("envbox".into());
    parts.sort();
    parts.dedup();
    parts.join(",")
}

/// Puts `KEY=VALUE` into `env`, replacing an existing entry of that name in place.
pub fn set(env: &mut Vec<String>, key: &str, value: &str) {
    let prefix = format!("{key}=");
    let entry = format!("{key}={value}");
    match env
        .iter_mut()
        .find(|e| e.starts_with(&prefix) || e.as_str() == key)
    {
        Some(e) => *e = entry,
        None => env.push(entry),
    }
}

pub fn get<'a>(env: &'a [String], key: &str) -> Option<&'a str> {
    env.iter()
        .find_map(|e| e.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
}

/// The complete environment of the workspace's processes.
pub fn workspace_env(
    image_env: &[String],
    agent_token: &str,
    selected: &[(String, String)],
    gpu_env: &[(String, String)],
) -> Vec<String> {
    let mut env: Vec<String> = Vec::new();
    for e in image_env {
        match e.split_once('=') {
            Some((k, v)) => set(&mut env, k, v),
            None => continue,
        }
    }
    if get(&env, "PATH").is_none() {
        set(
            &mut env,
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    set(&mut env, "CODER_AGENT_TOKEN", agent_token);
    let subsystem = selected
        .iter()
        .find(|(k, _)| k == "CODER_AGENT_SUBSYSTEM")
        .map(|(_, v)| v.as_str());
    set(
        &mut env,
        "CODER_AGENT_SUBSYSTEM",
        &agent_subsystem(subsystem),
    );
    for (k, v) in selected.iter().chain(gpu_env) {
        if k != "CODER_AGENT_SUBSYSTEM" {
            set(&mut env, k, v);
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Vec<(String, String)> {
        [
            ("USA", "yay"),
            ("US_STATE", "ca"),
            ("TEST_VAR", "hello=world"),
            ("CODER_IMAGE_PULL_SECRET", "{}"),
            ("CODER_BOOTSTRAP_SCRIPT", "curl | sh"),
            ("CODER_AGENT_SUBSYSTEM", "exectrace"),
            ("HOME", "/root"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn filters_exact_prefix_and_no_duplicates() {
        let f = vec![
            EnvFilter::Prefix("US_".into()),
            EnvFilter::Exact("TEST_VAR".into()),
            EnvFilter::Prefix("US".into()),
        ];
        let got = select_pod_env(&f, &pod());
        let names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, vec!["US_STATE", "TEST_VAR", "USA"]);
        assert_eq!(got[1].1, "hello=world");
    }

    #[test]
    fn wildcard_never_leaks_secrets_but_exact_names_do_pass() {
        let got = select_pod_env(&[EnvFilter::Prefix(String::new())], &pod());
        assert!(got
            .iter()
            .all(|(k, _)| !NEVER_BY_WILDCARD.contains(&k.as_str())));
        assert!(got.iter().any(|(k, _)| k == "HOME"));
        let exact = select_pod_env(&[EnvFilter::Exact("CODER_BOOTSTRAP_SCRIPT".into())], &pod());
        assert_eq!(exact.len(), 1);
    }

    #[test]
    fn subsystem_is_merged() {
        assert_eq!(agent_subsystem(None), "envbox");
        assert_eq!(agent_subsystem(Some("exectrace")), "envbox,exectrace");
        assert_eq!(
            agent_subsystem(Some(" zeta, envbox,,alpha")),
            "alpha,envbox,zeta"
        );
    }

    #[test]
    fn final_env_overrides_image_and_keeps_order() {
        let image = vec![
            "PATH=/usr/bin".to_string(),
            "LANG=C".into(),
            "TEST_VAR=old".into(),
        ];
        let sel = select_pod_env(
            &[
                EnvFilter::Exact("TEST_VAR".into()),
                EnvFilter::Exact("CODER_AGENT_SUBSYSTEM".into()),
            ],
            &pod(),
        );
        let env = workspace_env(&image, "tok", &sel, &[]);
        assert_eq!(
            env,
            vec![
                "PATH=/usr/bin",
                "LANG=C",
                "TEST_VAR=hello=world",
                "CODER_AGENT_TOKEN=tok",
                "CODER_AGENT_SUBSYSTEM=envbox,exectrace",
            ]
        );
    }

    #[test]
    fn sysbox_env_rules() {
        let ok = vec![("SYSBOX_HONOR_CAPS".to_string(), "TRUE".to_string())];
        assert_eq!(sysbox_rejects(&ok), None);
        let bad = vec![("SYSBOX_NOPE".to_string(), "1".to_string())];
        assert_eq!(sysbox_rejects(&bad).unwrap().0, "SYSBOX_NOPE");
        let eq = vec![("SYSBOX_HONOR_CAPS".to_string(), "a=b".to_string())];
        assert!(sysbox_rejects(&eq).is_some());
    }
}
