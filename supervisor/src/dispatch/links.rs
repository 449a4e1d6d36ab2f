//! holdfast's sk_lookup links on a network namespace, found through the kernel
//! rather than through pins: every BPF link is walked (BPF_LINK_GET_NEXT_ID),
//! and a netns link of attach type sk_lookup on this namespace whose program is
//! named [`LOOKUP_PROGRAM`] is holdfast's, whichever mount namespace's bpffs
//! pinned it (`ip netns exec` gives each process its own). A holdfast that died
//! leaves such a link behind, its program still running over a sockmap that
//! only orphans may still fill; [`stale`] finds them so the new dispatcher can
//! detach them, leaving one holdfast link per namespace.

use std::os::fd::{AsFd, OwnedFd};

use holdfast_common::LOOKUP_PROGRAM;

use super::sys;
use super::DispatchError;

/// The kernel keeps BPF object names to 15 bytes (BPF_OBJ_NAME_LEN - 1).
const NAME_LEN: usize = 15;

/// One holdfast sk_lookup link, open.
#[derive(Debug)]
pub struct FoundLink {
    pub id: u32,
    pub prog_id: u32,
    pub fd: OwnedFd,
}

fn links_error(op: &'static str, id: u32) -> impl FnOnce(std::io::Error) -> DispatchError {
    move |source| DispatchError::Links { op, id, source }
}

/// Every holdfast sk_lookup link on the network namespace of inode
/// `netns_ino`, except link `except` (the caller's own).
pub fn stale(netns_ino: u64, except: Option<u32>) -> Result<Vec<FoundLink>, DispatchError> {
    let want = &LOOKUP_PROGRAM[..LOOKUP_PROGRAM.len().min(NAME_LEN)];
    let mut found = Vec::new();
    let mut id = 0;
    while let Some(next) = sys::link_next_id(id).map_err(links_error("walk", id))? {
        id = next;
        if Some(id) == except {
            continue;
        }
        // Links come and go meanwhile: one gone is skipped.
        let Some(fd) = sys::link_by_id(id).map_err(links_error("open", id))? else {
            continue;
        };
        let info = sys::link_info(fd.as_fd()).map_err(links_error("read", id))?;
        if info.link_type != sys::LINK_TYPE_NETNS
            || info.attach_type != sys::ATTACH_SK_LOOKUP
            || u64::from(info.netns_ino) != netns_ino
        {
            continue;
        }
        let Some(prog) =
            sys::prog_by_id(info.prog_id).map_err(links_error("open the program of", id))?
        else {
            continue;
        };
        if sys::prog_name(prog.as_fd()).map_err(links_error("read the program of", id))? == want {
            found.push(FoundLink {
                id,
                prog_id: info.prog_id,
                fd,
            });
        }
    }
    Ok(found)
}

/// Detaches a link now (its pins, wherever they are, then hold a dead link).
pub fn detach(link: &FoundLink) -> Result<(), DispatchError> {
    sys::link_detach(link.fd.as_fd()).map_err(links_error("detach", link.id))
}
