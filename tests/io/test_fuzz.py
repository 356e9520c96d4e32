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
    ok = {json.loads(ln)["path"] for ln in out.splitlines() if ln.startswith("{")}
    errors = _error_lines(err)
    outcomes = {}
    for c in cases:
        named = [ln for ln in errors if ln.startswith(f"voxseq: error: {c}: ")]
        if not clean:
            outcomes[c] = f"rc={rc}: {err.strip()[-300:]}"
        elif str(c) in ok and not named:
            outcomes[c] = "ok"
        elif len(named) == 1 and str(c) not in ok:
            outcomes[c] = "error"
        else:
            outcomes[c] = f"unaccounted (rc={rc}): {named}"
    if clean and len(errors) != sum(o == "error" for o in outcomes.values()):
        extra = [ln for ln in errors if not any(ln.startswith(f"voxseq: error: {c}: ") for c in cases)]
        for c in cases:
            outcomes[c] = outcomes[c] if outcomes[c] != "ok" else f"stray error lines {extra}"
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
    info = _info_outcomes(list(cases))
    prep = _prepare_outcomes(list(cases), folder / "cache")
    bad = {f"{c.name} ({what})": (info[c], prep[c]) for c, what in cases.items()
           if info[c] not in ("ok", "error") or prep[c] not in ("ok", "error")}
    assert not bad, f"{len(bad)} of {n} cases did not end cleanly: {bad}"
    counts: dict[str, dict[str, int]] = {}
    for c in cases:
        kind = c.name.split("_", 1)[1].split(".")[0]
        counts.setdefault(kind, {"info_ok": 0, "info_error": 0, "prepare_ok": 0, "prepare_error": 0})
        counts[kind][f"info_{info[c]}"] += 1
        counts[kind][f"prepare_{prep[c]}"] += 1
    print(f"fuzz outcomes per mutation kind ({n} cases): {json.dumps(counts)}")
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
