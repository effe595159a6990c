"""Decoding rules and CLIP preprocessing equal to transformers' CLIPImageProcessor (PIL)."""
import io

import numpy as np
import PIL.Image
import pydicom
import pytest
from pydicom.data import get_testdata_file
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

import data_fixtures
from exgra_jax.data import images

SIZE = 56
TOL = 2e-6  # float32 rounding of (x/255 - mean)/std


def _reference(rgb: np.ndarray) -> np.ndarray:
  proc = CLIPImageProcessorPil(size={"shortest_edge": SIZE},
                               crop_size={"height": SIZE, "width": SIZE})
  return proc(PIL.Image.fromarray(rgb), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def _encode(image: PIL.Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format=fmt)
  return buf.getvalue()


RNG = np.random.default_rng(3)
RGB = RNG.integers(0, 256, (70, 93, 3), dtype=np.uint8)
GRAY16 = RNG.integers(0, 65536, (81, 60), dtype=np.uint16)


@pytest.mark.parametrize("name", ["jpeg", "png", "tiff16", "png16", "palette", "gray",
                                  "CT_small.dcm", "MR_small.dcm"])
def test_clip_preprocess_matches_transformers(name):
  if name.endswith(".dcm"):
    data = open(get_testdata_file(name), "rb").read()
  elif name == "jpeg":
    data = _encode(PIL.Image.fromarray(RGB), "JPEG")
  elif name == "png":
    data = _encode(PIL.Image.fromarray(RGB), "PNG")
  elif name == "palette":
    data = _encode(PIL.Image.fromarray(RGB).quantize(17), "PNG")
  elif name == "gray":
    data = _encode(PIL.Image.fromarray(RGB[:, :, 0]), "PNG")
  else:
    data = _encode(PIL.Image.fromarray(GRAY16), "TIFF" if name == "tiff16" else "PNG")
  rgb = images.decode_image(data)
  assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
  ours = images.clip_preprocess(rgb, SIZE)
  assert ours.shape == (SIZE, SIZE, 3) and ours.dtype == np.float32
  assert np.abs(ours - _reference(rgb)).max() < TOL


def test_sixteen_bit_full_range_scaling():
  rgb = images.decode_image(_encode(PIL.Image.fromarray(GRAY16), "PNG"))
  np.testing.assert_array_equal(rgb[:, :, 1], np.rint(GRAY16 / 257.0).astype(np.uint8))


def test_palette_expanded_and_alpha_composited_on_black():
  pal = PIL.Image.fromarray(RGB).quantize(9)
  expected = np.asarray(pal.convert("RGB"))
  np.testing.assert_array_equal(images.decode_image(_encode(pal, "PNG")), expected)
  rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], np.uint8)
  out = images.decode_image(data_fixtures.png_bytes(rgba, mode="RGBA"))
  np.testing.assert_array_equal(out[0], [[200, 100, 50], [0, 0, 0], [100, 50, 25]])


def test_dicom_windowing_and_monochrome1(tmp_path):
  ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
  values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
  ds.WindowCenter, ds.WindowWidth = 40, 400
  path = tmp_path / "w.dcm"
  ds.save_as(path)
  out = images.decode_image(path.read_bytes())[:, :, 0].astype(float)
  # DICOM linear windowing, hand-written: (v - (c - 0.5)) / (w - 1) + 0.5, clipped.
  expected = np.clip(((values - 39.5) / 399.0 + 0.5), 0, 1) * 255
  assert np.abs(out - expected).max() <= 0.5 + 1e-9
  ds.PhotometricInterpretation = "MONOCHROME1"
  ds.save_as(path)
  np.testing.assert_array_equal(images.decode_image(path.read_bytes())[:, :, 0],
                                255 - out.astype(np.uint8))


@pytest.mark.parametrize("data,match", [(b"", "empty"), (b"not an image at all", "unknown"),
                                        (data_fixtures.png_bytes(RGB)[:300], "truncated")])
def test_bad_bytes_raise_decode_error(data, match):
  with pytest.raises(images.ImageDecodeError, match=match):
    images.decode_image(data)


def test_decompression_bomb_is_an_image_too_large(monkeypatch):
  monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # errors above 2x this
  with pytest.raises(images.ImageTooLarge, match="too large"):  # an ImageDecodeError too
    images.decode_image(data_fixtures.png_bytes(RGB))  # 70 x 93 = 6510 pixels


def test_clip_preprocess_rejects_wrong_input():
  with pytest.raises(ValueError, match="uint8"):
    images.clip_preprocess(np.zeros((5, 5), np.float32), SIZE)


@pytest.mark.parametrize("shape", [(70, 93), (93, 70), (56, 56), (40, 30)])
@pytest.mark.parametrize("kind", ["rgb", "gray", "gray16", "palette", "rgba", "jpeg",
                                  "CT_small.dcm"])
def test_clip_input_is_clip_preprocess_of_the_decoded_image_to_the_bit(kind, shape):
  """The fast path (grayscale resized as one channel, the lookup table) changes no bit."""
  rgb = RNG.integers(0, 256, (*shape, 3), dtype=np.uint8)
  if kind == "CT_small.dcm":
    data = open(get_testdata_file(kind), "rb").read()
  elif kind == "gray16":
    data = _encode(PIL.Image.fromarray(RNG.integers(0, 65536, shape, dtype=np.uint16)), "PNG")
  elif kind == "rgba":
    data = data_fixtures.png_bytes(np.concatenate([rgb, rgb[:, :, :1]], axis=2), mode="RGBA")
  else:
    image = {"rgb": PIL.Image.fromarray(rgb), "jpeg": PIL.Image.fromarray(rgb),
             "gray": PIL.Image.fromarray(rgb[:, :, 0]),
             "palette": PIL.Image.fromarray(rgb).quantize(17)}[kind]
    data = _encode(image, "JPEG" if kind == "jpeg" else "PNG")
  out = np.full((SIZE, SIZE, 3), np.nan, np.float32)
  assert images.clip_input(data, SIZE, out=out) is out
  np.testing.assert_array_equal(out, images.clip_preprocess(images.decode_image(data), SIZE))


def test_normalisation_is_the_float32_arithmetic():
  rgb = RNG.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)  # no resize at this size
  mean, std = np.float32(images.CLIP_MEAN), np.float32(images.CLIP_STD)
  expected = (rgb.astype(np.float32) * np.float32(1.0 / 255.0) - mean) / std
  np.testing.assert_array_equal(images.clip_preprocess(rgb, SIZE), expected)


def test_max_pixels_refused_from_the_header_before_decoding():
  png = data_fixtures.png_bytes(RGB)  # 70 x 93 = 6510 pixels
  assert images.decode_image(png, max_pixels=6510).shape == (70, 93, 3)
  with pytest.raises(images.ImageTooLarge, match="6510 pixels"):
    images.clip_input(png[:200], SIZE, max_pixels=6509)  # the header alone: no pixel read
  dicom = open(get_testdata_file("CT_small.dcm"), "rb").read()  # 128 x 128
  with pytest.raises(images.ImageTooLarge, match="16384 pixels"):
    images.decode_image(dicom, max_pixels=128 * 128 - 1)
