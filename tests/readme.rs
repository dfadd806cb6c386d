//! The documentation's commands, run as written: every command line in README.md's `sh` code
//! blocks and in docs/security.md's step-by-step setup, against a broker this test starts the
//! way the README does (`serve`, data in `./data` of a fresh working directory). What is
//! substituted, and only that: the broker's address (the system picks the port; `127.0.0.1:7070`
//! and `localhost:7070` in a command become it, and `SLUICE_BROKER` names it), and the token and
//! hash that `sluice auth token` printed for the placeholders `<the admin token>` and
//! `<printed by sluice auth token admin>`. `cargo run --release --` is the `sluice` binary under
//! test. A command must exit 0; a `#=> TEXT` comment is output it must print.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::server::{bin, listening_addr};

/// One command line of a code block, continuation lines joined, and the output it promises.
#[derive(Debug, Clone)]
struct Line {
    command: String,
    expect: Option<String>,
}

/// The `sh` code blocks of a Markdown text, as their command lines.
fn sh_blocks(markdown: &str) -> Vec<Vec<Line>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<Line>> = None;
    let mut pending = String::new();
    for raw in markdown.lines() {
        let trimmed = raw.trim_start();
        if let Some(info) = trimmed.strip_prefix("```") {
            match current.take() {
                Some(b) => blocks.push(b),
                None if info.trim() == "sh" => current = Some(Vec::new()),
                None => {}
            }
            continue;
        }
        let Some(block) = current.as_mut() else {
            continue;
        };
        let (code, comment) = split_comment(raw);
        let code = code.trim_end();
        if let Some(head) = code.strip_suffix('\\') {
            pending.push_str(head.trim());
            pending.push(' ');
            continue;
        }
        let command = format!("{pending}{}", code.trim()).trim().to_string();
        pending.clear();
        if command.is_empty() {
            continue;
        }
        let expect = comment
            .and_then(|c| c.strip_prefix("#=>"))
            .map(|e| e.trim().to_string());
        block.push(Line { command, expect });
    }
    blocks
}

/// A line's code and its trailing `#` comment (a `#` outside quotes that starts a word).
fn split_comment(line: &str) -> (&str, Option<&str>) {
    let (mut single, mut double) = (false, false);
    let mut previous = ' ';
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && previous.is_whitespace() => {
                return (&line[..i], Some(line[i..].trim()));
            }
            _ => {}
        }
        previous = c;
    }
    (line, None)
}

/// What a command is, for the runner.
fn is_serve(command: &str) -> bool {
    command.starts_with("sluice serve") || command.starts_with("cargo run --release -- serve")
}

/// A directory holding `sluice`, a link to the binary under test, for `PATH`.
fn bin_dir(work: &Path) -> PathBuf {
    let dir = work.join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(bin(), dir.join("sluice")).unwrap();
    dir
}

/// Runs `lines` as one bash script in `cwd` (so `cd` carries over, as in a terminal), failing
/// on the first command that exits non-zero or does not print what its `#=>` says. Returns
/// each command's standard output. The deadline is generous, for a loaded machine: a command
/// that never ends (a consumer following the tail) is a failure of the documentation.
fn run_script(
    cwd: &Path,
    path_dir: &Path,
    broker: &str,
    lines: &[Line],
    what: &str,
) -> Vec<String> {
    let mut script = String::from("set -euo pipefail\n");
    for (i, line) in lines.iter().enumerate() {
        script.push_str(&format!("echo '@@@ {i}'\n{}\n", line.command));
    }
    let path = format!(
        "{}:{}",
        path_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(cwd)
        .env("PATH", path)
        .env("SLUICE_BROKER", broker)
        .env_remove("SLUICE_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let mut sections: Vec<String> = Vec::new();
    for l in stdout.lines() {
        if l.starts_with("@@@ ") {
            sections.push(String::new());
        } else if let Some(s) = sections.last_mut() {
            s.push_str(l);
            s.push('\n');
        }
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || sections.len() < lines.len() {
        let at = sections.len().saturating_sub(1);
        panic!(
            "{what}: `{}` failed ({:?})\nstdout:\n{}\nstderr:\n{stderr}",
            lines.get(at).map_or("?", |l| l.command.as_str()),
            out.status,
            sections.get(at).map_or("", String::as_str)
        );
    }
    for (line, output) in lines.iter().zip(&sections) {
        if let Some(expect) = &line.expect {
            assert!(
                output.contains(expect.as_str()),
                "{what}: `{}` printed {output:?}, documented {expect:?}",
                line.command
            );
        }
    }
    sections
}

/// A broker process, killed if the test ends before stopping it.
struct Serving(Option<Child>);

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `sluice serve ARGS…` in `cwd` with ports chosen by the system; returns it with its gRPC
/// address.
fn serve(cwd: &Path, args: &[&str]) -> (Serving, String) {
    let mut child = Command::new(bin())
        .arg("serve")
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--http-listen", ""])
        .current_dir(cwd)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let addr = listening_addr(&mut BufReader::new(child.stdout.take().unwrap()));
    (Serving(Some(child)), addr)
}

/// Stops the broker as Ctrl-C does, and waits for its clean exit.
fn interrupt(mut serving: Serving) {
    let mut child = serving.0.take().unwrap();
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    assert!(
        child.wait().unwrap().success(),
        "the broker did not stop cleanly"
    );
}

fn substitute(line: &Line, addr: &str, port: &str) -> Line {
    let command = line
        .command
        .replace("cargo run --release --", "sluice")
        .replace("127.0.0.1:7070", addr)
        .replace("localhost:7070", &format!("localhost:{port}"));
    Line {
        command,
        expect: line.expect.clone(),
    }
}

fn read_doc(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(name)).unwrap()
}

#[test]
fn every_command_in_the_readme_runs_as_written() {
    let blocks = sh_blocks(&read_doc("README.md"));
    assert!(blocks.len() >= 3, "README's command blocks: {blocks:?}");
    let work = tempfile::tempdir().unwrap();
    let path_dir = bin_dir(work.path());
    let home = work.path().join("home");
    std::fs::create_dir(&home).unwrap();
    // The README's first command: `serve` in the current directory, data in ./data.
    let (broker, addr) = serve(&home, &[]);
    let port = addr.rsplit(':').next().unwrap().to_string();
    let mut broker = Some(broker);
    let mut ran = 0;
    for block in &blocks {
        let lines: Vec<Line> = block
            .iter()
            .filter(|l| !is_serve(&l.command) && !l.command.starts_with("cargo test"))
            .map(|l| substitute(l, &addr, &port))
            .collect();
        if lines.is_empty() {
            continue;
        }
        // A block of offline tools (each reads --data-dir) runs with the broker stopped, as the
        // README says; every other block runs against it.
        let offline = lines.iter().all(|l| l.command.contains("--data-dir"));
        assert!(
            offline || lines.iter().all(|l| !l.command.contains("--data-dir")),
            "a block mixes online and offline commands: {lines:?}"
        );
        if offline && let Some(b) = broker.take() {
            interrupt(b);
        }
        assert!(
            offline || broker.is_some(),
            "an online block after the offline one: {lines:?}"
        );
        run_script(&home, &path_dir, &addr, &lines, "README.md");
        ran += lines.len();
    }
    if let Some(b) = broker.take() {
        interrupt(b);
    }
    assert!(ran >= 20, "only {ran} commands found in README.md");
}

#[test]
fn the_mutual_tls_setup_in_the_security_guide_runs_as_written() {
    assert!(
        Command::new("openssl").arg("version").output().is_ok(),
        "openssl is needed (.ci/run installs it)"
    );
    let doc = read_doc("docs/security.md");
    let section = &doc[doc.find("## Mutual TLS with a private CA").unwrap()..];
    let section = &section[..section.find("\n## ").unwrap()];
    let blocks = sh_blocks(section);
    assert_eq!(blocks.len(), 2, "the guide's two command blocks");
    let work = tempfile::tempdir().unwrap();
    let path_dir = bin_dir(work.path());
    let home = work.path().join("home");
    std::fs::create_dir(&home).unwrap();

    // 1. The PKI and the admin's token.
    let out = run_script(&home, &path_dir, "", &blocks[0], "docs/security.md");
    let printed = out.last().unwrap();
    let token = printed.lines().nth(1).unwrap().trim().to_string();
    let hash = printed
        .lines()
        .find_map(|l| l.strip_prefix("token_sha256 = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap()
        .to_string();

    // 2. The config file, as the guide shows it, with the printed hash.
    let config = section[section.find("```toml").unwrap() + "```toml".len()..]
        .split("```")
        .next()
        .unwrap()
        .replace("<printed by sluice auth token admin>", &hash);
    let file = home.join("sluice.toml");
    std::fs::write(&file, config).unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    // 3. The broker with that config, and the two client commands.
    assert!(is_serve(&blocks[1][0].command), "{:?}", blocks[1][0]);
    let args: Vec<&str> = blocks[1][0].command.split_whitespace().skip(2).collect();
    let (broker, addr) = serve(&home, &args);
    let port = addr.rsplit(':').next().unwrap().to_string();
    let clients: Vec<Line> = blocks[1][1..]
        .iter()
        .map(|l| {
            let mut l = substitute(l, &addr, &port);
            l.command = l.command.replace("<the admin token>", &token);
            l
        })
        .collect();
    assert_eq!(clients.len(), 2);
    run_script(&home, &path_dir, "", &clients, "docs/security.md");
    interrupt(broker);
}

#[test]
fn the_command_extractor_joins_continuations_and_reads_expectations() {
    let md = "text\n```sh\nprintf 'a # b\\n' \\\n  | sluice produce --topic t   # a comment\nsluice topics list   #=> t\n```\n```toml\nx = 1\n```\n";
    let blocks = sh_blocks(md);
    assert_eq!(blocks.len(), 1);
    assert_eq!(
        blocks[0][0].command,
        "printf 'a # b\\n' | sluice produce --topic t"
    );
    assert_eq!(blocks[0][0].expect, None);
    assert_eq!(blocks[0][1].command, "sluice topics list");
    assert_eq!(blocks[0][1].expect.as_deref(), Some("t"));
}
