"""Safe extraction of a bundle archive: every header is read and checked against the limits and
the archive's manifest before anything is written, and no member can land outside the
destination."""

from __future__ import annotations

import os
import shutil
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from qkd_deploy.deploy.bundle.files import (
    CONTENTS,
    DAMAGED,
    MANIFEST,
    MAX_SMALL_FILE_BYTES,
    SIGNATURE,
    check_manifest,
    parse_json,
)
from qkd_deploy.errors import UserError

# Reading limits. A bundle is one self-contained .onnx (protobuf caps it at 2 GiB) and small files.
MAX_BUNDLE_BYTES = 3 * 2**30  # all members of an archive together
MAX_MEMBERS = 32  # a bundle archive has a folder and 8 files


def extract_bundle(archive: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Extract a bundle archive into ``destination`` and return its folder.

    Only regular files and folders under one top folder are accepted, so no member can land
    outside ``destination`` (absolute paths, ``..``, links and devices are refused). Nothing is
    written before every header was read (at most ``MAX_MEMBERS`` members, ``MAX_BUNDLE_BYTES``
    in all) and every file is the manifest, the signature or a file the manifest lists, no
    larger than listed.
    """
    archive, destination = Path(archive), Path(destination)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = _read_headers(tar, archive)
            top = _top_folder(members, archive)
            files = _files_in(members, top, archive)
            _refuse_unlisted(tar, files, archive)
            for name, member in files.items():
                _extract_file(tar, member, destination / top / name)
    except (tarfile.TarError, EOFError, zlib.error) as error:
        raise UserError(f"{archive}: cannot read it as a .tar.gz bundle ({error})") from None
    except OSError as error:
        if error.errno is not None:  # the disk or permissions, not the archive's content
            raise
        raise UserError(f"{archive}: cannot read it as a .tar.gz bundle ({error})") from None
    return destination / top


def _read_headers(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """Every member's header, refusing the archive as soon as it has too many or too large."""
    members: list[tarfile.TarInfo] = []
    total = 0
    while (member := tar.next()) is not None:
        members.append(member)
        total += member.size
        if len(members) > MAX_MEMBERS:
            raise UserError(
                f"{archive}: more than {MAX_MEMBERS} members; a bundle archive holds one folder "
                f"of {len(CONTENTS) + 2} files at most"
            )
        if total > MAX_BUNDLE_BYTES:
            raise UserError(
                f"{archive}: its members hold more than {MAX_BUNDLE_BYTES} bytes, more than any "
                "bundle (one .onnx of at most 2 GiB and small files); refusing it"
            )
    return members


def _top_folder(members: list[tarfile.TarInfo], archive: Path) -> str:
    """The bundle's folder in the archive: its one top folder, or ``.`` when the archive holds
    the files themselves (``tar czf b.tgz -C bundle_x .``)."""
    paths = []
    for member in members:
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts or not (member.isfile() or member.isdir()):
            raise UserError(
                f"{archive}: refusing member {member.name!r} (absolute path, '..', link or "
                "device); a bundle holds plain files in one folder"
            )
        if path.parts:  # not the archive's root itself ("./")
            paths.append((path, member))
    if paths and all(len(path.parts) == 1 and member.isfile() for path, member in paths):
        return "."
    tops = {path.parts[0] for path, _ in paths}
    if len(tops) != 1:
        raise UserError(f"{archive}: a bundle archive holds one folder, found {sorted(tops)}")
    return tops.pop()


def _files_in(
    members: list[tarfile.TarInfo], top: str, archive: Path
) -> dict[str, tarfile.TarInfo]:
    """The archive's files by name in the bundle folder, which holds no subfolders."""
    files: dict[str, tarfile.TarInfo] = {}
    for member in (m for m in members if m.isfile()):
        parts = PurePosixPath(member.name).parts
        name = parts if top == "." else parts[1:]
        if len(name) != 1:
            raise UserError(
                f"{archive}: refusing member {member.name!r}; a bundle's files lie directly in "
                "its folder"
            )
        if name[0] in files:
            raise UserError(f"{archive}: member {member.name!r} appears twice; refusing it")
        files[name[0]] = member
    return files


def _refuse_unlisted(
    tar: tarfile.TarFile, files: dict[str, tarfile.TarInfo], archive: Path
) -> None:
    """Every file must be one the archive's manifest lists, at most as large as listed (the
    manifest and the signature: at most ``MAX_SMALL_FILE_BYTES``)."""
    member = files.get(MANIFEST)
    if member is None:
        raise UserError(f"{archive} holds no {MANIFEST}; give an archive made by qkd-deploy bundle")
    if member.size > MAX_SMALL_FILE_BYTES:
        raise UserError(f"{archive}: its {MANIFEST} is {member.size} bytes; {DAMAGED}")
    where = Path(f"{archive}: {MANIFEST}")
    manifest = check_manifest(parse_json(tar.extractfile(member).read(), where, DAMAGED), where)
    limits = {name: entry["bytes"] for name, entry in manifest["files"].items()}
    limits |= {MANIFEST: MAX_SMALL_FILE_BYTES, SIGNATURE: MAX_SMALL_FILE_BYTES}
    for name, member in files.items():
        if name not in limits:
            raise UserError(
                f"{archive}: refusing member {member.name!r}, which {MANIFEST} does not list; "
                f"{DAMAGED}"
            )
        if member.size > limits[name]:
            raise UserError(
                f"{archive}: refusing member {member.name!r} of {member.size} bytes, "
                f"{MANIFEST} lists {limits[name]}; {DAMAGED}"
            )


def _extract_file(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tar.extractfile(member) as source, open(target, "wb") as sink:
        shutil.copyfileobj(source, sink)
