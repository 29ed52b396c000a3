"""What a command may write: its own files, never the user's.

``--overwrite true`` replaces only the files and folders a command itself writes; anything else in
the output folder stays, and the command says which of its own it replaced.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path


def claim_outputs(out_dir: Path | str, owned: Sequence[str], overwrite: bool, source: Path | str | None = None) -> list[Path]:
    """Get ``out_dir`` ready for a command that writes the entries ``owned`` (file or folder names).

    Refuses (FileExistsError) a folder that is not empty unless ``overwrite``; with it, removes just
    the entries the command owns and says so: everything else there stays. Refuses an ``out_dir`` that is a file or that would contain ``source``. Returns the
    entries it removed.
    """
    out_dir = Path(out_dir)
    existing = check_outputs(out_dir, owned, overwrite, source)
    for path in existing:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if existing:
        print(f"Replacing {', '.join(p.name for p in existing)} in {out_dir} (--overwrite); other files stay")
    out_dir.mkdir(parents=True, exist_ok=True)
    return existing


def check_outputs(out_dir: Path, owned: Sequence[str], overwrite: bool, source: Path | str | None = None) -> list[Path]:
    """Refuse an ``out_dir`` a command may not write (see ``claim_outputs``); returns the owned entries there."""
    if source is not None and out_dir.resolve() in (Path(source).resolve(), *Path(source).resolve().parents):
        raise ValueError(f"--out_dir {out_dir} would contain the input {source}; write to another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out_dir {out_dir} is a file; give a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out_dir} is not empty; choose another --out_dir or pass --overwrite true (it replaces only what this "
            f"command writes: {', '.join(owned)}; other files stay)"
        )
    return [out_dir / name for name in owned if (out_dir / name).exists() or (out_dir / name).is_symlink()]


@contextlib.contextmanager
def staged_files(out_dir: Path, names: Sequence[str]) -> Iterator[Path]:
    """A temporary folder inside ``out_dir`` to write the files ``names`` into; on success each is moved over
    its old version at once (saying which it replaced), on failure none is, and the folder goes either way."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".rar-llm-", dir=out_dir))
    try:
        yield stage
        missing = [n for n in names if not (stage / n).is_file()]
        if missing:
            raise RuntimeError(f"staged outputs {missing} were not written")
        replaced = [n for n in names if (out_dir / n).exists()]
        for name in names:
            os.replace(stage / name, out_dir / name)
        if replaced:
            print(f"Replaced {', '.join(replaced)} in {out_dir} (--overwrite); other files stay")
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def claim_file(path: Path | str, overwrite: bool) -> Path:
    """An output file: refuses to replace an existing one unless ``overwrite``; makes its folder."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or pass --overwrite true")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
