"""OpenAI chat-completion requests -> validated conversations with their image (no model).

Why apart from the server: every way a client can be wrong (malformed JSON, wrong field
types, a remote image URL, a path outside `--image_root`, an image that does not decode
or is too large, too many images) is answered here with a 4xx `RequestError` whose
message says what to change, before anything reaches the model; the server turns it
into a JSON error and keeps serving. Remote `http(s)` image URLs are refused, never
fetched: the server reads nothing from the network.

The model sees one image per conversation, placed where its `image_url` part stands
among the text parts of its message (parts joined with newlines). `Conversation` builds
the same requests for the terminal chat.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
from typing import Any

import numpy as np

from exgra_jax.data import images
from exgra_jax.data.records import IMAGE_TOKEN, Turn

_ROLES = {"user": "human", "assistant": "gpt"}
_MAX_STOPS = 4


class RequestError(ValueError):
  """A request the server refuses: HTTP `status`, an OpenAI-style error `code`."""

  def __init__(self, status: int, code: str, message: str):
    super().__init__(message)
    self.status = status
    self.code = code


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may hold (server flags)."""
  max_image_bytes: int = 20 * 2**20
  max_image_pixels: int = 40_000_000


@dataclasses.dataclass(frozen=True)
class ChatRequest:
  """A validated request: the conversation (`<image>` where the image goes), its image
  bytes (or None), the system line (None = the template's) and decoding settings."""
  turns: tuple[Turn, ...]
  image: bytes | None = None
  system: str | None = None
  stream: bool = False
  include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
  temperature: float = 0.0
  top_p: float = 1.0
  max_tokens: int | None = None
  stop: tuple[str, ...] = ()


def _bad(message: str, code: str = "invalid_request") -> RequestError:
  return RequestError(400, code, message)


def parse_json(body: bytes) -> dict[str, Any]:
  """The request body -> a JSON object, else a 400 naming the problem."""
  try:
    payload = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise _bad(f"the body is not valid JSON: {e}", "malformed_json") from e
  if not isinstance(payload, dict):
    raise _bad("the body must be a JSON object", "malformed_json")
  return payload


def read_image_url(url: str, image_root: str | None, limits: Limits) -> bytes:
  """An `image_url` -> the file's bytes: a base64 `data:` URL or a path (plain or
  `file://`) under `image_root`. Remote URLs are refused without being fetched."""
  if url.startswith(("http://", "https://")):
    raise _bad("remote image URLs are not fetched: send the image as a base64 data: URL",
               "remote_image_refused")
  if url.startswith("data:"):
    header, sep, encoded = url.partition(",")
    if not sep or not header.endswith(";base64"):
      raise _bad("a data: image URL must be base64 (data:<type>;base64,<data>)",
                 "invalid_image")
    if len(encoded) * 3 // 4 > limits.max_image_bytes:
      raise RequestError(413, "image_too_large",
                         f"image over {limits.max_image_bytes} bytes")
    try:
      return base64.b64decode(encoded, validate=True)
    except binascii.Error as e:
      raise _bad(f"the data: URL is not valid base64: {e}", "invalid_image") from e
  return _read_under_root(url.removeprefix("file://"), image_root, limits)


def _read_under_root(path: str, image_root: str | None, limits: Limits) -> bytes:
  if image_root is None:
    raise RequestError(403, "image_path_refused",
                       "image paths are refused: the server was started without "
                       "--image_root; send the image as a base64 data: URL")
  root = os.path.realpath(image_root)
  full = os.path.realpath(os.path.join(root, path))
  if os.path.commonpath([root, full]) != root:
    raise RequestError(403, "image_path_refused", f"image path {path!r} is outside --image_root")
  if not os.path.isfile(full):
    raise _bad(f"no image file {path!r} under --image_root", "image_not_found")
  if os.path.getsize(full) > limits.max_image_bytes:
    raise RequestError(413, "image_too_large", f"image over {limits.max_image_bytes} bytes")
  with open(full, "rb") as f:
    return f.read()


def clip_pixels(data: bytes, size: int, limits: Limits) -> np.ndarray:
  """Image bytes (PNG, JPEG, TIFF, DICOM, ...) -> the `[size, size, 3] float32` CLIP input;
  bytes and pixels checked first (the pixels from the header, before decoding)."""
  if len(data) > limits.max_image_bytes:
    raise RequestError(413, "image_too_large", f"image over {limits.max_image_bytes} bytes")
  try:
    return images.clip_input(data, size, max_pixels=limits.max_image_pixels)
  except images.ImageTooLarge as e:
    raise RequestError(413, "image_too_large",
                       f"image over {limits.max_image_pixels} pixels") from e
  except images.ImageDecodeError as e:
    raise _bad(f"the image does not decode: {e}", "invalid_image") from e


def _content_parts(content: Any, where: str) -> list[dict[str, Any]]:
  if isinstance(content, str):
    return [{"type": "text", "text": content}]
  if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
    raise _bad(f"{where}.content must be a string or a list of content parts")
  return content


def _image_url(part: dict[str, Any], where: str) -> str:
  value = part.get("image_url")
  url = value.get("url") if isinstance(value, dict) else value
  if not isinstance(url, str) or not url:
    raise _bad(f"{where}: an image_url part needs image_url.url")
  return url


def _message_text(message: Any, index: int) -> tuple[str, str, list[str]]:
  """A message -> (role, text with `<image>` at each image, the image URLs)."""
  where = f"messages[{index}]"
  if not isinstance(message, dict):
    raise _bad(f"{where} must be an object")
  role = message.get("role")
  if role not in ("system", "user", "assistant"):
    raise _bad(f"{where}.role must be system, user or assistant, got {role!r}")
  pieces, urls = [], []
  for part in _content_parts(message.get("content"), where):
    kind = part.get("type")
    if kind == "text" and isinstance(part.get("text"), str):
      if IMAGE_TOKEN in part["text"]:
        raise _bad(f"{where}: text may not contain {IMAGE_TOKEN}; send an image_url part")
      pieces.append(part["text"])
    elif kind == "image_url":
      if role != "user":
        raise _bad(f"{where}: only user messages may hold images")
      urls.append(_image_url(part, where))
      pieces.append(IMAGE_TOKEN)
    else:
      raise _bad(f"{where}: content parts must be text or image_url, got {kind!r}")
  return role, "\n".join(pieces), urls


def _conversation(messages: Any) -> tuple[tuple[Turn, ...], str | None, list[str]]:
  if not isinstance(messages, list) or not messages:
    raise _bad("messages must be a non-empty list")
  system, turns, urls = None, [], []
  for index, message in enumerate(messages):
    role, content, message_urls = _message_text(message, index)
    urls += message_urls
    if role == "system":
      system = content if system is None else f"{system}\n{content}"
    elif turns and turns[-1].role == _ROLES[role]:  # consecutive messages of one role merge
      turns[-1] = Turn(turns[-1].role, f"{turns[-1].value}\n{content}")
    else:
      turns.append(Turn(_ROLES[role], content))
  if not turns or turns[-1].role != "human":
    raise _bad("the last message must be a user message")
  return tuple(turns), system, urls


def _number(payload: dict[str, Any], name: str, default: float, low: float, high: float
            ) -> float:
  value = payload.get(name)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
    raise _bad(f"{name} must be a number in [{low}, {high}], got {value!r}")
  return float(value)


def _max_tokens(payload: dict[str, Any]) -> int | None:
  value = payload.get("max_tokens", payload.get("max_completion_tokens"))
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise _bad(f"max_tokens must be a positive integer, got {value!r}")
  return value


def _stop(payload: dict[str, Any]) -> tuple[str, ...]:
  value = payload.get("stop")
  stops = [] if value is None else [value] if isinstance(value, str) else value
  if (not isinstance(stops, list) or len(stops) > _MAX_STOPS
      or not all(isinstance(s, str) and s for s in stops)):
    raise _bad(f"stop must be a non-empty string or a list of at most {_MAX_STOPS}")
  return tuple(stops)


def parse_chat_request(payload: dict[str, Any], *, image_root: str | None,
                       limits: Limits) -> ChatRequest:
  """A chat-completions JSON object -> ChatRequest (image bytes read, not yet decoded)."""
  if payload.get("n", 1) != 1:
    raise _bad("only n = 1 is supported")
  stream = payload.get("stream", False)
  if not isinstance(stream, bool):
    raise _bad(f"stream must be true or false, got {stream!r}")
  options = payload.get("stream_options") or {}
  include_usage = options.get("include_usage", False) if isinstance(options, dict) else None
  if not isinstance(include_usage, bool):
    raise _bad(f"stream_options must be an object with include_usage true or false, got "
               f"{payload.get('stream_options')!r}")
  turns, system, urls = _conversation(payload.get("messages"))
  if len(urls) > 1:
    raise _bad(f"{len(urls)} images in the conversation; the model takes one (start a new "
               "conversation for another image)", "too_many_images")
  return ChatRequest(
      turns=turns, system=system,
      image=read_image_url(urls[0], image_root, limits) if urls else None,
      stream=stream, include_usage=include_usage, temperature=_number(payload, "temperature", 0.0, 0.0, 2.0),
      top_p=_number(payload, "top_p", 1.0, 0.0, 1.0), max_tokens=_max_tokens(payload),
      stop=_stop(payload))


@dataclasses.dataclass
class Conversation:
  """The terminal chat's state: the turns so far and the image (which joins the first
  question)."""
  image: bytes | None = None
  turns: list[Turn] = dataclasses.field(default_factory=list)

  def request(self, question: str, **settings) -> ChatRequest:
    """The request for the next answer (the turns are not changed until `record`)."""
    if not self.turns and self.image is not None:
      question = f"{question}\n{IMAGE_TOKEN}"
    return ChatRequest(turns=(*self.turns, Turn("human", question)), image=self.image,
                       **settings)

  def record(self, request: ChatRequest, answer: str) -> None:
    self.turns = [*request.turns, Turn("gpt", answer)]
