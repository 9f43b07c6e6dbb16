//! The command line of the `upcoach-server` binary: flags beside their environment
//! variables in `--help`, a flag winning over its variable, and clear refusals.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn server() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_upcoach-server"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("NO_COLOR", "1");
    command
}

fn run(command: &mut Command) -> (i32, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().expect("the binary runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    (status.code().unwrap_or(-1), text)
}

#[test]
fn help_lists_each_flag_beside_its_variable_and_hides_their_values() {
    let (code, help) = run(server()
        .arg("--help")
        .env("REDIS_URL", "redis://:hunter2@127.0.0.1:6379")
        .env("DATABASE_URL", "postgres://u:hunter2@127.0.0.1/db"));
    assert_eq!(code, 0, "{help}");
    for (flag, variable) in [
        ("--addr <HOST:PORT>", "[env: UPCOACH_ADDR"),
        ("--redis-url <URL>", "[env: REDIS_URL]"),
        ("--database-url <URL>", "[env: DATABASE_URL]"),
    ] {
        let line = help
            .lines()
            .find(|line| line.contains(flag))
            .unwrap_or_else(|| panic!("no {flag} in\n{help}"));
        assert!(line.contains(variable), "{flag} names {variable}: {line}");
    }
    assert!(help.contains("--dev"), "{help}");
    assert!(
        !help.contains("hunter2"),
        "a URL's password never shows: {help}"
    );
}

#[test]
fn a_bad_flag_or_value_exits_2_naming_it() {
    let (code, text) = run(server().arg("--bogus"));
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--bogus"), "{text}");

    let (code, text) = run(server().args(["--addr", "nonsense"]));
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("UPCOACH_ADDR is invalid"), "{text}");
    assert!(text.contains("\"nonsense\""), "{text}");

    let (code, text) = run(server().args(["--redis-url", "http://nope"]));
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("REDIS_URL"), "{text}");
}

#[test]
fn a_flag_wins_over_its_variable() {
    let mut child = server()
        .env("UPCOACH_ADDR", "not an address")
        .args(["--addr", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let listening = loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line.contains("listening on http://127.0.0.1:") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(listening, "the flag's address was used; log: {seen:#?}");
}
