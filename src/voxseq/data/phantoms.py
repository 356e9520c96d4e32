"""Deterministic synthetic phantoms: CT torsos and 4-contrast brain MRIs, with masks, lesions and text.

Every demo and most tests run on these, on a CPU, so they are fast (vectorised numpy, well under a
second for a 128 x 128 x 128 torso) and rich: the anatomy is laid out the way a real body is, so it is
predictable from context (what a next-token model can learn), and each organ carries a sentence
(what a vision-language model can be paired with).

CT torso (``make_ct_phantom``). Patient coordinates in mm, LPS (+x patient left, +y posterior,
+z superior); z = 0 is the pelvic floor, the lung apices are near z = 590. A scan covers the chest,
the abdomen, or both, with per-seed field of view, slice count and spacing.

======  ==============  ==========  =======================================================
label   organ           HU (mean)   notes
======  ==============  ==========  =======================================================
0       background      -1000       air around the patient
1       body            -100 / 40   subcutaneous fat ring, soft tissue and bowel inside
2       lung_right      -850        with vessels (~-600..40); pleural effusion 15 HU
3       lung_left       -850
4       heart           45          enlarged with cardiomegaly
5       liver           60          hypodense lesion 15 HU
6       spleen          50
7       kidney_right    150         cortex; cyst 5 HU
8       kidney_left     150
9       aorta           200         contrast-enhanced
10      bone            250..700    vertebrae (with discs) and ribs; lytic lesion 90 HU
======  ==============  ==========  =======================================================

Version 2 (``version=2``, the CPU proxy of ``docs/reproducing.md``) keeps the anatomy and findings of a
seed and changes what tells tissues apart. Soft-tissue organs get one shared level (45-58 HU) plus a
per-patient offset (sd 12 HU), so their intensity ranges overlap across patients, and a texture of their
own: striated muscle, a granular liver with bright vessels, a homogeneous spleen, kidneys with a bright
cortex around darker medulla, a heart with a blood pool inside a darker wall. Each lesion category has one
appearance across patients (liver lesions hypodense with an enhancing rim, lytic bone lesions with a
sclerotic margin, lung nodules with a calcified centre, kidney cysts homogeneous water). MRI tissues tie
in at least one contrast for every pair of brain tissues, with a per-patient gain on each contrast, so
only the contrasts together separate them.

Brain MRI (``make_mri_phantom``): t1n, t1c, t2w, t2f channels (float, arbitrary units) of one head
with scalp, skull, CSF, grey and white matter, ventricles and a glioma-like lesion; labels follow
BraTS 2023 (1 necrotic core, 2 oedema, 3 enhancing tumour).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from voxseq.data.manifest import Box, Record, write_manifest
from voxseq.io.volume import Volume, write_volume

ORGANS: dict[str, int] = {
    "background": 0, "body": 1, "lung_right": 2, "lung_left": 3, "heart": 4, "liver": 5, "spleen": 6,
    "kidney_right": 7, "kidney_left": 8, "aorta": 9, "bone": 10,
}
# Organs that carry a sentence, and the labels that make them up.
SENTENCE_ORGANS: dict[str, tuple[int, ...]] = {
    "lung": (2, 3), "heart": (4,), "liver": (5,), "spleen": (6,), "kidney": (7, 8), "aorta": (9,), "bone": (10,),
}
ABNORMALITIES = ("lung nodule", "pleural effusion", "cardiomegaly", "liver lesion", "kidney cyst", "bone lesion")
# ``findings="ct-rate"``: the CT-RATE labels a phantom can model (mostly large or diffuse), drawn at about the
# rates of CT-RATE's training labels (Hamamci et al. 2024), beside the three abdominal findings at 0.4.
CT_RATE_RATES: dict[str, float] = {
    "lung nodule": 0.45, "pleural effusion": 0.12, "cardiomegaly": 0.11, "emphysema": 0.20, "atelectasis": 0.26,
    "consolidation": 0.17, "pericardial effusion": 0.07, "arterial wall calcification": 0.28,
    "coronary artery wall calcification": 0.26, "liver lesion": 0.4, "kidney cyst": 0.4, "bone lesion": 0.4,
}
FINDING_SETS = {"basic": ABNORMALITIES, "ct-rate": tuple(CT_RATE_RATES)}
MRI_CONTRASTS = ("t1n", "t1c", "t2w", "t2f")
BRATS_LABELS = {"background": 0, "necrotic_core": 1, "oedema": 2, "enhancing": 3}
PHANTOM_VERSIONS = (1, 2)
# version 2: the shared soft-tissue level each organ's per-patient mean HU is drawn around (sd 12 HU)
V2_SOFT_TISSUE_HU = {"muscle": 45.0, "heart": 50.0, "liver": 55.0, "spleen": 55.0, "kidney": 58.0}
SCAN_RANGES_MM = {"chest": (360.0, 600.0), "abdomen": (140.0, 420.0), "chest_abdomen": (140.0, 600.0)}


@dataclass
class CTPhantom:
    image: Volume  # int16 HU, (Z, Y, X)
    label: Volume  # uint8 organ ids (ORGANS)
    lesions: list[Box]  # in the volume's voxel grid, (x, y, z) order
    lesion_mask: np.ndarray  # bool (Z, Y, X)
    sentences: dict[str, str]
    report: str
    abnormalities: dict[str, int]
    scan: str


@dataclass
class MRIPhantom:
    image: Volume  # float32 (4, Z, Y, X): t1n, t1c, t2w, t2f
    label: Volume  # uint8 BraTS labels
    lesions: list[Box]
    contrasts: tuple[str, ...] = MRI_CONTRASTS
    sentences: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------- geometry helpers


def _ellipsoid(z, y, x, center, radii) -> np.ndarray:
    """Normalised squared distance of each voxel to an axis-aligned ellipsoid (< 1 inside)."""
    return ((x - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2 + ((z - center[2]) / radii[2]) ** 2


def _box_of(mask: np.ndarray) -> list[int] | None:
    """[x0, y0, z0, x1, y1, x1] (stop exclusive) of a (Z, Y, X) mask, or None when empty."""
    if not mask.any():
        return None
    idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    (z0, z1), (y0, y1), (x0, x1) = [(int(i[0]), int(i[-1]) + 1) for i in idx]
    return [x0, y0, z0, x1, y1, z1]


def _smooth(a: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(a, sigma, mode="nearest")


def _pick_inside(rng, mask: np.ndarray, zz, yy, xx) -> tuple[float, float, float] | None:
    """A random point (mm) inside ``mask``, drawn half-way between a random voxel and the centroid,
    so lesions sit inside their organ rather than on its border."""
    idx = np.flatnonzero(mask)
    if len(idx) < 8:
        return None
    k = idx[rng.integers(len(idx))]
    pts = np.stack([xx.ravel()[idx], yy.ravel()[idx], zz.ravel()[idx]])
    centroid = pts.mean(axis=1)
    p = np.array([xx.ravel()[k], yy.ravel()[k], zz.ravel()[k]])
    return tuple(float(v) for v in (p + centroid) / 2)  # type: ignore[return-value]


# ---------------------------------------------------------------------------- CT torso


def make_ct_phantom(seed: int, size_xy: int = 128, max_slices: int = 160, scan: str | None = None,
                    abnormalities: dict[str, int] | None = None, version: int = 1,
                    findings: str = "basic") -> CTPhantom:
    """One synthetic CT torso. Same seed, same phantom (byte for byte).

    ``size_xy``: in-plane voxels (the field of view, 340-400 mm, sets the spacing); ``scan``: chest,
    abdomen or chest_abdomen (default: drawn from the seed); ``abnormalities``: force findings on (1)
    or off (0), others are drawn with probability ~0.4. ``version`` 2 gives the soft-tissue organs
    overlapping intensities and their own textures, and each lesion category one appearance
    (module docstring); the anatomy, labels and findings are those of version 1 for the same seed.
    ``findings``: "basic" (the six of ``ABNORMALITIES``) or "ct-rate": the CT-RATE labels a phantom can
    model, at CT-RATE's rates (``CT_RATE_RATES``; emphysema, atelectasis, consolidation, pericardial effusion,
    aortic and coronary wall calcification besides the six), drawn from a generator of their own.
    """
    _check_version(version)
    if findings not in FINDING_SETS:
        raise ValueError(f"phantom findings must be one of {tuple(FINDING_SETS)}, not {findings!r}")
    rng = np.random.default_rng(seed)
    scan = scan or ("chest", "abdomen", "chest_abdomen")[int(rng.integers(3))]
    z_lo, z_hi = SCAN_RANGES_MM[scan]
    z_lo += rng.uniform(-20, 20)
    z_hi += rng.uniform(-20, 10)
    fov = rng.uniform(340, 400)
    sxy = fov / size_xy
    sz = float(rng.choice([2.0, 2.5, 3.0, 4.0, 5.0]))
    nz = int(min(max_slices, max(24, round((z_hi - z_lo) / sz))))
    z_hi = z_lo + nz * sz
    z = (z_lo + (np.arange(nz, dtype=np.float32) + 0.5) * sz)[:, None, None]
    y = (-fov / 2 + (np.arange(size_xy, dtype=np.float32) + 0.5) * sxy)[None, :, None]
    x = (-fov / 2 + (np.arange(size_xy, dtype=np.float32) + 0.5) * sxy)[None, None, :]
    zz, yy, xx = np.broadcast_arrays(z, y, x)

    found = {a: int(rng.random() < 0.4) for a in ABNORMALITIES}
    extra_rng = np.random.default_rng([seed, 2024])  # ct-rate findings: anatomy and basic draws stay as they were
    if findings == "ct-rate":
        found = {a: int(extra_rng.random() < rate) for a, rate in CT_RATE_RATES.items()}
    found.update(abnormalities or {})
    j = lambda s: 1.0 + rng.uniform(-s, s)  # noqa: E731 - per-seed size jitter

    label = np.zeros((nz, size_xy, size_xy), np.uint8)
    hu = np.full(label.shape, -1000.0, np.float32)

    # body: ellipse whose size breathes slowly along z; fat ring outside, soft tissue inside
    ax = 150 * j(0.08) * (1 + 0.06 * np.sin(z / 90.0 + seed))
    ay = 105 * j(0.08) * (1 + 0.05 * np.cos(z / 70.0 + seed))
    r_body = (x / ax) ** 2 + ((y - 5) / ay) ** 2
    body = r_body < 1
    label[body] = ORGANS["body"]
    hu[body] = -100.0
    inner = r_body < 0.78
    hu[inner] = 35.0
    # bowel texture in the abdomen: soft tissue with small gas pockets
    gut = inner & (zz < 260) & (zz > 60)
    gas = (np.sin(xx / 9.0 + seed) * np.sin(yy / 7.0) * np.sin(zz / 8.0 + 2 * seed) > 0.85) & gut & (yy < 30)
    hu[gas] = -700.0

    def put(name: str, mask: np.ndarray, value: float) -> None:
        label[mask] = ORGANS[name]
        hu[mask] = value

    # lungs: ellipsoids whose lower surface is the diaphragm dome
    lz = 470 * j(0.03)
    for name, side in (("lung_right", -1), ("lung_left", 1)):
        lung = _ellipsoid(zz, yy, xx, (side * 68 * j(0.06), 0, lz), (52 * j(0.08), 72 * j(0.06), 125 * j(0.06))) < 1
        lung &= body
        vessels = (np.abs(np.sin(xx / 6.0 + side + seed) * np.sin(yy / 5.0 + seed) * np.cos(zz / 6.0)) > 0.93)
        put(name, lung, -850.0)
        hu[lung & vessels] = -450.0
    # heart between the lungs, anterior, left of midline
    heart_scale = 1.3 if found["cardiomegaly"] else 1.0
    heart_r = _ellipsoid(zz, yy, xx, (18, -35, lz - 60), np.array([55, 42, 50]) * heart_scale * j(0.05))
    heart = heart_r < 1
    put("heart", heart & body, 45.0)
    # liver: patient's right (negative x), below the right lung dome
    liver = _ellipsoid(zz, yy, xx, (-62 * j(0.05), 0, 335 * j(0.03)), (78 * j(0.08), 75 * j(0.06), 70 * j(0.08))) < 1
    liver &= label != ORGANS["lung_right"]
    put("liver", liver & body, 60.0)
    spleen = _ellipsoid(zz, yy, xx, (88 * j(0.05), 35, 330 * j(0.03)), (28 * j(0.1), 40 * j(0.1), 45 * j(0.1))) < 1
    put("spleen", spleen & ~liver & body, 50.0)
    kidney_r = []  # normalised distance to each kidney's centre (version 2: cortex and medulla)
    for name, side in (("kidney_right", -1), ("kidney_left", 1)):
        kz = 265 * j(0.03) + (10 if side < 0 else 0)  # the right kidney sits a little lower
        r_k = _ellipsoid(zz, yy, xx, (side * 62, 58, kz), (27 * j(0.08), 30 * j(0.08), 52 * j(0.08)))
        kidney_r.append(r_k)
        put(name, (r_k < 1) & body, 150.0)
    # aorta: tube anterior-left of the spine
    aorta = ((xx - 15) ** 2 + (yy - 28) ** 2 < (12 * j(0.1)) ** 2) & (zz > 150) & (zz < 520) & body
    put("aorta", aorta, 200.0)
    # spine: vertebral bodies every ~30 mm separated by discs; posterior midline through every slice
    period = 30 * j(0.04)
    disc = (np.mod(zz + seed * 7, period) < 5)
    vert = ((xx / 18) ** 2 + ((yy - 62) / 16) ** 2 < 1) & body
    put("bone", vert & ~disc, 300.0)
    hu[vert & disc] = 80.0
    canal = (xx / 7) ** 2 + ((yy - 86) / 7) ** 2 < 1
    spinous = (np.abs(xx) < 4) & (yy > 92) & (yy < 108) & ~disc
    put("bone", spinous & body, 420.0)
    hu[canal & body] = 20.0
    label[canal & body] = ORGANS["body"]
    # ribs in the chest: thin arcs of an inner ellipse, every ~25 mm
    rib_r = (x / (ax * 0.93)) ** 2 + ((y - 5) / (ay * 0.93)) ** 2
    ribs = (np.abs(rib_r - 1) < 0.07) & (np.mod(zz + seed * 3, 25) < 8) & (zz > 330) & (yy > -ay * 0.7)
    put("bone", ribs & body, 700.0)
    if version >= 2:
        organ_hu = _retexture_v2(seed, hu, label, (zz, yy, xx), (sxy, sxy, sz), heart_r, np.minimum(*kidney_r))

    else:
        organ_hu = {}
    # lesions, placed inside their organ where the organ is in view
    lesion_mask = np.zeros(label.shape, bool)
    lesions: list[Box] = []
    sizes: dict[str, Any] = {}  # finding -> diameter in mm (and the side of a consolidation)

    def lesion(finding: str, organ_mask: np.ndarray, category: str, radius_mm: float, value: float) -> None:
        c = _pick_inside(rng, organ_mask, zz, yy, xx)
        if c is None:
            found[finding] = 0
            return
        d = _ellipsoid(zz, yy, xx, c, (radius_mm, radius_mm, radius_mm))
        ball = (d < 1) & organ_mask
        box = _box_of(ball)
        if box is None:
            found[finding] = 0
            return
        hu[ball] = value
        if version >= 2:  # one appearance per category, whatever the patient
            _lesion_pattern_v2(category, hu, ball, np.sqrt(d), organ_hu)
        lesion_mask[ball] = True
        lesions.append(Box(category, box))
        sizes[finding] = 2 * radius_mm

    lungs = (label == ORGANS["lung_right"]) | (label == ORGANS["lung_left"])
    if found["lung nodule"]:
        lesion("lung nodule", lungs, "lung", rng.uniform(4, 10), 30.0)
    if found["liver lesion"]:
        lesion("liver lesion", label == ORGANS["liver"], "liver", rng.uniform(6, 16), 15.0)
    if found["kidney cyst"]:
        kid = (label == ORGANS["kidney_right"]) | (label == ORGANS["kidney_left"])
        lesion("kidney cyst", kid, "kidney", rng.uniform(6, 14), 5.0)
    if found["bone lesion"]:
        lesion("bone lesion", (label == ORGANS["bone"]) & vert, "bone", rng.uniform(5, 9), 90.0)  # vertebral body
    regions: dict[str, np.ndarray] = {}  # diffuse finding -> where it was painted (ct-rate findings)
    if found["pleural effusion"]:
        eff = (label == ORGANS["lung_right"]) & (yy > 35) & (zz < lz - 40)  # dependent, posterior base
        if eff.sum() > 20:
            hu[eff] = 15.0
            regions["pleural effusion"] = eff
        else:
            found["pleural effusion"] = 0
    if findings == "ct-rate":
        regions.update(_ct_rate_findings(extra_rng, found, hu, label, (zz, yy, xx), (sxy, sxy, sz), lz, heart_r,
                                         aorta, sizes))

    present = {name: any((label == v).any() for v in ids) for name, ids in SENTENCE_ORGANS.items()}
    for finding, organ in FINDING_ORGANS.items():
        if finding in found and not present[organ]:
            found[finding] = 0
    if findings == "ct-rate":  # the region report: where in the lung each diffuse finding is
        for finding in DIFFUSE_REGION_FINDINGS:
            box = _box_of(regions[finding]) if found.get(finding) and finding in regions else None
            if box is not None:
                lesions.append(Box(finding, box, organ=FINDING_ORGANS[finding]))
    clauses = _ct_clauses(found, sizes)
    sentences = _ct_sentences(present, clauses)
    # each box carries its finding's words (a window that does not hold it drops them)
    for box in lesions:
        box.text = clauses.get(_LESION_FINDINGS.get(box.category, box.category))

    hu = _smooth(hu, 0.6) + rng.normal(0, 12, hu.shape).astype(np.float32)
    hu = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    spacing = (sxy, sxy, sz)
    origin = (-fov / 2 + sxy / 2, -fov / 2 + sxy / 2, z_lo + sz / 2)
    meta = {"phantom": "ct", "seed": seed, "scan": scan, **({"version": version} if version > 1 else {})}
    return CTPhantom(
        image=Volume(hu, spacing, origin, meta=dict(meta)),
        label=Volume(label, spacing, origin, meta=dict(meta)),
        lesions=lesions, lesion_mask=lesion_mask, sentences=sentences,
        report=" ".join(sentences.values()), abnormalities={a: int(found[a]) for a in FINDING_SETS[findings]}, scan=scan)


def _check_version(version: int) -> None:
    if version not in PHANTOM_VERSIONS:
        raise ValueError(f"phantom version must be one of {PHANTOM_VERSIONS}, not {version!r}")


def _noise(rng, shape, sigma_mm: float, spacing_xyz) -> np.ndarray:
    """Gaussian noise smoothed to a grain of ``sigma_mm`` whatever the spacing, unit standard deviation."""
    from scipy.ndimage import gaussian_filter

    sigma = [sigma_mm / s for s in spacing_xyz[::-1]]  # (z, y, x) voxels
    a = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    return a / max(float(a.std()), 1e-6)


def _retexture_v2(seed: int, hu: np.ndarray, label: np.ndarray, zyx_mm, spacing_xyz, heart_r: np.ndarray,
                  kidney_r: np.ndarray) -> dict[str, float]:
    """Version 2 soft tissue: each organ's mean HU is drawn per patient around one shared level (so the
    ranges overlap across patients, as liver, spleen and kidney cortex do in real CT) and the organs differ
    in texture instead: striated muscle, a granular liver with bright vessels, a homogeneous spleen,
    kidneys with a bright cortex around darker medulla, a heart with a blood pool inside a darker wall.
    Drawn from a generator of its own, so anatomy and findings stay those of version 1. Returns the
    organ means (lesion patterns are set relative to them)."""
    rng = np.random.default_rng(20_000 + seed)
    zz, yy, xx = zyx_mm
    shape = hu.shape
    fine, coarse = _noise(rng, shape, 1.5, spacing_xyz), _noise(rng, shape, 4.0, spacing_xyz)
    va, vb = _noise(rng, shape, 6.0, spacing_xyz), _noise(rng, shape, 6.0, spacing_xyz)
    mean = {k: base + float(rng.normal(0, 12)) for k, base in V2_SOFT_TISSUE_HU.items()}
    theta = rng.uniform(0, np.pi)
    muscle = (label == ORGANS["body"]) & (hu == 35.0)
    stripes = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / 14.0 + 2.5 * coarse)
    hu[muscle] = (mean["muscle"] + 20 * stripes)[muscle]
    heart = label == ORGANS["heart"]
    hu[heart] = (mean["heart"] + np.where(heart_r > 0.6, -30.0, 25.0) + 4 * fine)[heart]
    liver = label == ORGANS["liver"]
    vessels = (np.abs(va) < 0.15) & (np.abs(vb) < 0.15)
    hu[liver] = (mean["liver"] + 14 * coarse + 60 * vessels)[liver]
    spleen = label == ORGANS["spleen"]
    hu[spleen] = (mean["spleen"] + 3 * fine)[spleen]
    kidney = (label == ORGANS["kidney_right"]) | (label == ORGANS["kidney_left"])
    hu[kidney] = (mean["kidney"] + np.where(kidney_r > 0.5, 30.0, -35.0) + 6 * coarse)[kidney]
    return mean


# the organ (sentence) each finding is seen in: a finding whose organ is out of view is absent
FINDING_ORGANS = {"lung nodule": "lung", "pleural effusion": "lung", "emphysema": "lung", "atelectasis": "lung",
                  "consolidation": "lung", "cardiomegaly": "heart", "pericardial effusion": "heart",
                  "coronary artery wall calcification": "heart", "arterial wall calcification": "aorta"}


# with findings "ct-rate", these lung findings get a box of the region they were painted in (category: the
# finding, organ: "lung"), as a dataset with finding masks would give: a lung chunk then carries the lung
# sentence only where it shows a finding the sentence names (voxseq.sequence.chunks.lesion_in_window),
# instead of a random patch of lung paired with "there is basal atelectasis"
DIFFUSE_REGION_FINDINGS = ("pleural effusion", "emphysema", "consolidation", "atelectasis")


def _ct_rate_findings(rng, found: dict[str, int], hu: np.ndarray, label: np.ndarray, zyx_mm, spacing_xyz,
                      lung_z: float, heart_r: np.ndarray, aorta: np.ndarray, sizes: dict[str, Any]
                      ) -> dict[str, np.ndarray]:
    """The diffuse and large CT-RATE findings, painted into ``hu`` (labels unchanged); a finding whose organ
    is not in view is set absent. Returns the (Z, Y, X) mask each lung finding was painted in. Emphysema:
    clustered low-attenuation areas (-980 HU) in the upper lungs;
    consolidation: a 25-40 mm region of one lung at 35 HU with air bronchograms; atelectasis: a dense (40 HU)
    posterior basal band of one lung; pericardial effusion: a 10-20 mm fluid shell (10 HU) round the heart;
    arterial / coronary wall calcification: bright (600-800 HU) plaques on the aortic wall / heart surface."""
    zz, yy, xx = zyx_mm
    painted: dict[str, np.ndarray] = {}
    lungs = (label == ORGANS["lung_right"]) | (label == ORGANS["lung_left"])
    if found["emphysema"]:
        holes = (_noise(rng, hu.shape, 3.0, spacing_xyz) > 0.9) & lungs & (zz > lung_z - 30)
        if holes.sum() > 50:
            hu[holes] = -980.0
            painted["emphysema"] = holes
        else:
            found["emphysema"] = 0
    if found["consolidation"]:
        side = ("lung_right", "lung_left")[int(rng.integers(2))]
        lung = label == ORGANS[side]
        pts = np.argwhere(lung)
        if len(pts) > 100:
            c = pts[int(rng.integers(len(pts)))]
            centre = (float(xx[0, 0, c[2]]), float(yy[0, c[1], 0]), float(zz[c[0], 0, 0]))
            r = rng.uniform(25, 40)
            region = (_ellipsoid(zz, yy, xx, centre, (r, r, r * 1.3)) < 1) & lung
            bronchi = np.abs(np.sin(xx / 5.0) * np.sin(zz / 7.0)) > 0.95
            hu[region] = 35.0
            hu[region & bronchi] = -900.0
            painted["consolidation"] = region
            sizes["consolidation side"] = "right" if side == "lung_right" else "left"
        else:
            found["consolidation"] = 0
    if found["atelectasis"]:
        side = ("lung_right", "lung_left")[int(rng.integers(2))]
        band = (label == ORGANS[side]) & (yy > 25) & (zz < lung_z - 55)
        if band.sum() > 20:
            hu[band] = 40.0
            painted["atelectasis"] = band
        else:
            found["atelectasis"] = 0
    heart = label == ORGANS["heart"]
    if found["pericardial effusion"]:
        shell = (heart_r >= 1) & (heart_r < rng.uniform(1.2, 1.4)) \
            & np.isin(label, [ORGANS["body"], ORGANS["lung_right"], ORGANS["lung_left"]])  # the sac displaces lung
        if heart.any() and shell.sum() > 20:
            hu[shell] = 10.0
        else:
            found["pericardial effusion"] = 0
    if found["coronary artery wall calcification"]:
        plaque = heart & (heart_r > 0.8) & (_noise(rng, hu.shape, 2.0, spacing_xyz) > 1.8)
        if plaque.sum() > 3:
            hu[plaque] = 650.0
        else:
            found["coronary artery wall calcification"] = 0
    if found["arterial wall calcification"]:
        wall = aorta & ~_erode(aorta) & (_noise(rng, hu.shape, 3.0, spacing_xyz) > 0.8)
        if wall.sum() > 3:
            hu[wall] = 750.0
        else:
            found["arterial wall calcification"] = 0
    return painted


def _erode(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    return binary_erosion(mask, iterations=1)


def _lesion_pattern_v2(category: str, hu: np.ndarray, ball: np.ndarray, dist: np.ndarray,
                       organ_hu: dict[str, float]) -> None:
    """Version 2 lesions: one appearance per category across patients (what semantic sequences share)."""
    rim = ball & (dist > 0.7)
    if category == "liver":  # hypodense with an enhancing rim
        hu[ball] = organ_hu["liver"] - 45
        hu[rim] = organ_hu["liver"] + 45
    elif category == "bone":  # lytic with a sclerotic margin
        hu[rim] = 650.0
    elif category == "lung":  # solid with a calcified centre
        hu[ball & (dist < 0.35)] = 400.0
    # kidney cysts stay homogeneous water


def _ct_clauses(found: dict[str, int], sizes: dict[str, Any]) -> dict[str, str]:
    """The report's words about each finding present (finding -> sentence), in report order."""
    cm = lambda f: f"{sizes.get(f, 10) / 10:.1f} cm"  # noqa: E731
    words = {
        "lung nodule": f"The lungs show a {cm('lung nodule')} solid nodule.",
        "pleural effusion": "There is a right pleural effusion.",
        "emphysema": "There is centrilobular emphysema in the upper lobes.",
        "consolidation": f"There is consolidation in the {sizes.get('consolidation side', 'right')} lung.",
        "atelectasis": "There is basal atelectasis.",
        "cardiomegaly": "The heart is enlarged.",
        "pericardial effusion": "There is a pericardial effusion.",
        "coronary artery wall calcification": "There is coronary artery calcification.",
        "liver lesion": f"The liver shows a {cm('liver lesion')} hypodense lesion.",
        "kidney cyst": f"The kidneys show a {cm('kidney cyst')} simple cyst.",
        "arterial wall calcification": "The aorta shows wall calcification.",
        "bone lesion": f"The spine shows a {cm('bone lesion')} lytic lesion.",
    }
    return {f: w for f, w in words.items() if found.get(f)}


# the finding a focal lesion box (category: its organ) stands for
_LESION_FINDINGS = {"lung": "lung nodule", "liver": "liver lesion", "kidney": "kidney cyst", "bone": "bone lesion"}


def _ct_sentences(present: dict[str, bool], c: dict[str, str]) -> dict[str, str]:
    """One sentence per organ in view: its findings' clauses (``_ct_clauses``) when it has some, 'unremarkable'
    otherwise."""
    normal = {"lung": "The lungs are clear.", "heart": "The heart is normal in size.",
              "liver": "The liver is unremarkable.", "spleen": "The spleen is unremarkable.",
              "kidney": "The kidneys are unremarkable.", "aorta": "The aorta is normal in calibre.",
              "bone": "The bones are unremarkable."}
    order = {"lung": ["lung nodule", "pleural effusion", "emphysema", "consolidation", "atelectasis"],
             "heart": ["cardiomegaly", "pericardial effusion", "coronary artery wall calcification"],
             "liver": ["liver lesion"], "spleen": [], "kidney": ["kidney cyst"],
             "aorta": ["arterial wall calcification"], "bone": ["bone lesion"]}
    s: dict[str, str] = {}
    for organ, findings in order.items():
        if present[organ]:
            parts = [c[f] for f in findings if f in c]
            if organ == "heart" and "cardiomegaly" not in c:  # the heart's size is always reported
                parts.insert(0, normal["heart"])
            s[organ] = " ".join(parts) or normal[organ]
    return s


# ---------------------------------------------------------------------------- brain MRI

# tissue -> intensity in (t1n, t1c, t2w, t2f)
_MRI_TISSUE = {
    "scalp": (0.85, 0.85, 0.55, 0.5), "skull": (0.08, 0.08, 0.08, 0.08), "csf": (0.2, 0.2, 1.0, 0.1),
    "grey": (0.55, 0.58, 0.6, 0.62), "white": (0.8, 0.82, 0.42, 0.48), "oedema": (0.5, 0.52, 0.85, 1.0),
    "enhancing": (0.6, 1.0, 0.6, 0.75), "necrotic": (0.3, 0.32, 0.9, 0.45),
}

# version 2: two levels per contrast and a code per tissue such that every pair of brain tissues ties in at
# least one contrast and differs in another (no tissue's code is another's complement)
_L, _H = 0.35, 0.8
_MRI_TISSUE_V2 = {
    "scalp": (0.85, 0.85, 0.55, 0.5), "skull": (0.08, 0.08, 0.08, 0.08), "csf": (_L, _L, _H, _L),
    "grey": (_L, _L, _L, _H), "white": (_H, _L, _L, _L), "oedema": (_L, _L, _H, _H),
    "enhancing": (_L, _H, _L, _L), "necrotic": (_H, _L, _H, _L),
}


def make_mri_phantom(seed: int, shape_zyx: tuple[int, int, int] = (64, 96, 96), spacing_xyz=(2.0, 2.0, 2.0),
                     version: int = 1) -> MRIPhantom:
    """One synthetic 4-contrast brain MRI (co-registered t1n, t1c, t2w, t2f) with a glioma-like lesion.

    ``version`` 2 uses tissue intensities that tie in at least one contrast for every pair of brain tissues
    (so only several contrasts together tell them apart) and a per-patient gain on each contrast."""
    _check_version(version)
    rng = np.random.default_rng(10_000 + seed)
    nz, ny, nx = shape_zyx
    sx, sy, sz = spacing_xyz
    z = ((np.arange(nz, dtype=np.float32) - nz / 2 + 0.5) * sz)[:, None, None]
    y = ((np.arange(ny, dtype=np.float32) - ny / 2 + 0.5) * sy)[None, :, None]
    x = ((np.arange(nx, dtype=np.float32) - nx / 2 + 0.5) * sx)[None, None, :]
    zz, yy, xx = np.broadcast_arrays(z, y, x)
    j = lambda s: 1.0 + rng.uniform(-s, s)  # noqa: E731
    head = np.array([70, 88, 58]) * j(0.06)
    r = _ellipsoid(zz, yy, xx, (0, 0, 0), head)
    tissue = np.full(r.shape, -1, np.int8)  # -1 air
    names = list(_MRI_TISSUE)
    tissue[r < 1] = names.index("scalp")
    tissue[r < 0.88] = names.index("skull")
    tissue[r < 0.8] = names.index("csf")
    tissue[r < 0.74] = names.index("grey")
    fold = 0.04 * np.sin(xx / 5.0 + seed) * np.sin(yy / 6.0) * np.sin(zz / 4.0)  # gyri
    tissue[r + fold < 0.55] = names.index("white")
    for side in (-1, 1):  # lateral ventricles
        v = _ellipsoid(zz, yy, xx, (side * 9, -5, 5), (6 * j(0.2), 22 * j(0.1), 10 * j(0.2))) < 1
        tissue[v] = names.index("csf")
    # lesion: oedema blob around an enhancing rim around a necrotic core, in one hemisphere
    side = 1 if rng.random() < 0.5 else -1
    c = (side * rng.uniform(18, 35), rng.uniform(-30, 30), rng.uniform(-15, 20))
    rc = rng.uniform(7, 13)
    d = np.sqrt(_ellipsoid(zz, yy, xx, c, (1, 1, 1)))
    lumpy = 1 + 0.25 * np.sin(xx / 4.0 + seed) * np.sin(yy / 5.0) * np.cos(zz / 4.0)
    brain = r < 0.74
    label = np.zeros(r.shape, np.uint8)
    label[(d < 2.0 * rc * lumpy) & brain] = BRATS_LABELS["oedema"]
    label[(d < rc) & brain] = BRATS_LABELS["enhancing"]
    label[(d < 0.6 * rc) & brain] = BRATS_LABELS["necrotic_core"]
    for lab_name, tissue_name in (("oedema", "oedema"), ("enhancing", "enhancing"), ("necrotic_core", "necrotic")):
        tissue[label == BRATS_LABELS[lab_name]] = names.index(tissue_name)
    tissues = _MRI_TISSUE_V2 if version >= 2 else _MRI_TISSUE
    table = np.array([tissues[n] for n in names] + [(0.0, 0.0, 0.0, 0.0)], np.float32)  # index -1 -> air
    if version >= 2:
        table *= np.random.default_rng(30_000 + seed).uniform(0.85, 1.15, 4).astype(np.float32)
    image = np.moveaxis(table[tissue], -1, 0)  # (4, Z, Y, X)
    bias = 1 + 0.15 * (xx / head[0]) * j(0.5) + 0.1 * (zz / head[2])
    image = np.stack([_smooth(ch, 0.7) for ch in image]) * bias
    image = (image + rng.normal(0, 0.02, image.shape)).clip(0, None).astype(np.float32)
    box = _box_of(label > 0)
    meta = {"phantom": "mri", "seed": seed, **({"version": version} if version > 1 else {})}
    origin = tuple(float(-n / 2 * s) for n, s in zip((nx, ny, nz), spacing_xyz))
    lesions = [Box("glioma", box)] if box else []
    size_cm = (box[3] - box[0]) * sx / 10 if box else 0
    return MRIPhantom(
        image=Volume(image, tuple(map(float, spacing_xyz)), origin, meta=dict(meta)),
        label=Volume(label, tuple(map(float, spacing_xyz)), origin, meta=dict(meta)),
        lesions=lesions,
        sentences={"brain": f"There is a {size_cm:.1f} cm {'right' if side < 0 else 'left'} hemispheric "
                            "enhancing mass with surrounding oedema."})


# ---------------------------------------------------------------------------- writing a corpus


def phantom_split(i: int) -> str:
    """Deterministic 7:1:2 split by index."""
    k = i % 10
    return "train" if k < 7 else ("val" if k == 7 else "test")


def write_phantoms(out_dir: str | Path, n_ct: int = 8, n_mri: int = 4, seed: int = 0, size_xy: int = 128,
                   max_slices: int = 160, mri_shape_zyx: tuple[int, int, int] = (64, 96, 96),
                   progress: bool = True, version: int = 1, findings: str = "basic") -> Path:
    """Write ``n_ct`` CT and ``n_mri`` MRI phantoms (of phantom ``version``; CT ``findings`` as in
    ``make_ct_phantom``) as compressed NIfTI plus ``manifest.jsonl``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records: list[Record] = []
    total = n_ct + n_mri
    bar = _bar(progress, total)
    for i in range(n_ct):
        p = make_ct_phantom(seed * 100_003 + i, size_xy=size_xy, max_slices=max_slices, version=version,
                            findings=findings)
        name = f"ct_{i:03d}"
        write_volume(p.image, out / f"{name}_image.nii.gz")
        write_volume(p.label, out / f"{name}_label.nii.gz")
        records.append(Record(id=name, images={"image": f"{name}_image.nii.gz"}, label=f"{name}_label.nii.gz",
                              boxes=p.lesions, sentences=p.sentences, text=p.report,
                              classes={k: float(v) for k, v in p.abnormalities.items()}, split=phantom_split(i),
                              extra={"kind": "ct", "scan": p.scan, "organs": ORGANS,
                                     **({"phantom_version": version} if version > 1 else {}),
                                     **({"phantom_findings": findings} if findings != "basic" else {})}))
        bar()
    for i in range(n_mri):
        p = make_mri_phantom(seed * 100_003 + i, shape_zyx=mri_shape_zyx, version=version)
        name = f"mri_{i:03d}"
        images = {}
        for c, contrast in enumerate(MRI_CONTRASTS):
            write_volume(Volume(p.image.array[c], p.image.spacing, p.image.origin), out / f"{name}_{contrast}.nii.gz")
            images[contrast] = f"{name}_{contrast}.nii.gz"
        write_volume(p.label, out / f"{name}_seg.nii.gz")
        records.append(Record(id=name, images=images, label=f"{name}_seg.nii.gz", boxes=p.lesions,
                              sentences=p.sentences, text=" ".join(p.sentences.values()), split=phantom_split(i),
                              extra={"kind": "mri", "labels": BRATS_LABELS,
                                     **({"phantom_version": version} if version > 1 else {})}))
        bar()
    return write_manifest(records, out / "manifest.jsonl")


def _bar(enabled: bool, total: int):
    if not enabled or total == 0:
        return lambda: None
    from rich.progress import Progress

    progress = Progress(transient=True)
    progress.start()
    task = progress.add_task("phantoms", total=total)

    def advance() -> None:
        progress.advance(task)
        if progress.tasks[0].completed >= total:
            progress.stop()

    return advance
