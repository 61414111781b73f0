"""Where voxels lie in space: a volume's geometry (spacing, origin, direction, in ITK's LPS convention;
``ijk_to_ras`` converts for Slicer) and its orientation (which array axis is axial, and which way round)."""
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from synomaly.errors import InputError

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """Voxel-to-physical mapping of a 3D volume (ITK/LPS convention)."""

    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...]  # 3x3 row-major; columns are the i, j, k axis directions

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 IJK-to-RAS matrix, as Slicer's volume nodes use."""
        m = np.eye(4)
        m[:3, :3] = _LPS_TO_RAS @ self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = _LPS_TO_RAS @ np.asarray(self.origin, dtype=float)
        return m

    @classmethod
    def from_ijk_to_ras(cls, matrix) -> "Geometry":
        m = np.asarray(matrix, dtype=float).reshape(4, 4)
        lps = _LPS_TO_RAS @ m[:3, :3]
        spacing = np.linalg.norm(lps, axis=0)
        if np.any(spacing <= 0):
            raise InputError("The IJK-to-RAS matrix has a zero-length axis: the volume geometry is invalid.")
        direction = lps / spacing
        origin = _LPS_TO_RAS @ m[:3, 3]
        return cls(tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
                   tuple(float(d) for d in direction.ravel()))

    @classmethod
    def from_sitk(cls, image) -> "Geometry":
        return cls(tuple(float(s) for s in image.GetSpacing()), tuple(float(o) for o in image.GetOrigin()),
                   tuple(float(d) for d in image.GetDirection()))

    def apply_to_sitk(self, image) -> None:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    @classmethod
    def identity(cls, spacing=(1.0, 1.0, 1.0)) -> "Geometry":
        return cls(tuple(float(s) for s in spacing), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


@dataclass
class Orientation:
    """Axis permutation and flips that bring an array to (S-I, A-P, R-L) = axial slices along axis 0."""

    perm: Tuple[int, int, int]
    flip: Tuple[bool, bool, bool]

    @classmethod
    def for_geometry(cls, geometry: Geometry) -> "Orientation":
        d = geometry.direction_matrix  # columns: physical direction of ITK axes i, j, k (x, y, z)
        phys_of_itk = np.argmax(np.abs(d), axis=0)
        if len(set(phys_of_itk.tolist())) != 3:
            order = np.argsort(-np.abs(d).max(axis=0))
            used, phys_of_itk = set(), np.zeros(3, dtype=int)
            for a in order:
                p = next(p for p in np.argsort(-np.abs(d[:, a])) if p not in used)
                used.add(p)
                phys_of_itk[a] = p
        perm, flip = [], []
        for phys in (2, 1, 0):  # S, P, L as physical axes z, y, x in LPS
            itk_axis = int(np.where(phys_of_itk == phys)[0][0])
            perm.append(2 - itk_axis)  # numpy axis of an ITK axis
            flip.append(bool(d[phys, itk_axis] < 0))
        return cls(tuple(perm), tuple(flip))

    @classmethod
    def for_image(cls, shape, geometry: Geometry) -> "Orientation":
        """``for_geometry``, except for a 2D image (one slice along some axis): as stored, its slice first.
        A 2D image has no axial direction to find, and its rows and columns mean what the device made them."""
        if len(shape) == 3 and 1 in tuple(shape):
            axis = list(shape).index(1)
            return cls((axis,) + tuple(a for a in range(3) if a != axis), (False, False, False))
        return cls.for_geometry(geometry)

    def apply(self, array: np.ndarray) -> np.ndarray:
        out = np.transpose(array, self.perm)
        for axis, f in enumerate(self.flip):
            if f:
                out = np.flip(out, axis)
        return out

    def invert(self, array: np.ndarray) -> np.ndarray:
        out = array
        for axis, f in enumerate(self.flip):
            if f:
                out = np.flip(out, axis)
        return np.transpose(out, np.argsort(self.perm))

    def spacing_zyx(self, geometry: Geometry) -> Tuple[float, float, float]:
        sp = tuple(reversed(geometry.spacing))
        return tuple(float(sp[p]) for p in self.perm)


def grid_difference(shape_a, a: Geometry, shape_b, b: Geometry) -> Optional[str]:
    """How two voxel grids differ (size, spacing, direction, origin), or None when a voxel of one is the same
    place as the voxel of the other: masks and labels are matched in space, not by their array sizes alone."""
    if tuple(shape_a) != tuple(shape_b):
        return f"size {tuple(reversed(shape_a))} against {tuple(reversed(shape_b))}"
    spacing_a, spacing_b = np.asarray(a.spacing, float), np.asarray(b.spacing, float)
    if not np.allclose(spacing_a, spacing_b, rtol=1e-3, atol=1e-6):
        return f"spacing {tuple(round(s, 4) for s in a.spacing)} mm against {tuple(round(s, 4) for s in b.spacing)} mm"
    if not np.allclose(a.direction_matrix, b.direction_matrix, atol=1e-3):
        return "its axes point in other directions"
    distance = float(np.linalg.norm(np.asarray(a.origin, float) - np.asarray(b.origin, float)))
    if distance > 0.5 * float(spacing_b.min()):
        return f"its origin lies {distance:.1f} mm away"
    return None


# A scan's voxels lie between these sizes; outside them a unit was misread (metres or microns as mm).
PLAUSIBLE_SPACING_MM = (0.01, 50.0)


def geometry_problem(shape, geometry: Geometry) -> Optional[str]:
    """What makes a grid unusable, or None: axes not at right angles (a sheared or nearly collinear grid, on
    which every volume and distance would be wrong) or, for a 3D volume, an implausible voxel size."""
    d = geometry.direction_matrix
    gram = d.T @ d
    if not np.all(np.isfinite(gram)) or np.abs(gram - np.eye(3)).max() > 1e-3:
        cosines = [abs(float(gram[i, j])) / max(float(np.sqrt(gram[i, i] * gram[j, j])), 1e-12)
                   for i, j in ((0, 1), (0, 2), (1, 2))]
        angle = float(np.degrees(np.arccos(min(1.0, max(cosines)))))
        return (f"its axes are not at right angles (two of them {angle:.1f} degrees apart instead of 90: a sheared "
                "grid, on which volumes and distances would be wrong); resample it onto an orthogonal grid first")
    spacing = np.asarray(geometry.spacing, dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        return f"its voxel size {tuple(geometry.spacing)} mm is not positive"
    low, high = PLAUSIBLE_SPACING_MM
    in_plane = [s for s, n in zip(geometry.spacing, reversed(tuple(shape))) if n > 1]
    if len(in_plane) == 3 and (min(in_plane) < low or max(in_plane) > high):
        return (f"its voxel size {tuple(round(s, 6) for s in geometry.spacing)} mm is implausible for a scan (from "
                f"{low:g} to {high:g} mm expected: were metres or microns read as millimetres?); fix the header's "
                "spacing")
    return None
