"""The one reader of configuration files (``imclass train --config``, ``imclass tune --space``): JSON,
TOML or YAML chosen by the file's suffix, every failure one ``ValueError`` naming the file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["read_config_file"]


def read_config_file(path: str | Path, *, what: str = "config file", kinds: tuple[str, ...] = (".json", ".toml"),
                     missing: type[Exception] = ValueError) -> Any:
    """The parsed content of ``path``, one of ``kinds`` (``.json``, ``.toml``, ``.yaml``; ``.yml`` goes
    with ``.yaml``). ``what`` names the file in errors; a missing file raises ``missing``."""
    path = Path(path)
    if not path.is_file():
        raise missing(f"{what} {path} not found")
    suffix = ".yaml" if path.suffix == ".yml" else path.suffix
    if suffix not in kinds:
        listed = ", ".join(kinds[:-1]) + " or " + kinds[-1] if len(kinds) > 1 else kinds[0]
        raise ValueError(f"expected a {listed} {what}, received {path.name!r}")
    text = path.read_text()
    try:
        if suffix == ".json":
            return json.loads(text)
        if suffix == ".toml":
            import tomllib  # deferred: only TOML files need it (start-up time)

            return tomllib.loads(text)
        import yaml  # deferred: only YAML files need it (start-up time)

        return yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - json/toml/yaml parse errors of several types
        raise ValueError(f"{what} {path}: cannot parse it: {err}") from None
