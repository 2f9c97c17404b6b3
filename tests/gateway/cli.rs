//! The gateway's command line through the real binary: `--check-config`, the environment
//! variables of the options, `--version`.

use super::{
    call, chat, client, closed_port, run_to_exit, run_to_exit_with_env, Gateway, TempConfig,
};

/// A valid configuration: one model on the mock, one tier, one key.
const GOOD: &str = "[models.m]\nupstream = \"mock\"\n[tiers.free]\nrpm = 10\n\
                    [keys]\nk = { user = \"u\", tier = \"free\" }\n";

#[test]
fn check_config_exits_0_when_valid_and_2_with_every_problem() {
    let good = TempConfig::new(GOOD);
    let (code, out, err) = run_to_exit(&["--check-config", "--config", good.path()]);
    assert_eq!(code, Some(0), "stderr:\n{err}");
    assert!(out.contains("the configuration is valid"), "{out}");
    assert!(out.contains(good.path()), "{out}");
    // The built-in configuration is valid too.
    let (code, out, err) = run_to_exit(&["--check-config"]);
    assert_eq!(code, Some(0), "stderr:\n{err}");
    assert!(out.contains("built-in gateway.toml"), "{out}");

    // Four problems in three tables: every one is printed, with its field.
    let bad = TempConfig::new(
        &GOOD
            .replace("rpm = 10", "rpm = 0\ntpm = 0")
            .replace("tier = \"free\"", "tier = \"gold\"")
            .replace("[models.m]", "listen = \"nowhere\"\n[models.m]"),
    );
    let (code, out, err) = run_to_exit(&["--check-config", "--config", bad.path()]);
    assert_eq!(code, Some(2), "stdout:\n{out}\nstderr:\n{err}");
    for want in [
        "`listen`",
        "`tiers.free.rpm`",
        "`tiers.free.tpm`",
        "`keys[***].tier (user \"u\")`",
        bad.path(),
    ] {
        assert!(err.contains(want), "{want:?} not in:\n{err}");
    }
    assert!(!out.contains("valid"), "{out}");

    // Not TOML, and a file that isn't there.
    let broken = TempConfig::new(&format!("{GOOD}\n[tiers.free\n"));
    let (code, _, err) = run_to_exit(&["--check-config", "--config", broken.path()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("TOML parse error"), "{err}");
    let (code, _, err) = run_to_exit(&["--check-config", "--config", "/nonexistent/g.toml"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("can't read the file"), "{err}");

    // The other options are applied before checking.
    let (code, _, err) = run_to_exit(&["--check-config", "--listen", "nowhere"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--listen: \"nowhere\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_variables_set_the_options() {
    // GATEWAY_CONFIG and GATEWAY_LISTEN instead of --config and --listen.
    let cfg = TempConfig::new(GOOD);
    let port = closed_port();
    let listen = format!("127.0.0.1:{port}");
    let gw = Gateway::start_with_env(
        &[],
        &[("GATEWAY_CONFIG", cfg.path()), ("GATEWAY_LISTEN", &listen)],
    );
    assert_eq!(gw.addr.port(), port, "{}", gw.banner);
    let a = call(
        &client(),
        "POST",
        &gw.url("/v1/chat/completions"),
        Some("k"),
        Some(&chat("m", "Hello there", 2)),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    drop(gw);

    // An option on the command line wins over its variable.
    let gw = Gateway::start_with_env(
        &["--listen", "127.0.0.1:0"],
        &[
            ("GATEWAY_CONFIG", cfg.path()),
            ("GATEWAY_LISTEN", "nowhere"),
        ],
    );
    assert!(gw.banner.contains("m "), "{}", gw.banner);

    // A bad file named by GATEWAY_CONFIG is checked like --config's.
    let bad = TempConfig::new(&GOOD.replace("rpm = 10", "rpm = 0"));
    let (code, _, err) =
        run_to_exit_with_env(&["--check-config"], &[("GATEWAY_CONFIG", bad.path())]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("`tiers.free.rpm`") && err.contains(bad.path()),
        "{err}"
    );

    // GATEWAY_REDIS selects the Redis store as --redis does.
    let (code, _, err) = run_to_exit_with_env(
        &["--check-config"],
        &[("GATEWAY_REDIS", "redis://127.0.0.1:1")],
    );
    if cfg!(feature = "redis") {
        // Checking connects to nothing: valid.
        assert_eq!(code, Some(0), "{err}");
    } else {
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("--redis needs the `redis` feature"), "{err}");
    }
}

#[test]
fn version_names_the_crate_version() {
    let (code, out, err) = run_to_exit(&["--version"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), format!("gateway {}", env!("CARGO_PKG_VERSION")));
}
