//! The vfs's decisions, one scenario each, against the in-process rig (`testkit`).

use super::testkit::{Fault, Kernel, PAGE, Rig, content};
use super::{Invalidation, LISTED_TREES};
use crate::error::FsError;
use crate::namespace::{INDEX_NAME, ROOT_INO};

const BIG: &str = "c/big/big-1.gpkg.tar";
const SMALL: &str = "c/small/small-1.gpkg.tar";
/// Large enough to be read sparse (more than `fetch::WHOLE_BELOW`).
const BIG_SIZE: usize = (2 << 20) + 3 * PAGE as usize + 100;

fn rig() -> Rig {
    Rig::new(&[(BIG, content(BIG_SIZE, 1)), (SMALL, content(300_000, 1))])
}

/// Issue 11.1: a scan's unchecked tail, then a verified whole fetch by someone else, then `cat`.
#[test]
fn unchecked_pages_are_dropped_when_the_file_is_verified_and_never_kept_before() {
    let rig = rig();
    let mut k = Kernel::default();
    rig.server.set_fault(BIG, Fault::LieRanges);
    let a = k.lookup(&rig, BIG).unwrap();
    let scan = k.open(&rig, a.ino).unwrap();
    assert!(!scan.keep_cache, "not verified yet");
    let tail = (a.size - 1) / PAGE;
    let lied = k.read_page(&rig, a.ino, &scan, tail).unwrap();
    let want = content(BIG_SIZE, 1);
    assert_ne!(lied, want[(tail * PAGE) as usize..], "the server lied");
    assert!(rig.vfs.has_unchecked_pages(a.ino));
    rig.vfs.release(scan.fh);
    rig.server.set_fault(BIG, Fault::Honest);
    rig.prefetch(BIG).unwrap();
    rig.settle();

    // Whatever the notifier did or did not do yet, an open now may not keep the lied pages.
    let d = rig.open(a.ino).unwrap();
    assert!(!d.keep_cache, "keep_cache granted over unchecked pages");
    rig.vfs.release(d.fh);
    // The verification itself ordered the drop.
    let invs = rig.take_invalidations();
    assert!(
        invs.iter()
            .any(|i| matches!(i, Invalidation::Pages { ino, .. } if *ino == a.ino)),
        "no page drop ordered: {invs:?}"
    );
    for inv in invs {
        if let Invalidation::Pages { ino, epoch } = inv {
            k.pages.remove(&ino);
            rig.vfs.pages_dropped(ino, epoch);
        }
    }
    assert!(!rig.vfs.has_unchecked_pages(a.ino));
    let cat = k.open(&rig, a.ino).unwrap();
    assert!(cat.keep_cache, "verified and clean: the kernel may keep it");
    assert!(k.read_all(&rig, a.ino, &cat, a.size).unwrap() == want);
}

#[test]
fn pages_of_a_failed_transfer_are_not_kept_for_the_next_good_one() {
    let rig = rig();
    let mut k = Kernel::default();
    rig.server.set_fault(SMALL, Fault::Lie);
    let a = k.lookup(&rig, SMALL).unwrap();
    let d = k.open(&rig, a.ino).unwrap();
    let early = k.read_page(&rig, a.ino, &d, 0);
    if let Err(e) = early {
        // The whole small file can be in (and failed) before this read on a fast machine:
        // then no unchecked page was ever served, and there is nothing to keep out.
        assert!(matches!(e, FsError::Fetch { .. }), "{e:?}");
        return;
    }
    let err = k.read_all(&rig, a.ino, &d, a.size).unwrap_err();
    assert!(matches!(err, FsError::Fetch { .. }), "{err:?}");
    rig.vfs.release(d.fh);
    rig.server.set_fault(SMALL, Fault::Honest);
    rig.prefetch(SMALL).unwrap();
    let d = rig.open(a.ino).unwrap();
    assert!(!d.keep_cache, "pages of the failed transfer would be kept");
}

/// Issue 11.2: a file opened before a refresh that drops it.
#[test]
fn an_inode_outlives_the_tree_it_came_from_until_forgotten() {
    let mut rig = rig();
    let mut k = Kernel::default();
    let a = k.lookup(&rig, SMALL).unwrap();
    let d = k.open(&rig, a.ino).unwrap();
    rig.publish(&[(BIG, content(BIG_SIZE, 1))]);
    rig.refresh();
    let invs = rig.take_invalidations();
    assert!(
        rig.vfs.current().node(a.ino).is_none(),
        "gone from the tree"
    );
    assert_eq!(rig.vfs.getattr(a.ino, Some(d.fh)).unwrap(), a);
    assert_eq!(
        rig.vfs.getattr(a.ino, None).unwrap(),
        a,
        "fstat of an open file"
    );
    assert!(k.read_all(&rig, a.ino, &d, a.size).unwrap() == content(300_000, 1));
    assert!(matches!(rig.lookup(SMALL), Err(FsError::NotFound)));
    assert!(
        invs.iter().any(
            |i| matches!(i, Invalidation::Entry { name, .. } if name.as_ref() == "small-1.gpkg.tar")
        ),
        "the stale name is not invalidated: {invs:?}"
    );
    assert!(
        !invs
            .iter()
            .any(|i| matches!(i, Invalidation::Entry { name, .. } if name.as_ref() == "big")),
        "an unchanged name was invalidated: {invs:?}"
    );
    rig.vfs.release(d.fh);
    assert!(rig.vfs.getattr(a.ino, None).is_ok(), "still looked up");
    rig.vfs.forget(a.ino, k.lookups[&a.ino]);
    assert!(matches!(
        rig.vfs.getattr(a.ino, None),
        Err(FsError::NotFound)
    ));
    assert!(!rig.vfs.holds(a.ino));
}

#[test]
fn the_served_index_answers_from_its_handle_and_its_name_moves_at_a_swap() {
    let mut rig = rig();
    let mut k = Kernel::default();
    let old = k.lookup(&rig, INDEX_NAME).unwrap();
    let d = k.open(&rig, old.ino).unwrap();
    assert!(d.keep_cache);
    let before = k.read_all(&rig, old.ino, &d, old.size).unwrap();
    rig.publish(&[(SMALL, content(300_000, 1)), (BIG, content(BIG_SIZE, 1))]);
    rig.refresh();
    assert_eq!(rig.vfs.getattr(old.ino, Some(d.fh)).unwrap(), old);
    assert_eq!(rig.vfs.getattr(old.ino, None).unwrap(), old);
    assert_eq!(rig.read(d.fh, 0, old.size as u32).unwrap(), before);
    assert!(rig.take_invalidations().contains(&Invalidation::Entry {
        parent: ROOT_INO,
        name: INDEX_NAME.into()
    }));
    let new = rig.lookup(INDEX_NAME).unwrap();
    assert_ne!(new.ino, old.ino, "the new index is a new file");
}

#[test]
fn a_listing_continued_after_a_swap_reads_on_in_its_own_tree() {
    let mut rig = rig();
    let names = |rig: &Rig, from: u64, max: usize| {
        let mut out = Vec::new();
        let mut last = from;
        rig.vfs
            .readdir(ROOT_INO, from, true, |cookie, _, name| {
                if out.len() == max {
                    return true;
                }
                out.push(name.to_string());
                last = cookie;
                false
            })
            .unwrap();
        (out, last)
    };
    let (all, _) = names(&rig, 0, 100);
    assert_eq!(all, [".", "..", "Packages", "c"]);
    let (first, cookie) = names(&rig, 0, 2);
    // A swap that adds a name sorting first: an index-based offset would repeat "..".
    rig.publish(&[(BIG, content(BIG_SIZE, 1)), ("A/x-1.tbz2", content(10, 1))]);
    rig.refresh();
    let (rest, _) = names(&rig, cookie, 100);
    assert_eq!([first, rest].concat(), all);
    let (fresh, _) = names(&rig, 0, 100);
    assert_eq!(
        fresh,
        [".", "..", "A", "Packages", "c"],
        "a new listing sees the new tree"
    );
    // Past `LISTED_TREES` swaps the listing goes on in the current tree.
    for _ in 0..LISTED_TREES {
        rig.publish(&[(BIG, content(BIG_SIZE, 1))]);
        rig.refresh();
    }
    let (late, _) = names(&rig, cookie, 100);
    assert_eq!(late, ["Packages", "c"]);
}

#[test]
fn readdirplus_entries_count_as_lookups_and_plain_readdir_does_not() {
    let mut rig = rig();
    let c = rig.vfs.lookup(ROOT_INO, "c").unwrap();
    let mut seen = Vec::new();
    rig.vfs
        .readdir(c.ino, 0, false, |_, a, _| {
            seen.push(a.ino);
            false
        })
        .unwrap();
    let small_dir = rig.vfs.current().lookup(c.ino, "small").unwrap().ino;
    assert!(!rig.vfs.holds(small_dir), "readdir hands out no inode");
    rig.vfs.readdir(c.ino, 0, true, |_, _, _| false).unwrap();
    assert!(rig.vfs.holds(small_dir));
    rig.publish(&[(BIG, content(BIG_SIZE, 1))]);
    rig.refresh();
    assert!(rig.vfs.getattr(small_dir, None).unwrap().is_dir);
    rig.vfs.forget(small_dir, 1);
    assert!(rig.vfs.getattr(small_dir, None).is_err());
}

#[test]
fn passthrough_only_for_complete_files_and_never_mixed_with_cached_opens() {
    let rig = rig();
    rig.vfs.set_passthrough(true);
    let a = rig.lookup(SMALL).unwrap();
    let early = rig.open(a.ino).unwrap();
    assert!(!early.passthrough, "not complete yet");
    rig.prefetch(SMALL).unwrap();
    let mixed = rig.open(a.ino).unwrap();
    assert!(
        !mixed.passthrough,
        "a cached open of this inode is still open"
    );
    rig.vfs.release(early.fh);
    rig.vfs.release(mixed.fh);
    let pt = rig.open(a.ino).unwrap();
    assert!(pt.passthrough && !pt.keep_cache);
    assert!(
        rig.vfs.release(pt.fh),
        "release reports the passthrough open"
    );
    let refused = rig.open(a.ino).unwrap();
    assert!(refused.passthrough);
    assert!(
        rig.vfs.passthrough_refused(refused.fh),
        "complete, clean: keep cache"
    );
    let after = rig.open(a.ino).unwrap();
    assert!(!after.passthrough, "refused once, off for good");
}

#[test]
fn directories_and_writes_are_refused_at_open() {
    let rig = rig();
    let c = rig.lookup("c").unwrap();
    assert!(matches!(rig.open(c.ino), Err(FsError::IsDir)));
    let a = rig.lookup(SMALL).unwrap();
    let _rt = rig.rt.enter();
    assert!(matches!(rig.vfs.open(a.ino, true), Err(FsError::ReadOnly)));
    assert!(matches!(rig.open(12345), Err(FsError::NotFound)));
}
