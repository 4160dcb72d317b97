"""Model paths: every model the agent loads lies inside the configured models folder."""

from __future__ import annotations

from pathlib import Path

from agent.errors import ModelError


def resolve_model_path(path: Path | str, models_dir: Path | str) -> Path:
    """Resolve ``path`` (relative to ``models_dir``, or absolute) and refuse anything outside ``models_dir``.

    Symlinks are resolved first, so a link pointing out of the folder is refused too.
    """
    root = Path(models_dir).expanduser().resolve()
    p = Path(path).expanduser()
    full = (p if p.is_absolute() else root / p).resolve()
    if not full.is_relative_to(root):
        raise ModelError(
            f"model path {str(path)!r} resolves to {full}, outside the models folder {root}; "
            "put the file in device.models_dir",
            code="model_path_outside",
        )
    if not full.is_file():
        raise ModelError(f"model file {full} does not exist", code="model_not_found")
    return full
