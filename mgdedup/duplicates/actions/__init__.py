"""Safe, undoable actions on duplicate files: move, hardlink, symlink, delete.

Users point this at their photo libraries, so the rules are about never losing a file:

- Only group MEMBERS are acted on, never a keeper, and never a path that is the same file
  (same device and inode: a hard link, a bind mount) as a keeper or as another step.
- Paths from an index are not trusted: a source must resolve (symlinks resolved) inside one of
  the index's roots, must not itself be a symlink, must be a regular file, and must still have
  the size, mtime and digest stored in the index; its keeper must still exist, unchanged since
  indexing. Both are checked when planning (the dry run shows the skips) AND again right
  before acting.
- Nothing is overwritten: a taken destination name gets a suffix ``name (1).jpg``.
- Bytes are never destroyed unless ``permanent`` is asked for: ``delete`` moves them to
  ``--to`` or ``IDX/trash/<run id>/``; ``hardlink``/``symlink`` first move them there, then put
  a link to the keeper at the source path.
- Write-ahead manifest (`manifest`): ``IDX/actions/<run id>.jsonl`` is created and fsynced
  before the first file is touched; each step's intent (every path it will create) is
  fsynced before the step starts, its outcome after. A run killed at any moment therefore
  leaves each file in place, or where the manifest says, and `undo` finishes or reverses any
  half-done step from what it finds on disk.
- `apply_plan` and `undo` hold the index's lock: two runs never act on one index at once.

Modules: `kinds` (what can be done), `plan` (what will be done, the dry run), `manifest` (the
record), `file_ops` (moves, verified copies, links), `apply`, `undo`.
"""
