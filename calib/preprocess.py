"""Preprocessing presets: how a model expects its RGB 8-bit images turned into tensors."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Preprocess:
    """x = (pixel/scale - mean) / std per channel, on RGB images resized and cropped to `size`."""

    name: str
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pixel_scale: float  # 255 for [0,1] inputs, 1 for raw 0..255 pixels
    resize: int  # shorter side before the centre crop for evaluation-style loading

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """(H,W,3) uint8 -> (3,H,W) float32."""
        x = rgb.astype(np.float32) / self.pixel_scale
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def fitted(self, input_shape: tuple[int, ...]) -> "Preprocess":
        """The same normalisation for a model that takes square RGB inputs of another size (3, S, S):
        images are cropped to S, after resizing the shorter side in the preset's proportion."""
        if len(input_shape) != 3 or input_shape[0] != 3 or input_shape[1] != input_shape[2] or input_shape[1] == self.size:
            return self
        size = int(input_shape[1])
        return replace(self, size=size, resize=max(size, round(size * self.resize / self.size)))

    @classmethod
    def from_dict(cls, p: dict) -> "Preprocess":
        return cls(p["name"], p["size"], tuple(p["mean"]), tuple(p["std"]), p["pixel_scale"], p["resize"])

    def to_dict(self) -> dict:
        return {"name": self.name, "size": self.size, "mean": list(self.mean), "std": list(self.std),
                "pixel_scale": self.pixel_scale, "resize": self.resize}


PRESETS = {
    "imagenet": Preprocess("imagenet", 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 255.0, 256),
    # EfficientNet-Lite: (x - 127) / 128 on 0..255 RGB
    "efficientnet_lite": Preprocess("efficientnet_lite", 224, (127.0, 127.0, 127.0), (128.0, 128.0, 128.0), 1.0, 256),
}
