"""Temporary files and directories, named so that the next start can clean up after a kill.

Why: writers build a result beside its final place and rename it when complete (the demo
world, an HF export, an evaluation report), so a reader never sees half of one; a kill -9
in between leaves the temporary behind, as large as the result. Its name carries the host
and process id of the writer, `.<name>.tmp.<host>.<pid>.<random>`, so that two processes
writing the same result never share a temporary, and `remove_stale` removes exactly the
temporaries whose writer has ended, never one that a live process (another run sharing the
demo world, another process of this run) is still writing. Temporaries of another host
(a shared file system) are left alone: whether their writer lives cannot be told here.
"""
import contextlib
import os
import re
import shutil
import socket
import tempfile

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_NAME = re.compile(r"^\..+\.tmp\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+$")


def _prefix(name: str) -> str:
  return f".{name}.tmp.{_HOST}.{os.getpid()}."


def new_dir(parent: str, name: str) -> str:
  """A new empty directory in `parent` (created if needed) to build `name` in."""
  os.makedirs(parent, exist_ok=True)
  return tempfile.mkdtemp(prefix=_prefix(name), dir=parent)


def new_file(path: str) -> str:
  """The path of a new empty file beside `path`, to write and then rename to `path`."""
  fd, tmp = tempfile.mkstemp(prefix=_prefix(os.path.basename(path)),
                             dir=os.path.dirname(path) or ".")
  os.close(fd)
  return tmp


def replace_file(path: str, text: str) -> None:
  """Writes `text` (UTF-8) to `path` through a temporary beside it and a rename: a reader
  sees the old file or the new one, never a part."""
  tmp = new_file(path)
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def remove_stale(parent: str) -> list[str]:
  """Removes the temporaries in `parent` whose writer on this host has ended; their paths."""
  if not os.path.isdir(parent):
    return []
  removed = []
  for entry in sorted(os.listdir(parent)):
    match = _NAME.match(entry)
    if match and match["host"] == _HOST and not _alive(int(match["pid"])):
      path = os.path.join(parent, entry)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        with contextlib.suppress(FileNotFoundError):  # another process removed it first
          os.remove(path)
      removed.append(path)
  return removed
