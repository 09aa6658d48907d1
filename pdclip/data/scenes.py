"""Procedural scenes for the synthetic source: sample attributes (vectorised), render one image.

A scene holds up to `K` objects. Object 0 is the *primary* object (always large; its colour and shape
are the image's class); the others are small distractors in other quadrants. Everything random is
drawn once, at construction, into `Scenes` arrays, so rendering image `i` is a pure function of
row `i`: deterministic by seed and cheap (`numpy` masks over each object's bounding box only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS = {  # name -> RGB; the first `n_colours` are used
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40),
    "purple": (140, 50, 190), "orange": (245, 140, 20), "pink": (245, 130, 190), "cyan": (40, 210, 220),
    "brown": (130, 80, 40), "white": (245, 245, 245), "black": (20, 20, 20), "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon",
          "semicircle", "pentagon")
QUADRANT_CENTRES = np.array([[0.27, 0.27], [0.73, 0.27], [0.27, 0.73], [0.73, 0.73]])


@dataclass
class Scenes:
    """Attributes of `N` scenes with at most `K` objects; absent objects have `shape == -1`.

    Attributes:
        shape, colour: `(N, K)` int indices into `SHAPES` / `COLOURS`.
        large: `(N, K)` bool, True for the primary object.
        cx, cy: `(N, K)` object centres in `[0, 1]` image coordinates (y grows downwards).
        radius: `(N, K)` object radii as a fraction of the image side.
        angle: `(N, K)` rotation in radians; tint: `(N, K, 3)` per-channel colour gain.
        bg: `(N, 2, 3)` two muted background colours; bg_angle: `(N,)`; bg_period: `(N,)` pixels
            per stripe / check; texture: whether objects are drawn with a stripe texture.
        shift: strength of the distribution-shifted style in [0, 1]: 0 plain (gradient backgrounds,
            flat objects), 1 striped / checked backgrounds and striped objects; in between, both
            textures at that fraction of their contrast.
    """

    shape: np.ndarray
    colour: np.ndarray
    large: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    radius: np.ndarray
    angle: np.ndarray
    tint: np.ndarray
    bg: np.ndarray
    bg_angle: np.ndarray
    bg_period: np.ndarray
    shift: float

    def __len__(self) -> int:
        return len(self.shape)


def sample_scenes(rng: np.random.Generator, n: int, n_shapes: int, n_colours: int,
                  max_objects: int, max_rotation: float, shift: float = 0.0) -> Scenes:
    """Draw `n` scenes; the number of objects per scene is uniform in `[1, max_objects]`."""
    if not 1 <= max_objects <= 4:
        raise ValueError(f"max_objects must be in [1, 4] (one object per quadrant), got {max_objects}")
    if not 2 <= n_shapes <= len(SHAPES) or not 2 <= n_colours <= len(COLOURS):
        raise ValueError(f"need 2 <= n_shapes <= {len(SHAPES)} and 2 <= n_colours <= {len(COLOURS)}, "
                         f"got {n_shapes} and {n_colours}")
    k = max_objects
    n_obj = rng.integers(1, k + 1, size=n)
    present = np.arange(k)[None, :] < n_obj[:, None]
    shape = np.where(present, rng.integers(0, n_shapes, size=(n, k)), -1)
    colour = np.where(present, rng.integers(0, n_colours, size=(n, k)), -1)
    large = np.zeros((n, k), dtype=bool)
    large[:, 0] = True
    # Several objects sit in distinct quadrants; a lone object anywhere near the middle.
    quadrants = np.argsort(rng.random((n, 4)), axis=1)[:, :k]
    centres = QUADRANT_CENTRES[quadrants] + rng.uniform(-0.05, 0.05, size=(n, k, 2))
    lone = n_obj == 1
    centres[lone, 0] = rng.uniform(0.3, 0.7, size=(lone.sum(), 2))
    radius = np.where(large, rng.uniform(0.19, 0.23, size=(n, k)), rng.uniform(0.11, 0.14, size=(n, k)))
    return Scenes(
        shape=shape, colour=colour, large=large, cx=centres[..., 0], cy=centres[..., 1], radius=radius,
        angle=rng.uniform(-max_rotation, max_rotation, size=(n, k)),
        tint=rng.uniform(0.75, 1.1, size=(n, k, 3)),
        bg=muted_colours(rng, n), bg_angle=rng.uniform(0, np.pi, size=n),
        bg_period=rng.uniform(0.08, 0.2, size=n), shift=shift,
    )


def muted_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """`(n, 2, 3)` low-saturation colours: a grey level plus a small tint, far from the object palette."""
    grey = rng.uniform(70, 190, size=(n, 2, 1))
    return np.clip(grey + rng.uniform(-30, 30, size=(n, 2, 3)), 0, 255)


def shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a unit-radius shape at local coordinates `u` (right), `v` (down)."""
    if name in ("circle", "star", "ring", "hexagon", "pentagon", "semicircle"):
        r = np.hypot(u, v)
    if name in ("star", "hexagon", "pentagon"):
        theta = np.arctan2(u, -v)  # 0 points up, so stars and polygons stand on a side
    if name == "circle":
        return r <= 1
    if name == "square":
        return np.maximum(abs(u), abs(v)) <= 0.8
    if name == "triangle":
        up = -v
        return (up >= -0.6) & (abs(u) <= 0.95 * (1 - up) / 1.6)
    if name == "diamond":
        return abs(u) + abs(v) <= 1
    if name == "star":
        return r <= 0.42 + 0.58 * ((1 + np.cos(5 * theta)) / 2) ** 2
    if name == "cross":
        return ((abs(u) <= 0.3) & (abs(v) <= 0.95)) | ((abs(v) <= 0.3) & (abs(u) <= 0.95))
    if name == "ring":
        return (r <= 1) & (r >= 0.55)
    if name in ("hexagon", "pentagon"):
        sides = 6 if name == "hexagon" else 5
        wedge = 2 * np.pi / sides
        return r * np.cos(np.mod(theta, wedge) - wedge / 2) <= 0.95 * np.cos(wedge / 2)
    if name == "semicircle":
        return (r <= 1) & (v <= 0.25)
    raise ValueError(f"unknown shape {name!r}")


def background(s: Scenes, i: int, size: int) -> np.ndarray:
    """`(size, size, 3)` float background: a linear gradient, blended (shift) with stripes / checks."""
    yy, xx = np.ogrid[0:size, 0:size]  # (size, 1) and (1, size): broadcasting makes the grid
    yy, xx = yy / size, xx / size
    along = np.cos(s.bg_angle[i]) * xx + np.sin(s.bg_angle[i]) * yy
    weight = (along - along.min()) / max(np.ptp(along), 1e-6)
    if s.shift > 0:
        stripes = np.floor(along / s.bg_period[i]).astype(int)
        checks = stripes + np.floor((np.cos(s.bg_angle[i]) * yy - np.sin(s.bg_angle[i]) * xx)
                                    / s.bg_period[i]).astype(int)
        texture = ((checks if i % 2 else stripes) % 2).astype(float)
        weight = (1 - s.shift) * weight + s.shift * texture
    return s.bg[i, 0] * (1 - weight[..., None]) + s.bg[i, 1] * weight[..., None]


def render(s: Scenes, i: int, size: int, noise: float = 6.0) -> np.ndarray:
    """Render scene `i` as a `uint8` array `(size, size, 3)`; pixel noise seeded by `i`."""
    img = background(s, i, size)
    palette = np.array(list(COLOURS.values()), dtype=float)
    for k in np.flatnonzero(s.shape[i] >= 0):
        r_px = s.radius[i, k] * size
        x0, y0 = s.cx[i, k] * size, s.cy[i, k] * size
        lo_y, hi_y = max(int(y0 - r_px) - 1, 0), min(int(y0 + r_px) + 2, size)
        lo_x, hi_x = max(int(x0 - r_px) - 1, 0), min(int(x0 + r_px) + 2, size)
        yy, xx = np.ogrid[lo_y:hi_y, lo_x:hi_x]
        yy, xx = yy + 0.5, xx + 0.5
        c, sn = np.cos(s.angle[i, k]), np.sin(s.angle[i, k])
        u = (c * (xx - x0) + sn * (yy - y0)) / r_px
        v = (-sn * (xx - x0) + c * (yy - y0)) / r_px
        mask = shape_mask(SHAPES[s.shape[i, k]], u, v)
        rgb = np.clip(palette[s.colour[i, k]] * s.tint[i, k], 0, 255)
        fill = np.broadcast_to(rgb, mask.shape + (3,))
        if s.shift > 0:  # a diagonal stripe texture on the object: a new style at test time
            fill = fill * (1 - 0.3 * s.shift + 0.3 * s.shift * (np.floor((u + v) * 2.5) % 2))[..., None]
        img[lo_y:hi_y, lo_x:hi_x][mask] = fill[mask]
    grain = np.random.default_rng(i).standard_normal(img.shape) * noise  # = normal(0, noise), bit for bit
    return np.clip(img + grain, 0, 255).astype(np.uint8)
