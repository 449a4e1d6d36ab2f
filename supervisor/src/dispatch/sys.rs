//! The raw syscalls of `dispatch` that aya 0.14 does not offer: the sockmap with
//! an 8-byte value (insert by fd, delete, lookup → socket cookie), batched array
//! updates, BPF_PROG_TEST_RUN for sk_lookup, walking the kernel's BPF links
//! (next id, fd by id, link and program info: aya's `LinkInfo` has no netns
//! fields), and membarrier to wait out an RCU grace period. Nothing else in
//! `dispatch` calls `libc::syscall`.

use std::ffi::CString;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `BPF_LINK_TYPE_NETNS` (enum bpf_link_type).
pub const LINK_TYPE_NETNS: u32 = 5;
/// `BPF_SK_LOOKUP` (enum bpf_attach_type).
pub const ATTACH_SK_LOOKUP: u32 = 36;

/// `BPF_ANY`: create or replace.
const BPF_ANY: u64 = 0;

/// `union bpf_attr` for BPF_MAP_*_ELEM.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for BPF_OBJ_GET.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr` for BPF_LINK_DETACH.
#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// `union bpf_attr` for BPF_*_GET_NEXT_ID and BPF_*_GET_FD_BY_ID.
#[repr(C)]
#[derive(Default)]
struct IdAttr {
    start_id: u32,
    next_id: u32,
    open_flags: u32,
}

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_link_info` with its netns member (the union
/// starts at offset 16: other members hold 8-byte fields).
#[repr(C)]
#[derive(Default)]
struct RawLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    netns_ino: u32,
    attach_type: u32,
}

/// The head of `struct bpf_prog_info`, up to and including `name`.
#[repr(C)]
#[derive(Default)]
struct RawProgInfo {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
    jited_prog_len: u32,
    xlated_prog_len: u32,
    jited_prog_insns: u64,
    xlated_prog_insns: u64,
    load_time: u64,
    created_by_uid: u32,
    nr_map_ids: u32,
    map_ids: u64,
    name: [u8; 16],
}

const _: () = assert!(size_of::<RawLinkInfo>() == 24);
const _: () = assert!(size_of::<RawProgInfo>() == 80);

/// `union bpf_attr` for BPF_MAP_*_BATCH.
#[repr(C)]
#[derive(Default)]
struct MapBatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `union bpf_attr` for BPF_PROG_TEST_RUN.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `struct bpf_sk_lookup` as BPF_PROG_TEST_RUN takes it. Every byte, padding
/// included, is a named field so that `Default` zeroes all of it: the kernel
/// rejects a context whose bytes after `local_port` are not zero.
#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct SkLookupCtx {
    pub cookie: u64,
    pub family: u32,
    pub protocol: u32,
    pub remote_ip4: u32,
    pub remote_ip6: [u32; 4],
    pub remote_port: u16,
    pub _pad: u16,
    pub local_ip4: u32,
    pub local_ip6: [u32; 4],
    pub local_port: u32,
    pub ingress_ifindex: u32,
    pub _tail: u32,
}

const _: () = assert!(size_of::<SkLookupCtx>() == 72);
const _: () = assert!(size_of::<TestRunAttr>() == 80);

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, fully initialised `union bpf_attr` prefix of
    // `size_of::<T>()` bytes for `cmd`; the pointers inside it were set by the
    // callers to buffers that outlive this call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens the BPF object pinned at `path` (BPF_OBJ_GET); the fd is CLOEXEC.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new fd (O_CLOEXEC, as every bpf() fd) that
    // nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Detaches a link now (BPF_LINK_DETACH), rather than when its last reference
/// goes, which the kernel does asynchronously.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// What the kernel says of one BPF link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub link_type: u32,
    pub prog_id: u32,
    /// For a netns link: the inode of its network namespace (0 once it is gone).
    pub netns_ino: u32,
    /// For a netns link: its attach type.
    pub attach_type: u32,
}

/// The id of the next BPF link after `id` (0 starts), `None` after the last.
pub fn link_next_id(id: u32) -> io::Result<Option<u32>> {
    let mut attr = IdAttr {
        start_id: id,
        ..Default::default()
    };
    match bpf(BPF_LINK_GET_NEXT_ID, &mut attr) {
        Ok(_) => Ok(Some(attr.next_id)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens the BPF link `id` (CLOEXEC); `None` if it went away meanwhile.
pub fn link_by_id(id: u32) -> io::Result<Option<OwnedFd>> {
    fd_by_id(BPF_LINK_GET_FD_BY_ID, id)
}

/// Opens the BPF program `id` (CLOEXEC); `None` if it went away meanwhile.
pub fn prog_by_id(id: u32) -> io::Result<Option<OwnedFd>> {
    fd_by_id(BPF_PROG_GET_FD_BY_ID, id)
}

fn fd_by_id(cmd: libc::c_long, id: u32) -> io::Result<Option<OwnedFd>> {
    let mut attr = IdAttr {
        start_id: id,
        ..Default::default()
    };
    match bpf(cmd, &mut attr) {
        // SAFETY: the kernel returned a new fd (O_CLOEXEC, as every bpf() fd)
        // that nothing else owns.
        Ok(fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn obj_info<T>(fd: BorrowedFd<'_>, info: &mut T) -> io::Result<()> {
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<T>() as u32,
        info: info as *mut T as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
}

/// BPF_OBJ_GET_INFO_BY_FD on a link.
pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut raw = RawLinkInfo::default();
    obj_info(link, &mut raw)?;
    let netns = raw.link_type == LINK_TYPE_NETNS;
    Ok(LinkInfo {
        id: raw.id,
        link_type: raw.link_type,
        prog_id: raw.prog_id,
        netns_ino: if netns { raw.netns_ino } else { 0 },
        attach_type: if netns { raw.attach_type } else { 0 },
    })
}

/// The name of a program (at most 15 bytes: the kernel's BPF_OBJ_NAME_LEN).
pub fn prog_name(prog: BorrowedFd<'_>) -> io::Result<String> {
    let mut raw = RawProgInfo::default();
    obj_info(prog, &mut raw)?;
    let len = raw
        .name
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(raw.name.len());
    Ok(String::from_utf8_lossy(&raw.name[..len]).into_owned())
}

/// Puts the socket `sock` in the sockmap `map` at `index`.
pub fn sockmap_insert(map: BorrowedFd<'_>, index: u32, sock: BorrowedFd<'_>) -> io::Result<()> {
    let value =
        u64::try_from(sock.as_raw_fd()).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: &index as *const u32 as u64,
        value: &value as *const u64 as u64,
        flags: BPF_ANY,
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Removes `index` from the sockmap `map`; absent is not an error.
pub fn sockmap_remove(map: BorrowedFd<'_>, index: u32) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: &index as *const u32 as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r.map(drop),
    }
}

/// The cookie of the socket at `index` in the sockmap `map`, `None` when empty.
pub fn sockmap_cookie(map: BorrowedFd<'_>, index: u32) -> io::Result<Option<u64>> {
    let mut cookie = 0u64;
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: &index as *const u32 as u64,
        value: &mut cookie as *mut u64 as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(Some(cookie)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `values[i]` at `keys[i]` in the array `map`, whose values are `V`s
/// (`V` a plain `repr(C)` value of the map's value size, e.g. `u32` or
/// `Bucket`), in one BPF_MAP_UPDATE_BATCH per chunk.
pub fn array_update_batch<V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[u32],
    values: &[V],
) -> io::Result<()> {
    assert_eq!(keys.len(), values.len());
    for (k, v) in keys.chunks(1 << 16).zip(values.chunks(1 << 16)) {
        let mut attr = MapBatchAttr {
            keys: k.as_ptr() as u64,
            values: v.as_ptr() as u64,
            count: k.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
        if attr.count as usize != k.len() {
            return Err(io::Error::other(format!(
                "batch update wrote {} of {} entries",
                attr.count,
                k.len()
            )));
        }
    }
    Ok(())
}

/// Result of one BPF_PROG_TEST_RUN.
#[derive(Debug, Clone, Copy)]
pub struct TestRun {
    /// The program's return value of the last run.
    pub retval: u32,
    /// Mean nanoseconds per run, as the kernel measured it.
    pub ns_per_run: u32,
    /// Cookie of the socket selected in the last run, 0 for none.
    pub cookie: u64,
}

/// Runs the sk_lookup program `prog` `repeat` times on `ctx`.
pub fn test_run_sk_lookup(
    prog: BorrowedFd<'_>,
    ctx: &SkLookupCtx,
    repeat: u32,
) -> io::Result<TestRun> {
    let ctx_in = *ctx;
    let mut ctx_out = SkLookupCtx::default();
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        repeat,
        ctx_size_in: size_of::<SkLookupCtx>() as u32,
        ctx_size_out: size_of::<SkLookupCtx>() as u32,
        ctx_in: &ctx_in as *const SkLookupCtx as u64,
        ctx_out: &mut ctx_out as *mut SkLookupCtx as u64,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(TestRun {
        retval: attr.retval,
        ns_per_run: attr.duration,
        cookie: ctx_out.cookie,
    })
}

/// Waits until every CPU has passed a quiescent state, i.e. every BPF program
/// run that started before this call has finished (sk_lookup programs run in
/// RCU read-side critical sections). `MEMBARRIER_CMD_GLOBAL` is
/// `synchronize_rcu()` in the kernel.
pub fn wait_for_running_programs() -> io::Result<()> {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers.
    let ret = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The cookie of a socket (SO_COOKIE).
pub fn socket_cookie(sock: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(cookie)
    }
}
