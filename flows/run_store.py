"""Run folders in S3 (`runs_dir=s3://bucket/prefix`), so workers on different machines share runs, resumption and
the stage cache.

Stages read and write local files, as with a local `runs_dir`: a run works in a local copy of its folder, under
`.tes/s3-runs/<bucket>/<prefix>/<run id>`, and the copy is mirrored to `s3://bucket/prefix/<run id>/` whenever the
run's manifest changes (a stage finished, the run failed or completed): every new or changed file is uploaded and
read back against its sha256, and `manifest.json` is written last, so a manifest in S3 never names a file that is
not there. A run id is claimed with a conditional write (`<run id>/.claim`, If-None-Match), so two machines never
share a folder.

Another machine takes a run from S3 by downloading it into its own copy: `tes run --resume s3://bucket/prefix/<run
id>` (or the flow's `resume_run`) continues a failed or killed run there, and the stage cache looks for
`<prefix>/.stage-cache/<key>.json` (written after the stage's files) when its own index has no entry. Paths inside
a manifest are the writer's local paths; a downloaded manifest has them rewritten to the reader's copy, and every
file is checked against its sha256 before it is reused, as for a local run.

What a run does not mirror: its progress between manifest changes. A run killed during training resumes from the
last checkpoint its machine mirrored (the one of the last finished stage or failure), or from its own local copy on
the same machine.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from core import paths
from core.errors import RepositoryError, TesError
from core.files import sha256_file
from core.results import RunDir, claim_run_dir
from serving.s3_store import S3Location, Store

log = logging.getLogger(__name__)

CLAIM = ".claim"
MANIFEST = "manifest.json"
CACHE_FOLDER = ".stage-cache"
ROOT_FIELD = "local_runs_root"  # the writer's local copy of the runs folder, for rewriting paths


def is_s3(runs_dir: str | Path) -> bool:
    return str(runs_dir).startswith("s3://")


class RunStore:
    """The runs folder `s3://bucket/prefix` and this machine's local copy of it."""

    def __init__(self, url: str):
        self.location = S3Location.parse(url)
        self.store = Store(self.location)
        self.root = paths.state_dir() / "s3-runs" / self.location.bucket / (self.location.prefix or "_")
        self._uploaded: dict[tuple[str, str], tuple[int, int]] = {}  # (run id, file) -> (size, mtime_ns)
        self._claims: dict[str, str] = {}  # run id -> the ETag of the .claim that makes this machine its writer

    def __str__(self) -> str:
        return str(self.location)

    # --- writing ----------------------------------------------------------------------------------------------
    def claim(self, name: str) -> RunDir:
        """A new run folder whose id no other machine has: claimed in S3 before anything else is written."""
        self.root.mkdir(parents=True, exist_ok=True)
        lost: list[RunDir] = []  # ids another machine took: kept until the end, so the next local id differs
        try:
            for _ in range(100):
                run = claim_run_dir(self.root, name)
                body = json.dumps({"run_id": run.run_id, "host": _host()}).encode()
                etag = self.store.put(self.location.key(run.run_id, CLAIM), body, if_none_match=True)
                if etag is not None:
                    self._claims[run.run_id] = etag
                    return self.attach(run)
                lost.append(run)
        finally:
            for run in lost:
                shutil.rmtree(run.path, ignore_errors=True)
        raise TesError(f"could not claim a new run id in {self.location}")

    def attach(self, run: RunDir) -> RunDir:
        """`run` with every manifest change mirrored to S3."""
        run.on_change = self.sync
        return run

    def take_over(self, run_id: str) -> None:
        """Make this machine the run's writer (to resume it): its `.claim` rewritten, If-Match on the one read. The
        machine that wrote it before stops at its next mirroring (`sync` checks the claim is still its own)."""
        key = self.location.key(run_id, CLAIM)
        current = self.store.get(key)
        body = json.dumps({"run_id": run_id, "host": _host(), "resumed": True}).encode()
        etag = (
            self.store.put(key, body, if_match=current.etag)
            if current
            else self.store.put(key, body, if_none_match=True)
        )
        if etag is None:
            raise TesError(f"another machine took over run {run_id} in {self.location} just now; resume it there")
        self._claims[run_id] = etag

    def sync(self, run: RunDir) -> None:
        """Upload what changed in the run's local copy, each file read back against its sha256; the manifest last.
        Only while the run's claim is still this machine's: a run resumed elsewhere is not written over."""
        found = self.store.get(self.location.key(run.run_id, CLAIM))
        if found is None or found.etag != self._claims.get(run.run_id):
            raise TesError(
                f"run {run.run_id} in {self.location} is no longer this machine's to write (it was resumed elsewhere: "
                "its .claim changed); this machine stops mirroring it"
            )
        manifest = run.manifest_path
        files = sorted(
            p
            for p in run.path.rglob("*")
            if p.is_file() and p != manifest and not any(".tmp" in part for part in p.relative_to(run.path).parts)
        )
        for path in [*files, manifest] if manifest.is_file() else files:
            relative = path.relative_to(run.path).as_posix()
            stat = path.stat()
            if self._uploaded.get((run.run_id, relative)) == (stat.st_size, stat.st_mtime_ns):
                continue
            if path == manifest:
                self._upload_manifest(run)
            else:
                self._upload_checked(run.run_id, relative, path)
            self._uploaded[run.run_id, relative] = (stat.st_size, stat.st_mtime_ns)

    def _upload_checked(self, run_id: str, relative: str, path: Path) -> None:
        key = self.location.key(run_id, relative)
        self.store.upload(key, path)
        expected = sha256_file(path)
        got = self.store.sha256(key)
        if got != expected:
            raise RepositoryError(
                f"s3://{self.location.bucket}/{key} reads back with sha256 {got[:12]}..., not the {expected[:12]}... "
                f"of {path}: the store changed it; the run's manifest in S3 was not updated"
            )

    def _upload_manifest(self, run: RunDir) -> None:
        manifest = run.read_manifest()
        manifest[ROOT_FIELD] = str(self.root)
        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
        self.store.put(self.location.key(run.run_id, MANIFEST), body)

    def remember(self, key: str | None, run: RunDir, stage: str) -> None:
        """The cache pointer of a stage this run made (after its files and manifest are in S3)."""
        if key is not None:
            body = json.dumps({"run_id": run.run_id, "stage": stage}).encode()
            self.store.put(self.location.key(CACHE_FOLDER, f"{key}.json"), body)

    # --- reading ----------------------------------------------------------------------------------------------
    def cached_run(self, key: str | None, stage: str) -> RunDir | None:
        """The local copy of the run that made `stage` with `key`, downloaded when this machine lacks it; None
        when no run in the store made it."""
        if key is None:
            return None
        found = self.store.get(self.location.key(CACHE_FOLDER, f"{key}.json"))
        if found is None:
            return None
        run_id = json.loads(found.body)["run_id"]
        return self.download(run_id, only=(stage,))

    def download(self, run_id: str, only: tuple[str, ...] | None = None) -> RunDir:
        """The run's folder from S3 into the local copy, its manifest's paths rewritten to this machine's. A file
        already there is kept only when it is a stage artifact with the sha256 the manifest records; anything else
        (a checkpoint, a log) is downloaded again, since S3 holds the newer one."""
        base = self.location.key(run_id) + "/"
        objects, _ = self.store.list(base)
        manifest_body = self.store.get(base + MANIFEST)
        if manifest_body is None:
            raise TesError(
                f"{self.location}/{run_id} has no {MANIFEST}: it is not a run folder (or not one that has started)"
            )
        manifest = json.loads(manifest_body.body)
        origin = manifest.pop(ROOT_FIELD, None)
        rewritten = _rewrite(manifest, origin, str(self.root)) if origin and origin != str(self.root) else manifest
        recorded = {
            artifact["path"]: artifact["sha256"]
            for result in rewritten.get("stages", {}).values()
            for artifact in result.get("artifacts", [])
        }
        folder = self.root / run_id
        for entry in objects:
            relative = entry["Key"][len(base) :]
            if relative in (MANIFEST, CLAIM) or (only and relative.split("/")[0] not in only):
                continue
            target = folder / relative
            if target.is_file() and recorded.get(str(target)) == sha256_file(target):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".download.tmp")
            self.store.download(entry["Key"], partial)
            partial.replace(target)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).write_text(json.dumps(rewritten, indent=2), encoding="utf-8")
        run = RunDir(folder, create=False)
        for stage, elsewhere in rewritten.get("stage_folders", {}).items():  # stages it reused from other runs
            other = Path(elsewhere)
            if (only is None or stage in only) and other.parent.parent == self.root and not other.is_dir():
                self.download(other.parent.name, only=(stage,))
        for relative in self._listed(objects, base):
            folder_file = folder / relative
            if folder_file.is_file():
                stat = folder_file.stat()
                self._uploaded[run_id, relative] = (stat.st_size, stat.st_mtime_ns)
        return self.attach(run)

    @staticmethod
    def _listed(objects: list[dict], base: str) -> list[str]:
        return [entry["Key"][len(base) :] for entry in objects if entry["Key"][len(base) :] not in (MANIFEST, CLAIM)]


def _rewrite(value: Any, old_root: str, new_root: str) -> Any:
    """Every string that is a path under `old_root` moved under `new_root`."""
    if isinstance(value, dict):
        return {key: _rewrite(item, old_root, new_root) for key, item in value.items()}
    if isinstance(value, list):
        return [_rewrite(item, old_root, new_root) for item in value]
    if isinstance(value, str) and (value == old_root or value.startswith(old_root + "/")):
        return new_root + value[len(old_root) :]
    return value


def _host() -> str:
    import socket

    return socket.gethostname()


def split_run_url(url: str) -> tuple[RunStore, str]:
    """`s3://bucket/prefix/<run id>` -> (the store of `s3://bucket/prefix`, the run id)."""
    parent, _, run_id = url.rstrip("/").rpartition("/")
    if not run_id or parent in ("s3:", "s3:/"):
        raise TesError(f"{url}: expected s3://bucket/prefix/<run id> (a run folder in an S3 runs_dir)")
    return RunStore(parent), run_id
