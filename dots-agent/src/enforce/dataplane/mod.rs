//! Loading the XDP classifier and adopting its pinned maps.
//!
//! - [`attach`]: pinned links per interface, detach, teardown.
//! - [`apply`]: the idempotent step that makes the maps match a desired set
//!   of slots.
//!
//! Maps are pinned by name under the bpffs directory and re-used when they
//! are already there, so a restarted agent adopts the running classifier
//! instead of replacing it: enforcement never stops across restarts. The XDP
//! link is pinned too, so drops continue after the process exits until
//! [`Dataplane::teardown`] removes everything.

mod apply;
mod attach;

use std::{
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, MapData},
    programs::{ProgramError, Xdp},
    Ebpf, EbpfLoader,
};
use dots_common::{names, stats, Policy, SlotCounters, SlotMask, SourceEntry, MAX_EXEMPT_PREFIXES};

pub use apply::{ApplyReport, SlotChange};
pub use attach::{AttachMode, Attachment};

use super::{
    error::{io_error, load_error, load_error_program},
    maps::{Buckets, Lpm, PerCpu, PerSlot, SlotArray, SlotConfigs, SourceHash, V4, V6},
    plan::{ArrayId, Model},
    spec::{SlotId, SlotLimits},
    sys::{self, check_bpffs},
    EnforceError, DEFAULT_BPFFS_DIR,
};

/// The XDP object built by build.rs from `dots-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dots-ebpf"));

/// How the classifier is loaded.
#[derive(Clone, Debug)]
pub struct DataplaneOptions {
    /// bpffs directory for the pinned maps and links.
    pub bpffs: PathBuf,
    pub limits: SlotLimits,
}

impl Default for DataplaneOptions {
    fn default() -> Self {
        DataplaneOptions {
            bpffs: PathBuf::from(DEFAULT_BPFFS_DIR),
            limits: SlotLimits::default(),
        }
    }
}

/// Classifier-wide packet statistics (see `dots_common::stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DataplaneStats {
    pub unparsed: u64,
    pub exempt: u64,
    pub dropped: u64,
    /// Passed, but a monitor slot would have dropped them.
    pub monitored: u64,
    /// Passed by a rate-limited slot, within its limit.
    pub conforming: u64,
}

/// The loaded classifier and its maps.
pub struct Dataplane {
    dir: PathBuf,
    ebpf: Ebpf,
    limits: SlotLimits,
    policy: Array<MapData, Policy>,
    src4: SourceHash<V4>,
    src6: SourceHash<V6>,
    src4_lpm: Lpm<V4, SourceEntry>,
    src6_lpm: Lpm<V6, SourceEntry>,
    dst4: Lpm<V4, SlotMask>,
    dst6: Lpm<V6, SlotMask>,
    /// The value arrays, in [`ArrayId::ALL`] order.
    arrays: [SlotArray; 4],
    exempt4: Lpm<V4, u8>,
    exempt6: Lpm<V6, u8>,
    configs: SlotConfigs,
    buckets: Buckets,
    counters: PerCpu<SlotCounters>,
    stats: PerCpu<u64>,
    /// The slots the maps hold, with their prefixes per map: what the maps
    /// hold after the last successful apply, when `in_sync`.
    model: Model,
    /// `false` until the maps were read back and reconciled (after open, or
    /// after an error): the next apply then compares with the kernel.
    in_sync: bool,
    /// The policy as last written (valid when `in_sync`).
    written: Policy,
    /// `flags::EXEMPT4` / `EXEMPT6` for the families whose exempt trie holds
    /// prefixes.
    exempt_present: u64,
}
impl Dataplane {
    /// Loads the classifier, creating or adopting the pinned maps.
    pub fn open(opts: &DataplaneOptions) -> Result<Dataplane, EnforceError> {
        check_bpffs(&opts.bpffs)?;
        fs::create_dir_all(&opts.bpffs)
            .map_err(|source| io_error("creating", &opts.bpffs, source))?;
        check_pinned_layouts(&opts.bpffs)?;
        let mut loader = EbpfLoader::new();
        let pins: Vec<PathBuf> = names::ALL_MAPS.iter().map(|n| opts.bpffs.join(n)).collect();
        for (name, pin) in names::ALL_MAPS.iter().zip(&pins) {
            loader.map_pin_path(name, pin.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(load_error)?;
        let program: &mut Xdp = xdp_program(&mut ebpf, names::PROGRAM)?;
        load_program(program, names::PROGRAM)?;

        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or_else(|| EnforceError::Load(format!("map {name} missing from the object")))
        };
        macro_rules! typed {
            ($name:expr) => {
                take($name)?.try_into().map_err(EnforceError::map($name))?
            };
        }
        macro_rules! lpm {
            ($name:expr, $cap:expr) => {
                Lpm {
                    name: $name,
                    capacity: $cap,
                    map: typed!($name),
                }
            };
        }
        use dots_common::{MAX_SOURCE_PREFIXES as SOURCES, MAX_TARGET_PREFIXES as TARGETS};
        let policy = typed!(names::POLICY);
        let src4 = SourceHash {
            name: names::SRC4,
            capacity: SOURCES,
            map: typed!(names::SRC4),
        };
        let src6 = SourceHash {
            name: names::SRC6,
            capacity: SOURCES,
            map: typed!(names::SRC6),
        };
        let src4_lpm = lpm!(names::SRC4_LPM, SOURCES);
        let src6_lpm = lpm!(names::SRC6_LPM, SOURCES);
        let dst4 = lpm!(names::DST4_LPM, TARGETS);
        let dst6 = lpm!(names::DST6_LPM, TARGETS);
        let mut array = |name: &'static str, a: ArrayId| match take(name)? {
            aya::maps::Map::Array(data) => SlotArray::open(name, data, a.entries()),
            _ => Err(EnforceError::Load(format!("map {name} is not an array"))),
        };
        let arrays = [
            array(names::PROTO, ArrayId::Proto)?,
            array(names::SPORT, ArrayId::Sport)?,
            array(names::DPORT, ArrayId::Dport)?,
            array(names::ICMP_TYPE, ArrayId::Icmp)?,
        ];
        let exempt4 = lpm!(names::EXEMPT4, MAX_EXEMPT_PREFIXES);
        let exempt6 = lpm!(names::EXEMPT6, MAX_EXEMPT_PREFIXES);
        let configs = PerSlot {
            name: names::SLOTS,
            map: typed!(names::SLOTS),
        };
        let buckets = PerSlot {
            name: names::BUCKETS,
            map: typed!(names::BUCKETS),
        };
        let counters = PerCpu {
            name: names::COUNTERS,
            map: typed!(names::COUNTERS),
        };
        let stats = PerCpu {
            name: names::STATS,
            map: typed!(names::STATS),
        };
        Ok(Dataplane {
            dir: opts.bpffs.clone(),
            ebpf,
            limits: opts.limits,
            policy,
            src4,
            src6,
            src4_lpm,
            src6_lpm,
            dst4,
            dst6,
            arrays,
            exempt4,
            exempt6,
            configs,
            buckets,
            counters,
            stats,
            model: Model::default(),
            in_sync: false,
            written: Policy::default(),
            exempt_present: 0,
        })
        .and_then(|mut dp| {
            // The exempt list of an earlier run stays until set again.
            let exempt = dp.read_exempt()?;
            dp.set_exempt(&exempt)?;
            Ok(dp)
        })
    }

    /// The never-dropped prefixes the tries hold.
    fn read_exempt(&self) -> Result<Vec<ipnet::IpNet>, EnforceError> {
        use crate::enforce::maps::PrefixMap;
        let mut out = Vec::new();
        for p in self.exempt4.read()?.keys() {
            let addr = std::net::Ipv4Addr::from(p.bits as u32);
            out.extend(ipnet::Ipv4Net::new(addr, p.len).ok().map(ipnet::IpNet::V4));
        }
        for p in self.exempt6.read()?.keys() {
            let addr = std::net::Ipv6Addr::from(p.bits);
            out.extend(ipnet::Ipv6Net::new(addr, p.len).ok().map(ipnet::IpNet::V6));
        }
        out.sort();
        Ok(out)
    }

    /// The program's own log (aya-log): the slots the kernel ended at their
    /// expiry. Taken once; `flush` on the returned reader writes the waiting
    /// records to `logger`.
    pub fn kernel_log<T: log::Log>(
        &mut self,
        logger: T,
    ) -> Result<aya_log::EbpfLogger<T>, EnforceError> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, logger)
            .map_err(|e| EnforceError::Load(format!("the program's log (aya-log): {e}")))
    }

    /// The bpffs directory this classifier is pinned under.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// When `slot` expires, as the kernel holds it (`CLOCK_BOOTTIME` ns; 0
    /// for a slot never configured).
    pub fn expiry(&self, slot: SlotId) -> Result<u64, EnforceError> {
        Ok(self.configs.get(slot)?.expires_ns)
    }

    /// Counters of `slot`, summed over CPUs.
    pub fn counters(&self, slot: SlotId) -> Result<SlotCounters, EnforceError> {
        self.counters.total(u32::from(slot))
    }

    pub fn stats(&self) -> Result<DataplaneStats, EnforceError> {
        Ok(DataplaneStats {
            unparsed: self.stats.total(stats::UNPARSED)?,
            exempt: self.stats.total(stats::EXEMPT)?,
            dropped: self.stats.total(stats::DROPPED)?,
            monitored: self.stats.total(stats::MONITORED)?,
            conforming: self.stats.total(stats::CONFORMING)?,
        })
    }

    /// The loaded classifier program, for `BPF_PROG_TEST_RUN`.
    pub fn program_fd(&mut self) -> Result<std::os::fd::OwnedFd, EnforceError> {
        program_fd(&mut self.ebpf, names::PROGRAM)
    }

    /// Loads the empty XDP program shipped beside the classifier (the
    /// benchmark's baseline) and returns its fd.
    pub fn pass_program_fd(&mut self) -> Result<std::os::fd::OwnedFd, EnforceError> {
        let program: &mut Xdp = xdp_program(&mut self.ebpf, names::PASS_PROGRAM)?;
        if program.fd().is_err() {
            load_program(program, names::PASS_PROGRAM)?;
        }
        program_fd(&mut self.ebpf, names::PASS_PROGRAM)
    }
}

/// Loads `program`, again when the kernel answers EAGAIN: the verifier
/// gives up on a long verification when a signal is pending for the
/// process (a child exiting, a SIGHUP), and the classifier takes long to
/// verify. libbpf retries the same way, as many times.
fn load_program(program: &mut Xdp, name: &str) -> Result<(), EnforceError> {
    const ATTEMPTS: usize = 5;
    let mut attempt = 1;
    loop {
        match program.load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < ATTEMPTS =>
            {
                attempt += 1;
            }
            other => return other.map_err(|e| load_error_program(e, name)),
        }
    }
}

/// Key size, value size and entries each pinned map must have: a pin left
/// by a version with another layout would be adopted as it is (aya checks
/// nothing) and fail in the verifier, or worse.
fn expected_layout(name: &str) -> Option<(u32, u32, u32)> {
    use dots_common::{
        Bucket, Ipv4Key, Ipv6Key, SlotConfig, SourceEntry, MAX_SLOTS, MAX_SOURCE_PREFIXES,
        MAX_TARGET_PREFIXES,
    };
    use std::mem::size_of;
    let size = |n: usize| n as u32;
    // LPM trie keys are the 4-byte prefix length and the data.
    let lpm = |data: usize| size(4 + data);
    let mask = size(size_of::<SlotMask>());
    let slots = MAX_SLOTS as u32;
    Some(match name {
        names::POLICY => (4, size(size_of::<Policy>()), 1),
        names::SRC4 => (
            size(size_of::<dots_common::Source4Key>()),
            size(size_of::<SourceEntry>()),
            MAX_SOURCE_PREFIXES,
        ),
        names::SRC6 => (
            size(size_of::<dots_common::Source6Key>()),
            size(size_of::<SourceEntry>()),
            MAX_SOURCE_PREFIXES,
        ),
        names::SRC4_LPM => (
            lpm(size_of::<Ipv4Key>()),
            size(size_of::<SourceEntry>()),
            MAX_SOURCE_PREFIXES,
        ),
        names::SRC6_LPM => (
            lpm(size_of::<Ipv6Key>()),
            size(size_of::<SourceEntry>()),
            MAX_SOURCE_PREFIXES,
        ),
        names::DST4_LPM => (lpm(size_of::<Ipv4Key>()), mask, MAX_TARGET_PREFIXES),
        names::DST6_LPM => (lpm(size_of::<Ipv6Key>()), mask, MAX_TARGET_PREFIXES),
        names::PROTO | names::ICMP_TYPE => (4, mask, 256),
        names::SPORT | names::DPORT => (4, mask, 65536),
        names::EXEMPT4 => (lpm(size_of::<Ipv4Key>()), 1, MAX_EXEMPT_PREFIXES),
        names::EXEMPT6 => (lpm(size_of::<Ipv6Key>()), 1, MAX_EXEMPT_PREFIXES),
        names::SLOTS => (4, size(size_of::<SlotConfig>()), slots),
        names::BUCKETS => (4, size(size_of::<Bucket>()), slots),
        names::COUNTERS => (4, size(size_of::<SlotCounters>()), slots),
        names::STATS => (4, 8, stats::COUNT),
        _ => return None,
    })
}

/// Refuses pins of another layout under `dir`, saying how to clear them.
fn check_pinned_layouts(dir: &Path) -> Result<(), EnforceError> {
    for name in names::ALL_MAPS {
        let pin = dir.join(name);
        if !pin.exists() {
            continue;
        }
        let (Ok(found), Some(want)) = (sys::pinned_map_layout(&pin), expected_layout(name)) else {
            continue;
        };
        if found != want {
            return Err(EnforceError::Load(format!(
                "pinned map {} has key size {}, value size {} and {} entries, this version needs {}, {} and {}: \
                 it was left by another version of dots-agent; stop that agent and run \
                 `dots-agent detach --bpffs {}` (its mitigations come back from the state directory)",
                pin.display(),
                found.0,
                found.1,
                found.2,
                want.0,
                want.1,
                want.2,
                dir.display()
            )));
        }
    }
    Ok(())
}

fn program_fd(ebpf: &mut Ebpf, name: &str) -> Result<std::os::fd::OwnedFd, EnforceError> {
    let program: &mut Xdp = xdp_program(ebpf, name)?;
    let fd = program.fd().map_err(|e| load_error_program(e, name))?;
    fd.as_fd()
        .try_clone_to_owned()
        .map_err(|e| io_error("duplicating the fd of", Path::new(name), e))
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp, EnforceError> {
    ebpf.program_mut(name)
        .ok_or_else(|| EnforceError::Load(format!("program {name} missing from the object")))?
        .try_into()
        .map_err(|e: ProgramError| EnforceError::Load(format!("program {name}: {e}")))
}
