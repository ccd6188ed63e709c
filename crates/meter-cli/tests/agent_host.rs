//! The host agent on a fake /proc (fixture files swapped while it runs),
//! killed with SIGKILL and restarted on the same state folder: every second
//! from its first to its last tick is on the topic exactly once (after
//! dropping copies by seq), no seq is reused, and the totals equal the
//! counters' movement in the fixtures, across the kill and the time the
//! agent was down. Runs on the real local Kafka (does not touch the broker).

#![allow(clippy::unwrap_used)]

mod agent_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use agent_support::*;
use meter_avro::Codec;

fn install(fixture: &str, proc_root: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../meter-agent/tests/fixtures/proc").join(fixture);
    for rel in ["stat", "meminfo", "net/dev", "diskstats"] {
        let to = proc_root.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        // Renamed into place: the agent never reads half a file.
        let tmp = to.with_extension("tmp");
        std::fs::copy(src.join(rel), &tmp).unwrap();
        std::fs::rename(&tmp, &to).unwrap();
    }
}

fn spawn(config: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_meter"))
        .arg("--config")
        .arg(config)
        .arg("agent")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_agent_killed_and_restarted_meters_every_unit_and_every_second() {
    let dir = tempfile::tempdir().unwrap();
    let id = format!("agenthost_{}", std::process::id());
    let proc_root = dir.path().join("proc");
    install("t0", &proc_root);
    let extra = format!(
        "agent_id = \"host-test\"\ncustomer_id = \"cust-{id}\"\nregion = \"eu-west-1\"\nproc_root = \"{}\"\nstate_dir = \"{}\"\n",
        proc_root.display(),
        dir.path().join("state").display()
    );
    let (path, cfg) = config_file(dir.path(), &id, &extra);
    setup(&cfg).await;
    let check = Command::new(env!("CARGO_BIN_EXE_meter")).arg("--config").arg(&path).args(["agent", "--check"]).output().unwrap();
    assert!(check.status.success());
    assert!(String::from_utf8_lossy(&check.stdout).contains("host-test/eth0"), "--check prints the events of one second");

    let mut agent = spawn(&path);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    install("t1", &proc_root);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    agent.kill().unwrap(); // SIGKILL
    agent.wait().unwrap();
    // While the agent is down, the counters move on (eth0 even resets).
    install("t2", &proc_root);
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let agent = spawn(&path);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    Command::new("kill").arg("-TERM").arg(agent.id().to_string()).status().unwrap();
    let out = tokio::task::spawn_blocking(move || agent.wait_with_output().unwrap()).await.unwrap();
    assert!(out.status.success(), "agent failed: {}", out.status);
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{summary}");
    assert!(summary.contains(" 0 dropped") && summary.contains(" 0 events behind"), "{summary}");

    let events = read_events(&cfg);
    let (distinct, copies) = check_seqs(&events);
    eprintln!("{distinct} distinct events, {copies} sent again");
    let codec = Codec::new().unwrap();
    let mut totals: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut cpu_seconds = Vec::new();
    for payloads in events.values() {
        let e = codec.decode_event(&payloads[0]).unwrap();
        assert_eq!((e.agent_id.as_str(), e.service.as_str(), e.region.as_str()), ("host-test", "host", "eu-west-1"));
        *totals.entry((e.usage_type.clone(), e.resource_id.clone())).or_default() += e.quantity;
        if e.usage_type == "CPU-VcpuMs" {
            cpu_seconds.push(e.event_time);
        }
    }
    cpu_seconds.sort();
    let span = (cpu_seconds.last().unwrap() - cpu_seconds[0]) / 1000 + 1;
    assert_eq!(cpu_seconds.len() as i64, span, "one CPU event for every second from the first to the last tick: {cpu_seconds:?}");
    assert!(span >= 7, "the agent ran about 8 s, down 2 s of them: {span}");
    let t = |ut: &str, r: &str| totals.get(&(ut.to_owned(), r.to_owned())).copied().unwrap_or(0);
    // Fixture arithmetic (see crates/meter-agent/tests/procfs_fixtures.rs),
    // 64-bit counters: 1367 -> 1380 CPU ticks of 10 ms.
    assert_eq!(t("CPU-VcpuMs", "host-test"), 130);
    assert_eq!(t("Network-In-Bytes", "host-test/eth0"), 1500 + 300, "+1500, then a reset to 300 while the agent was down");
    assert_eq!(t("Network-Out-Bytes", "host-test/eth0"), 400);
    assert_eq!(t("Network-In-Bytes", "host-test/eth1"), 200 + 700);
    assert_eq!(t("Disk-Read-Bytes", "host-test/sda"), 5120);
    assert_eq!(t("Disk-Write-Bytes", "host-test/sda"), 3072);
    assert_eq!(t("Disk-Write-Bytes", "host-test/nvme0n1"), 5120);
    assert!(!totals.keys().any(|(_, r)| r.ends_with("/lo") || r.ends_with("/sda1") || r.ends_with("/loop0")));
}
