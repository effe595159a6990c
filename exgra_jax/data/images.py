"""Image decoding to RGB uint8 and the CLIP preprocessing (docs/data.md).

Why one decoder for every format: medical datasets mix JPEG/PNG photographs, 16-bit
grayscale PNG/TIFF exports and raw DICOM; the model only ever sees 8-bit RGB, so every
format is brought to `[H, W, 3] uint8` here with a documented rule, and the CLIP
preprocessing (shortest side -> S bicubic with PIL, centre crop S, 1/255, mean/std) is
applied after. The result equals transformers' `CLIPImageProcessor` (PIL backend) with
`size={'shortest_edge': S}, crop_size=S` on the same RGB image.
`clip_input(bytes)` gives the same pixels from the encoded bytes directly, and is what
training, `predict` and the server call: it keeps a grayscale image as one channel through
the resize (a third of the work on the commonest medical images) and normalises through a
lookup table that holds the same float32 results.

Conversion rules:
- 16-bit grayscale (PNG `I;16`, TIFF): the full 0..65535 range maps linearly to 0..255
  (value / 257, rounded), so that contrast is the one the file states, not a per-image
  stretch.
- palette images: expanded through their palette (with its transparency, if any).
- alpha: composited on **black**. Medical images (X-ray, CT, MR, pathology slides
  exported with transparent margins) have black backgrounds, so a transparent margin
  reads as background; PIL's `convert('RGB')` (the release) would instead show whatever
  colour the transparent pixels happen to store.
- DICOM: modality LUT (rescale slope/intercept), then the VOI LUT sequence or the window
  centre/width of the header (linear DICOM windowing to 0..255), else a min-max stretch;
  MONOCHROME1 is inverted; a multi-frame file gives its first frame.

`load_rgb(path)` hands the same 8-bit RGB image to people who run an exported model with
transformers (docs/hf.md): `Image.open(path).convert("RGB")` clips a 16-bit scan to white
and cannot read DICOM, so the processor would see other pixels than the model was trained
on. This module imports numpy, PIL and pydicom only (no JAX), so that use needs no JAX.
"""
import io
import os

import numpy as np
import PIL.Image
import pydicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut

# CLIP's normalisation constants (docs/data.md; fixed by the pre-trained tower).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_DICOM_MAGIC_OFFSET = 128


class ImageDecodeError(ValueError):
  """The bytes are not a readable image (unknown format, truncated or corrupt)."""


class ImageTooLarge(ImageDecodeError):
  """The image has more pixels than its reader allows (found from the header)."""


def is_dicom(data: bytes) -> bool:
  """DICOM Part 10 files carry 'DICM' after a 128-byte preamble."""
  return data[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM"


def _window_to_uint8(values: np.ndarray, center: float, width: float) -> np.ndarray:
  """DICOM PS3.3 C.11.2.1.2 linear windowing of `values` to 0..255."""
  width = max(float(width), 1.0)
  low = center - 0.5 - (width - 1.0) / 2.0
  scaled = (values - (center - 0.5)) / (width - 1.0 if width > 1 else 1.0) + 0.5
  out = np.where(values <= low, 0.0, np.where(values > low + width - 1.0, 1.0, scaled))
  return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
  lo, hi = float(values.min()), float(values.max())
  if hi <= lo:
    return np.zeros(values.shape, np.uint8)
  return np.clip(np.rint((values - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _first(value) -> float:
  return float(value[0]) if isinstance(value, pydicom.multival.MultiValue) else float(value)


def _decode_dicom(data: bytes, max_pixels: int | None) -> np.ndarray:
  """DICOM bytes -> `[H, W] uint8` (grayscale) or `[H, W, 3] uint8` (colour) by the rules
  in the module docstring."""
  try:
    ds = pydicom.dcmread(io.BytesIO(data))
    _check_pixels(int(ds.Rows) * int(ds.Columns), max_pixels)
    pixels = ds.pixel_array
  except ImageTooLarge:
    raise
  except Exception as e:  # pydicom raises many types for broken files
    raise ImageDecodeError(f"unreadable DICOM: {e}") from e
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
  frames = int(ds.get("NumberOfFrames", 1) or 1)
  if frames > 1:
    pixels = pixels[0]
  if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
    if photometric != "RGB":
      pixels = pydicom.pixels.convert_color_space(pixels, photometric, "RGB")
    return np.ascontiguousarray(pixels.astype(np.uint8))
  values = apply_modality_lut(pixels, ds).astype(np.float64)
  if "VOILUTSequence" in ds:
    gray = _stretch_to_uint8(apply_voi_lut(values, ds).astype(np.float64))
  elif "WindowCenter" in ds and "WindowWidth" in ds:
    gray = _window_to_uint8(values, _first(ds.WindowCenter), _first(ds.WindowWidth))
  else:
    gray = _stretch_to_uint8(values)
  if photometric == "MONOCHROME1":
    gray = 255 - gray
  return gray


def _check_pixels(count: int, max_pixels: int | None) -> None:
  if max_pixels is not None and count > max_pixels:
    raise ImageTooLarge(f"image of {count} pixels, over {max_pixels}")


def _pil_to_8bit(image: PIL.Image.Image) -> PIL.Image.Image:
  """Any PIL mode -> mode `L` or `RGB` (16-bit scaled, palette expanded, alpha on black).
  Grayscale stays one channel: the model's RGB has three equal ones, which the CLIP
  resize computes per channel alike, so resizing one is the same and a third the work."""
  if image.mode == "P":
    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
  if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    values = np.asarray(image, dtype=np.float64)
    return PIL.Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))
  if image.mode in ("LA", "PA", "RGBa", "La"):
    image = image.convert("RGBA")
  if image.mode == "RGBA":
    rgba = np.asarray(image).astype(np.uint32)
    return PIL.Image.fromarray(((rgba[:, :, :3] * rgba[:, :, 3:4] + 127) // 255)
                               .astype(np.uint8))
  return image if image.mode in ("L", "RGB") else image.convert("RGB")


def _decode_8bit(data: bytes, max_pixels: int | None) -> PIL.Image.Image:
  """Encoded bytes -> a mode `L` or `RGB` image, the pixels the model sees (RGB with equal
  channels for `L`). `max_pixels`: refused from the header, before any pixel is decoded."""
  if not data:
    raise ImageDecodeError("empty image file")
  if is_dicom(data):
    return PIL.Image.fromarray(_decode_dicom(data, max_pixels))
  try:
    with PIL.Image.open(io.BytesIO(data)) as image:
      _check_pixels(image.size[0] * image.size[1], max_pixels)
      image.load()
      return _pil_to_8bit(image)
  except ImageTooLarge:
    raise
  except PIL.UnidentifiedImageError as e:
    raise ImageDecodeError("unknown image format") from e
  except PIL.Image.DecompressionBombError as e:  # e.g. a whole-slide scan: skip, not crash
    raise ImageTooLarge(f"image too large: {e}") from e
  except (OSError, SyntaxError, ValueError) as e:
    raise ImageDecodeError(f"truncated or corrupt image: {e}") from e


def decode_image(data: bytes, max_pixels: int | None = None) -> np.ndarray:
  """Encoded bytes (JPEG, PNG, TIFF, DICOM, ...) -> `[H, W, 3] uint8` RGB.

  Raises ImageDecodeError for empty, unknown, truncated or corrupt data, and its subclass
  ImageTooLarge for an image over `max_pixels` or a decompression bomb.
  """
  return np.asarray(_decode_8bit(data, max_pixels).convert("RGB"))


def load_rgb(path: str | os.PathLike) -> PIL.Image.Image:
  """The image file at `path` (JPEG, PNG, 16-bit PNG / TIFF, DICOM, ...) as the 8-bit RGB
  PIL image the model sees: `decode_image`'s pixels, ready for a transformers processor.

  Raises ImageDecodeError for unreadable files, OSError when `path` cannot be opened.
  """
  with open(path, "rb") as f:
    return PIL.Image.fromarray(decode_image(f.read()))


def clip_input(data: bytes, size: int, out: np.ndarray | None = None,
               max_pixels: int | None = None) -> np.ndarray:
  """Encoded bytes -> `[size, size, 3] float32` CLIP input: `clip_preprocess` of
  `decode_image(data)`, to the bit, with less work (a grayscale image is resized as one
  channel; the pixels are decoded once). Raises as `decode_image`."""
  return _clip_pixels(_decode_8bit(data, max_pixels), size, out)


def clip_preprocess(rgb: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
  """`[H, W, 3] uint8` -> `[size, size, 3] float32` CLIP input (NHWC, normalised).

  Shortest side to `size` with PIL bicubic (the long side is `int(size * long / short)`,
  as transformers computes it), centre crop (top/left offsets rounded down), then
  `(x / 255 - mean) / std`, written in `out` when given (e.g. a row of a batch buffer:
  no per-image array, no copy), else in a new array.
  """
  if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
    raise ValueError(f"expected [H, W, 3] uint8, got {rgb.shape} {rgb.dtype}")
  return _clip_pixels(PIL.Image.fromarray(rgb), size, out)


def _normalisation_table() -> np.ndarray:
  """[256, 3] float32: `(v / 255 - mean[c]) / std[c]` for every 8-bit value v, computed
  with the float32 operations, in the order, that normalising each pixel would use, so a
  lookup gives the same bits as the arithmetic at a third of the passes over the image."""
  table = np.empty((256, 3), np.float32)
  np.multiply(np.arange(256, dtype=np.uint8)[:, None], np.float32(1.0 / 255.0), out=table,
              dtype=np.float32)
  np.subtract(table, np.asarray(CLIP_MEAN, np.float32), out=table)
  np.divide(table, np.asarray(CLIP_STD, np.float32), out=table)
  return table


_NORMALISED = _normalisation_table()
_CHANNELS = np.arange(3)


def _clip_pixels(image: PIL.Image.Image, size: int, out: np.ndarray | None) -> np.ndarray:
  """A mode `L` or `RGB` image -> the CLIP input (`clip_preprocess`'s rule; `L` as RGB
  with three equal channels)."""
  width, height = image.size
  short, long = (height, width) if height <= width else (width, height)
  new_long = int(size * long / short)
  new_h, new_w = (size, new_long) if height <= width else (new_long, size)
  if (new_h, new_w) != (height, width):
    image = image.resize((new_w, new_h), resample=PIL.Image.Resampling.BICUBIC)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  crop = np.asarray(image)[top:top + size, left:left + size]
  if out is None:
    out = np.empty((size, size, 3), np.float32)
  if crop.ndim == 2:
    np.take(_NORMALISED, crop, axis=0, out=out)
  else:
    out[...] = _NORMALISED[crop, _CHANNELS]
  return out
