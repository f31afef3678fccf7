//! `docker` in the outer image (a link to envbox): runbooks and Coder's docs say
//! `kubectl exec … -- docker exec -it workspace_cvm bash`, because the Go envbox ran a dockerd with the
//! workspace as its container `workspace_cvm`. This image runs no dockerd, so the few commands those
//! habits use are mapped onto envbox, and every other one is answered with one line saying so.

use std::ffi::OsStr;
use std::path::Path;
use std::process::ExitCode;

use crate::cli::ExecArgs;
use crate::workspace::WorkspaceRecord;

/// The Go envbox's name of the workspace container.
pub const CONTAINER_NAME: &str = "workspace_cvm";

const NO_DOCKERD: &str = "this image runs no dockerd (envbox starts the workspace itself): use \
    `docker exec [-it] [-u USER] [-w DIR] [-e K=V] workspace_cvm CMD...` or `envbox exec [-u USER] -- CMD...` \
    to run a command in the workspace, `docker ps` to see it and `kubectl logs <pod>` for its output";

/// Whether envbox was started under the name `docker` (the outer image's /usr/local/bin/docker).
pub fn invoked_as_docker(argv0: &OsStr) -> bool {
    Path::new(argv0).file_name() == Some(OsStr::new("docker"))
}

#[derive(Debug, PartialEq, Eq)]
pub enum Shim {
    Exec {
        user: Option<String>,
        workdir: Option<String>,
        env: Vec<String>,
        command: Vec<String>,
    },
    Ps,
    Logs,
    /// One line for stderr.
    Refuse(String),
}

/// Reads `docker`'s arguments (without argv[0]).
pub fn parse(args: &[String]) -> Shim {
    match args.split_first() {
        Some((cmd, rest)) if cmd == "exec" => parse_exec(rest),
        Some((cmd, rest)) if cmd == "ps" && rest.iter().all(|a| a.starts_with('-')) => Shim::Ps,
        Some((cmd, rest)) if cmd == "logs" => match rest.last() {
            Some(c) if c == CONTAINER_NAME => Shim::Logs,
            _ => refuse(args),
        },
        _ => refuse(args),
    }
}

fn refuse(args: &[String]) -> Shim {
    let what = match args.first() {
        Some(c) => format!("docker {c}"),
        None => "docker".to_string(),
    };
    Shim::Refuse(format!("{what}: {NO_DOCKERD}"))
}

fn parse_exec(args: &[String]) -> Shim {
    let (mut user, mut workdir, mut env) = (None, None, Vec::new());
    let mut i = 0;
    // The value of an option given as `--opt=V`, `--opt V`, `-oV` or `-o V`.
    let value = |i: &mut usize, inline: Option<&str>| -> Option<String> {
        match inline {
            Some(v) => Some(v.to_string()),
            None => {
                *i += 1;
                args.get(*i).cloned()
            }
        }
    };
    while let Some(a) = args.get(i) {
        if a == "--" {
            i += 1;
            break;
        }
        if !a.starts_with('-') || a == "-" {
            break;
        }
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if a.starts_with("--") => (n, Some(v)),
            _ if !a.starts_with("--") && a.len() > 2 && !is_flag_cluster(a) => {
                (&a[..2], Some(&a[2..]))
            }
            _ => (a.as_str(), None),
        };
        match name {
            "-i" | "-t" | "--interactive" | "--tty" => {}
            _ if is_flag_cluster(name) => {}
            "-u" | "--user" => user = value(&mut i, inline),
            "-w" | "--workdir" => workdir = value(&mut i, inline),
            "-e" | "--env" => match value(&mut i, inline) {
                Some(kv) if kv.contains('=') => env.push(kv),
                // docker's `-e NAME`: the caller's value, or nothing when it has none.
                Some(k) => {
                    if let Ok(v) = std::env::var(&k) {
                        env.push(format!("{k}={v}"));
                    }
                }
                None => return Shim::Refuse("docker exec: -e needs K=V".into()),
            },
            other => {
                return Shim::Refuse(format!(
                    "docker exec: option {other} is not supported: {NO_DOCKERD}"
                ))
            }
        }
        i += 1;
    }
    let rest = args.get(i..).unwrap_or_default();
    match rest.split_first() {
        Some((c, cmd)) if c == CONTAINER_NAME && !cmd.is_empty() => Shim::Exec {
            user,
            workdir,
            env,
            command: cmd.to_vec(),
        },
        Some((c, _)) if c == CONTAINER_NAME => Shim::Refuse(
            "docker exec: a command is needed: docker exec -it workspace_cvm bash".into(),
        ),
        Some((c, _)) => Shim::Refuse(format!(
            "docker exec: no container {c:?}; the only one is {CONTAINER_NAME}, and {NO_DOCKERD}"
        )),
        None => refuse(&["exec".to_string()]),
    }
}

/// `-it`, `-ti`: docker's boolean short flags given together.
fn is_flag_cluster(a: &str) -> bool {
    a.len() > 2 && !a.starts_with("--") && a[1..].chars().all(|c| c == 'i' || c == 't')
}

pub fn run(args: &[String]) -> ExitCode {
    match parse(args) {
        Shim::Exec {
            user,
            workdir,
            env,
            command,
        } => crate::exec::run(&ExecArgs {
            // The Go envbox's container ran as root, so `docker exec` gave root unless -u said otherwise.
            user: Some(user.unwrap_or_else(|| "root".into())),
            workdir,
            env,
            state_dir: std::env::var("CODER_STATE_DIR").ok(),
            command,
        }),
        Shim::Ps => {
            println!("CONTAINER ID   STATUS   NAMES");
            if let Some(rec) = running_workspace() {
                let id: String = rec.id.chars().take(12).collect();
                println!("{id:<14} Up       {CONTAINER_NAME}");
            }
            ExitCode::SUCCESS
        }
        Shim::Logs => {
            eprintln!(
                "docker logs: the workspace's start-up and bootstrap output is the pod's log: \
                 kubectl logs <pod> (this image runs no dockerd)"
            );
            ExitCode::from(1)
        }
        Shim::Refuse(line) => {
            eprintln!("{line}");
            ExitCode::from(1)
        }
    }
}

fn running_workspace() -> Option<WorkspaceRecord> {
    let dir = std::env::var("CODER_STATE_DIR")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| crate::config::DEFAULT_STATE_DIR.to_string());
    let rec = WorkspaceRecord::load(Path::new(&dir)).ok()?;
    Path::new(&format!("/proc/{}", rec.pid))
        .exists()
        .then_some(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn exec_forms() {
        assert_eq!(
            parse(&v("exec -it workspace_cvm bash")),
            Shim::Exec {
                user: None,
                workdir: None,
                env: vec![],
                command: v("bash")
            }
        );
        assert_eq!(
            parse(&v(
                "exec -i -t -u coder -w /tmp -e A=1 --env=B=2=3 --user=root --workdir /w workspace_cvm sh -c x"
            )),
            Shim::Exec {
                user: Some("root".into()),
                workdir: Some("/w".into()),
                env: v("A=1 B=2=3"),
                command: v("sh -c x")
            }
        );
        assert_eq!(
            parse(&v("exec -ucoder -w/tmp workspace_cvm id -u")),
            Shim::Exec {
                user: Some("coder".into()),
                workdir: Some("/tmp".into()),
                env: vec![],
                command: v("id -u")
            }
        );
        // Options after the container belong to the command.
        assert_eq!(
            parse(&v("exec workspace_cvm ls -la")),
            Shim::Exec {
                user: None,
                workdir: None,
                env: vec![],
                command: v("ls -la")
            }
        );
    }

    #[test]
    fn everything_else_is_one_line_naming_the_alternative() {
        for args in [
            "run --rm hello-world",
            "",
            "info",
            "exec other true",
            "exec workspace_cvm",
            "exec -d workspace_cvm true",
            "logs other",
            "ps extra",
        ] {
            match parse(&v(args)) {
                Shim::Refuse(line) => {
                    assert!(!line.contains('\n'), "{args}: {line}");
                    assert!(
                        line.contains("dockerd") || line.contains("bash"),
                        "{args}: {line}"
                    );
                }
                other => panic!("{args}: {other:?}"),
            }
        }
        assert_eq!(parse(&v("ps -a")), Shim::Ps);
        assert_eq!(parse(&v("logs -f workspace_cvm")), Shim::Logs);
        assert!(invoked_as_docker(OsStr::new("/usr/local/bin/docker")));
        assert!(!invoked_as_docker(OsStr::new("/envbox")));
    }
}
