"""Where versions are written and read: the local repository folder or an S3 repository, behind the same calls, so
the deploy stage, the benchmark and the stack need not care which.

    target = open_target("model_repository")                      # a folder, relative to the project home
    target = open_target("s3://models/repo")                       # endpoint: AWS_ENDPOINT_URL, else AWS
    written = target.write_version("digits-fp32", "model.onnx", ServingConfig())
    target.url                                                     # what tritonserver --model-repository= takes

An S3 version is built with the local writer in a temporary folder, then published with
`s3_repository.publish_version` (claim, upload, read back, manifest last, config names the version).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from core import paths
from core.errors import RepositoryError
from core.files import atomic_write_text
from serving import client, repository, s3_repository
from serving.repository import ServingConfig, VersionResult
from serving.s3_repository import S3Location
from serving.triton import is_s3_url


@dataclass(frozen=True)
class Pointer:
    """What the repository serves of a model: a version and the config naming it (None, None: no such model)."""

    model: str
    version: int | None
    config: str | None


@dataclass(frozen=True)
class Written:
    model: str
    version: int
    path: str  # a folder, or s3://bucket/prefix/<model>/<version>
    reused: bool  # the newest version already held exactly these files and this config


class LocalTarget:
    """A repository folder on this machine (Triton and the writer share it)."""

    def __init__(self, folder: str | Path):
        self.folder = paths.resolve(folder)
        self.url = str(self.folder)

    def write_version(
        self,
        name: str,
        model_file: str | Path,
        config: ServingConfig,
        provenance: dict | None = None,
        companions: Iterable[str | Path] = (),
        interface: str | Path | None = None,
    ) -> Written:
        written = repository.write_version(self.folder, name, model_file, config, provenance, companions, interface)
        repository.verify_version(written.path)
        return _written(written)

    def write_alias(self, alias: str, target: str, provenance: dict | None = None) -> Written:
        return _written(repository.write_alias(self.folder, alias, target, provenance))

    def verify(self, model: str, version: int) -> None:
        repository.verify_version(repository.model_dir(self.folder, model) / str(version))

    def model_names(self) -> list[str]:
        """Models with a config and a version: what a freshly started Triton can load."""
        folders = sorted(self.folder.iterdir()) if self.folder.is_dir() else []
        return [f.name for f in folders if (f / "config.pbtxt").is_file() and repository.versions(f)]

    @contextlib.contextmanager
    def served_copy(self, model: str) -> Iterator[tuple[dict, Path]]:
        """(provenance, version folder) of the newest version behind `model` (an alias is followed)."""
        yield repository.newest_provenance(self.folder, model)

    def remove_model(self, model: str) -> None:
        shutil.rmtree(repository.model_dir(self.folder, model), ignore_errors=True)

    def provenance(self, model: str) -> tuple[dict, str]:
        """(what the version behind `model` was made from, where that version is); an alias is followed. The
        version is the one the config lets Triton load (after a rollback, older than the newest)."""
        found, newest = repository.newest_provenance(self.folder, model)
        served = self.pointer(newest.parent.name).version
        if served is None or str(served) == newest.name:
            return found, str(newest)
        version_dir = newest.parent / str(served)
        manifest = json.loads((version_dir / repository.VERSION_MANIFEST).read_text(encoding="utf-8"))
        return manifest.get("provenance", {}), str(version_dir)

    def pointer(self, model: str) -> Pointer:
        folder = repository.model_dir(self.folder, model)
        numbers, config = repository.versions(folder) if folder.is_dir() else [], folder / "config.pbtxt"
        if not numbers or not config.is_file():
            return Pointer(model, None, None)
        return Pointer(model, _loaded_by(config.read_text(encoding="utf-8"), numbers), config.read_text("utf-8"))

    def prune(self, model: str, keep: int) -> list[int]:
        """Delete all but the newest `keep` versions of `model` and the one its config names; returns the deleted.
        Each goes out of sight first (renamed to a staging name the writer cleans up), then is removed."""
        folder = repository.model_dir(self.folder, model)
        numbers = repository.versions(folder) if folder.is_dir() else []
        served = self.pointer(model).version
        doomed = [n for n in numbers[: max(len(numbers) - keep, 0)] if n != served]
        for number in doomed:
            hidden = folder / f"{repository.STAGING_PREFIX}deleting-{number}"
            (folder / str(number)).rename(hidden)
            shutil.rmtree(hidden, ignore_errors=True)
        return doomed

    def restore(self, before: Pointer, ours: int) -> None:
        """Make the repository serve `before.version` again: its config, naming that version alone (the newer
        version folder stays, for the post-mortem; a later deploy writes a new number). Only while the config still
        lets Triton load `ours`, the version the failed deploy wrote: a deploy that committed since is not undone."""
        folder = repository.model_dir(self.folder, before.model)
        if self.pointer(before.model).version != ours:
            raise RepositoryError(f"{folder} no longer serves version {ours} (another deploy since?); left as it is")
        if not (folder / str(before.version)).is_dir():
            raise RepositoryError(f"{folder / str(before.version)} is gone (pruned?); nothing to go back to")
        config = repository.parse_config(before.config or "")
        config.version_policy.Clear()
        config.version_policy.specific.versions.append(before.version or 0)
        atomic_write_text(folder / "config.pbtxt", repository.config_text(config))

    def load(self, url: str, model: str, admin_key: str | None = None) -> str:
        return client.load_model(url, model, admin_key=admin_key)

    def same_as(self, served: str) -> bool:
        return not is_s3_url(served) and Path(served).resolve() == self.folder.resolve()


class S3Target:
    """An S3 repository (AWS S3, MinIO, moto...): Triton reads it by `url`; boto3 writes it."""

    def __init__(self, location: S3Location):
        self.location = location
        self.url = location.triton_url()

    def write_version(
        self,
        name: str,
        model_file: str | Path,
        config: ServingConfig,
        provenance: dict | None = None,
        companions: Iterable[str | Path] = (),
        interface: str | Path | None = None,
    ) -> Written:
        with tempfile.TemporaryDirectory(prefix="tes-s3-version-") as folder:
            local = repository.write_version(folder, name, model_file, config, provenance, companions, interface)
            same = self._served_if_identical(local)
            if same is not None:
                return same
            version = s3_repository.publish_version(self.location, name, local.path)
        return Written(name, version, self._path(name, version), reused=False)

    def write_alias(self, alias: str, target: str, provenance: dict | None = None) -> Written:
        served = s3_repository.served_version(self.location, alias)
        if served is not None and _alias_target(s3_repository.read_config(self.location, alias)) == target:
            return Written(alias, served, self._path(alias, served), reused=True)
        version = s3_repository.write_alias(self.location, alias, target, provenance)
        return Written(alias, version, self._path(alias, version), reused=False)

    def verify(self, model: str, version: int) -> None:
        s3_repository.verify_version(self.location, model, version)

    def model_names(self) -> list[str]:
        return s3_repository.list_models(self.location)

    @contextlib.contextmanager
    def served_copy(self, model: str) -> Iterator[tuple[dict, Path]]:
        """(provenance, a local copy of the served version behind `model`), the copy removed afterwards."""
        behind = _alias_target(s3_repository.read_config(self.location, model)) or model
        with tempfile.TemporaryDirectory(prefix="tes-s3-copy-") as folder:
            version_dir = s3_repository.fetch_version(self.location, behind, folder)
            manifest = s3_repository.read_manifest(self.location, behind, int(version_dir.name))
            yield manifest.get("provenance", {}), version_dir

    def remove_model(self, model: str) -> None:
        s3_repository.delete_model(self.location, model)

    def provenance(self, model: str) -> tuple[dict, str]:
        """(what the served version behind `model` was made from, where it is), from its manifest alone."""
        config = s3_repository.config_if_any(self.location, model)
        if config is None or s3_repository.served_by(config) is None:
            raise RepositoryError(f"model '{model}' has no served version in {self.location}; deploy it first")
        behind = _alias_target(config)
        version = s3_repository.served_version(self.location, behind) if behind else s3_repository.served_by(config)
        behind = behind or model
        if version is None:
            raise RepositoryError(
                f"model '{model}' forwards to '{behind}', which has no served version in {self.location}"
            )
        manifest = s3_repository.read_manifest(self.location, behind, version)
        return manifest.get("provenance", {}), self._path(behind, version)

    def pointer(self, model: str) -> Pointer:
        config = s3_repository.config_if_any(self.location, model)
        version = s3_repository.served_by(config) if config is not None else None
        return Pointer(model, version, repository.config_text(config) if version is not None else None)

    def prune(self, model: str, keep: int) -> list[int]:
        """Delete all but the newest `keep` complete versions of `model` and the served one (Triton downloads every
        version folder of a model at each load); returns the deleted."""
        numbers = s3_repository.list_versions(self.location, model)
        served = s3_repository.served_version(self.location, model)
        doomed = [n for n in numbers[: max(len(numbers) - keep, 0)] if n != served]
        s3_repository.delete_versions(self.location, model, doomed)
        return doomed

    def restore(self, before: Pointer, ours: int) -> None:
        """Put the model's config back as it was (it names `before.version`), only while it names `ours`."""
        s3_repository.restore_config(self.location, before.model, before.config or "", ours)

    def load(self, url: str, model: str, admin_key: str | None = None) -> str:
        """Re-read the served version against its manifest, then load it (a changed file is never loaded)."""
        return s3_repository.load_verified(self.location, model, url, admin_key)

    def same_as(self, served: str) -> bool:
        try:
            return is_s3_url(served) and S3Location.parse(served) == self.location
        except Exception:  # a URL Triton was started with that our parser refuses: not ours
            return False

    def _path(self, model: str, version: int) -> str:
        return f"s3://{self.location.bucket}/{self.location.key(model, version)}"

    def _served_if_identical(self, local: VersionResult) -> Written | None:
        """The served version when it holds exactly the files and config just built (nothing to publish)."""
        served = s3_repository.served_version(self.location, local.model_name)
        if served is None:
            return None
        if s3_repository.read_manifest(self.location, local.model_name, served).get("files") != local.files:
            return None
        mine = repository.parse_config(local.config_path.read_text(encoding="utf-8"))
        theirs = s3_repository.read_config(self.location, local.model_name)
        mine.version_policy.Clear()
        theirs.version_policy.Clear()
        if mine != theirs:
            return None
        return Written(local.model_name, served, self._path(local.model_name, served), reused=True)


Target = LocalTarget | S3Target


def open_target(repository_path: str | Path) -> Target:
    """An `s3://` URL (`s3://bucket/prefix`, or Triton's `s3://host:port/bucket/prefix`) or a folder (relative to
    the project home)."""
    if is_s3_url(repository_path):
        return S3Target(S3Location.parse(str(repository_path)))
    return LocalTarget(repository_path)


def _written(version: VersionResult) -> Written:
    return Written(version.model_name, version.version, str(version.path), version.reused)


def _loaded_by(config_text: str, numbers: list[int]) -> int | None:
    """The version a config lets Triton load of `numbers`: the one it names, else the newest."""
    policy = repository.parse_config(config_text).version_policy
    named = [n for n in policy.specific.versions if n in numbers] if policy.HasField("specific") else []
    return max(named) if named else numbers[-1]


def _alias_target(config) -> str | None:
    steps = config.ensemble_scheduling.step if config.platform == "ensemble" else []
    return steps[0].model_name if len(steps) == 1 else None
