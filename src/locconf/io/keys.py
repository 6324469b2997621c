"""One mapping for a whole run: image keys <-> integer image ids, labels <-> category ids, and the image files.

Image keys. Files name their images by an integer ``image_id`` (COCO) or by a string, usually a
path (DeepForest's ``image_path``, a vector feature's ``image_path``, a COCO record whose
``image_id`` is a string). :class:`ImageKeys` maps every key of every file read in one run (the
candidates, each file to fuse, the ground truth) to one integer id:

* with a ground truth, its images decide: an integer key must be one of its image ids; a string
  key names the image whose ``file_name`` equals it, else the one image whose ``file_name`` has the
  same base name (``OSBS_029.tif`` matches ``images/OSBS_029.tif``); anything else is an error
  naming the key;
* without one, integer keys are the ids, and string keys are numbered 1, 2, ... in the order they
  are first met (one file may not mix integer ids with strings then);
* a file with no image column at all (a CSV of one image) has the key ``None``: the ground truth's
  only image, or image 1.

Labels. :class:`Categories` maps labels to COCO category ids. A label is a name (``"Tree"``) or an
integer. With the ground truth's categories, a name must be one of their names; integers are
category ids when every integer label of the file is one, else, when they all lie in ``0..K-1``,
positions in the categories sorted by id (DeepForest's numeric labels, ``{"Tree": 0}``). Without
categories, integers are ids as they are and names are numbered after the largest id seen, in
sorted order per file.

Images. :class:`ImageFinder` finds an image key's file among ``images`` (files and folders), for
the size of the images of a CSV and the geotransform of the rasters of vector files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePath
from typing import Any, Optional, Union

__all__ = ["ImageKeys", "Categories", "ImageFinder", "Key", "RASTER_SUFFIXES"]

#: An image key: an integer id, a string (a path) or None (a file of one image without an image column).
Key = Union[int, str, None]

#: Files a folder given as ``images`` is searched for when vector features name no image.
RASTER_SUFFIXES = (".tif", ".tiff")


def _base(name: str) -> str:
    return PurePath(name.replace("\\", "/")).name


class ImageKeys:
    """Image keys -> integer image ids (see the module docstring), and back to a name for output.

    Args:
        images: the ground truth's image records (``id``, ``file_name``), or None.
    """

    def __init__(self, images: Optional[Sequence[dict]] = None):
        self.frozen = images is not None
        self._ids: dict[int, Optional[str]] = {}
        self._by_name: dict[str, int] = {}
        self._by_base: dict[str, list[int]] = {}
        self._strings: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._kinds: set[str] = set()
        for im in images or ():
            name = im.get("file_name")
            self._ids[im["id"]] = name if isinstance(name, str) else None
            if isinstance(name, str):
                self._by_name.setdefault(name, im["id"])
                self._by_base.setdefault(_base(name), []).append(im["id"])

    def id(self, key: Key, where: str = "image key") -> int:
        """The integer image id of ``key``; ``where`` starts an error message (file and record)."""
        if isinstance(key, bool) or not (key is None or isinstance(key, (int, str))):
            raise ValueError(f"{where}: an image key must be an integer id or a string (a path), got {key!r}")
        if key is None:
            return self._single(where)
        if isinstance(key, int):
            if self.frozen and key not in self._ids:
                raise ValueError(f"{where}: 'image_id' {key} is not an image of the ground truth")
            self._kind("int", where)
            return key
        if key in self._strings:
            return self._strings[key]
        image_id = self._match(key, where) if self.frozen else self._new(key, where)
        self._strings[key] = image_id
        self._names.setdefault(image_id, key)
        return image_id

    def _kind(self, kind: str, where: str) -> None:
        self._kinds.add(kind)
        if not self.frozen and len(self._kinds) > 1:
            raise ValueError(f"{where}: images are named both by integer ids and by strings (paths); without a "
                             "ground truth to map them to one another, name them the same way in every file")

    def _single(self, where: str) -> int:
        if self.frozen:
            if len(self._ids) != 1:
                raise ValueError(f"{where}: the file names no image (no image_path column) and the ground truth "
                                 f"has {len(self._ids)} images: add an image_path column")
            return next(iter(self._ids))
        self._kind("int", where)
        return 1

    def _match(self, key: str, where: str) -> int:
        if key in self._by_name:
            return self._by_name[key]
        same = self._by_base.get(_base(key), [])
        if len(same) == 1:
            return same[0]
        if len(same) > 1:
            raise ValueError(f"{where}: image {key!r} matches {len(same)} images of the ground truth by its base name "
                             f"({_base(key)!r}); write its path as the ground truth's file_name does")
        shown = ", ".join(repr(n) for n in list(self._by_name)[:5])
        raise ValueError(f"{where}: image {key!r} is not an image of the ground truth (its file names: {shown}"
                         f"{', ...' if len(self._by_name) > 5 else ''})")

    def _new(self, key: str, where: str) -> int:
        self._kind("str", where)
        image_id = len(self._strings) + 1
        return image_id

    def name(self, image_id: int) -> Optional[str]:
        """The string an image is known by (the first key that named it, else the ground truth's
        ``file_name``), or None for an image known by its integer id alone."""
        if image_id in self._names:
            return self._names[image_id]
        return self._ids.get(image_id)

    def string_key(self, image_id: int) -> Optional[str]:
        """The string key an input named the image by, or None (named by its integer id only)."""
        return self._names.get(image_id)

    @property
    def ground_truth_ids(self) -> set[int]:
        """The ground truth's image ids (empty without one)."""
        return set(self._ids)


def _as_int(label: Any) -> Optional[int]:
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return label
    if isinstance(label, float) and label.is_integer():
        return int(label)
    if isinstance(label, str):
        text = label.strip()
        if text.lstrip("+-").isdigit():
            return int(text)
    return None


class Categories:
    """Labels (names or integers) -> COCO category ids, and ids -> names (see the module docstring).

    Args:
        categories: the ground truth's ``categories`` (``id``, ``name``), or None.
    """

    def __init__(self, categories: Optional[Sequence[dict]] = None):
        self.frozen = categories is not None
        self.names: dict[int, str] = {}
        for c in categories or ():
            self.names[int(c["id"])] = str(c.get("name", c["id"]))
        self._by_name = {n: i for i, n in self.names.items()}

    def ids(self, labels: Sequence[Any], where: Sequence[str]) -> list[int]:
        """The category id of every label of one file (``where[i]`` names record ``i`` in errors)."""
        ints = {i: v for i, label in enumerate(labels) if (v := _as_int(label)) is not None}
        out: list[int] = [0] * len(labels)
        if ints:
            known = set(self.names)
            if self.frozen and not all(v in known for v in ints.values()):
                ordered = sorted(known)
                if all(0 <= v < len(ordered) for v in ints.values()):  # DeepForest's 0-based numeric labels
                    ints = {i: ordered[v] for i, v in ints.items()}
                else:
                    i = next(i for i, v in ints.items() if v not in known)
                    raise ValueError(f"{where[i]}: label {labels[i]!r} is neither a category id of the ground truth "
                                     f"({ordered[:10]}) nor a position 0..{len(ordered) - 1} in its categories")
            for i, v in ints.items():
                out[i] = v
                if not self.frozen:
                    self.names.setdefault(v, str(v))
        named = [i for i in range(len(labels)) if i not in ints]
        for i in named:
            label = labels[i]
            if not isinstance(label, str) or not label.strip():
                raise ValueError(f"{where[i]}: label must be a category name or an integer, got {label!r}")
        if not self.frozen:
            for name in sorted({labels[i] for i in named} - set(self._by_name)):
                new = max(self.names, default=0) + 1
                self.names[new], self._by_name[name] = name, new
        for i in named:
            if labels[i] not in self._by_name:
                shown = ", ".join(repr(n) for n in list(self._by_name)[:10])
                raise ValueError(f"{where[i]}: label {labels[i]!r} is not a category of the ground truth ({shown})")
            out[i] = self._by_name[labels[i]]
        return out

    def name(self, category_id: int) -> Any:
        """The name of a category id, or the id itself when it has none."""
        return self.names.get(category_id, category_id)


class ImageFinder:
    """The image files of image keys, among ``images``: files, and folders searched by base name.

    Args:
        images: image files and folders (None or empty: none).
        base: a folder also searched (the folder of the file being read), after ``images``.
    """

    def __init__(self, images: Optional[Iterable[str | os.PathLike]] = None, base: Optional[Path] = None):
        if isinstance(images, (str, os.PathLike)):
            images = [images]
        self.paths = [Path(p) for p in images or ()]
        for p in self.paths:
            if not p.exists():
                raise ValueError(f"images: {p} does not exist (give image files or folders)")
        self.base = base

    def find(self, key: Key) -> Optional[Path]:
        """The file an image key names, or None."""
        if not isinstance(key, str) or not key:
            return None
        name = _base(key)
        for p in self.paths:
            if p.is_file() and (p.name == name or str(p) == key):
                return p
        for folder in [p for p in self.paths if p.is_dir()] + ([self.base] if self.base is not None else []):
            for candidate in (folder / key, folder / name):
                if candidate.is_file():
                    return candidate
        direct = Path(key)
        return direct if direct.is_file() else None

    def rasters(self) -> list[Path]:
        """The rasters given: the files, and each folder's ``.tif`` / ``.tiff`` files (sorted by name)."""
        out = []
        for p in self.paths:
            if p.is_file():
                out.append(p)
            else:
                out.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in RASTER_SUFFIXES))
        return out
