"""Where calibration and evaluation tensors come from: image folders, tensor files, bundled photos.

A source knows its length and yields preprocessed float32 batches lazily, so statistics can be
collected in bounded memory however many images there are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..errors import DataError, first_line
from .preprocess import Preprocess

F32_MAX = float(np.finfo(np.float32).max)
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}

# Photos shipped inside installed packages; split so calibration and evaluation never share a photo
# (the stereo motorcycle pair stays on one side). Textures on which EfficientNet-Lite0 is very
# unsure (grass, gravel, page: FP32 top-1 margin < 0.05) are spread over both splits, so that
# top-1 agreement on held-out crops is not dominated by near-ties.
SAMPLE_PHOTOS = {
    "calib": ["skimage:astronaut.png", "skimage:coffee.png", "skimage:rocket.jpg", "sklearn:china.jpg",
              "skimage:brick.png", "skimage:hubble_deep_field.jpg", "skimage:gravel.png", "skimage:page.png",
              "skimage:ihc.png", "skimage:coins.png"],
    "eval": ["skimage:chelsea.png", "skimage:camera.png", "skimage:motorcycle_left.png",
             "skimage:motorcycle_right.png", "sklearn:flower.jpg", "skimage:retina.jpg", "skimage:grass.png",
             "skimage:clock_motion.png", "skimage:text.png", "skimage:moon.png"],
}


@dataclass
class DataSource:
    """A finite, deterministic sequence of preprocessed samples (N, C, H, W)."""

    description: str
    kind: str  # "folder", "tensor", "samples"
    count: int
    _get: Callable[[int, int], np.ndarray] = field(repr=False)  # (start, stop) -> array
    labels: np.ndarray | None = None
    skipped: int = 0

    def __len__(self) -> int:
        return self.count

    def batches(self, batch_size: int, part: range | None = None) -> Iterator[torch.Tensor]:
        """The samples in batches of `batch_size`; only the batches numbered in `part` when given
        (a calibration rank's shard, `calib.distributed`), so a rank reads only its own samples."""
        for b in range(-(-self.count // batch_size)) if part is None else part:
            start = b * batch_size
            yield torch.from_numpy(np.ascontiguousarray(self._get(start, min(start + batch_size, self.count))))

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self._get(0, self.count)))

    def to_dict(self) -> dict:
        return {"source": self.description, "kind": self.kind, "size": self.count, "skipped": self.skipped}

    def check_label_range(self, classes: int) -> None:
        """Refuse labels that no output of a `classes`-way model can match (accuracy would read 0)."""
        if self.labels is not None and self.labels.size and int(self.labels.max()) >= classes:
            raise DataError(f"labels of {self.description} go up to {int(self.labels.max())} but the model has {classes} "
                            f"outputs; give class indices 0..{classes - 1}")


def float_samples(x: np.ndarray, what: str, where: str = "") -> np.ndarray:
    """`x` as float32, refusing NaN/Inf and values beyond float32's range (the cast would make them Inf)."""
    if not np.all(np.isfinite(x)):
        raise DataError(f"{what} contains NaN or Inf values{where}; remove or fix those samples")
    if x.dtype.itemsize > 4 and x.size:
        peak = float(np.abs(x).max())
        if peak > F32_MAX:
            raise DataError(f"{what} holds values up to {peak:.3g}{where}, beyond float32's range (±{F32_MAX:.3g}); "
                            "give preprocessed (normalised) data")
    return np.array(x, np.float32)  # a copy: torch.from_numpy needs a writable array, not a read-only memmap view


def check_float_dtype(dtype: np.dtype | torch.dtype, what: str) -> None:
    """Refuse integer, boolean and complex data: it is not preprocessed, and a cast would hide that
    (raw 0..255 pixels calibrate the wrong range; complex values would lose their imaginary part)."""
    is_float = dtype.is_floating_point if isinstance(dtype, torch.dtype) else np.dtype(dtype).kind == "f"
    if not is_float:
        name = str(dtype).replace("torch.", "")
        raise DataError(f"{what} has dtype {name}; expected preprocessed float tensors: apply the model's "
                        "normalisation and convert to float32")


def shape_mismatch(what: str, shape: tuple[int, ...], input_shape: tuple[int, ...]) -> DataError:
    """Data whose per-sample shape is not the model's: name both, and the --input-shape that fits the data."""
    msg = f"{what} has shape {tuple(shape)}; the model expects (N, {', '.join(map(str, input_shape))})"
    if len(shape) >= 2 and all(d > 0 for d in shape[1:]):
        msg += (f"; give --calib/--data a tensor of that shape, or quantize with --input-shape {','.join(map(str, shape[1:]))} "
                "if the model takes such inputs")
    return DataError(msg)


def check_labels(labels: Any, samples: int, what: str) -> np.ndarray:
    """One integer class index ≥ 0 per sample; anything else would make accuracy meaningless."""
    lab = np.asarray(labels)
    if lab.ndim != 1:
        hint = " (one-hot? store labels.argmax(1))" if lab.ndim == 2 else ""
        raise DataError(f"labels in {what} must be one class index per sample, shape ({samples},); got shape {lab.shape}{hint}")
    if lab.dtype.kind not in "iu":
        raise DataError(f"labels in {what} have dtype {lab.dtype}; expected integer class indices (0, 1, ...)")
    if lab.shape[0] != samples:
        raise DataError(f"{what} has {lab.shape[0]} labels for {samples} samples; give one label per sample")
    if lab.size and int(lab.min()) < 0:
        raise DataError(f"labels in {what} include {int(lab.min())}; class indices start at 0")
    return lab


def _photo_path(ref: str) -> Path:
    pkg, name = ref.split(":", 1)
    if pkg == "skimage":
        import skimage.data
        return Path(skimage.data.data_dir) / name
    import sklearn.datasets
    return Path(sklearn.datasets.__file__).parent / "images" / name


def _load_rgb(path: Path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _resize_crop(rgb: np.ndarray, box: tuple[float, float, float, float], size: int, flip: bool) -> np.ndarray:
    from PIL import Image
    im = Image.fromarray(rgb).resize((size, size), Image.BILINEAR, box=box)
    out = np.asarray(im)
    return out[:, ::-1] if flip else out


def _center_crop(rgb: np.ndarray, pre: Preprocess) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = pre.resize / min(h, w)
    ch, cw = pre.size / s, pre.size / s
    y0, x0 = (h - ch) / 2, (w - cw) / 2
    return _resize_crop(rgb, (x0, y0, x0 + cw, y0 + ch), pre.size, False)


def _random_crop_boxes(h: int, w: int, n: int, rng: np.random.Generator) -> list[tuple]:
    """Random resized crops (scale 0.1..1 of the area, aspect 3/4..4/3) with a coin-flip mirror."""
    boxes = []
    while len(boxes) < n:
        area = h * w * rng.uniform(0.1, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = np.sqrt(area * ratio), np.sqrt(area / ratio)
        flip = bool(rng.random() < 0.5)
        if cw <= w and ch <= h:
            x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            boxes.append(((x0, y0, x0 + cw, y0 + ch), flip))
    return boxes


def samples_source(split: str, n: int, pre: Preprocess, seed: int) -> DataSource:
    """Augmented crops of the photos bundled with scikit-image and scikit-learn."""
    photos = [_load_rgb(_photo_path(ref)) for ref in SAMPLE_PHOTOS[split]]
    rng = np.random.default_rng([seed, 0 if split == "calib" else 1])
    plan = []
    per_photo = [n // len(photos) + (1 if i < n % len(photos) else 0) for i in range(len(photos))]
    for i, (rgb, k) in enumerate(zip(photos, per_photo)):
        plan += [(i, box, flip) for box, flip in _random_crop_boxes(rgb.shape[0], rgb.shape[1], k, rng)]

    def get(start: int, stop: int) -> np.ndarray:
        return np.stack([pre.apply(_resize_crop(photos[i], box, pre.size, flip)) for i, box, flip in plan[start:stop]])

    return DataSource(f"samples:{split}", "samples", len(plan), get)


def _undecodable(f: Path) -> str:
    """Why `f` cannot be decoded ('' if it can). A full decode, not PIL's verify(), which passes
    truncated JPEGs; JPEGs decode at 1/8 scale (draft), which still reads every byte."""
    from PIL import Image
    try:
        with Image.open(f) as im:
            im.draft(im.mode, (1, 1))
            im.load()
    except Exception as exc:  # PIL raises many types for undecodable files
        return first_line(exc)
    return ""


def _decoded(f: Path) -> np.ndarray:
    """The image as RGB; a file that changed or broke since the folder was opened is named."""
    try:
        return _load_rgb(f)
    except Exception as exc:  # PIL raises many types for undecodable files
        raise DataError(f"image {f} cannot be decoded ({first_line(exc)}); remove or replace it") from exc


def folder_source(path: Path, n: int | None, pre: Preprocess, seed: int) -> DataSource:
    """Images in a folder (recursively), resized and centre-cropped; undecodable files are skipped."""
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found in folder {path}; point --calib/--data at a folder of photos")
    if n is not None and n < len(files):
        idx = np.sort(np.random.default_rng(seed).choice(len(files), size=n, replace=False))
        files = [files[i] for i in idx]
    good: list[Path] = []
    bad: list[tuple[Path, str]] = []
    for f in files:
        problem = _undecodable(f)
        if problem:
            bad.append((f, problem))
        else:
            good.append(f)
    if not good:
        raise DataError(f"none of the {len(files)} image files in {path} could be decoded (first: {bad[0][0].name}: "
                        f"{bad[0][1]}); point --calib/--data at a folder of photos")
    if bad:
        from rich.markup import escape

        from .progress import console
        console.print("[yellow]warning:[/] " + escape(f"skipped {len(bad)} of {len(files)} image files in {path} that could not be "
                             f"decoded (first: {bad[0][0].name}: {bad[0][1]})"), soft_wrap=True)

    def get(start: int, stop: int) -> np.ndarray:
        return np.stack([pre.apply(_center_crop(_decoded(f), pre)) for f in good[start:stop]])

    src = DataSource(f"folder:{path}", "folder", len(good), get, skipped=len(bad))
    src.labels = None  # folder names are not model class indices; labels come from tensor files
    return src


TENSOR_SUFFIXES = (".npy", ".npz", ".pt", ".pth")


def sample_shape(data: Any) -> tuple[int, ...] | None:
    """The per-sample shape (C, H, W) of tensor data — an array, a tensor, or a .npy/.npz/.pt file
    (read without unpickling) — or None for anything else (images take the model's shape)."""
    if isinstance(data, (str, Path)):
        path = Path(data).expanduser()
        if path.suffix not in TENSOR_SUFFIXES or not path.is_file():
            return None
        data = _read_tensor_file(path)[0]
    shape = tuple(getattr(data, "shape", ()))
    return tuple(int(d) for d in shape[1:]) if len(shape) >= 2 and all(d >= 1 for d in shape[1:]) else None


def _read_tensor_file(path: Path) -> tuple[Any, Any]:
    """(samples, labels or None) of a .npy, .npz (`x`, optional `labels`) or .pt file (a tensor, or a
    dict with `x` and optional `labels`), read without unpickling."""
    labels = None
    try:
        if path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "x" not in z:
                    raise DataError(f"{path} has no array named 'x' (and optionally 'labels')")
                arr = z["x"]
                labels = z["labels"] if "labels" in z else None
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                labels = obj.get("labels")
                obj = obj.get("x")
            if not isinstance(obj, torch.Tensor):
                raise DataError(f"{path} must hold a tensor (or a dict with 'x' and optional 'labels')")
            check_float_dtype(obj.dtype, str(path))
            arr = (obj.float() if obj.dtype == torch.bfloat16 else obj).numpy()
            labels = labels.numpy() if isinstance(labels, torch.Tensor) else labels
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read tensor file {path}: {first_line(exc)}") from exc
    return arr, labels


def tensor_source(path: Path, n: int | None, input_shape: tuple[int, ...]) -> DataSource:
    """A .npy or .pt tensor (N, C, H, W), already preprocessed; a .npz may add `labels`."""
    arr, labels = _read_tensor_file(path)
    if arr.ndim != 1 + len(input_shape) or tuple(arr.shape[1:]) != tuple(input_shape):
        raise shape_mismatch(str(path), arr.shape, input_shape)
    check_float_dtype(arr.dtype, str(path))
    if arr.shape[0] == 0:
        raise DataError(f"{path} holds no samples")
    if labels is not None:
        labels = check_labels(labels, arr.shape[0], str(path))
    count = arr.shape[0] if n is None else min(n, arr.shape[0])

    def get(start: int, stop: int) -> np.ndarray:
        return float_samples(np.asarray(arr[start:stop]), str(path), f" (samples {start}..{stop - 1})")

    lab = None if labels is None else labels[:count]
    return DataSource(f"tensor:{path}", "tensor", count, get, labels=lab)


def open_source(spec: str, n: int | None, pre: Preprocess, input_shape: tuple[int, ...], seed: int,
                split: str = "calib") -> DataSource:
    """Resolve a --calib/--data argument: `samples`, `samples:calib|eval`, a folder or a tensor file."""
    if spec == "samples" or spec.startswith("samples:"):
        part = spec.split(":", 1)[1] if ":" in spec else split
        if part not in SAMPLE_PHOTOS:
            raise DataError(f"unknown sample split {part!r}; use samples:calib or samples:eval")
        _check_image_shape("bundled photos", pre, input_shape)
        if n is not None and n < 1:
            raise DataError("the sample count must be at least 1")
        return samples_source(part, n or 128, pre, seed)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data source {spec!r} does not exist; give an image folder, a .npy/.npz/.pt file or 'samples'")
    if path.is_dir():
        _check_image_shape(f"images in {path}", pre, input_shape)
        return folder_source(path, n, pre, seed)
    if path.suffix in TENSOR_SUFFIXES:
        return tensor_source(path, n, input_shape)
    raise DataError(f"cannot use {spec!r} as data: expected a folder, .npy/.npz/.pt file or 'samples'")


def _check_image_shape(what: str, pre: Preprocess, input_shape: tuple[int, ...]) -> None:
    """Images become (3, size, size) tensors; refuse a model input shape they cannot fill."""
    shape = (3, pre.size, pre.size)
    if tuple(input_shape) != shape:
        raise DataError(f"{what} are preprocessed to {shape} ({pre.name}) but the model takes {tuple(input_shape)}: give "
                        f"--calib/--data a .npy/.pt tensor of shape (N, {', '.join(map(str, input_shape))}), or quantize with "
                        f"--input-shape {','.join(map(str, shape))} if the model takes such images")
