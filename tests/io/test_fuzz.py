"""Hostile files: seeded mutations of the bundled real samples through `voxseq info` and `voxseq prepare`.

Every case must end as a valid volume or as a clean one-line error naming the file (exit code 2, no
traceback), within a time limit and under a 3 GB address-space limit. Mutations: truncation at random
offsets, random bit flips (whole file, or header only), edits of NRRD text header fields (sizes,
dimension, type, encoding, endian, directions) and of NIfTI-1 binary header fields (dim, datatype,
bitpix, pixdim, vox_offset, scaling, magic), in plain .nii, .nii.gz (edited, then recompressed) and
truncated .nii.gz. Cases are batched (one `info` and one `prepare` call for many files); a batch that
does not end cleanly is re-run case by case to name the culprits.
"""

from __future__ import annotations

import gzip
import json
import re
import resource
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

VOXSEQ = [sys.executable, "-m", "voxseq.cli"]
MEMORY_LIMIT = 3 << 30  # bytes of address space per subprocess
SEED = 20261124

NRRD_EDITS = {
    "sizes": ["100000 100000 100000", "0 120 21", "-5 120 21", "45 120", "45 120 21 7", "a b c", "4294967297 2 2",
              "45 120 2100000", "1 1 1", "45 120 1", "45 120 22", "44 120 21"],
    "dimension": ["2", "4", "0", "-1", "99", "x"],
    "type": ["float", "double", "uchar", "int64", "banana", "block", "unsigned long long int"],
    "encoding": ["raw", "ascii", "hex", "bzip2", "bogus", "gz"],
    "endian": ["big", "middle"],
    "space directions": ["(0,0,0) (0,0,0) (0,0,0)", "(nan,0,0) (0,1,0) (0,0,1)", "none none none",
                         "(1e308,0,0) (0,1e308,0) (0,0,1e308)", "(1,0,0) (1,0,0) (0,0,1)", "(1,0) (0,1) (0,0)"],
    "space origin": ["(nan,nan,nan)", "(inf,0,0)", "(1,2)"],
    "kinds": ["domain domain list", "RGB-color domain domain", "space"],
}
# NIfTI-1 header fields: (byte offset, struct format, values to try)
NII_EDITS = {
    "sizeof_hdr": (0, "<i", [0, 540, -1, 1 << 30]),
    "dim0": (40, "<h", [-1, 0, 1, 2, 4, 5, 7, 8, 100]),
    "dim1": (42, "<h", [0, -1, 1, 32767]),
    "dim3": (46, "<h", [0, -7, 32767, 1]),
    "dim4": (48, "<h", [0, -1, 17, 32767]),
    "dims_huge": (42, "<hhh", [(32767, 32767, 32767), (30000, 30000, 1000)]),
    "datatype": (70, "<h", [0, 1, 2, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 9999, -4]),
    "bitpix": (72, "<h", [0, 1, 7, 64, -16, 4096]),
    "pixdim": (80, "<fff", [(0.0, 0.0, 0.0), (float("nan"),) * 3, (-1.0, 1.0, 1.0), (1e30, 1e30, 1e30), (float("inf"), 1.0, 1.0)]),
    "vox_offset": (108, "<f", [0.0, 1e9, -1.0, 351.0, float("nan"), 353.0, 3e38]),
    "scl_slope": (112, "<ff", [(float("nan"), 0.0), (float("inf"), 0.0), (0.0, float("nan")), (1e38, 1e38)]),
    "qform": (252, "<hh", [(1, 1), (-5, 300), (2, 0)]),
    "quatern": (256, "<ffffff", [(float("nan"),) * 6, (1e20, 1e20, 1e20, 0, 0, 0), (2.0, 2.0, 2.0, 0, 0, 0)]),
    "magic": (344, "4s", [b"xxxx", b"ni1\0", b"\0\0\0\0"]),
}
KINDS = ["truncate", "bitflip", "header_bitflip", "nrrd_field", "nii_field", "niigz_field", "niigz_truncate"]


# ---------------------------------------------------------------------------- the originals


@pytest.fixture(scope="module")
def originals(samples, tmp_path_factory) -> dict[str, bytes]:
    """Small real files: gzip NRRD (as shipped), raw NRRD, NIfTI and gzip NIfTI written from a sample."""
    import SimpleITK as sitk

    folder = tmp_path_factory.mktemp("originals")
    img = sitk.ReadImage(str(samples / "breast1_image.nrrd"))
    sitk.WriteImage(img, str(folder / "raw.nrrd"), useCompression=False)
    sitk.WriteImage(img, str(folder / "plain.nii"), useCompression=False)
    sitk.WriteImage(img, str(folder / "comp.nii.gz"), useCompression=True)
    files = {
        "gz.nrrd": (samples / "breast1_image.nrrd").read_bytes(),
        "label.nrrd": (samples / "breast1_label.nrrd").read_bytes(),
        "raw.nrrd": (folder / "raw.nrrd").read_bytes(),
        ".nii": (folder / "plain.nii").read_bytes(),
        ".nii.gz": (folder / "comp.nii.gz").read_bytes(),
    }
    return files


def _nrrd_header_end(data: bytes) -> int:
    end = data.find(b"\n\n")
    return end if end > 0 else min(len(data), 400)


def mutate(kind: str, rng: np.random.Generator, originals: dict[str, bytes]) -> tuple[str, str, bytes]:
    """One seeded mutation: (description, file suffix, bytes)."""
    if kind == "truncate":
        name = ["gz.nrrd", "raw.nrrd", ".nii", ".nii.gz", "label.nrrd"][int(rng.integers(5))]
        data = originals[name]
        cut = int(rng.integers(0, len(data)))
        return f"{name} cut at {cut}/{len(data)}", _suffix(name), data[:cut]
    if kind == "niigz_truncate":
        data = originals[".nii.gz"]
        cut = int(rng.integers(1, len(data)))
        return f".nii.gz cut at {cut}/{len(data)}", ".nii.gz", data[:cut]
    if kind in ("bitflip", "header_bitflip"):
        name = ["gz.nrrd", "raw.nrrd", ".nii", ".nii.gz", "label.nrrd"][int(rng.integers(5))]
        data = bytearray(originals[name])
        if kind == "header_bitflip":
            if name.endswith(".nii.gz"):
                data, name = bytearray(gzip.decompress(bytes(data))), ".nii"
            span = 348 if name == ".nii" else _nrrd_header_end(bytes(data))
        else:
            span = len(data)
        where = rng.integers(0, span, size=int(rng.integers(1, 9)))
        for w in where:
            data[int(w)] ^= 1 << int(rng.integers(8))
        return f"{name} {kind} at {sorted(int(w) for w in where)}", _suffix(name), bytes(data)
    if kind == "nrrd_field":
        name = ["gz.nrrd", "raw.nrrd", "label.nrrd"][int(rng.integers(3))]
        field = list(NRRD_EDITS)[int(rng.integers(len(NRRD_EDITS)))]
        value = NRRD_EDITS[field][int(rng.integers(len(NRRD_EDITS[field])))]
        data = originals[name]
        head, body = data[: _nrrd_header_end(data)], data[_nrrd_header_end(data):]
        head = re.sub(rb"(?m)^" + re.escape(field.encode()) + rb":.*$", f"{field}: {value}".encode(), head)
        return f"{name} {field}: {value}", ".nrrd", head + body
    # nii_field / niigz_field
    field = list(NII_EDITS)[int(rng.integers(len(NII_EDITS)))]
    offset, fmt, values = NII_EDITS[field]
    value = values[int(rng.integers(len(values)))]
    data = bytearray(originals[".nii"])
    struct.pack_into(fmt, data, offset, *(value if isinstance(value, tuple) else (value,)))
    if kind == "niigz_field":
        return f".nii.gz {field}={value}", ".nii.gz", gzip.compress(bytes(data), compresslevel=1)
    return f".nii {field}={value}", ".nii", bytes(data)


def _suffix(name: str) -> str:
    return ".nii.gz" if name.endswith(".nii.gz") else ".nii" if name.endswith(".nii") else ".nrrd"


def write_cases(folder: Path, n: int, originals: dict[str, bytes], seed: int = SEED) -> dict[Path, str]:
    """``n`` mutated files in ``folder`` -> their description; kinds in turn, each case its own seed."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = {}
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        what, suffix, data = mutate(kind, np.random.default_rng([seed, i]), originals)
        path = folder / f"case{i:03d}_{kind}{suffix}"
        path.write_bytes(data)
        cases[path] = what
    return cases


# ---------------------------------------------------------------------------- running them


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _voxseq(args: list, timeout: float) -> tuple[int | str, str, str]:
    try:
        r = subprocess.run([*VOXSEQ, *map(str, args)], capture_output=True, text=True, encoding="utf-8",
                           errors="replace", timeout=timeout, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired as e:
        return "timeout", str(e.stdout or ""), str(e.stderr or "")
    return r.returncode, r.stdout, r.stderr


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


def _info_outcomes(cases: list[Path], timeout_per_case: float = 10.0) -> dict[Path, str]:
    """``voxseq info --json`` on all cases at once; per case "ok" (a JSON line), "error" (exactly one
    `voxseq: error: <path>: ...` line), or what went wrong. An unclean batch is re-run case by case."""
    rc, out, err = _voxseq(["info", "--json", *cases], 30 + timeout_per_case * len(cases))
    clean = rc in (0, 2) and "Traceback" not in err and all(ln.startswith("voxseq: error: ") for ln in _error_lines(err))
    if not clean and len(cases) > 1:
        return {c: o for case in cases for c, o in _info_outcomes([case], timeout_per_case).items()}
    return _classify(cases, rc, out, _error_lines(err), clean, err,
                     lambda line, case: line.startswith(f"voxseq: error: {case}: "))


def _classify(cases: list[Path], rc, out: str, errors: list[str], clean: bool, detail: str, named) -> dict[Path, str]:
    """Per case of one ``info --json`` batch: "ok" (its JSON line, no error naming it), "error" (exactly one
    error line naming it, ``named(line, case)``), or what went wrong; error lines naming no case spoil the "ok"s."""
    ok = {json.loads(ln)["path"] for ln in out.splitlines() if ln.startswith("{")}
    outcomes = {}
    for c in cases:
        about = [ln for ln in errors if named(ln, c)]
        if not clean:
            outcomes[c] = f"rc={rc}: {detail.strip()[-300:]}"
        elif str(c) in ok and not about:
            outcomes[c] = "ok"
        elif len(about) == 1 and str(c) not in ok:
            outcomes[c] = "error"
        else:
            outcomes[c] = f"unaccounted (rc={rc}): {about}"
    if clean and len(errors) != sum(o == "error" for o in outcomes.values()):
        extra = [ln for ln in errors if not any(named(ln, c) for c in cases)]
        outcomes = {c: o if o != "ok" else f"stray error lines {extra}" for c, o in outcomes.items()}
    return outcomes


def _prepare_outcomes(cases: list[Path], out: Path, timeout_per_case: float = 10.0) -> dict[Path, str]:
    """`voxseq prepare --on-error skip` on a manifest of all cases (one worker); per case "ok" (in the
    index) or "error" (skipped with a one-line reason naming the file). An unclean batch is re-run case
    by case, each as `voxseq prepare <file>` (exit 0, or 2 with one line naming the file)."""
    if len(cases) == 1:
        rc, _, err = _voxseq(["prepare", cases[0], "--out", out, "-j", "1"], 30 + timeout_per_case)
        lines = _error_lines(err)
        if rc == 0:
            return {cases[0]: "ok"}
        if rc == 2 and len(lines) == 1 and lines[0].startswith(f"voxseq: error: {cases[0]}: ") and "Traceback" not in err:
            return {cases[0]: "error"}
        return {cases[0]: f"rc={rc}: {err.strip()[-300:]}"}
    out.mkdir(parents=True, exist_ok=True)
    manifest = out.parent / f"{out.name}.jsonl"
    manifest.write_text("".join(json.dumps({"id": c.stem, "images": {"image": str(c)}}) + "\n" for c in cases))
    rc, _, err = _voxseq(["prepare", manifest, "--out", out, "-j", "1", "--on-error", "skip"],
                         30 + timeout_per_case * len(cases))
    if rc != 0 or err.strip():
        return {c: o for i, c in enumerate(cases)
                for c, o in _prepare_outcomes([c], out.parent / f"{out.name}_{i}", timeout_per_case).items()}
    done = {json.loads(ln)["id"] for ln in (out / "index.jsonl").read_text().splitlines()}
    skipped = {s["id"]: s["error"] for s in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    outcomes = {}
    for c in cases:
        reason = skipped.get(c.stem)
        if c.stem in done and reason is None:
            outcomes[c] = "ok"
        elif reason is not None and c.stem not in done and "\n" not in reason and str(c) in reason:
            outcomes[c] = "error"
        else:
            outcomes[c] = f"unaccounted: {reason!r}"
    return outcomes


def run_fuzz(folder: Path, n: int, originals: dict[str, bytes]) -> dict[str, dict[str, int]]:
    cases = write_cases(folder / "cases", n, originals)
    return tally(cases, _info_outcomes(list(cases)), _prepare_outcomes(list(cases), folder / "cache"),
                 "fuzz outcomes per mutation kind")


def tally(cases: dict[Path, str], info: dict[Path, str], prep: dict[Path, str], title: str) -> dict[str, dict[str, int]]:
    """Every case ended in a valid volume or a clean error, in `info` and in `prepare`; counts per kind."""
    bad = {f"{c.name} ({what})": (info[c], prep[c]) for c, what in cases.items()
           if info[c] not in ("ok", "error") or prep[c] not in ("ok", "error")}
    assert not bad, f"{len(bad)} of {len(cases)} cases did not end cleanly: {bad}"
    counts: dict[str, dict[str, int]] = {}
    for c in cases:
        kind = c.name.split("_", 1)[1].split(".")[0]
        counts.setdefault(kind, {"info_ok": 0, "info_error": 0, "prepare_ok": 0, "prepare_error": 0})
        counts[kind][f"info_{info[c]}"] += 1
        counts[kind][f"prepare_{prep[c]}"] += 1
    print(f"{title} ({len(cases)} cases): {json.dumps(counts)}")
    return counts


def test_fuzz_quick(tmp_path, originals):
    counts = run_fuzz(tmp_path, 42, originals)
    assert set(counts) == set(KINDS)
    totals = {k: sum(c[k] for c in counts.values()) for k in ("info_ok", "info_error", "prepare_error")}
    assert totals["info_error"] >= 10 and totals["info_ok"] >= 1  # the mutations bite, and not every one
    assert counts["truncate"]["info_ok"] == counts["niigz_truncate"]["info_ok"] == 0  # a cut file is never a volume


@pytest.mark.slow
def test_fuzz_many(tmp_path, originals):
    counts = run_fuzz(tmp_path, 245, originals)
    assert sum(sum(c.values()) for c in counts.values()) == 2 * 245
    assert counts["truncate"]["info_ok"] == counts["niigz_truncate"]["info_ok"] == 0


# ---------------------------------------------------------------------------- the fixes the fuzz asked for


def test_giant_header_is_refused_before_allocating(tmp_path, originals):
    """Headers that lie about their size: 2000^3 int16 voxels (16 GB, over the cap) in a 79 KB NRRD; 600 MB
    (under the cap) in a 227 KB NIfTI. Both fail from the header alone, under the 3 GB address-space limit."""
    data = originals["gz.nrrd"].replace(b"sizes: 45 120 21", b"sizes: 2000 2000 2000")
    (tmp_path / "giant.nrrd").write_bytes(data)
    data = bytearray(originals[".nii"])
    struct.pack_into("<hhh", data, 42, 1000, 1000, 300)  # 600 MB claimed by a 227 KB file: under the cap
    (tmp_path / "lying.nii").write_bytes(bytes(data))
    rc, out, err = _voxseq(["info", tmp_path / "giant.nrrd", tmp_path / "lying.nii"], 60)
    lines = _error_lines(err)
    assert rc == 2 and len(lines) == 2 and "Traceback" not in err
    assert lines[0].startswith(f"voxseq: error: {tmp_path / 'giant.nrrd'}: header claims size (2000, 2000, 2000)")
    assert "over the 4 GiB limit" in lines[0]
    assert lines[1].startswith(f"voxseq: error: {tmp_path / 'lying.nii'}: ") and "the file holds 227152" in lines[1]


def test_volume_byte_limit_is_configurable(tmp_path, samples, monkeypatch):
    from voxseq.io import VolumeReadError, read_volume

    monkeypatch.setenv("VOXSEQ_MAX_VOLUME_BYTES", str(100_000))  # breast1: 45*120*21 int16 = 226800 bytes
    with pytest.raises(VolumeReadError, match=r"breast1_image.nrrd: header claims size \(45, 120, 21\)"):
        read_volume(samples / "breast1_image.nrrd")
    monkeypatch.setenv("VOXSEQ_MAX_VOLUME_BYTES", str(226_800))
    assert read_volume(samples / "breast1_image.nrrd").shape_zyx == (21, 120, 45)


def test_truncated_plain_nifti_is_refused(tmp_path, originals):
    """ITK reads a .nii that stops early as if the missing voxels were there."""
    from voxseq.io import VolumeReadError, read_volume

    (tmp_path / "cut.nii").write_bytes(originals[".nii"][:100_000])
    with pytest.raises(VolumeReadError, match=r"cut.nii: truncated NIfTI file: its header needs 227152 bytes .* holds 100000"):
        read_volume(tmp_path / "cut.nii")


# ---------------------------------------------------------------------------- every other reader
#
# MetaImage (.mha, .mhd + .raw), DICOM series folders, HDF5, NPZ and DeepLesion PNG folders. A case is a
# file or a folder; `info` and `prepare` (a manifest with a spacing, which the array and PNG readers need)
# must end each as a volume or one line naming the case (or a file inside its folder), and print nothing of
# the native libraries (ITK's WARNING blocks, libpng, HDF5's error stack) on stdout or stderr.

SPACING = [0.8, 0.8, 2.0]
MHA_EDITS = {
    "NDims": ["2", "4", "0", "-1", "x"],
    "DimSize": ["100000 100000 100000", "0 24 6", "24 24", "a b c", "24 24 80000", "24 24 7", "24 24 5", "4294967297 2 2"],
    "ElementType": ["MET_FLOAT", "MET_BANANA", "MET_DOUBLE", "MET_UCHAR_ARRAY", "MET_LONG_LONG", "MET_OTHER"],
    "ElementSpacing": ["0 0 0", "nan 1 1", "-1 1 1", "1e308 1e308 1e308", "1 1", "inf 1 1"],
    "CompressedData": ["True", "banana"],
    "ElementNumberOfChannels": ["3", "0", "100000"],
    "HeaderSize": ["-1", "100000", "10"],
    "BinaryDataByteOrderMSB": ["True", "maybe"],
    "TransformMatrix": ["0 0 0 0 0 0 0 0 0", "nan 0 0 0 1 0 0 0 1", "1 0 0 1 0 0 0 0 1", "1 0 0"],
    "Offset": ["nan nan nan", "1 2", "1e308 0 0"],
    "ElementDataFile": ["missing.raw", "LIST", "../../../../etc/hostname", "LOCAL", ""],
}
DICOM_TAG_EDITS = {
    "SeriesInstanceUID": ["1.2.3.999", ""],
    "Rows": [0, 1, 65535, 16],
    "Columns": [0, 65535, 16],
    "BitsAllocated": [0, 8, 32, 7],
    "PixelRepresentation": [1, 7],
    "SamplesPerPixel": [3, 0],
    "ImagePositionPatient": [["nan", "0", "0"], ["0", "0", "0"], ["1e30", "0", "0"], ["0", "0"]],
    "ImageOrientationPatient": [["0", "0", "0", "0", "0", "0"], ["1", "0", "0", "1", "0", "0"], ["nan"] * 6],
    "PixelSpacing": [["0", "0"], ["-1", "1"], ["nan", "nan"], ["1e30", "1e30"]],
    "RescaleSlope": ["0", "nan", "1e30", "-1"],
    "RescaleIntercept": ["nan", "1e30"],
    "NumberOfFrames": ["5", "0"],
}
H5_VARIANTS = ["2d", "5d", "string", "compound", "complex", "bool", "spacing_nan", "spacing_short", "spacing_zero",
               "spacing_text", "axes_bogus", "two_datasets", "no_datasets", "huge_empty", "group_image", "scalar",
               "zero_size", "float_nan"]
NPZ_VARIANTS = ["2d", "5d", "object", "complex", "bool", "text", "spacing_nan", "spacing_short", "spacing_neg",
                "spacing_text", "two_arrays", "empty_zip", "lying_shape", "zero_size", "npy_in_npz_garbage", "float_inf"]
READER_KINDS = ["mha_field", "mha_cut", "mha_flip", "mhd_field", "mhd_raw", "dicom_slice", "dicom_missing",
                "dicom_mixed", "dicom_tag", "dicom_junk", "h5_bytes", "h5_struct", "npz_bytes", "npz_struct",
                "png_slice", "png_struct"]


@pytest.fixture(scope="module")
def reader_originals(samples, tmp_path_factory) -> dict:
    """Small good inputs of each kind, from a 24 x 24 x 6 crop of a real sample."""
    import SimpleITK as sitk

    from tests.conftest import write_dicom_series

    folder = tmp_path_factory.mktemp("reader_originals")
    img = sitk.ReadImage(str(samples / "breast1_image.nrrd"))[10:34, 40:64, 5:11]
    img.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(img, str(folder / "v.mha"), useCompression=False)
    sitk.WriteImage(img, str(folder / "v.mhd"), useCompression=False)
    write_dicom_series(img, folder / "dicom", "1.2.826.0.1.3680043.2.1125.7", shuffle_names=False)
    arr = sitk.GetArrayFromImage(img)  # (Z, Y, X) int16
    pngs = {}
    for z in range(arr.shape[0]):
        sitk.WriteImage(sitk.GetImageFromArray((arr[z].astype(np.int32) + 32768).astype(np.uint16)), str(folder / f"{z}.png"))
        pngs[f"{z:03d}.png"] = (folder / f"{z}.png").read_bytes()
    return {
        "arr": arr,
        "mha": (folder / "v.mha").read_bytes(),
        "mhd": (folder / "v.mhd").read_text(),
        "raw": (folder / "v.raw").read_bytes(),
        "dicom": {p.name: p.read_bytes() for p in sorted((folder / "dicom").iterdir())},
        "png": pngs,
    }


def _set_field(text: str, key: str, value: str) -> str:
    line = f"{key} = {value}"
    if re.search(rf"(?m)^{key} = .*$", text):
        return re.sub(rf"(?m)^{key} = .*$", lambda _: line, text)
    return text.replace("ElementDataFile", f"{line}\nElementDataFile", 1)


def _flip(data: bytes, rng: np.random.Generator, span: int | None = None) -> bytes:
    out = bytearray(data)
    for w in rng.integers(0, span or len(out), size=int(rng.integers(1, 9))):
        out[int(w)] ^= 1 << int(rng.integers(8))
    return bytes(out)


def _mangle(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """A truncation, bit flips (anywhere or in the first 1 KB), random bytes of the same length, or nothing."""
    how = ["cut", "flip", "head_flip", "random", "empty"][int(rng.integers(5))]
    if how == "cut":
        cut = int(rng.integers(0, len(data)))
        return f"cut at {cut}/{len(data)}", data[:cut]
    if how == "flip":
        return "bit flips", _flip(data, rng)
    if how == "head_flip":
        return "header bit flips", _flip(data, rng, min(1024, len(data)))
    if how == "random":
        return "random bytes", rng.integers(0, 256, len(data), dtype=np.uint8).tobytes()
    return "0 bytes", b""


def _write_dicom_folder(folder: Path, slices: dict[str, bytes]) -> None:
    folder.mkdir(parents=True)
    for name, data in slices.items():
        (folder / name).write_bytes(data)


def _edit_dicom(data: bytes, tag: str, value) -> bytes:
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    setattr(ds, tag, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _h5_case(path: Path, variant: str, arr: np.ndarray) -> None:
    import h5py

    xyz = np.ascontiguousarray(arr.transpose(2, 1, 0))
    with h5py.File(path, "w") as f:
        attrs = {"spacing": SPACING}
        if variant == "2d":
            f["image"] = xyz[:, :, 0]
        elif variant == "5d":
            f["image"] = xyz[None, None]
        elif variant == "string":
            f["image"] = np.array([b"abc"] * 8)
        elif variant == "compound":
            f["image"] = np.zeros((4, 4, 4), dtype=[("a", "i4"), ("b", "f4")])
        elif variant == "complex":
            f["image"] = xyz.astype(np.complex64)
        elif variant == "bool":
            f["image"] = xyz > 0
        elif variant == "scalar":
            f["image"] = np.float32(3)
        elif variant == "zero_size":
            f["image"] = np.zeros((0, 24, 6), np.int16)
        elif variant == "float_nan":
            f["image"] = np.full(xyz.shape, np.nan, np.float32)
        elif variant == "huge_empty":  # 200000^3 int16 claimed by a few KB: chunked, never written
            f.create_dataset("image", shape=(200000, 200000, 200000), dtype="i2", chunks=(16, 16, 16))
        elif variant == "group_image":
            f.create_group("image")["data"] = xyz
        elif variant == "two_datasets":
            f["a"], f["b"] = xyz, xyz
        elif variant == "no_datasets":
            f.create_group("nothing")
        else:
            f["image"] = xyz
        if variant.startswith("spacing_"):
            attrs["spacing"] = {"spacing_nan": [np.nan, 1, 1], "spacing_short": [1.0, 1.0],
                                "spacing_zero": [0.0, 0.0, 0.0], "spacing_text": "thin"}[variant]
        if variant == "axes_bogus":
            attrs["axes"] = "yzx"
        for k, v in attrs.items():
            f.attrs[k] = v


def _npz_case(path: Path, variant: str, arr: np.ndarray) -> None:
    import zipfile

    spacing = np.array(SPACING)
    arrays = {"image": arr, "spacing": spacing}
    if variant == "2d":
        arrays["image"] = arr[0]
    elif variant == "5d":
        arrays["image"] = arr[None, None]
    elif variant == "object":
        arrays["image"] = np.array([arr, None], dtype=object)
    elif variant == "complex":
        arrays["image"] = arr.astype(np.complex64)
    elif variant == "bool":
        arrays["image"] = arr > 0
    elif variant == "text":
        arrays["image"] = np.array(["a", "b"])
    elif variant == "zero_size":
        arrays["image"] = np.zeros((0, 24, 24), np.int16)
    elif variant == "float_inf":
        arrays["image"] = np.full(arr.shape, np.inf, np.float32)
    elif variant.startswith("spacing_"):
        arrays["spacing"] = {"spacing_nan": np.array([np.nan, 1, 1]), "spacing_short": np.array([1.0, 1.0]),
                             "spacing_neg": np.array([-1.0, 1, 1]), "spacing_text": np.array(["a", "b", "c"])}[variant]
    elif variant == "two_arrays":
        arrays = {"a": arr, "b": arr}
    if variant == "object":
        _savez_object(path, arrays)
    elif variant == "empty_zip":
        zipfile.ZipFile(path, "w").close()
    elif variant == "npy_in_npz_garbage":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("image.npy", b"\x93NUMPY\x01\x00garbage that is not a header")
    elif variant == "lying_shape":  # an uncompressed member whose header claims 10^15 voxels
        np.savez(path, **arrays)
        data = path.read_bytes()
        old = f"'shape': {arr.shape}, }}".encode()
        new = b"'shape': (99999, 99999, 99999), }"
        at = data.index(old) + len(old)
        assert data[at:at + len(new) - len(old)].strip() == b""  # the header's padding takes the longer shape
        path.write_bytes(data[:at - len(old)] + new + data[at + len(new) - len(old):])
    else:
        np.savez_compressed(path, **arrays)


def _savez_object(path: Path, arrays: dict) -> None:
    import io
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        for k, v in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, v, allow_pickle=True)
            z.writestr(f"{k}.npy", buf.getvalue())


def _png_ihdr(data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(">II", out, 16, width, height)  # IHDR width, height (its CRC now fails)
    return bytes(out)


def write_reader_case(folder: Path, i: int, kind: str, orig: dict, seed: int = SEED) -> tuple[Path, str]:
    """One seeded case of ``kind`` under ``folder``: (the file or folder to read, its description)."""
    rng = np.random.default_rng([seed, 7, i])
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / f"case{i:03d}_{kind}"
    if kind in ("mha_field", "mhd_field"):
        key = list(MHA_EDITS)[int(rng.integers(len(MHA_EDITS)))]
        value = MHA_EDITS[key][int(rng.integers(len(MHA_EDITS[key])))]
        if kind == "mha_field":
            data = orig["mha"]
            end = data.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
            head = _set_field(data[:end].decode(), key, value).encode()
            path = base.with_suffix(".mha")
            path.write_bytes(head + data[end:])
        else:
            path = base.with_suffix(".mhd")
            text = orig["mhd"].replace("ElementDataFile = v.raw", f"ElementDataFile = {path.stem}.raw")
            path.write_text(_set_field(text, key, value))
            path.with_suffix(".raw").write_bytes(orig["raw"])
        return path, f"{key} = {value}"
    if kind in ("mha_cut", "mha_flip"):
        path = base.with_suffix(".mha")
        data = orig["mha"]
        if kind == "mha_cut":
            cut = int(rng.integers(0, len(data)))
            path.write_bytes(data[:cut])
            return path, f"cut at {cut}/{len(data)}"
        head = data.index(b"LOCAL\n") + 6
        where = "header" if rng.random() < 0.6 else "anywhere"
        path.write_bytes(_flip(data, rng, head if where == "header" else None))
        return path, f"bit flips {where}"
    if kind == "mhd_raw":
        path = base.with_suffix(".mhd")
        path.write_text(orig["mhd"].replace("ElementDataFile = v.raw", f"ElementDataFile = {path.stem}.raw"))
        how, raw = _mangle(orig["raw"], rng)
        if rng.random() < 0.2:
            how, raw = "raw file missing", None
        elif rng.random() < 0.2:
            how, raw = "raw file longer", orig["raw"] + b"\0" * 999
        if raw is not None:
            path.with_suffix(".raw").write_bytes(raw)
        return path, f"raw: {how}"
    if kind.startswith("dicom"):
        slices = dict(orig["dicom"])
        names = list(slices)
        if kind == "dicom_slice":
            victim = names[int(rng.integers(len(names)))]
            how, slices[victim] = _mangle(slices[victim], rng)
            what = f"{victim}: {how}"
        elif kind == "dicom_missing":
            k = int(rng.integers(1, len(names)))
            gone = sorted(rng.choice(len(names), size=k, replace=False).tolist())
            for g in gone:
                del slices[names[g]]
            what = f"slices {gone} of {len(names)} removed"
        elif kind == "dicom_mixed":
            k = int(rng.integers(1, len(names)))
            moved = sorted(rng.choice(len(names), size=k, replace=False).tolist())
            for m in moved:
                slices[names[m]] = _edit_dicom(slices[names[m]], "SeriesInstanceUID", "1.2.826.0.1.3680043.2.1125.8")
            what = f"slices {moved} in a second series"
        elif kind == "dicom_tag":
            tag = list(DICOM_TAG_EDITS)[int(rng.integers(len(DICOM_TAG_EDITS)))]
            value = DICOM_TAG_EDITS[tag][int(rng.integers(len(DICOM_TAG_EDITS[tag])))]
            which = [names[int(rng.integers(len(names)))]] if rng.random() < 0.5 else names
            for n in which:
                slices[n] = _edit_dicom(slices[n], tag, value)
            what = f"{tag} = {value} in {len(which)} slice(s)"
        else:  # dicom_junk: random bytes beside the series, or instead of it
            junk = rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()
            name = ["junk.dcm", "junk", "DICOMDIR", "notes.txt"][int(rng.integers(4))]
            if rng.random() < 0.5:
                slices = {}
                what = f"only random bytes ({name})"
            else:
                what = f"random bytes beside the series ({name})"
            slices[name] = b"DICM" + junk if rng.random() < 0.3 else junk
        _write_dicom_folder(base, slices)
        return base, what
    if kind == "h5_struct":
        variant = H5_VARIANTS[i // len(READER_KINDS) % len(H5_VARIANTS)]  # the kind's own round: every variant in turn
        path = base.with_suffix(".h5")
        _h5_case(path, variant, orig["arr"])
        return path, variant
    if kind == "npz_struct":
        variant = NPZ_VARIANTS[i // len(READER_KINDS) % len(NPZ_VARIANTS)]
        path = base.with_suffix(".npz")
        _npz_case(path, variant, orig["arr"])
        return path, variant
    if kind in ("h5_bytes", "npz_bytes"):
        path = base.with_suffix(".h5" if kind == "h5_bytes" else ".npz")
        good = path.with_name(path.stem + "_good" + path.suffix)
        (_h5_case if kind == "h5_bytes" else _npz_case)(good, "", orig["arr"])
        how, data = _mangle(good.read_bytes(), rng)
        good.unlink()
        path.write_bytes(data)
        return path, how
    # png_slice / png_struct
    slices = dict(orig["png"])
    names = list(slices)
    if kind == "png_slice":
        victim = names[int(rng.integers(len(names)))]
        how, slices[victim] = _mangle(slices[victim], rng)
        what = f"{victim}: {how}"
    else:
        variant = ["one_slice", "huge_ihdr", "zero_ihdr", "rgb", "other_size", "not_numbered", "jpeg_named_png",
                   "8bit"][i // len(READER_KINDS) % 8]
        victim = names[int(rng.integers(len(names)))]
        import SimpleITK as sitk

        tmp = folder / f"tmp{i}.png"
        if variant == "one_slice":
            slices = {names[0]: slices[names[0]]}
        elif variant == "huge_ihdr":
            slices[victim] = _png_ihdr(slices[victim], 100000, 100000)
        elif variant == "zero_ihdr":
            slices[victim] = _png_ihdr(slices[victim], 0, 0)
        elif variant in ("rgb", "other_size", "8bit", "jpeg_named_png"):
            if variant == "rgb":
                im = sitk.Compose(*[sitk.GetImageFromArray(np.zeros((24, 24), np.uint8))] * 3)
            elif variant == "other_size":
                im = sitk.GetImageFromArray(np.full((20, 24), 32768, np.uint16))
            else:
                im = sitk.GetImageFromArray(np.zeros((24, 24), np.uint8))
            sitk.WriteImage(im, str(tmp.with_suffix(".jpg" if variant == "jpeg_named_png" else ".png")))
            slices[victim] = tmp.with_suffix(".jpg" if variant == "jpeg_named_png" else ".png").read_bytes()
        elif variant == "not_numbered":
            slices = {f"slice_{k}.png" if k != names[0] else k: v for k, v in slices.items()}
        what = f"{variant} ({victim})"
    _write_dicom_folder(base, slices)
    return base, what


def _named(line: str, case: Path) -> bool:
    """An error line about the case itself or about a file inside its folder."""
    return line.startswith((f"voxseq: error: {case}: ", f"voxseq: error: {case}/", f"voxseq: error: {case}::"))


def _reader_info_outcomes(cases: list[Path], timeout_per_case: float = 10.0) -> dict[Path, str]:
    """As :func:`_info_outcomes`, for files and folders, and with nothing but JSON lines on stdout."""
    rc, out, err = _voxseq(["info", "--json", *cases], 30 + timeout_per_case * len(cases))
    errors = _error_lines(err)
    clean = (rc in (0, 2) and "Traceback" not in err and all(ln.startswith("voxseq: error: ") for ln in errors)
             and all(ln.startswith("{") for ln in out.splitlines() if ln.strip()))
    if not clean and len(cases) > 1:
        return {c: o for case in cases for c, o in _reader_info_outcomes([case], timeout_per_case).items()}
    return _classify(cases, rc, out, errors, clean, out + err, _named)


def _reader_prepare_outcomes(cases: list[Path], out: Path, timeout_per_case: float = 10.0) -> dict[Path, str]:
    """`voxseq prepare --on-error skip` on a manifest of the cases, each with a spacing; an unclean batch is
    re-run case by case (a one-record manifest, --on-error stop: exit 0, or 2 with one line naming the case)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = out.parent / f"{out.name}.jsonl"
    manifest.write_text("".join(json.dumps({"id": c.name.split(".")[0], "images": {"image": str(c)}, "spacing": SPACING})
                                + "\n" for c in cases))
    single = len(cases) == 1
    rc, stdout, err = _voxseq(["prepare", manifest, "--out", out, "-j", "1", "--on-error", "stop" if single else "skip"],
                              30 + timeout_per_case * len(cases))
    native = [ln for ln in stdout.splitlines() if ln.strip() and not ln.startswith(("prepare", "  "))]
    if single:
        lines = _error_lines(err)
        if native:
            return {cases[0]: f"stdout: {native}"}
        if rc == 0 and not lines:
            return {cases[0]: "ok"}
        if rc == 2 and len(lines) == 1 and lines[0].startswith("voxseq: error: ") and str(cases[0]) in lines[0]:
            return {cases[0]: "error"}
        return {cases[0]: f"rc={rc}: {err.strip()[-300:]}"}
    if rc != 0 or err.strip() or native:
        return {c: o for i, c in enumerate(cases)
                for c, o in _reader_prepare_outcomes([c], out.parent / f"{out.name}_{i}", timeout_per_case).items()}
    done = {json.loads(ln)["id"] for ln in (out / "index.jsonl").read_text().splitlines()}
    skipped = {s["id"]: s["error"] for s in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    outcomes = {}
    for c in cases:
        rid = c.name.split(".")[0]
        reason = skipped.get(rid)
        if rid in done and reason is None:
            outcomes[c] = "ok"
        elif reason is not None and rid not in done and "\n" not in reason and str(c) in reason:
            outcomes[c] = "error"
        else:
            outcomes[c] = f"unaccounted: {reason!r}"
    return outcomes


def run_reader_fuzz(folder: Path, n: int, orig: dict) -> dict[str, dict[str, int]]:
    cases = dict(write_reader_case(folder / "cases", i, READER_KINDS[i % len(READER_KINDS)], orig) for i in range(n))
    return tally(cases, _reader_info_outcomes(list(cases)), _reader_prepare_outcomes(list(cases), folder / "cache"),
                 "reader fuzz outcomes per kind")


def test_reader_fuzz_quick(tmp_path, reader_originals):
    counts = run_reader_fuzz(tmp_path, 3 * len(READER_KINDS), reader_originals)
    assert set(counts) == set(READER_KINDS)
    assert sum(c["info_error"] for c in counts.values()) >= 8
    assert sum(c["prepare_ok"] for c in counts.values()) >= 1


@pytest.mark.slow
def test_reader_fuzz_many(tmp_path, reader_originals):
    n = 16 * len(READER_KINDS)  # 256
    counts = run_reader_fuzz(tmp_path, n, reader_originals)
    assert sum(sum(c.values()) for c in counts.values()) == 2 * n


def test_random_bytes_folder_is_one_line_without_itk_warnings(tmp_path):
    """Random bytes taken for a DICOM folder candidate: GDCM's WARNING block used to precede the error."""
    (tmp_path / "scan").mkdir()
    (tmp_path / "scan" / "IM0001").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    rc, out, err = _voxseq(["info", tmp_path / "scan"], 60)
    assert rc == 2 and out == "" and _error_lines(err) == [
        f"voxseq: error: {tmp_path / 'scan'}: folder holds no volume file and no DICOM series"], err


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path, reader_originals):
    """ITK reads it with a WARNING about non-uniform sampling and a wrong, averaged spacing."""
    from voxseq.io import VolumeReadError, read_volume

    slices = dict(reader_originals["dicom"])
    del slices[sorted(slices)[2]]
    _write_dicom_folder(tmp_path / "gap", slices)
    with pytest.raises(VolumeReadError, match=r"gap: DICOM series .* has missing slices or uneven spacing: gaps between "
                                              r"slices from 2\.1 to 4\.2 mm \(5 slices\)"):
        read_volume(tmp_path / "gap")
    slices = dict(reader_originals["dicom"])
    del slices[sorted(slices)[0]]  # an end slice gone: still an evenly spaced volume
    _write_dicom_folder(tmp_path / "end", slices)
    assert read_volume(tmp_path / "end").shape_zyx[0] == 5


def test_array_headers_claiming_huge_shapes_are_refused_before_reading(tmp_path, reader_originals):
    from voxseq.io import VolumeReadError, read_volume

    _npz_case(tmp_path / "lie.npz", "lying_shape", reader_originals["arr"])
    with pytest.raises(VolumeReadError, match=r"lie.npz: array of shape \(99999, 99999, 99999\) would take"):
        read_volume(tmp_path / "lie.npz")
    _h5_case(tmp_path / "huge.h5", "huge_empty", reader_originals["arr"])
    with pytest.raises(VolumeReadError, match=r"huge.h5::image: array of shape \(200000, 200000, 200000\) would take"):
        read_volume(tmp_path / "huge.h5")
    _h5_case(tmp_path / "nan.h5", "spacing_nan", reader_originals["arr"])
    with pytest.raises(VolumeReadError, match=r"spacing \[nan, 1.0, 1.0\] must be three finite, positive numbers"):
        read_volume(tmp_path / "nan.h5")
