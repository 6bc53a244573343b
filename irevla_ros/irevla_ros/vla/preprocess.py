"""The one image preprocessing function: training, the RL latent cache and the robot-side runtimes all call it.

Each camera image (HxWx3 uint8 RGB) is resized to SxS without cropping (as BLIP-2's processor does; a crop
would cut off the gripper at the frame edge), scaled to 0..1 and normalised with the backbone's mean and std.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from irevla_ros.vla.config import VLAConfig


class VLAInputError(ValueError):
    """An observation given to the VLA does not match its input contract; the message names what was wrong."""


def _check_image(name: str, image: object) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise VLAInputError(f"camera {name!r}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise VLAInputError(f"camera {name!r}: expected dtype uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise VLAInputError(f"camera {name!r}: expected an HxWx3 RGB image, got shape {image.shape}")
    return image


def ordered_images(
    images: Mapping[str, np.ndarray] | Sequence[np.ndarray], config: VLAConfig
) -> list[np.ndarray]:
    """The images in `config.cameras` order; a mapping must hold exactly those cameras."""
    cameras = config.cameras
    if isinstance(images, Mapping):
        missing = [c for c in cameras if c not in images]
        extra = sorted(set(images) - set(cameras))
        if missing or extra:
            raise VLAInputError(
                f"cameras {sorted(images)} do not match the model's cameras {list(cameras)}"
                + (f": missing {missing}" if missing else "")
                + (f": unexpected {extra}" if extra else "")
            )
        return [_check_image(c, images[c]) for c in cameras]
    if isinstance(images, np.ndarray) or not isinstance(images, Sequence):
        raise VLAInputError(
            f"images must be a mapping camera -> image or a sequence of {len(cameras)} images, "
            f"got {type(images).__name__}"
        )
    if len(images) != len(cameras):
        raise VLAInputError(f"got {len(images)} images, the model has {len(cameras)} cameras {list(cameras)}")
    return [_check_image(c, img) for c, img in zip(cameras, images, strict=True)]


def preprocess_images(
    images: Mapping[str, np.ndarray] | Sequence[np.ndarray], config: VLAConfig
) -> np.ndarray:
    """HxWx3 uint8 images (one per camera) -> float32 array (n_cameras, 3, S, S), normalised for the backbone."""
    cfg = config.resolved()
    size = int(cfg.image_size)  # type: ignore[arg-type]
    mean = np.asarray(cfg.image_mean, dtype=np.float32).reshape(3, 1, 1) * 255.0
    inv_std = 1.0 / (np.asarray(cfg.image_std, dtype=np.float32).reshape(3, 1, 1) * 255.0)
    out = np.empty((cfg.n_cameras, 3, size, size), dtype=np.float32)
    for i, image in enumerate(ordered_images(images, cfg)):
        h, w = image.shape[:2]
        if (h, w) != (size, size):
            # INTER_AREA averages when shrinking (no aliasing of thin edges); cubic when enlarging, as BLIP-2's
            # processor (bicubic) does.
            shrink = h >= size and w >= size
            interpolation = cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
            image = cv2.resize(image, (size, size), interpolation=interpolation)
        chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
        out[i] = (chw - mean) * inv_std
    return out
