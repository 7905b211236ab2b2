"""Model card (README.md) for a merged checkpoint. Minimal version; the Hub work extends it."""

from __future__ import annotations

from typing import Any

import yaml


def render_model_card(recipe_yaml: str, method: Any, models: list[Any], base: Any | None) -> str:
    """YAML front matter (base_model, library_name, tags) + the recipe and the method's paper."""
    hub_ids = [m.repo_id for m in ([base] if base else []) + list(models) if m is not None and m.repo_id]
    front: dict[str, Any] = {"library_name": "transformers", "tags": ["merge", "weightsmith"]}
    if hub_ids:
        front["base_model"] = hub_ids
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             "# Merged model", "",
             f"Merged with [weightsmith](https://github.com/) using **{method.name}** "
             f"({method.paper}, {method.url}).", "", "## Recipe", "", "```yaml", recipe_yaml.strip(), "```", ""]
    return "\n".join(lines)
