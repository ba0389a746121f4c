//! What an operator looks at first when a run fails, written next to the run's logs.

use std::path::PathBuf;

use super::StockPair;

impl StockPair {
    /// Writes what an operator would look at first into `<run dir>/diagnostics.txt`: QEMU's
    /// view of its chardevs, network filters and migration, and the bridges' forwarding
    /// tables and link counters. Best effort: every probe that fails says so in the file.
    pub async fn write_diagnostics(&self) -> PathBuf {
        let mut out = String::new();
        for vm in [self.primary.as_ref(), self.secondary.as_ref()]
            .into_iter()
            .flatten()
        {
            for (what, cmd) in [
                ("query-chardev", None),
                ("query-migrate", None),
                ("query-colo-status", None),
                ("query-status", None),
                ("info network", Some("info network")),
                ("info block", Some("info block")),
            ] {
                let result = match cmd {
                    None => vm.qmp.execute_raw(what, None).await.map(|v| v.to_string()),
                    Some(hmp) => vm.qmp.human_monitor_command(hmp).await,
                };
                let text = result.unwrap_or_else(|e| format!("error: {e}"));
                out += &format!("== {} {what}\n{text}\n", vm.role.name());
            }
            out += &format!(
                "== {} stderr\n{}\n",
                vm.role.name(),
                vm.process.stderr_tail()
            );
        }
        for ns in [
            &self.topology.lan,
            &self.topology.primary,
            &self.topology.secondary,
        ] {
            for args in [
                vec!["-n", ns.as_str(), "-s", "link"],
                vec!["-n", ns.as_str(), "neigh"],
            ] {
                out += &format!(
                    "== ip {}\n{}\n",
                    args.join(" "),
                    command_output("ip", &args)
                );
            }
            let args = ["-n", ns.as_str(), "fdb", "show", "dynamic"];
            out += &format!(
                "== bridge {}\n{}\n",
                args.join(" "),
                command_output("bridge", &args)
            );
        }
        let args = ["-n", self.topology.client.as_str(), "neigh"];
        out += &format!(
            "== ip {}\n{}\n",
            args.join(" "),
            command_output("ip", &args)
        );
        let path = self.dir.join("diagnostics.txt");
        if let Err(e) = std::fs::write(&path, out) {
            eprintln!("could not write {}: {e}", path.display());
        }
        path
    }
}

impl StockPair {
    /// Bytes of SVM output the secondary's redirector has delivered to the primary's
    /// colo-compare (TCP `bytes_acked` of that connection, from `ss` in the secondary's
    /// namespace). Zero while the SVM's NIC is dead, whatever the clients see: the primary then
    /// releases every packet at the periodic checkpoint instead of on a match.
    pub fn secondary_output_bytes(&self) -> anyhow::Result<u64> {
        let filter = format!("( dport = :{} )", self.driver.network.compare_port);
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.topology.secondary, "ss", "-tinH"])
            .args(["state", "established", &filter])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let acked = text
            .split_whitespace()
            .find_map(|field| field.strip_prefix("bytes_acked:"))
            .map(str::parse::<u64>)
            .transpose()?;
        // `ss` leaves the field out while nothing was acknowledged.
        Ok(acked.map_or(0, |n| n.saturating_sub(1)))
    }
}

fn command_output(program: &str, args: &[&str]) -> String {
    match std::process::Command::new(program).args(args).output() {
        Ok(out) => format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => format!("could not run {program}: {e}"),
    }
}
