//! FastNetMon on the ISP side of the namespace lab, wired to dots-client's
//! API through the shipped notify script (`examples/fastnetmon/dots-notify`):
//! the detector loop of the end-to-end test and of `cargo xtask demo
//! --detector`.
//!
//! FastNetMon (Debian `fastnetmon`) runs in the `isp` namespace with its own
//! configuration, log and pid handling inside the lab's directory, mirrors
//! the ISP's interface towards the router (`ispd`) with AF_PACKET, and
//! watches the router's public address for outgoing floods.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{
    lab::Lab,
    procs::{eventually, Proc},
};

/// Where the API listens in the lab (the ISP's address, in the client
/// certificate's subjectAltName).
pub const API_ADDR: &str = "203.0.113.2:8443";
/// The router's public address (the customer's, as FastNetMon sees it).
pub const CUSTOMER_ADDR: &str = "203.0.113.1";
const TOKEN: &str = "lab-fastnetmon-token-0123456789";

/// The notify script shipped in examples/.
pub fn notify_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/fastnetmon/dots-notify")
}

/// The `dots-client listen` flags that turn the API on, with a tokens file
/// naming FastNetMon.
pub fn api_flags(lab: &Lab) -> Result<Vec<String>> {
    let tokens = lab.dir.path.join("api-tokens");
    std::fs::write(&tokens, format!("fastnetmon {TOKEN}\n"))?;
    Ok(vec![
        "--api".into(),
        API_ADDR.into(),
        "--api-tokens".into(),
        tokens.display().to_string(),
    ])
}

/// A running FastNetMon.
pub struct FastNetMon {
    pub proc: Proc,
    /// The notify script's own log (one line per action).
    pub notify_log: PathBuf,
}

impl FastNetMon {
    /// Starts FastNetMon in the lab's ISP namespace: ban above
    /// `threshold_pps` outgoing packets per second from the customer's
    /// address, unban `ban_time` seconds after the attack stopped.
    pub fn start(lab: &Lab, threshold_pps: u32, ban_time: u32) -> Result<FastNetMon> {
        let dir = &lab.dir.path;
        let networks = dir.join("fnm-networks");
        std::fs::write(&networks, format!("{CUSTOMER_ADDR}/32\n"))?;
        let white = dir.join("fnm-whitelist");
        std::fs::write(&white, "")?;
        let token = dir.join("fnm-token");
        std::fs::write(&token, TOKEN)?;
        let notify_log = dir.join("dots-notify.log");
        let notify_conf = dir.join("fnm-notify.conf");
        std::fs::write(
            &notify_conf,
            format!(
                "DOTS_API=https://{API_ADDR}\nDOTS_API_TOKEN_FILE={}\nDOTS_API_CA={}\nDOTS_LIFETIME=600\nDOTS_LOG={}\n",
                token.display(),
                lab.pki.ca.display(),
                notify_log.display()
            ),
        )?;
        // The script learns where its settings are from this wrapper: FastNetMon
        // passes no environment of ours to it.
        let wrapper = dir.join("fnm-notify.sh");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nDOTS_NOTIFY_CONF={} exec {} \"$@\"\n",
                notify_conf.display(),
                notify_script().display()
            ),
        )?;
        set_executable(&wrapper)?;
        let conf = dir.join("fastnetmon.conf");
        std::fs::write(
            &conf,
            format!(
                "logging_level = info
logging_local_syslog_logging = off
logging_remote_syslog_logging = off
disable_usage_report = on
enable_api = off
enable_ban = on
enable_ban_ipv6 = on
process_incoming_traffic = on
process_outgoing_traffic = on
ban_details_records_count = 20
ban_time = {ban_time}
unban_only_if_attack_finished = on
networks_list_path = {}
white_list_path = {}
check_period = 1
enable_connection_tracking = on
ban_for_pps = on
ban_for_bandwidth = off
ban_for_flows = off
threshold_pps = {threshold_pps}
mirror_afpacket = on
interfaces = ispd
average_calculation_time = 1
speed_calculation_delay = 1
notify_script_path = {}
pid_path = {}
monitor_local_ip_addresses = off
",
                networks.display(),
                white.display(),
                wrapper.display(),
                dir.join("fastnetmon.pid").display(),
            ),
        )?;
        let proc = Proc::spawn(
            &lab.isp,
            "fastnetmon",
            &PathBuf::from("/usr/sbin/fastnetmon"),
            &[
                "--configuration_file".into(),
                conf.display().to_string(),
                "--log_file".into(),
                dir.join("fastnetmon.log").display().to_string(),
                "--disable_pid_logic".into(),
            ],
            dir.join("fastnetmon.out"),
        )?;
        Ok(FastNetMon { proc, notify_log })
    }

    pub fn notify_log(&self) -> String {
        std::fs::read_to_string(&self.notify_log).unwrap_or_default()
    }
}

fn set_executable(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The lab client's mitigations labelled by FastNetMon for the customer.
pub fn detector_mitigations(lab: &Lab) -> Result<Vec<Value>> {
    let (_, r) = lab.client(&["mitigations"])?;
    Ok(r.first()
        .and_then(|r| r["body"].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m["label"] == format!("fastnetmon:{CUSTOMER_ADDR}"))
        .collect())
}

/// Waits until FastNetMon's mitigation reaches `state`; returns it.
pub fn wait_detector_state(
    lab: &Lab,
    fnm: &FastNetMon,
    state: &str,
    timeout: Duration,
) -> Result<Value> {
    eventually(timeout, || {
        detector_mitigations(lab)
            .ok()?
            .into_iter()
            .rev()
            .find(|m| m["state"] == state)
    })
    .with_context(|| {
        format!(
            "no FastNetMon mitigation became {state} within {timeout:?}; notify log:\n{}\nFastNetMon log:\n{}",
            fnm.notify_log(),
            fnm.proc.log_text()
        )
    })
}
