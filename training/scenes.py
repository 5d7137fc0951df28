"""Procedural indoor / outdoor scenes rendered by vectorised numpy ray casting.

Every scene comes with exact dense ground truth: RGB, metric z-depth, a semantic label per pixel
(``training.classes``), an instance id per pixel and the pinhole intrinsics. The renderer is the
project's own data source (no network, no datasets), so it favours appearance cues a small model
can learn (each class has its own texture family and colour range) over photo-realism.

Geometry conventions
* Camera frame (OpenCV): x right, y down, z forward. Pixel (u, v) has its centre at (u+0.5, v+0.5),
  so its ray is ``((u + 0.5 - cx) / fx, (v + 0.5 - cy) / fy, 1)``. Rays keep camera-z = 1, which
  makes the ray parameter ``t`` of a hit *equal to its z-depth*, in the camera and, since rigid
  and linear maps keep ``t``, in every primitive's local frame too.
* World frame: z up, floor / ground at z = 0, metres.
* Depth: float32 metres, 0 = invalid (sky, and outdoor ground beyond ``OUTDOOR_MAX_DEPTH``).
* Lighting: Lambertian, one directional light with hard shadows from shadow rays, plus ambient.
  Indoors the room shell (walls, ceiling) casts no shadow, as if the light were inside the room.

Speed: each primitive is intersected only with the pixels inside the screen-space rectangle of its
bounding box, and shadow rays only for the points inside its bounding box seen from the light.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .classes import CLASS_IDS, CLASS_NAMES
from .config import SCENE_KINDS

OUTDOOR_MAX_DEPTH = 80.0
DEPTH_PNG_SCALE = 256.0  # KITTI convention: 16-bit PNG value / 256 = metres; 80 m fits, 4 mm steps
_EPS = 1e-4
_INF = np.inf


@dataclass(frozen=True)
class Intrinsics:
    fx: float
    fy: float
    cx: float
    cy: float

    def as_array(self) -> np.ndarray:
        return np.array([self.fx, self.fy, self.cx, self.cy], dtype=np.float32)

    def scaled(self, sx: float, sy: float) -> "Intrinsics":
        """Intrinsics after resizing the image by (sx, sy) (pixel-centre convention preserved)."""
        return Intrinsics(self.fx * sx, self.fy * sy, self.cx * sx, self.cy * sy)

    def cropped(self, x0: float, y0: float) -> "Intrinsics":
        return Intrinsics(self.fx, self.fy, self.cx - x0, self.cy - y0)


@dataclass
class Scene:
    seed: int
    kind: str  # "indoor" | "outdoor"
    image: np.ndarray  # uint8 [H, W, 3]
    depth: np.ndarray  # float32 [H, W], metres along the optical axis, 0 = invalid
    labels: np.ndarray  # uint8 [H, W], ids into CLASS_NAMES
    instances: np.ndarray  # uint16 [H, W], 0 = no object (floor, wall, sky, road ...)
    instance_classes: dict[int, int]  # instance id -> class id, for every object placed
    intrinsics: Intrinsics
    cam_to_world: np.ndarray  # float64 [4, 4], camera frame (x right, y down, z fwd) -> world
    light_dir: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(3))  # unit, towards light

    @property
    def height(self) -> int:
        return self.image.shape[0]

    @property
    def width(self) -> int:
        return self.image.shape[1]

    def class_names_present(self) -> list[str]:
        return [CLASS_NAMES[i] for i in np.unique(self.labels)]

    def ray_directions(self) -> np.ndarray:
        """float64 [H, W, 3] world-space ray of every pixel, scaled so that its camera z is 1."""
        k = self.intrinsics
        u = (np.arange(self.width) + 0.5 - k.cx) / k.fx
        v = (np.arange(self.height) + 0.5 - k.cy) / k.fy
        cam = np.stack(np.broadcast_arrays(u[None, :], v[:, None], np.ones((1, 1))), axis=-1)
        return cam @ self.cam_to_world[:3, :3].T


# --------------------------------------------------------------------------------------------
# Materials and textures
# --------------------------------------------------------------------------------------------

@dataclass
class Material:
    tex: str  # solid | checker | stripes | wood | noise | planks | bricks | windows | cardboard
    c1: np.ndarray
    c2: np.ndarray
    scale: float = 1.0
    axis: int = 0  # stripe / grain axis in the primitive's local frame


def _build_noise_table(n_lattice: int = 32, texels: int = 8, seed: int = 12345) -> np.ndarray:
    """Periodic 2-octave value-noise image [T, T] in [0, 1], T = n_lattice * texels."""
    rng = np.random.default_rng(seed)
    t = n_lattice * texels
    out = np.zeros((t, t))
    for lat, weight in ((n_lattice, 0.65), (2 * n_lattice, 0.35)):
        g = rng.random((lat, lat))
        x = np.arange(t) * lat / t
        i0 = np.floor(x).astype(int)
        f = x - i0
        f = f * f * (3 - 2 * f)
        i1 = (i0 + 1) % lat
        rows = g[i0] * (1 - f)[:, None] + g[i1] * f[:, None]
        out += weight * (rows[:, i0] * (1 - f) + rows[:, i1] * f)
    return out


_NOISE_TEXELS = 8  # texels per unit of noise coordinate (one lattice cell of the coarse octave)
_NOISE = _build_noise_table()  # fixed: scenes vary through texture parameters, not the table
_NOISE_T = _NOISE.shape[0]  # a power of two, so wrapping is a bitwise and
# One wrapped row and column appended: the +1 neighbours of a lookup need no modulo.
_NOISE_FLAT = np.pad(_NOISE, ((0, 1), (0, 1)), mode="wrap").ravel()


def _noise2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bilinear lookup of the periodic noise image: smooth noise in [0, 1] over the (a, b) plane."""
    a = a * _NOISE_TEXELS
    b = b * _NOISE_TEXELS
    ia, ib = np.floor(a), np.floor(b)
    fa, fb = a - ia, b - ib
    i00 = (ia.astype(np.int64) & (_NOISE_T - 1)) * (_NOISE_T + 1) + (ib.astype(np.int64) & (_NOISE_T - 1))
    n00, n10 = _NOISE_FLAT[i00], _NOISE_FLAT[i00 + _NOISE_T + 1]
    n01, n11 = _NOISE_FLAT[i00 + 1], _NOISE_FLAT[i00 + _NOISE_T + 2]
    top = n00 + fa * (n10 - n00)
    return top + fb * (n01 + fa * (n11 - n01) - top)


def _value_noise(x, y, z):
    """Solid-looking noise on surfaces: one 2-D lookup along a skewed projection that is
    non-degenerate on every axis-aligned plane (so walls, floors and box faces all get texture)."""
    return _noise2(x + 0.61 * z, y - 0.37 * z + 0.29 * x)


def _fbm(x, y, z):
    return 0.7 * _value_noise(x, y, z) + 0.3 * _value_noise(2.7 * x + 7.1, 2.7 * y + 3.3, 2.7 * z + 1.7)


def _mix(c1, c2, w):
    return c1[None, :] + w[:, None] * (c2 - c1)[None, :]


def _texture(m: Material, p: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Albedo [N, 3] in [0, 1] of material ``m`` at local points ``p`` [N, 3] with normals ``n``."""
    s = m.scale
    x, y, z = p[:, 0] / s, p[:, 1] / s, p[:, 2] / s
    if m.tex == "solid":
        return _mix(m.c1, m.c2, 0.25 * _value_noise(3 * x, 3 * y, 3 * z))
    if m.tex == "checker":
        # Half-cell offset keeps planes at integer coordinates off the cell boundaries.
        w = (np.floor(x + 0.501) + np.floor(y + 0.501) + np.floor(z + 0.501)) % 2
        return _mix(m.c1, m.c2, w) * (0.92 + 0.08 * _value_noise(8 * x, 8 * y, 8 * z))[:, None]
    if m.tex == "stripes":
        w = (np.floor(2 * p[:, m.axis] / s + 0.501) % 2).astype(np.float64)
        return _mix(m.c1, m.c2, w)
    if m.tex == "wood":
        a = p[:, (m.axis + 1) % 3] / s
        b = p[:, (m.axis + 2) % 3] / s
        ring = np.sqrt(a * a + 0.3 * b * b) * 6 + 2.5 * _value_noise(x, y, z)
        return _mix(m.c1, m.c2, (ring - np.floor(ring)) ** 2)
    if m.tex == "planks":
        # Floor boards along axis: per-board tint + grain.
        along, across = p[:, m.axis] / s, p[:, 1 - m.axis] / s
        board = np.floor(across * 5)
        tint = _NOISE_FLAT[(board.astype(np.int64) * 7919) % _NOISE_FLAT.size]
        grain = _value_noise(across * 40, along * 2, board)
        gap = (across * 5 - board) < 0.04
        col = _mix(m.c1, m.c2, 0.6 * tint + 0.4 * grain)
        col[gap] *= 0.45
        return col
    if m.tex == "noise":
        return _mix(m.c1, m.c2, _fbm(4 * x, 4 * y, 4 * z))
    if m.tex == "bricks":
        row = np.floor(z * 6)
        off = (row % 2) * 0.5
        u = (x + y) * 3 + off
        mortar = ((z * 6 - row) < 0.1) | ((u - np.floor(u)) < 0.06)
        col = _mix(m.c1, m.c1 * 0.8, _value_noise(np.floor(u), row, 0.5 * z))
        col[mortar] = m.c2
        return col
    if m.tex == "windows":
        # Facade with a grid of dark windows; the horizontal facade axis depends on the face.
        u = np.where(np.abs(n[:, 0]) > np.abs(n[:, 1]), p[:, 1], p[:, 0]) / s
        zz = p[:, 2] / s
        win = (((u - np.floor(u)) > 0.3) & ((u - np.floor(u)) < 0.75) & ((zz - np.floor(zz)) > 0.35)
               & (np.abs(n[:, 2]) < 0.5))
        col = _mix(m.c1, m.c1 * 0.85, _value_noise(3 * x, 3 * y, 3 * z))
        col[win] = m.c2 * (0.8 + 0.4 * _value_noise(np.floor(u[win]), np.floor(zz[win]), 0.0))[:, None]
        return col
    if m.tex == "cardboard":
        tape = np.abs(p[:, m.axis]) < 0.04 * s
        col = _mix(m.c1, m.c1 * 0.85, _value_noise(10 * x, 10 * y, 10 * z))
        col[tape] = m.c2
        return col
    raise ValueError(f"unknown texture {m.tex!r}")


def _c(*rgb) -> np.ndarray:
    return np.array(rgb, dtype=np.float64) / 255.0


def _jit(rng, c, amount=0.08):
    return np.clip(c * (1 + rng.uniform(-amount, amount, 3)), 0, 1)


def _material(rng: np.random.Generator, cls: str) -> Material:
    """Class-typical appearance with per-instance variation."""
    def pick(opts):
        return opts[rng.integers(len(opts))]

    wood = pick([_c(150, 100, 60), _c(120, 75, 40), _c(185, 140, 90), _c(95, 60, 35)])
    if cls == "floor":
        if rng.random() < 0.6:
            return Material("planks", _jit(rng, wood), _jit(rng, wood * 0.7), 1.0, axis=int(rng.integers(2)))
        return Material("checker", _jit(rng, _c(220, 215, 205)),
                        _jit(rng, pick([_c(60, 60, 70), _c(150, 60, 50), _c(90, 110, 140)])), rng.uniform(0.3, 0.6))
    if cls == "wall":
        base = pick([_c(235, 225, 200), _c(200, 215, 225), _c(225, 200, 195), _c(205, 225, 200), _c(230, 230, 230)])
        if rng.random() < 0.35:
            return Material("stripes", _jit(rng, base), _jit(rng, base * 0.85), rng.uniform(0.2, 0.4),
                            axis=int(rng.integers(2)))
        return Material("solid", _jit(rng, base), _jit(rng, base * 0.9))
    if cls == "ceiling":
        return Material("solid", _jit(rng, _c(245, 245, 240), 0.03), _c(225, 225, 220))
    if cls in ("table", "door"):
        return Material("wood", _jit(rng, wood), _jit(rng, wood * 0.75), rng.uniform(0.5, 1.0),
                        axis=int(rng.integers(3)))
    if cls == "cabinet":
        return Material("wood", _jit(rng, wood * 0.85), _jit(rng, wood * 0.6), rng.uniform(0.3, 0.6), axis=2)
    if cls == "chair":
        c = pick([_c(200, 50, 40), _c(40, 90, 170), _c(240, 190, 40), _c(40, 40, 40), _c(60, 150, 80)])
        return Material("solid", _jit(rng, c), _jit(rng, c * 0.7))
    if cls == "sofa":
        c = pick([_c(110, 40, 60), _c(60, 70, 110), _c(90, 110, 70), _c(150, 110, 80), _c(120, 120, 125)])
        return Material("noise", _jit(rng, c), _jit(rng, c * 0.6), 0.05)
    if cls == "bed":
        c = pick([_c(240, 240, 245), _c(200, 215, 240), _c(245, 220, 220)])
        return Material("stripes", _jit(rng, c, 0.03), _jit(rng, c * 0.85), rng.uniform(0.1, 0.2), axis=0)
    if cls == "lamp":
        return Material("solid", _jit(rng, _c(250, 230, 170)), _c(230, 200, 140))
    if cls == "box":
        return Material("cardboard", _jit(rng, _c(190, 145, 95)), _c(210, 200, 170), 1.0, axis=int(rng.integers(2)))
    if cls == "ball":
        c1, c2 = pick([(_c(240, 240, 240), _c(20, 20, 20)), (_c(230, 40, 40), _c(250, 250, 250)),
                       (_c(40, 120, 230), _c(250, 220, 40))])
        return Material("stripes", c1, c2, rng.uniform(0.1, 0.2), axis=int(rng.integers(3)))
    if cls in ("plant", "grass"):
        c = _c(60, 140, 50) if cls == "plant" else _c(90, 160, 60)
        return Material("noise", _jit(rng, c * 0.6), _jit(rng, c * 1.1), 0.08 if cls == "plant" else 0.5)
    if cls == "painting":
        return Material("noise", _jit(rng, rng.uniform(0.1, 0.9, 3), 0), _jit(rng, rng.uniform(0.1, 0.9, 3), 0), 0.15)
    if cls == "road":
        return Material("noise", _c(60, 60, 65), _c(95, 95, 100), 0.3)
    if cls == "sidewalk":
        return Material("checker", _jit(rng, _c(185, 180, 170)), _jit(rng, _c(160, 155, 150)), 0.6)
    if cls == "tree":
        return Material("noise", _jit(rng, _c(30, 90, 35)), _jit(rng, _c(70, 130, 40)), 0.4)
    if cls == "car":
        c = pick([_c(200, 30, 30), _c(30, 60, 160), _c(230, 230, 235), _c(30, 30, 30), _c(200, 170, 40),
                  _c(120, 125, 130)])
        return Material("solid", _jit(rng, c), _jit(rng, c * 0.8))
    if cls == "building":
        c = pick([_c(170, 90, 70), _c(200, 190, 170), _c(150, 150, 155), _c(220, 200, 150)])
        if rng.random() < 0.3:
            return Material("bricks", _jit(rng, c), _c(200, 200, 195), 1.0)
        return Material("windows", _jit(rng, c), _jit(rng, _c(60, 80, 110)), rng.uniform(2.5, 3.5))
    if cls == "person":
        shirt = pick([_c(200, 60, 60), _c(60, 100, 200), _c(240, 240, 240), _c(70, 160, 90), _c(230, 160, 40)])
        return Material("solid", _jit(rng, shirt), _c(60, 60, 60))
    if cls in ("pole", "bench"):
        return Material("solid", _jit(rng, _c(110, 115, 120)), _c(80, 80, 85))
    if cls == "traffic sign":
        c = pick([_c(210, 30, 30), _c(30, 80, 200), _c(240, 200, 20)])
        return Material("solid", _jit(rng, c, 0.04), _c(250, 250, 250))
    if cls == "rock":
        return Material("noise", _jit(rng, _c(100, 100, 95)), _jit(rng, _c(160, 155, 150)), 0.3)
    raise KeyError(f"no material for class {cls!r}")


# --------------------------------------------------------------------------------------------
# Primitives: canonical shapes in a local frame (world = rot @ local + pos)
# --------------------------------------------------------------------------------------------

@dataclass
class _Prim:
    shape: str  # sphere (ellipsoid with radii) | box (half extents) | cyl (r, half height) | cone (r0, r1, half height)
    pos: np.ndarray
    rot: np.ndarray  # world-from-local rotation
    size: np.ndarray
    label: int
    inst: int
    mat: Material
    lo: np.ndarray = None  # world AABB
    hi: np.ndarray = None

    def __post_init__(self):
        ext = {"sphere": self.size, "box": self.size}.get(self.shape)
        if ext is None:
            r = self.size[0] if self.shape == "cyl" else max(self.size[0], self.size[1])
            ext = np.array([r, r, self.size[-1]])
        corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * ext
        w = corners @ self.rot.T + self.pos
        self.lo, self.hi = w.min(0), w.max(0)

    def corners(self) -> np.ndarray:
        return np.array([[x, y, z] for x in (self.lo[0], self.hi[0])
                         for y in (self.lo[1], self.hi[1]) for z in (self.lo[2], self.hi[2])])

    def to_local(self, o, d):
        """Rays as component triples (o: scalars or arrays, d: arrays) in the local frame.

        local = rot^T (world - pos); t is unchanged by the rigid map. Zero rotation entries are
        skipped because most primitives are only yawed, which saves whole-image multiplies.
        """
        r = self.rot
        oc = [o[i] - self.pos[i] for i in range(3)]
        return tuple(_dot_col(oc, r, j) for j in range(3)), tuple(_dot_col(d, r, j) for j in range(3))

    def intersect(self, o, d) -> np.ndarray:
        lo, ld = self.to_local(o, d)
        return _INTERSECT[self.shape](lo, ld, self.size)

    def normal(self, p: np.ndarray) -> np.ndarray:
        """Local outward normals at local surface points p [N, 3]."""
        s = self.size
        if self.shape == "sphere":
            n = p / (s * s)
        elif self.shape == "box":
            q = np.abs(p) / s
            ax = q.argmax(1)
            n = np.zeros_like(p)
            n[np.arange(len(p)), ax] = np.sign(p[np.arange(len(p)), ax])
        else:
            hh = s[-1]
            if self.shape == "cyl":
                n = np.stack([p[:, 0], p[:, 1], np.zeros(len(p))], 1)
            else:
                k = (s[1] - s[0]) / (2 * hh)
                rz = s[0] + k * (p[:, 2] + hh)
                n = np.stack([p[:, 0], p[:, 1], -k * rz], 1)
            cap = np.abs(p[:, 2]) > hh - 1e-6 * max(1.0, hh)
            n[cap] = 0
            n[cap, 2] = np.sign(p[cap, 2])
        return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def _dot_col(v, m, j):
    """sum_i v[i] * m[i, j] over component arrays, skipping exact zeros and unit factors."""
    acc = None
    for i in range(3):
        c = m[i, j]
        if c == 0:
            continue
        term = v[i] if c == 1 else v[i] * c
        acc = term if acc is None else acc + term
    return 0.0 if acc is None else acc


def _nearest(*cands):
    """Smallest candidate t > eps per ray (inf if none)."""
    t = np.full(np.broadcast_shapes(*(np.shape(c) for c in cands)), _INF)
    for c in cands:
        t = np.where((c > _EPS) & (c < t), c, t)
    return t


def _safe(d):
    # A ray parallel to a slab gives +-1e30 instead of inf/NaN (0 * inf) in the slab test.
    return np.where(d == 0, 1e-30, d)


def _hit_sphere(o, d, s):
    ox, oy, oz = o[0] / s[0], o[1] / s[1], o[2] / s[2]
    dx, dy, dz = d[0] / s[0], d[1] / s[1], d[2] / s[2]
    a = dx * dx + dy * dy + dz * dz
    b = ox * dx + oy * dy + oz * dz
    c = ox * ox + oy * oy + oz * oz - 1.0
    disc = b * b - a * c
    ok = disc >= 0
    sq = np.sqrt(np.where(ok, disc, 0.0))
    t0 = np.where(ok, (-b - sq) / a, _INF)
    t1 = np.where(ok, (-b + sq) / a, _INF)
    return _nearest(t0, t1)


def _hit_box(o, d, s):
    tmin, tmax = -_INF, _INF
    for i in range(3):
        inv = 1.0 / _safe(d[i])
        t1 = (-s[i] - o[i]) * inv
        t2 = (s[i] - o[i]) * inv
        tmin = np.maximum(tmin, np.minimum(t1, t2))
        tmax = np.minimum(tmax, np.maximum(t1, t2))
    hit = tmax >= np.maximum(tmin, _EPS)
    return np.where(hit, np.where(tmin > _EPS, tmin, tmax), _INF)


def _caps(o, d, radii, hh):
    out = []
    inv = 1.0 / _safe(d[2])
    for zc, r in zip((-hh, hh), radii):
        if r <= 0:
            continue
        t = (zc - o[2]) * inv
        x = o[0] + t * d[0]
        y = o[1] + t * d[1]
        out.append(np.where(x * x + y * y <= r * r, t, _INF))
    return out


def _hit_quadric_side(o, d, a, b, c, hh, radius_at=None):
    with np.errstate(divide="ignore", invalid="ignore"):
        disc = b * b - a * c
        ok = (disc >= 0) & (np.abs(a) > 1e-12)
        sq = np.sqrt(np.where(ok, disc, 0.0))
        out = []
        for sgn in (-1.0, 1.0):
            t = np.where(ok, (-b + sgn * sq) / a, _INF)
            z = o[2] + t * d[2]
            good = ok & (np.abs(z) <= hh)
            if radius_at is not None:
                good &= radius_at(z) >= 0
            out.append(np.where(good, t, _INF))
    return out


def _hit_cyl(o, d, s):
    r, hh = s
    a = d[0] * d[0] + d[1] * d[1]
    b = o[0] * d[0] + o[1] * d[1]
    c = o[0] * o[0] + o[1] * o[1] - r * r
    return _nearest(*_hit_quadric_side(o, d, a, b, c, hh), *_caps(o, d, (r, r), hh))


def _hit_cone(o, d, s):
    r0, r1, hh = s
    k = (r1 - r0) / (2 * hh)
    A = r0 + k * hh  # radius at z = 0
    rz = A + k * o[2]
    a = d[0] * d[0] + d[1] * d[1] - k * k * d[2] * d[2]
    b = o[0] * d[0] + o[1] * d[1] - k * d[2] * rz
    c = o[0] * o[0] + o[1] * o[1] - rz * rz
    side = _hit_quadric_side(o, d, a, b, c, hh, radius_at=lambda z: A + k * z)
    return _nearest(*side, *_caps(o, d, (r0, r1), hh))


_INTERSECT = {"sphere": _hit_sphere, "box": _hit_box, "cyl": _hit_cyl, "cone": _hit_cone}


def _rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rot_x(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


_ROT_Y90 = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # local z -> world x


class _Builder:
    """Collects primitives of objects placed in an object frame (x, y on the floor, yaw)."""

    def __init__(self, rng):
        self.rng = rng
        self.prims: list[_Prim] = []
        self.inst_classes: dict[int, int] = {}

    def new_instance(self, cls: str) -> int:
        inst = len(self.inst_classes) + 1
        self.inst_classes[inst] = CLASS_IDS[cls]
        return inst

    def add(self, shape, frame, local_pos, size, cls, inst, mat, local_rot=np.eye(3)):
        x, y, yaw = frame
        r = _rot_z(yaw)
        self.prims.append(_Prim(shape, r @ np.asarray(local_pos, float) + [x, y, 0.0], r @ local_rot,
                                np.asarray(size, float), CLASS_IDS[cls], inst, mat))


# --------------------------------------------------------------------------------------------
# Objects. Each returns its footprint radius for placement; local +y is the object's "front".
# --------------------------------------------------------------------------------------------

def _table(b, f, inst, m):
    r = b.rng
    hx, hy, h = r.uniform(0.45, 0.9), r.uniform(0.35, 0.55), r.uniform(0.68, 0.78)
    b.add("box", f, (0, 0, h - 0.02), (hx, hy, 0.02), "table", inst, m)
    for sx in (-1, 1):
        for sy in (-1, 1):
            b.add("box", f, (sx * (hx - 0.05), sy * (hy - 0.05), (h - 0.04) / 2), (0.025, 0.025, (h - 0.04) / 2),
                  "table", inst, m)


def _chair(b, f, inst, m):
    r = b.rng
    w, sh = r.uniform(0.2, 0.26), r.uniform(0.42, 0.48)
    b.add("box", f, (0, 0, sh), (w, w, 0.025), "chair", inst, m)
    b.add("box", f, (0, -w + 0.02, sh + 0.25), (w, 0.02, 0.25), "chair", inst, m)
    for sx in (-1, 1):
        for sy in (-1, 1):
            b.add("cyl", f, (sx * (w - 0.03), sy * (w - 0.03), sh / 2), (0.018, sh / 2), "chair", inst, m)


def _sofa(b, f, inst, m):
    r = b.rng
    hx, hy = r.uniform(0.8, 1.1), r.uniform(0.4, 0.5)
    b.add("box", f, (0, 0, 0.22), (hx, hy, 0.2), "sofa", inst, m)
    b.add("box", f, (0, -hy + 0.1, 0.6), (hx, 0.1, 0.2), "sofa", inst, m)
    for sx in (-1, 1):
        b.add("box", f, (sx * (hx - 0.08), 0.0, 0.5), (0.08, hy, 0.1), "sofa", inst, m)


def _bed(b, f, inst, m, rng):
    hx, hy = rng.uniform(0.5, 0.9), rng.uniform(0.95, 1.05)
    frame = _material(rng, "table")
    b.add("box", f, (0, 0, 0.15), (hx, hy, 0.15), "bed", inst, frame)
    b.add("box", f, (0, 0, 0.4), (hx - 0.03, hy - 0.03, 0.1), "bed", inst, m)
    b.add("box", f, (0, -hy - 0.03, 0.5), (hx, 0.03, 0.5), "bed", inst, frame)
    b.add("sphere", f, (0, -hy + 0.25, 0.55), (hx * 0.6, 0.15, 0.07), "bed", inst, m)


def _cabinet(b, f, inst, m):
    r = b.rng
    hh = r.uniform(0.4, 0.95)
    b.add("box", f, (0, 0, hh), (r.uniform(0.35, 0.6), r.uniform(0.22, 0.3), hh), "cabinet", inst, m)


def _lamp(b, f, inst, m, rng):
    metal = _material(rng, "pole")
    h = rng.uniform(1.3, 1.7)
    b.add("cyl", f, (0, 0, 0.02), (0.15, 0.02), "lamp", inst, metal)
    b.add("cyl", f, (0, 0, h / 2), (0.015, h / 2), "lamp", inst, metal)
    b.add("cone", f, (0, 0, h + 0.1), (0.24, 0.13, 0.14), "lamp", inst, m)


def _box(b, f, inst, m):
    s = b.rng.uniform(0.12, 0.35)
    b.add("box", f, (0, 0, s), (s * b.rng.uniform(0.8, 1.3), s, s), "box", inst, m)


def _ball(b, f, inst, m):
    r = b.rng.uniform(0.1, 0.3)
    b.add("sphere", f, (0, 0, r), (r, r, r), "ball", inst, m)


def _plant(b, f, inst, m, rng):
    pot = Material("solid", _jit(rng, _c(180, 90, 50)), _c(150, 70, 40))
    h = rng.uniform(0.2, 0.35)
    b.add("cone", f, (0, 0, h / 2), (0.1, 0.15, h / 2), "plant", inst, pot)
    r = rng.uniform(0.25, 0.45)
    b.add("sphere", f, (0, 0, h + r * 0.9), (r * 0.9, r * 0.9, r), "plant", inst, m)


def _car(b, f, inst, m, rng):
    tyre = Material("solid", _c(25, 25, 25), _c(45, 45, 45))
    glass = Material("solid", _c(40, 50, 65), _c(70, 85, 100))
    hl, hw = rng.uniform(1.9, 2.4), rng.uniform(0.85, 0.95)
    b.add("box", f, (0, 0, 0.65), (hw, hl, 0.33), "car", inst, m)
    b.add("box", f, (0, -0.2, 1.22), (hw - 0.08, hl * 0.5, 0.25), "car", inst, glass)
    b.add("box", f, (0, -0.2, 1.49), (hw - 0.1, hl * 0.45, 0.02), "car", inst, m)
    for sx in (-1, 1):
        for sy in (-1, 1):
            b.add("cyl", f, (sx * (hw - 0.1), sy * (hl - 0.6), 0.33), (0.33, 0.12), "car", inst, tyre, _ROT_Y90)


def _person(b, f, inst, m, rng):
    legs = Material("solid", _jit(rng, _c(50, 55, 80)), _c(35, 35, 45))
    skin = Material("solid", _jit(rng, rng.choice([_c(240, 200, 170), _c(190, 140, 100), _c(120, 80, 55)])),
                    _c(100, 70, 50))
    s = rng.uniform(0.85, 1.1)
    for sx in (-1, 1):
        b.add("cyl", f, (sx * 0.09 * s, 0, 0.43 * s), (0.075 * s, 0.43 * s), "person", inst, legs)
        b.add("cyl", f, (sx * 0.25 * s, 0, 1.15 * s), (0.05 * s, 0.28 * s), "person", inst, m)
    b.add("cyl", f, (0, 0, 1.17 * s), (0.19 * s, 0.32 * s), "person", inst, m)
    b.add("sphere", f, (0, 0, 1.62 * s), (0.11 * s, 0.11 * s, 0.13 * s), "person", inst, skin)


def _tree(b, f, inst, m, rng):
    bark = Material("noise", _jit(rng, _c(90, 60, 40)), _c(60, 40, 25), 0.15)
    h = rng.uniform(1.8, 4.0)
    b.add("cyl", f, (0, 0, h / 2), (rng.uniform(0.12, 0.25), h / 2), "tree", inst, bark)
    if rng.random() < 0.35:
        ch = rng.uniform(3, 6)
        b.add("cone", f, (0, 0, h + ch / 2 - 0.5), (rng.uniform(1.2, 2.0), 0.0, ch / 2), "tree", inst, m)
    else:
        r = rng.uniform(1.3, 2.6)
        b.add("sphere", f, (0, 0, h + r * 0.7), (r, r, r * rng.uniform(0.8, 1.1)), "tree", inst, m)


def _pole_sign(b, f, pole_inst, sign_inst, m, rng):
    h = rng.uniform(3.0, 5.0)
    b.add("cyl", f, (0, 0, h / 2), (0.06, h / 2), "pole", pole_inst, m)
    if sign_inst:
        sm = _material(rng, "traffic sign")
        if rng.random() < 0.5:
            b.add("cyl", f, (0, -0.08, h - 0.5), (0.35, 0.02), "traffic sign", sign_inst, sm, _rot_x(np.pi / 2))
        else:
            b.add("box", f, (0, -0.08, h - 0.5), (0.3, 0.02, 0.3), "traffic sign", sign_inst, sm)


def _bench(b, f, inst, m, rng):
    wood = Material("stripes", _jit(rng, _c(150, 100, 55)), _c(110, 70, 40), 0.12, axis=1)
    hx = rng.uniform(0.7, 1.0)
    b.add("box", f, (0, 0, 0.45), (hx, 0.22, 0.03), "bench", inst, wood)
    b.add("box", f, (0, -0.2, 0.75), (hx, 0.03, 0.15), "bench", inst, wood)
    for sx in (-1, 1):
        b.add("box", f, (sx * (hx - 0.1), 0, 0.21), (0.03, 0.2, 0.21), "bench", inst, m)


def _rock(b, f, inst, m, rng):
    r = rng.uniform(0.3, 0.9)
    b.add("sphere", f, (0, 0, 0.2 * r), (r * rng.uniform(1, 1.5), r, r * 0.7), "rock", inst, m)


_INDOOR_OBJECTS = {  # class -> (builder, footprint radius for placement, needs rng)
    "table": (_table, 0.9, False), "chair": (_chair, 0.35, False), "sofa": (_sofa, 1.1, False),
    "bed": (_bed, 1.2, True), "cabinet": (_cabinet, 0.6, False), "lamp": (_lamp, 0.3, True),
    "box": (_box, 0.4, False), "ball": (_ball, 0.3, False), "plant": (_plant, 0.45, True),
}


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------

def _look_at(cam_pos, yaw, pitch) -> np.ndarray:
    """cam_to_world 4x4: camera looks along (yaw about world z, pitch up), no roll."""
    fwd = np.array([np.cos(pitch) * np.cos(yaw), np.cos(pitch) * np.sin(yaw), np.sin(pitch)])
    right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    down = np.cross(fwd, right)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, down, fwd, cam_pos
    return m


def _place(rng, spots, radius, region, tries=30):
    """Rejection-sample a floor position whose footprint circle clears existing ones."""
    (x0, x1), (y0, y1) = region
    for _ in range(tries):
        x, y = rng.uniform(x0 + radius, x1 - radius), rng.uniform(y0 + radius, y1 - radius)
        if all((x - sx) ** 2 + (y - sy) ** 2 > (radius + sr) ** 2 for sx, sy, sr in spots):
            spots.append((x, y, radius))
            return x, y
    return None


def _indoor(rng, b: _Builder):
    rx, ry, rz = rng.uniform(3.0, 6.0), rng.uniform(3.0, 6.5), rng.uniform(2.4, 3.1)
    shell = {c: _material(rng, c) for c in ("floor", "wall", "ceiling")}
    # Camera near one short wall, looking into the room (NYUv2-like: 1-1.7 m high, tilted down).
    cam = np.array([rng.uniform(0.3 * rx, 0.7 * rx), rng.uniform(0.15, 0.5), rng.uniform(1.0, 1.7)])
    yaw = np.pi / 2 + rng.uniform(-0.5, 0.5)
    pitch = -rng.uniform(0.08, 0.4)
    spots = [(cam[0], cam[1], 0.7)]
    names = list(_INDOOR_OBJECTS)
    for _ in range(rng.integers(4, 10)):
        cls = names[rng.integers(len(names))]
        fn, rad, needs_rng = _INDOOR_OBJECTS[cls]
        xy = _place(rng, spots, rad, ((0, rx), (0, ry)))
        if xy is None:
            continue
        snap = rng.random() < 0.6
        oyaw = rng.integers(4) * np.pi / 2 + (rng.uniform(-0.1, 0.1) if snap else rng.uniform(-np.pi, np.pi))
        inst = b.new_instance(cls)
        args = (b, (xy[0], xy[1], oyaw), inst, _material(rng, cls)) + ((rng,) if needs_rng else ())
        fn(*args)
    # Wall-mounted: doors and paintings as thin boxes slightly proud of a wall.
    walls = [((rx / 2, ry, np.pi), rx), ((0.0, ry / 2, -np.pi / 2), ry), ((rx, ry / 2, np.pi / 2), ry)]
    for cls in ("door", "painting"):
        for _ in range(rng.integers(0, 3)):
            (wx, wy, wyaw), span = walls[rng.integers(len(walls))]
            off = rng.uniform(-span / 2 + 0.6, span / 2 - 0.6)
            fx, fy = wx + off * np.cos(wyaw), wy + off * np.sin(wyaw)
            inst = b.new_instance(cls)
            if cls == "door":
                size, z = (0.45, 0.03, 1.02), 1.02
            else:
                size, z = (rng.uniform(0.25, 0.6), 0.02, rng.uniform(0.2, 0.4)), rng.uniform(1.4, 1.8)
            # Centred on the wall plane: the half inside the wall is hidden, the rest stands proud.
            b.add("box", (fx, fy, wyaw), (0, 0.0, z), size, cls, inst, _material(rng, cls))
    return cam, yaw, pitch, (rx, ry, rz), shell


def _outdoor(rng, b: _Builder):
    road_w = rng.uniform(5.5, 9.0)
    walk_w = rng.uniform(1.5, 3.0)
    ground = {c: _material(rng, c) for c in ("road", "sidewalk", "grass")}
    edge = road_w / 2 + walk_w  # end of the sidewalk on either side
    cam = np.array([rng.uniform(-road_w / 4, road_w / 4), 0.0, rng.uniform(1.3, 1.9)])
    yaw = np.pi / 2 + rng.uniform(-0.35, 0.35)
    pitch = -rng.uniform(0.0, 0.15)
    spots = [(cam[0], cam[1], 2.0)]
    for side in (-1, 1):
        if rng.random() < 0.75:  # a street of buildings, else open park land on that side
            y = rng.uniform(-5, 8)
            while y < 90:
                depth_half, len_half, h = rng.uniform(4, 8), rng.uniform(4, 10), rng.uniform(6, 25)
                x = side * (edge + rng.uniform(0.0, 6.0) + depth_half)
                inst = b.new_instance("building")
                b.add("box", (x, y + len_half, 0.0), (0, 0, h / 2), (depth_half, len_half, h / 2), "building", inst,
                      _material(rng, "building"))
                y += 2 * len_half + rng.uniform(0.5, 6)
    for _ in range(rng.integers(1, 7)):
        xy = _place(rng, spots, 2.5, ((-road_w / 2 + 0.2, road_w / 2 - 0.2), (4, 60)))
        if xy:
            inst = b.new_instance("car")
            _car(b, (xy[0], xy[1], rng.choice([0.0, np.pi]) + rng.uniform(-0.1, 0.1)), inst, _material(rng, "car"), rng)
    for _ in range(rng.integers(0, 6)):
        side = rng.choice([-1, 1])
        xy = _place(rng, spots, 0.4, ((road_w / 2, edge) if side > 0 else (-edge, -road_w / 2), (2, 35)))
        if xy:
            inst = b.new_instance("person")
            _person(b, (xy[0], xy[1], rng.uniform(-np.pi, np.pi)), inst, _material(rng, "person"), rng)
    for _ in range(rng.integers(1, 8)):
        side = rng.choice([-1, 1])
        xy = _place(rng, spots, 1.0, ((edge - 0.5, edge + 5) if side > 0 else (-edge - 5, -edge + 0.5), (3, 70)))
        if xy:
            inst = b.new_instance("tree")
            _tree(b, (xy[0], xy[1], 0.0), inst, _material(rng, "tree"), rng)
    for _ in range(rng.integers(0, 4)):
        side = rng.choice([-1, 1])
        x = side * (road_w / 2 + 0.3)
        xy = _place(rng, spots, 0.3, ((x - 0.3, x + 0.3), (3, 50)))
        if xy:
            pole = b.new_instance("pole")
            sign = b.new_instance("traffic sign") if rng.random() < 0.6 else 0
            _pole_sign(b, (xy[0], xy[1], rng.uniform(-0.3, 0.3)), pole, sign, _material(rng, "pole"), rng)
    for cls, fn in (("bench", _bench), ("rock", _rock)):
        for _ in range(rng.integers(0, 3)):
            side = rng.choice([-1, 1])
            xy = _place(rng, spots, 1.0, ((edge + 0.5, edge + 6) if side > 0 else (-edge - 6, -edge - 0.5), (3, 30)))
            if xy:
                inst = b.new_instance(cls)
                fn(b, (xy[0], xy[1], rng.uniform(-np.pi, np.pi)), inst, _material(rng, cls), rng)
    return cam, yaw, pitch, (road_w, walk_w), ground


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def _screen_rect(p: _Prim, w2c_r, cam, k: Intrinsics, h, w):
    """Pixel rectangle (v0, v1, u0, u1) covering the primitive, or None if it is behind the camera."""
    c = (p.corners() - cam) @ w2c_r.T
    z = c[:, 2]
    if (z <= 0.05).all():
        return None
    if (z <= 0.05).any():
        return 0, h, 0, w
    u = k.fx * c[:, 0] / z + k.cx
    v = k.fy * c[:, 1] / z + k.cy
    u0, u1 = int(max(np.floor(u.min()) - 1, 0)), int(min(np.ceil(u.max()) + 1, w))
    v0, v1 = int(max(np.floor(v.min()) - 1, 0)), int(min(np.ceil(v.max()) + 1, h))
    if u0 >= u1 or v0 >= v1:
        return None
    return v0, v1, u0, u1


def _sky(d: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Sky colour per ray direction [N, 3]: zenith blue to hazy horizon, a sun glow and soft clouds."""
    dn = d / np.linalg.norm(d, axis=1, keepdims=True)
    up = np.clip(dn[:, 2], 0, 1)
    col = _mix(_c(200, 215, 235), _c(70, 120, 200), up ** 0.6)
    proj = 2.0 / (up + 0.15)  # clouds on a plane above the camera
    cloud = np.clip(_noise2(dn[:, 0] * proj, dn[:, 1] * proj) * 2.2 - 1.1, 0, 1)
    col = col + cloud[:, None] * (0.95 - col)
    sun = np.clip(dn @ light, 0, 1) ** 64
    return np.clip(col + sun[:, None] * 0.4, 0, 1)


def _shadowed(prims: list[_Prim], points: np.ndarray, light: np.ndarray) -> np.ndarray:
    """bool [N]: does a ray from each point towards the (directional) light hit any primitive?

    Points are sorted along one light-space axis so that each caster tests only the slice whose
    projection can fall inside its bounding box (found with searchsorted), then the other two axes.
    """
    e1 = np.cross(light, [0.0, 0.0, 1.0] if abs(light[2]) < 0.9 else [1.0, 0.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(light, e1)
    basis = np.stack([e1, e2, light], 1)
    lp = points @ basis
    order = np.argsort(lp[:, 0], kind="stable")
    lu, lv, lw = lp[order, 0], lp[order, 1], lp[order, 2]
    pts = points[order]
    ox, oy, oz = pts[:, 0], pts[:, 1], pts[:, 2]
    shadow = np.zeros(len(points), dtype=bool)
    for p in prims:
        cb = p.corners() @ basis
        lo, hi = cb.min(0), cb.max(0)
        i0, i1 = np.searchsorted(lu, [lo[0], hi[0]])
        if i0 >= i1:
            continue
        m = (lv[i0:i1] >= lo[1]) & (lv[i0:i1] <= hi[1]) & (lw[i0:i1] <= hi[2]) & ~shadow[i0:i1]
        cand = i0 + np.flatnonzero(m)
        if cand.size:
            t = p.intersect((ox[cand], oy[cand], oz[cand]), light)
            shadow[cand[np.isfinite(t)]] = True
    out = np.empty_like(shadow)
    out[order] = shadow
    return out


def render_scene(seed: int, height: int = 256, width: int = 256, kind: str = "any") -> Scene:
    """Render one procedural scene; the same (seed, height, width, kind) always gives the same scene."""
    if kind not in SCENE_KINDS:
        raise ValueError(f"kind must be one of {SCENE_KINDS}, got {kind!r}")
    if height < 8 or width < 8:
        raise ValueError(f"image must be at least 8x8 pixels, got {height}x{width}")
    rng = np.random.default_rng([int(seed), 0xD5E5])
    if kind == "any":
        kind = "indoor" if rng.random() < 0.5 else "outdoor"
    b = _Builder(rng)
    hfov = np.deg2rad(rng.uniform(55, 72) if kind == "indoor" else rng.uniform(50, 80))
    fx = width / (2 * np.tan(hfov / 2))
    k = Intrinsics(float(fx), float(fx), width / 2.0, height / 2.0)
    if kind == "indoor":
        cam, yaw, pitch, room, stuff = _indoor(rng, b)
        light = np.array([rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), 1.0])
    else:
        cam, yaw, pitch, road, stuff = _outdoor(rng, b)
        elev = rng.uniform(0.35, 1.2)
        az = rng.uniform(-np.pi, np.pi)
        light = np.array([np.cos(elev) * np.cos(az), np.cos(elev) * np.sin(az), np.sin(elev)])
    light = light / np.linalg.norm(light)
    c2w = _look_at(cam, yaw, pitch)
    r = c2w[:3, :3]

    # World rays as component images, scaled to camera-z = 1 so that t is z-depth.
    uu = ((np.arange(width) + 0.5 - k.cx) / k.fx)[None, :]
    vv = ((np.arange(height) + 0.5 - k.cy) / k.fy)[:, None]
    D = tuple(uu * r[i, 0] + vv * r[i, 1] + r[i, 2] for i in range(3))

    # Stuff first: the room shell (ray exits a box it starts in) or the ground plane z = 0.
    if kind == "indoor":
        tb = [np.where(D[i] > 0, (room[i] - cam[i]) / _safe(D[i]), -cam[i] / _safe(D[i])) for i in range(3)]
        face = np.where(tb[0] < tb[1], 0, 1)
        tbest = np.minimum(tb[0], tb[1])
        face = np.where(tb[2] < tbest, 2, face)
        tbest = np.minimum(tbest, tb[2])
        stuff_cls = np.where(face < 2, CLASS_IDS["wall"], np.where(D[2] < 0, CLASS_IDS["floor"], CLASS_IDS["ceiling"]))
    else:
        down = D[2] < -1e-9
        tbest = np.where(down, -cam[2] / np.where(down, D[2], -1.0), _INF)
        ax = np.abs(cam[0] + tbest * D[0])
        stuff_cls = np.where(ax < road[0] / 2, CLASS_IDS["road"],
                             np.where(ax < road[0] / 2 + road[1], CLASS_IDS["sidewalk"], CLASS_IDS["grass"]))
        stuff_cls = np.where(down, stuff_cls, CLASS_IDS["sky"])
    pid = np.full((height, width), -1, dtype=np.int32)

    # Primary visibility: z-buffer over the objects, each restricted to its screen rectangle.
    rects = []
    for i, p in enumerate(b.prims):
        rect = _screen_rect(p, r.T, cam, k, height, width)
        rects.append(rect)
        if rect is None:
            continue
        v0, v1, u0, u1 = rect
        t = p.intersect(cam, tuple(c[v0:v1, u0:u1] for c in D))
        tb_sub, pid_sub = tbest[v0:v1, u0:u1], pid[v0:v1, u0:u1]
        closer = t < tb_sub
        np.copyto(tb_sub, t, where=closer)
        np.copyto(pid_sub, i, where=closer)

    hit = np.isfinite(tbest)
    th = np.where(hit, tbest, 0.0)
    P = np.stack([cam[i] + th * D[i] for i in range(3)], -1)
    albedo = np.zeros((height, width, 3), dtype=np.float32)  # colour math needs no float64
    normal = np.zeros((height, width, 3))
    labels = np.where(pid >= 0, 0, stuff_cls).astype(np.uint8)
    instances = np.zeros((height, width), dtype=np.uint16)

    for i, (p, rect) in enumerate(zip(b.prims, rects)):
        if rect is None:
            continue
        v0, v1, u0, u1 = rect
        sel = pid[v0:v1, u0:u1] == i
        if not sel.any():
            continue
        pl = (P[v0:v1, u0:u1][sel] - p.pos) @ p.rot
        n_loc = p.normal(pl)
        albedo[v0:v1, u0:u1][sel] = _texture(p.mat, pl, n_loc)
        normal[v0:v1, u0:u1][sel] = n_loc @ p.rot.T
        labels[v0:v1, u0:u1][sel] = p.label
        instances[v0:v1, u0:u1][sel] = p.inst

    st = (pid < 0) & hit
    Ps, cls_s = P[st], stuff_cls[st]
    alb_s = np.zeros((len(Ps), 3))
    nrm_s = np.zeros((len(Ps), 3))
    if kind == "indoor":
        f = face[st]
        rows = np.arange(len(Ps))
        nrm_s[rows, f] = -np.sign(np.stack(D, -1)[st][rows, f])
        for name, mat in stuff.items():
            m = cls_s == CLASS_IDS[name]
            if m.any():
                alb_s[m] = _texture(mat, Ps[m], nrm_s[m])
    else:
        nrm_s[:, 2] = 1.0
        for name, mat in stuff.items():
            m = cls_s == CLASS_IDS[name]
            if not m.any():
                continue
            q = Ps[m]
            alb = _texture(mat, q, nrm_s[m])
            if name == "road":  # dashed centre line and edge lines
                x, y = q[:, 0], q[:, 1]
                line = ((np.abs(x) < 0.08) & ((y % 6) < 3)) | (np.abs(np.abs(x) - road[0] / 2 + 0.25) < 0.07)
                alb[line] = _c(235, 235, 225)
            alb_s[m] = alb
    albedo[st], normal[st] = alb_s, nrm_s

    # Hard shadows: offset along the normal so a surface does not shadow itself.
    ndotl = normal @ light
    lit = np.flatnonzero(hit & (ndotl > 0))
    origins = P.reshape(-1, 3)[lit] + normal.reshape(-1, 3)[lit] * 2e-3
    direct = np.zeros(height * width)
    direct[lit] = ndotl.reshape(-1)[lit] * ~_shadowed(b.prims, origins, light)
    direct = direct.reshape(height, width)

    # A weak fill from the camera side keeps faces turned away from the light readable.
    facing = -(normal[..., 0] * D[0] + normal[..., 1] * D[1] + normal[..., 2] * D[2])
    fill = 0.15 * np.clip(facing / np.sqrt(D[0] ** 2 + D[1] ** 2 + D[2] ** 2), 0, 1)
    if kind == "indoor":
        shade = 0.42 + fill + 0.75 * direct
    else:
        shade = 0.38 + fill + 0.85 * direct
    rgb = albedo * shade.astype(np.float32)[..., None]

    depth = th
    if kind == "outdoor":
        haze = (1 - np.exp(-th / 220.0, dtype=np.float32))[..., None]
        rgb += haze * (_c(200, 212, 228).astype(np.float32) - rgb)
        sky = ~hit
        rgb[sky] = _sky(np.stack(D, -1)[sky], light)
        depth = np.where(th > OUTDOOR_MAX_DEPTH, 0.0, th)
    image = np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)
    return Scene(int(seed), kind, image, depth.astype(np.float32), labels, instances, dict(b.inst_classes), k, c2w,
                 light)


def write_samples(out_dir: str | Path, seeds: Sequence[int] = (0, 1, 2, 3), height: int = 256, width: int = 320,
                  kind: str = "any") -> list[Path]:
    """Write ``scene_<seed>.png`` (RGB), ``_depth.png`` (16-bit, metres * DEPTH_PNG_SCALE, 0 = invalid),
    ``_label.png`` (class ids) and ``_meta.json`` (kind, intrinsics, class names) per seed; returns the
    RGB paths. Read depth back with ``training.userdata.load_depth(path, scale=DEPTH_PNG_SCALE)``."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        s = render_scene(seed, height, width, kind)
        stem = out / f"scene_{seed}"
        Image.fromarray(s.image).save(f"{stem}.png", optimize=True)
        Image.fromarray(s.labels).save(f"{stem}_label.png", optimize=True)
        Image.fromarray(np.round(s.depth * DEPTH_PNG_SCALE).astype(np.uint16)).save(f"{stem}_depth.png", optimize=True)
        meta = {"seed": s.seed, "kind": s.kind, "height": height, "width": width, "depth_scale": DEPTH_PNG_SCALE,
                "intrinsics": dict(fx=s.intrinsics.fx, fy=s.intrinsics.fy, cx=s.intrinsics.cx, cy=s.intrinsics.cy),
                "classes_present": s.class_names_present(), "class_names": list(CLASS_NAMES)}
        Path(f"{stem}_meta.json").write_text(json.dumps(meta, indent=1))
        paths.append(Path(f"{stem}.png"))
    return paths
