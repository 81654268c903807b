"""Where the files shipped beside the code are: the example config, its sample CRM file and the role-prompt
templates. A source checkout (or editable install) has them in the repository root; an installed wheel
puts them under `<prefix>/share/duplexgate` (pyproject's data-files)."""

from __future__ import annotations

import sysconfig
from functools import cache
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parent.parent


@cache
def asset_root() -> Path:
    installed = [Path(sysconfig.get_path("data", scheme)) / "share" / "duplexgate" for scheme in _schemes()]
    for root in (SOURCE_ROOT, *installed):
        if (root / "deploy" / "example.toml").is_file() and (root / "templates").is_dir():
            return root
    return SOURCE_ROOT  # nothing found: errors then name the path where the files were expected


def _schemes() -> list[str]:
    schemes = [sysconfig.get_default_scheme()]
    user = sysconfig.get_preferred_scheme("user")
    return schemes + ([user] if user not in schemes else [])
