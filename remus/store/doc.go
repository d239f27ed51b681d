// Package store is a Remus backup's persistent state for one protected VM
// (a slot): whatever crashes when (the backup process in the middle of a
// write, or both hosts), what is on disk is exactly one complete checkpoint
// C: the memory, CPU and device state of C and the replica of the guest's
// preopened directories as of C.
//
// # Layout
//
//	LOCK                         flock: one process per slot
//	COMMIT                       the commit point: generation, base seq, last committed
//	                             seq, tree seq, module, base ID, primary's base ID;
//	                             after the guest's exit, the exit's record and code
//	APPLIED                      how far the records' fs ops reached disk/
//	base-<seq>-g<gen>.snap       a full snapshot (snapshot.Encode output)
//	rec-<seq>-g<gen>.snap        an incremental snapshot, readable on its own:
//	                             `ftvm restore base-… rec-… …` works (see Paths)
//	rec-<seq>-g<gen>.ops         that checkpoint's fs ops, checksummed (the exit's
//	                             record is an ops file alone)
//	disk/TREE                    which generation the tree is
//	disk/<i>/                    the replica of preopen i
//	disk.new/, disk.old/         a full commit's tree being built / being dropped
//	.<name>.tmp                  a file being written
//
// COMMIT, APPLIED, ops files and TREE carry a magic, a version, their
// exact length and a CRC-32C (format.go); snapshot files have their own
// checksums and IDs. A damaged or truncated file that the committed state
// needs is an error naming it, never a guess.
//
// Every journal file is written to its temporary name, fsynced, renamed
// and its directory fsynced. A commit is durable once COMMIT's rename is:
// files it names were durable before it was written; files it does not
// name are garbage that Open removes. The generation in every name (a
// full commit increments it) keeps a new chain from ever reusing the name
// of a file an older COMMIT may still name.
//
// # Commits
//
// CommitFull builds the new tree in disk.new/ (tree entries, then the
// epoch's ops, then TREE; one syncfs), writes the base, then COMMIT with
// the new generation, then swaps disk.new/ in for disk/ (two renames,
// directory fsync) and writes APPLIED. Recovery finds the tree of COMMIT's
// generation in disk/ or, if the swap was interrupted, in disk.new/ and
// finishes it.
//
// CommitIncremental writes the record (snapshot and ops files), then
// COMMIT, then applies the ops to disk/, then writes APPLIED. Applying
// comes after the commit point, so a crash can leave committed records
// whose ops are applied partly, in ways the file system chose (unsynced
// data and directory entries are lost in any combination). Recovery must
// replay them onto that disk/ and reach exactly the state of the commit.
//
// CommitExit records that the guest exited after the committed checkpoint
// C: it writes a record of only the fs ops of the epoch the guest ended in
// (no snapshot: nothing resumes that epoch), then COMMIT naming it and the
// exit code (format version 2; a COMMIT without an exit stays version 1),
// then applies the ops like a checkpoint's. The memory state stays C's;
// disk/ is then the primary's files at its exit. An exited slot takes no
// incremental checkpoint and no compaction; a CommitFull starts over.
//
// # Why replay is correct
//
// Re-running a record's ops from the start is not idempotent in general:
// after "rename a b; create a; write a x" has reached the disk, replaying
// the rename moves the new a over b; after "write c x; unlink c" the unlink
// may be durable and the write not, and a replay cannot reach c's inode
// through another hard link any more; an append replayed appends twice.
// So the ops of a record are applied in segments, each followed by a
// barrier (fsync of every file and directory the segment changed) and a
// durable marker in APPLIED: "record N, ops before j are applied; the
// segment [j, k) is next, its appends write at these offsets". Replay
// starts at the last marker and redoes one segment from whatever part of
// it reached the disk. Segments are cut so that redoing one from any such
// partial state gives its exact outcome:
//
//   - unlink, rmdir, rename and link form a segment of their own. Each is
//     atomic in the file system, so the disk holds the state before or
//     after it, and each is applied as "ensure the outcome": unlink/rmdir
//     of a missing name succeeds, a rename whose source is gone and whose
//     destination exists succeeds, a link that is already there succeeds.
//
//   - Every other segment only adds names (create, mkdir, symlink) and
//     changes data and times (write, truncate, allocate, settimes), and
//     holds at most one symlink, as its last op. With no name removed or
//     rebound, a path that resolves when the segment starts resolves to
//     the same object throughout and after any crash, and one that does
//     not resolve yet can only come to name an object the segment itself
//     creates (it could name an existing one only through a symlink made
//     within the segment, which ends it). Creations are applied as
//     "ensure it exists" (never O_EXCL), so a redo finds or recreates each
//     new object and re-runs every data op in order. The final size and
//     bytes of a file after a sequence of positional writes, truncates
//     and allocations depend only on the sequence and on the bytes no op
//     of it touched, which are the same in every partial state: a redo
//     converges.
//
//   - Appends are what depends on the state, so they are turned into
//     positional writes before a segment runs, and the offsets are made
//     durable with its marker (for the first segment: in the ops file,
//     planned at commit time, when disk/ is exactly the state before the
//     record). The plan takes each file's size when the segment starts,
//     by identity (device, inode: hard links and symlinks to one file
//     count once), and follows the segment's writes, truncates,
//     allocations and truncating creates. An append to a file that does
//     not exist when the segment starts (created within it) ends the
//     segment before it, and is planned at the start of the next one,
//     when it does.
//
// A marker is written only after the barrier that makes everything
// before it durable, so replay never redoes a segment whose successors
// may have reached the disk. A typical epoch (writes, appends, creates)
// is one segment: its only fsyncs are the files it wrote.
//
// A primary whose ops do not fit the replica (a write to a missing file,
// an rmdir of a non-empty directory, a path the kernel refuses as leaving
// its root) makes the op a no-op and the slot Diverged: the checkpoint is
// committed, but incrementals are refused until a CommitFull. Detecting
// that is best effort (a crash can make a replay of such an op succeed);
// confinement beneath disk/<i> is not.
//
// # Cost
//
// CommitIncremental fsyncs the snapshot and ops files, the directory,
// COMMIT and the directory (5: the commit point), then one fsync per file
// and directory the ops touched, then APPLIED and the directory (2); each
// further segment adds its barrier and a marker (2). A checkpoint whose
// ops write two existing files and create one new file is 11 fsyncs (5,
// then the 3 files and the new file's directory, then 2); 5 of them come
// before the commit point (BenchmarkCommitIncremental).
//
// # Compaction
//
// Compact writes the image of the committed checkpoint as a new full base
// and drops the records. That base has its own snapshot ID, so a later
// record that names the primary's ID of its parent is re-encoded with the
// slot's as parent (same pages, same nonce): the chain on disk always
// restores with snapshot.Restore, and the slot keeps the primary's ID of
// its tip (COMMIT, ops files) to check incoming incrementals against. A
// record encoded onto the slot's own tip (Tip: the backup's merges of
// several checkpoints) is stored as it comes.
//
// # What is not replicated exactly
//
// Timestamps other than those FsSetTimes sets (the replica's writes set
// its own mtimes), hard links in a full sync's tree (TreeEntry has no
// link identity: each name becomes its own file), owner, set-id and
// sticky bits, and write permission of directories for their owner
// (always granted, so that the backup can manage its trees).
package store
