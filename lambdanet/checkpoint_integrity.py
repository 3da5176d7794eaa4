"""The integrity manifest of a checkpoint: the size and SHA-256 of each of its files.

When a save's files are written, process 0 records their checksums as STEP/checksums.json
(`checksum_newest_save`, orbax's post-finalization callback, before the rename where orbax
calls it there). A checkpoint is *good* when every recorded file is there with its size and
SHA-256 (`verify`); resuming and evaluating the latest step take the newest good one, warning
about each newer one and why (`newest_good_step`). Orbax itself verifies nothing (a flipped
byte loads silently). A directory none of whose steps has checksums (written before they were
recorded) is restored unverified, with a warning that says so, or refused on request
(`unverified`).
"""

import hashlib
import json
import os

import jax
from absl import logging

CHECKSUM_FILE = "checksums.json"
NO_CHECKSUMS = (
    f"it has no {CHECKSUM_FILE} (its process ended before writing it, or it predates them)"
)
ITEMS = ("state", "config")  # the items of a `lambdanet.checkpoint` save: what is recorded
_COMMIT_MARKER = "commit_success.txt"  # orbax may write it after the callback


def _item_files(step_dir: str) -> dict[str, int]:
    """{path relative to `step_dir`: size} of the files of the checkpoint's items (state,
    config), without orbax's commit markers."""
    files = {}
    for item in ITEMS:
        for root, _, names in os.walk(os.path.join(step_dir, item)):
            for name in names:
                if name != _COMMIT_MARKER:
                    path = os.path.join(root, name)
                    files[os.path.relpath(path, step_dir)] = os.path.getsize(path)
    return files


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(step_dir: str) -> None:
    """Records {relative path: [size, sha256]} of the items' files as STEP/checksums.json."""
    files = {
        name: [size, _sha256(os.path.join(step_dir, name))]
        for name, size in sorted(_item_files(step_dir).items())
    }
    path = os.path.join(step_dir, CHECKSUM_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(files, f, indent=0)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def verify(step_dir: str) -> str | None:
    """None if every file recorded in STEP/checksums.json has its size and SHA-256; else what is
    wrong with the checkpoint (NO_CHECKSUMS if none were recorded)."""
    try:
        with open(os.path.join(step_dir, CHECKSUM_FILE)) as f:
            recorded = json.load(f)
    except FileNotFoundError:
        return NO_CHECKSUMS
    except ValueError:
        return f"its {CHECKSUM_FILE} is unreadable"
    present = _item_files(step_dir)
    for name, (size, digest) in recorded.items():
        if name not in present:
            return f"{name} is missing"
        if present[name] != size:
            return f"{name} has {present[name]} bytes, {size} when saved (truncated or overwritten)"
        if _sha256(os.path.join(step_dir, name)) != digest:
            return f"{name} differs from its SHA-256 when saved (corrupted)"
    return None


def checksum_newest_save(directory: str) -> None:
    """Writes the checksums of the newest step in `directory`, in flight (its temporary
    directory, where orbax calls this before renaming it) or finished; on process 0 only."""
    if jax.process_index() != 0:
        return
    named = [(name.split(".")[0], name) for name in os.listdir(directory)]
    steps = [(int(step), name) for step, name in named if step.isdigit()]
    if steps:
        step_dir = os.path.join(directory, max(steps)[1])
        if not os.path.exists(os.path.join(step_dir, CHECKSUM_FILE)):
            write_checksums(step_dir)
            logging.info("Checkpoint step %d written, checksums recorded.", max(steps)[0])


class UnverifiedCheckpointError(ValueError):
    """A checkpoint without checksums, refused (`lambdanet-train --require_checksums`)."""


def unverified(directory: str, step: int, require_checksums: bool) -> None:
    """Says plainly that checkpoint `step` has no checksums and is used unverified; refuses it
    (UnverifiedCheckpointError) when `require_checksums`."""
    what = (
        f"Checkpoint step {step} in {directory} has no {CHECKSUM_FILE} (it predates them or "
        "another tool wrote it): it cannot be verified, and a damaged byte in it would load "
        "unnoticed"
    )
    if require_checksums:
        raise UnverifiedCheckpointError(
            f"{what}. --require_checksums refuses it; nothing was changed. Run without "
            "--require_checksums to use it unverified, or use another --workdir to start afresh."
        )
    logging.warning("%s; using it UNVERIFIED (--require_checksums refuses it).", what)


def newest_good_step(
    directory: str, steps: list[int], warn: bool = True, require_checksums: bool = False
) -> int | None:
    """The newest of `steps` (sorted) that `verify` passes, warning about each newer one and why;
    with no checksummed step at all (written before checksums were recorded), the newest,
    unverified (`unverified`: refused when `require_checksums`)."""
    if steps and not any(
        os.path.exists(os.path.join(directory, str(s), CHECKSUM_FILE)) for s in steps
    ):
        if warn or require_checksums:
            unverified(directory, steps[-1], require_checksums)
        return steps[-1]
    for step in reversed(steps):
        problem = verify(os.path.join(directory, str(step)))
        if problem is None:
            return step
        if warn:
            logging.warning("Skipping checkpoint step %d in %s: %s.", step, directory, problem)
    return None
