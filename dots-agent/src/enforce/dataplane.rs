//! Loading, pinning and attaching the XDP classifier, and applying slots.
//!
//! Maps are pinned by name under the bpffs directory and re-used when they
//! are already there, so a restarted agent adopts the running classifier
//! instead of replacing it: enforcement never stops across restarts. The XDP
//! link is pinned too, so drops continue after the process exits until
//! [`Dataplane::teardown`] removes everything.

use std::{
    collections::{BTreeMap, HashMap},
    ffi::CString,
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, MapData},
    programs::{links::FdLink, ProgramError, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use dots_common::{flags, names, stats, Policy, SlotCounters, SlotMask, MAX_EXEMPT_PREFIXES};
use ipnet::IpNet;

use super::{
    maps::{Codec, Exact, IcmpType, Lpm, PerCpu, Port, PrefixMap, Protocols, V4, V6},
    plan::{diff, policy_touched, Contents, Prefix, Table},
    spec::{SlotId, SlotLimits, SlotSpec},
    EnforceError, DEFAULT_BPFFS_DIR,
};

/// The XDP object built by build.rs from `dots-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dots-ebpf"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const LINK_PREFIX: &str = "link_";

/// How to attach to an interface.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic mode if the driver refuses.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode only.
    Generic,
}

/// One interface the classifier runs on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Attachment {
    pub iface: String,
    /// "native", "generic", or "pinned" for a link adopted from an earlier run.
    pub mode: &'static str,
    pub pin: PathBuf,
}

#[derive(Clone, Debug)]
pub struct DataplaneOptions {
    /// bpffs directory for the pinned maps and links.
    pub bpffs: PathBuf,
    /// Level of the XDP program's own log statements (aya-log); levels above
    /// it are removed by the verifier and cost nothing.
    pub ebpf_log_level: log::LevelFilter,
    pub limits: SlotLimits,
}

impl Default for DataplaneOptions {
    fn default() -> Self {
        DataplaneOptions {
            bpffs: PathBuf::from(DEFAULT_BPFFS_DIR),
            ebpf_log_level: log::LevelFilter::Info,
            limits: SlotLimits::default(),
        }
    }
}

/// What an apply step changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Slots that start enforcing (their counters start at zero).
    pub activated: Vec<SlotId>,
    /// Slots that stopped enforcing.
    pub deactivated: Vec<SlotId>,
    /// Map entries written or deleted.
    pub writes: usize,
}

/// Classifier-wide packet statistics (see `dots_common::stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DataplaneStats {
    pub unparsed: u64,
    pub exempt: u64,
    pub dropped: u64,
}

/// The loaded classifier and its maps.
pub struct Dataplane {
    dir: PathBuf,
    ebpf: Ebpf,
    limits: SlotLimits,
    policy: Array<MapData, Policy>,
    src4_exact: Exact<V4>,
    src6_exact: Exact<V6>,
    src4_lpm: Lpm<V4, SlotMask>,
    src6_lpm: Lpm<V6, SlotMask>,
    dst4: Lpm<V4, SlotMask>,
    dst6: Lpm<V6, SlotMask>,
    sport: Lpm<Port, SlotMask>,
    dport: Lpm<Port, SlotMask>,
    icmp_type: Lpm<IcmpType, SlotMask>,
    proto: Protocols,
    exempt4: Lpm<V4, u8>,
    exempt6: Lpm<V6, u8>,
    counters: PerCpu<SlotCounters>,
    stats: PerCpu<u64>,
    /// What the maps hold after the last successful apply; `None` means
    /// "read them back from the kernel first" (after open, or after an error).
    mirror: Option<Contents>,
}

impl Dataplane {
    /// Loads the classifier, creating or adopting the pinned maps.
    pub fn open(opts: &DataplaneOptions) -> Result<Dataplane, EnforceError> {
        check_bpffs(&opts.bpffs)?;
        fs::create_dir_all(&opts.bpffs)
            .map_err(|source| io_error("creating", &opts.bpffs, source))?;
        let level = log_level_byte(opts.ebpf_log_level);
        let mut loader = EbpfLoader::new();
        let pins: Vec<PathBuf> = names::ALL_MAPS.iter().map(|n| opts.bpffs.join(n)).collect();
        for (name, pin) in names::ALL_MAPS.iter().zip(&pins) {
            loader.map_pin_path(name, pin.as_path());
        }
        loader.override_global("AYA_LOG_LEVEL", &level, false);
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(load_error)?;
        let program: &mut Xdp = xdp_program(&mut ebpf, names::PROGRAM)?;
        program
            .load()
            .map_err(|e| load_error_program(e, names::PROGRAM))?;

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
        use dots_common::{
            MAX_RANGE_PREFIXES as RANGES, MAX_SOURCE_PREFIXES as SOURCES,
            MAX_TARGET_PREFIXES as TARGETS,
        };
        let policy = typed!(names::POLICY);
        let src4_exact = Exact {
            name: names::SRC4_EXACT,
            capacity: SOURCES,
            map: typed!(names::SRC4_EXACT),
        };
        let src6_exact = Exact {
            name: names::SRC6_EXACT,
            capacity: SOURCES,
            map: typed!(names::SRC6_EXACT),
        };
        let src4_lpm = lpm!(names::SRC4_LPM, SOURCES);
        let src6_lpm = lpm!(names::SRC6_LPM, SOURCES);
        let dst4 = lpm!(names::DST4_LPM, TARGETS);
        let dst6 = lpm!(names::DST6_LPM, TARGETS);
        let sport = lpm!(names::SPORT, RANGES);
        let dport = lpm!(names::DPORT, RANGES);
        let icmp_type = lpm!(names::ICMP_TYPE, RANGES);
        let proto = Protocols {
            map: typed!(names::PROTO),
        };
        let exempt4 = lpm!(names::EXEMPT4, MAX_EXEMPT_PREFIXES);
        let exempt6 = lpm!(names::EXEMPT6, MAX_EXEMPT_PREFIXES);
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
            src4_exact,
            src6_exact,
            src4_lpm,
            src6_lpm,
            dst4,
            dst6,
            sport,
            dport,
            icmp_type,
            proto,
            exempt4,
            exempt6,
            counters,
            stats,
            mirror: None,
        })
    }

    /// The bpffs directory this classifier is pinned under.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The aya object, e.g. to start an `aya_log::EbpfLogger` on it.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Attaches the classifier to `iface` and pins the link. A link pinned by
    /// an earlier run is adopted as it is.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<Attachment, EnforceError> {
        let pin = self.dir.join(format!("{LINK_PREFIX}{iface}"));
        if pin.exists() {
            return Ok(Attachment {
                iface: iface.to_string(),
                mode: "pinned",
                pin,
            });
        }
        if_index(iface)?;
        let modes: &[(XdpMode, &'static str)] = match mode {
            AttachMode::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
            AttachMode::Native => &[(XdpMode::Driver, "native")],
            AttachMode::Generic => &[(XdpMode::Skb, "generic")],
        };
        let program: &mut Xdp = xdp_program(&mut self.ebpf, names::PROGRAM)?;
        let mut last = None;
        for &(xdp_mode, mode_name) in modes {
            match program.attach(iface, xdp_mode) {
                Ok(id) => {
                    let attach_error = |source| EnforceError::Attach {
                        iface: iface.to_string(),
                        mode: mode_name,
                        source,
                    };
                    let link = program.take_link(id).map_err(attach_error)?;
                    let link = FdLink::try_from(link).map_err(|e| {
                        EnforceError::Load(format!("XDP link of {iface} is not a bpf_link: {e}"))
                    })?;
                    link.pin(&pin).map_err(|e| {
                        EnforceError::Load(format!("pinning {}: {e}", pin.display()))
                    })?;
                    return Ok(Attachment {
                        iface: iface.to_string(),
                        mode: mode_name,
                        pin,
                    });
                }
                Err(source) => last = Some((mode_name, source)),
            }
        }
        let (mode_name, source) = last.expect("at least one mode is tried");
        Err(attach_failure(iface, mode_name, source))
    }

    /// Detaches from `iface` (removing its pinned link). Not attached is fine.
    pub fn detach(&mut self, iface: &str) -> Result<bool, EnforceError> {
        detach_pin(&self.dir.join(format!("{LINK_PREFIX}{iface}")))
    }

    /// Interfaces with a pinned link under `dir`.
    pub fn attachments(dir: &Path) -> Vec<String> {
        let Ok(entries) = fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out: Vec<String> = entries
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_prefix(LINK_PREFIX)
                    .map(String::from)
            })
            .collect();
        out.sort();
        out
    }

    /// Detaches every interface and unpins every map under `dir`: enforcement
    /// stops and the kernel frees the classifier. Returns the pins removed.
    pub fn teardown(dir: &Path) -> Result<usize, EnforceError> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_error("reading", dir, e)),
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(|e| io_error("reading", dir, e))?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with(LINK_PREFIX) {
                detach_pin(&path)?;
            } else {
                fs::remove_file(&path).map_err(|e| io_error("unpinning", &path, e))?;
            }
            removed += 1;
        }
        fs::remove_dir(dir).map_err(|e| io_error("removing", dir, e))?;
        Ok(removed)
    }

    /// Makes the classifier enforce exactly `desired`, writing only what
    /// differs. Idempotent. A slot is switched on only once all its entries are
    /// in place, and switched off before any of its entries change, so no
    /// packet ever sees a half-installed slot. Invalid slots or a lack of map
    /// capacity are reported before anything is written.
    pub fn apply(
        &mut self,
        desired: &BTreeMap<SlotId, SlotSpec>,
    ) -> Result<ApplyReport, EnforceError> {
        for (slot, spec) in desired {
            spec.check(*slot, &self.limits)?;
        }
        let want = Contents::build(desired);
        self.check_capacity(&want)?;
        let have = match self.mirror.take() {
            Some(m) => m,
            None => self.read_contents()?,
        };
        let (report, policy) = self.write(&want, &have)?;
        self.mirror = Some(Contents { policy, ..want });
        Ok(report)
    }

    fn check_capacity(&self, want: &Contents) -> Result<(), EnforceError> {
        let tables: [(&dyn PrefixMap<SlotMask>, &Table); 9] = [
            (&self.src4_exact, &want.src4_exact),
            (&self.src6_exact, &want.src6_exact),
            (&self.src4_lpm, &want.src4_lpm),
            (&self.src6_lpm, &want.src6_lpm),
            (&self.dst4, &want.dst4),
            (&self.dst6, &want.dst6),
            (&self.sport, &want.sport),
            (&self.dport, &want.dport),
            (&self.icmp_type, &want.icmp_type),
        ];
        for (map, table) in tables {
            if table.len() > map.capacity() as usize {
                return Err(EnforceError::MapFull {
                    map: map.name(),
                    needed: table.len(),
                    capacity: map.capacity(),
                });
            }
        }
        Ok(())
    }

    fn read_contents(&self) -> Result<Contents, EnforceError> {
        let policy = self
            .policy
            .get(&0, 0)
            .map_err(EnforceError::map(names::POLICY))?;
        Ok(Contents {
            slots: policy.active,
            policy,
            src4_exact: self.src4_exact.read()?,
            src6_exact: self.src6_exact.read()?,
            src4_lpm: self.src4_lpm.read()?,
            src6_lpm: self.src6_lpm.read()?,
            dst4: self.dst4.read()?,
            dst6: self.dst6.read()?,
            proto: self.proto.read()?,
            sport: self.sport.read()?,
            dport: self.dport.read()?,
            icmp_type: self.icmp_type.read()?,
        })
    }

    /// Writes the differences; returns the report and the final policy.
    fn write(
        &mut self,
        want: &Contents,
        have: &Contents,
    ) -> Result<(ApplyReport, Policy), EnforceError> {
        let diffs = [
            diff(&want.src4_exact, &have.src4_exact),
            diff(&want.src6_exact, &have.src6_exact),
            diff(&want.src4_lpm, &have.src4_lpm),
            diff(&want.src6_lpm, &have.src6_lpm),
            diff(&want.dst4, &have.dst4),
            diff(&want.dst6, &have.dst6),
            diff(&want.sport, &have.sport),
            diff(&want.dport, &have.dport),
            diff(&want.icmp_type, &have.icmp_type),
        ];
        let proto_want: HashMap<u8, SlotMask> = want.proto.iter().map(|(k, v)| (*k, *v)).collect();
        let proto_have: HashMap<u8, SlotMask> = have.proto.iter().map(|(k, v)| (*k, *v)).collect();
        let proto_diff = diff(&proto_want, &proto_have);
        let touched = diffs
            .iter()
            .fold(proto_diff.touched, |acc, d| acc.or(&d.touched))
            .or(&policy_touched(&want.policy, &have.policy));

        let active_now = have.policy.active;
        let changed = touched.and(&active_now);
        // Still active during the writes: active before, wanted after, untouched.
        let keep = active_now.and(&want.slots).and(&not(&changed));
        let mut report = ApplyReport::default();
        // Flags of the exempt list are not the slots' business: keep them.
        let flags = (want.policy.flags & !flags::EXEMPT) | (have.policy.flags & flags::EXEMPT);
        let mut step = Policy {
            active: keep,
            flags,
            ..want.policy
        };
        let mut written = have.policy;
        if step != written {
            self.set_policy(&step)?;
            written = step;
        }
        let maps: [&mut dyn PrefixMap<SlotMask>; 9] = [
            &mut self.src4_exact,
            &mut self.src6_exact,
            &mut self.src4_lpm,
            &mut self.src6_lpm,
            &mut self.dst4,
            &mut self.dst6,
            &mut self.sport,
            &mut self.dport,
            &mut self.icmp_type,
        ];
        for (map, d) in maps.into_iter().zip(&diffs) {
            for (p, m) in &d.upserts {
                map.upsert(*p, *m)?;
            }
            for p in &d.deletes {
                map.delete(*p)?;
            }
            report.writes += d.upserts.len() + d.deletes.len();
        }
        for (p, m) in &proto_diff.upserts {
            self.proto.set(*p, *m)?;
        }
        for p in &proto_diff.deletes {
            self.proto.set(*p, SlotMask::EMPTY)?;
        }
        report.writes += proto_diff.upserts.len() + proto_diff.deletes.len();

        let activating = want.slots.and(&not(&keep));
        for slot in slots_of(&activating) {
            self.counters.reset(u32::from(slot))?;
        }
        step.active = want.slots;
        if step != written {
            self.set_policy(&step)?;
        }
        report.activated = slots_of(&activating);
        report.deactivated = slots_of(&active_now.and(&not(&keep)));
        Ok((report, step))
    }

    fn set_policy(&mut self, p: &Policy) -> Result<(), EnforceError> {
        self.policy
            .set(0, p, 0)
            .map_err(EnforceError::map(names::POLICY))
    }

    /// Slots currently enforced, as the kernel sees them.
    pub fn active_slots(&self) -> Result<Vec<SlotId>, EnforceError> {
        let p = self
            .policy
            .get(&0, 0)
            .map_err(EnforceError::map(names::POLICY))?;
        Ok(slots_of(&p.active))
    }

    /// Sets the prefixes that are never dropped, whatever a slot says.
    pub fn set_exempt(&mut self, prefixes: &[IpNet]) -> Result<(), EnforceError> {
        if prefixes.len() > MAX_EXEMPT_PREFIXES as usize {
            return Err(EnforceError::MapFull {
                map: names::EXEMPT4,
                needed: prefixes.len(),
                capacity: MAX_EXEMPT_PREFIXES,
            });
        }
        let (v4, v6): (Vec<&IpNet>, Vec<&IpNet>) =
            prefixes.iter().partition(|p| matches!(p, IpNet::V4(_)));
        // Entries first, then the flags that make the program look at them.
        sync_exempt(&mut self.exempt4, &v4)?;
        sync_exempt(&mut self.exempt6, &v6)?;
        let mut policy = self
            .policy
            .get(&0, 0)
            .map_err(EnforceError::map(names::POLICY))?;
        let mut exempt = 0;
        if !v4.is_empty() {
            exempt |= flags::EXEMPT4;
        }
        if !v6.is_empty() {
            exempt |= flags::EXEMPT6;
        }
        if policy.flags & flags::EXEMPT != exempt {
            policy.flags = (policy.flags & !flags::EXEMPT) | exempt;
            self.set_policy(&policy)?;
            if let Some(m) = &mut self.mirror {
                m.policy.flags = policy.flags;
            }
        }
        Ok(())
    }

    /// Drop counters of `slot`, summed over CPUs.
    pub fn counters(&self, slot: SlotId) -> Result<SlotCounters, EnforceError> {
        self.counters.total(u32::from(slot))
    }

    pub fn stats(&self) -> Result<DataplaneStats, EnforceError> {
        Ok(DataplaneStats {
            unparsed: self.stats.total(stats::UNPARSED)?,
            exempt: self.stats.total(stats::EXEMPT)?,
            dropped: self.stats.total(stats::DROPPED)?,
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
            program
                .load()
                .map_err(|e| load_error_program(e, names::PASS_PROGRAM))?;
        }
        program_fd(&mut self.ebpf, names::PASS_PROGRAM)
    }
}

fn program_fd(ebpf: &mut Ebpf, name: &str) -> Result<std::os::fd::OwnedFd, EnforceError> {
    let program: &mut Xdp = xdp_program(ebpf, name)?;
    let fd = program.fd().map_err(|e| load_error_program(e, name))?;
    fd.as_fd()
        .try_clone_to_owned()
        .map_err(|e| io_error("duplicating the fd of", Path::new(name), e))
}

fn sync_exempt<C: Codec>(map: &mut Lpm<C, u8>, prefixes: &[&IpNet]) -> Result<(), EnforceError> {
    let want: HashMap<Prefix, u8> = prefixes
        .iter()
        .map(|p| {
            let bits = match p.network() {
                std::net::IpAddr::V4(a) => u128::from(u32::from(a)),
                std::net::IpAddr::V6(a) => u128::from(a),
            };
            (
                Prefix {
                    bits,
                    len: p.prefix_len(),
                },
                1u8,
            )
        })
        .collect();
    let have = map.read()?;
    for (p, v) in &want {
        if have.get(p) != Some(v) {
            map.upsert(*p, *v)?;
        }
    }
    for p in have.keys().filter(|p| !want.contains_key(p)) {
        map.delete(*p)?;
    }
    Ok(())
}

fn not(m: &SlotMask) -> SlotMask {
    SlotMask {
        bits: m.bits.map(|w| !w),
    }
}

fn slots_of(m: &SlotMask) -> Vec<SlotId> {
    (0..dots_common::MAX_SLOTS)
        .filter(|s| m.contains(*s))
        .map(|s| s as SlotId)
        .collect()
}

/// Detaches the link pinned at `pin` synchronously, then unpins it.
fn detach_pin(pin: &Path) -> Result<bool, EnforceError> {
    match super::sys::obj_get(pin) {
        Ok(fd) => super::sys::link_detach(fd.as_fd()).map_err(|e| io_error("detaching", pin, e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_error("opening", pin, e)),
    }
    match fs::remove_file(pin) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_error("unpinning", pin, e)),
    }
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp, EnforceError> {
    ebpf.program_mut(name)
        .ok_or_else(|| EnforceError::Load(format!("program {name} missing from the object")))?
        .try_into()
        .map_err(|e: ProgramError| EnforceError::Load(format!("program {name}: {e}")))
}

fn if_index(iface: &str) -> Result<u32, EnforceError> {
    let no_such = || EnforceError::NoSuchInterface {
        name: iface.to_string(),
    };
    let c = CString::new(iface).map_err(|_| no_such())?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(no_such()),
        i => Ok(i),
    }
}

/// bpffs must hold `dir` or, when it does not exist yet, its nearest ancestor.
fn check_bpffs(dir: &Path) -> Result<(), EnforceError> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let c = CString::new(existing.as_os_str().as_encoded_bytes()).map_err(|_| {
        EnforceError::BpffsNotMounted {
            path: dir.to_path_buf(),
        }
    })?;
    // SAFETY: statfs fills the zeroed struct; `c` outlives the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io_error(
            "inspecting",
            existing,
            std::io::Error::last_os_error(),
        ));
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        return Err(EnforceError::BpffsNotMounted {
            path: dir.to_path_buf(),
        });
    }
    Ok(())
}

fn io_error(action: &'static str, path: &Path, source: std::io::Error) -> EnforceError {
    if matches!(
        source.raw_os_error(),
        Some(libc::EPERM) | Some(libc::EACCES)
    ) {
        return EnforceError::NotPermitted {
            action: format!("{action} {}", path.display()),
        };
    }
    EnforceError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn is_eperm(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            // EPERM only: the verifier answers EACCES for programs it rejects.
            if io.raw_os_error() == Some(libc::EPERM) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

fn load_error(e: aya::EbpfError) -> EnforceError {
    if is_eperm(&e) {
        return EnforceError::NotPermitted {
            action: "loading the XDP object".into(),
        };
    }
    EnforceError::Load(format!("{e}: {}", chain(&e)))
}

fn load_error_program(e: ProgramError, name: &str) -> EnforceError {
    if is_eperm(&e) {
        return EnforceError::NotPermitted {
            action: format!("loading program {name}"),
        };
    }
    let verifier_log = match &e {
        ProgramError::LoadError { verifier_log, .. } => format!("\nverifier log:\n{verifier_log}"),
        _ => String::new(),
    };
    EnforceError::Load(format!("program {name}: {}{verifier_log}", chain(&e)))
}

fn attach_failure(iface: &str, mode: &'static str, source: ProgramError) -> EnforceError {
    if matches!(source, ProgramError::UnknownInterface { .. }) {
        return EnforceError::NoSuchInterface {
            name: iface.to_string(),
        };
    }
    if is_eperm(&source) {
        return EnforceError::NotPermitted {
            action: format!("attaching XDP to {iface}"),
        };
    }
    EnforceError::Attach {
        iface: iface.to_string(),
        mode,
        source,
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(err) = cur {
        parts.push(err.to_string());
        cur = err.source();
    }
    parts.join(": ")
}

/// aya-log's level byte: Error = 1 ... Trace = 5; 0 silences everything.
fn log_level_byte(level: log::LevelFilter) -> u8 {
    match level {
        log::LevelFilter::Off => 0,
        log::LevelFilter::Error => 1,
        log::LevelFilter::Warn => 2,
        log::LevelFilter::Info => 3,
        log::LevelFilter::Debug => 4,
        log::LevelFilter::Trace => 5,
    }
}
