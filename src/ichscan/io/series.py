"""Series discovery: group DICOM slices into series, order them in space, measure their
geometry (spacing, gaps, gantry tilt), and choose the series a head CT model should read.

Slices are ordered by ImagePositionPatient projected on the image-plane normal, never by file
name or InstanceNumber: both are unreliable in the wild (RSNA shuffles names; InstanceNumber
restarts per acquisition).
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ichscan.errors import InputError
from ichscan.io.archive import ZipLimits, ZipMember, iter_zip_members
from ichscan.io.dicom import (
    CT_SOP_CLASSES,
    SliceHeader,
    check_ct_slice,
    header_from_dataset,
    read_dataset,
    read_header,
    syntax_name,
)

# Files that live beside DICOM in real exports and are not slices: counted, never "bad".
NON_DICOM_SUFFIXES = {
    ".csv",
    ".txt",
    ".json",
    ".md",
    ".xml",
    ".html",
    ".htm",
    ".pdf",
    ".png",
    ".jpg",
    ".jpeg",
    ".nii",
    ".gz",
    ".zip",
    ".py",
    ".ini",
    ".log",
    ".parquet",
    ".npy",
    ".npz",
    ".db",
}
IGNORED_NAMES = {"DICOMDIR", ".DS_Store", "Thumbs.db", "desktop.ini", "LOCKFILE", "VERSION"}
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"

# Kernels that sharpen for bone or lung: a brain/soft-tissue series is preferred over them.
_SHARP_KERNEL = re.compile(
    r"bone|lung|sharp|detail|edge|ultra|[HBJQIU](?:r)?(?:[5-9]\d)|\bYC\b|\bFC(?:3[0-9]|[5-9]\d)\b",
    re.IGNORECASE,
)
MIN_SLICES_FOR_VOLUME = 10
THIN_ENOUGH_MM = 5.5


@dataclass
class BadFile:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class Series:
    series_uid: str
    headers: list[SliceHeader]
    positions_mm: np.ndarray  # each slice's position along the plane normal, ascending
    affine: np.ndarray
    slice_spacing_mm: float | None
    gantry_tilt_deg: float
    problems: list[str] = field(default_factory=list)
    selected: bool = False
    selection_reason: str = ""
    # Its SeriesInstanceUID also names slices of another patient or study (split apart):
    # the UID alone does not identify this scan.
    shares_uid: bool = False

    @property
    def first(self) -> SliceHeader:
        return self.headers[0]

    @property
    def n_slices(self) -> int:
        return len(self.headers)

    @property
    def study_uid(self) -> str:
        return self.first.study_uid

    @property
    def patient_id(self) -> str:
        return self.first.patient_id

    @property
    def description(self) -> str:
        return self.first.series_description

    @property
    def kernel(self) -> str:
        return self.first.convolution_kernel

    @property
    def slice_thickness_mm(self) -> float | None:
        values = [h.slice_thickness for h in self.headers if h.slice_thickness]
        if values:
            return float(np.median(values))
        return self.slice_spacing_mm

    @property
    def is_axial(self) -> bool:
        normal = _normal(self.first.orientation)
        return normal is None or abs(normal[2]) >= np.cos(np.radians(45))

    @property
    def sharp_kernel(self) -> bool:
        text = f"{self.kernel} {self.description}"
        return bool(_SHARP_KERNEL.search(text))

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.first.image_type or (
            self.n_slices < 3
            and any(
                w in self.description.lower() for w in ("scout", "topogram", "localizer", "surview")
            )
        )

    def info(self) -> dict:
        """What `ichscan info --json` prints for the series."""
        h = self.first
        return {
            "series_uid": self.series_uid,
            "study_uid": h.study_uid,
            "patient_id": h.patient_id,
            "description": h.series_description,
            "modality": h.modality,
            "n_slices": self.n_slices,
            "rows": h.rows,
            "cols": h.cols,
            "pixel_spacing_mm": list(h.pixel_spacing) if h.pixel_spacing else None,
            "slice_thickness_mm": _round(self.slice_thickness_mm),
            "slice_spacing_mm": _round(self.slice_spacing_mm),
            "gantry_tilt_deg": round(self.gantry_tilt_deg, 2),
            "convolution_kernel": h.convolution_kernel,
            "transfer_syntax": syntax_name(h.transfer_syntax),
            "transfer_syntax_uid": h.transfer_syntax,
            "selected": self.selected,
            "selection_reason": self.selection_reason,
            "problems": list(self.problems),
            "location": self.location(),
        }

    def location(self) -> str:
        """Where the series' files are: the folder (or zip, and folder inside it) that holds
        them all, so a series found in a tree of many can be found again."""
        paths = {h.path for h in self.headers}
        folder = os.path.commonpath([os.path.dirname(p) or "." for p in paths])
        if len(paths) == 1 and self.first.member is not None:  # every slice in one zip
            inside = posixpath.commonpath([posixpath.dirname(h.member or "") for h in self.headers])
            return shown(self.first.path + (f"!{inside}" if inside else ""))
        return shown(folder)


@dataclass
class Discovery:
    """Everything found under one input path."""

    source: str
    series: list[Series]
    bad_files: list[BadFile]
    ignored_files: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def selected(self) -> Series | None:
        return next((s for s in self.series if s.selected), None)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


def _normal(orientation: tuple[float, ...] | None) -> np.ndarray | None:
    if orientation is None:
        return None
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    n = np.cross(row, col)
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else None


def _is_ignored(path: Path) -> bool:
    return (
        path.name in IGNORED_NAMES
        or path.name.startswith(".")
        or "".join(path.suffixes[-1:]).lower() in NON_DICOM_SUFFIXES
    )


def shown(label: str | Path) -> str:
    """A file name as one line of text: quoted and escaped (repr) when it holds a newline or
    another control character, as is otherwise, accents and CJK included."""
    text = str(label)
    return text if text.isprintable() else repr(text)


def special_file_kind(path: Path) -> str | None:
    """'a named pipe', 'a socket' or 'a device' for what is not a regular file; None for a
    regular file, and for a path that cannot be stat'ed (its reader says why)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


def refuse_special_file(path: Path) -> None:
    """A named pipe, socket or device given as an input would block its reader for ever:
    InputError, unread."""
    if kind := special_file_kind(path):
        raise InputError(shown(path), _not_regular(path, kind))


def iter_files(root: Path, special: list[Path] | None = None) -> Iterator[Path]:
    """Every file below root, depth first, in a stable order. Named pipes, sockets and
    devices are left out (opening a pipe blocks until a writer comes, which may be never)
    and appended to `special` when given, so the caller can say it skipped them."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if special_file_kind(path) is None:
                yield path
            elif special is not None:
                special.append(path)


def read_headers(
    path: str | Path, zip_limits: ZipLimits | None = None
) -> tuple[list[SliceHeader], list[BadFile], list[str]]:
    """Headers of every readable CT slice under path (file, folder or zip), the files that
    could not be used with the reason, and the files ignored as obviously not DICOM."""
    path = Path(path)
    headers: list[SliceHeader] = []
    bad: list[BadFile] = []
    ignored: list[str] = []

    def consider(header_or_error: SliceHeader | BadFile | None) -> None:
        if isinstance(header_or_error, BadFile):
            bad.append(header_or_error)
        elif header_or_error is not None:
            headers.append(header_or_error)

    if not path.exists():
        raise InputError(shown(path), "no such file or folder")
    refuse_special_file(path)
    if path.is_dir():
        special: list[Path] = []
        for file in iter_files(path, special):
            if _is_ignored(file):
                ignored.append(shown(file))
                continue
            consider(_header_or_bad(file))
        bad += [BadFile(shown(f), _not_regular(f)) for f in special]
    elif path.suffix.lower() == ".zip":
        for member in iter_zip_members(path, zip_limits or ZipLimits()):
            if _is_ignored(Path(member.name)):
                ignored.append(shown(f"{path}!{member.name}"))
                continue
            consider(_zip_member(path, member))
    else:
        consider(_header_or_bad(path))
    return headers, bad, ignored


def _not_regular(path: Path, kind: str | None = None) -> str:
    return f"not a regular file ({kind or special_file_kind(path)}); not read"


def _zip_member(path: Path, member: ZipMember) -> SliceHeader | BadFile | None:
    if member.data is None:
        return BadFile(shown(f"{path}!{member.name}"), member.problem or "unreadable zip entry")
    return _header_or_bad(path, data=member.data, member=member.name)


def _header_or_bad(
    path: Path, data: bytes | None = None, member: str | None = None
) -> SliceHeader | BadFile | None:
    import io

    label = shown(f"{path}!{member}" if member else path)
    try:
        if data is None:
            header = read_header(path)
        else:
            ds = read_dataset(io.BytesIO(data), name=label, header_only=True)
            header = header_from_dataset(ds, str(path), member=member)
        if header.sop_class == DICOMDIR_CLASS:
            return None
        check_ct_slice(header, label)
    except InputError as exc:
        return BadFile(label, exc.problem)
    return header


def group_series(headers: Iterable[SliceHeader]) -> tuple[list[Series], list[BadFile]]:
    """Group by SeriesInstanceUID, order and measure each series. Slices of different
    patients or studies are never one volume, even under one SeriesInstanceUID (copied or
    badly anonymised UIDs): each patient and study gets its own series, which says so."""
    groups: dict[tuple[str, str, str], list[SliceHeader]] = defaultdict(list)
    for h in headers:
        uid = h.series_uid or f"(no SeriesInstanceUID) {h.study_uid}"
        groups[(uid, h.patient_id, h.study_uid)].append(h)
    sharing = Counter(uid for uid, _, _ in groups)
    series: list[Series] = []
    bad: list[BadFile] = []
    for (uid, patient, study), members in groups.items():
        s, dropped = build_series(uid, members)
        bad.extend(dropped)
        if s is None:
            continue
        if sharing[uid] > 1:
            s.shares_uid = True
            s.problems.append(
                f"SeriesInstanceUID {uid} is shared by {sharing[uid]} patients or studies; "
                f"split into one series each (this one: patient {patient or '(no PatientID)'}, "
                f"study {study or '(no StudyInstanceUID)'})"
            )
        series.append(s)
    return series, bad


def _label(h: SliceHeader) -> str:
    return shown(f"{h.path}!{h.member}" if h.member else h.path)


def _drop_repeated_instances(
    members: list[SliceHeader], problems: list[str]
) -> tuple[list[SliceHeader], list[BadFile]]:
    """One file per SOPInstanceUID: slice ids, SR references and predictions key on it, so a
    second file with the same UID (a copy, or a broken export) is left out and named."""
    first: dict[str, SliceHeader] = {}
    kept: list[SliceHeader] = []
    dropped: list[BadFile] = []
    for h in members:
        original = first.setdefault(h.sop_uid, h) if h.sop_uid else h
        if original is h:
            kept.append(h)
        else:
            dropped.append(
                BadFile(_label(h), f"repeats the SOPInstanceUID of {_label(original)}; not read")
            )
    if dropped:
        problems.append(
            f"{len(dropped)} slice(s) repeating another slice's SOPInstanceUID were left out"
        )
    return kept, dropped


def build_series(uid: str, members: list[SliceHeader]) -> tuple[Series | None, list[BadFile]]:
    problems: list[str] = []
    members, dropped = _drop_repeated_instances(members, problems)

    # One matrix size and one orientation per series; the majority wins, the rest are listed.
    size_counts = Counter((h.rows, h.cols) for h in members)
    size, _ = size_counts.most_common(1)[0]
    if len(size_counts) > 1:
        others = [h for h in members if (h.rows, h.cols) != size]
        problems.append(
            f"mixed sizes: {len(others)} slice(s) not {size[0]}x{size[1]} were left out"
        )
        dropped += [
            BadFile(
                _label(h), f"matrix {h.rows}x{h.cols} differs from the series' {size[0]}x{size[1]}"
            )
            for h in others
        ]
        members = [h for h in members if (h.rows, h.cols) == size]

    with_pos = [h for h in members if h.position is not None and h.orientation is not None]
    without_pos = [h for h in members if h not in with_pos]
    if with_pos and without_pos:
        problems.append(
            f"{len(without_pos)} slice(s) without a usable ImagePositionPatient/"
            "ImageOrientationPatient (missing, or not finite numbers) were left out"
        )
        dropped += [
            BadFile(
                _label(h),
                "missing or invalid (not finite) ImagePositionPatient or ImageOrientationPatient",
            )
            for h in without_pos
        ]
        members = with_pos
    elif not with_pos:
        return _series_without_geometry(uid, members, problems), dropped

    orient_counts = Counter(tuple(np.round(h.orientation, 3)) for h in members)  # type: ignore[arg-type]
    orientation, _ = orient_counts.most_common(1)[0]
    if len(orient_counts) > 1:
        others = [h for h in members if tuple(np.round(h.orientation, 3)) != orientation]  # type: ignore[arg-type]
        problems.append(f"mixed orientations: {len(others)} slice(s) were left out")
        dropped += [
            BadFile(_label(h), "image orientation differs from the rest of the series")
            for h in others
        ]
        members = [h for h in members if h not in others]

    first = members[0]
    normal = _normal(first.orientation)
    if normal is None:
        return _series_without_geometry(
            uid, members, [*problems, "ImageOrientationPatient is degenerate"]
        ), dropped
    positions = np.array([h.position for h in members], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    members = [members[i] for i in order]
    positions, along = positions[order], along[order]

    # The same position twice: a repeated acquisition or a copied file. Keep the first.
    if len(along) > 1:
        dup = np.concatenate([[False], np.abs(np.diff(along)) < 1e-3])
        if dup.any():
            problems.append(f"{int(dup.sum())} slice(s) at duplicate positions were left out")
            dropped += [
                BadFile(_label(h), "duplicate slice position")
                for h, d in zip(members, dup, strict=True)
                if d
            ]
            members = [h for h, d in zip(members, dup, strict=True) if not d]
            positions, along = positions[~dup], along[~dup]

    spacing, step = _spacing_and_step(positions, along, normal, problems)
    row_dir, col_dir = np.asarray(first.orientation[:3]), np.asarray(first.orientation[3:])
    px = first.pixel_spacing or (1.0, 1.0)
    if first.pixel_spacing is None:
        problems.append(
            "no usable PixelSpacing (missing, zero or not finite): assuming 1 mm pixels"
        )
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = col_dir * px[0]
    affine[:3, 2] = row_dir * px[1]
    affine[:3, 3] = positions[0]
    # Gantry tilt as the scanner records it in the orientation: the image plane's normal
    # against the patient's head-foot axis. What reslicing must undo is the shear between
    # the slice step and the normal, which a tilted acquisition also produces.
    tilt = float(np.degrees(np.arccos(min(1.0, abs(float(normal[2]))))))
    if np.linalg.norm(step) > 0 and len(members) > 1:
        cos = abs(float(step @ normal) / float(np.linalg.norm(step)))
        shear = float(np.degrees(np.arccos(min(1.0, cos))))
        if shear > 0.5:
            problems.append(
                f"sheared slice grid ({shear:.1f} deg, tilted gantry): reslicing corrects it"
            )
    return Series(uid, members, along - along[0], affine, spacing, tilt, problems), dropped


def _spacing_and_step(
    positions: np.ndarray, along: np.ndarray, normal: np.ndarray, problems: list[str]
) -> tuple[float | None, np.ndarray]:
    if len(along) < 2:
        return None, normal.copy()
    diffs = np.diff(along)
    spacing = float(np.median(diffs))
    gaps = diffs > 1.5 * spacing
    for i in np.flatnonzero(gaps):
        missing = round(diffs[i] / spacing) - 1
        problems.append(
            f"missing slices: a gap of {diffs[i]:.2f} mm after slice {i} "
            f"(about {missing} slice(s) missing)"
        )
    regular = diffs[~gaps]
    if regular.size and (regular.max() - regular.min()) > 0.1 * spacing:
        problems.append(f"uneven slice spacing: {regular.min():.2f} to {regular.max():.2f} mm")
    steps = np.diff(positions, axis=0)[~gaps]
    step = np.median(steps, axis=0) if len(steps) else normal * spacing
    return spacing, step


def _series_without_geometry(uid: str, members: list[SliceHeader], problems: list[str]) -> Series:
    """No positions at all: order by InstanceNumber and say so; the geometry is a guess."""
    members = sorted(members, key=lambda h: (h.instance_number is None, h.instance_number or 0))
    thickness = members[0].slice_thickness or 5.0
    problems.append(
        "no usable ImagePositionPatient (missing or not finite): slices ordered by "
        "InstanceNumber and "
        f"spacing assumed from SliceThickness ({thickness:g} mm); geometry is approximate"
    )
    px = members[0].pixel_spacing or (1.0, 1.0)
    affine = np.diag([thickness, px[0], px[1], 1.0])
    positions = np.arange(len(members), dtype=np.float64) * thickness
    return Series(
        uid, members, positions, affine, thickness if len(members) > 1 else None, 0.0, problems
    )


def selection_key(s: Series) -> tuple:
    """Higher is better: how the CQ500 work chose a series for the model."""
    thickness = s.slice_thickness_mm or 99.0
    return (
        s.first.modality == "CT",
        not s.is_localizer,
        s.is_axial,
        s.n_slices >= MIN_SLICES_FOR_VOLUME,
        not s.sharp_kernel,
        thickness <= THIN_ENOUGH_MM,
        -thickness,
        s.n_slices,
    )


def _describe(s: Series) -> str:
    if not s.kernel:
        kernel = "no kernel recorded"
    else:
        kernel = "sharp (bone/lung) kernel" if s.sharp_kernel else "soft-tissue/brain kernel"
    thickness = s.slice_thickness_mm
    plane = "axial" if s.is_axial else "not axial"
    return (
        f"{plane}, {s.n_slices} slice(s) of {thickness:.2f} mm, {kernel}"
        if thickness
        else f"{plane}, {s.n_slices} slice(s), {kernel}"
    )


def _why_not(best: Series, other: Series) -> str:
    a, b = selection_key(best), selection_key(other)
    reasons = [
        "not CT",
        "localizer",
        "not axial",
        f"fewer than {MIN_SLICES_FOR_VOLUME} slices",
        "sharp (bone/lung) kernel",
        f"slices thicker than {THIN_ENOUGH_MM} mm",
        "thicker slices",
        "fewer slices",
    ]
    for reason, x, y in zip(reasons, a, b, strict=True):
        if x != y:
            return reason
    return "same rank; first found"


def select_series(series: list[Series]) -> Series | None:
    """Mark the best series per study (most often there is one study) with the reason."""
    by_study: dict[str, list[Series]] = defaultdict(list)
    for s in series:
        by_study[s.study_uid].append(s)
    best_overall: Series | None = None
    for members in by_study.values():
        ranked = sorted(members, key=selection_key, reverse=True)
        best = ranked[0]
        best.selected = True
        reason = _describe(best)
        if len(ranked) > 1:
            reason += "; preferred over " + ", ".join(
                f"{o.description or o.series_uid[-8:]} ({_why_not(best, o)})" for o in ranked[1:]
            )
        best.selection_reason = reason
        for other in ranked[1:]:
            other.selection_reason = f"not selected: {_why_not(best, other)}"
        if best_overall is None or selection_key(best) > selection_key(best_overall):
            best_overall = best
    return best_overall


def discover(path: str | Path, zip_limits: ZipLimits | None = None) -> Discovery:
    """Find, group, order, measure and rank every CT series under path."""
    headers, bad, ignored = read_headers(path, zip_limits)
    if not headers and len(bad) == 1 and Path(path).is_file():
        raise InputError(bad[0].path, bad[0].reason)
    series, dropped = group_series(headers)
    bad.extend(dropped)
    select_series(series)
    series.sort(key=lambda s: (not s.selected, s.study_uid, s.first.series_description))
    notes = [n for s in series for n in sorted({n for h in s.headers for n in h.notes})]
    if not series and not bad:
        raise InputError(
            shown(path),
            _nothing_found(ignored) if Path(path).is_dir() else "not a DICOM file",
        )
    return Discovery(str(path), series, bad, ignored, notes)


def _nothing_found(ignored: list[str]) -> str:
    """No DICOM in a folder; when it holds the files ichscan reads one at a time (NIfTI
    volumes, PNG/JPEG slices), say how many and what to give instead."""
    kinds = (("NIfTI", (".nii", ".nii.gz")), ("image", (".png", ".jpg", ".jpeg")))
    for kind, suffixes in kinds:
        found = [name for name in ignored if name.lower().endswith(suffixes)]
        if found:
            return (
                f"no DICOM files found; it holds {len(found)} {kind} file(s) (first: "
                f"{found[0]}): give one of them (each is one scan), or the folder to "
                "`ichscan prepare` if it is a dataset"
            )
    return "no DICOM files found"


def is_ct_sop_class(uid: str) -> bool:
    return uid in CT_SOP_CLASSES
