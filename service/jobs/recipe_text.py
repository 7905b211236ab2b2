"""Recipe text as the server accepts it: no file paths, no YAML aliases, bounded size; canonical JSON."""

from __future__ import annotations

from typing import Any

import yaml

from service.jobs.store import ServiceError

MAX_RECIPE_BYTES = 1 << 20

# ---------------------------------------------------------------------------------------------
# Recipe loading (server side: no file paths, no YAML aliases, bounded size)
# ---------------------------------------------------------------------------------------------


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors/aliases (no "billion laughs" blow-up in validation)."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(
                f"YAML aliases are not allowed in a recipe (line {event.start_mark.line + 1})"
            )
        return super().compose_node(parent, index)


def parse_recipe_text(text: str) -> dict[str, Any]:
    """YAML text -> dict, for the service (never read as a file path)."""
    if len(text.encode()) > MAX_RECIPE_BYTES:
        raise ServiceError("INVALID_ARGUMENT", f"recipe: larger than {MAX_RECIPE_BYTES} bytes", "recipe_yaml")
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ServiceError("INVALID_ARGUMENT", f"recipe: not valid YAML: {e}", "recipe_yaml") from None
    if not isinstance(data, dict):
        raise ServiceError("INVALID_ARGUMENT", "recipe: a recipe must be a YAML mapping", "recipe_yaml")
    return data
