//! `qmp-driver copy-disk` against a real QEMU and colo-blockd: the initial full copy of the
//! primary's disk into a new secondary's image, through QEMU's drive-mirror into
//! `colo-blockd serve`'s NBD export. Needs the QEMU of `integration/setup.sh` (see
//! `colo_testkit::qemu::qemu_binary`) and this build's colo-blockd binary (the workspace's test run builds
//! it; `COLO_BLOCKD` overrides); fails, never skips, without them.

use colo_testkit::binaries::BlockdServe;
use colo_testkit::qemu::Qemu;
use serde_json::Value;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const DISK_BYTES: usize = 8 << 20;

/// A disk worth copying: a different byte pattern in every MiB, a hole, and data at the end.
fn source_image() -> Vec<u8> {
    let mut data = vec![0u8; DISK_BYTES];
    for (mib, chunk) in data.chunks_mut(1 << 20).enumerate() {
        if mib == 3 {
            continue; // stays a hole
        }
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = (i.wrapping_mul(31) ^ mib.wrapping_mul(7) ^ (i >> 9)) as u8;
        }
    }
    let tail = DISK_BYTES - 512;
    data[tail..].copy_from_slice(&[0xa5; 512]);
    data
}

fn write_config(dir: &Path, qmp: &Path, port: u16) -> PathBuf {
    let path = dir.join("pair.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"copy\"\n\
             [primary]\nqmp = \"unix:{}\"\nhost = \"127.0.0.1\"\n\
             [secondary]\nqmp = \"unix:{}\"\nhost = \"127.0.0.1\"\n\
             [migration]\nsecondary_incoming = \"tcp:127.0.0.1:9998\"\n\
             [disk]\nbackend = \"colo-blockd\"\nnbd_port = {port}\n",
            qmp.display(),
            dir.join("absent.qmp").display()
        ),
    )
    .expect("write pair.toml");
    path
}

fn copy_disk(config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qmp-driver"))
        .arg("--config")
        .arg(config)
        .args(["copy-disk", "--json", "--timeout", "60"])
        .stdin(Stdio::null())
        .output()
        .expect("run qmp-driver copy-disk")
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier qemu: needs the patched QEMU of integration/setup.sh; select with --include-ignored (integration/test.sh does)"]
async fn copy_disk_mirrors_the_paused_primary_into_a_blockd_export_and_refuses_a_running_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("primary.raw");
    let target = dir.path().join("secondary.raw");
    let data = source_image();
    std::fs::write(&source, &data).expect("write the primary's image");
    File::create(&target)
        .and_then(|f| f.set_len(DISK_BYTES as u64))
        .expect("create the secondary's image");

    let drive = format!(
        "if=none,id=colo-disk0,driver=raw,file.filename={}",
        source.display()
    );
    let qemu = Qemu::start(&["-machine", "none", "-drive", &drive]).await;
    let blockd = BlockdServe::start("base", &target, &dir.path().join("blockd.log"));
    let port = blockd.port;
    let config = write_config(dir.path(), &qemu.socket, port);

    let out = copy_disk(&config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "copy-disk failed ({:?}): {stdout} {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).expect("--json prints the report");
    assert_eq!(report["bytes"], DISK_BYTES as u64, "{report}");
    assert_eq!(
        report["target"],
        format!("nbd://127.0.0.1:{port}/base"),
        "{report}"
    );
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter_map(|s| s["what"].as_str())
        .collect();
    assert!(steps[0].starts_with("drive-mirror colo-disk0"), "{steps:?}");
    assert_eq!(steps.last(), Some(&"block-job-cancel colo-copy"));
    drop(blockd);
    let copied = std::fs::read(&target).expect("read the copy");
    assert!(copied == data, "the copy differs from the primary's disk");

    // A running guest would keep writing: the copy is refused and nothing is started.
    {
        let client = qemu.connect().await;
        client.cont().await.expect("cont");
    }
    let out = copy_disk(&config);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err: Value = serde_json::from_slice(&out.stdout).expect("--json prints the error");
    assert!(
        err.to_string().contains("the VM runs"),
        "unexpected error: {err}"
    );
    let client = qemu.connect().await;
    let jobs = client
        .execute_raw("query-block-jobs", None)
        .await
        .expect("query-block-jobs");
    assert_eq!(jobs, serde_json::json!([]), "a job was started anyway");
}
